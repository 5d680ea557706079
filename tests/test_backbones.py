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
def _clip(family="CLIPModel"):
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(tower, vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(tower, image_size=32, patch_size=4)
    if family == "CLIPModel":
        model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:  # SigLIP's vision tower ends in its MAP head
        model = T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=vision))
    model.eval()
    ids = torch.randint(2, 100, (2, 16))
    ids[:, -1] = 1  # the end token, which the text tower pools
    return model, {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32)}


def test_clip_whole_model_is_refused_naming_the_scope_that_would_work():
    """Each tower is tried on its own: the text tower's causal mask is refused, so the
    error names the vision tower only."""
    model, inputs = _clip()
    with pytest.raises(tome_fx.UnsupportedModelError, match="pass scope='vision_model'$"):
        tome_fx.transform(model, 2, example_inputs=inputs)


@pytest.mark.parametrize("family", ["CLIPModel", "SiglipModel"])
def test_vision_scope_merges_images_and_leaves_text_bitwise_equal(family):
    model, inputs = _clip(family)
    tokens = 65 if family == "CLIPModel" else 64  # SigLIP has no class token
    with torch.no_grad():
        want = model(**inputs)
        same = tome_fx.transform(model, 0, example_inputs=inputs, scope="vision_model")(**inputs)
        fast = tome_fx.transform(model, 4, example_inputs=inputs, scope="vision_model")
        got = fast(**inputs)
    assert fast.token_counts == [tokens, tokens - 4, tokens - 8]
    assert [b.name.split(".")[0] for b in fast.plan.blocks] == ["vision_model"] * 2
    assert_same(same, want, 1e-6)
    assert torch.equal(got.text_embeds, want.text_embeds)
    assert got.image_embeds.shape == want.image_embeds.shape
    assert not torch.allclose(got.image_embeds, want.image_embeds)


def test_checkpointing_with_a_scope_warns_that_the_rest_runs_without_it():
    model, inputs = _clip()
    model.activation_checkpointing_enable()
    with pytest.warns(UserWarning, match=r"only the blocks under scope \['vision_model'\] run checkpointed"):
        fast = tome_fx.transform(model.train(), 2, example_inputs=inputs, scope="vision_model")
    assert fast.grad_checkpointing


def test_scope_must_name_a_submodule():
    model, inputs = _clip()
    with pytest.raises(ValueError, match="'vision' names no submodule.*'vision_model'"):
        tome_fx.transform(model, 2, example_inputs=inputs, scope="vision")
    with pytest.raises(ValueError, match="whole model"):
        tome_fx.transform(model, 2, example_inputs=inputs, scope="")
    for wrong in ([], 5):
        with pytest.raises(TypeError, match="non-empty list"):
            tome_fx.transform(model, 2, example_inputs=inputs, scope=wrong)


def test_scoped_model_compiles_and_matches_eager():
    model, inputs = _clip()
    compiled = tome_fx.compile(model, 2, example_inputs=inputs, scope=["vision_model"], rope="representative",
                               fullgraph=True)
    assert (compiled.model.scope, compiled.model.rope) == (("vision_model",), "representative")
    assert "scope=['vision_model']" in repr(compiled.model)
    with torch.no_grad():
        assert_same(compiled(**inputs), compiled.model(**inputs), 1e-4)


class _Block(torch.nn.Module):
    """A pre-norm block with sdpa and an optional mask."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def attend(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        x = x + self.proj(self.attend(x, mask)[3].transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.norm2(x))


def _pairs(batch=2, tokens=16, dim=16):
    """Tokens (2j, 2j+1) equal: each bipartite pair is a pair of duplicates."""
    return torch.randn(batch, tokens // 2, dim, dtype=torch.float64).repeat_interleave(2, 1)


def test_scope_covering_part_of_a_masked_stream_restages_the_mask_after_it():
    """Blocks after the scope read merged tokens and apply the shared mask: the mask is
    restaged for them as for the blocks in the scope."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([_Block() for _ in range(3)])

        def forward(self, x, keep):
            mask = keep[:, None, None, :]
            for block in self.blocks:
                x = block(x, mask)
            return x

    torch.manual_seed(0)
    model, x = Model().double().eval(), _pairs()
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[1, 12:] = False
    scoped = tome_fx.transform(model, [4], example_inputs=(x, keep), scope="blocks.0")
    whole = tome_fx.transform(model, [4, 0, 0], example_inputs=(x, keep))
    with torch.no_grad():
        torch.testing.assert_close(scoped(x, keep), whole(x, keep), rtol=0, atol=0)
        torch.testing.assert_close(scoped(x, keep)[:, :12], model(x, keep)[:, :12], rtol=1e-10, atol=1e-10)


