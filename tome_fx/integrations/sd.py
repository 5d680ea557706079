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

from ..passes.branch_merges import BranchSettings
from .per_branch import PerBranchToMe


class ToMeUNet(PerBranchToMe):
    """A denoiser (a UNet, or a diffusion transformer: DiT, PixArt, SD3) that merges tokens in
    its transformer blocks; called, and read (``config``, ``dtype``, ``device``...), like the
    model it wraps, whose parameters it shares."""

    def __init__(self, unet: torch.nn.Module, settings: BranchSettings, use_rand: bool, prop_attn: bool):
        super().__init__(unet, settings, prop_attn)
        self.__dict__.update(use_rand=use_rand)

    @property
    def unet(self) -> torch.nn.Module:
        return self.model

    def _settings_for(self, sample: torch.Tensor) -> BranchSettings:
        # full resolution is the latent's, in patches for a transformer; tomesd's rule: an odd
        # batch cannot hold prompted and unprompted halves, so no randomness
        patch = getattr(getattr(self.model, "config", None), "patch_size", None) or 1
        grid = tuple(side // patch for side in sample.shape[-2:])
        return replace(self.settings, grid=grid, rand=self.use_rand and sample.shape[0] % 2 == 0)


def _denoiser(pipe) -> str:
    """The pipeline attribute that holds its denoiser: ``unet``, or ``transformer`` (DiT,
    PixArt, SD3 pipelines)."""
    for name in ("unet", "transformer"):
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise TypeError(f"{type(pipe).__name__} holds no `unet` or `transformer` module to merge tokens in")


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
    prop_attn: bool = False,
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
    ``prop_attn`` (not in tomesd): proportional attention in merged self-attention, which makes
    merging exact for duplicate tokens.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    kinds = frozenset(k for k, on in (("attn", merge_attn), ("crossattn", merge_crossattn), ("mlp", merge_mlp)) if on)
    settings = BranchSettings(ratio, (0, 0), max_downsample, sx, sy, False, kinds)
    if isinstance(pipe_or_unet, PerBranchToMe):
        return ToMeUNet(pipe_or_unet.model, settings, use_rand, prop_attn)
    if isinstance(pipe_or_unet, torch.nn.Module):
        return ToMeUNet(pipe_or_unet, settings, use_rand, prop_attn)
    pipe, name = remove(pipe_or_unet), _denoiser(pipe_or_unet)
    setattr(pipe, name, ToMeUNet(getattr(pipe, name), settings, use_rand, prop_attn))
    return pipe


def remove(pipe):
    """Give a pipeline its original denoiser (UNet or transformer) back."""
    name = _denoiser(pipe)
    if isinstance(getattr(pipe, name), ToMeUNet):
        setattr(pipe, name, getattr(pipe, name).model)
    return pipe
