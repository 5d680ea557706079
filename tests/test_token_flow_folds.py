"""Folding the batch and token axes with others (nn.MultiheadAttention's views): a view of
grouped factors keeps track of where the batch and the tokens went, and refuses views
that would cut them or read them back in another order."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tome_fx.passes.token_flow import BATCH, TOKEN, Fold, _Refuse, _refold, holds

BATCH_SIZE = 1_000_003  # graph_utils' stand-in for a symbolic batch: prime, so never a product of others


@st.composite
def factor_lists(draw):
    """Factors outer to inner: the batch, the tokens and some unnamed ones, in any order."""
    tokens = draw(st.integers(2, 300))
    others = draw(st.lists(st.integers(2, 16), max_size=3))
    factors = [(BATCH, BATCH_SIZE), (TOKEN, tokens)] + [(None, size) for size in others]
    return draw(st.permutations(factors))


def _groups(draw, n):
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


@given(st.data())
def test_grouping_then_ungrouping_recovers_every_role(data):
    factors = data.draw(factor_lists())
    groups = _groups(data.draw, len(factors))
    sizes = []
    for lo, hi in groups:
        product = 1
        for _, size in factors[lo:hi]:
            product *= size
        sizes.append(product)
    grouped = _refold(factors, sizes)
    for (lo, hi), role in zip(groups, grouped):
        assert holds(role, BATCH) == any(r == BATCH for r, _ in factors[lo:hi])
        assert holds(role, TOKEN) == any(r == TOKEN for r, _ in factors[lo:hi])
        if hi - lo > 1 and isinstance(role, Fold):
            assert list(role.factors) == factors[lo:hi]
    # and back: the grouped dims, viewed as the original factor sizes
    regrouped = [f for role, size in zip(grouped, sizes) for f in (role.factors if isinstance(role, Fold) else [(role, size)])]
    assert _refold(regrouped, [size for _, size in factors]) == [role for role, _ in factors]


@given(tokens=st.integers(2, 300))
def test_reading_a_folded_buffer_in_another_order_is_refused(tokens):
    """[B*N, C] viewed as [N, B, C] would mix images: the batch factor cannot be cut."""
    with pytest.raises(_Refuse):
        _refold([(BATCH, BATCH_SIZE), (TOKEN, tokens)], [tokens, BATCH_SIZE])


def test_unnamed_factors_split_freely_but_tokens_do_not():
    # heads: 32 channels -> 4 heads x 8, folded with the batch (nn.MultiheadAttention)
    assert _refold([(BATCH, BATCH_SIZE), (None, 32)], [4 * BATCH_SIZE, 8]) == [
        Fold(((BATCH, BATCH_SIZE), (None, 4))), None]
    with pytest.raises(_Refuse):
        _refold([(TOKEN, 16)], [4, 4])
