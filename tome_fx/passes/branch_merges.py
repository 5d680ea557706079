"""Per-branch merging (tomesd's scheme): the residual stream keeps every token.

In each merging block one matching is computed on the block's input tokens, laid out as
a grid (``merge.grid_order``). Each chosen branch -- the self-attention, the
cross-attention, the MLP -- merges its input right after its norm, runs on fewer tokens,
and un-merges its output before the residual add, each original token taking the value
of the merged token that holds it. The token-flow analysis then proves each branch safe
on merged tokens, as it does for whole-stream merging.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .. import merge
from ..errors import UnsupportedModelError
from .functional_writes import FunctionalWrites
from .find_blocks import (CASTS, RESIDUAL_ADD, SDPA, SOFTMAX, AttentionBlock, channels_first, channels_first_why,
                          find_attention_blocks, first_unrecognised, manual_attention, scales,
                          why_no_blocks)
from .graph_utils import VIEWS, aten, ancestors, descendants, describe, reads_values, shape_of
from .proportional_attention import ProportionalAttention, form_of
from .protected_tokens import count_appended_tokens, count_protected_tokens
from .relative_positions import RelativePositionBias, RestagePairTables, RestageRelativePositions, pair_grid
from .repair_shapes import RepairShapes
from .rotary_tables import RestageTables
from .token_flow import BATCH, GRID_INNER, TOKEN, Layout, RefusedAt, analyze_token_flow, is_weights
from .unmerge import Unmerge
from .weighted_reductions import WeightedReductions

KINDS = ("attn", "crossattn", "mlp")
_NORMS = {aten.layer_norm.default, aten.group_norm.default, aten.rms_norm.default}


@dataclass(frozen=True)
class BranchSettings:
    """tomesd's options: ``ratio`` of each merging block's tokens; blocks at most
    ``max_downsample`` times smaller than the ``grid`` (tokens at full resolution, h x w) merge;
    one dst per ``sy`` x ``sx`` cell, random with ``rand``; ``kinds``: the branches that merge;
    ``grid_stream``: every block's stream is its own grid [batch, h, w, channels] instead."""

    ratio: float
    grid: tuple[int, int]
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    rand: bool = False
    kinds: frozenset[str] = frozenset({"attn"})
    grid_stream: bool = False  # the stream is a token grid [batch, h, w, channels] (SAM), not a sequence
    rope: str = "mean"  # the rotary terms of a merged token (``rotary_tables.RULES``)
    rel_pos: str = "mean"  # the relative-position bias of a merged pair (``merge.REL_POS_RULES``)
    skip: frozenset[tuple[str, str]] = frozenset()  # (block, branch key) branches left unmerged (``BranchRefused``)


EVERY_BRANCH = "every branch"  # the branch key of a refusal that concerns a whole block (it has no grid)


class BranchRefused(UnsupportedModelError):
    """A refusal that concerns one branch: ``branch`` is (block name, branch key). Leaving that
    branch out (``BranchSettings.skip``) may let the others merge."""

    def __init__(self, message: str, branch: tuple[str, str]):
        super().__init__(message)
        self.branch = branch


@dataclass(frozen=True)
class Branch:
    kind: str
    add: Node  # the residual add that closes it
    output: Node  # the branch's operand of that add
    stream: Node  # the stream it is added to (the add's other operand)
    nodes: frozenset[Node]  # what the output depends on, back to the stream it reads
    reads: Node  # the stream it reads: ``stream``, or the block's input for a parallel branch (SD3.5)
    label: str = ""  # its kind, numbered from the second of a kind in its block ("mlp 2": XCiT's MLP after its LPI)

    @property
    def key(self) -> str:
        return self.label or self.kind


@dataclass(frozen=True)
class BranchPlan:
    """A merging block: its tokens, the tokens its branches merge away, which branches merge;
    ``windows``: (windows, tokens in each, merged away in each) where its attention branch
    merges within the windows it attends over (SAM's windowed blocks); ``unmerged``: why a
    block merges nothing (a stage change that pools the grid: Hiera's); ``tile``: the tiles its
    large grid is matched within (``_matching_tile``)."""

    name: str
    tokens: int
    r: int
    merged: tuple[str, ...]
    windows: tuple[int, int, int] | None = None
    unmerged: str | None = None
    tile: tuple[int, int] | None = None  # (h, w) tokens: its grid is matched within tiles this size


