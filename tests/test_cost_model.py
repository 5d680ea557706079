"""The sympy cost model against FLOPs counted by torch's FlopCounterMode."""

import pytest
import sympy
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import tome_fx
from tome_fx import cost


def counted_flops(model, x) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def manual_attention_vit():
    """Attention as matmuls: FlopCounterMode has no formula for CPU's fused sdpa kernel."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=3
    ).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


@pytest.mark.parametrize("schedule", [0, 1, 5, 10, (8, -1), [3, 0, 7]])
def test_predicted_flops_equal_counted_flops(manual_attention_vit, schedule):
    """Patch embedding and head are outside the model, so the saving is compared; at r=0
    the blocks alone are checked against the count minus embedding and head."""
    model, x = manual_attention_vit, torch.randn(2, 3, 32, 32)
    original = counted_flops(model, x)
    fast = tome_fx.transform(model, schedule)
    base = fast.predicted_flops(batch=2, merging=False)
    embed_and_head = 2 * (2 * 64 * 48 * 3 * 4 * 4 + 2 * 48 * 3)
    assert base == original - embed_and_head
    assert original - counted_flops(fast, x) == base - fast.predicted_flops(batch=2)


def test_plain_vit_dims_give_the_same_flops_as_a_transformed_model(manual_attention_vit):
    fast = tome_fx.transform(manual_attention_vit, 6)
    dims = cost.ViTDims(tokens=65, width=48, depth=4, mlp_ratio=4, heads=3, protected=1)
    assert dims.flops(6) == fast.predicted_flops()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(4, 300), c=st.integers(1, 64), m=st.integers(1, 6), depth=st.integers(1, 12), r=st.integers(0, 30)
)
def test_closed_form_matches_the_block_by_block_sum(n, c, m, depth, r):
    """Without clamping (every block keeps enough tokens), the summed closed form equals the
    exact per-block count up to the merge's ceil/floor (at most d/2 per block)."""
    if n - depth * r < 2:
        return
    counts = [n - i * r for i in range(depth)]
    exact = cost.blocks_flops(counts, [r] * depth, c, m, d=c)
    closed = cost.constant_r_flops(n, c, m, depth, r, d=c, b=1)
    slack = depth * c / 2 if r else depth * (n * n * c / 2)  # r=0: the closed form still counts merges
    assert abs(sympy.nsimplify(exact - closed)) <= slack


@pytest.mark.parametrize("target", [0.1, 0.3, 0.45])
def test_schedule_for_reduction_is_the_smallest_r_reaching_the_target(target):
    dims = cost.ViTDims(tokens=197, width=384, depth=12, mlp_ratio=4, heads=6)
    r = cost.schedule_for_reduction(target, dims)
    assert dims.flops(r) <= (1 - target) * dims.flops(0) < dims.flops(r - 1)


def test_deit_small_bound_at_r13():
    dims = cost.ViTDims(tokens=197, width=384, depth=12, mlp_ratio=4, heads=6)
    assert cost.speedup_bound(13, dims) == pytest.approx(1.715, abs=0.005)
    with pytest.raises(ValueError, match="no constant r"):
        cost.schedule_for_reduction(0.99, dims)
