"""The check each zoo family gets (tests/test_timm_zoo.py, tests/test_hf_zoo.py): as a new user
calls it, ``transform(model, 0.5)`` merges by the scheme expected, saying what ``summary()``
should, or is refused with the expected words; r=0 is the original, bit for bit."""

import warnings

import pytest
import torch

import tome_fx


def check_family(model, x, expected: str, said: list[str], output=lambda out: out) -> None:
    """``expected``: "stream", "block", or a pattern of the refusal; ``output``: the tensor of
    a call's result that is compared (``last_hidden_state`` of an HF output)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if expected not in ("stream", "block"):
            with pytest.raises(tome_fx.UnsupportedModelError, match=expected):
                tome_fx.transform(model, 0.5, example_inputs=x)
            return
        fast = tome_fx.transform(model, 0.5, example_inputs=x)
        identity = tome_fx.transform(model, 0, example_inputs=x, scheme=expected)
    assert isinstance(fast, tome_fx.ToMeModel if expected == "stream" else tome_fx.LocalToMe)
    if expected == "block":
        assert any(p.merged for plan in fast.plans.values() for p in plan), fast.summary()
        assert all(words in fast.summary() for words in said), fast.summary()
    with torch.no_grad():
        ref = output(model(x))
        assert output(fast(x)).shape == ref.shape
        torch.testing.assert_close(output(identity(x)), ref, rtol=0, atol=0)
