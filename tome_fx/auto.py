"""``r="auto"``: the schedule chosen for a target, by the cost model and, with ``measure=True``,
by timing candidates on the user's own inputs and device.

Targets (one of them): ``speedup`` (the original's time over the merged model's), ``flops``
(the share of the original's FLOPs the merged model may spend, by the cost model: the
attention blocks and merges, as ``predicted_flops`` counts them) or ``latency`` (seconds per
call on the example inputs; the original is timed once to know how far it is). Candidates
are constant ``r`` (ToMe's schedule): the least merging predicted to meet the target wins,
since more merging costs accuracy. The FLOP bound ignores the per-op overhead of the merge,
which dominates at batch 1 and on narrow models, so the r it picks is timed once beside the
original; ``measure=True`` searches instead, timing candidates from that ``r`` up, and takes
the least merging measured to meet the target, else the fastest measured. Never a model
measured slower than the original: ``r=0`` then, with a warning that says why.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .merge import max_merges
from .passes import TomePlan

LADDER = 7  # candidates timed with measure=True (each beside the original)
REPEATS = 5  # interleaved timed calls of each, after one warm-up call


@dataclass(frozen=True)
class Target:
    speedup: float | None = None
    flops: float | None = None
    latency: float | None = None
    measure: bool = False

    def __post_init__(self):
        given = {k: v for k, v in (("speedup", self.speedup), ("flops", self.flops), ("latency", self.latency))
                 if v is not None}
        if len(given) != 1:
            raise TypeError(f'r="auto" takes one target: speedup=, flops= or latency=; got {sorted(given) or "none"}')
        (name, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
        if name == "speedup" and value <= 1:
            raise ValueError(f"speedup must be above 1 (the original's), got {value}")
        if name == "flops" and value >= 1:
            raise ValueError(f"flops is the share of the original's FLOPs to spend, below 1; got {value}")


@dataclass(frozen=True)
class AutoChoice:
    """How ``r="auto"`` chose: the target, the ``r`` chosen, the FLOP bound of every constant r
    it considered and, with ``measure=True``, the speedup measured for each r timed (its median
    time beside the original's, interleaved); ``why``: in words."""

    target: Target
    r: int
    bounds: dict[int, float]
    measured: dict[int, float] = field(default_factory=dict)
    why: str = ""
    met: bool = True  # whether the r chosen meets the target (else: the closest, or r=0)


def time_calls(models: dict[int, Callable[[], object]], repeats: int = REPEATS) -> dict[int, float]:
    """Median seconds of each call, the calls interleaved (one warm-up each) so drift and
    noise fall on all alike."""
    samples = {key: [] for key in models}
    with torch.no_grad():
        for call in models.values():
            call()
        for _ in range(repeats):
            for key, call in models.items():
                began = time.perf_counter()
                call()
                samples[key].append(time.perf_counter() - began)
    return {key: statistics.median(values) for key, values in samples.items()}


def choose(plan: TomePlan, build: Callable[[int], Callable[[], object]], original: Callable[[], object],
           target: Target) -> AutoChoice:
    """The constant r for ``target``. ``plan``: the model's, captured at r=0; ``build(r)``: a
    call of the model merging r per block; ``original``: a call of the original."""
    tokens = plan.blocks[0].tokens_in
    full = plan.predicted_flops(merging=False)
    bounds = {r: full / plan.rescheduled(r).predicted_flops() for r in range(max_merges(tokens, plan.protected) + 1)}
    seconds = time_calls({0: original})[0] if target.latency is not None else None
    if seconds is not None and seconds <= target.latency:
        return AutoChoice(target, 0, bounds, {}, f"the original already takes {seconds:.4g} s, within "
                          f"latency={target.latency:g}")
    wanted = _wanted_speedup(target, seconds)
    meeting = [r for r, bound in bounds.items() if r and bound >= wanted]
    fastest = max(bounds, key=bounds.get)
    if not target.measure:
        if bounds[fastest] <= 1:
            return AutoChoice(target, 0, bounds, {}, "the cost model predicts no r faster than the original", False)
        r = meeting[0] if meeting else fastest
        # the bound cannot see the merge's per-op overhead: one timing beside the original makes
        # sure the model returned is not slower
        timed = time_calls({0: original, r: build(r)})
        measured = {r: timed[0] / timed[r]}
        if measured[r] <= 1:
            return AutoChoice(target, 0, bounds, measured, f"r={r}, the least whose FLOP bound meets the target "
                              f"({bounds[r]:.2f}x), was measured {measured[r]:.2f}x the original's speed (the "
                              "merge's per-op overhead, at small batch or width); measure=True searches larger r",
                              False)
        if not meeting:
            return AutoChoice(target, r, bounds, measured, f"no r reaches the target by the cost model; r={r} comes "
                              f"closest (bound {bounds[r]:.2f}x, measured {measured[r]:.2f}x)", False)
        if target.flops is None and measured[r] < wanted:  # (a FLOP budget is the cost model's to meet)
            return AutoChoice(target, r, bounds, measured, f"r={r}, the least whose FLOP bound meets the target "
                              f"({bounds[r]:.2f}x), was measured {measured[r]:.2f}x; measure=True searches larger r",
                              False)
        return AutoChoice(target, r, bounds, measured, f"the least r whose FLOP bound meets the target "
                          f"({bounds[r]:.2f}x; measured {measured[r]:.2f}x)")
    # the least r measured to meet the target: the predicted r, else the most, then bisection
    # between them (more merging assumed no slower); each r is timed beside the original
    wanted_measured = 1.0 if target.flops is not None else wanted  # (a FLOP budget: only never slower)
    measured = {}

    def meets(r: int) -> bool:
        if r not in measured:
            timed = time_calls({0: original, r: build(r)})
            measured[r] = timed[0] / timed[r]
        return measured[r] >= wanted_measured and measured[r] > 1

    low, high = (meeting[0] if meeting else fastest), max(bounds)
    if not meets(low) and low < high and meets(high):
        while high - low > 1 and len(measured) < LADDER:
            middle = (low + high) // 2
            low, high = (low, middle) if meets(middle) else (middle, high)
    met = [r for r in measured if meets(r)]
    if met:
        return AutoChoice(target, min(met), bounds, measured, f"the least r of those timed that meets the target "
                          f"({measured[min(met)]:.2f}x)")
    best = max(measured, key=measured.get)
    if measured[best] <= 1:
        return AutoChoice(target, 0, bounds, measured, f"every r timed ({', '.join(map(str, sorted(measured)))}) was "
                          f"measured no faster than the original (r={best}: {measured[best]:.2f}x)", False)
    return AutoChoice(target, best, bounds, measured, f"no r timed meets the target; r={best} was the fastest "
                      f"({measured[best]:.2f}x)", False)


def _wanted_speedup(target: Target, seconds: float | None) -> float:
    """The speedup that meets the target: a FLOP share's inverse, or how far the original is
    from the latency."""
    if target.speedup is not None:
        return target.speedup
    if target.flops is not None:
        return 1 / target.flops
    return seconds / target.latency


