"""Public API: ``transform`` a model into its token-merging version."""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from . import auto, merge, submodules
from .call_spec import CallSpec
from .capture import batch_mask, batched_tensors, capture, normalize_example_inputs, tensors_of
from .errors import UnsupportedModelError
from .graphs import TREE, GraphsPerMode, InstanceSignature, in_mode, mode_of, with_signature
from .local import LocalToMe, local_transform
from .passes import TomePlan, apply_tome
from .passes.proportional_attention import form_of
from .passes.rotary_tables import RULES
from .passes.untracked_positions import forward_graph
from .schedule import Schedule, resolve_schedule


class TokenState(NamedTuple):
    """Tokens after the last merge: ``size`` [B, N] patches per token, ``positions`` [B, N0]
    the final token that holds each original token and, with ``trace_source=True``,
    ``source`` [B, N, N0] (row i marks the original tokens in token i)."""

    size: torch.Tensor
    positions: torch.Tensor
    source: torch.Tensor | None


@dataclass(frozen=True)
class _Options:
    r: Schedule
    prop_attn: bool | str
    trace_source: bool
    unmerge_outputs: bool
    scope: tuple[str, ...] = ()
    rope: str = "mean"
    checkpoint: bool = False  # each block under torch.utils.checkpoint
    method: str = "tome"  # the merge policy (``merge.POLICIES``)


_CACHE_OUTPUT = re.compile(r"Found <class '[\w.]*Cache'> in output")  # torch.export's words for an HF cache


def _build(model: torch.nn.Module, call: CallSpec, options: _Options, mode: bool | None):
    if options.checkpoint and options.scope:
        warnings.warn(f"gradient checkpointing: only the blocks under scope {list(options.scope)} run "
                      "checkpointed; the rest of the model keeps every activation for backward", stacklevel=3)
    with in_mode(model, mode):
        graph_module = capture(model, call)
    plan = apply_tome(graph_module, options.r, prop_attn=options.prop_attn, unmerge_outputs=options.unmerge_outputs,
                      scope=options.scope, rope=options.rope, checkpoint=options.checkpoint, method=options.method)
    return graph_module, plan