def _is_attention(node: Node) -> bool:
    return node.op == "call_function" and (node.target in SDPA or node.target in SOFTMAX)


def find_branches(block: AttentionBlock, others: set[Node]) -> list[Branch]:
    """The residual branches along ``block``'s stream: its attention's, then each later add
    onto the stream of a branch that reads it (through views of the stream: timm's SAM runs its
    MLP on the grid flattened; through dtype casts: Wan adds in float32), until a branch
    reaches another block's attention."""
    branches, stream, add, reads = [], block.stream, block.residual, block.stream
    while add is not None:
        operand = _stream_operand(add, stream)
        output = add.args[1] if add.args[0] is operand else add.args[0]
        # what lies between the stream it reads and the branch's output (another stream that joins
        # in, text in joint attention, is not the branch's: it may come from earlier blocks)
        nodes = frozenset((ancestors(output, stop=lambda n: n is reads) | {output}) & descendants(reads))
        if nodes & others:
            break
        kind = _kind(block, nodes)
        same = sum(b.kind == kind for b in branches)
        branches.append(Branch(kind, add, output, stream, nodes, reads, f"{kind} {same + 1}" if same else kind))
        stream, add = _view_of(add), None
        for user in _readers(stream):
            if user.op != "call_function" or user.target not in RESIDUAL_ADD or _stream_operand(user, stream) is None:
                continue
            other = next((a for a in user.args[:2] if isinstance(a, Node) and a is not _stream_operand(user, stream)), None)
            # a branch reads the stream it is added to, or, parallel to the branch before it, the
            # block's input (SD3.5's second attention)
            reads = stream if other is not None and stream in ancestors(other) else (
                block.stream if other is not None and block.stream in ancestors(other) else None)
            if reads is not None:
                add = user
                break
    return branches


def _kind(block: AttentionBlock, nodes: frozenset[Node]) -> str:
    """``attn`` for a branch holding a self-attention over the tokens it reads (keys computed
    from them), ``crossattn`` for one attending to another sequence, else ``mlp``."""
    attentions = [n for n in nodes if _is_attention(n)]
    if block.attention in nodes or any(_keys_of(n) in nodes for n in attentions):
        return "attn"
    return "crossattn" if attentions else "mlp"


def _keys_of(attention: Node) -> Node | None:
    if attention.target in SDPA:
        return attention.args[1]
    found = manual_attention(attention)
    return found.keys if found else None


def _casts_of(node: Node) -> list[Node]:
    """``node`` and the dtype casts and residual scales of it (chains of them)."""
    found = [node]
    for current in found:
        found += [u for u in current.users if u.op == "call_function" and (
            u.target in CASTS and u.args[0] is current or scales(u, current))]
    return found


def _readers(stream: Node) -> list[Node]:
    """Users of the stream or of a dtype cast of it."""
    return [u for n in _casts_of(stream) for u in n.users]


def _stream_operand(add: Node, stream: Node) -> Node | None:
    """The operand of ``add`` that is the stream, or a dtype cast of it."""
    casts = _casts_of(stream)
    return next((a for a in add.args[:2] if any(a is c for c in casts)), None)


def _view_of(node: Node) -> Node:
    """``node`` seen through a chain of views and dtype casts that are its only user."""
    while len(node.users) == 1 and next(iter(node.users)).target in VIEWS | CASTS:
        node = next(iter(node.users))
    return node


def _pooled_key_readers(block: AttentionBlock, branch: Branch, point: Node) -> set[Node]:
    """Readers of ``point`` (the branch's merge point) that reach the attention only through its
    keys and values, where those are fewer tokens than the queries: pooled from the token grid
    (PVT's and SegFormer's spatial-reduction attention, Twins' global sub-sampled attention).
    They keep reading every token, so the pooling sees the whole grid; only the queries merge,
    and each query's output is what it was (exact: attention is per query)."""
    attention = block.attention
    if attention.target in SDPA:
        queries, keys, values = attention.args[:3]
    elif (found := manual_attention(attention)) is not None:
        queries, keys, values = found.queries, found.keys, found.values
    else:
        return set()
    if shape_of(keys)[block.key_token_dim] >= shape_of(queries)[-2]:
        return set()
    kv = {keys, values} | ancestors(keys) | ancestors(values)
    return {u for u in point.users if u in branch.nodes and u in kv and u is not queries and u not in ancestors(queries)}