def test_a_pooling_heads_own_mask_is_respected_by_the_merges():
    """The head pools the first 5 tokens only, a mask the blocks do not share (built from
    the same input and a position): merges never join tokens 4 and 5, which it tells apart,
    so merging the other 7 duplicate pairs is exact."""

    class Model(torch.nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.blocks = torch.nn.ModuleList([_Block(), _Block()])
            self.latent = torch.nn.Parameter(torch.randn(1, 1, dim))
            self.q, self.kv = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim)

        def forward(self, x, keep):
            mask = keep[:, None, None, :]
            for block in self.blocks:
                x = block(x, mask)
            head_mask = (keep & (torch.arange(x.shape[1]) < 5))[:, None, None, :]
            k, v = self.kv(x).chunk(2, -1)
            q = self.q(self.latent.expand(x.shape[0], -1, -1))[:, None]
            return torch.nn.functional.scaled_dot_product_attention(q, k[:, None], v[:, None], attn_mask=head_mask)

    torch.manual_seed(0)
    model, x = Model().double().eval(), _pairs()
    keep = torch.ones(2, 16, dtype=torch.bool)
    fast = tome_fx.transform(model, [7, 0], example_inputs=(x, keep))
    with torch.no_grad():
        torch.testing.assert_close(fast(x, keep), model(x, keep), rtol=1e-10, atol=1e-10)
        _, state = fast.forward_with_tokens(x, keep)
    assert (state.positions[:, 4] != state.positions[:, 5]).all()


def test_refusals_of_the_new_rules():
    """A per-token table whose product also enters the residual stream is not rotary terms;
    a split over one of two token axes; a per-query mask added by baddbmm; attention with
    input-fed queries and no residual."""

    class TableIntoStream(_Block):
        def __init__(self):
            super().__init__()
            self.register_buffer("gain", torch.linspace(0.5, 2.0, 16)[:, None].repeat(1, 16))

        def forward(self, x, mask=None):
            h = self.norm1(x) * self.gain
            B, N, C = x.shape
            q, k, _ = self.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            v = self.qkv(self.norm1(x))[..., 2 * C:].reshape(B, N, self.heads, -1).transpose(1, 2)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return x + self.proj(a.transpose(1, 2).reshape(B, N, C)) + h

    class SplitMaps(_Block):
        def forward(self, x, mask=None):
            q, k, v, a = self.attend(x)
            weights = (q @ k.transpose(-2, -1)).softmax(-1)
            B, N, C = x.shape
            return x + self.proj(a.transpose(1, 2).reshape(B, N, C)), weights.split([1, N - 1], -1)[1]

    class QueryMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.cross = _Block(), torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x, text, allow):
            x = self.block(x)
            return x + self.cross(x, text, text, attn_mask=(~allow).repeat_interleave(2, 0))[0]

    class NoResidual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.pool = _Block(), _Block()

        def forward(self, x):
            return self.pool.attend(self.block(x))[3]

    x = _pairs().float()
    cases = [
        (torch.nn.Sequential(_Block(), TableIntoStream()), (x,), "a tensor of a fixed token count"),
        (torch.nn.Sequential(_Block(), SplitMaps()), (x,), "splits one of several token axes"),
        (QueryMask(), (x, torch.randn(2, 5, 16), torch.rand(2, 16, 5) > 0.3), "fixed token count along the queries"),
        (NoResidual(), (x,), "no residual connection"),
    ]
    for model, args, reason in cases:
        with pytest.raises(tome_fx.UnsupportedModelError, match=reason):
            tome_fx.transform(model.eval(), 2, example_inputs=args)


