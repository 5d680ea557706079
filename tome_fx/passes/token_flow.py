"""Token-flow analysis: which axis of every tensor holds the (merged) tokens.

Starting from the residual stream of the first block and from every merge output,
roles (batch / token) are carried forward op by op. Each op either has a rule that
proves the rewrite safe -- and records what must change (a shape argument, a
softmax over keys, a sum over tokens to weight by size) -- or the analysis refuses
with the block and the reason. Nothing is matched by integer value: the token count
may well equal another dimension.

Rules live in a table keyed by op (``_rule``), one small method per op family; each
says in its first docstring line why it stays exact after merging. The yardstick is
exact duplicates: a merged token stands for ``size`` identical tokens, so an op is
exact when, over the merged tokens, it computes what it computed over the originals.

Two kinds of token axis are told apart. A plain ``TOKEN`` axis holds one value per
token; summing over it must count each merged token ``size`` times. A ``WEIGHTS``
axis holds weights over the tokens -- a softmax over them, which proportional
attention gives log(size) -- so a merged entry already carries its whole group's
weight: sums over it are exact as they are, and un-merging splits it by size.

A token grid [batch, h, w, channels] (SAM's residual stream) merges as one sequence: the
merged tokens lie along its ``TOKEN`` axis and its ``GRID_INNER`` axis holds one entry
at run time (w as captured). Only ops that act per token, or fold the pair back into one
token axis, may see such a tensor.
"""

from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass, field, replace

import torch
from torch.fx import Graph, Node
from torch.fx.passes.infra.pass_base import PassBase

from .. import merge
from ..errors import UnsupportedModelError
from .find_blocks import query_key_paths
from .graph_utils import (VIEWS, aten, ancestors, at_node, depends_on_inputs, describe, einsum_letters, evaluate_constant,
                          is_assertion, is_parameter, reads_values, shape_of, tensor_meta)

BATCH, TOKEN = "batch", "token"


class _Weights(str):
    """The role of a token axis holding weights over the tokens; equal to ``TOKEN`` for every
    rule that only asks where the tokens are."""


WEIGHTS = _Weights(TOKEN)
GRID_INNER = "grid_inner"


def is_weights(role) -> bool:
    return isinstance(role, _Weights)


@dataclass(frozen=True)
class Fold:
    """Several factors folded into one dim, outer to inner, each (role or None, captured size):
    nn.MultiheadAttention's [N, B*H, d] heads-in-batch and [N*B, C] token-major views."""

    factors: tuple[tuple[str | None, int], ...]


Role = str | Fold | None


def holds(role: Role, atom: str) -> bool:
    """The dim is the ``atom`` axis, or has it folded in."""
    return role == atom or (isinstance(role, Fold) and any(r == atom for r, _ in role.factors))


@dataclass(frozen=True)
class Layout:
    """Roles of a tensor's dims, and the token sizes that go with its token dims."""

    roles: tuple[Role, ...]
    size: Node | None  # [B, N] sizes; None while every token is still one patch
    start: int = 0  # the tensor holds the tokens from this position of the sequence on
    positions: Node | None = None  # [B, N0] where each original token sits; None before any merge
    # a joint sequence: tokens of another stream (text in joint attention, each of size 1) joined
    # before and after the merged tokens along the token axis
    lead: int = 0
    trail: int = 0

    def dims(self, role: str) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == role]

    def batch_dim(self) -> int | None:
        found = self.dims(BATCH)
        return found[0] if len(found) == 1 else None

    def batch_axis(self) -> tuple[int, int] | None:
        """(dim, inner): the batch's dim, and how many entries per sample that dim holds where
        the batch is folded outermost with unnamed axes (nn.MultiheadAttention's B*H)."""
        if self.batch_dim() is not None:
            return self.batch_dim(), 1
        folds = [(d, r.factors) for d, r in enumerate(self.roles) if isinstance(r, Fold) and holds(r, BATCH)]
        if len(folds) != 1 or folds[0][1][0][0] != BATCH or any(role for role, _ in folds[0][1][1:]):
            return None
        dim, factors = folds[0]
        return dim, math.prod(size for _, size in factors[1:])

    @property
    def merged(self) -> bool:
        return self.size is not None

    @property
    def tokens(self) -> tuple:
        """What makes two token axes the same sequence: sizes, positions, slice and joined tokens."""
        return self.size, self.start, self.positions, self.lead, self.trail

    @property
    def weights(self) -> bool:
        return any(is_weights(role) for role in self.roles)


@dataclass(frozen=True)
class ShapeArg:
    """Entry ``position`` of the shape list ``node.args[1]`` must follow dim ``in_dim`` of
    ``node.args[0]``; ``in_dim`` None: the tokens are folded on one side, the entry becomes -1."""

    node: Node
    position: int
    in_dim: int | None


@dataclass(frozen=True)
class Weighting:
    """A reduction over tokens that must count each merged token ``size`` times: operand
    ``operand`` of ``node`` (of its tensor list, for an einsum) is scaled by size along its dim ``token_dim`` (a sum, a matmul
    contracting tokens; by size ** (1 / p) in a p-norm), or, with ``mean``, the mean becomes the
    size-weighted mean."""

    node: Node
    operand: int
    token_dim: int
    mean: bool = False
    power: float = 1.0  # the operand is scaled by size ** power: 1 / p for a p-norm (Σ s |x|^p under the root)


@dataclass
class TokenFlow:
    layouts: dict[Node, Layout] = field(default_factory=dict)
    shape_args: list[ShapeArg] = field(default_factory=list)
    open_slices: list[Node] = field(default_factory=list)  # slices whose end must become "to the end"
    softmaxes: list[tuple[Node, int]] = field(default_factory=list)  # softmax over tokens, and its dim
    sdpas: list[Node] = field(default_factory=list)  # sdpa whose keys are tokens
    weightings: list[Weighting] = field(default_factory=list)  # sums, means and contractions over tokens
    outputs: list[Node] = field(default_factory=list)  # per-token tensors the model returns
    unmerges: list[Node] = field(default_factory=list)  # reshapes back to a grid: un-merge their input first
    masked: list[tuple[Node, Layout]] = field(default_factory=list)  # mask users, with their keys' layout
    # (node, table, its output's layout): a per-token table (rotary terms) meeting merged queries or keys
    tables: list[tuple[Node, Node, Layout]] = field(default_factory=list)
    open_splits: list[tuple[Node, int]] = field(default_factory=list)  # split_with_sizes along tokens, and its dim
    # (node applying it, mask, keys' layout): a pooling head's own mask over the keys
    key_masks: list[tuple[Node, Node, Layout]] = field(default_factory=list)
    # (``merge.rel_pos_bias`` node, its queries' layout): relative positions read per merged pair
    relative_positions: list[tuple[Node, Layout]] = field(default_factory=list)
    # (node, table, the pairs' layout): a bias per (query, key) pair no input feeds, read per merged pair
    pair_tables: list[tuple[Node, Node, Layout]] = field(default_factory=list)
    reads: int = 0  # leading tokens read at fixed positions (e.g. a class-token readout)

    # (slice, argument index, dim, from the end, entries): a bound of a cut of a joint sequence,
    # set to that many entries from the start, or from the end at run time
    joint_bounds: list[tuple[Node, int, int, bool, int]] = field(default_factory=list)
    joint_splits: list[tuple[Node, int, int]] = field(default_factory=list)  # (split, dim, the merged part)

    @property
    def attended(self) -> set[Node]:
        """The attention ops proven to run over tokens: softmaxes and sdpas over them, and the
        size-weighted sums over them (linear attention's sum over its keys)."""
        return {node for node, _ in self.softmaxes} | set(self.sdpas) | {w.node for w in self.weightings}


class FlowPass(PassBase):
    """A pass that applies what the token-flow analysis recorded in ``flow``."""

    def __init__(self, flow: TokenFlow):
        super().__init__()
        self.flow = flow


class _Refuse(Exception):
    pass