def _stored(gm: GraphModule, order: Node, index: int, tokens, grid: tuple, mode: str) -> Node:
    """The block's matching copied into buffers (``"store"``), or read from them in place of
    ``order`` (``"reuse"``); ``tokens``: the block's tokens as captured (batch, device)."""
    graph, names = gm.graph, []
    for j, tensor in enumerate(merge.matching_store(tokens.shape[0], *grid, device=tokens.device)):
        names.append(f"matching_{index}_{j}")
        gm.register_buffer(names[-1], tensor, persistent=False)
    with graph.inserting_before(order):
        held = [graph.get_attr(name) for name in names]
    with graph.inserting_after(order):
        if mode == "store":
            stored = graph.call_function(merge.remember, (order, *held))
            order.replace_all_uses_with(stored, delete_user_cb=lambda user: user is not stored)
            return stored
        recalled = graph.call_function(merge.recall, tuple(held))
    order.replace_all_uses_with(recalled)
    graph.erase_node(order)
    return recalled


def _merge_point(branch: Branch) -> Node:
    """Where the branch's tokens merge: the output of the norm it starts with (past dtype
    casts), as tomesd does, or the stream itself where it starts otherwise."""
    readers = [u for u in branch.reads.users if u in branch.nodes and reads_values(u, branch.reads)]
    while len(readers) == 1 and readers[0].op == "call_function" and readers[0].target in CASTS:
        # through casts (Wan's norms run in float32), which the residual add may share
        readers = [u for u in readers[0].users if u in branch.nodes and reads_values(u, readers[0])]
    if len(readers) == 1 and readers[0].op == "call_function" and readers[0].target in _NORMS:
        return readers[0]
    return branch.reads


_PARTITION = VIEWS | {aten.permute.default, aten.transpose.int, aten.contiguous.default, aten.clone.default,
                      aten.pad.default, aten.constant_pad_nd.default, aten.roll.default}  # (Swin shifts its grid first)


def _keeps_channels_last(node: Node) -> bool:
    """A permute or transpose that leaves the last axis (the channels) where it is."""
    ndim = len(shape_of(node.args[0]))
    if node.target == aten.permute.default:
        return list(node.args[1])[-1] % ndim == ndim - 1
    if node.target == aten.transpose.int:
        return ndim - 1 not in (node.args[1] % ndim, node.args[2] % ndim)
    return True


def _window_point(branch: Branch, point: Node) -> tuple[Node, int, int] | None:
    """Where an attention branch on a token grid holds its tokens cut into windows, and each
    window's h' x w': the last [windows * batch, h', w', channels] tensor that views, permutes
    and pads of ``point`` (its norm) make on the way to the attention, or [windows * batch,
    h' * w', channels] straight from a [batch, h/h', w/w', h', w', channels] partition (Florence-2's
    DaViT); None where it attends over the whole grid. It merges there, within each window, so
    windows keep equal token counts and merged tokens never cross a window border."""
    node, found, cut, channels = point, None, False, shape_of(point)[-1]
    while True:
        users = [u for u in node.users if u in branch.nodes]
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _PARTITION or (
                not _keeps_channels_last(users[0])):
            break
        before, node = shape_of(node), users[0]
        shape = shape_of(node)
        cut = cut or len(shape) != 4  # through a view such as [B, h/w', w', w/w', w', C]: a partition
        if cut and len(shape) == 4 and shape[-1] == channels:
            found = (node, shape[1], shape[2])
        elif (cut and len(shape) == 3 and len(before) == 6 and shape[-1] == channels and before[-1] == channels
              and shape[1] == before[3] * before[4] and shape[0] == math.prod(before[:3])):
            found = (node, before[3], before[4])
    return found


