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


# -- scope=: one tower of CLIP -------------------------------------------------------------------
def _clip():
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = T.CLIPConfig(text_config=dict(tower, vocab_size=100, max_position_embeddings=16, bos_token_id=0,
                                           eos_token_id=1, pad_token_id=1),
                          vision_config=dict(tower, image_size=32, patch_size=4), projection_dim=16)
    model = T.CLIPModel(config).eval()
    ids = torch.randint(2, 100, (2, 16))
    ids[:, -1] = 1  # the end token, which the text tower pools
    return model, {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32)}


def test_clip_whole_model_is_refused_with_the_scopes_that_would_work():
    model, inputs = _clip()
    with pytest.raises(tome_fx.UnsupportedModelError, match="scope='vision_model' .* or scope='text_model'"):
        tome_fx.transform(model, 2, example_inputs=inputs)


def test_clip_vision_scope_merges_images_and_leaves_text_bitwise_equal():
    model, inputs = _clip()
    with torch.no_grad():
        want = model(**inputs)
        same = tome_fx.transform(model, 0, example_inputs=inputs, scope="vision_model")(**inputs)
        fast = tome_fx.transform(model, 4, example_inputs=inputs, scope="vision_model")
        got = fast(**inputs)
    assert fast.token_counts == [65, 61, 57]
    assert [b.name.split(".")[0] for b in fast.plan.blocks] == ["vision_model"] * 2
    assert_same(same, want, 1e-6)
    assert torch.equal(got.text_embeds, want.text_embeds)
    assert got.image_embeds.shape == want.image_embeds.shape
    assert not torch.allclose(got.image_embeds, want.image_embeds)


def test_scope_must_name_a_submodule():
    model, inputs = _clip()
    with pytest.raises(ValueError, match="'vision' names no submodule.*'vision_model'"):
        tome_fx.transform(model, 2, example_inputs=inputs, scope="vision")
