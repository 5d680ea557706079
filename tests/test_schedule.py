import pytest
from hypothesis import given
from hypothesis import strategies as st

from tome_fx.schedule import clamp_schedule, resolve_schedule


def test_int_is_constant():
    assert resolve_schedule(13, 4) == [13, 13, 13, 13]


def test_short_list_is_padded_with_zero():
    assert resolve_schedule([5, 3], 4) == [5, 3, 0, 0]


def test_inflection_minus_one_decreases_from_2r_to_0():
    assert resolve_schedule((8, -1), 5) == [16, 12, 8, 4, 0]
    assert resolve_schedule((8, 1), 5) == [0, 4, 8, 12, 16]
    assert resolve_schedule((8, 0), 3) == [8, 8, 8]


def test_single_block_tuple():
    assert resolve_schedule((8, -1), 1) == [16]


@given(st.integers(0, 50), st.floats(-1, 1), st.integers(2, 24))
def test_tuple_schedule_is_monotone_and_near_r_per_block(r, inflection, blocks):
    values = resolve_schedule((r, inflection), blocks)
    assert len(values) == blocks and min(values) >= 0
    assert values == sorted(values) or values == sorted(values, reverse=True)
    assert abs(sum(values) - r * blocks) <= blocks  # int() truncation only


@pytest.mark.parametrize(
    "bad, error",
    [(-1, ValueError), (2.5, ValueError), (True, TypeError), ("8", TypeError), ([1, -2], ValueError),
     ([1, 2.0], TypeError), ([1] * 5, ValueError), ((4, 1.5), ValueError), ((4, -2), ValueError),
     ((4,), TypeError), ((4, "x"), TypeError), ((-4, 0), ValueError)],
)
def test_bad_schedules_are_rejected(bad, error):
    with pytest.raises(error):
        resolve_schedule(bad, 4)


@given(st.lists(st.integers(0, 200), min_size=1, max_size=12), st.integers(2, 300), st.integers(0, 5))
def test_clamp_keeps_protected_tokens_and_one_more(requested, tokens, protected):
    clamped = clamp_schedule(requested, tokens, protected)
    start = tokens
    for want, got in zip(requested, clamped):
        assert 0 <= got <= want
        assert got <= max(tokens - protected, 0) // 2
        tokens -= got
    if start > protected:
        assert tokens > protected  # r <= (n - p) // 2 always leaves a non-protected token
    else:
        assert clamped == [0] * len(clamped)
    assert tokens == start - sum(clamped)


def test_a_fraction_merges_that_share_of_each_blocks_tokens():
    assert resolve_schedule(0.25, 3) == [0.25, 0.25, 0.25]
    assert clamp_schedule(resolve_schedule(0.25, 3), 197, 1) == [49, 37, 27]  # int(197/4), int(148/4), ...
    assert clamp_schedule([0.9], 17, 1) == [8]  # clamped like any r
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"fraction r must be in \(0, 1\)"):
            resolve_schedule(bad, 2)
