"""Per-model entry points built on the core: ``sd`` (Stable Diffusion, tomesd-compatible), ``sam``
(SAM's image encoder) and ``per_branch`` (the per-input-shape module both return)."""
