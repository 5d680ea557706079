"""The merge math of Token Merging as pure tensor functions.

Plain ``gather``/``scatter_add``/``argsort`` code, so ``torch.compile`` traces and
fuses it like the rest of the model. Tokens are laid out ``[batch, tokens, ...]``.
The first ``protected`` tokens (class, distillation, register tokens) never merge
and keep their places at the front; the order of the other tokens is
``[unmerged set-A tokens by original position, set-B tokens]``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


EVEN, ODD = slice(0, None, 2), slice(1, None, 2)


class Matching(NamedTuple):
    """Result of a bipartite matching between token sets A and B (``a``, ``b``: slices or
    index tensors over the tokens; ToMe's are the even and odd positions)."""

    unm_idx: Tensor  # [B, Na - r] set-A tokens that stay, ascending
    src_idx: Tensor  # [B, r] set-A tokens merged away
    dst_idx: Tensor  # [B, r] set-B token each of them merges into
    protected: int
    a: slice | Tensor = EVEN  # (index tensors: [N] shared by the batch, or [B, N] per sample)
    b: slice | Tensor = ODD
    keep_dst: bool = False  # a merged token keeps its dst's value (pruning the source), sizes still add


def max_merges(tokens: int, protected: int) -> int:
    """Largest r a block of ``tokens`` tokens with ``protected`` fixed ones allows."""
    return max(tokens - protected, 0) // 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sizes and weighted sums are kept in at least float32 (bf16 cannot count past 256)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.promote_types(dtype, torch.float32)


def bipartite_soft_matching(
    metric: Tensor, r: int, protected: int = 0, compatible: Tensor | None = None, first: Tensor | None = None
) -> Matching:
    """Pair each even-position token (set A) with its most similar odd-position token (set B)
    by cosine similarity of ``metric`` [B, N, C]; the ``r`` best pairs are chosen to merge.
    Optional [B, Na, Nb] bool masks: ``compatible`` rules out the pairs that are False;
    ``first`` pairs rank above every similarity (padding merges before real tokens do)."""
    tokens = metric.shape[1]
    if not 0 <= r <= max_merges(tokens, protected):
        raise ValueError(f"r={r} merges are impossible with {tokens} tokens, {protected} protected")
    if tokens < 2:  # nothing to pair (then r == 0)
        none = torch.zeros(metric.shape[0], 0, dtype=torch.long, device=metric.device)
        keep = torch.arange(tokens, device=metric.device).expand(metric.shape[0], tokens)
        return Matching(keep, none, none, protected)
    if metric.requires_grad:
        metric = metric.detach()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)
    scores = torch.bmm(metric[:, ::2], metric[:, 1::2].transpose(1, 2))  # not matmul: 3 fewer ops
    # protected set-A tokens never leave; protected set-B tokens never receive
    if protected > 0:
        scores[:, : (protected + 1) // 2].fill_(-torch.inf)
    if protected > 1:
        scores[:, :, : protected // 2].fill_(-torch.inf)
    if first is not None:
        scores = scores.masked_fill(first, 2.0)  # cosine similarities are at most 1
    if compatible is not None:
        scores = scores.masked_fill(~compatible, -torch.inf)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = descending_order(node_max)
    src_idx = edge_idx[:, :r]
    if compatible is not None:  # a set-A token with no compatible partner would be merged by force
        torch._assert_async(
            (node_max.gather(1, src_idx) > -torch.inf).all(),
            f"ToMe: r={r} merges of {tokens} tokens need {r} pairs the attention mask treats alike, and this "
            "batch's mask leaves fewer (few real tokens beside padding); use a smaller r or pad to a longer length",
        )
    return Matching(edge_idx[:, r:].sort(dim=-1).values, src_idx, node_idx.gather(1, src_idx), protected)


def descending_order(values: Tensor) -> Tensor:
    """Indices that sort ``values`` [B, N] in descending order, ties by position:
    ``argsort(descending=True, stable=True)``. ONNX has no stable sort, so under
    ``torch.export`` the order is built from comparisons instead: a value's rank is the
    count of values ahead of it (O(N^2), as the scores are)."""
    if not torch.compiler.is_exporting():
        return values.argsort(dim=-1, descending=True, stable=True)
    index = torch.arange(values.shape[-1], device=values.device)
    other, this = values[..., None, :], values[..., :, None]
    rank = ((other > this) | ((other == this) & (index < index[:, None]))).sum(-1)
    return torch.zeros_like(rank).scatter(-1, rank, index.expand_as(rank))


def energy_matching(metric: Tensor, r: int, protected: int = 0, compatible: Tensor | None = None,
                    first: Tensor | None = None, depth: float = 0.0) -> Matching:
    """PiToMe's matching (Tran et al., NeurIPS 2024): a token's energy is the mean over all
    tokens of ELU(cosine - margin), high in a large cluster of alike tokens and low for an
    isolated, informative one; the ``2r`` most energetic tokens are split alternately (in
    energy order) into sources and dsts, and every source merges into its most similar dst;
    the rest are kept. The margin falls with ``depth`` (the block's index over the block
    count) from 0.9 to 0, as PiToMe's ViT code sets it. Masks are [B, N, N] over all tokens
    (``mask_pairs`` with ``ALL``): ``first`` puts padding first, in pairs (an odd one out last:
    no padding is left for it), and ``compatible`` rules pairs out and limits each token's
    energy to the tokens it may pair with."""
    batch, tokens, _ = metric.shape
    if not 0 <= r <= max_merges(tokens, protected):
        raise ValueError(f"r={r} merges are impossible with {tokens} tokens, {protected} protected")
    arange = torch.arange(tokens, device=metric.device)
    if r == 0:
        none = arange[:0].expand(batch, 0)
        return Matching(arange.expand(batch, tokens), none, none, 0, arange, none)
    metric = metric.detach()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)
    metric = metric[:, protected:]
    similarity = metric @ metric.transpose(1, 2)
    terms = torch.nn.functional.elu(similarity - 0.9 * (1 - depth))
    if compatible is None:
        energy = terms.mean(-1)
    else:  # over the tokens the mask treats alike: padding's content never moves a real token's energy
        alike = compatible[:, protected:, protected:]
        count = alike.sum(-1)
        energy = (terms * alike).sum(-1) / count.clamp_min(1)
        energy = energy.masked_fill(count <= 1, -torch.inf)  # alike to none but itself: never merges
    if first is not None:  # padding (inert) merges first, in pairs; an odd one out never merges
        dead = first.diagonal(dim1=1, dim2=2)[:, protected:]
        rank = dead.cumsum(-1)
        paired = dead & (rank <= rank[:, -1:] // 2 * 2)
        energy = energy.masked_fill(paired, torch.inf).masked_fill(dead & ~paired, -torch.inf)
    order = descending_order(energy)
    src, dst = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]
    scores = _take(similarity, src).gather(2, dst[:, None, :].expand(-1, r, -1))  # [B, r sources, r dsts]
    if compatible is not None:
        pairs = _take(compatible[:, protected:, protected:], src).gather(2, dst[:, None, :].expand(-1, r, -1))
        scores = scores.masked_fill(~pairs, -torch.inf)
        torch._assert_async((scores.amax(-1) > -torch.inf).all(),
                            f"PiToMe: among the {2 * r} tokens chosen to merge, a source has no dst the attention "
                            "mask treats alike (the mask splits the tokens into many small groups); merge fewer "
                            "tokens per block or use method='tome', which merges only pairs the mask allows")
    kept = order[:, 2 * r :].sort(dim=-1).values + protected
    a = torch.cat([arange[:protected].expand(batch, -1), kept, src + protected], dim=1)
    unmerged = tokens - 2 * r
    return Matching(arange[:unmerged].expand(batch, -1), arange[unmerged : unmerged + r].expand(batch, -1),
                    scores.argmax(-1), 0, a, dst + protected)


def prune_merge_matching(metric: Tensor, r: int, protected: int = 0, compatible: Tensor | None = None,
                         first: Tensor | None = None, depth: float = 0.0) -> Matching:
    """ToMe's matching, pruning in the first half of the blocks (``depth`` < 0.5: a merged
    source is dropped and its dst keeps its value, only their sizes add) and merging (the
    size-weighted average) after it: ToFu's split (Kim et al., WACV 2024), with ToMe's
    average in place of its norm-preserving interpolation."""
    return bipartite_soft_matching(metric, r, protected, compatible, first)._replace(keep_dst=depth < 0.5)


ALL = slice(None)


class Policy(NamedTuple):
    """A merge policy: ``match(metric, r, protected, compatible, first, depth)`` gives the
    ``Matching`` that ``merge_matched`` carries out; its pair masks cover ``sets`` (A, B)."""

    match: Callable[..., Matching]
    sets: tuple[slice, slice]
    exact: str  # what it keeps exact: the oracle each is tested by

    @property
    def every_pair(self) -> bool:
        """Whether it scores every pair of tokens (the cost model counts its matching so)."""
        return self.sets == (ALL, ALL)


POLICIES = {
    "tome": Policy(lambda metric, r, protected, compatible, first, depth: bipartite_soft_matching(
        metric, r, protected, compatible, first), (EVEN, ODD),
        "duplicate tokens merge first (cosine 1 ranks first), averaged: outputs unchanged"),
    "pitome": Policy(energy_matching, (ALL, ALL),
                     "duplicates merge exactly where they are the 2r most energetic tokens (every token has a "
                     "twin, or r no larger than the pairs that outrank every lone token): each source merges "
                     "into its most similar dst, even when that is not its twin"),
    "prune_merge": Policy(prune_merge_matching, (EVEN, ODD),
                          "as ToMe: a pruned duplicate's dst already holds its value, and sizes still add"),
}


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` [B, M] of ``t`` [B, N, ...] (advanced indexing: one pass, faster than an
    expanded ``gather`` on CPU)."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], idx]


def _protected_first(a: Tensor, b: Tensor, protected: int) -> Tensor:
    """Sets A and B joined as ``[protected tokens in original order, rest of A, rest of B]``
    (protected token i is A's i // 2 for even i, B's for odd i)."""
    if protected < 2:  # at most one protected token, A's first: A is already in front
        return torch.cat([a, b], 1)
    front = [(a, b)[i % 2][:, i // 2 : i // 2 + 1] for i in range(protected)]
    return torch.cat([*front, a[:, (protected + 1) // 2 :], b[:, protected // 2 :]], 1)


def merge_matched(m: Matching, x: Tensor, size: Tensor, index: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Merge ``x`` [B, N, C] as ``m`` says, each merged token the size-weighted average of
    its tokens (``size`` [B, N] counts patches per token): ``(merged x, new sizes, new index
    of every old token)``, the tokens ordered ``[protected, unmerged set A, set B]``;
    ``index=False``: None for the index, where nothing follows the tokens' positions.

    Computed in the sets' own layout (views for ToMe's even/odd sets), so a merge costs few
    ops: eager latency at small batch is set by their count. A receiving token b moves
    toward each token i merged into it by i's share of the new size, b + sum_i s_i (x_i - b)
    / (s_b + sum_i s_i), which is their weighted mean; every other token is copied bit for bit."""
    acc, p = accumulation_dtype(x.dtype), m.protected
    xa, xb = _select(x, m.a), _select(x, m.b)
    sa, sb = _to(_select(size, m.a), acc), _to(_select(size, m.b), acc)
    src_size = sa.gather(1, m.src_idx)
    sb = sb.scatter_add(1, m.dst_idx, src_size)
    # rows read by advanced indexing, not gathers of expanded indices (fewer ops, faster on
    # CPU, and ONNX Runtime would materialize the [B, r, C] indices); but added by
    # scatter_add, as index_put(accumulate=True) is 2.5x slower on CPU
    batch = torch.arange(x.shape[0], device=x.device)[:, None]
    if not m.keep_dst:
        share = (src_size / sb.gather(1, m.dst_idx))[..., None]
        step = (_to(xa[batch, m.src_idx], acc) - _to(xb[batch, m.dst_idx], acc)) * share
        dst = m.dst_idx[..., None].expand(-1, -1, x.shape[2])
        xb = _to(_to(xb, acc).scatter_add(1, dst, step), x.dtype)
    merged = _protected_first(xa[batch, m.unm_idx], xb, p)
    new_size = _protected_first(sa.gather(1, m.unm_idx), sb, p)
    return merged, new_size, new_index(m, x.shape[1], xb.shape[1]) if index else None


def new_index(m: Matching, tokens: int, kept_b: int) -> Tensor:
    """[B, tokens]: where each of the ``tokens`` tokens before merge ``m`` is after it: set A
    by rank among the unmerged (or its partner's place), set B after them."""
    batch, kept_a = m.unm_idx.shape
    device = m.unm_idx.device
    rank = torch.arange(kept_a, device=device)
    b_index = torch.arange(kept_a, kept_a + kept_b, device=device)
    if m.protected > 1:  # the first p // 2 set-B tokens sit among the protected ones in front
        half = m.protected // 2
        rank = rank + rank.clamp_max(half)
        b_index = torch.where(b_index < kept_a + half, 2 * (b_index - kept_a) + 1, b_index)
    index = torch.empty(batch, tokens, dtype=torch.long, device=device)
    if isinstance(m.a, slice):  # ToMe's sets are strided views of the index: filled in place
        index[:, m.b].copy_(b_index)
        a_index = index[:, m.a]
    else:  # index sets: filled apart, then written
        _put(index, m.b, b_index.expand(batch, -1))
        a_index = index.new_empty(batch, m.unm_idx.shape[1] + m.src_idx.shape[1])
    a_index.scatter_(1, m.unm_idx, rank.expand(batch, -1)).scatter_(1, m.src_idx, b_index[m.dst_idx])
    if not isinstance(m.a, slice):
        _put(index, m.a, a_index)
    return index


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call where it is already that dtype (one op fewer per use)."""
    return t if t.dtype == dtype else t.to(dtype)


def _select(t: Tensor, tokens: slice | Tensor) -> Tensor:
    """Tokens ``tokens`` of ``t`` [B, N, ...]: a slice or [M] index shared by the batch, or [B, M]."""
    return _take(t, tokens) if isinstance(tokens, Tensor) and tokens.dim() == 2 else t[:, tokens]


def _put(t: Tensor, tokens: Tensor, values: Tensor) -> None:
    """``t[:, tokens] = values`` [B, M] in place, for ``tokens`` [M] or [B, M]."""
    if tokens.dim() == 2:
        t.scatter_(1, tokens, values)
    else:
        t[:, tokens] = values


def initial_size(x: Tensor) -> Tensor:
    """Every token starts as one patch: ones of shape [B, N]."""
    return torch.ones(x.shape[:2], dtype=accumulation_dtype(x.dtype), device=x.device)


def initial_positions(x: Tensor) -> Tensor:
    """Original token i starts at position i: [B, N] indices."""
    return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)


def source_map(positions: Tensor, tokens: int) -> Tensor:
    """Source map [B, N, N0] from ``positions``: row i marks the original tokens token i holds."""
    return torch.nn.functional.one_hot(positions, tokens).transpose(1, 2).float()


def unmerge(
    x: Tensor, positions: Tensor, batch_dim: int, token_dim: int, start: int = 0, split: Tensor | None = None,
    inner: int = 1,
) -> Tensor:
    """Copy each token back to the original positions it holds (tokens from ``start`` on):
    the inverse layout of the merges, each original token taking its group's value. With
    ``split`` (the sizes, for an axis of weights over tokens) each takes its share instead:
    the group's weight divided by its size. ``inner`` > 1: the batch dim folds ``inner``
    entries inside each sample (heads)."""
    if split is not None:
        bias = size_bias(split, x.dim(), batch_dim, token_dim, start, inner)
        x = (x.to(accumulation_dtype(x.dtype)) / bias).to(x.dtype)
    return reorder(x, positions.repeat_interleave(inner, 0) if inner > 1 else positions, batch_dim, token_dim, start)


def first_patches(positions: Tensor, tokens: int) -> Tensor:
    """[B, tokens]: the first original token (in raster order) each current token holds."""
    originals = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
    first = torch.full((positions.shape[0], tokens), positions.shape[1], dtype=positions.dtype, device=positions.device)
    return first.scatter_reduce(1, positions, originals, "amin")


def raster_order(positions: Tensor, size: Tensor) -> Tensor:
    """[B, N]: the current tokens sorted by their first original token (the raster order of
    each one's first patch), a stable order for merged outputs whatever the matching did.
    Protected tokens hold themselves and sit in front, so they keep their places."""
    return first_patches(positions, size.shape[1]).argsort(1)


def reorder(x: Tensor, order: Tensor, batch_dim: int, token_dim: int, start: int = 0) -> Tensor:
    """``x``'s tokens (those from ``start`` on) taken at the indices ``order`` [B, M]: a
    ``raster_order``, or an un-merge's ``positions``."""
    moved = _take(x.movedim((batch_dim, token_dim), (0, 1)), order[:, start:] - start)
    return moved.movedim((0, 1), (batch_dim, token_dim))


def reordered_state(size: Tensor, positions: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """Sizes and positions that go with tokens put in ``order``."""
    return size.gather(1, order), order.argsort(1).gather(1, positions)


def merge_down(x: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` [B, N, C] merged to ``keep`` tokens by rounds of ToMe's matching on the tokens
    themselves (each round merges at most half), each merged token the average of those it
    holds: ``(merged x in raster order, sizes [B, keep], positions [B, N])``. For tokens no
    attention follows (a VLM tower's output), where there are no keys to match on."""
    size, positions = initial_size(x), initial_positions(x)
    while x.shape[1] > keep:
        matching = bipartite_soft_matching(x, min(x.shape[1] - keep, max_merges(x.shape[1], 0)))
        x, size, index = merge_matched(matching, x, size)
        positions = index.gather(1, positions)
    order = raster_order(positions, size)
    return (reorder(x, order, 0, 1), *reordered_state(size, positions, order))


def key_metric(keys: Tensor, token_dim: int) -> Tensor:
    """Matching metric from attention keys [B, heads, ..] with tokens on ``token_dim``:
    the keys averaged over heads, as [B, N, C]."""
    if token_dim % keys.dim() != 2:
        keys = keys.movedim(token_dim, 2)
    return keys.mean(dim=1)


def representatives(positions: Tensor, tokens: int) -> Tensor:
    """[B, N]: for each current token, one original token it holds."""
    originals = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
    return torch.zeros(positions.shape[0], tokens, dtype=positions.dtype, device=positions.device).scatter(
        1, positions, originals
    )


def restage_mask(mask: Tensor, positions: Tensor, tokens: int) -> Tensor:
    """An attention mask over the original tokens (up to 4-d, ``[.., Q, N0]`` with Q = N0 or 1)
    as a [B, H, Q', tokens] mask over the current tokens, read at one original token of each
    group. Exact because merges only join tokens whose mask rows and columns are equal
    (``mask_pairs``)."""
    rep = representatives(positions, tokens)
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    mask = mask.expand(positions.shape[0], -1, -1, -1)
    batch, heads, queries, _ = mask.shape
    if queries != 1:
        mask = mask.gather(2, rep[:, None, :, None].expand(batch, heads, tokens, mask.shape[-1]))
        queries = tokens
    return mask.gather(3, rep[:, None, None, :].expand(batch, heads, queries, tokens))


def restage_key_mask(mask: Tensor, positions: Tensor, tokens: int, inner: int = 1) -> Tensor:
    """A mask over the original tokens as keys, ``[B * inner or 1, .., N0]``, read at one
    original token of each current group: ``[B * inner, .., tokens]``."""
    rep = representatives(positions, tokens).repeat_interleave(inner, 0)
    mask = mask.expand(rep.shape[0], *mask.shape[1:])
    return mask.gather(-1, rep.reshape(rep.shape[0], *(1,) * (mask.dim() - 2), tokens).expand(*mask.shape[:-1], tokens))


def restage_table(table: Tensor, positions: Tensor, size: Tensor, ndim: int, batch_dim: int, token_dim: int,
                  start: int, rule: str, lead: int = 0, trail: int = 0, inner: int = 1) -> Tensor:
    """A table of one row per original token from ``start`` on (rotary cos/sin), laid out to
    broadcast against an ``ndim``-dim tensor, as one row per current token: [B, ..] with the
    batch on ``batch_dim`` and the tokens on ``token_dim``. ``rule="mean"``: the size-weighted
    mean of each group's rows; ``"representative"``: the row of each group's first token.
    ``lead``/``trail``: rows of another stream's tokens joined before/after (text), kept.
    ``inner`` > 1: the batch dim folds that many entries (heads) inside each sample."""
    t = table.reshape((1,) * (ndim - table.dim()) + tuple(table.shape)).movedim((batch_dim, token_dim), (0, 1))
    rest = t.shape[2:]
    t = t.reshape(1, t.shape[1], -1)
    before, t, after = _joined_parts(t, lead, trail)
    batch, tokens = size.shape
    index = positions[:, start:] - start  # [B, N0 - start]: the group holding each original token
    if rule == "mean":
        acc = accumulation_dtype(t.dtype)
        sums = torch.zeros(batch, tokens - start, t.shape[2], dtype=acc, device=t.device)
        sums = sums.scatter_add(1, index[..., None].expand(-1, -1, t.shape[2]), t.to(acc).expand(batch, -1, -1))
        rows = (sums / size[:, start:, None].to(acc)).to(t.dtype)
    elif rule == "representative":
        first = first_patches(index, tokens - start)
        rows = t.expand(batch, -1, -1).gather(1, first[..., None].expand(-1, -1, t.shape[2]))
    else:
        raise ValueError(f"rope rule is 'mean' or 'representative', not {rule!r}")
    if lead or trail:
        rows = torch.cat([before.expand(batch, -1, -1), rows, after.expand(batch, -1, -1)], dim=1)
    if inner > 1:
        rows, batch = rows.repeat_interleave(inner, 0), batch * inner
    return rows.reshape(batch, lead + tokens - start + trail, *rest).movedim((0, 1), (batch_dim, token_dim))


REL_POS_RULES = ("mean", "representative")


def rel_pos_bias(q: Tensor, table_h: Tensor, table_w: Tensor, h: int, w: int) -> Tensor:
    """Decomposed relative positions (MViTv2, SAM's encoder): the bias [B, h*w, kh*kw] that
    queries ``q`` [B, h*w, C] on an ``h`` x ``w`` grid add to their logits, ``q . table_h[row(q),
    row(k)] + q . table_w[col(q), col(k)]`` (tables [h, kh, C] and [w, kw, C])."""
    grid = q.reshape(q.shape[0], h, w, q.shape[-1])
    rows = torch.einsum("bhwc,hkc->bhwk", grid, table_h)
    cols = torch.einsum("bhwc,wkc->bhwk", grid, table_w)
    return (rows[..., :, None] + cols[..., None, :]).reshape(q.shape[0], h * w, -1)


def merged_rel_pos_bias(q: Tensor, table_h: Tensor, table_w: Tensor, h: int, w: int, positions: Tensor,
                        size: Tensor, inner: int, rule: str) -> Tensor:
    """``rel_pos_bias`` for self-attention over merged tokens: ``q`` [B * inner, N', C] (heads
    folded inside the batch), ``positions`` [B, h*w] and ``size`` [B, N'] from the merge;
    returns [B * inner, N', N']. A merged token stands for patches at several positions:
    ``rule="mean"`` gives each (query, key) pair the mean of the biases between their
    patches, which is the size-weighted mean of their rows of both tables;
    ``"representative"`` the bias between their first patches (raster order)."""
    batch, tokens = q.shape[:2]
    held = positions.repeat_interleave(inner, 0)
    grid = reorder(q, held, 0, 1).reshape(batch, h, w, q.shape[-1])  # each patch its token's query
    rows = torch.einsum("bhwc,hkc->bhwk", grid, table_h).flatten(1, 2)  # [B', h*w, kh]
    cols = torch.einsum("bhwc,wkc->bhwk", grid, table_w).flatten(1, 2)  # [B', h*w, kw]
    patches = torch.arange(h * w, device=q.device)
    if rule == "representative":
        first = first_patches(positions, tokens).repeat_interleave(inner, 0)  # [B', N']
        rows, cols = _take(rows, first), _take(cols, first)
        return rows.gather(2, (first // w)[:, None].expand(-1, tokens, -1)) + cols.gather(
            2, (first % w)[:, None].expand(-1, tokens, -1))
    if rule != "mean":
        raise ValueError(f"rel_pos rule is one of {REL_POS_RULES}, not {rule!r}")
    acc = accumulation_dtype(q.dtype)
    share = (1 / size.to(acc)).gather(1, positions)  # [B, h*w]: each patch's share of its token

    def query_mean(terms: Tensor) -> Tensor:  # [B', N', k]: each token's mean row over its patches
        sums = torch.zeros(batch, tokens, terms.shape[2], dtype=acc, device=q.device)
        index = held[..., None].expand(-1, -1, terms.shape[2])
        return sums.scatter_add(1, index, terms.to(acc) * share.repeat_interleave(inner, 0)[..., None])

    def key_shares(axis: Tensor, entries: int) -> Tensor:  # [B, k, N']: share of each token's patches per row
        cells = (axis[None] * tokens + positions).expand_as(share)
        return torch.zeros(positions.shape[0], entries * tokens, dtype=acc, device=q.device).scatter_add(
            1, cells, share).view(-1, entries, tokens)

    bias = query_mean(rows) @ key_shares(patches // w, rows.shape[2]).repeat_interleave(inner, 0)
    bias = bias + query_mean(cols) @ key_shares(patches % w, cols.shape[2]).repeat_interleave(inner, 0)
    return bias.to(q.dtype)


def merged_pair_table(table: Tensor, positions: Tensor, size: Tensor, ndim: int, batch_dim: int, rule: str,
                      lead: int = 0, trail: int = 0) -> Tensor:
    """A bias with an entry per (query, key) pair that no input feeds (a learned relative-position
    table gathered to [.., N, N]: Swin's, BEiT's, MaxViT's), read per pair of merged tokens:
    ``table`` broadcasts to ``ndim`` dims with the pairs last and size 1 on ``batch_dim`` (or
    one table per sample there: HF BEiT expands its bias to the batch);
    ``positions`` [B, N0] and ``size`` [B, N'] from the merge, behind ``lead`` and before
    ``trail`` unmerged tokens (a class token). Returns the table per sample, [B, .., N'', N''].
    A merged token stands for patches at several positions: ``rule="mean"`` gives a pair the
    mean of the entries between their patches, ``"representative"`` the entry between their
    first patches (raster order)."""
    if lead or trail:  # tokens outside the merge (a class token) hold themselves alone
        def alone(count: int, first: int) -> Tensor:
            return torch.arange(first, first + count, device=positions.device).expand(positions.shape[0], count)

        ones = size.new_ones(size.shape[0], 1)
        positions = torch.cat([alone(lead, 0), positions + lead, alone(trail, lead + size.shape[1])], dim=1)
        size = torch.cat([ones.expand(-1, lead), size, ones.expand(-1, trail)], dim=1)
    tokens, acc = size.shape[1], accumulation_dtype(table.dtype)
    if rule == "mean":
        weights = torch.nn.functional.one_hot(positions, tokens).to(acc) / size.to(acc)[:, None, :]  # [B, N0, N']
    elif rule == "representative":
        weights = torch.nn.functional.one_hot(first_patches(positions, tokens), positions.shape[1]).to(acc)
        weights = weights.transpose(1, 2)
    else:
        raise ValueError(f"rel_pos rule is one of {REL_POS_RULES}, not {rule!r}")
    dtype = table.dtype
    table = table.reshape((1,) * (ndim - table.dim()) + tuple(table.shape)).movedim(batch_dim, 0)
    if table.shape[0] == 1:
        merged = torch.einsum("...ab,zai,zbj->z...ij", table.squeeze(0).to(acc), weights, weights)
    else:
        merged = torch.einsum("z...ab,zai,zbj->z...ij", table.to(acc), weights, weights)
    return merged.movedim(0, batch_dim).to(dtype)


def mask_pairs(mask: Tensor, positions: Tensor, tokens: int, sets: tuple[slice, slice] = (EVEN, ODD)
               ) -> tuple[Tensor, Tensor]:
    """[B, Na, Nb] bool pairs of set-A and set-B tokens (``sets``; ToMe's even and odd ones):
    ``compatible`` where the mask treats them alike (equal columns as keys, equal rows as
    queries), so padding never joins a real token; ``inert`` where both are keys no query may
    attend to (padding), which merge first."""
    a, b = sets
    current = restage_mask(mask, positions, tokens)  # [B, H, Q, N]
    cols = current.permute(0, 3, 1, 2).flatten(2)  # [B, N, H*Q]
    compatible = (cols[:, a, None] == cols[:, None, b]).all(-1)
    if current.shape[2] != 1:
        rows = current.transpose(1, 2).flatten(2)  # [B, N, H*N]
        compatible &= (rows[:, a, None] == rows[:, None, b]).all(-1)
    blocked = ~cols if cols.dtype == torch.bool else cols <= torch.finfo(cols.dtype).min / 2
    dead = blocked.all(-1)  # [B, N]
    return compatible, dead[:, a, None] & dead[:, None, b]


def tome_merge(
    x: Tensor,
    keys: Tensor,
    size: Tensor,
    positions: Tensor | None,
    r: int,
    protected: int,
    token_dim: int,
    mask: Tensor | None = None,
    key_masks: tuple[tuple[Tensor, int], ...] = (),
    lead: int = 0,
    trail: int = 0,
    method: str = "tome",
    depth: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One merge step as inserted into a graph: match on ``keys`` by the policy ``method``
    (``POLICIES``; ``depth``: the block's index over the block count), merge ``x`` and
    ``size``, and follow the merge in ``positions`` (None: not followed, where nothing
    reads them). With an attention ``mask`` over the
    original tokens, only tokens the mask treats alike are merged, padding first; so too for
    each of ``key_masks``, masks over the tokens as keys (``restage_key_mask``'s, with its
    ``inner``). ``lead``/``trail``: keys of other streams joined before/after the tokens' own
    (left out)."""
    tokens, policy = x.shape[1], POLICIES[method]
    a, b = policy.sets
    if lead or trail:
        keys = keys.narrow(token_dim, lead, keys.shape[token_dim] - lead - trail)
    compatible, inert = (None, None) if mask is None else mask_pairs(mask, positions, tokens, policy.sets)
    for key_mask, inner in key_masks:
        cols = restage_key_mask(key_mask, positions, tokens, inner).reshape(x.shape[0], -1, tokens).transpose(1, 2)
        alike = (cols[:, a, None] == cols[:, None, b]).all(-1)
        compatible = alike if compatible is None else compatible & alike
    matching = policy.match(key_metric(keys, token_dim), r, protected, compatible, inert, depth)
    x, size, index = merge_matched(matching, x, size, index=positions is not None)
    return x, size, None if positions is None else index.gather(1, positions)


def size_bias(size: Tensor, ndim: int, batch_dim: int, token_dim: int, start: int = 0, inner: int = 1,
              lead: int = 0, trail: int = 0) -> Tensor:
    """``size`` [B, N] (tokens from ``start`` on) laid out to broadcast against an ``ndim``-dim
    tensor whose batch is on ``batch_dim`` and tokens on ``token_dim``; ``inner`` > 1: that
    dim folds the batch with ``inner`` entries inside it (heads in nn.MultiheadAttention's B*H);
    ``lead``/``trail``: tokens of another stream joined before/after, each of size 1."""
    if start:
        size = size[:, start:]
    if lead or trail:
        size = torch.nn.functional.pad(size, (lead, trail), value=1.0)
    if inner > 1:
        size = size.repeat_interleave(inner, 0)
    shape = [1] * ndim
    shape[batch_dim], shape[token_dim] = size.shape
    if batch_dim > token_dim:
        size = size.transpose(0, 1)
    return size.reshape(shape)


def log_size_bias(size: Tensor, like: Tensor, batch_dim: int, token_dim: int, start: int = 0, inner: int = 1,
                  lead: int = 0, trail: int = 0) -> Tensor:
    """Proportional attention: log(size) added to the logits of the keys on ``token_dim`` (tokens
    from ``start`` on, ``lead``/``trail`` joined ones of size 1 around them), laid out and typed
    for ``like`` (the logits, or an sdpa's queries)."""
    return _to(size_bias(size, like.dim(), batch_dim, token_dim, start, inner, lead, trail).log(), like.dtype)


PROP_ATTN_FORMS = ("auto", "bias", "flash")


def proportional_sdpa(query: Tensor, key: Tensor, value: Tensor, size: Tensor, batch_dim: int, start: int = 0,
                      inner: int = 1, lead: int = 0, trail: int = 0, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: float | None = None, enable_gqa: bool = False, form: str = "auto",
                      attn_mask: Tensor | None = None) -> Tensor:
    """``scaled_dot_product_attention`` over merged keys with proportional attention (log(size)
    added to each key's logits; ``size_bias`` says how ``size`` lays out). ``form="bias"``
    passes it as a float mask (added to ``attn_mask``), which rules out FlashAttention on CUDA.
    ``"flash"`` folds it into the product instead: q.k.s + log(size) = [q, 1].[k, log(size) /
    s].s, so one column appended to the queries (ones) and keys, zeros to the values, head dims
    padded to a multiple of 8 and the scale passed explicitly leave no mask. ``"auto"``:
    ``"flash"`` where that lets FlashAttention run (CUDA, half precision, head dim under 256),
    else ``"bias"``. With an ``attn_mask`` of its own, which rules that kernel out anyway, the
    bias form always."""
    head_dim = query.shape[-1]
    if attn_mask is not None:
        form = "bias"
    elif form == "auto":
        flash = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and head_dim < 256
        form = "flash" if flash else "bias"
    if form == "bias":
        bias = log_size_bias(size, query, batch_dim, query.dim() - 1, start, inner, lead, trail)
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=add_attention_bias(attn_mask, bias), dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    scale = head_dim ** -0.5 if scale is None else scale
    column = size_bias(size, key.dim(), batch_dim, key.dim() - 2, start, inner, lead, trail).log() / scale
    width = -(-(head_dim + 1) // 8) * 8

    def widened(x: Tensor, last: Tensor | None) -> Tensor:
        if last is not None:
            x = torch.cat([x, last.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)
        return torch.nn.functional.pad(x, (0, width - x.shape[-1]))

    out = torch.nn.functional.scaled_dot_product_attention(
        widened(query, query.new_ones(())), widened(key, column), widened(value, None) if value.shape[-1] <= width
        else value, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out[..., : value.shape[-1]]


def add_attention_bias(mask: Tensor | None, bias: Tensor) -> Tensor:
    """Combine an optional ``scaled_dot_product_attention`` mask (bool or additive) with ``bias``."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=bias.dtype).masked_fill(~mask, -torch.inf)
    return mask + bias


def weighted_mean(x: Tensor, weight: Tensor, dim: list[int], keepdim: bool = False) -> Tensor:
    """Mean over token dims that counts each token ``weight`` times (size-weighted pooling)."""
    acc = accumulation_dtype(x.dtype)
    weight = weight.to(acc)
    total = (x.to(acc) * weight).sum(dim=dim, keepdim=keepdim)
    return (total / weight.expand_as(x).sum(dim=dim, keepdim=keepdim)).to(x.dtype)


def scale_by_size(x: Tensor, size: Tensor, batch_dim: int, token_dim: int, start: int = 0,
                  power: float = 1.0) -> Tensor:
    """``x`` with every token scaled by its size: a sum over the tokens then counts each merged
    token once per token it holds (by size ** (1 / p) for a p-norm: ``power``). Integers and
    bools become int64, which their sum is anyway."""
    weight = size_bias(size, x.dim(), batch_dim, token_dim, start)
    if power != 1.0:
        weight = weight ** power
    if not x.is_floating_point():
        return x.to(torch.int64) * weight.round().to(torch.int64)
    return (x.to(accumulation_dtype(x.dtype)) * weight).to(x.dtype)


def grid_order(metric: Tensor, h: int, w: int, sx: int, sy: int, r: int, rand: bool, tile: int = 0) -> Matching:
    """tomesd's matching on an ``h`` x ``w`` grid of tokens ``metric`` [B, N, C]: one receiving
    (dst) token in each ``sy`` x ``sx`` cell -- its top-left one, or with ``rand`` a random one
    (global RNG) -- every other token a source; each source pairs with its most similar dst
    by cosine similarity (all-zero tokens: 1 with each other, below any cosine with the rest),
    and the ``r`` best pairs merge. ``tile`` > 0: a source looks for its dst only within its
    tile of ``tile`` x ``tile`` cells (the grid must be whole tiles), so scoring costs
    O(tokens x tile^2) instead of O(tokens^2) on large grids (SAM 2's first stages); the ``r``
    best pairs are still chosen over the whole grid. Kept tokens are ordered
    ``[unmerged sources by position, dst tokens]``."""
    metric = metric.flatten(1, -2)  # a grid [B, h, w, C] as its h * w tokens
    device = metric.device
    hsy, wsx = h // sy, w // sx
    cells = torch.zeros(hsy, wsx, sy * sx, dtype=torch.long, device=device)
    choice = (torch.randint(sy * sx, (hsy, wsx, 1), device=device) if rand
              else torch.zeros(hsy, wsx, 1, dtype=torch.long, device=device))
    cells = cells.scatter(2, choice, -1).view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    marks = torch.zeros(h, w, dtype=torch.long, device=device)
    marks[: hsy * sy, : wsx * sx] = cells
    order = marks.flatten().argsort(stable=True)  # dst (-1) first, then sources, each by position
    dst_set, src_set = order[: hsy * wsx], order[hsy * wsx :]
    metric = metric.detach()
    norm = metric.norm(dim=-1, keepdim=True)
    metric = metric / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    blank = norm[..., 0] == 0
    if tile:
        if h % (tile * sy) or w % (tile * sx):
            raise ValueError(f"a {h} x {w} grid is not whole tiles of {tile} x {tile} cells of {sy} x {sx}")
        node_max, node_idx = _tiled_best_dst(metric, blank, src_set, dst_set, w, tile * sy, tile * sx)
    else:
        node_max, node_idx = _best_dst(metric[:, src_set], metric[:, dst_set], blank[:, src_set], blank[:, dst_set])
    r = min(r, src_set.shape[0])
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src = edge_idx[:, :r]
    return Matching(edge_idx[:, r:].sort(dim=-1).values, src, node_idx.gather(1, src), 0, src_set, dst_set)


def _best_dst(src: Tensor, dst: Tensor, blank_src: Tensor, blank_dst: Tensor) -> tuple[Tensor, Tensor]:
    """Each source's best cosine over ``dst`` [..., D, C] and which dst it is (unit-norm rows)."""
    scores = src @ dst.transpose(-1, -2)
    # all-zero tokens (the padding of SAM's windows) match each other best, and a real token last:
    # their cosine is undefined, and a NaN score would merge them into arbitrary tokens first
    blank_src, blank_dst = blank_src[..., :, None], blank_dst[..., None, :]
    return scores.masked_fill(blank_src & blank_dst, 1.0).masked_fill(blank_src ^ blank_dst, -2.0).max(dim=-1)


def _tiled_best_dst(metric: Tensor, blank: Tensor, src_set: Tensor, dst_set: Tensor, w: int, th: int,
                    tw: int) -> tuple[Tensor, Tensor]:
    """``_best_dst`` with each source's dsts those of its ``th`` x ``tw`` tile: sources and
    dsts are grouped by tile (each tile holds as many of each), scored per tile, and the
    results put back in ``src_set``'s order, dsts as indices into ``dst_set``."""
    tiles_per_row = w // tw

    def by_tile(tokens: Tensor) -> Tensor:
        tile_of = (tokens // w // th) * tiles_per_row + tokens % w // tw
        return tile_of.argsort(stable=True)

    src_by_tile, dst_by_tile = by_tile(src_set), by_tile(dst_set)
    count = (w // tw) * (metric.shape[1] // w // th)
    src_tokens, dst_tokens = src_set[src_by_tile], dst_set[dst_by_tile]

    def grouped(x: Tensor, tokens: Tensor) -> Tensor:
        return x[:, tokens].unflatten(1, (count, -1))

    best, local = _best_dst(grouped(metric, src_tokens), grouped(metric, dst_tokens),
                            grouped(blank, src_tokens), grouped(blank, dst_tokens))
    per_tile = dst_set.shape[0] // count
    chosen = dst_by_tile[local + torch.arange(count, device=local.device)[:, None] * per_tile]
    back = src_by_tile.argsort()  # tile-grouped order -> src_set's
    return best.flatten(1)[:, back], chosen.flatten(1)[:, back]


def remember(matching: Matching, *store: Tensor) -> Matching:
    """Copy a grid matching's tensors into ``store`` (buffers of the graphs that reuse it) and
    return it: match reuse across denoising steps (``tome_fx.sd.apply(..., reuse=k)``)."""
    for held, value in zip(store, _matching_tensors(matching)):
        held.copy_(value)
    return matching


def recall(*store: Tensor) -> Matching:
    """The grid matching that ``remember`` stored."""
    unm_idx, src_idx, dst_idx, a, b = store
    return Matching(unm_idx, src_idx, dst_idx, 0, a, b)


def _matching_tensors(matching: Matching) -> tuple[Tensor, ...]:
    return matching.unm_idx, matching.src_idx, matching.dst_idx, matching.a, matching.b


def matching_store(batch: int, h: int, w: int, sx: int, sy: int, r: int, tile: int, device) -> tuple[Tensor, ...]:
    """Buffers shaped like ``grid_order``'s matching for a batch of ``h`` x ``w`` grids."""
    probe = grid_order(torch.zeros(batch, h * w, 1, device=device), h, w, sx, sy, r, False, tile)
    return tuple(torch.zeros_like(t) for t in _matching_tensors(probe))


def branch_merge(x: Tensor, matching: Matching, lead: int = 0, trail: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Merge a branch's input ``x`` [B, N, C] (every token one patch) as ``matching`` says:
    ``(merged tokens, their sizes, positions)``; ``branch_unmerge`` brings the branch's output
    back to all N tokens, each merged source taking its dst's value. A grid [B, h, w, C]
    merges as its h * w tokens and stays 4-d: [B, N', 1, C]. ``lead``/``trail``: tokens of
    another stream joined before/after the merging ones (FLUX's text), kept as they are."""
    before, tokens, after = _joined_parts(x.flatten(1, -2), lead, trail)
    merged, size, positions = merge_matched(matching, tokens, initial_size(tokens))
    if lead or trail:
        merged = torch.cat([before, merged, after], dim=1)
    return (merged if x.dim() == 3 else merged.unsqueeze(2)), size, positions


def branch_unmerge(y: Tensor, positions: Tensor, like: Tensor, lead: int = 0, trail: int = 0) -> Tensor:
    """A branch's output ``y`` over merged tokens (``branch_merge``'s layout) back to every
    token, shaped like the stream ``like`` it is added to."""
    before, y, after = _joined_parts(y.flatten(1, -2), lead, trail)
    y = unmerge(y, positions, 0, 1)
    return (torch.cat([before, y, after], dim=1) if lead or trail else y).view(like.shape)


def _joined_parts(x: Tensor, lead: int, trail: int) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """``x`` [B, N, ..] cut into another stream's tokens joined before (``lead``) and after
    (``trail``) and the tokens between them (None, x, None where nothing is joined)."""
    if not (lead or trail):
        return None, x, None
    return tuple(x.split([lead, x.shape[1] - lead - trail, trail], dim=1))
