"""Per-model entry points built on the core: ``sd`` (Stable Diffusion, tomesd-compatible), ``sam``
(SAM's image encoder), ``vlm`` (fewer visual tokens into a VLM's language model) and
``per_branch`` (the per-input-shape module ``sd`` and ``sam`` return)."""
