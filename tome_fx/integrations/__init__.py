"""Per-model entry points built on the core: ``sd`` (Stable Diffusion, tomesd-compatible),
``sam`` (SAM's image encoder) and ``vlm`` (fewer visual tokens into a VLM's language model).
``sd`` and ``sam`` are presets over the core's local merging (``tome_fx.local``)."""