_POINTWISE_EXTRA = {
    aten.dropout.default,
    aten.dropout_.default,  # nn.Dropout(inplace=True): the identity in eval, as dropout is
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.where.ScalarOther,
    aten.where.ScalarSelf,
}
# pointwise ops ATen does not tag so (LeViT's activation); not linear: weights through them are no weights
_POINTWISE_UNTAGGED = {aten.hardswish.default, aten.hardswish_.default, aten.gelu_.default}
# pointwise ops linear in their first operand: weights over tokens stay weights through them
_SCALING = _POINTWISE_EXTRA | {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default}
# reshapes whose arguments never spell out the token count
_FLATTENS = {aten.flatten.using_ints, aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim}

_RULES: dict = {}


def _rule(*targets):
    """Register an ``_Analysis`` method as the rule for ``targets`` (inductor's lowering-table style)."""

    def register(method):
        for target in targets:
            _RULES[target] = method
        return method

    return register


def _is_pointwise(target) -> bool:
    return target in _POINTWISE_EXTRA or target in _POINTWISE_UNTAGGED or (
        isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
    )


_MAX_LIKE = {aten.amax.default, aten.amin.default, aten.max.dim, aten.min.dim}
_SUMS = {aten.sum.dim_IntList, aten.mean.dim}
_NORMS = {aten.linalg_vector_norm.default}
_LINEAR_IN_WEIGHTS = _MAX_LIKE | _SUMS  # scaling a token's weights by its size commutes with these
# ops with one tensor and a `dim` whose result at one index of the other axes still reads
# every index of them (a slice's norm, unique slices): not "along an axis"
_ACROSS_OTHER_AXES = {aten.renorm.default, aten.unique_dim.default, aten.unique_consecutive.default,
                      aten.norm_except_dim.default}


def _axis_argument(target) -> str | None:
    """The name of the axis argument (``dim``/``dims``) of an op that reduces, scans or sorts
    along it and keeps every other axis as it is: one tensor operand, output shapes not data
    dependent. None for any other op."""
    if not isinstance(target, torch._ops.OpOverload) or target in _ACROSS_OTHER_AXES:
        return None
    if torch.Tag.dynamic_output_shape in target.tags:
        return None
    arguments = target._schema.arguments
    names = [a.name for a in arguments if a.name in ("dim", "dims")]
    tensors = [a for a in arguments if "Tensor" in str(a.type)]
    return names[0] if len(names) == 1 and len(tensors) == 1 and arguments[0] is tensors[0] else None


def _argument(node: Node, name: str):
    """The value of ``node``'s argument ``name``, by its op's schema (its default if not given)."""
    for i, argument in enumerate(node.target._schema.arguments):
        if argument.name == name:
            if not argument.kwarg_only and i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, argument.default_value)
    raise KeyError(name)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _ndim(node) -> int:
    return tensor_meta(node).dim()


def _view_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes of equal numel into groups of dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(src):
                pi, i = pi * src[i], i + 1
                gi.append(i - 1)
            elif j < len(dst):
                pj, j = pj * dst[j], j + 1
                gj.append(j - 1)
            else:
                raise _Refuse(f"cannot relate shapes {src} and {dst}")
        groups.append((gi, gj))
    groups += [([k], []) for k in range(i, len(src))] + [([], [k]) for k in range(j, len(dst))]
    return groups


def _factors(role: Role, size: int) -> list[tuple[str | None, int]]:
    if isinstance(role, Fold):
        return list(role.factors)
    return [] if size == 1 and role is None else [(role, size)]


