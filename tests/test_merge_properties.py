"""Property tests of the merge math (tome_fx.merge): hypothesis hunts for counterexamples."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tome_fx import merge

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2}


@st.composite
def token_batches(draw):
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(2, 40))
    channels = draw(st.integers(1, 8))
    protected = draw(st.integers(0, min(5, tokens)))
    r = draw(st.integers(0, merge.max_merges(tokens, protected)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=gen).to(dtype)
    keys = torch.randn(batch, 2, tokens, channels, generator=gen).to(dtype)
    size = torch.randint(1, 5, (batch, tokens), generator=gen).to(merge.accumulation_dtype(dtype))
    return x, keys, size, r, protected


def _step(x, keys, size, r, protected, positions=None):
    positions = merge.initial_positions(x) if positions is None else positions
    return merge.tome_merge(x, keys, size, positions, r, protected, token_dim=-2)


@given(token_batches())
def test_merge_removes_exactly_r_tokens(case):
    x, keys, size, r, protected = case
    merged, new_size, _ = _step(x, keys, size, r, protected)
    assert merged.shape == (x.shape[0], x.shape[1] - r, x.shape[2])
    assert new_size.shape == merged.shape[:2]
    assert merged.dtype == x.dtype


@given(token_batches())
def test_size_total_and_weighted_mass_are_preserved(case):
    x, keys, size, r, protected = case
    merged, new_size, _ = _step(x, keys, size, r, protected)
    torch.testing.assert_close(new_size.sum(1), size.sum(1), rtol=0, atol=0)
    acc = merge.accumulation_dtype(x.dtype)
    before = (x.to(acc) * size[..., None]).sum(1)
    after = (merged.to(acc) * new_size[..., None]).sum(1)
    tol = TOLERANCE[x.dtype] * (1 + before.abs().max().item())
    torch.testing.assert_close(after, before, rtol=0, atol=tol)


@given(token_batches())
def test_each_token_is_the_size_weighted_mean_of_the_tokens_it_absorbed(case):
    """Against a dense reference: the source map of one step, applied to size-weighted tokens."""
    x, keys, size, r, protected = case
    merged, new_size, positions = _step(x, keys, size, r, protected)
    acc = merge.accumulation_dtype(x.dtype)
    groups = merge.source_map(positions, merged.shape[1]).to(acc)  # [B, N - r, N]
    torch.testing.assert_close(new_size, (groups @ size[..., None])[..., 0], rtol=0, atol=0)
    expected = (groups @ (x.to(acc) * size[..., None])) / new_size[..., None]
    tol = TOLERANCE[x.dtype] * (1 + x.abs().max().item())
    torch.testing.assert_close(merged.to(acc), expected, rtol=0, atol=tol)
    kept = groups.sum(2) == 1  # tokens that absorbed nothing are copied bit for bit
    assert torch.equal(merged[kept], (groups.to(x.dtype) @ x)[kept])


@given(token_batches())
def test_protected_tokens_never_merge_and_stay_in_front(case):
    x, keys, size, r, protected = case
    merged, new_size, _ = _step(x, keys, size, r, protected)
    assert torch.equal(merged[:, :protected], x[:, :protected])
    assert torch.equal(new_size[:, :protected], size[:, :protected])


@given(token_batches(), st.lists(st.integers(0, 8), min_size=1, max_size=4))
def test_source_map_partitions_the_original_tokens(case, rs):
    """``positions`` (followed merge by merge) and ``size`` (summed) must tell the same story."""
    x, keys, _, _, protected = case
    size, positions = merge.initial_size(x), merge.initial_positions(x)
    for r in rs:
        r = min(r, merge.max_merges(x.shape[1], protected))
        keys = torch.randn(x.shape[0], 2, x.shape[1], 4).to(x.dtype)
        x, size, positions = _step(x, keys, size, r, protected, positions)
    source = merge.source_map(positions, x.shape[1]).to(size.dtype)
    assert set(source.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(source.sum(1), torch.ones_like(source.sum(1)))  # each original token in one group
    assert torch.equal(source.sum(2), size)  # a group holds as many originals as its size
    protected_rows = source[:, :protected, :protected]
    assert torch.equal(protected_rows, torch.eye(protected).expand_as(protected_rows).to(source.dtype))


@given(token_batches())
def test_merged_pairs_are_the_most_similar(case):
    x, keys, _, r, protected = case
    metric = merge.key_metric(keys.double(), token_dim=-2)
    matching = merge.bipartite_soft_matching(metric, r, protected)
    normed = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    scores = normed[:, ::2] @ normed[:, 1::2].transpose(1, 2)
    scores[:, : (protected + 1) // 2] = -torch.inf
    scores[:, :, : protected // 2] = -torch.inf
    best = scores.max(-1).values
    chosen = best.gather(1, matching.src_idx)
    others = best.gather(1, matching.unm_idx)
    if r and others.shape[1]:
        assert (chosen.min(1).values >= others.max(1).values - 1e-12).all()
    # each merged token goes to its best partner
    rows = scores.gather(1, matching.src_idx[..., None].expand(-1, -1, scores.shape[2]))
    torch.testing.assert_close(rows.gather(2, matching.dst_idx[..., None])[..., 0], chosen)


def _attention(x, weights, bias=None):
    q, k, v = (x @ w for w in weights)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v


@given(
    st.integers(1, 3), st.integers(2, 30), st.integers(2, 6), st.integers(0, 3), st.integers(0, 2**16), st.data()
)
def test_merging_exact_duplicates_with_proportional_attention_is_exact(batch, pairs, channels, protected, seed, data):
    """Merging tokens that are exact copies and weighting them by size leaves attention unchanged.

    (channels >= 2: with one channel every cosine similarity is +-1, so copies are not the
    unique best matches and the precondition of the property does not hold.)"""
    gen = torch.Generator().manual_seed(seed)
    tokens = protected + 2 * pairs
    x = torch.randn(batch, tokens, channels, generator=gen, dtype=torch.float64)
    a_positions = [p for p in range(protected, tokens) if p % 2 == 0]
    b_positions = [p for p in range(protected, tokens) if p % 2 == 1]
    copies = data.draw(st.lists(st.sampled_from(a_positions), unique=True, max_size=len(a_positions)))
    for a in copies:  # each copied A token duplicates some non-protected B token
        x[:, a] = x[:, data.draw(st.sampled_from(b_positions))]
    weights = [torch.randn(channels, channels, generator=gen, dtype=torch.float64) for _ in range(3)]
    expected = x + _attention(x, weights)

    size, positions = merge.initial_size(x), merge.initial_positions(x)
    merged, size, positions = merge.tome_merge(x, x[:, None], size, positions, len(copies), protected, -2)
    bias = merge.log_size_bias(size, merged, 0, 2)  # laid out for 3-d logits [B, Nq, Nk]
    got = merged + _attention(merged, weights, bias)
    unmerged = merge.unmerge(got, positions, 0, 1)  # each original token takes its group's value
    torch.testing.assert_close(unmerged, expected, rtol=1e-9, atol=1e-9)


@given(token_batches(), st.integers(0, 2))
def test_unmerge_follows_the_source_map_on_any_layout(case, start):
    """``unmerge`` (a gather) equals the source-map product, with tokens and batch on any axes."""
    x, keys, size, r, protected = case
    merged, _, positions = _step(x, keys, size, r, protected)
    start = min(start, protected)
    expected = merge.source_map(positions, merged.shape[1]).to(merged.dtype).transpose(1, 2) @ merged
    layout = merged[:, start:].permute(2, 1, 0)  # [C, N, B]: tokens on 1, batch on 2
    got = merge.unmerge(layout, positions, batch_dim=2, token_dim=1, start=start).permute(2, 1, 0)
    assert torch.equal(got, expected[:, start:])


def test_weighted_mean_counts_each_token_by_its_size():
    x = torch.tensor([[[1.0], [4.0]]])
    weight = torch.tensor([[[3.0], [1.0]]])
    assert merge.weighted_mean(x, weight, [1]).item() == (3 * 1 + 4) / 4


def test_sdpa_mask_combines_with_boolean_and_additive_masks():
    bias = torch.zeros(1, 1, 1, 2)
    keep = torch.tensor([True, False])
    assert merge.add_attention_bias(keep, bias)[..., 1].item() == -torch.inf
    assert torch.equal(merge.add_attention_bias(torch.ones(2), bias), torch.ones(1, 1, 1, 2))


@given(st.integers(1, 3), st.integers(4, 24), st.integers(0, 2), st.integers(0, 2**16), st.data())
def test_merges_under_a_mask_keep_every_token_masked_like_its_originals(batch, tokens, protected, seed, data):
    """Key-padding masks and block masks: after any merges, the mask read at the merged tokens
    (``restage_mask``) equals the original mask at every original (query, key) pair, and
    padding never shares a group with a real token."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=gen)
    keep = torch.arange(tokens) < lengths[:, None]  # [B, N] real tokens, padding at the end
    padding = data.draw(st.booleans())
    if padding:  # bidirectional key padding, [B, 1, N, N]
        mask = keep[:, None, None, :].expand(batch, 1, tokens, tokens)
    else:  # two segments that only see themselves (a block-diagonal mask), [1, 1, N, N]
        segment = torch.arange(tokens) < data.draw(st.integers(1, tokens))
        mask = (segment[:, None] == segment[None, :])[None, None]
    x = torch.randn(batch, tokens, 3, generator=gen, dtype=torch.float64)
    size, positions = merge.initial_size(x), merge.initial_positions(x)
    for _ in range(data.draw(st.integers(1, 3))):
        compatible, _ = merge.mask_pairs(mask, positions, x.shape[1])
        compatible[:, : (protected + 1) // 2] = False
        compatible[:, :, : protected // 2] = False
        available = int(compatible.any(-1).sum(-1).min())  # merges possible without a forced pair
        r = data.draw(st.integers(0, min(available, merge.max_merges(x.shape[1], protected))))
        keys = torch.randn(batch, 1, x.shape[1], 3, generator=gen, dtype=torch.float64)
        x, size, positions = merge.tome_merge(x, keys, size, positions, r, protected, -2, mask)
    current = merge.restage_mask(mask, positions, x.shape[1])
    full = mask.expand(batch, 1, tokens, tokens)
    rows = positions[:, None, :, None].expand(-1, 1, -1, x.shape[1])
    back = current.expand(batch, 1, -1, -1).gather(2, rows)  # [B, 1, N0, n]: original queries
    back = back.gather(3, positions[:, None, None, :].expand(-1, 1, tokens, -1))
    assert torch.equal(back, full)
    for b in range(batch if padding else 0):
        assert set(positions[b][keep[b]].tolist()).isdisjoint(positions[b][~keep[b]].tolist())


@given(st.integers(1, 3), st.integers(2, 24), st.integers(0, 2), st.integers(0, 2**16), st.data())
def test_a_mask_that_leaves_fewer_than_r_compatible_pairs_is_an_error(batch, tokens, protected, seed, data):
    """Never a forced merge of tokens the mask tells apart: exactly when r exceeds the set-A
    tokens that have a compatible partner, the merge raises instead."""
    protected = min(protected, tokens)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.arange(tokens) < torch.randint(1, tokens + 1, (batch, 1), generator=gen)
    mask = keep[:, None, None, :]
    x = torch.randn(batch, tokens, 3, generator=gen, dtype=torch.float64)
    compatible, _ = merge.mask_pairs(mask, merge.initial_positions(x), tokens)
    compatible[:, : (protected + 1) // 2] = False
    compatible[:, :, : protected // 2] = False
    available = int(compatible.any(-1).sum(-1).min())
    r = data.draw(st.integers(0, merge.max_merges(tokens, protected)))
    args = (x, x[:, None], merge.initial_size(x), merge.initial_positions(x), r, protected, -2, mask)
    if r <= available:
        merge.tome_merge(*args)
    else:
        with pytest.raises(RuntimeError, match="pairs the attention mask treats alike"):
            merge.tome_merge(*args)


@given(st.integers(1, 3), st.integers(2, 40), st.integers(1, 40), st.integers(0, 2**16))
def test_merging_down_keeps_the_mass_and_a_raster_order(batch, tokens, keep, seed):
    """``merge_down``: exactly ``keep`` tokens (or all, if fewer), sizes summing to the
    tokens, each token the mean of those it holds, listed by their first token."""
    x = torch.randn(batch, tokens, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    merged, size, positions = merge.merge_down(x, keep)
    assert merged.shape == (batch, min(keep, tokens), 4) and torch.equal(size.sum(1), torch.full((batch,), float(tokens), dtype=size.dtype))
    sums = torch.zeros_like(merged).scatter_add(1, positions[..., None].expand(-1, -1, 4), x)
    torch.testing.assert_close(merged, sums / size[..., None])
    first = torch.full(size.shape, tokens).scatter_reduce(1, positions, torch.arange(tokens).expand(batch, -1), "amin")
    assert (first.diff(dim=1) > 0).all()


def test_merging_down_duplicate_pairs_gives_each_pair_once():
    distinct = torch.randn(2, 6, 4, dtype=torch.float64)
    merged, size, _ = merge.merge_down(distinct.repeat_interleave(2, 1), 6)
    assert torch.equal(merged, distinct) and size.eq(2).all()


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 30),
       st.integers(0, 2**16))
def test_relative_positions_per_merged_pair_follow_their_patches(batch, heads, h, w, groups, seed):
    """``merged_rel_pos_bias`` on any grouping of an h x w grid: ``"mean"`` gives each merged
    pair the mean of the biases between their patches (each patch holding its token's query),
    ``"representative"`` the bias between their first patches; unmerged, both are the bias."""
    gen = torch.Generator().manual_seed(seed)
    tokens, channels, double = h * w, 3, dict(dtype=torch.float64)
    table_h, table_w = torch.randn(h, h, channels, generator=gen, **double), torch.randn(w, w, channels, generator=gen, **double)
    q = torch.randn(batch * heads, tokens, channels, generator=gen, **double)
    one = torch.arange(tokens).expand(batch, -1), torch.ones(batch, tokens, **double)
    for rule in merge.REL_POS_RULES:
        torch.testing.assert_close(merge.merged_rel_pos_bias(q, table_h, table_w, h, w, *one, heads, rule),
                                   merge.rel_pos_bias(q, table_h, table_w, h, w), rtol=0, atol=1e-12)
    groups = min(groups, tokens)  # every group holds a patch: the first ``groups`` patches open them
    positions = torch.cat([torch.arange(groups).expand(batch, -1),
                           torch.randint(groups, (batch, tokens - groups), generator=gen)], 1)
    size = torch.zeros(batch, groups, **double).scatter_add(1, positions, torch.ones(batch, tokens, **double))
    merged_q = q[:, :groups]
    full = merge.rel_pos_bias(merge.reorder(merged_q, positions.repeat_interleave(heads, 0), 0, 1), table_h, table_w, h, w)
    share = (torch.nn.functional.one_hot(positions, groups).to(torch.float64) / size.gather(1, positions)[..., None])
    share = share.repeat_interleave(heads, 0)
    torch.testing.assert_close(merge.merged_rel_pos_bias(merged_q, table_h, table_w, h, w, positions, size, heads, "mean"),
                               share.transpose(1, 2) @ full @ share, rtol=0, atol=1e-10)
    first = merge.first_patches(positions, groups).repeat_interleave(heads, 0)
    expected = full[torch.arange(batch * heads)[:, None, None], first[:, :, None], first[:, None, :]]
    torch.testing.assert_close(merge.merged_rel_pos_bias(merged_q, table_h, table_w, h, w, positions, size, heads,
                                                         "representative"), expected, rtol=0, atol=1e-12)


def test_grid_matching_merges_zero_padding_with_padding_first():
    """SAM pads its windows with zeros: all-zero tokens pair with each other (no NaN score
    sends them into a real token), and merge before any real pair."""
    x = torch.randn(2, 6, 6, 4, dtype=torch.float64)
    x[:, 4:] = 0  # two rows of padding
    matching = merge.grid_order(x, 6, 6, 2, 2, 9, False)
    flat = x.flatten(1, 2)
    src, dst = matching.a[matching.src_idx], matching.b[matching.dst_idx]
    padded = flat.abs().sum(-1) == 0
    assert padded.gather(1, src).all() and padded.gather(1, dst).all()  # the 9 padding sources, into padding


@pytest.mark.parametrize("h, w, k, rand", [(8, 12, 2, False), (12, 6, 3, True), (8, 8, 4, False)])
def test_tiled_grid_matching_is_the_whole_grid_matching_restricted_to_each_tile(h, w, k, rand):
    """``grid_order(..., tile=k)``: each source's dst is its best within its tile of k x k cells
    (padding rules as untiled), and the r best pairs over the whole grid merge; one tile over
    the whole grid is the untiled matching."""
    torch.manual_seed(0)
    x = torch.randn(3, h, w, 5, dtype=torch.float64)
    x[0, -2:] = 0  # padding
    r = h * w // 3
    matching = merge.grid_order(x, h, w, 2, 2, r, rand, tile=k)
    unit = torch.nn.functional.normalize(x.flatten(1, 2), dim=-1)
    blank = x.flatten(1, 2).abs().sum(-1) == 0

    def tile(t):
        return (t // w // (2 * k)) * (w // (2 * k)) + t % w // (2 * k)

    for i in range(3):
        scores = unit[i, matching.a] @ unit[i, matching.b].T
        bs, bd = blank[i, matching.a, None], blank[i, None, matching.b]
        scores = scores.masked_fill(bs & bd, 1.0).masked_fill(bs ^ bd, -2.0)
        best, dst = scores.masked_fill(tile(matching.a)[:, None] != tile(matching.b)[None], -9).max(-1)
        order = best.argsort(descending=True, stable=True)
        assert torch.equal(best[matching.src_idx[i]], best[order[:r]])  # (ties may order either way)
        assert torch.equal(matching.dst_idx[i], dst[matching.src_idx[i]])
    if h == w == 2 * k:
        torch.manual_seed(1)
        whole = merge.grid_order(x, h, w, 2, 2, r, rand)
        torch.manual_seed(1)
        tiled = merge.grid_order(x, h, w, 2, 2, r, rand, tile=k)
        assert all(torch.equal(a, b) for a, b in zip(whole[:3] + whole[4:6], tiled[:3] + tiled[4:6]))
    with pytest.raises(ValueError, match="not whole tiles"):
        merge.grid_order(x, h, w, 2, 2, r, rand, tile=k + 1)


@pytest.mark.parametrize("inner, lead, trail, start, gqa, head_dim", [(1, 0, 0, 0, False, 64), (2, 1, 2, 1, False, 7),
                                                                   (1, 0, 0, 0, True, 16)])
def test_the_flash_form_of_proportional_attention_equals_the_bias_form(inner, lead, trail, start, gqa, head_dim):
    """[q, 1].[k, log(size) / s].s = q.k.s + log(size): the key-column form (no mask, head dims
    padded to 8) gives the bias form's output, with heads folded in the batch (``inner``),
    joined tokens (``lead``/``trail``), tokens before ``start``, grouped keys, any head dim."""
    torch.manual_seed(0)
    batch, tokens = 2, 6
    keys = lead + tokens - start + trail
    q = torch.randn(batch * inner, 4 if gqa else 2, 5, head_dim, dtype=torch.float64)
    k = torch.randn(batch * inner, 2, keys, head_dim, dtype=torch.float64)
    v = torch.randn(batch * inner, 2, keys, 3, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, tokens)).to(torch.float64)
    args = (q, k, v, size, 0, start, inner, lead, trail, 0.0, False, 0.3 if gqa else None, gqa)
    torch.testing.assert_close(merge.proportional_sdpa(*args, "flash"), merge.proportional_sdpa(*args, "bias"),
                               rtol=0, atol=1e-12)
    assert merge.proportional_sdpa(*args, "auto").equal(merge.proportional_sdpa(*args, "bias"))  # (on CPU)