def _checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether the model has gradient checkpointing turned on: timm's ``grad_checkpointing``,
    HF's ``gradient_checkpointing`` flags (set by ``set_grad_checkpointing()`` and
    ``gradient_checkpointing_enable()``)."""
    return any(getattr(module, flag, False) is True for module in model.modules()
               for flag in ("grad_checkpointing", "gradient_checkpointing"))


class ToMeModel(GraphsPerMode):
    """A model rewritten to merge tokens; it behaves like the module it replaces.

    - Called like the original: its positional and keyword arguments, and
      ``inspect.signature`` shows its parameters. Non-tensor arguments are fixed when the
      model is captured; a call that changes one raises ``ValueError``.
    - ``train()`` / ``eval()`` switch dropout, drop-path and every other mode-dependent op as
      they would in the original: each mode runs a graph captured in that mode (the other
      mode's is captured the first time it is asked for).
    - ``state_dict()`` has the original's keys, so checkpoints load either way;
      ``copy.deepcopy`` works, and pickling (``torch.save``) stores the original module and
      the transform's options, and transforms again when loaded.

    Parameters and buffers are *shared* with the original model (not copied): ``transform``
    never modifies the original, but an in-place change made through either module
    afterwards (``.to(dtype)``, training, ``load_state_dict``) shows in both.
    ``load_state_dict(..., assign=True)`` on the original replaces its tensors and breaks the
    sharing (this model keeps the old ones); ``copy.deepcopy`` the model first if the two
    must be independent.
    """

    def __init__(self, source: torch.nn.Module, call: CallSpec, options: _Options, graph_module, plan: TomePlan,
                 mode: bool | None):
        # which inputs hold the batch, and the shapes the graph was captured for: fixed at
        # capture (a move to another dtype or device keeps them), read on every call
        batched = batch_mask(call.arguments)
        self.__dict__.update(_call=call, _options=options, plan=plan, _batched=batched, _forward_graphs={})
        self.__dict__["_captured_shapes"] = self._shapes(call.arguments)
        super().__init__(source, graph_module, mode)

    def _capture(self, mode: bool) -> torch.fx.GraphModule:
        name = "train" if mode else "eval"
        try:
            graph_module, plan = _build(self._source, self._call, self._options, mode)
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"in {name} mode: {error}") from error
        if (plan.schedule, plan.token_counts, plan.protected) != (self.schedule, self.token_counts, self.plan.protected):
            raise UnsupportedModelError(
                f"in {name} mode the model merges differently: tokens per block {plan.token_counts}, schedule "
                f"{plan.schedule}, {plan.protected} protected, against {self.token_counts}, {self.schedule}, "
                f"{self.plan.protected} in the mode it was transformed in (e.g. tokens dropped only in training)"
            )
        return graph_module

    def _attach(self, mode: bool | None, graph_module: torch.fx.GraphModule) -> None:
        """Attach ``graph_module`` and the graph ``forward`` runs, derived from it: no token
        state returned, no positions followed that nothing reads (``untracked_positions``)."""
        super()._attach(mode, graph_module)
        lean = forward_graph(graph_module)
        self._share_weights(lean)
        self._forward_graphs[mode] = lean

    @property
    def forward_graph_module(self) -> torch.fx.GraphModule:
        """The graph ``forward`` runs: ``graph_module`` without the token state."""
        return self._forward_graphs[self._mode]

    def _recapture(self) -> None:
        self._forward_graphs.clear()
        super()._recapture()

    def _retarget(self, dtype: torch.dtype, device: torch.device) -> None:
        """Example inputs follow the weights, so the next capture traces at their dtype and device."""
        self.__dict__["_call"] = self._call.with_tensors(
            lambda t: t.to(device, dtype if t.is_floating_point() else t.dtype))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Run each attention block under ``torch.utils.checkpoint`` (timm's method name):
        backward keeps only what enters each block and recomputes the rest, merges
        included. On by default where the original had checkpointing on when transformed."""
        if enable != self._options.checkpoint:
            self.__dict__["_options"] = replace(self._options, checkpoint=bool(enable))
            self._recapture()

    @property
    def grad_checkpointing(self) -> bool:
        return self._options.checkpoint

    def __reduce_ex__(self, protocol):
        """Pickled as the original module, the capture's inputs and the options: loading
        transforms again (captured graphs hold generated code that does not pickle)."""
        args, kwargs = self._call.original_call()
        return _restore, (self._source, args, kwargs, self._options, self.state_dict(keep_vars=True), self._mode)

    # -- facts ---------------------------------------------------------------------------------------
    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        """Shapes (batch dim left out) of the tensor inputs that hold the batch, as this model
        was built for them."""
        return [tuple(t.shape[1:]) for t in batched_tensors(self._call.arguments, self._batched)]

    def _shapes(self, inputs) -> list[tuple]:
        """Each tensor input's shape, its batch dim as 'batch'."""
        return [("batch", *t.shape[1:]) if batched else tuple(t.shape)
                for t, batched in zip(tensors_of(inputs), self._batched)]

    @property
    def prop_attn(self) -> bool | str:
        return self._options.prop_attn

    @property
    def trace_source(self) -> bool:
        return self._options.trace_source

    @property
    def unmerge_outputs(self) -> bool:
        return self._options.unmerge_outputs

    @property
    def scope(self) -> tuple[str, ...]:
        return self._options.scope

    @property
    def rope(self) -> str:
        return self._options.rope

    @property
    def method(self) -> str:
        return self._options.method

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

    # -- calls ---------------------------------------------------------------------------------------
    def _graph_inputs(self, args, kwargs) -> tuple[tuple, dict]:
        """The call laid out as the graph takes it, checked against what it was captured for."""
        self._follow_weights()
        args, kwargs = self._call.bind(args, kwargs)
        shapes, captured = self._shapes((args, kwargs)), self._captured_shapes
        if shapes != captured:
            raise ValueError(
                f"inputs of shape {shapes} differ from the ones this model was "
                f"transformed for, {captured}: token counts are fixed "
                "when the graph is built; call tome_fx.transform again with example_inputs of the new size"
            )
        return args, kwargs

    def forward_with_tokens(self, *args, **kwargs) -> tuple[Any, TokenState]:
        """The model's outputs together with the final token sizes (and sources)."""
        args, kwargs = self._graph_inputs(args, kwargs)
        return self._with_tokens(self.graph_module(*args, **kwargs))

    def _with_tokens(self, graph_outputs) -> tuple[Any, TokenState]:
        outputs, size, positions = graph_outputs
        source = merge.source_map(positions, size.shape[1]) if self.trace_source else None
        return outputs, TokenState(size, positions, source)

    def forward(self, *args, **kwargs):
        args, kwargs = self._graph_inputs(args, kwargs)
        return self.forward_graph_module(*args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"ToMeModel(schedule={self.schedule}, tokens={self.token_counts}, protected={self.plan.protected}, "
            f"prop_attn={self.prop_attn}, trace_source={self.trace_source}, unmerge_outputs={self.unmerge_outputs}, "
            f"rope={self.rope!r}" + (f", method={self.method!r}" if self.method != "tome" else "")
            + (f", scope={list(self.scope)}" if self.scope else "")
            + (", grad_checkpointing=True)" if self.grad_checkpointing else ")")
        )


def _restore(source, args, kwargs, options: _Options, state: dict, mode: bool | None) -> ToMeModel:
    fast = _transform(source, args, kwargs, options)
    if mode is not None:
        fast.train(mode)
    fast.load_state_dict(state)
    return fast


def _transform(model: torch.nn.Module, args: tuple, kwargs: dict, options: _Options) -> ToMeModel:
    call = CallSpec.record(model, args, kwargs)
    mode = mode_of(model)
    try:
        graph_module, plan = _build(model, call, options, mode)
    except UnsupportedModelError as error:
        if not _CACHE_OUTPUT.search(str(error.__cause__)) or (no_cache := call.choose("use_cache", False)) is call:
            raise
        warnings.warn(f"{type(model).__name__} returns a key/value cache, which torch.export cannot capture and "
                      "merged tokens could not fill: it is captured with use_cache=False (and returns no cache); "
                      "pass use_cache in example_inputs to choose otherwise", stacklevel=4)
        call = no_cache
        graph_module, plan = _build(model, call, options, mode)
    if not any(plan.schedule) and any(plan.requested):
        warnings.warn(f"{type(model).__name__} merges no token: r={options.r!r} comes to 0 in every block "
                      f"({plan.blocks[0].tokens_in} tokens, {plan.protected} protected; a block merges at most "
                      "half of its unprotected tokens, and a fraction rounds down)", stacklevel=4)
    if plan.unmerged_attention:
        warnings.warn(f"{type(model).__name__}: {len(plan.unmerged_attention)} attention ops run on every token, "
                      f"{plan.unmerged_share:.0%} of the attention's multiply-adds (fast.plan.summary() lists them): "
                      f"{plan.unmerged_attention[0].name}: {plan.unmerged_attention[0].reason}", stacklevel=4)
    return with_signature(ToMeModel, call.signature)(model, call, options, graph_module, plan, mode)


def transform(
    model: torch.nn.Module,
    r: Schedule,
    *,
    example_inputs=None,
    prop_attn: bool | str = True,
    trace_source: bool = False,
    unmerge_outputs: bool = True,
    scope: str | list[str] | None = None,
    rope: str = "mean",
    method: str = "tome",
    speedup: float | None = None,
    flops: float | None = None,
    latency: float | None = None,
    measure: bool = False,
    scheme: str = "auto",
) -> ToMeModel | LocalToMe:
    """Return a new module that runs ``model`` with Token Merging; ``model`` is untouched.

    ``r``: tokens merged per block -- an int, a list (one per block, padded with 0), or
    ``(r, inflection)`` with inflection in [-1, 1]; or ``"auto"`` with one target,
    ``speedup=`` (over the original), ``flops=`` (the share of the original's FLOPs to spend)
    or ``latency=`` (seconds per call on the example inputs): the least constant r the cost
    model predicts to meet it (timed once beside the original), or with ``measure=True`` the
    least measured to meet it on the example inputs and device; never one measured slower
    than the original (``r=0`` then, with a warning); ``auto_choice`` on the result says how
    (``tome_fx.auto``).
    ``example_inputs``: a tensor, a tuple
    of positional args or a dict of keyword args; optional where the model states its
    input size. The batch size stays dynamic; other input dims, and every non-tensor
    argument, are fixed by the example.
    Per-token outputs (``last_hidden_state``...) are un-merged back to the original token
    positions, so outputs keep the original shapes; ``unmerge_outputs=False`` returns the
    merged tokens instead, in the raster order of each one's first patch (their sizes come
    from ``forward_with_tokens``).
    ``scope``: a submodule path (``"vision_model"``), or a list of them: only the attention
    blocks under it merge. Other parts (CLIP's text tower, a VLM's language model) run as
    captured; blocks after the scope in the same stream run on its merged tokens. On a model
    that generates (HF ``GenerationMixin``: a VLM), each scoped part is transformed where the
    model calls it and swapped into a shallow copy of the model (same class, parameters
    shared), so ``generate()`` and the key/value cache work as before.
    ``prop_attn``: proportional attention (log(size) added to the logits of merged keys, which
    ToMe needs to stay exact); ``"bias"`` passes it to ``scaled_dot_product_attention`` as a
    float mask, ``"flash"`` folds it into one extra key column so FlashAttention can still run,
    and True (``"auto"``) picks ``"flash"`` where that kernel would run (CUDA, half precision).
    The form applies to sdpa calls without a mask of their own; one with a mask (padding, a
    relative-position bias), which rules FlashAttention out anyway, and a hand-written softmax
    take the bias.
    ``method``: the merge policy (``merge.POLICIES``): ``"tome"``, ToMe's bipartite matching;
    ``"pitome"``, PiToMe's, which keeps isolated (informative) tokens apart and merges within
    clusters; ``"prune_merge"``, ToMe's matching pruning in the first half of the blocks and
    merging after (ToFu's split). ``docs/policies.md`` compares them.
    ``rope``: the rotary terms of a merged token in RoPE models (EVA-02, DINOv3), which no
    rule makes exact: ``"mean"``, the size-weighted mean of its patches' cos/sin rows (the
    better on the Fashion-MNIST RoPE model), or ``"representative"``, its first patch's.
    Gradient checkpointing turned on in ``model`` (timm ``set_grad_checkpointing``, HF
    ``gradient_checkpointing_enable``) carries over: each block runs under
    ``torch.utils.checkpoint`` (``set_grad_checkpointing`` on the result switches it).
    ``scheme``: ``"stream"``, ToMe's whole-stream merging (every later block runs on the merged
    tokens); ``"block"``, local merging: each block merges ``r`` (a fraction of its tokens) in
    its attention and MLP branches on its own token grid and un-merges before the residual
    add, so the stream keeps every token (windows, 2-d grids, hierarchical stages: Swin),
    returning a ``LocalToMe``; ``"auto"`` (the default): whole-stream where it is proven,
    otherwise per block where ``r`` is a fraction, saying so in a warning.
    Raises ``UnsupportedModelError`` naming the block and reason where a rewrite cannot be
    proven safe.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "tome_fx rewrites a model's Python code through torch.export, and a TorchScript module "
            "(torch.jit.trace / torch.jit.script) has none: pass the nn.Module it was made from"
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_tome_models(model)
    target = _auto_target(r, speedup, flops, latency, measure)
    if target is None:
        resolve_schedule(r, 1 if not isinstance(r, list) else max(len(r), 1))  # type errors before capture
    scope = _scope(model, scope)
    if rope not in RULES:
        raise ValueError(f"rope is one of {list(RULES)}, not {rope!r}")
    if method not in merge.POLICIES:
        raise ValueError(f"method is one of {list(merge.POLICIES)}, not {method!r}")
    form_of(prop_attn)  # (a bad value raises before capture)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme is one of {list(SCHEMES)}, not {scheme!r}")
    args, kwargs = normalize_example_inputs(model, example_inputs)
    options = _Options(r, prop_attn, trace_source, unmerge_outputs, scope, rope, _checkpointing_on(model), method)
    if scheme == "block":
        if why := _not_local(options, target):
            raise ValueError(f"scheme='block': {why}")
        return local_transform(model, args, kwargs, float(r), prop_attn=prop_attn, rope=rope)
    if scheme == "stream":
        return _transform_stream(model, args, kwargs, options, target)
    try:
        return _transform_stream(model, args, kwargs, options, target)
    except UnsupportedModelError as stream_why:
        return _local_fallback(model, args, kwargs, options, target, stream_why)


def _transform_stream(model: torch.nn.Module, args: tuple, kwargs: dict, options: _Options,
                      target: auto.Target | None) -> ToMeModel | torch.nn.Module:
    """Whole-stream merging: of the model, of its scoped parts where it generates, or at the
    r that ``r="auto"`` chooses."""
    if options.scope and submodules.generates(model):
        if target is not None:
            raise ValueError('r="auto" needs one captured graph, and a model that generates is transformed in parts: '
                             "give its scope an r")
        return _transform_parts(model, args, kwargs, options)
    if target is not None:
        return _transform_auto(model, args, kwargs, options, target)
    return _transform(model, args, kwargs, options)


SCHEMES = ("auto", "stream", "block")


def _not_local(options: _Options, target: auto.Target | None) -> str | None:
    """Why ``options`` do not describe local merging, which takes ``r`` as a fraction of each
    block's tokens and no whole-stream option; None where they do."""
    if target is not None or isinstance(options.r, bool) or not (
            options.r == 0 or isinstance(options.r, float) and 0 < options.r < 1):
        return (f"per-block merging takes r as a fraction of each block's tokens (a float in (0, 1), or 0), not "
                f"{options.r!r}")
    set_ = [name for name, on in (("trace_source", options.trace_source), ("unmerge_outputs=False", not options.unmerge_outputs),
                                  ("scope", options.scope), ("method", options.method != "tome"),
                                  ("gradient checkpointing", options.checkpoint)) if on]
    return f"{', '.join(set_)} belong to whole-stream merging" if set_ else None


def _local_fallback(model: torch.nn.Module, args: tuple, kwargs: dict, options: _Options,
                    target: auto.Target | None, stream_why: UnsupportedModelError) -> LocalToMe:
    """``scheme="auto"`` where whole-stream merging is refused: per-block merging, with a warning
    naming why the stream could not merge; or the refusal: as it was where the options are not
    local merging's (an int ``r``), else with why per block failed too."""
    if _not_local(options, target):
        raise stream_why
    try:
        local = local_transform(model, args, kwargs, float(options.r), prop_attn=options.prop_attn, rope=options.rope)
    except UnsupportedModelError as local_why:
        raise UnsupportedModelError(f"whole-stream: {stream_why}; per block: {local_why}") from stream_why
    warnings.warn(f"{type(model).__name__} merges per block (scheme='block'), not whole-stream: {stream_why}",
                  stacklevel=3)
    return local


def _auto_target(r, speedup, flops, latency, measure) -> auto.Target | None:
    """The target of ``r="auto"``; None for a schedule, which takes no target."""
    if isinstance(r, str):
        if r != "auto":
            raise TypeError(f'r must be an int, a fraction in (0, 1), a list of ints, an (r, inflection) tuple or '
                            f'"auto", got str {r!r}')
        return auto.Target(speedup, flops, latency, measure)
    if (speedup, flops, latency) != (None, None, None) or measure:
        raise TypeError('speedup=, flops=, latency= and measure= choose r: they go with r="auto"')
    return None


def _transform_auto(model: torch.nn.Module, args: tuple, kwargs: dict, options: _Options,
                    target: auto.Target) -> ToMeModel:
    """``r="auto"``: captured at r=0 for the plan; each r that ``auto.choose`` times is
    transformed in turn, and the one chosen is returned."""
    probe = _transform(model, args, kwargs, replace(options, r=0))
    built = {0: probe}

    def build(r: int):
        built[r] = _transform(model, args, kwargs, replace(options, r=r))
        return lambda: built[r](*args, **kwargs)

    choice = auto.choose(probe.plan, build, lambda: model(*args, **kwargs), target)
    fast = built.get(choice.r) or _transform(model, args, kwargs, replace(options, r=choice.r))
    if choice.r == 0 or not choice.met:
        what = "merges no token" if choice.r == 0 else f"does not meet the target, r={choice.r}"
        warnings.warn(f'{type(model).__name__}: r="auto" {what}: {choice.why}', stacklevel=4)
    fast.__dict__["auto_choice"] = choice
    return fast


def _transform_parts(model: torch.nn.Module, args: tuple, kwargs: dict, options: _Options) -> torch.nn.Module:
    """A model that generates: each scoped part captured where the model calls it and swapped
    into a shallow copy of the model (``submodules``), which generates as before."""
    if not options.unmerge_outputs:
        raise ValueError(
            f"unmerge_outputs=False on a part of {type(model).__name__}, which generates: the rest of the model would "
            "get fewer tokens than its inputs have places for; tome_fx.vlm.apply feeds a VLM's language model fewer "
            "visual tokens and adjusts the prompt to them")
    for path in options.scope:
        takes = inspect.signature(model.get_submodule(path).forward).parameters
        if cache := next((name for name in ("cache", "past_key_values") if name in takes), None):
            raise UnsupportedModelError(
                f"scope {path!r} takes a key/value cache (`{cache}`): it runs at every step of {type(model).__name__}'s "
                "decoding, on one new token at a time, and only a part called once per prompt (a vision tower) can be "
                "captured for merging")
    calls = submodules.recorded_calls(model, options.scope, args, kwargs)
    part = replace(options, scope=())
    return submodules.swapped(model, {path: (lambda sub, path=path: _transform(sub, *calls[path], part))
                                      for path in options.scope})


def _refuse_tome_models(model: torch.nn.Module) -> None:
    """A module tome_fx returned (or one holding it) is not transformed again: its graph
    already merges, and merging twice is not what anyone means. Its ``original`` is."""
    for path, module in model.named_modules():
        if type(module).__module__.startswith("tome_fx.") and hasattr(type(module), "original"):
            where = "the model is" if not path else f"submodule `{path}` is"
            name = "model" if not path else f"model.{path}"
            raise UnsupportedModelError(
                f"{where} already a tome_fx model ({type(module).__name__}); transform the original it was made "
                f"from, `{name}.original`, with the new settings"
            )


def _scope(model: torch.nn.Module, scope: str | list[str] | None) -> tuple[str, ...]:
    """``scope`` as a tuple of module paths, each checked to name a submodule of ``model``."""
    if not (scope is None or isinstance(scope, str) or isinstance(scope, (list, tuple)) and scope):
        raise TypeError(f"scope is a module path (str) or a non-empty list of them, got {scope!r}")
    paths = () if scope is None else (scope,) if isinstance(scope, str) else tuple(scope)
    for path in paths:
        if not isinstance(path, str):
            raise TypeError(f"scope holds module paths (str), got {type(path).__name__}")
        if not path:
            raise ValueError("scope '' would be the whole model: leave scope out (None) for that")
        try:
            model.get_submodule(path)
        except AttributeError:
            children = [name for name, _ in model.named_children()]
            raise ValueError(f"scope {path!r} names no submodule of the model; its children are {children}") from None
    return paths


def compile(model: torch.nn.Module, r: Schedule, *, example_inputs=None, **compile_kwargs) -> torch.nn.Module:
    """``transform`` then ``torch.compile``, with the batch dimension marked dynamic so that a
    new batch size does not recompile (batch 1 excepted: dynamo specializes sizes 0 and 1, so
    it compiles once more the first time it sees a single-sample batch). ``compile_kwargs``
    go to ``torch.compile``, except the ``transform`` options ``prop_attn``, ``trace_source``,
    ``unmerge_outputs``, ``scope``, ``rope``, ``method``, ``scheme`` and ``r="auto"``'s
    ``speedup``, ``flops``, ``latency`` and ``measure``. A model merged per block (a
    ``LocalToMe``) compiles each graph it captures, at a fixed batch (``LocalToMe.compile``)."""
    options = {k: compile_kwargs.pop(k) for k in ("prop_attn", "trace_source", "unmerge_outputs", "scope", "rope",
                                                  "method", "speedup", "flops", "latency", "measure", "scheme")
               if k in compile_kwargs}
    fast = transform(model, r, example_inputs=example_inputs, **options)
    if isinstance(fast, LocalToMe):
        fast.compile(**compile_kwargs)
        return fast
    return with_signature(CompiledToMe, fast._call.signature)(fast, **compile_kwargs)


class CompiledToMe(torch.nn.Module):
    """A ``ToMeModel`` whose graph runs under ``torch.compile``, inputs' batch dimension
    marked dynamic first. The graph module is compiled, not the ``ToMeModel``: every
    ``ToMeModel`` shares one ``forward`` code object, so compiling several in one process
    (an r sweep) would recompile that one frame until dynamo's recompile limit sends the
    rest back to eager; each graph module has code of its own. ``train()``/``eval()``
    compile the graph of that mode the first time it runs. Its ``state_dict`` has the
    original's keys, like the ``ToMeModel``'s."""

    __signature__ = InstanceSignature()

    def __init__(self, model: ToMeModel, **compile_kwargs):
        super().__init__()
        self.__dict__.update(model=model, _compile_kwargs=compile_kwargs, _compiled={})
        for attr in (*TREE, "_modules"):  # the model's weights and keys (state_dict as the original's)
            object.__setattr__(self, attr, getattr(model, attr))
        self.training = model.training

    @property
    def original(self) -> torch.nn.Module:
        """The model this one was transformed from (it shares its parameters)."""
        return self.model.original

    def train(self, mode: bool = True):
        self.model.train(mode)
        self.training = mode
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return self.model.grad_checkpointing

    def _apply(self, fn, recurse=True):
        """``.to()`` goes through the model's own: it keeps buffers shared and captures again."""
        self.model._apply(fn, recurse)
        return self

    def _run(self, graph_module: torch.fx.GraphModule, args, kwargs):
        """``graph_module`` compiled (the first time it runs: one per mode and graph, and again
        after ``.to(dtype)``) and called, with the inputs' batch dimension marked dynamic."""
        if graph_module not in self._compiled:
            self._compiled[graph_module] = torch.compile(graph_module, **self._compile_kwargs)
        for tensor in batched_tensors((args, kwargs), self.model._batched):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self._compiled[graph_module](*args, **kwargs)

    def forward_with_tokens(self, *args, **kwargs) -> tuple[Any, TokenState]:
        args, kwargs = self.model._graph_inputs(args, kwargs)
        return self.model._with_tokens(self._run(self.model.graph_module, args, kwargs))

    def forward(self, *args, **kwargs):
        args, kwargs = self.model._graph_inputs(args, kwargs)
        return self._run(self.model.forward_graph_module, args, kwargs)

    def __deepcopy__(self, memo):
        return type(self)(copy.deepcopy(self.model, memo), **self._compile_kwargs)

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a compiled ToMe model cannot be pickled (it holds compiled code): save the ToMeModel "
            "(`compiled.model`) or the original's state_dict, and compile again after loading"
        )
