"""Decomposed relative positions (MViTv2, SAM's image encoder) for merged tokens.

SAM adds ``q . R_h[row(q), row(k)] + q . R_w[col(q), col(k)]`` to each attention logit,
computed on the queries reshaped to their grid: two einsums with tables gathered from the
parameters, broadcast to [B, h, w, kh, kw] and flattened, then added to the logits
(Meta's ``segment_anything``, HF ``SamModel``) or passed as sdpa's mask (timm ``samvit``).
A merged token stands for patches at several positions, so no bias is exact for it.

- ``RelativePositionBias`` (before the token-flow analysis) finds that computation and
  rewrites it as one call, ``merge.rel_pos_bias``, with the same value; the analysis has
  a rule for that call.
- ``RestageRelativePositions`` (after it) computes the bias per merged (query, key) pair
  where the queries are merged, by the ``rel_pos`` rule (``merge.REL_POS_RULES``):
  ``"mean"`` (the mean of the biases between their patches) or ``"representative"`` (the
  bias between their first patches).
"""

from __future__ import annotations

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import merge
from .graph_utils import VIEWS, aten, depends_on_inputs, einsum_letters, shape_of
from .token_flow import FlowPass, TokenFlow

_FLATTENS = VIEWS | {aten.reshape_as.default}  # how the 5-d bias is flattened to its pairs (HF eager: reshape_as)


def _add_leaves(node: Node, root: Node) -> list[Node]:
    """The operands of a tree of adds rooted at ``node`` (inner adds used by the tree alone)."""
    if node.op == "call_function" and node.target == aten.add.Tensor and (node is root or len(node.users) == 1) \
            and all(isinstance(a, Node) for a in node.args[:2]) and node.kwargs.get("alpha", 1) == 1:
        return [leaf for a in node.args[:2] for leaf in _add_leaves(a, root)]
    return [node]


def _term(leaf: Node) -> tuple[int, Node, Node] | None:
    """For ``unsqueeze(einsum("bhwc,?kc->bhwk", grid, table), dim)``: (grid axis the table is
    read along, 1 for rows or 2 for columns; the grid; the table), where the unsqueeze puts
    that term's key axis where the 5-d bias holds it. None for anything else."""
    if leaf.op != "call_function" or leaf.target != aten.unsqueeze.default:
        return None
    term, dim = leaf.args
    if not (isinstance(term, Node) and term.target == aten.einsum.default and len(term.args[1]) == 2):
        return None
    (grid_letters, table_letters), out = einsum_letters(term)
    if len(grid_letters) != 4 or len(table_letters) != 3 or len(set(grid_letters)) != 4:
        return None
    b, h, w, c = grid_letters
    for axis, along in ((1, h), (2, w)):
        key = table_letters[1]
        if table_letters == along + key + c and key not in grid_letters and out == b + h + w + key:
            # rows' key axis is the bias's dim 3 (unsqueezed at 4), columns' dim 4 (unsqueezed at 3)
            return (axis, *term.args[1]) if dim % 5 == {1: 4, 2: 3}[axis] else None
    return None


def _bias(reshape: Node) -> tuple[Node, Node, Node, Node | None] | None:
    """(query grid, row table, column table, logits added in or None) for a reshape of a
    decomposed relative-position bias [B, h, w, kh, kw] to its pairs."""
    total = reshape.args[0]
    if not isinstance(total, Node) or len(shape_of(total)) != 5:
        return None
    leaves = _add_leaves(total, total)
    terms = [t for t in map(_term, leaves) if t is not None]
    rest = [leaf for leaf in leaves if _term(leaf) is None]
    if len(terms) != 2 or {t[0] for t in terms} != {1, 2} or terms[0][1] is not terms[1][1] or len(rest) > 1:
        return None
    (_, grid, table_h), (_, _, table_w) = sorted(terms, key=lambda t: t[0])
    if depends_on_inputs(table_h) or depends_on_inputs(table_w):
        return None
    logits = None
    if rest:  # the logits, viewed as [B, h, w, kh, kw]
        view = rest[0]
        if (view.target not in VIEWS or len(view.users) != 1 or len(shape_of(view.args[0])) != 3
                or shape_of(view) != shape_of(total)):
            return None
        logits = view.args[0]
    batch, h, w, _ = shape_of(grid)
    if grid.target not in VIEWS or shape_of(grid.args[0]) != (batch, h * w, shape_of(grid)[3]):
        return None
    if shape_of(table_h)[:2] != (h, h) or shape_of(table_w)[:2] != (w, w):
        return None  # queries and keys on different grids: not self-attention over one grid
    return grid, table_h, table_w, logits


