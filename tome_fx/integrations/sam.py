"""SAM's and SAM 2's image encoders with Token Merging in their branches.

SAM's encoder (Meta's ``segment_anything``, HF ``SamModel``, timm ``samvit_*``) and SAM 2's
Hiera keep their tokens as a [B, h, w, C] grid: windowed blocks partition it, global blocks
add decomposed relative positions (SAM), stages pool it (Hiera), the neck convolves it. So
the stream is never merged; each block's branches merge (``passes.branch_merges``, one dst
per ``sy`` x ``sx`` cell, tomesd's matching), run on fewer tokens and un-merge before the
residual add.

- MLP branches (the default): merged after the norm; exact where the merged tokens are
  duplicates, since an MLP acts on each token alone.
- Attention branches too with ``attn=True`` (with proportional attention): a windowed
  block merges within each window, the same number in every window, so merged tokens
  never cross a window border; a global block over its whole grid, its relative positions
  read per merged pair by the ``rel_pos`` rule (``passes.relative_positions``).
  Approximate: a merged token stands for patches at several positions. Exact where the
  merged tokens are duplicates and the relative positions are zero.
- Hiera's pooled stage changes merge nothing, and neither do whole-grid branches where the
  matching (every source against every dst) costs more than they save: SAM 2's first
  stages, 65,536 narrow tokens at 1024 px (``summary`` lists both, with the reason).
"""

from __future__ import annotations

import torch

from .. import merge
from ..passes.branch_merges import BranchSettings
from ..local import LocalToMe

_ENCODER_ATTRIBUTES = ("image_encoder", "vision_encoder")  # segment_anything's Sam; HF SamModel


def _holder(model):
    """(object holding the encoder, attribute name), or None for an encoder itself."""
    if hasattr(model, "model") and not isinstance(model, torch.nn.Module):  # SamPredictor
        model = model.model
    for name in _ENCODER_ATTRIBUTES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return model, name
    return None


def apply(model, ratio: float = 0.5, *, attn: bool = False, rel_pos: str = "mean", sx: int = 2, sy: int = 2,
          use_rand: bool = False):
    """Merge ``ratio`` of the tokens in every MLP branch of a SAM or SAM 2 image encoder, and
    with ``attn`` in every attention branch too (per window in windowed blocks).

    Given an encoder (``ImageEncoderViT``, ``SamVisionEncoder``, a timm ``samvit``, SAM 2's
    ``ImageEncoder``): returns a new module called and read like it. Given a model or predictor
    that holds one (``Sam``, ``SamModel``, ``SamPredictor``, ``SAM2Base``,
    ``SAM2ImagePredictor``): replaces its encoder with that module and returns it; ``remove``
    restores the original. No parameter is modified. ``ratio=0`` merges nothing. ``rel_pos``:
    how a merged pair sees SAM's relative positions, ``"mean"`` (the mean of its patches'
    biases; measured best, ``benchmarks/rel_pos.py``) or ``"representative"`` (its first
    patches'). ``sx``, ``sy``: one dst per ``sy`` x ``sx`` cell (at most 1 - 1/(sx*sy) of the
    tokens merge), picked at random with ``use_rand`` (global RNG).
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if rel_pos not in merge.REL_POS_RULES:
        raise ValueError(f"rel_pos is one of {merge.REL_POS_RULES}, not {rel_pos!r}")
    kinds = frozenset({"mlp", "attn"} if attn else {"mlp"})
    settings = BranchSettings(ratio, (0, 0), sx=sx, sy=sy, rand=use_rand, kinds=kinds, grid_stream=True,
                              rel_pos=rel_pos)
    found = _holder(model)
    if found is None:
        encoder = model.model if isinstance(model, LocalToMe) else model
        return LocalToMe(encoder, settings, prop_attn=attn)
    remove(model)
    holder, name = found
    setattr(holder, name, LocalToMe(getattr(holder, name), settings, prop_attn=attn))
    return model


def remove(model):
    """Give a model or predictor its original image encoder back."""
    found = _holder(model)
    if found is not None and isinstance(getattr(*found), LocalToMe):
        setattr(found[0], found[1], getattr(*found).model)
    return model
