"""Run the ToMe passes in order over a captured graph.

find blocks -> drop all-pass attention masks -> count protected tokens (learned, or read
at fixed positions) -> resolve schedule -> insert merges ->
token-flow analysis (refuses what it cannot prove) -> repair shapes -> rotary tables read
per merged token -> restage the attention mask -> proportional attention -> weighted reductions -> un-merge tokens (before
reshapes back to a grid, and returned ones) ->
expose size/positions as extra outputs -> (with ``checkpoint``) each block under
torch.utils.checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .. import cost, merge
from ..errors import UnsupportedModelError
from ..schedule import Schedule, clamp_schedule, resolve_schedule
from .attention_census import UnmergedAttention, unmerged_attention
from .attention_masks import DropAllPassMasks, RestageMasks, shared_mask
from .checkpoint_blocks import CheckpointBlocks
from .functional_writes import FunctionalWrites
from .find_blocks import (AttentionBlock, SeparateChains, channels_first, channels_first_why, find_attention_blocks,
                          why_no_blocks)
from .graph_utils import ancestors, aten, describe, graph_copy, module_path, shape_of
from .insert_merges import InsertMerges
from .proportional_attention import ProportionalAttention, form_of
from .protected_tokens import count_protected_tokens
from .repair_shapes import RepairShapes
from .rotary_tables import RestageTables
from .token_flow import BATCH, TOKEN, Layout, analyze_token_flow
from .unmerge import Unmerge
from .weighted_reductions import WeightedReductions


_GRID_HINT = ("; blocks that keep a [batch, h, w, channels] grid merge per block instead, each branch on its own grid: "
              "transform(model, ratio, scheme='block') (tome_fx.sam.apply for SAM's image encoders)")


@dataclass(frozen=True)
class BlockPlan:
    name: str
    tokens_in: int
    r: int
    mlp_ratio: float  # what the block's linears amount to: 4 C^2 (attention) + 2 m C^2 (MLP) multiply-adds per token
    key_width: int  # channels of the keys averaged over heads: the merge's similarity metric

    @property
    def tokens_out(self) -> int:
        return self.tokens_in - self.r


@dataclass(frozen=True)
class TomePlan:
    blocks: tuple[BlockPlan, ...]
    protected: int
    requested: tuple[int | float, ...]  # the schedule before clamping (a float: a fraction of the tokens)
    width: int  # channels of the residual stream
    unmerged_at: tuple[str, ...] = ()  # reshapes back to a grid that read the tokens un-merged
    method: str = "tome"  # the merge policy: PiToMe scores every pair of tokens, ToMe half of them
    # attention ops that run on every token (no block holds them, no merged token reaches them),
    # and the multiply-adds of all attention ops, for their share
    unmerged_attention: tuple[UnmergedAttention, ...] = ()
    attention_macs: int = 0

    @property
    def unmerged_share(self) -> float:
        """The share of the attention ops' multiply-adds that ``unmerged_attention`` holds."""
        return sum(a.macs for a in self.unmerged_attention) / max(self.attention_macs, 1)

    @property
    def schedule(self) -> list[int]:
        return [b.r for b in self.blocks]

    @property
    def token_counts(self) -> list[int]:
        """Tokens entering each block, then the final count."""
        return [b.tokens_in for b in self.blocks] + [self.blocks[-1].tokens_out]

    def summary(self) -> str:
        """What will happen, readable: each block's tokens in and out, the protected tokens,
        where tokens are un-merged back to the grid."""
        lines = [f"{len(self.blocks)} blocks, {self.protected} protected tokens, width {self.width}"]
        lines += [f"  {b.name}: {b.tokens_in} tokens in, {b.r} merged, {b.tokens_out} out" for b in self.blocks]
        lines += [f"  un-merged before {where}" for where in self.unmerged_at]
        if self.unmerged_attention:
            lines.append(f"  {len(self.unmerged_attention)} attention ops run on every token "
                         f"({self.unmerged_share:.0%} of the attention's multiply-adds):")
            reasons = {}  # ops that share a reason on one line
            for op in self.unmerged_attention:
                reasons.setdefault(op.reason, []).append(op.name)
            lines += [f"    {', '.join(names)}: {reason}" for reason, names in reasons.items()]
        return "\n".join(lines)

    def rescheduled(self, r: Schedule) -> TomePlan:
        """This plan with schedule ``r`` (clamped as a capture would clamp it): what another
        ``r`` would cost, without capturing again (``r="auto"``)."""
        requested = resolve_schedule(r, len(self.blocks))
        schedule = clamp_schedule(requested, self.blocks[0].tokens_in, self.protected)
        blocks, tokens = [], self.blocks[0].tokens_in
        for block, merged in zip(self.blocks, schedule):
            blocks.append(replace(block, tokens_in=tokens, r=merged))
            tokens -= merged
        return replace(self, blocks=tuple(blocks), requested=tuple(requested))

    def predicted_flops(self, batch: int = 1, merging: bool = True) -> int:
        """The attention blocks' FLOPs by the cost model (``tome_fx.cost``); ``merging=False``:
        the same blocks as the original runs them, every one on all the tokens."""
        tokens, every_pair = self.blocks[0].tokens_in, merge.POLICIES[self.method].every_pair
        per_image = sum(
            cost.block_flops(b.tokens_in, self.width, b.mlp_ratio, b.r, b.key_width, every_pair) if merging
            else cost.block_flops(tokens, self.width, b.mlp_ratio, 0, b.key_width)
            for b in self.blocks
        )
        return int(per_image * batch)