_OVER_GRID = {aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
              aten.avg_pool2d.default, aten.max_pool2d.default, aten.max_pool2d_with_indices.default,
              aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.adaptive_max_pool2d.default}


def _grid_use(regrid: Node, branch: Branch) -> str:
    """What a branch reshapes its merged tokens back to their grid for (why it needs them all)."""
    over = [n for n in descendants(regrid) if n in branch.nodes and n.op == "call_function" and n.target in _OVER_GRID]
    if over:
        return (f"for a convolution or pooling over the grid ({describe(over[0])}: a Mix-FFN's depthwise "
                "convolution as PVT v2's and Sana's, a convolutional position encoding, MViT's pooled queries), which "
                "needs every token")
    return ("to cut it into windows (attention within windows of a [batch, tokens, channels] sequence, Twins' "
            "locally-grouped attention): merging within windows is built for a [batch, h, w, channels] stream "
            "(Swin's, SAM's), not yet for a sequence")


_MATCHING_SHARE = 0.25  # of the multiply-adds merging saves, the most a grid's matching may cost


def _matching_tile(block: AttentionBlock, branches: list[Branch], h: int, w: int, r: int,
                   settings: BranchSettings) -> tuple[int, str | None]:
    """How a token grid's whole-grid branches match: (0, None) over the whole grid, (k, None)
    within tiles of k x k cells (``merge.grid_order``'s ``tile``), or (0, why) not at all.
    Matching scores every source against every dst it may pair with: O(tokens^2 x channels)
    over the whole grid (90G multiply-adds on SAM 2's 256 x 256 first stage, against the 3G
    that merging its MLP saves). It should cost at most ``_MATCHING_SHARE`` of what the ``r``
    merged tokens save in the branches' linear layers: over the whole grid where that holds,
    else within the largest tiles for which it does; where no tiling does (a prime number of
    cells per side), over the whole grid if that still costs less than it saves."""
    if not settings.grid_stream or not branches:
        return 0, None
    cells, channels = (h // settings.sy) * (w // settings.sx), shape_of(block.stream)[-1]
    saved = r * sum(math.prod(shape_of(n.args[1])) for b in branches for n in b.nodes
                    if n.op == "call_function" and n.target == aten.linear.default)
    budget = saved * _MATCHING_SHARE

    def cost(k: int) -> int:  # multiply-adds of matching with k x k cells per tile (0: the whole grid)
        return (h * w - cells) * (k * k if k else cells) * channels

    if cost(0) <= budget:
        return 0, None
    for k in range(math.isqrt(cells), 1, -1):
        if h % (k * settings.sy) == 0 and w % (k * settings.sx) == 0 and cost(k) <= budget:
            return k, None
    if cost(0) <= saved:
        return 0, None
    return 0, (f"{', '.join(b.key for b in branches)} not merged: matching its {h * w} tokens costs "
               f"{cost(0) / 1e6:.0f}M multiply-adds, more than the {saved / 1e6:.0f}M merging saves, and no "
               f"tiling of its grid brings that under {_MATCHING_SHARE:.0%} of it")


def _window_order(graph, window: tuple[Node, int, int], batch: int,
                  settings: BranchSettings) -> tuple[Node, tuple[int, int, int]] | None:
    """The matching within each h' x w' window of ``window`` [windows * batch, h', w', channels]
    or [windows * batch, h' * w', channels] (the same number of merges in each), and (windows,
    tokens in each, merged away in each); None where windows are too small to merge in (no
    whole cell, or ``ratio`` rounds to no token)."""
    window, h, w = window
    count = shape_of(window)[0]
    cells, wanted = (h // settings.sy) * (w // settings.sx), int(h * w * settings.ratio)
    if cells == 0 or wanted <= 0:
        return None
    r = min(wanted, h * w - cells)
    with graph.inserting_after(window):
        order = graph.call_function(merge.grid_order, (window, h, w, settings.sx, settings.sy, r, settings.rand))
    return order, (count // batch, h * w, r)


def _grid(block: AttentionBlock, settings: BranchSettings, protected: tuple[int, int] = (0, 0),
          batch: int | None = None) -> tuple[int, int]:
    """The block's token grid (h, w); (0, 0) where it is too far below full resolution to merge.
    A stream [batch, h, w, channels] is its own grid (SAM); with ``grid_stream``, a sequence
    [batch, lead + h * w + trail, channels] is a square grid between ``protected`` = (lead, trail)
    learned tokens (PiT's class token, YOLOS's detection tokens); otherwise a sequence [batch, tokens, channels] is the full-resolution
    ``settings.grid`` downsampled to its count (a UNet's levels). A channels-first stream, or one
    whose dim 1 is the inputs' ``batch`` (sequence first), has no grid read here."""
    shape = shape_of(block.stream)
    if settings.grid_stream and channels_first(block.stream):
        raise UnsupportedModelError(channels_first_why(block.stream))
    if settings.grid_stream and batch is not None and len(shape) == 3 and shape[1] == batch != shape[0]:
        raise UnsupportedModelError(
            f"its stream {('tokens', 'batch', *shape[2:])} is sequence first (nn.MultiheadAttention without "
            "batch_first, as OpenAI CLIP's); per-block merging reads [batch, tokens, channels]")
    if settings.grid_stream and len(shape) == 4:
        return shape[1], shape[2]
    if settings.grid_stream and len(shape) == 3 and not block.unrolled:  # a square grid flattened (PVT's)
        lead, trail = protected
        side = math.isqrt(shape[1] - lead - trail)
        if side * side != shape[1] - lead - trail:
            beside = " and ".join(([f"behind the {lead} learned tokens in front"] if lead else [])
                                  + ([f"before the {trail} learned tokens after it"] if trail else []))
            raise UnsupportedModelError(f"block {block.name}: its {shape[1]} tokens are no square h x w grid"
                                        + (f" {beside}" if beside else "")
                                        + ", and a sequence carries no other grid to match on")
        return side, side
    if len(shape) != 3 or settings.grid_stream:
        expected = "[batch, h, w, channels] or [batch, h * w, channels]" if settings.grid_stream else "[batch, tokens, channels]"
        why = f": {block.not_one_sequence}" if block.not_one_sequence else ""
        raise UnsupportedModelError(f"block {block.name}: tokens of shape {shape}; expected {expected}{why}")
    height, width = settings.grid
    tokens = shape[1] - sum(block.joined)  # the stream's own, where the block joins another stream in
    downsample = _downsample(block, settings)
    if downsample > settings.max_downsample:
        return 0, 0
    h, w = math.ceil(height / downsample), math.ceil(width / downsample)
    if h * w != tokens:
        raise UnsupportedModelError(f"block {block.name}: {tokens} tokens are not the {h} x {w} grid its downsampling implies")
    return h, w


def _protected(blocks: list[AttentionBlock]) -> dict[AttentionBlock, tuple[int, int]]:
    """Learned tokens before and after each block's sequence [batch, tokens, C] (a class token;
    YOLOS's detection tokens after the patches): those of the stream it starts from, or of the
    latest earlier block of as many tokens whose output it reads (a stream carries them from
    block to block; TNT runs two streams)."""
    found: dict[AttentionBlock, tuple[int, int]] = {}
    for i, block in enumerate(blocks):
        stream = block.stream
        if len(shape_of(stream)) != 3:
            continue
        try:
            lead = count_protected_tokens(stream, appended=True)
        except UnsupportedModelError:
            lead = 0
        trail = count_appended_tokens(stream)
        if lead and trail:
            found[block] = (lead, trail)
            continue
        upstream = ancestors(stream) | {stream}
        before = next((b for b in reversed(blocks[:i]) if b.residual in upstream
                       and shape_of(b.stream)[1:2] == shape_of(stream)[1:2]), None)
        carried = found.get(before, (0, 0))
        lead, trail = lead or carried[0], trail or carried[1]
        if not lead and stream.op == "call_function" and stream.target == aten.cat.default and (
                stream.args[1] if len(stream.args) > 1 else 0) % 3 == 1:
            # a stage joins its leading tokens back in front (PiT: the class token, projected, before the
            # pooled grid): as many as an earlier stage kept apart
            joined = shape_of(stream.args[0][0])[1]
            lead = joined if any(found.get(b, (0,))[0] == joined for b in blocks[:i] if b.residual in upstream) else 0
        found[block] = (lead, trail)
    return found


def _downsample(block: AttentionBlock, settings: BranchSettings) -> int:
    """How many times below full resolution the block's tokens are (1 for a grid stream)."""
    if settings.grid_stream:
        return 1
    # at least 1: a stream holding more tokens than the grid (FLUX Kontext's reference image) is
    # then refused by ``_grid`` as not the grid
    return max(1, math.ceil(math.sqrt(settings.grid[0] * settings.grid[1] // (shape_of(block.stream)[1] - sum(block.joined)))))


def _why_nothing_merges(graph, blocks: list[AttentionBlock], plans: list, settings: BranchSettings) -> str:
    """Why no block merged, and what would make one merge."""
    if plans:  # every block that would merge matches at a cost above what it saves
        return plans[0][1].unmerged
    if odd := first_unrecognised(graph):  # the blocks found are not the model's main attention
        return f"no block found has tokens to merge, and {odd}"
    if not settings.grid_stream and all(_downsample(b, settings) > settings.max_downsample for b in blocks):
        lowest = min(_downsample(b, settings) for b in blocks)
        return (f"every attention block is at least {lowest}x below full resolution (SDXL's first level has no "
                f"attention), beyond max_downsample={settings.max_downsample}; max_downsample={lowest} would merge")
    if not any(b.kind in settings.kinds for block in blocks for b in find_branches(block, set())):
        return f"no block has a branch of the kinds chosen ({', '.join(sorted(settings.kinds))})"
    return f"ratio={settings.ratio} of each block's tokens rounds down to no token"


def apply_branch_tome(gm: GraphModule, settings: BranchSettings, *, prop_attn: bool | str,
                      matchings: str | None = None) -> tuple[tuple[BranchPlan, ...], str | None]:
    """Rewrite ``gm`` in place; its outputs keep their shapes (the stream is never merged).
    Returns the merging blocks' plans and, where no block merges, why not. ``matchings``:
    ``"store"``, each block's matching is also copied into buffers of ``gm``
    (``matching_<i>_<j>``); ``"reuse"``, read from them instead of computed (match reuse
    across denoising steps: give both graphs the same buffers)."""
    FunctionalWrites()(gm)
    if "attn" in settings.kinds:
        RelativePositionBias()(gm)
    stage_changes = []
    blocks = find_attention_blocks(gm.graph, stage_changes=stage_changes, sequential=False)
    if not blocks:
        if stage_changes:
            odd = first_unrecognised(gm.graph)
            why = (f"every attention recognised changes the token grid or adds to a subset of its tokens "
                   f"({len(stage_changes)}: {stage_changes[0].reason})" + (f"; {odd}" if odd else ""))
        else:
            why = why_no_blocks(gm.graph)
        raise UnsupportedModelError(f"no attention block was found: {why}")
    graph, seeds, closing, plans = gm.graph, {}, [], []
    batch = next((shape_of(n)[0] for n in graph.nodes if n.op == "placeholder" and "val" in n.meta
                  and isinstance(n.meta["val"], torch.Tensor) and n.meta["val"].dim()), None)
    attentions = {b.attention for b in blocks}
    protected = _protected(blocks) if settings.grid_stream else {}
    for block in blocks:
        if (block.name, EVERY_BRANCH) in settings.skip:
            continue
        try:
            h, w = _grid(block, settings, protected.get(block, (0, 0)), batch)
        except UnsupportedModelError as why:
            if not settings.grid_stream:
                raise
            # (each block reads its own grid: one that has none may leave the others to merge)
            raise BranchRefused(str(why), (block.name, EVERY_BRANCH)) from None
        tokens = h * w
        r = int(tokens * settings.ratio)
        chosen = [b for b in find_branches(block, attentions - {block.attention})
                  if b.kind in settings.kinds and (block.name, b.key) not in settings.skip]
        if h == 0 or r <= 0 or not chosen or (h // settings.sy) * (w // settings.sx) == 0:
            continue
        # a token grid's attention may run per window or with heads folded in the batch: its branch
        # merges within what it attends over, and the token-flow analysis proves what follows
        if block.not_one_sequence and not settings.grid_stream and any(b.kind == "attn" for b in chosen):
            raise BranchRefused(f"block {block.name}: its attention branch cannot merge: {block.not_one_sequence}",
                                (block.name, "attn"))
        unrecognised = next((found for b in chosen if b.kind == "attn" and (found := pair_grid(b.nodes))), None)
        if unrecognised is not None:
            raise BranchRefused(
                f"block {block.name}: its attention cannot merge: {describe(unrecognised)} views its logits as a "
                "[batch, h, w, kh, kw] grid of query and key positions, a relative-position bias in a form tome_fx "
                "does not recognise (it reads the einsum form of segment_anything, HF SamModel and timm samvit); "
                "merge the other branches alone (SAM: attn=False)", (block.name, "attn"))
        if block.why_not_joined and block.joined == (0, 0) and not any(protected.get(block, ())):
            raise UnsupportedModelError(f"block {block.name}: {block.why_not_joined}, so it cannot merge")
        r = min(r, tokens - (h // settings.sy) * (w // settings.sx))
        windows_at = {b: _window_point(b, _merge_point(b)) for b in chosen if settings.grid_stream and b.kind == "attn"}
        tile, costly = _matching_tile(block, [b for b in chosen if windows_at.get(b) is None], h, w, r, settings)
        if costly:  # (a token grid's branches over the whole grid; those per window match per window)
            chosen = [b for b in chosen if windows_at.get(b) is not None]
            if not chosen:
                plans.append((block, BranchPlan(block.name, tokens, 0, (), unmerged=costly)))
                continue
        lead, trail = block.joined
        own = block.own_input if block.own_input is not None else block.stream  # FLUX's single blocks: its piece
        anchor = block.stream
        if any(protected.get(block, ())):  # learned tokens before and after stay out, as joined ones do
            lead, trail = protected[block]
            count = shape_of(block.stream)[1]
            with graph.inserting_after(block.stream):
                own = anchor = graph.call_function(aten.slice.Tensor, (block.stream, 1, lead, count - trail))
            own.meta["val"] = block.stream.meta["val"][:, lead:count - trail]
        with graph.inserting_after(anchor):
            order = graph.call_function(merge.grid_order, (own, h, w, settings.sx, settings.sy, r, settings.rand, tile))
        if matchings is not None:
            order = _stored(gm, order, len(plans), own.meta["val"], (h, w, settings.sx, settings.sy, r, tile), matchings)
        windows, merging = None, []
        for branch in chosen:
            point = _merge_point(branch)
            point_shape, stream_shape = shape_of(point), shape_of(block.stream)
            window = windows_at.get(branch)
            if window is not None:  # merge within each window the attention runs over
                windowed = _window_order(graph, window, stream_shape[0], settings)
                if windowed is None:
                    continue  # (the plan leaves this branch out)
                point, point_shape = window[0], shape_of(window[0])
                branch_order, windows = windowed
            elif len(point_shape) not in (3, 4) or (point_shape[0], point_shape[-1], math.prod(point_shape[1:-1])) != (
                stream_shape[0], stream_shape[-1], tokens + lead + trail
            ):
                raise BranchRefused(
                    f"block {block.name}: its {branch.key} branch starts from shape {point_shape}, not the block's "
                    f"{h} x {w} tokens laid out [batch, tokens, channels] or [batch, h, w, channels]",
                    (block.name, branch.key))
            else:
                branch_order = order
            with graph.inserting_after(branch_order if point is block.stream or window is not None else point):
                step = graph.call_function(merge.branch_merge, (point, branch_order, lead, trail))
            with graph.inserting_after(step):
                merged = graph.call_function(operator.getitem, (step, 0))
            merged.meta["val"] = point.meta["val"]  # the analysis reads shapes as captured
            with graph.inserting_after(merged):
                size = graph.call_function(operator.getitem, (step, 1))
            with graph.inserting_after(size):
                positions = graph.call_function(operator.getitem, (step, 2))
            keep = _pooled_key_readers(block, branch, point) if branch.kind == "attn" and window is None else set()
            point.replace_all_uses_with(merged, delete_user_cb=lambda user: user in branch.nodes and user is not step
                                        and user not in keep)
            with graph.inserting_before(branch.add):
                restored = graph.call_function(merge.branch_unmerge, (branch.output, positions, branch.stream, lead, trail))
            restored.meta["val"] = branch.output.meta.get("val")
            branch.add.replace_input_with(branch.output, restored)
            roles = (BATCH, TOKEN, None) if len(point_shape) == 3 else (BATCH, TOKEN, GRID_INNER, None)
            seeds[merged] = Layout(roles, size=size, positions=positions, lead=lead, trail=trail)
            closing.append((block, branch, restored))
            merging.append(branch.key)
        if not order.users and matchings is None:  # only windows merge, or none
            graph.erase_node(order)
        if merging:
            plans.append((block, BranchPlan(block.name, tokens, r, tuple(merging), windows, unmerged=costly,
                                            tile=(tile * settings.sy, tile * settings.sx) if tile else None)))

    try:
        flow = analyze_token_flow(graph, seeds, protected=0, key_masks=frozenset())  # (no mask is given to the merges)
    except RefusedAt as why:
        holder = next(((block, branch) for block, branch, _ in closing if why.node in branch.nodes), None)
        if holder is None:
            raise
        raise BranchRefused(str(why), (holder[0].name, holder[1].key)) from None
    for block, branch, restored in closing:
        regridded = [n for n in flow.unmerges if n in branch.nodes]
        if (regridded and branch.kind == "attn" and branch.output not in flow.layouts
                and all(block.attention in ancestors(n) for n in regridded)):
            # its attention ran over merged tokens, whose output un-merges where it is reshaped back
            # to the grid (SAM: to the heads' grids, or out of the windows): no un-merge left to add
            branch.add.replace_input_with(restored, branch.output)
            graph.erase_node(restored)
            continue
        if regridded:
            raise BranchRefused(
                f"{describe(branch.add)}: the {branch.key} branch reshapes its tokens back to their grid "
                f"({describe(regridded[0])}) {_grid_use(regridded[0], branch)}: leave that branch unmerged",
                (block.name, branch.key))
        layout = flow.layouts.get(branch.output)
        if (layout is None or layout.roles not in ((BATCH, TOKEN, None), (BATCH, TOKEN, GRID_INNER, None))
                or is_weights(layout.roles[1]) or layout.positions is not restored.args[1]
                or (layout.lead, layout.trail) != tuple(restored.args[3:5])
                or shape_of(branch.output) != shape_of(branch.stream)):
            raise BranchRefused(
                f"{describe(branch.add)}: the {branch.key} branch does not return its merged tokens laid out "
                "like the stream, [batch, tokens, channels] or [batch, h, w, channels], so it cannot be "
                "un-merged before the residual add", (block.name, branch.key))
    if flow.outputs:
        raise UnsupportedModelError(f"{describe(flow.outputs[0])}: merged tokens leave their branch")
    attended = flow.attended
    for block, plan in plans:
        if "attn" in plan.merged and block.attention not in attended and TOKEN not in getattr(
                flow.layouts.get(block.output), "roles", ()):
            # (where it is not over the merged tokens, its output must still hold them: the queries
            # alone merged over pooled keys, or channels attending to channels as in DaViT)
            raise BranchRefused(f"block {block.name}: could not prove that its attention runs over its tokens",
                                (block.name, "attn"))
    RepairShapes(flow)(gm)
    RestageTables(flow, settings.rope)(gm)
    RestageRelativePositions(flow, settings.rel_pos)(gm)
    RestagePairTables(flow, settings.rel_pos)(gm)
    if form := form_of(prop_attn):
        ProportionalAttention(flow, form)(gm)
    WeightedReductions(flow)(gm)
    Unmerge(flow, outputs=False)(gm)
    graph.lint()
    gm.recompile()
    kept = tuple(BranchPlan(change.name, 0, 0, (), unmerged=(
        "its residual adds to some of its input's tokens (a class token alone, or the patches without it), not the "
        "whole stream" if change.subset else "its block changes the token grid (a stage change: the residual is a "
        "projection or pooling of the block's input)")) for change in stage_changes)
    merging = [plan for _, plan in plans if plan.merged]
    return tuple(plan for _, plan in plans) + kept, None if merging else _why_nothing_merges(graph, blocks, plans, settings)