def test_timm_siglip_names_transform_with_their_map_head():
    """timm's own SigLIP config (no class token, ``global_pool="map"``) at a small size."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, patch_size=4,
                              embed_dim=64, depth=2, num_heads=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tome_fx.transform(model, 0)(x), model(x), rtol=1e-5, atol=1e-5)
        fast = tome_fx.transform(model, 8)
        assert fast(x).shape == (2, 5) and fast.plan.protected == 0 and fast.token_counts == [64, 56, 48]


# -- rotary position embeddings ------------------------------------------------------------------
def _timm_rope(name, **kwargs):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2,
                              num_classes=5, **kwargs)
    with torch.no_grad():  # rope-vit starts its layer scale at 1e-5 and its head at 1e-3 of normal:
        for name, param in model.named_parameters():  # the blocks would barely change the output
            if "gamma" in name:
                param.fill_(1.0)
        model.head.reset_parameters()
    return model.eval()


ROPE_FAMILIES = {
    "vit_small_patch16_rope_224": lambda: _timm_rope("vit_small_patch16_rope_224"),
    "vit_small_patch16_rope_mixed_224": lambda: _timm_rope("vit_small_patch16_rope_mixed_224"),
    "eva02_tiny_patch14_224": lambda: _timm_rope("eva02_tiny_patch14_224", ref_feat_shape=(8, 8)),
    "DINOv3ViTModel": lambda: _dinov3(),
}


def _dinov3():
    torch.manual_seed(0)
    return T.DINOv3ViTModel(T.DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=4,
                                              num_register_tokens=4)).eval()


@pytest.mark.parametrize("rope", ["mean", "representative"])
@pytest.mark.parametrize("name", ROPE_FAMILIES)
def test_rope_models_r0_is_the_original_and_merging_keeps_shapes(name, rope):
    model, x = ROPE_FAMILIES[name](), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert_same(tome_fx.transform(model, 0, example_inputs=x, rope=rope)(x), want, 1e-5)
        fast = tome_fx.transform(model, 8, example_inputs=x, rope=rope)
        got = fast(x)
    assert fast.token_counts[-1] == fast.token_counts[0] - 16
    assert [t.shape for t in tensors(got)] == [t.shape for t in tensors(want)]
    assert not all(torch.allclose(g, w) for g, w in zip(tensors(got), tensors(want)))


def _duplicate_pairs(images, patch=4):
    """Patch 2j-1 copied into patch 2j (raster order, 8 x 8 patches): with one leading token,
    token pairs (2j, 2j+1) are the bipartite pairs (A even, B odd) and hold equal patches."""
    patches = images.unfold(2, patch, patch).unfold(3, patch, patch)  # a view into images
    flat = patches.reshape(*images.shape[:2], 64, patch, patch).clone()
    flat[:, :, 2:64:2] = flat[:, :, 1:63:2]
    patches.copy_(flat.reshape(patches.shape))


@pytest.mark.parametrize("rope", ["mean", "representative"])
def test_rope_rotary_rows_equal_within_merged_pairs_merge_exactly(rope):
    """The oracle for the rotary path: duplicate patches whose rotary rows are equal too
    (row 2j = row 2j-1, rows differing between pairs) merge exactly, in float64, under either
    rule; reading the wrong rows for a merged token, or a wrong split or rejoin of the class
    token, would not."""
    model = _timm_rope("vit_small_patch16_rope_224").double()
    table = model.rope.pos_embed  # [64 patches, sin | cos]
    angles = torch.rand(32, table.shape[1] // 2, dtype=torch.float64) * 6
    pairs = torch.cat([angles[:1], angles[1:].repeat_interleave(2, 0), angles[-1:]])[:64]  # rows 2j-1, 2j equal
    table.copy_(torch.cat([pairs.sin(), pairs.cos()], 1))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _duplicate_pairs(x)
    fast = tome_fx.transform(model, [31], example_inputs=x, rope=rope)
    assert fast.token_counts == [65, 34, 34]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rope", ["mean", "representative"])
def test_dinov3_rotary_rows_equal_within_merged_pairs_merge_exactly(rope):
    """DINOv3 splits 1 + 4 register tokens off before rotating and puts them back: with
    duplicate patches whose rotary rows are equal within pairs (rows differing between
    pairs), merging them leaves every output unchanged; with rows differing within pairs
    (the control) it does not."""
    model = _dinov3().double()
    angles = (torch.rand(32, 32, dtype=torch.float64) * 6).repeat_interleave(2, 0)  # patches 2j, 2j+1 share a row
    tables = [angles.cos(), angles.sin()]
    model.rope_embeddings.forward = lambda pixel_values: tuple(tables)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)
    flat = patches.reshape(2, 3, 64, 4, 4).clone()
    flat[:, :, 1:64:2] = flat[:, :, 0:63:2]  # with 5 leading tokens, patches (2j, 2j+1) are pairs
    patches.copy_(flat.reshape(patches.shape))
    fast = tome_fx.transform(model, [32], example_inputs=x, rope=rope)
    assert fast.plan.protected == 5 and fast.token_counts == [69, 37, 37]
    with torch.no_grad():
        assert_same(fast(x), model(x), 1e-9)
    tables[0] = torch.rand(64, 32, dtype=torch.float64).cos()
    fast = tome_fx.transform(model, [32], example_inputs=x, rope=rope)
    with torch.no_grad():
        assert not torch.allclose(fast(x).last_hidden_state, model(x).last_hidden_state, atol=1e-6)


def test_the_rope_rules_differ():
    model, x = ROPE_FAMILIES["vit_small_patch16_rope_224"](), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mean, first = (tome_fx.transform(model, 8, example_inputs=x, rope=rule)(x) for rule in ("mean", "representative"))
    assert not torch.allclose(mean, first)
    with pytest.raises(ValueError, match="rope is one of"):
        tome_fx.transform(model, 8, example_inputs=x, rope="coords")


def test_rope_compiled_matches_eager():
    model, x = ROPE_FAMILIES["eva02_tiny_patch14_224"](), torch.randn(3, 3, 32, 32)
    compiled = tome_fx.compile(model, 8, example_inputs=x, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), compiled.model(x), rtol=1e-4, atol=1e-4)


def test_restage_table_rules():
    """One original token before ``start``; groups {1, 3} and {2} (sizes 2 and 1)."""
    from tome_fx import merge

    table = torch.tensor([[1.0], [10.0], [100.0]])  # rows of original tokens 1, 2, 3
    positions = torch.tensor([[0, 1, 2, 1]])
    size = torch.tensor([[1.0, 2.0, 1.0]])
    mean = merge.restage_table(table, positions, size, 3, 0, 1, 1, "mean")
    first = merge.restage_table(table, positions, size, 3, 0, 1, 1, "representative")
    assert mean.shape == (1, 2, 1) and mean.flatten().tolist() == [50.5, 10.0]
    assert first.flatten().tolist() == [1.0, 10.0]