def apply_tome(gm: GraphModule, r: Schedule, *, prop_attn: bool | str, unmerge_outputs: bool,
               scope: tuple[str, ...] = (), rope: str = "mean", checkpoint: bool = False,
               method: str = "tome") -> TomePlan:
    """Rewrite ``gm`` in place; its outputs become ``(original outputs, size, positions)``.
    ``r`` is a schedule, or a function of (blocks, tokens, protected tokens) that makes one
    (a schedule that depends on the model: ``tome_fx.vlm``'s tokens kept).
    With ``scope`` (module paths), only the blocks under it merge; ``rope``: how a merged
    token's rotary terms are chosen (``rotary_tables.RULES``); ``checkpoint``: each block
    runs under ``torch.utils.checkpoint``; ``method``: the merge policy (``merge.POLICIES``)."""
    FunctionalWrites()(gm)
    try:
        blocks = find_attention_blocks(gm.graph, scope)
    except SeparateChains as error:
        raise UnsupportedModelError(str(error) + _scope_hint(gm, error.scopes, r, rope)) from None
    if not blocks:
        where = f" under scope {list(scope)}" if scope else ""
        raise UnsupportedModelError(f"no attention block was found{where}: " + why_no_blocks(gm.graph, scope))
    for block in blocks:
        if block.not_one_sequence:
            raise UnsupportedModelError(block.not_one_sequence + _GRID_HINT * (
                len(shape_of(block.stream)) == 4 and not channels_first(block.stream)))
    masks = DropAllPassMasks(blocks)
    masks(gm)
    stream = blocks[0].stream
    stream_shape = shape_of(stream)
    if channels_first(stream):
        raise UnsupportedModelError(f"block {blocks[0].name}: {channels_first_why(stream)}")
    if len(stream_shape) != 3:
        raise UnsupportedModelError(
            f"block {blocks[0].name}: residual stream has shape {('batch', *stream_shape[1:])}; expected "
            "[batch, tokens, channels] (windowed or 2-d token grids are not a single token sequence)" + _GRID_HINT
        )
    tokens = stream_shape[1]
    mask = shared_mask(masks.kept, tokens, stream)
    applies_mask = {applied_by: mask for applied_by, _ in masks.kept}
    # a dry run of the analysis, before any merge, finds the leading tokens read at fixed
    # positions (a readout of token 0, say); they are protected like learned ones
    unmerged = {stream: Layout((BATCH, TOKEN, None), size=None)}
    dry = analyze_token_flow(gm.graph, unmerged, sys.maxsize, applies_mask)
    protected = max(count_protected_tokens(stream), dry.reads)
    requested = r(len(blocks), tokens, protected) if callable(r) else resolve_schedule(r, len(blocks))
    schedule = clamp_schedule(requested, tokens, protected)
    # masks over keys outside the blocks (a pooling head's): the merges must respect them too
    key_masks = {mask: layout.batch_axis()[1] for _, mask, layout in dry.key_masks}
    _hoist_before(gm, list(key_masks), blocks[0].residual)

    # (self-attention over a stream of another count; CaiT's class attention reads more keys than its stream)
    changed = next((b for b in blocks if len(shape_of(b.stream)) == 3 and shape_of(b.stream)[1] - sum(b.joined)
                    != tokens - sum(blocks[0].joined)
                    and shape_of(b.keys)[b.key_token_dim] - sum(b.key_span) == shape_of(b.stream)[1]), None)
    if changed is not None:
        raise UnsupportedModelError(
            f"block {changed.name}: its stream holds {shape_of(changed.stream)[1]} tokens, block {blocks[0].name}'s "
            f"{tokens}: the token count changes between the blocks (a downsampling stage, as in a hierarchical "
            "model), and whole-stream merging needs one sequence throughout; per-block merging takes each stage "
            "(transform(model, ratio, scheme='block'))")
    for block, block_r in zip(blocks, schedule):
        keys = shape_of(block.keys)[block.key_token_dim] - sum(block.key_span)
        if block_r and block.parallel:
            raise UnsupportedModelError(f"block {block.name}: {block.parallel}")
        if block_r and block.why_not_joined:
            raise UnsupportedModelError(f"block {block.name}: {block.why_not_joined}, so it cannot merge")
        if block_r and 0 < keys < tokens and block.key_span == (0, 0):
            raise UnsupportedModelError(
                f"block {block.name}: its attention's keys hold {keys} tokens, pooled from its stream's {tokens} (PVT's "
                "spatial-reduction or MViT's pooling attention): whole-stream merging would merge the stream the "
                "pooling reads as a grid; per-block merging merges the queries and pools the keys from every token "
                "(transform(model, ratio, scheme='block'))")
        if block_r and keys != tokens:
            raise UnsupportedModelError(
                f"block {block.name}: its attention's keys hold {keys} tokens and its residual stream {tokens}, and "
                "they are not the stream's keys joined with another's by a cat along the tokens (joint attention), "
                "so the merge cannot tell which keys are the stream's")
    insert = InsertMerges(blocks, schedule, protected, mask, tuple(key_masks.items()), method)
    insert(gm)
    flow = analyze_token_flow(gm.graph, insert.result.seeds, protected, applies_mask, frozenset(key_masks))
    merged_tables = [node for node, _, layout in flow.pair_tables if layout.merged]
    if merged_tables:
        raise UnsupportedModelError(
            f"{describe(merged_tables[0])}: a bias per (query, key) pair that no input feeds (a learned "
            "relative-position table) meets merged tokens; whole-stream merging does not read it per merged pair, "
            "per-block merging does (an approximation: transform(model, ratio, scheme='block'))")
    census = unmerged_attention(gm.graph, set(flow.layouts), {b.attention for b in blocks}, scope)
    attended = flow.attended
    for block in blocks:
        if block.attention not in attended:
            raise UnsupportedModelError(
                f"block {block.name}: could not prove that its attention runs over the residual stream's tokens"
            )
    unmerged_at = tuple(describe(node) for node in flow.unmerges if flow.layouts[node.args[0]].merged)
    RepairShapes(flow)(gm)
    RestageTables(flow, rope)(gm)
    RestageMasks(flow, mask)(gm)
    if form := form_of(prop_attn):
        ProportionalAttention(flow, form)(gm)
    WeightedReductions(flow)(gm)
    unmerge = Unmerge(flow, outputs=unmerge_outputs, state=(insert.result.size, insert.result.positions))
    unmerge(gm)
    _append_outputs(gm, *unmerge.state)
    gm.graph.lint()
    gm.recompile()
    plans = _plans(gm, blocks, schedule, tokens, stream_shape[-1])
    if checkpoint:
        CheckpointBlocks(blocks)(gm)
    return TomePlan(tuple(plans), protected, tuple(requested), stream_shape[-1], unmerged_at, method, *census)


