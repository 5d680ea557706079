"""Merge schedules: how many tokens each block removes."""

from __future__ import annotations

import numbers
from typing import Sequence, Union

from .merge import max_merges

Schedule = Union[int, float, Sequence[int], tuple]


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def resolve_schedule(r: Schedule, num_blocks: int) -> list[int]:
    """Tokens to remove per block, before clamping to what each block can merge.

    - ``int``: the same r in every block;
    - ``list``: one r per block, a shorter list padded with 0;
    - ``(r, inflection)``: inflection in [-1, 1] as in the ToMe paper's code: 0 keeps r
      constant, -1 decreases linearly from 2r to 0, +1 increases from 0 to 2r;
    - a ``float`` in (0, 1): that fraction of each block's tokens (tomesd's ``ratio``),
      made a count by ``clamp_schedule`` once the token counts are known.
    """
    if num_blocks < 1:
        raise ValueError("a schedule needs at least one block")
    if isinstance(r, numbers.Real) and not isinstance(r, numbers.Integral):
        if not 0.0 < r < 1.0:
            raise ValueError(f"a fraction r must be in (0, 1), got {r}")
        return [float(r)] * num_blocks
    if isinstance(r, list):
        if len(r) > num_blocks:
            raise ValueError(f"r lists {len(r)} values but the model has {num_blocks} attention blocks")
        values = [_check_count(v, f"r[{i}]") for i, v in enumerate(r)]
        return values + [0] * (num_blocks - len(values))
    inflection = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise TypeError(f"a tuple schedule is (r, inflection), got {r!r}")
        r, inflection = r
        if isinstance(inflection, bool) or not isinstance(inflection, numbers.Real):
            raise TypeError(f"inflection must be a number, got {type(inflection).__name__}")
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"inflection must be in [-1, 1], got {inflection}")
    elif not isinstance(r, numbers.Integral) or isinstance(r, bool):
        raise TypeError(
            f"r must be an int, a fraction in (0, 1), a list of ints or an (r, inflection) tuple, got {type(r).__name__}"
        )
    r = _check_count(r, "r")
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / (num_blocks - 1) if num_blocks > 1 else 0.0
    return [int(low + step * i) for i in range(num_blocks)]


def clamp_schedule(requested: Sequence[int | float], tokens: int, protected: int) -> list[int]:
    """Clamp each block's r to (tokens - protected) // 2 as tokens shrink block by block; a
    fraction becomes ``int(tokens * fraction)`` of the tokens entering the block."""
    clamped = []
    for r in requested:
        r = min(int(tokens * r) if isinstance(r, float) else r, max_merges(tokens, protected))
        clamped.append(r)
        tokens -= r
    return clamped


def spread(total: int, blocks: int, tokens: int, protected: int) -> list[int]:
    """A schedule that merges ``total`` tokens away in ``blocks`` blocks: as even as each
    block's limit allows (ToMe's constant r), else as early as they allow. ``ValueError``
    where no schedule merges that many (a block merges at most half its unprotected tokens)."""
    for front in (False, True):
        schedule, left, count = [], total, tokens
        for block in range(blocks):
            want = left if front else -(-left // (blocks - block))
            schedule.append(min(want, max_merges(count, protected)))
            left, count = left - schedule[-1], count - schedule[-1]
        if not left:
            return schedule
    raise ValueError(f"{blocks} blocks can merge at most {total - left} of {tokens} tokens ({protected} protected), "
                     f"not {total}: each merges at most half of its unprotected tokens")
