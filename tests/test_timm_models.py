"""tome_fx on the timm VisionTransformer family, checked against tests/reference.py."""

import pytest
import timm
import torch

import tome_fx
from reference import reference_vit

VARIANTS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
    "deit_base": ("deit_base_patch16_224", {"depth": 3}),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", {"depth": 4}),
    "deit_base_distilled": ("deit_base_distilled_patch16_224", {"depth": 3}),
    "vit_tiny_augreg": ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", {}),
    "vit_small_augreg": ("vit_small_patch16_224.augreg_in21k_ft_in1k", {"depth": 4}),
    "vit_base_augreg": ("vit_base_patch16_224.augreg_in21k_ft_in1k", {"depth": 3}),
    "layerscale": ("vit_tiny_patch16_224", {"init_values": 1e-5, "depth": 4}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True, "depth": 4}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4, "depth": 4}),
    "avg_no_class_token": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg", "depth": 4}),
    "avg_with_registers": ("vit_tiny_patch16_224", {"reg_tokens": 4, "global_pool": "avg", "depth": 4}),
}
PROTECTED = {"deit_tiny_distilled": 2, "deit_small_distilled": 2, "deit_base_distilled": 2, "registers": 5,
             "avg_no_class_token": 0, "avg_with_registers": 5}


def make(variant, fused=True, dtype=torch.float64):
    name, kwargs = VARIANTS[variant]
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval().to(dtype)
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "manual"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference_implementation_in_float64(variant, fused):
    model = make(variant, fused)
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    fast = tome_fx.transform(model, (16, -1))
    assert fast.plan.protected == PROTECTED.get(variant, 1)
    with torch.no_grad():
        out, state = fast.forward_with_tokens(images)
        expected, size = reference_vit(model, images, fast.schedule)
        original = model(images)
    assert out.shape == original.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.size, size[..., 0], rtol=0, atol=0)
    assert not torch.allclose(out, original)  # merging did change something
    assert state.size.shape[1] == fast.token_counts[-1]


@pytest.mark.parametrize("variant", ["deit_tiny", "deit_tiny_distilled", "avg_with_registers"])
def test_r0_gives_the_original_outputs(variant):
    model = make(variant, dtype=torch.float32)
    images = torch.randn(3, 3, 224, 224)
    fast = tome_fx.transform(model, 0)
    with torch.no_grad():
        assert torch.equal(fast(images), model(images))
    assert fast.token_counts == [fast.token_counts[0]] * len(fast.token_counts)


def test_each_block_removes_its_scheduled_tokens():
    model = make("deit_small", dtype=torch.float32)
    fast = tome_fx.transform(model, [0, 30, 200, 5])
    assert fast.schedule[:2] == [0, 30]
    assert fast.schedule[2] == (197 - 30 - 1) // 2  # clamped: protected class token stays
    assert fast.token_counts[1:4] == [197, 167, 84]
    with torch.no_grad():
        _, state = fast.forward_with_tokens(torch.randn(2, 3, 224, 224))
    assert state.size.shape == (2, fast.token_counts[-1])
    assert torch.equal(state.size.sum(1), torch.full((2,), 197.0))


def test_deit_small_compiled_fullgraph_matches_reference_in_float64():
    """The issue's bar: DeiT-S at r=13, eager and torch.compile(fullgraph=True), vs the paper."""
    model = timm.create_model("deit_small_patch16_224").eval().double()
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    fast = tome_fx.transform(model, 13)
    assert fast.token_counts == [197 - 13 * i for i in range(13)]
    with torch.no_grad():
        expected, _ = reference_vit(model, images, fast.schedule)
        eager = fast(images)
        compiled = torch.compile(fast, fullgraph=True)(images)
    torch.testing.assert_close(eager, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(compiled, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", ["bias", "flash"])
@pytest.mark.parametrize("pool", ["avg", "map", "map_manual"])
def test_exact_duplicate_patches_merge_without_changing_the_output(pool, form):
    """Whole model: patches that are exact copies merge, and logits stay the same. With
    ``global_pool="map"`` (SigLIP's attention-pool head, sdpa or its manual path) the latent
    query attends over the merged tokens with proportional attention; in either form of it
    (``prop_attn="flash"``: log(size) as a key column, not a mask)."""
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=3, num_classes=5, global_pool=pool[:3]
    ).eval().double()
    if pool == "map_manual":
        model.attn_pool.fused_attn = False
    with torch.no_grad():
        model.pos_embed.zero_()  # positions would make copies differ
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    patches = images.unfold(2, 4, 4).unfold(3, 4, 4)  # [B, C, 8, 8, 4, 4] view into images
    flat = patches.reshape(2, 3, 64, 4, 4).clone()
    for j in range(1, 32):  # token positions (2j, 2j+1) hold patches (2j-1, 2j): A and B
        flat[:, :, 2 * j] = flat[:, :, 2 * j - 1]
    patches.copy_(flat.reshape(2, 3, 8, 8, 4, 4))
    fast = tome_fx.transform(model, [31], prop_attn=form)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), model(images), rtol=1e-10, atol=1e-10)
    assert fast.token_counts == [65, 34, 34, 34]
