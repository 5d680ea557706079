"""Stable Diffusion with Token Merging, tomesd-compatible, as a graph rewrite.

``tome_fx.sd.apply(pipe_or_unet, ratio=0.5, ...)`` takes tomesd's parameter names and
defaults, so tomesd users change one import. Where tomesd swaps the class of diffusers'
``BasicTransformerBlock`` for a copy of an old ``forward``, this captures the UNet with
``torch.export`` for each input shape it is called with (resolution, batch; cached) and
rewrites the graph: every self-attention block at most ``max_downsample`` times below
full resolution merges the chosen branches' tokens (``passes.branch_merges``). Nothing in
the UNet is modified, so it follows diffusers' code as it is.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils import _pytree as pytree

from ..call_spec import CallSpec
from ..passes.branch_merges import BranchSettings
from ..passes.proportional_attention import form_of
from ..passes.rotary_tables import RULES
from ..local import LocalToMe


class ToMeUNet(LocalToMe):
    """A denoiser (a UNet, or a diffusion transformer: DiT, PixArt, SD3) that merges tokens in
    its transformer blocks; called, and read (``config``, ``dtype``, ``device``...), like the
    model it wraps, whose parameters it shares."""

    def __init__(self, unet: torch.nn.Module, settings: BranchSettings, use_rand: bool, prop_attn: bool | str,
                 reuse: int):
        super().__init__(unet, settings, prop_attn, reuse)
        self.__dict__.update(use_rand=use_rand)

    @property
    def unet(self) -> torch.nn.Module:
        return self.model

    def _settings_for(self, call: CallSpec) -> BranchSettings:
        # tomesd's rule: an odd batch cannot hold prompted and unprompted halves, so no randomness
        grid, batch = _patch_grid(self.model, call)
        return replace(self.settings, grid=grid, rand=self.use_rand and batch % 2 == 0)


def _patch_grid(model: torch.nn.Module, call: CallSpec) -> tuple[tuple[int, int], int]:
    """(The full-resolution token grid (h, w), the batch) of a denoiser call. A UNet's or an
    image transformer's latent [B, C, H, W] in patches; a video transformer's [B, C, F, H, W]
    (Wan) or [B, F, C, H, W] (CogVideoX) as its frames' grids stacked, (F * H, W) in patches,
    so no cell of ``sy`` rows spans two frames where a frame's rows divide by it; FLUX's
    packed tokens [B, N, C] by the rows and columns in ``img_ids``."""
    config = getattr(model, "config", None)
    sample = next(v for v in pytree.tree_leaves(call.arguments) if isinstance(v, torch.Tensor))
    ids = call.arguments.get("img_ids")
    if sample.dim() == 3 and isinstance(ids, torch.Tensor):
        rows, cols = ids.reshape(-1, ids.shape[-1])[:, 1:3].long().unbind(1)
        return (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1), sample.shape[0]
    patch = getattr(config, "patch_size", None) or 1
    if sample.dim() == 5:
        pt, ph, pw = patch if isinstance(patch, (tuple, list)) else (getattr(config, "patch_size_t", None) or 1, patch, patch)
        frames_first = sample.shape[1] != getattr(config, "in_channels", sample.shape[1])  # CogVideoX
        frames, height, width = (sample.shape[1], *sample.shape[3:]) if frames_first else sample.shape[2:]
        return ((frames // pt) * (height // ph), width // pw), sample.shape[0]
    return tuple(side // patch for side in sample.shape[-2:]), sample.shape[0]


def _denoisers(pipe) -> list[str]:
    """The pipeline attributes that hold its denoisers: ``unet``, or ``transformer`` (and Wan
    2.2's second expert, ``transformer_2``)."""
    names = [n for n in ("unet", "transformer", "transformer_2") if isinstance(getattr(pipe, n, None), torch.nn.Module)]
    if not names:
        raise TypeError(f"{type(pipe).__name__} holds no `unet` or `transformer` module to merge tokens in")
    return names


def apply(
    pipe_or_unet,
    ratio: float = 0.5,
    *,
    max_downsample: int = 1,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    prop_attn: bool | str = False,
    reuse: int = 1,
    rope: str = "mean",
):
    """tomesd's ``apply_patch``, as a graph rewrite. Given a UNet or a diffusion transformer
    (DiT, PixArt, SD3: its patch grid is the full resolution), returns a new module called
    like it; given a ``DiffusionPipeline``, replaces ``pipe.unet`` (or ``pipe.transformer``)
    with one and returns the pipeline (``remove(pipe)`` restores the original). The model is
    never modified. In SD3's joint attention only the image tokens merge, never the text.

    ``ratio``: the share of each merging block's tokens merged away; ``max_downsample``: merge
    in blocks at most this many times below full resolution (1, 2, 4 or 8); ``sx``, ``sy``: one
    dst token per ``sy`` x ``sx`` cell, picked at random with ``use_rand`` (global RNG, so
    ``torch.manual_seed`` makes it reproducible; off for odd batches, as in tomesd);
    ``merge_attn`` / ``merge_crossattn`` / ``merge_mlp``: the branches that merge.
    Not in tomesd: ``prop_attn``, proportional attention in merged self-attention, which makes
    merging exact for duplicate tokens (True, ``"bias"`` or ``"flash"``, as in ``tome_fx.transform``); ``reuse=k``, each block's matching is computed at one
    denoising step and reused for the next k - 1 (steps told apart by the ``timestep``
    argument; the prompted and unprompted calls of one step each keep their own); ``rope``:
    the rotary terms of a merged token (FLUX, Wan), as in ``tome_fx.transform``.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if not (isinstance(reuse, int) and reuse >= 1):
        raise ValueError(f"reuse must be an int >= 1 (1: match at every step), got {reuse!r}")
    if rope not in RULES:
        raise ValueError(f"rope must be one of {RULES}, got {rope!r}")
    form_of(prop_attn)  # (a bad value raises here)
    kinds = frozenset(k for k, on in (("attn", merge_attn), ("crossattn", merge_crossattn), ("mlp", merge_mlp)) if on)
    settings = BranchSettings(ratio, (0, 0), max_downsample, sx, sy, False, kinds, rope=rope)
    if isinstance(pipe_or_unet, LocalToMe):
        return ToMeUNet(pipe_or_unet.model, settings, use_rand, prop_attn, reuse)
    if isinstance(pipe_or_unet, torch.nn.Module):
        return ToMeUNet(pipe_or_unet, settings, use_rand, prop_attn, reuse)
    pipe = remove(pipe_or_unet)
    for name in _denoisers(pipe):
        setattr(pipe, name, ToMeUNet(getattr(pipe, name), settings, use_rand, prop_attn, reuse))
    return pipe


def remove(pipe):
    """Give a pipeline its original denoisers (UNet or transformers) back."""
    for name in _denoisers(pipe):
        if isinstance(getattr(pipe, name), ToMeUNet):
            setattr(pipe, name, getattr(pipe, name).model)
    return pipe
