"""``r="auto"``: a schedule chosen for a target by the cost model, or by timing (a stubbed timer
here, so the tests are deterministic; real timings are in benchmarks/auto.md)."""

import pytest
import timm
import torch

import tome_fx
from tome_fx import auto


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=5).eval()
    return model, torch.randn(2, 3, 32, 32)


def _timer(monkeypatch, speedup):
    """``auto.time_calls`` stubbed: the original takes 1 s, a model merging r takes 1 / speedup(r)."""
    calls = []

    def fake(models, repeats=auto.REPEATS):
        calls.append(sorted(models))
        return {r: 1.0 if r == 0 else 1.0 / speedup(r) for r in models}

    monkeypatch.setattr(auto, "time_calls", fake)
    return calls


@pytest.fixture
def timer(monkeypatch):
    """The stub every test runs under unless it sets its own: each r twice as fast as the bound
    needs, so a choice by the cost model passes its check."""
    return _timer(monkeypatch, lambda r: 1 + r)


def test_a_speedup_target_takes_the_least_r_whose_flop_bound_meets_it(small, timer):
    model, x = small
    fast = tome_fx.transform(model, "auto", example_inputs=x, speedup=1.5)
    choice = fast.auto_choice
    assert choice.met and fast.schedule == [choice.r] * 4
    assert timer == [[0, choice.r]]  # timed once beside the original
    assert fast.predicted_flops(merging=False) / fast.predicted_flops() >= 1.5
    assert choice.bounds[choice.r - 1] < 1.5 <= choice.bounds[choice.r]
    with torch.no_grad():
        assert fast(x).shape == model(x).shape


def test_a_flop_budget_is_a_share_of_the_original(small, timer):
    model, x = small
    fast = tome_fx.transform(model, "auto", example_inputs=x, flops=0.6)
    assert fast.predicted_flops() <= 0.6 * fast.predicted_flops(merging=False)
    assert fast.auto_choice.bounds[fast.auto_choice.r - 1] < 1 / 0.6


def test_measure_finds_the_least_r_measured_to_meet_the_target(small, monkeypatch):
    """The bound is optimistic: here each r measures 1 + r/40, so 1.5x needs r >= 20; the
    search starts at the r the bound predicts and bisects upward, each r timed beside the
    original, and returns the least r it measured to meet the target."""
    model, x = small
    calls = _timer(monkeypatch, lambda r: 1 + r / 40)
    fast = tome_fx.transform(model, "auto", example_inputs=x, speedup=1.5, measure=True)
    choice = fast.auto_choice
    assert choice.met and choice.r >= 20 and 1 + choice.r / 40 >= 1.5
    assert choice.r == min(r for r, s in choice.measured.items() if s >= 1.5)
    assert all(keys[0] == 0 and len(keys) == 2 for keys in calls) and len(calls) <= auto.LADDER
    assert fast.schedule[0] == choice.r


@pytest.mark.parametrize("measure", [False, True])
def test_a_model_never_comes_back_slower_than_the_original(small, monkeypatch, measure):
    """Every r measured slower (per-op overhead on a narrow model at batch 1): r=0 and a warning,
    whether r came from the cost model (its one check timing) or from the search."""
    model, x = small
    _timer(monkeypatch, lambda r: 0.9)
    why = "every r timed .* no faster than the original" if measure else "r=.*, was measured 0.90x the original's speed"
    with pytest.warns(UserWarning, match='r="auto" merges no token: ' + why):
        fast = tome_fx.transform(model, "auto", example_inputs=x, speedup=1.2, measure=measure)
    assert not any(fast.schedule) and not fast.auto_choice.met
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_a_latency_target_measures_the_original_first(small, monkeypatch):
    model, x = small
    _timer(monkeypatch, lambda r: 1 + r / 10)
    with pytest.warns(UserWarning, match="already takes 1 s, within latency=2"):
        assert not any(tome_fx.transform(model, "auto", example_inputs=x, latency=2.0).schedule)
    fast = tome_fx.transform(model, "auto", example_inputs=x, latency=0.5, measure=True)  # needs 2x: r >= 10
    assert fast.auto_choice.met and fast.auto_choice.r >= 10


def test_an_unreachable_target_warns_and_takes_the_closest(small, timer):
    model, x = small
    with pytest.warns(UserWarning, match="does not meet the target"):
        fast = tome_fx.transform(model, "auto", example_inputs=x, speedup=50.0)
    assert fast.auto_choice.r == max(fast.auto_choice.bounds, key=fast.auto_choice.bounds.get)


@pytest.mark.parametrize("r, kwargs, error, match", [
    ("auto", {}, TypeError, "one target"),
    ("auto", {"speedup": 1.5, "flops": 0.5}, TypeError, "one target"),
    ("auto", {"speedup": 1.0}, ValueError, "above 1"),
    ("auto", {"flops": 1.5}, ValueError, "below 1"),
    (8, {"speedup": 1.5}, TypeError, 'go with r="auto"'),
    ("fast", {}, TypeError, 'tuple or "auto", got str'),
])
def test_bad_targets_are_refused_before_capture(small, r, kwargs, error, match):
    model, x = small
    with pytest.raises(error, match=match):
        tome_fx.transform(model, r, example_inputs=x, **kwargs)


def test_compile_takes_the_auto_target(small, timer):
    model, x = small
    fast = tome_fx.compile(model, "auto", example_inputs=x, speedup=1.5)
    assert fast.model.auto_choice.met


def test_a_choice_by_the_cost_model_that_measures_short_of_the_target_warns(small, monkeypatch):
    """The bound says r meets 1.5x; its check timing says 1.2x: that r comes back (faster than
    the original), with a warning that the target is not met and measure=True would search."""
    model, x = small
    _timer(monkeypatch, lambda r: 1.2)
    with pytest.warns(UserWarning, match="does not meet the target.*measured 1.20x; measure=True searches larger r"):
        fast = tome_fx.transform(model, "auto", example_inputs=x, speedup=1.5)
    assert fast.auto_choice.r > 0 and not fast.auto_choice.met
