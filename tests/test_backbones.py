"""Today's backbones (issue 12): SigLIP2's attention-pool head with its NaFlex padding mask,
rotary position embeddings (timm EVA-02 and RoPE ViTs, HF DINOv3), and merging one part of
a multi-part model (``scope=``, CLIP's vision tower)."""

import pytest
import torch
import transformers as T
from torch.utils import _pytree as pytree

import tome_fx


def tensors(output):
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def assert_same(got, want, tol):
    for g, w in zip(tensors(got), tensors(want), strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


# -- SigLIP2: NaFlex patches, a padding mask, and the MAP head reading the mask too -------------
PATCH = 4


def _siglip2(dtype=torch.float32):
    torch.manual_seed(0)
    config = T.Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_patches=64, patch_size=PATCH, vision_use_head=True)
    model = T.Siglip2VisionModel._from_config(config, attn_implementation="sdpa").eval().to(dtype)
    pixels = torch.randn(2, 64, 3 * PATCH * PATCH, dtype=dtype)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 40:] = 0  # the second image is 8 x 5 patches, padded to 64
    pixels[1, 40:] = 0
    shapes = torch.tensor([[8, 8], [8, 5]])
    return model, {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def test_siglip2_r0_is_the_original_and_merging_keeps_shapes():
    model, inputs = _siglip2()
    with torch.no_grad():
        want = model(**inputs)
        assert_same(tome_fx.transform(model, 0, example_inputs=inputs)(**inputs), want, 1e-5)
        got = tome_fx.transform(model, 4, example_inputs=inputs)(**inputs)
    assert [t.shape for t in tensors(got)] == [t.shape for t in tensors(want)]
    assert not torch.allclose(got.pooler_output, want.pooler_output)


def test_siglip2_duplicate_patches_merge_exactly_with_padding_and_its_head_mask():
    """Patches 2j copy patches 2j+1 in the first 32 tokens, positions zeroed, float64: merging
    8 pairs in block 0 leaves the pooled output (the MAP head, masked over the padding) and
    the un-merged hidden states unchanged. The padded image merges padding first."""
    model, inputs = _siglip2(torch.float64)
    with torch.no_grad():
        model.embeddings.position_embedding.weight.zero_()
    pixels = inputs["pixel_values"]
    pixels[:, 0:32:4] = pixels[:, 1:32:4]
    fast = tome_fx.transform(model, [8], example_inputs=inputs)
    assert fast.token_counts == [64, 56, 56]
    with torch.no_grad():
        assert_same(fast(**inputs), model(**inputs), 1e-9)
