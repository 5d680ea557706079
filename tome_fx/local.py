"""Local (per-block) merging: a module that merges tokens per branch (``passes.branch_merges``),
captured per input shape.

The scheme beside whole-stream merging (``transform(scheme="block")``, ``tome_fx.sd``,
``tome_fx.sam``): models that hand their token grid on at every block (a UNet's levels,
SAM's windowed encoder, Swin's stages) keep every token in the residual stream; each
chosen branch runs on fewer.
The wrapped model is captured with ``torch.export`` for each input shape it is called
with (resolution, batch; cached), so any shape works without an error. It is read like
the model it wraps (``config``, ``dtype``, ``img_size``...), whose parameters it shares
and never modifies.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .call_spec import CallSpec
from .capture import capture
from .errors import UnsupportedModelError
from .match_reuse import MatchReuse
from .passes.branch_merges import KINDS, BranchPlan, BranchRefused, BranchSettings, apply_branch_tome
from .passes.graph_utils import graph_copy


def _describe(plan: BranchPlan) -> str:
    """One line of ``summary``: what a block's branches merge (an attention branch that merges
    per window, separately)."""
    if plan.unmerged and not plan.merged:
        return f"  {plan.name}: not merged: {plan.unmerged}"
    whole = [k for k in plan.merged if not (plan.windows and k == "attn")]
    text = f"  {plan.name}: {plan.tokens} tokens" + (f", {plan.r} merged away in {', '.join(whole)}" if whole else "")
    if whole and plan.tile:
        text += f" (matched within {plan.tile[0]} x {plan.tile[1]}-token tiles)"
    if plan.windows:
        count, tokens, r = plan.windows
        text += f"; attn: {r} of {tokens} merged away in " + (f"each of {count} windows" if count > 1 else "its window")
    return text + (f"; {plan.unmerged}" if plan.unmerged else "")


class LocalToMe(torch.nn.Module):
    """``model`` with its chosen branches merging tokens as ``settings`` says; ``prop_attn``:
    proportional attention in merged self-attention; ``reuse`` > 1: each matching is reused
    for that many steps (``match_reuse``); ``skip_refused``: a branch that cannot merge is
    left as captured, its reason in ``summary()``, and the others merge (else it refuses all)."""

    def __init__(self, model: torch.nn.Module, settings: BranchSettings, prop_attn: bool | str = False,
                 reuse: int = 1, skip_refused: bool = False):
        super().__init__()
        self.model = model
        self.__dict__.update(settings=settings, prop_attn=prop_attn, reuse=reuse, skip_refused=skip_refused,
                             _graphs={}, _compile_kwargs=None)

    @property
    def original(self) -> torch.nn.Module:
        """The wrapped model (shared, never modified)."""
        return self.model

    def compile(self, **compile_kwargs) -> None:
        """Like ``nn.Module.compile``, in place: every graph, captured and to come, runs under
        ``torch.compile(graph, **compile_kwargs)`` (``fullgraph=True`` holds: each graph is one
        exported program). Compiling this module instead would trace the per-shape dispatch."""
        self._compile_kwargs = compile_kwargs
        for key, (runner, plan) in self._graphs.items():
            if isinstance(runner, MatchReuse):
                runner.rewrap(self._compiled)
            elif runner is not None:
                self._graphs[key] = (self._compiled(runner), plan)

    def _compiled(self, graph_module):
        if self._compile_kwargs is None:
            return graph_module
        return torch.compile(getattr(graph_module, "_orig_mod", graph_module), **self._compile_kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")  # absent while being copied or unpickled
            if model is None:
                raise
            return getattr(model, name)

    @property
    def plans(self) -> dict[tuple, tuple[BranchPlan, ...]]:
        """For the input shapes of each call seen so far: the blocks that merge, their tokens,
        the tokens they merge away and which branches merge."""
        return {tuple(d[0] for d in key[1] if isinstance(d, tuple)): plan for key, (_, plan) in self._graphs.items()}

    def summary(self) -> str:
        """The plans as text: per input shape, each merging block and its branches."""
        lines = []
        for shapes, plan in self.plans.items():
            lines.append(f"inputs {shapes}: {sum(bool(p.merged) for p in plan)} blocks merge")
            lines += [_describe(p) for p in plan]
        return "\n".join(lines) or "no call yet: plans are made per input shape, on the first call"

    def _key(self, call: CallSpec, settings: BranchSettings) -> tuple:
        """Input shapes and values, the settings made for them (a FLUX grid read from its ids), the
        mode, and which tensors the model holds: a graph reads the parameters it was captured
        with, so one replaced (``.to()``, ``load_state_dict(assign=True)``, an adapter) needs a
        new graph."""
        leaves, spec = pytree.tree_flatten(call.arguments)
        described = tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else repr(v) for v in leaves)
        held = tuple((id(t), t.dtype, t.device) for t in (*self.model.parameters(), *self.model.buffers()))
        return (str(spec), described, settings, self.model.training, held)

    def forward(self, *args, **kwargs) -> Any:
        call = CallSpec.record(self.model, args, kwargs)
        runner, _ = self._graph_for(call)
        if runner is None:  # nothing merges at these shapes
            return self.model(*args, **kwargs)
        graph_args, graph_kwargs = call.graph_call(call.arguments)
        if isinstance(runner, MatchReuse):
            return runner(call.arguments.get("timestep"), *graph_args, **graph_kwargs)
        return runner(*graph_args, **graph_kwargs)

    def _graph_for(self, call: CallSpec) -> tuple[Any, tuple[BranchPlan, ...]]:
        """The graph for ``call``'s input shapes and its plan, captured and rewritten the first time."""
        settings = self._settings_for(call)
        key = self._key(call, settings)
        if key not in self._graphs:
            # graphs of tensors the model no longer holds would only keep them alive
            self._graphs = {k: v for k, v in self._graphs.items() if k[-1] == key[-1]}
            self._graphs[key] = self._build(call, settings)
        return self._graphs[key]

    def _settings_for(self, call: CallSpec) -> BranchSettings:
        """The settings for ``call`` (subclasses read the token grid from it)."""
        return self.settings

    def _build(self, call: CallSpec, settings: BranchSettings):
        graph_module = capture(self.model, call, dynamic_batch=False)
        reuse = self.reuse > 1 and call.arguments.get("timestep") is not None
        if self.reuse > 1 and not reuse:
            warnings.warn(f"{type(self.model).__name__} is called without a `timestep` argument, which tells "
                          f"denoising steps apart: reuse={self.reuse} is off, every call matches", stacklevel=3)
        modes = ("store", "reuse") if reuse else (None,)
        skipped: dict[tuple[str, str], str] = {}
        pristine = graph_copy(graph_module) if self.skip_refused else None  # what each retry starts from
        while True:  # with skip_refused, again without each branch refused, until none is
            graphs = [graph_module] + [graph_copy(graph_module) for _ in modes[1:]]
            try:
                for gm, mode in zip(graphs, modes):
                    plan, idle = apply_branch_tome(gm, replace(settings, skip=frozenset(skipped)),
                                                   prop_attn=self.prop_attn, matchings=mode)
                break
            except BranchRefused as why:
                if not self.skip_refused or why.branch in skipped:
                    raise
                skipped[why.branch] = str(why)
                graph_module = graph_copy(pristine)
        plan = _with_skipped(plan, skipped)
        if skipped and idle:
            idle = f"no branch merges: {next(iter(skipped.values()))}"
        if idle:
            shapes = [tuple(t.shape) for t in pytree.tree_leaves(call.arguments) if isinstance(t, torch.Tensor)]
            warnings.warn(f"{type(self.model).__name__} merges no token at input shapes {shapes}: {idle}", stacklevel=3)
            return None, plan  # the model itself runs: bit for bit the original (an export may round differently)
        if reuse and plan:
            return MatchReuse(*graphs, self.reuse, self._compiled), plan
        return self._compiled(graph_module), plan


