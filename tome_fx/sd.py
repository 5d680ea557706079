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

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .call_spec import CallSpec
from .capture import capture
from .passes.branch_merges import BranchPlan, BranchSettings, apply_branch_tome


@dataclass(frozen=True)
class _Options:
    settings: BranchSettings
    use_rand: bool
    prop_attn: bool


class ToMeUNet(torch.nn.Module):
    """A UNet that merges tokens in its transformer blocks; called, and read (``config``,
    ``dtype``, ``device``...), like the UNet it wraps, whose parameters it shares."""

    def __init__(self, unet: torch.nn.Module, options: _Options):
        super().__init__()
        self.unet = unet
        self.__dict__.update(options=options, _graphs={})

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            unet = self.__dict__.get("_modules", {}).get("unet")  # absent while being copied or unpickled
            if unet is None:
                raise
            return getattr(unet, name)

    @property
    def plans(self) -> dict[tuple, tuple[BranchPlan, ...]]:
        """For the input shapes of each call seen so far: the blocks that merge, their tokens,
        the tokens they merge away and which branches merge."""
        return {tuple(d[0] for d in key[1] if isinstance(d, tuple)): plan for key, (_, plan) in self._graphs.items()}

    def _key(self, call: CallSpec) -> tuple:
        leaves, spec = pytree.tree_flatten(call.arguments)
        described = tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else repr(v) for v in leaves)
        return (str(spec), described, self.unet.training)

    def forward(self, *args, **kwargs) -> Any:
        call = CallSpec.record(self.unet, args, kwargs)
        key = self._key(call)
        if key not in self._graphs:
            self._graphs[key] = self._build(call)
        graph_args, graph_kwargs = call.graph_call(call.arguments)
        return self._graphs[key][0](*graph_args, **graph_kwargs)

    def _build(self, call: CallSpec):
        sample = next(v for v in pytree.tree_leaves(call.arguments) if isinstance(v, torch.Tensor))
        options = self.options
        # tomesd's rule: an odd batch cannot hold prompted and unprompted halves, so no randomness
        settings = replace(options.settings, grid=tuple(sample.shape[-2:]),
                           rand=options.use_rand and sample.shape[0] % 2 == 0)
        graph_module = capture(self.unet, call, dynamic_batch=False)
        return graph_module, apply_branch_tome(graph_module, settings, prop_attn=options.prop_attn)


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
    """tomesd's ``apply_patch``, as a graph rewrite. Given a UNet, returns a new module called
    like it; given a ``DiffusionPipeline``, replaces ``pipe.unet`` with one and returns the
    pipeline (``remove(pipe)`` restores the original). The UNet is never modified.

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
    options = _Options(BranchSettings(ratio, (0, 0), max_downsample, sx, sy, False, kinds), use_rand, prop_attn)
    if isinstance(pipe_or_unet, torch.nn.Module) and not hasattr(pipe_or_unet, "unet"):
        unet = pipe_or_unet.unet if isinstance(pipe_or_unet, ToMeUNet) else pipe_or_unet
        return ToMeUNet(unet, options)
    pipe = remove(pipe_or_unet)
    pipe.unet = ToMeUNet(pipe.unet, options)
    return pipe


def remove(pipe):
    """Give a pipeline its original UNet back."""
    if isinstance(pipe.unet, ToMeUNet):
        pipe.unet = pipe.unet.unet
    return pipe
