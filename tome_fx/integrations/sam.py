"""SAM's image encoder with Token Merging in its MLP branches.

SAM's encoder (Meta's ``segment_anything``, HF ``SamModel``, timm ``samvit_*``) keeps its
tokens as a 64 x 64 grid: windowed blocks partition it, global blocks add decomposed
relative positions, the neck convolves it. So the stream is never merged; each block's
MLP branch merges its input after the norm (one dst per ``sy`` x ``sx`` cell, tomesd's
matching on the block's input), runs on fewer tokens and un-merges before the residual
add (``passes.branch_merges``). An MLP acts on each token alone, so this is exact where
the merged tokens are duplicates at the MLP's input. The attention branches do not merge:
a window or a relative-position term needs every token at its own position, and a merged
token has several.
"""

from __future__ import annotations

import torch

from .. import merge
from ..passes.branch_merges import BranchSettings
from .per_branch import PerBranchToMe

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
    """Merge ``ratio`` of the tokens in every MLP branch of a SAM image encoder.

    Given an encoder (``ImageEncoderViT``, ``SamVisionEncoder``, a timm ``samvit``): returns
    a new module called and read like it. Given a model or predictor that holds one (``Sam``,
    ``SamModel``, ``SamPredictor``): replaces its encoder with that module and returns it;
    ``remove`` restores the original. No parameter is modified. ``ratio=0`` merges nothing.
    ``sx``, ``sy``: one dst per ``sy`` x ``sx`` cell (at most 1 - 1/(sx*sy) of the tokens
    merge), picked at random with ``use_rand`` (global RNG).
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
        encoder = model.model if isinstance(model, PerBranchToMe) else model
        return PerBranchToMe(encoder, settings, prop_attn=attn)
    remove(model)
    holder, name = found
    setattr(holder, name, PerBranchToMe(getattr(holder, name), settings, prop_attn=attn))
    return model


def remove(model):
    """Give a model or predictor its original image encoder back."""
    found = _holder(model)
    if found is not None and isinstance(getattr(*found), PerBranchToMe):
        setattr(found[0], found[1], getattr(*found).model)
    return model