def _refold(factors: list[tuple[str | None, int]], sizes: list[int]) -> list[Role]:
    """Roles of the dims ``sizes`` that the factors (outer to inner) are viewed as. Unnamed
    factors may split (32 heads*dims -> 4 * 8); the batch or token factor must stay whole."""
    queue, roles = list(factors), []
    for size in sizes:
        part, product = [], 1
        if size == 1 and queue and queue[0][1] == 1:  # a batch of one stays the batch
            part.append(queue.pop(0))
        while product != size:
            if not queue or size % product:
                raise _Refuse("the view does not keep the batch or token axis whole")
            role, factor = queue.pop(0)
            need = size // product
            if need % factor == 0:
                part.append((role, factor))
                product *= factor
            elif role is None and factor % need == 0:
                part.append((None, need))
                queue.insert(0, (None, factor // need))
                product = size
            else:
                raise _Refuse("the view does not keep the batch or token axis whole")
        named = [role for role, _ in part if role is not None]
        roles.append(None if not named else part[0][0] if len(part) == 1 else Fold(tuple(part)))
    if queue:
        raise _Refuse("the view does not keep the batch or token axis whole")
    return roles


def _grid_as_tokens(role: Role) -> Role:
    """A merged grid's (token, inner) pair folded into one axis is that axis of merged tokens;
    the inner axis folded any other way is refused."""
    if isinstance(role, Fold) and any(r == GRID_INNER for r, _ in role.factors):
        if [r for r, _ in role.factors] != [TOKEN, GRID_INNER]:
            raise _Refuse("it folds one axis of a merged token grid with another axis")
        return TOKEN
    return role


class _Analysis:
    def __init__(self, seeds: dict[Node, Layout], protected: int, masks: dict[Node, Node],
                 rotary: tuple[set[Node], dict[Node, Node]], respected: frozenset[Node] | None):
        self.flow = TokenFlow(layouts=dict(seeds))
        self.rotary_paths, self.attention_inputs = rotary  # see find_blocks.query_key_paths
        self.respected = respected  # masks over keys the merges respect; None in the dry run (any, recorded)
        self.seeds = seeds
        self.protected = protected
        self.masks = masks  # node applying an attention mask -> the mask (merged by RestageMasks)
        self.lists: dict[Node, list[Layout | None]] = {}

    def run(self, graph: Graph) -> TokenFlow:
        for node in graph.nodes:
            if node in self.seeds or node.op not in ("call_function", "output"):
                continue
            tracked = [n for n in node.all_input_nodes if n in self.flow.layouts or n in self.lists]
            if not tracked:
                continue
            if node.op == "output":
                self.outputs(tracked)
                continue
            if (node.target not in _RULES and getattr(node.target, "__module__", "").startswith("tome_fx")
                    or is_assertion(node)):
                continue  # nodes tome_fx inserted itself (but those it rewrote a model's ops into); dtype/device checks
            try:
                with at_node(node, "analysing", expected=(_Refuse,)):
                    result = self.visit(node)
            except _Refuse as why:
                raise RefusedAt(f"{describe(node)}: cannot prove `{node.target}` safe after merging tokens: {why}",
                                node) from None
            for layout in result if isinstance(result, list) else [result]:
                if layout is not None and sum(holds(role, BATCH) for role in layout.roles) > 1:
                    raise RefusedAt(
                        f"{describe(node)}: cannot prove `{node.target}` safe after merging tokens: it puts the batch "
                        "on two axes, pairing the tokens of one sample with another's, which merged other tokens", node)
            if isinstance(result, list):
                self.lists[node] = result
            elif result is not None and any(holds(role, TOKEN) for role in result.roles):
                self.flow.layouts[node] = result
        return self.flow

    # -- helpers ---------------------------------------------------------------------------
    def layout(self, node) -> Layout | None:
        return self.flow.layouts.get(node) if isinstance(node, Node) else None

    def read_prefix(self, tokens: int) -> None:
        """The graph reads the first ``tokens`` tokens at fixed positions."""
        self.flow.reads = max(self.flow.reads, tokens)
        if tokens > self.protected:
            raise _Refuse(
                f"it reads token {tokens - 1}, but only the {self.protected} protected "
                "tokens keep their positions when tokens merge"
            )

    def no_joined(self, layout: Layout, what: str) -> None:
        """Refuse ``what`` on a joint sequence: it would need each joined token's size (1)."""
        if layout.lead or layout.trail:
            raise _Refuse(f"{what} a joint sequence (merged tokens beside {layout.lead + layout.trail} tokens of "
                          "another stream, as in joint attention), which has no rule here")

    def no_weights(self, node: Node, what: str) -> None:
        if any(self.layout(n) and self.layout(n).weights for n in node.all_input_nodes):
            raise _Refuse(
                f"it {what} weights over tokens (a softmax over them), which stay exact after "
                "merging only through sums and scaling"
            )

    def key_mask(self, node: Node, mask: Node, keys: Layout, tokens: int) -> None:
        """Exact for a mask over the keys of an attention outside the blocks (a pooling head's):
        the merges are given it too (hoisted before them, ``driver``) and only join tokens
        it treats alike, so reading it at one original token per merged token is exact."""
        if len(shape_of(mask)) > 1 and shape_of(mask)[-2] > 1 and shape_of(mask)[-2] == shape_of(node)[-2]:
            raise _Refuse(f"an attention bias of shape {shape_of(mask)}, an entry per query and key, not computed from "
                          "the tokens (a relative-position bias, as MaxViT's and Swin's), over queries and keys the "
                          "per-pair rule does not read (it takes one merged sequence as both, the batch on an axis of "
                          "its own)")
        if keys.start != 0 or keys.batch_axis() is None or shape_of(mask)[-1] != tokens:
            raise _Refuse(f"a mask over keys of shape {shape_of(mask)} that is not [.., all {tokens} tokens]")
        if self.respected is not None and mask not in self.respected:
            raise _Refuse("a mask over the keys that the merges did not take into account")
        self.flow.key_masks.append((node, mask, keys))

    def outputs(self, tracked: list[Node]) -> None:
        """Returned tensors are un-merged along every token axis: exact, since each original
        token takes its group's value (and a weight its share of the group's weight)."""
        for node in tracked:
            layout = self.layout(node)
            if (layout is None or layout.batch_dim() is None or any(isinstance(r, Fold) for r in layout.roles)
                    or layout.lead or layout.trail):
                raise UnsupportedModelError(
                    f"{describe(node)}: the model returns `{node.name}`, which is not laid out with a batch "
                    "axis and whole token axes, so it cannot be un-merged"
                )
            self.flow.outputs.append(node)

    # -- rules -------------------------------------------------------------------------------
    def visit(self, node: Node):
        target = node.target
        if target is operator.getitem and node.args[0] in self.lists:
            return self.lists[node.args[0]][node.args[1]]
        rule = (_RULES.get(target) or (_Analysis.pointwise if _is_pointwise(target) else None)
                or (_Analysis.along_axes if _axis_argument(target) else None))
        if rule is None:
            raise _Refuse("no rule describes how this op treats the token axis")
        if rule not in _GRID_RULES and any(
            GRID_INNER in self.layout(n).roles for n in node.all_input_nodes if self.layout(n)
        ):
            raise _Refuse("it reads a merged token grid as a grid (its merged tokens lie along one axis)")
        if rule not in _JOINT_RULES:
            for n in node.all_input_nodes:
                if self.layout(n):
                    self.no_joined(self.layout(n), "it reads")
        return rule(self, node)

    @_rule(aten.sym_size.int)
    def sym_size(self, node: Node) -> None:
        """Exact: reads the live size, which follows the merged tensor."""
        return None

    def pointwise(self, node: Node) -> Layout:
        """Exact: acts on each token on its own. Operands broadcast against each other; a
        tensor of a fixed token count, or tokens of another merge, may not join in."""
        tracked = [n for n in node.all_input_nodes if self.layout(n)]
        if len({lay.tokens for lay in map(self.layout, tracked)}) != 1:
            raise _Refuse("it combines tokens from before and after a merge (or a joint sequence with its parts)")
        out_ndim = _ndim(node)
        aligned: list[list[tuple[Role, int]]] = [[] for _ in range(out_ndim)]
        for arg in tracked:
            offset = out_ndim - len(self.layout(arg).roles)
            for d, entry in enumerate(zip(self.layout(arg).roles, shape_of(arg))):
                aligned[offset + d].append(entry)
        roles: list[Role] = []
        for entries in aligned:
            named = [role for role, _ in entries if role is not None]
            if any(role != named[0] for role in named) or (
                named and any(role is None and size != 1 for role, size in entries)
            ):
                raise _Refuse("it lines up the token or batch axis of one operand with another axis of the other")
            roles.append(WEIGHTS if any(map(is_weights, named)) else named[0] if named else None)
        if any(map(is_weights, roles)):
            self._scales_weights(node)
        untracked = [n for n in node.all_input_nodes if n not in tracked]
        shared = [n for n in untracked if n in self.masks.values()]  # also where blocks outside a scope apply it
        if shared:
            self.no_joined(self.layout(tracked[0]), "an attention mask applied to")
            untracked.remove(shared[0])
            self.flow.masked.append((node, self.layout(tracked[0])))
        layout = replace(self.layout(tracked[0]), roles=tuple(roles))
        for arg in untracked:
            meta = tensor_meta(arg)
            if meta is None:
                if isinstance(arg.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat)):
                    continue  # a scalar
                raise _Refuse(f"`{arg.name}` has no recorded shape")
            offset = out_ndim - meta.dim()
            if not layout.merged:
                continue  # no token merged yet (blocks before the first merge): any token count holds
            for d in range(meta.dim()):
                if (holds(roles[offset + d], TOKEN) or roles[offset + d] == GRID_INNER) and meta.shape[d] != 1:
                    if self.rotary_table(node, arg, layout) or self.pair_table(node, arg, layout):
                        break
                    if (node.target == aten.mul.Tensor and self.feeds_queries_keys(node) and layout.batch_dim() is not None
                            and meta.shape[layout.batch_dim() - offset] != 1):
                        raise _Refuse(f"it rotates queries or keys by `{arg.name}`, a rotary table of {tuple(meta.shape)} "
                                      "with rows per sample (batched position ids), which the rope rule does not read "
                                      "per merged token")
                    regridded = [u for u in self.flow.unmerges if u in ancestors(arg)]
                    if regridded:
                        raise _Refuse(
                            f"it combines the merged tokens with `{arg.name}`, computed from them un-merged back to "
                            f"their grid ({describe(regridded[0])}): a convolution over the token grid inside a "
                            "block (Sana's Mix-FFN) needs every token; merge per block instead (tome_fx.sd.apply)")
                    raise _Refuse(
                        f"it combines the tokens with `{arg.name}`, a tensor of a fixed token count "
                        f"{tuple(meta.shape)} (e.g. a positional table applied inside the blocks)"
                    )
        return layout

    def rotary_table(self, node: Node, table: Node, layout: Layout) -> bool:
        """Approximate, by the ``rope`` rule: a table of one row per token, shared by the batch
        and multiplied into queries or keys only (rotary position embeddings), is read per
        merged token (``RestageTables``); the rows of tokens joined from another stream (text in
        joint attention) stay as they are. It may be a buffer (timm) or computed from position
        inputs (FLUX's ids, Wan's latent grid): it holds no token of the stream, which the
        analysis would have tracked. A merged token stands for several positions; no rule
        gives it exactly the rotation of each."""
        if node.target != aten.mul.Tensor or not self.feeds_queries_keys(node):
            return False
        offset = len(layout.roles) - _ndim(table)
        dims = [d for d in range(_ndim(table)) if shape_of(table)[d] != 1]
        batch = layout.batch_axis()  # (heads may be folded inside it: timm's samvit)
        if (batch is None or len(layout.dims(TOKEN)) != 1 or batch[0] - offset in dims
                or any(layout.roles[offset + d] == GRID_INNER for d in dims)
                or [offset + d for d in dims if holds(layout.roles[offset + d], TOKEN)] != layout.dims(TOKEN)):
            return False
        self.flow.tables.append((node, table, layout))
        return True

    def pair_table(self, node: Node, table: Node, pairs: Layout) -> bool:
        """Approximate, by the ``rel_pos`` rule: a bias with an entry per (query, key) pair of one
        merged sequence, added to its attention logits (or given to sdpa as its mask) and fed by
        no input -- a learned relative-position table gathered to [.., N, N] (Swin, BEiT,
        MaxViT) -- is read per pair of merged tokens (``RestagePairTables``). A merged token
        stands for several positions; no entry is exact for it. The pair's tokens must be the
        last two axes, the batch on its own axis, where the table has size 1 or one entry per
        sample (HF BEiT expands its table to the batch)."""
        if node.target not in (aten.add.Tensor, aten.scaled_dot_product_attention.default) or depends_on_inputs(table):
            return False
        offset, shape = len(pairs.roles) - _ndim(table), shape_of(table)
        batch = pairs.batch_axis()
        if pairs.roles[-2:] != (TOKEN, TOKEN) or len(shape) < 2 or shape[-1] != shape[-2]:
            return False
        if batch is None and any(n != 1 for n in shape[:-2]):
            raise _Refuse(f"it adds `{table.name}`, a bias per (query, key) pair of shape {shape} on a view that splits "
                          "the batch axis (a mask per window, as Swin's shifted windows have): no rule reads it per "
                          "merged pair")
        if (batch is None or batch[1] != 1 or pairs.start or any(is_weights(r) for r in pairs.roles)
                or (batch[0] >= offset and shape[batch[0] - offset] not in (1, shape_of(node)[batch[0]]))
                or any(holds(r, TOKEN) or r == GRID_INNER for r in pairs.roles[:-2])):
            return False
        if not _learned(table):
            raise _Refuse(f"it adds `{table.name}`, a bias per (query, key) pair not computed from parameters alone (a "
                          "causal, padding or shifted-window mask is in it), which merged tokens must not average")
        self.flow.pair_tables.append((node, table, pairs))
        return True

    def feeds_queries_keys(self, node: Node) -> bool:
        """Everything computed from ``node`` goes into attentions as queries or keys, and nowhere
        else (not into values, the residual stream or the outputs): every node on the way is
        upstream of an attention's queries or keys and not of its values, and each operand it
        reaches is used by that attention alone."""
        stack, seen = [node], {node}
        while stack:
            current = stack.pop()
            if current not in self.rotary_paths:
                return False
            users = [u for u in current.users if not is_assertion(u) and reads_values(u, current)]
            if current in self.attention_inputs:  # it enters an attention as queries or keys
                consumer = self.attention_inputs[current]
                if all(u is consumer or getattr(u.target, "__module__", "").startswith("tome_fx") for u in users):
                    continue
                return False
            for user in users:
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
        return True

    def _scales_weights(self, node: Node) -> None:
        """Weights over tokens stay exact through scaling (by anything not itself weights) and
        through sums of weights; anything else would need the original tokens' weights."""
        operands = [a for a in node.args if isinstance(a, Node)]
        carrying = [a for a in operands if self.layout(a) and self.layout(a).weights]
        if node.target in _SCALING and carrying == operands[:1]:
            return
        if node.target == aten.mul.Tensor and len(carrying) == 1:
            return
        if node.target in (aten.add.Tensor, aten.sub.Tensor) and carrying == operands and len(operands) == 2:
            return
        raise _Refuse(
            f"it applies `{node.target}` to weights over tokens (a softmax over them); only scaling "
            "them or adding two of them keeps them exact after merging"
        )

    @_rule(aten.type_as.default)
    def type_as(self, node: Node) -> Layout | None:
        """Exact: a dtype cast of the first operand; the second gives only its dtype (mixed-precision
        code casts a merged sum back to the type of the stream from before the merge)."""
        return self.layout(node.args[0])

    @_rule(aten.expand_as.default)
    def expand_as(self, node: Node) -> Layout:
        """Exact: broadcasts one operand to the other's shape, as a pointwise op's operands are."""
        return self.pointwise(node)

    @_rule(aten.one_hot.default)
    def one_hot(self, node: Node) -> Layout:
        """Exact: each entry becomes a vector of its own on a new last axis (per-token routing)."""
        self.no_weights(node, "encodes")
        src = self.layout(node.args[0])
        return replace(src, roles=src.roles + (None,))

    @_rule(aten.layer_norm.default, aten.rms_norm.default)
    def norm(self, node: Node) -> Layout:
        """Exact: normalizes each token's own channels."""
        layout = self.layout(node.args[0])
        self.no_weights(node, "normalizes")
        normalized = len(node.args[1])
        if any(layout.roles[-normalized:]):
            raise _Refuse("it normalizes over the token or batch axis")
        return layout

    @_rule(aten.batch_norm.default)
    def batch_norm(self, node: Node) -> Layout:
        """Exact in eval mode: running statistics make it an affine map of each token's own
        channels on dim 1 (LeViT's and NextViT's BatchNorm over [B * N, C] or [B, C, ...]). In
        training it averages over the batch and the tokens, which merging reweights."""
        layout = self.layout(node.args[0])
        self.no_weights(node, "normalizes")
        if node.args[5] is not False or node.args[3] is None:
            raise _Refuse("batch norm with batch statistics (training mode) averages over the tokens")
        if layout.roles[1] is not None:
            raise _Refuse("batch norm whose channel axis (dim 1) holds the tokens")
        return layout

    @_rule(aten.linear.default)
    def linear(self, node: Node) -> Layout:
        """Exact: maps each token's own channels."""
        layout = self.layout(node.args[0])
        if layout is None or layout.roles[-1] is not None or any(self.layout(a) for a in node.args[1:]):
            raise _Refuse("its weights act on the token axis")
        self.no_weights(node, "applies a linear layer (with its bias) to")
        return layout

    @_rule(aten.matmul.default, aten.bmm.default)
    def matmul(self, node: Node, operands: tuple[Node, Node] | None = None) -> Layout:
        """Exact: a contraction over channels acts per token; one over tokens is a sum, exact
        unweighted where one operand holds weights over them (attention's weights x values),
        and weighted by size where both hold one value per token."""
        a, b = operands or node.args[:2]
        la, lb = self.layout(a), self.layout(b)
        if la and lb and la.size is not lb.size:
            raise _Refuse("it multiplies tokens from before and after a merge")
        if la and lb and (la.start, la.lead, la.trail) != (lb.start, lb.lead, lb.trail):
            raise _Refuse("it multiplies token axes that start at different positions (one of them sliced)")
        if _ndim(a) < 2 or _ndim(b) < 2:
            raise _Refuse("matrix-vector products over tokens are not understood")
        ra = la.roles if la else (None,) * _ndim(a)
        rb = lb.roles if lb else (None,) * _ndim(b)
        if ra[-1] != rb[-2] or isinstance(ra[-1], Fold):
            raise _Refuse("it contracts the token axis of one operand with a non-token axis of the other")
        if ra[-1] == TOKEN:
            if is_weights(ra[-1]) and is_weights(rb[-2]):
                raise _Refuse("it contracts two sets of weights over tokens with each other")
            if not is_weights(ra[-1]) and not is_weights(rb[-2]):
                if lb.batch_dim() is None:
                    raise _Refuse("a sum over tokens where the batch axis is folded into another axis")
                self.no_joined(lb, "it sums over")
                self.flow.weightings.append(Weighting(node, 1, _ndim(b) - 2))
        out_ndim = _ndim(node)
        roles = [None] * out_ndim
        for src in (ra[:-2], rb[:-2]):
            for d, role in enumerate(src):
                roles[out_ndim - 2 - len(src) + d] = roles[out_ndim - 2 - len(src) + d] or role
        roles[-2], roles[-1] = ra[-2], rb[-1]
        return replace(la or lb, roles=tuple(roles))

    @_rule(aten.baddbmm.default)
    def baddbmm(self, node: Node) -> Layout:
        """Exact as its product (a matmul) plus the mask it adds, a pooling head's mask over
        the keys (nn.MultiheadAttention's ``baddbmm(mask, q, k^T)``)."""
        mask, a, b = node.args[:3]
        if self.layout(mask) or node.kwargs.get("beta", 1) != 1:
            raise _Refuse("it adds tokens, or a scaled tensor, to a product over tokens")
        layout = self.matmul(node, (a, b))
        if self.flow.weightings and self.flow.weightings[-1].node is node:
            raise _Refuse("a baddbmm that contracts the token axis")
        offset = len(layout.roles) - _ndim(mask)
        if any(holds(layout.roles[offset + d], TOKEN) and n != 1 for d, n in enumerate(shape_of(mask)[:-1])):
            raise _Refuse("it adds a tensor of a fixed token count along the queries")
        if holds(layout.roles[-1], TOKEN) and shape_of(mask)[-1] != 1:
            self.key_mask(node, mask, layout, shape_of(node)[-1])
        return layout

    @_rule(aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
    def softmax(self, node: Node) -> Layout:
        """Exact over tokens with proportional attention: log(size) on the logits gives a merged
        token its group's whole weight (the output is weights over the tokens)."""
        layout = self.layout(node.args[0])
        self.no_weights(node, "takes a softmax of")
        dim = _norm_dim(node.args[1], len(layout.roles))
        if isinstance(layout.roles[dim], Fold):
            raise _Refuse("softmax over an axis that folds the batch or tokens with another")
        if layout.roles[dim] == BATCH:
            raise _Refuse("softmax over the batch axis")
        if layout.roles[dim] != TOKEN:
            return layout
        if layout.batch_axis() is None:
            raise _Refuse("softmax over tokens where the batch axis is folded inside another axis")
        self.flow.softmaxes.append((node, dim))
        return replace(layout, roles=tuple(WEIGHTS if d == dim else r for d, r in enumerate(layout.roles)))

    @_rule(aten.scaled_dot_product_attention.default)
    def sdpa(self, node: Node) -> Layout | None:
        """Exact with proportional attention: log(size) in the mask weights each key by its size."""
        q, k, v = node.args[:3]
        lq, lk, lv = self.layout(q), self.layout(k), self.layout(v)
        self.no_weights(node, "attends with")
        if node.kwargs.get("is_causal") or (len(node.args) > 5 and node.args[5]):
            raise _Refuse("causal attention depends on token order")
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        pairs = (isinstance(mask, Node) and lq is not None and lk is not None and lq.size is lk.size
                 and lq.positions is lk.positions and not self.layout(mask) and len(shape_of(mask)) > 1
                 and shape_of(mask)[-2] > 1 and self.pair_table(node, mask, replace(lq, roles=lq.roles[:-1] + (TOKEN,))))
        if isinstance(mask, Node) and lk is not None and not pairs:
            self.no_joined(lk, "an attention mask over the keys of")
        if pairs:
            pass  # a learned table per (query, key) pair, read per merged pair
        elif isinstance(mask, Node) and mask in self.masks.values() and lk is not None:
            self.flow.masked.append((node, lk))
        elif isinstance(mask, Node) and lk is not None and not self.layout(mask) and tensor_meta(mask).shape[-1] != 1:
            self.key_mask(node, mask, lk, shape_of(k)[-2])
        elif isinstance(mask, Node) and self.pair_bias(self.layout(mask), lq, lk):
            pass
        elif isinstance(mask, Node) and (self.layout(mask) or tensor_meta(mask).shape[-1] != 1):
            raise _Refuse("an attention mask over keys that is not the one mask shared by every block")
        if lq is not None and lk is not None and lv is not None and TOKEN == lq.roles[-1] == lk.roles[-1] == lv.roles[-1]:
            return self.channel_sdpa(node, lq, lk)
        if (lk is None) != (lv is None) or (lk and (lk.roles[-2] != TOKEN or lv.roles[-2] != TOKEN)):
            raise _Refuse("keys and values must both carry the tokens on dim -2")
        if lk and lk.tokens != lv.tokens:
            raise _Refuse("keys and values are different token sequences (merged apart, or joined in another order)")
        if lk is not None:
            if lq is not None and lq.size is not lk.size:
                raise _Refuse("queries and keys come from before and after a merge")
            if lk.batch_axis() is None:
                raise _Refuse("the batch axis of the keys is folded inside another axis")
            self.flow.sdpas.append(node)
        if lq is None:
            return None
        return replace(lq, roles=lq.roles[:-1] + (None,))

    def channel_sdpa(self, node: Node, lq: Layout, lk: Layout) -> Layout:
        """Exact: channel attention as sdpa (Florence-2's DaViT), queries, keys and values
        [batch, heads, channels, tokens]: the logits contract the tokens, a sum over them that
        counts a merged token ``size`` times once the queries are scaled by size, and each
        token's output reads its own values. Its default scale, 1/sqrt(tokens), is pinned to
        the captured count (``WeightedReductions``)."""
        if len(node.args) > 3 and node.args[3] is not None or node.kwargs.get("attn_mask") is not None:
            raise _Refuse("channel attention (tokens last) with an attention mask")
        if lq.size is not lk.size or lq.positions is not lk.positions:
            raise _Refuse("channel attention over queries and keys merged apart")
        if lq.batch_dim() is None:
            raise _Refuse("channel attention whose batch axis is folded inside another axis")
        self.no_joined(lq, "channel attention over")
        self.flow.weightings.append(Weighting(node, 0, len(lq.roles) - 1))
        return lq

    @staticmethod
    def pair_bias(mask: Layout | None, lq: Layout | None, lk: Layout | None) -> bool:
        """Exact: an attention mask with one entry per (query, key) pair of these very merged
        tokens (a relative-position bias read per merged pair) is added as it is."""
        return (mask is not None and lq is not None and lk is not None and not mask.weights
                and mask.roles[-2:] == (TOKEN, TOKEN) and mask.roles[:-2] == lq.roles[:-2]
                and mask.tokens == lq.tokens == lk.tokens)

    @_rule(merge.rel_pos_bias)
    def relative_positions(self, node: Node) -> Layout:
        """Approximate, by the ``rel_pos`` rule (``RestageRelativePositions``): decomposed
        relative positions, a bias per (query, key) pair of one grid's self-attention, computed
        per merged pair. A merged token stands for patches at several positions; no bias gives
        it exactly each one's. Exact where the tables are zero."""
        query = self.layout(node.args[0])
        if any(self.layout(a) for a in node.args[1:3]):
            raise _Refuse("its position tables are computed from the tokens")
        self.no_weights(node, "reads")
        batch = query.batch_axis()
        if batch is None or batch[0] != 0 or query.roles[1:] != (TOKEN, None) or query.start:
            raise _Refuse("its queries are not [batch (heads folded inside), tokens, channels] over every token")
        if shape_of(node.args[0])[1] != node.args[3] * node.args[4]:
            raise _Refuse(f"its queries are not the {node.args[3]} x {node.args[4]} grid its tables are for")
        self.flow.relative_positions.append((node, query))
        return replace(query, roles=(query.roles[0], TOKEN, TOKEN))

    @_rule(*VIEWS, *_FLATTENS)
    def reshape(self, node: Node) -> Layout:
        """Exact where the token axis stays whole (folded with others at most): its shape entry
        follows the merged count."""
        src = self.layout(node.args[0])
        in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
        roles: list[Role] = [None] * len(out_shape)
        for gi, gj in _view_groups(in_shape, out_shape):
            factors = [f for d in gi for f in _factors(src.roles[d], in_shape[d])]
            if not any(role for role, _ in factors):
                continue
            try:
                refolded = _refold(factors, [out_shape[j] for j in gj])
            except _Refuse:
                if any(role == TOKEN for role, _ in factors):
                    return self.to_grid(node, src, in_shape, out_shape)
                if any(role == GRID_INNER for role, _ in factors):
                    raise _Refuse("it splits one axis of a merged token grid") from None
                continue  # the batch axis is lost in a view; rules needing it refuse later
            for j, role in zip(gj, refolded):
                role = _grid_as_tokens(role)
                if role == GRID_INNER:
                    raise _Refuse("a view of a merged token grid keeps its inner axis, captured at its size, apart; "
                                  "only folding it into the token axis is understood")
                roles[j] = role
                if holds(role, TOKEN):
                    self.token_shape_arg(node, j, role, [d for d in gi if holds(src.roles[d], TOKEN)], src)
            if node.target == aten.unflatten.int and any(holds(roles[j], TOKEN) for j in gj) and len(gj) > 1:
                raise _Refuse("it unflattens an axis holding the tokens into sizes fixed at capture")
        return replace(src, roles=tuple(roles))

    @_rule(aten.reshape_as.default)
    def reshape_as(self, node: Node) -> Layout:
        """Exact as a view (``reshape``'s rule) to the shape of a tensor that holds these very merged
        tokens laid out alike (LeViT's linears: a batch norm over the tokens flattened with the
        batch, then ``reshape_as`` back): that shape is read at run time."""
        src, target = self.layout(node.args[0]), self.layout(node.args[1])
        layout = self.reshape(node) if src is not None else None
        if layout is None or target is None or layout.roles != target.roles or layout.size is not target.size:
            raise _Refuse("it reshapes to the shape of another tensor, which does not hold these merged tokens "
                          "laid out alike")
        return layout

    def to_grid(self, node: Node, src: Layout, in_shape, out_shape) -> None:
        """Exact: a view that splits the token axis (back into a grid) reads the tokens
        un-merged, each original token taking its group's value, as captured."""
        batch = src.batch_axis()
        if batch is None or any(isinstance(role, Fold) for d, role in enumerate(src.roles) if d != batch[0]):
            raise _Refuse(f"it folds or splits the token axis (shape {in_shape} -> {out_shape})")
        self.no_joined(src, "it reshapes back to a grid")
        self.flow.unmerges.append(node)
        return None

    def token_shape_arg(self, node: Node, position: int, role: Role, token_dims: list[int], src: Layout) -> None:
        """Record that the view's entry ``position`` holds the token count, for RepairShapes."""
        if node.target not in VIEWS:
            return
        (token_dim,) = token_dims
        if role == TOKEN and src.roles[token_dim] == TOKEN:
            self.flow.shape_args.append(ShapeArg(node, position, token_dim))
            return
        shape = node.args[1]
        inferred = [k for k, entry in enumerate(shape) if k != position and entry == -1]
        if any(not isinstance(tensor_meta(node).shape[k], int) for k in inferred):
            raise _Refuse("a view that folds the tokens already infers its batch entry (-1)")
        self.flow.shape_args.append(ShapeArg(node, position, None))

    @_rule(aten.expand.default)
    def expand(self, node: Node) -> Layout:
        """Exact: broadcasting copies; the token entry of the shape follows the merged count."""
        src = self.layout(node.args[0])
        offset = len(node.args[1]) - len(src.roles)
        if any(isinstance(role, Fold) for role in src.roles):
            raise _Refuse("it expands a tensor whose tokens are folded with another axis")
        roles = (None,) * offset + src.roles
        for d in src.dims(TOKEN):
            self.flow.shape_args.append(ShapeArg(node, offset + d, d))
        return replace(src, roles=roles)

    @_rule(aten.permute.default)
    def permute(self, node: Node) -> Layout:
        """Exact: moves axes, roles move with them."""
        src = self.layout(node.args[0])
        return replace(src, roles=tuple(src.roles[d] for d in node.args[1]))

    @_rule(aten.transpose.int)
    def transpose(self, node: Node) -> Layout:
        """Exact: swaps two axes, roles swap with them."""
        src = self.layout(node.args[0])
        a, b = (_norm_dim(d, len(src.roles)) for d in node.args[1:3])
        roles = list(src.roles)
        roles[a], roles[b] = roles[b], roles[a]
        return replace(src, roles=tuple(roles))

    @_rule(aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
    def split(self, node: Node) -> list[Layout]:
        """Exact along an axis that is neither batch nor tokens (q/k/v, heads); along the tokens,
        exact as protected leading tokens and the rest (DINOv3's prefix and patches)."""
        src = self.layout(node.args[0])
        dim_index = 1 if node.target == aten.unbind.int else 2
        dim = _norm_dim(node.args[dim_index] if len(node.args) > dim_index else 0, len(src.roles))
        if src.roles[dim] == TOKEN and (src.lead or src.trail):
            if node.target != aten.split_with_sizes.default:
                raise _Refuse("it splits a joint sequence other than by the sizes of its streams")
            ends = [sum(node.args[1][:k + 1]) for k in range(len(node.args[1]))]
            pieces = self.cut(node, src, dim, list(zip([0] + ends[:-1], ends)))
            self.flow.joint_splits.append((node, dim, next(k for k, p in enumerate(pieces) if p.roles[dim] == TOKEN)))
            return pieces
        if src.roles[dim] == TOKEN and node.target == aten.split_with_sizes.default and len(node.args[1]) == 2:
            if len(src.dims(TOKEN)) > 1:
                raise _Refuse("it splits one of several token axes")
            lead = node.args[1][0]
            self.read_prefix(src.start + lead)
            self.flow.open_splits.append((node, dim))
            return [replace(src, roles=src.roles[:dim] + (None,) + src.roles[dim + 1:]),
                    replace(src, start=src.start + lead)]
        if src.roles[dim] is not None:
            raise _Refuse("it splits along the token or batch axis")
        roles = src.roles[:dim] + src.roles[dim + 1 :] if node.target == aten.unbind.int else src.roles
        return [replace(src, roles=roles)] * len(node.meta["val"])

    @_rule(aten.select.int)
    def select(self, node: Node) -> Layout:
        """Exact for a protected token, which keeps its position; refused for any other token,
        and for one sample of the batch (other samples merged other tokens)."""
        src = self.layout(node.args[0])
        dim = _norm_dim(node.args[1], len(src.roles))
        if isinstance(src.roles[dim], Fold):
            raise _Refuse("it indexes an axis that folds the batch or tokens with another")
        if src.roles[dim] == BATCH:
            raise _Refuse("it takes one sample out of the batch, whose rows the token sizes and positions follow")
        if src.roles[dim] == TOKEN:
            self.no_joined(src, "it reads one token of")
            index = node.args[2]
            if index < 0:
                raise _Refuse("it reads a token counted from the end, which merging moves")
            self.read_prefix(src.start + index + 1)
        return replace(src, roles=src.roles[:dim] + src.roles[dim + 1 :])

    @_rule(aten.slice.Tensor, aten.narrow.default)
    def slice(self, node: Node) -> Layout:
        """Exact for a range of protected tokens, or for all tokens from a protected position on;
        along other axes but the batch, exact as it is. (``narrow(dim, start, length)`` is the
        slice ``[start:start + length]``.)"""
        src = self.layout(node.args[0])
        dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(src.roles))
        start = (node.args[2] if len(node.args) > 2 else None) or 0
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        if node.target == aten.narrow.default:
            if start < 0 and src.roles[dim] == TOKEN:
                raise _Refuse("it narrows the token axis from a start counted from the end, which merging moves")
            start = _norm_dim(start, shape_of(node.args[0])[dim])
            end = start + node.args[3]
        if isinstance(src.roles[dim], Fold):
            raise _Refuse("it slices an axis that folds the batch or tokens with another")
        if src.roles[dim] == BATCH and (start, step, end) not in ((0, 1, None), (0, 1, sys.maxsize)):
            raise _Refuse("it slices the batch axis, whose rows the token sizes and positions follow")
        if src.roles[dim] != TOKEN:
            return src
        if len(src.dims(TOKEN)) > 1:
            raise _Refuse("it slices one of several token axes")
        count = shape_of(node.args[0])[dim]
        end = sys.maxsize if end is None else end
        if src.lead or src.trail:
            if step != 1:
                raise _Refuse("a strided slice of a joint sequence")
            begin, stop = (b + count if b < 0 else min(b, count) for b in (start, end))
            (piece,) = self.cut(node, src, dim, [(begin, stop)])
            for index, bound, at in ((2, start, begin), (3, end, stop)):
                # a bound up to the merged tokens counts from the start, one after them from the end
                if bound < 0 and at <= src.lead:
                    self.flow.joint_bounds.append((node, index, dim, False, at))
                elif 0 <= bound != sys.maxsize and src.lead < bound and at >= count - src.trail:
                    self.flow.joint_bounds.append((node, index, dim, True, count - at))
            return piece
        if step != 1 or start < 0 or end < 0:
            raise _Refuse("a strided slice of merged tokens, or one counted from the end")
        if end < count:  # a fixed range of leading tokens
            self.read_prefix(src.start + end)
            return replace(src, roles=src.roles[:dim] + (None,) + src.roles[dim + 1 :])
        if src.start + start > self.protected:
            raise _Refuse(
                f"it slices tokens [{start}:{'' if end == sys.maxsize else end}] of {count}; merged tokens have no fixed positions "
                f"past the {self.protected} protected ones"
            )
        if end != sys.maxsize:
            self.flow.open_slices.append(node)
        return replace(src, start=src.start + start)

    def along_axes(self, node: Node) -> Layout | list[Layout]:
        """Along axes that hold neither tokens nor batch, exact: the op reduces, scans or sorts
        each token's own entries. Over tokens: a sum or mean counts each merged token ``size``
        times; a max or min is exact, since a group's tokens are alike (where it lies is not);
        a sum of weights over tokens is exact as it is; anything else is refused."""
        src = self.layout(node.args[0])
        dims = _argument(node, _axis_argument(node.target))
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if not dims:
            raise _Refuse("it reduces over all axes at once")
        dims = sorted({_norm_dim(d, len(src.roles)) for d in dims})
        reduced = [src.roles[d] for d in dims]
        if any(isinstance(role, Fold) for role in reduced):
            raise _Refuse("it acts along an axis that folds the batch or tokens with another")
        if BATCH in reduced:
            raise _Refuse("it acts along the batch axis, mixing samples that merged different tokens")
        if TOKEN in reduced:
            self.over_tokens(node, src, dims[reduced.index(TOKEN)], reduced.count(TOKEN))
        elif src.weights and node.target not in _LINEAR_IN_WEIGHTS:
            raise _Refuse(f"`{node.target}` of weights over tokens (a softmax over them): a merged entry holds "
                          "its group's whole weight, which only sums, means, max and min carry through")
        outputs = node.meta["val"] if isinstance(node.meta["val"], (tuple, list)) else [node.meta["val"]]
        layouts = []
        for value in outputs:
            if value.dim() == len(src.roles):  # keepdim, a scan or a sort
                roles = tuple(None if d in dims else r for d, r in enumerate(src.roles))
            elif value.dim() == len(src.roles) - len(dims):
                roles = tuple(r for d, r in enumerate(src.roles) if d not in dims)
            else:
                raise _Refuse(f"its output of rank {value.dim()} does not keep the axes it does not act along")
            layouts.append(replace(src, roles=roles))
        return layouts if isinstance(node.meta["val"], (tuple, list)) else layouts[0]

    def over_tokens(self, node: Node, src: Layout, token_dim: int, token_axes: int) -> None:
        """What a reduction over the token axis needs (see ``along_axes``), or a refusal."""
        if token_axes != 1:
            raise _Refuse("a reduction over two token axes at once")
        weights = is_weights(src.roles[token_dim])
        if node.target in _MAX_LIKE:
            if weights:
                raise _Refuse("a max or min of weights over tokens: a merged entry holds its group's sum")
            if isinstance(node.meta["val"], (tuple, list)) and any(
                    user.args[1] == 1 and user.users for user in node.users):
                raise _Refuse("it uses where the max or min over tokens lies, a position among merged tokens")
        elif node.target in _NORMS:
            self.norm_over_tokens(node, src, token_dim, weights)
        elif node.target not in _SUMS:
            raise _Refuse(f"`{node.target}` over the token axis: only sums, means, norms, max and min over "
                          "tokens have a rule (a merged token stands for `size` tokens)")
        elif node.target == aten.mean.dim and weights:
            raise _Refuse("a mean of weights over tokens: their count changes when tokens merge")
        elif not weights:
            if src.batch_dim() is None:
                raise _Refuse("a sum or mean over tokens needs a batch axis to weight them by size")
            self.no_joined(src, "it sums over")
            if node.target == aten.mean.dim and node.kwargs.get("dtype"):
                raise _Refuse("a mean over tokens with a dtype argument")
            self.flow.weightings.append(Weighting(node, 0, token_dim, mean=node.target == aten.mean.dim))

    def norm_over_tokens(self, node: Node, src: Layout, token_dim: int, weights: bool) -> None:
        """A p-norm over tokens (XCiT's and EdgeNeXt's cross-covariance attention normalise queries
        and keys along the tokens): exact as (Σ sᵢ |xᵢ|^p)^(1/p), each merged token scaled by
        size^(1/p) before the norm; the infinity norm is a max, exact as it is."""
        order = _argument(node, "ord")
        order = 2.0 if order is None else float(order)
        if weights:
            raise _Refuse("a norm of weights over tokens: a merged entry holds its group's sum")
        if order in (math.inf, -math.inf):
            return
        if order <= 0:
            raise _Refuse(f"a {order:g}-norm over tokens, which no scaling of merged tokens reproduces")
        if src.batch_dim() is None:
            raise _Refuse("a norm over tokens needs a batch axis to weight them by size")
        if _argument(node, "dtype") is not None:
            raise _Refuse("a norm over tokens with a dtype argument")
        self.no_joined(src, "it takes a norm over")
        self.flow.weightings.append(Weighting(node, 0, token_dim, power=1 / order))

    @_rule(aten.einsum.default)
    def einsum(self, node: Node) -> Layout | None:
        """Exact as the products and sums it spells: a letter that holds the tokens (or batch)
        in one operand must hold them in every operand it is in; tokens summed over (a letter
        not in the output) are a sum, exact where one operand holds weights over them and
        weighted by size where none does; tokens kept are weights where an operand's are."""
        operands, (letters, output) = node.args[1], einsum_letters(node)
        tracked = [self.layout(t) for t in operands if self.layout(t)]
        if len({lay.tokens for lay in tracked}) != 1:
            raise _Refuse("it combines tokens from before and after a merge, or token axes sliced differently")
        roles: dict[str, list[tuple[Role, int, int]]] = {}
        for i, (tensor, part) in enumerate(zip(operands, letters)):
            layout = self.layout(tensor)
            if layout and len(set(part)) != len(part):
                raise _Refuse("an einsum that takes a diagonal (a letter twice in one operand) of tokens")
            for d, (letter, size) in enumerate(zip(part, shape_of(tensor))):
                roles.setdefault(letter, []).append((layout.roles[d] if layout else None, size, i))
        for letter, entries in roles.items():
            named = {role for role, _, _ in entries if role is not None}
            if any(isinstance(role, Fold) for role in named):
                raise _Refuse("an einsum over an axis that folds the batch or tokens with another")
            if len(named) > 1:
                raise _Refuse("it lines up the token or batch axis of one operand with another axis of the other")
            if named and any(role is None and size != 1 for role, size, _ in entries):
                raise _Refuse("it combines the tokens with a tensor of a fixed token count")
            holding = [(role, i) for role, _, i in entries if role == TOKEN]
            weighted = [i for role, i in holding if is_weights(role)]
            if len(weighted) > 1:
                raise _Refuse("it multiplies two sets of weights over tokens with each other")
            if BATCH in named and letter not in output:
                raise _Refuse("it sums over the batch axis")
            if holding and letter not in output and not weighted:
                _, i = holding[0]
                layout = self.layout(operands[i])
                if layout.batch_dim() is None:
                    raise _Refuse("a sum over tokens where the batch axis is folded into another axis")
                self.no_joined(layout, "it sums over")
                if any(w.node is node and w.operand == i for w in self.flow.weightings):
                    raise _Refuse("it sums one operand over two token axes at once")
                self.flow.weightings.append(Weighting(node, i, letters[i].index(letter)))
        out_roles = []
        for letter in output:
            named = [role for role, _, _ in roles[letter] if role is not None]
            out_roles.append(WEIGHTS if any(map(is_weights, named)) else named[0] if named else None)
        return replace(tracked[0], roles=tuple(out_roles))

    @_rule(aten.cat.default)
    def cat(self, node: Node) -> Layout:
        """Exact along an axis that is neither batch nor tokens, for parts of one token layout;
        along the tokens, see ``rejoin`` and ``join``."""
        layouts = [self.layout(p) for p in node.args[0]]
        known = next(lay for lay in layouts if lay is not None)  # every part has the same rank
        dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(known.roles))
        if layouts[-1] is not None and (joined := self.rejoin(node, layouts, dim)) is not None:
            return joined
        if (joined := self.join(node, layouts, dim)) is not None:
            return joined
        src = self.one_layout(layouts, "concatenates")
        if src.roles[dim] is not None:
            raise _Refuse("it concatenates along the token or batch axis")
        return src

    def join(self, node: Node, layouts: list[Layout | None], dim: int) -> Layout | None:
        """Exact: tokens of another stream (text) joined before or after the merged tokens, for
        one attention over both (SD3's, FLUX's, CogVideoX's joint attention). A joined token
        stands for itself: proportional attention gives it log 1 = 0, and each merged token
        keeps its group's weight, so the attention over both is what it was over the originals."""
        tracked = [i for i, lay in enumerate(layouts) if lay is not None]
        if len(tracked) != 1:
            return None
        (i,), src = tracked, layouts[tracked[0]]
        if src.roles[dim] != TOKEN or is_weights(src.roles[dim]) or len(src.dims(TOKEN)) != 1 or src.batch_dim() is None:
            return None
        counts = [shape_of(part)[dim] for part in node.args[0]]
        return replace(src, lead=src.lead + sum(counts[:i]), trail=src.trail + sum(counts[i + 1:]))

    def cut(self, node: Node, src: Layout, dim: int, bounds: list[tuple[int, int]]) -> list[Layout | None]:
        """Exact: a joint sequence cut back into its streams, each piece one of the joined
        tokens before, the merged tokens, the joined tokens after. The merged piece takes the
        merged layout again; bounds past it count from the end at run time."""
        total = shape_of(node.args[0])[dim]
        pieces = [(0, src.lead), (src.lead, total - src.trail), (total - src.trail, total)]
        layouts = []
        for begin, end in bounds:
            if (begin, end) not in pieces:
                raise _Refuse(f"it cuts a joint sequence (tokens {src.lead} joined before, {src.trail} after the "
                              f"merged ones) at [{begin}:{end}], not between its streams")
            if (begin, end) == pieces[1]:
                layouts.append(replace(src, lead=0, trail=0))
            else:
                layouts.append(replace(src, roles=src.roles[:dim] + (None,) + src.roles[dim + 1:], lead=0, trail=0))
        return layouts

    @staticmethod
    def one_layout(layouts: list[Layout | None], verb: str) -> Layout:
        """The one token layout every part of a cat or stack shares."""
        if None in layouts or len({(lay, tuple(map(is_weights, lay.roles))) for lay in layouts}) != 1:
            raise _Refuse(f"it {verb} merged tokens with other tensors (or weights over tokens with values)")
        return layouts[0]

    def rejoin(self, node: Node, layouts: list[Layout], dim: int) -> Layout | None:
        """Exact: leading protected tokens (read at fixed positions) put back in front of the
        tokens that follow them, as they were split (rotary terms go to the patches only)."""
        if len(layouts) != 2 or layouts[0] is not None or layouts[1].roles[dim] != TOKEN:
            return None
        lead, rest = node.args[0][0], layouts[1]
        if lead.op != "call_function":
            return None
        if lead.target == aten.slice.Tensor and len(lead.args) in (4, 5) and lead.args[4:] in ((), (1,)):
            source, lead_dim, begin = lead.args[0], lead.args[1], lead.args[2] or 0
        elif lead.target is operator.getitem and lead.args[1] == 0 and lead.args[0].target == aten.split_with_sizes.default:
            source, lead_dim, begin = lead.args[0].args[0], lead.args[0].args[2], 0
        else:
            return None
        src = self.layout(source)
        if src is None or _norm_dim(lead_dim, len(src.roles)) != dim or src.roles != rest.roles:
            return None
        if (src.size, src.positions) != (rest.size, rest.positions) or src.start + begin + shape_of(lead)[dim] != rest.start:
            return None
        return replace(rest, start=src.start + begin)

    @_rule(aten.stack.default)
    def stack(self, node: Node) -> Layout:
        """Exact: parts of one token layout side by side on a new axis (rotate-half's pairs)."""
        src = self.one_layout([self.layout(p) for p in node.args[0]], "stacks")
        dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(src.roles) + 1)
        return replace(src, roles=src.roles[:dim] + (None,) + src.roles[dim:])

    @_rule(aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default)
    def new_tensor(self, node: Node) -> None:
        """Exact: takes only dtype and device from the tokens; its shape comes from its
        arguments, and a fixed token count there is refused where it meets the tokens."""
        return None

    @_rule(aten.constant_pad_nd.default, aten.pad.default)
    def pad(self, node: Node) -> Layout:
        """Exact where only axes that are neither tokens nor batch are padded (Sana pads its
        values with a row of ones, whose sum over the keys is the normaliser)."""
        src = self.layout(node.args[0])
        pads = node.args[1]
        padded = [len(src.roles) - 1 - i // 2 for i, amount in enumerate(pads) if amount]
        if any(src.roles[d] is not None for d in padded):
            raise _Refuse("it pads the token or batch axis")
        if node.target == aten.pad.default:
            mode, value = (list(node.args[2:4]) + ["constant", None][len(node.args[2:4]):])
        else:
            mode, value = "constant", node.args[2] if len(node.args) > 2 else 0
        if padded and src.weights and (mode != "constant" or value not in (0, None)):
            raise _Refuse("it pads weights over tokens with entries that are not weights (only zeros are)")
        return src

    @_rule(aten.slice_scatter.default)
    def slice_scatter(self, node: Node) -> Layout:
        """Exact along an axis that is neither tokens nor batch, where the values written hold
        the same tokens as the tensor written into (``passes.functional_writes``' rewrite of
        Wan's rotary ``out[..., 0::2] = ...``)."""
        self.no_weights(node, "writes into a slice of a tensor")
        base, values = self.layout(node.args[0]), self.layout(node.args[1])
        dim = _norm_dim(node.args[2] if len(node.args) > 2 else 0, len(shape_of(node)))
        if (base is None or values is None or base.tokens != values.tokens or base.roles[dim] is not None
                or base.roles[len(base.roles) - len(values.roles):] != values.roles):
            raise _Refuse("it writes into a slice of the tokens, or writes tokens into another tensor (or onto "
                          "other axes)")
        return base

    @_rule(aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
           aten.rand_like.default, aten.randn_like.default)
    def like(self, node: Node) -> Layout:
        """Exact: a new tensor of the tokens' (live) shape, with values of its own."""
        src = self.layout(node.args[0])
        return replace(src, roles=tuple(TOKEN if is_weights(r) else r for r in src.roles))


# the rules that may see a merged token grid: each acts per token or keeps the axes whole
_GRID_RULES = {_Analysis.pointwise, _Analysis.type_as, _Analysis.norm, _Analysis.linear, _Analysis.reshape, _Analysis.permute,
               _Analysis.transpose, _Analysis.split, _Analysis.sym_size}


# the rules that may see a joint sequence (merged tokens beside another stream's): each acts per
# token, keeps the token axis whole, attends over it, or cuts it back into its streams
_JOINT_RULES = {_Analysis.pointwise, _Analysis.type_as, _Analysis.expand_as, _Analysis.one_hot, _Analysis.norm,
                _Analysis.linear, _Analysis.reshape, _Analysis.permute, _Analysis.transpose, _Analysis.sdpa,
                _Analysis.softmax, _Analysis.along_axes, _Analysis.slice, _Analysis.split, _Analysis.sym_size,
                _Analysis.expand, _Analysis.cat, _Analysis.stack, _Analysis.matmul, _Analysis.einsum,
                _Analysis.like, _Analysis.new_tensor, _Analysis.select, _Analysis.slice_scatter}


_MASKING = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther}


