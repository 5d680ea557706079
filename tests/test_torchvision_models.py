"""torchvision VisionTransformer: nn.MultiheadAttention folds the heads into the batch
([N, B*H, d]) and the tokens with the batch ([N*B, C]); the token-flow analysis follows
both folds and the shape repair re-infers the folded entries."""

import pytest
import torch
import torchvision

import tome_fx

TINY = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=3)


def make(dtype=torch.float32):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(**TINY)
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    return model.eval().to(dtype)


def test_r0_gives_the_original_outputs_with_inputs_from_image_size():
    model = make()
    fast = tome_fx.transform(model, 0)  # [3, 32, 32] from model.image_size and conv_proj
    assert fast.input_shapes == [(3, 32, 32)] and fast.plan.protected == 1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_merging_changes_values_not_shapes_for_any_batch():
    model = make()
    fast = tome_fx.transform(model, 3)
    assert fast.token_counts == [17, 14, 11]
    with torch.no_grad():
        for batch in (1, 2, 5):
            x = torch.randn(batch, 3, 32, 32)
            got, want = fast(x), model(x)
            assert got.shape == want.shape
            assert not torch.allclose(got, want)


def test_exact_duplicate_patches_merge_without_changing_the_output():
    """Positions zeroed and every other set-A patch a copy of its set-B neighbour: merging the
    copies in block 0 is exact (proportional attention across the folded head/batch views)."""
    model = make(torch.float64)
    with torch.no_grad():
        model.encoder.pos_embedding.zero_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pairs = [2, 6, 10, 14]  # token t (1 + patch index) copies token t + 1; class token is 0
    for t in pairs:
        dst, src = t - 1, t
        x[..., dst // 4 * 8:dst // 4 * 8 + 8, dst % 4 * 8:dst % 4 * 8 + 8] = \
            x[..., src // 4 * 8:src // 4 * 8 + 8, src % 4 * 8:src % 4 * 8 + 8]
    fast = tome_fx.transform(model, [len(pairs)], example_inputs=x)
    assert fast.token_counts == [17, 13, 13]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-9, atol=1e-9)
        assert not torch.allclose(tome_fx.transform(model, [len(pairs)], prop_attn=False)(x), model(x))


def test_vit_b_16_transforms_at_its_stated_size():
    model = torchvision.models.vit_b_16().eval()  # weights=None: no download
    fast = tome_fx.transform(model, 8)
    assert fast.input_shapes == [(3, 224, 224)]
    assert fast.token_counts == [197 - 8 * i for i in range(13)]
    with torch.no_grad():
        assert fast(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_fullgraph_matches_eager_without_recompiling_for_a_new_batch(dtype):
    model = make(dtype)
    compiled = tome_fx.compile(model, 3, fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled(torch.randn(2, 3, 32, 32, dtype=dtype))
        with torch._dynamo.config.patch(error_on_recompile=True):
            x = torch.randn(5, 3, 32, 32, dtype=dtype)
            got = compiled(x)
        want = compiled.model(x)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:  # fused kernels round differently in bf16 (and may flip a near-tied match)
        assert torch.nn.functional.cosine_similarity(got.float(), want.float(), dim=-1).min() > 0.99