def _plans(gm: GraphModule, blocks: list[AttentionBlock], schedule: list[int], tokens: int, width: int):
    """Each block's tokens, r and cost-model shape (read before checkpointing moves its nodes)."""
    plans, count = [], tokens
    for block, block_r in zip(blocks, schedule):
        key_width = shape_of(block.keys)[-1 if block.key_token_dim == -2 else -2]
        plans.append(BlockPlan(block.name, count, block_r, _mlp_ratio(gm, block, width), key_width))
        count -= block_r
    return plans


def _scope_hint(gm: GraphModule, scopes: list[str], r: Schedule, rope: str) -> str:
    """Which of the separate parts would transform on their own (each tried on a copy of the
    graph), as ``scope=`` values; or why none would."""
    works, fails = [], []
    for scope in scopes:
        try:
            apply_tome(graph_copy(gm), r, prop_attn=True, unmerge_outputs=True, scope=(scope,), rope=rope)
            works.append(f"scope={scope!r}")
        except UnsupportedModelError as why:
            fails.append(f"{scope!r} ({why})")
    if works:
        return f"; a scope holds one stream of blocks: to merge one part of the model, pass {' or '.join(works)}"
    return "; no part can be merged on its own either: " + "; ".join(fails) if fails else ""


def _hoist_before(gm: GraphModule, masks: list, anchor) -> None:
    """Move the computation of ``masks`` (from the inputs alone) in front of ``anchor``, where
    the merges can read them."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    needed = set()
    for node in masks:
        if anchor in ancestors(node):
            raise UnsupportedModelError(
                f"{describe(node)}: a mask over the keys of an attention outside the blocks is computed from the "
                "tokens; merges cannot be made to respect it"
            )
        needed |= ancestors(node) | {node}
    for node in sorted((n for n in needed if order[n] > order[anchor]), key=order.__getitem__):
        anchor.prepend(node)


def _mlp_ratio(gm: GraphModule, block: AttentionBlock, width: int) -> float:
    """The MLP ratio m for which a standard block's linears, 4 C^2 for attention and 2 m C^2
    for the MLP in multiply-adds per token, cost what the linears under this block's module do."""
    home = module_path(block.residual)  # the block's module: its forward adds the residual
    macs = sum(
        shape_of(node.args[1])[0] * shape_of(node.args[1])[1]
        for node in gm.graph.nodes
        if node.op == "call_function"
        and node.target == aten.linear.default
        and (module_path(node) + ".").startswith(home + ".")
    )
    return (macs / width**2 - 4) / 2


def _append_outputs(gm: GraphModule, size, positions) -> None:
    output = gm.graph.output_node()
    codegen = gm.graph._codegen
    info = codegen.pytree_info
    leaf = object()  # any non-container value is one pytree leaf (None would be none)
    original = pytree.tree_unflatten([leaf] * info.out_spec.num_leaves, info.out_spec)
    _, out_spec = pytree.tree_flatten((original, leaf, leaf))
    flat = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    output.update_arg(0, tuple(flat + [size, positions]))
    codegen.pytree_info = info._replace(out_spec=out_spec)
