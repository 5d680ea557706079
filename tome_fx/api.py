"""Public API: ``transform`` a model into its token-merging version."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import merge
from .capture import batch_size, batched_tensors, capture, normalize_example_inputs
from .passes import TomePlan, apply_tome
from .schedule import Schedule, resolve_schedule


class TokenState(NamedTuple):
    """Tokens after the last merge: ``size`` [B, N] patches per token, ``positions`` [B, N0]
    the final token that holds each original token and, with ``trace_source=True``,
    ``source`` [B, N, N0] (row i marks the original tokens in token i)."""

    size: torch.Tensor
    positions: torch.Tensor
    source: torch.Tensor | None


class ToMeModel(torch.nn.Module):
    """A model rewritten to merge tokens; called exactly like the original.

    Parameters and buffers are *shared* with the original model (not copied): the
    original is never modified by ``transform``, but an in-place change made through
    either module afterwards (``.half()``, training) shows in both. ``copy.deepcopy``
    the model first if the two must be independent.
    """

    def __init__(
        self, graph_module: torch.fx.GraphModule, plan: TomePlan, input_shapes, *, prop_attn, trace_source, unmerge_outputs
    ):
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.unmerge_outputs = unmerge_outputs
        self._input_shapes = input_shapes

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        """Shapes (batch dim left out) of the tensor inputs this model was built for."""
        return list(self._input_shapes)

    @property
    def schedule(self) -> list[int]:
        """Tokens each block merges away (after clamping)."""
        return self.plan.schedule

    @property
    def token_counts(self) -> list[int]:
        """Tokens entering each block, then the final count."""
        return self.plan.token_counts

    def predicted_flops(self, batch: int = 1, merging: bool = True) -> int:
        """FLOPs of the attention blocks and merges, by ``tome_fx.cost`` (patch embedding
        and head, which ToMe leaves alone, are not included). ``merging=False`` gives the
        original model's, so their ratio is the speedup bound without capturing it again."""
        return self.plan.predicted_flops(batch, merging)

    def _check_inputs(self, args, kwargs) -> None:
        shapes = [tuple(t.shape[1:]) for t in batched_tensors((args, kwargs))]
        if shapes != self._input_shapes:
            raise ValueError(
                f"inputs of shape {[('batch',) + s for s in shapes]} differ from the ones this model was "
                f"transformed for, {[('batch',) + s for s in self._input_shapes]}: token counts are fixed "
                "when the graph is built; call tome_fx.transform again with example_inputs of the new size"
            )

    def forward_with_tokens(self, *args, **kwargs) -> tuple[Any, TokenState]:
        """The model's outputs together with the final token sizes (and sources)."""
        self._check_inputs(args, kwargs)
        return self._with_tokens(self.graph_module(*args, **kwargs))

    def _with_tokens(self, graph_outputs) -> tuple[Any, TokenState]:
        outputs, size, positions = graph_outputs
        source = merge.source_map(positions, size.shape[1]) if self.trace_source else None
        return outputs, TokenState(size, positions, source)

    def forward(self, *args, **kwargs):
        return self.forward_with_tokens(*args, **kwargs)[0]

    def __repr__(self) -> str:
        return (
            f"ToMeModel(schedule={self.schedule}, tokens={self.token_counts}, protected={self.plan.protected}, "
            f"prop_attn={self.prop_attn}, trace_source={self.trace_source}, unmerge_outputs={self.unmerge_outputs})"
        )


def transform(
    model: torch.nn.Module,
    r: Schedule,
    *,
    example_inputs=None,
    prop_attn: bool = True,
    trace_source: bool = False,
    unmerge_outputs: bool = True,
) -> ToMeModel:
    """Return a new module that runs ``model`` with Token Merging; ``model`` is untouched.

    ``r``: tokens merged per block -- an int, a list (one per block, padded with 0), or
    ``(r, inflection)`` with inflection in [-1, 1]. ``example_inputs``: a tensor, a tuple
    of positional args or a dict of keyword args; optional where the model states its
    input size. The batch size stays dynamic; other input dims are fixed by the example.
    Per-token outputs (``last_hidden_state``...) are un-merged back to the original token
    positions, so outputs keep the original shapes; ``unmerge_outputs=False`` returns the
    merged tokens instead (their sizes come from ``forward_with_tokens``).
    Raises ``UnsupportedModelError`` naming the block and reason where a rewrite cannot be
    proven safe.
    """
    resolve_schedule(r, 1 if not isinstance(r, list) else max(len(r), 1))  # type errors before capture
    inputs = normalize_example_inputs(model, example_inputs)
    batch_size(inputs)
    graph_module = capture(model, inputs)
    plan = apply_tome(graph_module, r, prop_attn=prop_attn, unmerge_outputs=unmerge_outputs)
    shapes = [tuple(t.shape[1:]) for t in batched_tensors(inputs)]
    return ToMeModel(
        graph_module, plan, shapes, prop_attn=prop_attn, trace_source=trace_source, unmerge_outputs=unmerge_outputs
    )


def compile(model: torch.nn.Module, r: Schedule, *, example_inputs=None, **compile_kwargs) -> torch.nn.Module:
    """``transform`` then ``torch.compile``, with the batch dimension marked dynamic so that a
    new batch size does not recompile (batch 1 excepted: dynamo specializes sizes 0 and 1, so
    it compiles once more the first time it sees a single-sample batch). ``compile_kwargs``
    go to ``torch.compile``, except the ``transform`` options ``prop_attn``, ``trace_source``
    and ``unmerge_outputs``."""
    options = {k: compile_kwargs.pop(k) for k in ("prop_attn", "trace_source", "unmerge_outputs") if k in compile_kwargs}
    fast = transform(model, r, example_inputs=example_inputs, **options)
    return CompiledToMe(fast, **compile_kwargs)


class CompiledToMe(torch.nn.Module):
    """A ``ToMeModel`` whose graph runs under ``torch.compile``, inputs' batch dimension
    marked dynamic first. The graph module is compiled, not the ``ToMeModel``: every
    ``ToMeModel`` shares one ``forward`` code object, so compiling several in one process
    (an r sweep) would recompile that one frame until dynamo's recompile limit sends the
    rest back to eager; each graph module has code of its own."""

    def __init__(self, model: ToMeModel, **compile_kwargs):
        super().__init__()
        self.model = model
        self.__dict__["_graph"] = torch.compile(model.graph_module, **compile_kwargs)  # shares model's weights

    def forward_with_tokens(self, *args, **kwargs) -> tuple[Any, TokenState]:
        self.model._check_inputs(args, kwargs)
        for tensor in batched_tensors((args, kwargs)):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self.model._with_tokens(self._graph(*args, **kwargs))

    def forward(self, *args, **kwargs):
        return self.forward_with_tokens(*args, **kwargs)[0]