def _erase_dead(graph, *nodes: Node) -> None:
    """Erase each of ``nodes`` that nothing uses, then whatever they alone used."""
    stack, erased = list(nodes), set()
    while stack:
        current = stack.pop()
        if current not in erased and current.op == "call_function" and not current.users and not current.is_impure():
            stack += current.all_input_nodes
            graph.erase_node(current)
            erased.add(current)


def pair_grid(nodes) -> Node | None:
    """A view among ``nodes`` between attention pairs [B, q, k] and their positions' grid
    [B, h, w, kh, kw] (h * w = q, kh * kw = k): what is left of a relative-position bias that
    ``RelativePositionBias`` did not recognise. Merged queries form no grid, so its attention
    cannot merge, and the refusal should say why."""
    for node in nodes:
        if node.op != "call_function" or node.target not in _FLATTENS or not isinstance(node.args[0], Node):
            continue
        shapes = sorted((shape_of(node.args[0]), shape_of(node)), key=len)
        if [len(s) for s in shapes] == [3, 5]:
            (batch, q, k), grid = shapes
            # self-attention over one grid: keys on the queries' grid (a view of tokens as
            # [B, h, w, heads, head_dim] matches only if heads == h and head_dim == w)
            if grid[0] == batch and grid[1] * grid[2] == q == k and tuple(grid[1:3]) == tuple(grid[3:5]):
                return node
    return None


class RelativePositionBias(PassBase):
    """Rewrites each decomposed relative-position bias as ``merge.rel_pos_bias`` (added to the
    logits it was added to), so the token-flow analysis sees it as one op with a rule."""

    def call(self, gm: GraphModule) -> PassResult:
        graph, found = gm.graph, 0
        for reshape in [n for n in graph.nodes if n.op == "call_function" and n.target in _FLATTENS]:
            matched = _bias(reshape)
            if matched is None:
                continue
            grid, table_h, table_w, logits = matched
            h, w = shape_of(grid)[1:3]
            query = grid.args[0]
            with graph.inserting_before(reshape):
                bias = graph.call_function(merge.rel_pos_bias, (query, table_h, table_w, h, w))
                bias.meta["val"] = merge.rel_pos_bias(query.meta["val"], table_h.meta["val"], table_w.meta["val"], h, w)
                if logits is not None:
                    bias = graph.call_function(aten.add.Tensor, (logits, bias))
                    bias.meta["val"] = logits.meta["val"]
            total = reshape.args[0]
            if reshape.target == aten.reshape_as.default and shape_of(reshape) == shape_of(bias):
                reshape.replace_all_uses_with(bias)  # flattened to the shape it already has
            else:
                reshape.replace_input_with(total, bias)
            _erase_dead(graph, reshape, total)
            found += 1
        if found:
            graph.lint()
            gm.recompile()
        return PassResult(gm, bool(found))


class RestageRelativePositions(FlowPass):
    """Where ``merge.rel_pos_bias`` reads merged queries, computes it per merged pair by ``rule``."""

    def __init__(self, flow: TokenFlow, rule: str):
        super().__init__(flow)
        self.rule = rule

    def call(self, gm: GraphModule) -> PassResult:
        modified = False
        for node, layout in self.flow.relative_positions:
            if not layout.merged:
                continue
            _, inner = layout.batch_axis()
            node.target = merge.merged_rel_pos_bias
            node.args = (*node.args, layout.positions, layout.size, inner, self.rule)
            modified = True
        return PassResult(gm, modified)


class RestagePairTables(FlowPass):
    """Where a bias per (query, key) pair that no input feeds (a learned relative-position
    table: Swin's, BEiT's, MaxViT's) meets merged tokens, reads it per merged pair by ``rule``
    (``merge.merged_pair_table``)."""

    def __init__(self, flow: TokenFlow, rule: str):
        super().__init__(flow)
        self.rule = rule

    def call(self, gm: GraphModule) -> PassResult:
        graph, modified = gm.graph, False
        for node, table, layout in self.flow.pair_tables:
            if not layout.merged:
                continue
            with graph.inserting_before(node):
                merged = graph.call_function(merge.merged_pair_table, (
                    table, layout.positions, layout.size, len(layout.roles), layout.batch_dim(), self.rule,
                    layout.lead, layout.trail))
            node.replace_input_with(table, merged)
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: GraphModule) -> None:
        """Every pair table meeting merged tokens is read per merged pair."""
        for node, table, layout in self.flow.pair_tables:
            if layout.merged and table in node.all_input_nodes:
                raise AssertionError(f"{node.name}: still adds the table {table.name} over the original tokens")