def _learned(node: Node, seen: dict | None = None) -> bool:
    """``node`` is computed from parameters of the model (a learned table) and from no mask: each
    term of a sum is learned, or a constant alike for every (query, key) pair (transformers adds
    an all-true mask to BEiT's table), and no mask fills it (a causal, padding or shifted-window
    mask is no learned entry)."""
    seen = {} if seen is None else seen
    if node in seen:
        return seen[node]
    learned = is_parameter(node)
    if node.op == "call_function" and node.target not in _MASKING:
        operands = node.all_input_nodes
        terms = [_learned(a, seen) for a in operands]
        if node.target in (aten.add.Tensor, aten.sub.Tensor) and len(terms) == 2:
            learned = any(terms) and all(t or _uniform_over_pairs(a) for t, a in zip(terms, operands))
        else:
            learned = any(terms)
    seen[node] = learned
    return learned


def _uniform_over_pairs(node: Node) -> bool:
    """``node`` (computed from no input and no parameter) holds one value over its last two axes."""
    try:
        value = evaluate_constant(node.graph.owning_module, node, 1)
    except Exception:  # (anything that cannot be evaluated here is no known constant)
        return False
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and bool(
        (value == value.flatten(-2)[..., :1].unsqueeze(-1)).all())


class RefusedAt(UnsupportedModelError):
    """The analysis refuses ``node``: no rule proves it safe on merged tokens."""

    def __init__(self, message: str, node: Node):
        super().__init__(message)
        self.node = node


def analyze_token_flow(
    graph: Graph, seeds: dict[Node, Layout], protected: int, masks: dict[Node, Node] | None = None,
    key_masks: frozenset[Node] | None = None,
) -> TokenFlow:
    """Carry token roles from ``seeds`` through ``graph``; raise UnsupportedModelError where unsafe.
    ``masks``: nodes that apply the shared attention mask, to the mask. ``key_masks``: the
    masks over keys (of pooling heads) that the merges respect; None before any merge."""
    return _Analysis(seeds, protected, masks or {}, query_key_paths(graph), key_masks).run(graph)