def _with_skipped(plan: tuple[BranchPlan, ...], skipped: dict[tuple[str, str], str]) -> tuple[BranchPlan, ...]:
    """``plan`` with each branch left unmerged named, and why, on its block's line."""
    reasons: dict[str, list[str]] = {}
    for (name, key), why in skipped.items():
        reasons.setdefault(name, []).append(f"{key} not merged: {why}")
    named = [replace(p, unmerged="; ".join(filter(None, [p.unmerged, *reasons.pop(p.name, [])]))) if p.name in reasons
             else p for p in plan]
    return tuple(named) + tuple(BranchPlan(name, 0, 0, (), unmerged="; ".join(why)) for name, why in reasons.items())


def local_transform(model: torch.nn.Module, args: tuple, kwargs: dict, ratio: float, *, prop_attn: bool | str,
                    rope: str) -> LocalToMe:
    """``transform(model, ratio, scheme="block")``: every block merges ``ratio`` of its tokens in
    each branch (attention, cross-attention, MLP), on its own token grid (``[batch, h, w, C]``,
    or a square ``[batch, h * w, C]`` behind learned tokens), and un-merges before each residual
    add; captured now on the example inputs, so a refusal comes at once. A branch that cannot
    merge (an attention with a per-window mask, an MLP that convolves the grid) is left as it is,
    named with its reason in ``summary()`` and a warning, and the other branches merge; where none
    can, it refuses."""
    call = CallSpec.record(model, args, kwargs)
    settings = BranchSettings(ratio, (0, 0), kinds=frozenset(KINDS), grid_stream=True, rope=rope)
    local = LocalToMe(model, settings, prop_attn=prop_attn, skip_refused=True)
    _, plan = local._graph_for(call)
    left = [p for p in plan if p.unmerged and "not merged:" in p.unmerged]
    if left and ratio > 0 and not any(p.merged for p in plan):
        raise UnsupportedModelError(f"no branch of any block can merge: {left[0].name}: {left[0].unmerged}")
    if left:
        warnings.warn(f"{type(model).__name__}: {len(left)} blocks leave a branch unmerged (summary() lists each): "
                      f"{left[0].name}: {left[0].unmerged}", stacklevel=3)
    return local
