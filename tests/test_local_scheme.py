"""``transform(scheme=...)``: local (per-block) merging where whole-stream merging cannot go
(Swin's windows and stages), and every attention op accounted for (ConViT's GPSA).

Small configs. The Swin twin's windows cover each stage's whole grid (no shift), so input
duplicated in 8 x 8-pixel blocks stays duplicated in 2 x 2 cells at both stages (patch
merging concatenates 2 x 2 neighbourhoods) once the relative-position tables are zeroed:
merging the duplicates is then exact (float64).
"""

import warnings

import pytest
import torch
from torch.nn import functional as F

import tome_fx
from tome_fx.local import LocalToMe
from tome_fx.passes.branch_merges import BranchSettings

timm = pytest.importorskip("timm")


def _swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=2, window_size=16, embed_dim=16, depths=(1, 1), num_heads=(2, 2),
                           num_classes=3).eval().double()


def _duplicated(batch: int = 2) -> torch.Tensor:
    """Images whose 8 x 8-pixel blocks are constant (4 x 4 patches alike at 2 px patches)."""
    return torch.randn(batch, 3, 4, 4, dtype=torch.float64).repeat_interleave(8, 2).repeat_interleave(8, 3)


def _merging(r, model, x, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = tome_fx.transform(model, r, example_inputs=x, **kwargs)
    return fast, [str(w.message) for w in caught]


def test_swin_merges_per_block_by_default_with_a_fraction():
    model, x = _swin(), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fast, said = _merging(0.5, model, x)
    assert isinstance(fast, LocalToMe) and fast.original is model
    assert any("merges per block (scheme='block'), not whole-stream" in s and "residual stream has shape ('batch', 16, 16"
               in s for s in said)
    summary = fast.summary()
    # attention within its window, its relative-position table read per merged pair
    assert "layers.0.blocks.0: 256 tokens, 128 merged away in mlp" in summary and "attn: 128 of 256" in summary
    assert "layers.1.blocks.0: 64 tokens, 32 merged away in mlp; attn: 32 of 64 merged away in its window" in summary
    out = fast(x)
    assert out.shape == model(x).shape and not torch.allclose(out, model(x))  # merging changed something


def test_swin_identity_at_zero_and_exact_on_duplicates():
    model = _swin()
    for block in (model.layers[0].blocks[0], model.layers[1].blocks[0]):
        torch.nn.init.zeros_(block.attn.relative_position_bias_table)
    x = _duplicated()
    fast, said = _merging(0, model, x, scheme="block")
    assert any("merges no token" in s for s in said)  # no silent no-op
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    fast, _ = _merging(0.5, model, x, scheme="block")
    assert fast.summary().count("attn: ") == 2
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-12)


def test_shifted_windows_leave_their_attention_unmerged_and_say_why():
    from timm.models.swin_transformer import SwinTransformer

    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2,), num_heads=(2,),
                            num_classes=3).eval()
    fast, said = _merging(0.5, model, torch.randn(2, 3, 32, 32), scheme="block")
    summary = fast.summary()
    assert "layers.0.blocks.0: 256 tokens, 128 merged away in mlp" in summary and "in each of 16 windows" in summary
    assert "attn not merged: " in summary and "a mask per window, as Swin's shifted windows have" in summary
    assert any("1 blocks leave a branch unmerged" in s for s in said)


def test_scheme_arguments():
    model, x = _swin(), torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="scheme is one of"):
        tome_fx.transform(model, 0.5, example_inputs=x, scheme="local")
    with pytest.raises(ValueError, match="fraction of each block's tokens"):
        tome_fx.transform(model, 4, example_inputs=x, scheme="block")
    with pytest.raises(ValueError, match="trace_source belong to whole-stream merging"):
        tome_fx.transform(model, 0.5, example_inputs=x, scheme="block", trace_source=True)
    # an int r keeps whole-stream merging's refusal, which names the scheme that would take the model
    for scheme in ("stream", "auto"):
        with pytest.raises(tome_fx.UnsupportedModelError, match=r"\('batch', 16, 16, 16\).*scheme='block'"):
            tome_fx.transform(model, 4, example_inputs=x, scheme=scheme)


@pytest.mark.parametrize("class_token", [False, True])
def test_block_scheme_on_a_token_sequence(class_token):
    """A ViT's 16 patch tokens are read as a 4 x 4 grid, behind its class token (which never
    merges); exact on duplicated 2 x 2 patch cells with the position table zeroed (float64)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=class_token,
                              global_pool="token" if class_token else "avg", num_classes=3).eval().double()
    torch.nn.init.zeros_(model.pos_embed)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64).repeat_interleave(16, 2).repeat_interleave(16, 3)
    fast, _ = _merging(0.5, model, x, scheme="block")
    assert "blocks.0: 16 tokens, 8 merged away in attn, mlp" in fast.summary()
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-12)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert not torch.allclose(fast(x), model(x))


def test_block_scheme_refuses_a_sequence_that_is_no_grid():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3).eval()
    with pytest.raises(tome_fx.UnsupportedModelError, match="25 tokens are no square h x w grid behind the 1 learned"):
        tome_fx.transform(model, 0.5, example_inputs=torch.randn(2, 3, 32, 48), scheme="block")


@pytest.mark.parametrize("linear", [False, True])
def test_pooled_keys_see_every_token_while_the_queries_merge(linear):
    """PVT v2's spatial-reduction attention pools its keys and values from the whole grid (a
    strided conv, or adaptive pooling with ``linear``): those keep reading every token and the
    queries alone merge, so input duplicated in 2 x 2 cells is merged exactly (float64). Its
    Mix-FFN convolves the grid: that branch stays unmerged, saying why (its conv zeroed here so
    that the second block's input stays duplicated)."""
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    model = PyramidVisionTransformerV2(depths=(2,), embed_dims=(16,), num_heads=(2,), sr_ratios=(2,), mlp_ratios=(2,),
                                       linear=linear, num_classes=3).eval().double()
    model.patch_embed.proj = torch.nn.Conv2d(3, 16, 4, 4, dtype=torch.float64)  # patches that keep duplicates
    for block in model.stages[0].blocks:
        torch.nn.init.zeros_(block.mlp.dwconv.weight)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64).repeat_interleave(8, 2).repeat_interleave(8, 3)
    fast, said = _merging(0.5, model, x, scheme="block")
    summary = fast.summary()
    assert "stages.0.blocks.1: 64 tokens, 32 merged away in attn" in summary and "; mlp not merged" in summary, summary
    assert "a convolution or pooling over the grid" in summary and "PVT's spatial" not in summary
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-12)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert (fast(x) - model(x)).abs().max() > 1e-9  # (random init: small attention outputs)


class _WindowsAndChannels(torch.nn.Module):
    """Florence-2's DaViT in small on a token sequence [B, 64, C] (an 8 x 8 grid): attention
    within 4 x 4 windows cut straight to [windows * B, 16, C], then channel attention as sdpa
    over [B, heads, channels, tokens] (the logits contract the tokens), then an MLP."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(3))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(2))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x):
        b, n, c = x.shape
        h = self.norms[0](x).view(b, 2, 4, 2, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, c)
        q, k, v = self.qkv[0](h).reshape(-1, 16, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 2, 2, 4, 4, c)
        x = x + self.proj[0](h.permute(0, 1, 3, 2, 4, 5).reshape(b, n, c))
        q, k, v = self.qkv[1](self.norms[1](x)).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 4, 1)
        h = F.scaled_dot_product_attention(q, k, v)  # [b, heads, channels, tokens]
        x = x + self.proj[1](h.permute(0, 3, 1, 2).reshape(b, n, c))
        return x + self.proj[2](self.norms[2](x))


def test_windows_of_a_sequence_and_channel_attention_merge_exactly():
    """Duplicated 2 x 2 cells of the grid: merging within each window and merging under channel
    attention (its logits' sum over tokens weighted by size, its 1/sqrt(tokens) scale kept at
    the captured count) change no output (float64)."""
    torch.manual_seed(0)
    model = _WindowsAndChannels().double().eval()
    x = torch.randn(2, 4, 4, 8, dtype=torch.float64).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 64, 8)
    fast, _ = _merging(0.5, model, x, scheme="block")
    summary = fast.summary()
    assert "attn: 8 of 16 merged away in each of 4 windows" in summary and "32 merged away in attn, mlp" in summary, summary
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-12)
    x = torch.randn(2, 64, 8, dtype=torch.float64)
    assert (fast(x) - model(x)).abs().max() > 1e-6


class _GridBlockWithLearnedBias(torch.nn.Module):
    """A [B, h, w, C] block whose sdpa takes a learned [1, heads, N, N] bias as its mask (MaxViT's)."""

    def __init__(self, dim: int = 8, side: int = 4):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        # equal within 2 x 2 cells: an entry per pair of cells, repeated over their tokens
        cells = torch.randn(1, 2, side // 2, side // 2, side // 2, side // 2)
        per_token = cells.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4).repeat_interleave(2, 5)
        self.bias = torch.nn.Parameter(per_token.reshape(1, 2, side * side, side * side))

    def forward(self, x):
        b, h, w, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, h * w, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, h, w, c))
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize("rule", ["mean", "representative"])
def test_a_learned_pair_bias_is_read_per_merged_pair(rule):
    """Before: the attention branch merged, the bias was left at 16 x 16 and the graph failed at
    run time (MaxViT: 49 against 25 keys). Now each merged pair reads it by the rel_pos rule:
    exact where it is equal within the merged cells and the tokens are duplicates (float64)."""
    model, x = _GridBlockWithLearnedBias().eval().double(), torch.randn(2, 2, 2, 8, dtype=torch.float64)
    x = x.repeat_interleave(2, 1).repeat_interleave(2, 2)  # duplicated in 2 x 2 cells
    settings = BranchSettings(0.5, (0, 0), kinds=frozenset({"attn", "mlp"}), grid_stream=True, rel_pos=rule)
    fast = LocalToMe(model, settings, prop_attn=True)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-12)
    assert "8 merged away in attn, mlp" in fast.summary()
    x = torch.randn(2, 4, 4, 8, dtype=torch.float64)
    assert not torch.allclose(fast(x), model(x))  # approximate otherwise


def test_a_constant_pair_mask_is_not_averaged():
    """A mask per (query, key) pair that no parameter feeds (a causal one) is no learned table:
    the attention branch stays unmerged, named, and the MLP merges."""
    model = _GridBlockWithLearnedBias().eval()
    bias = torch.full((16, 16), float("-inf")).triu(1)
    del model.bias
    model.register_buffer("bias", bias[None, None].expand(1, 2, 16, 16).clone())
    fast, said = _merging(0.5, model, torch.randn(2, 4, 4, 8), scheme="block")
    assert "attn not merged" in fast.summary() and "8 merged away in mlp" in fast.summary()
    assert "a bias per (query, key) pair not computed from parameters alone" in fast.summary()


def test_compile_takes_a_model_merged_per_block():
    model, x = _GridBlockWithLearnedBias().eval(), torch.randn(2, 4, 4, 8)
    fast = tome_fx.compile(model, 0.5, example_inputs=x, fullgraph=True, scheme="block")
    assert isinstance(fast, LocalToMe)
    torch.testing.assert_close(fast(x), tome_fx.transform(model, 0.5, example_inputs=x, scheme="block")(x))


@pytest.mark.parametrize("per_sample", [False, True])
def test_merged_pair_table_against_brute_force(per_sample):
    """One table for every sample, or one per sample (HF BEiT expands its table to the batch)."""
    from tome_fx import merge

    table, positions = torch.randn(2 if per_sample else 1, 2, 5, 5, dtype=torch.float64), torch.tensor([[0, 1, 0, 2], [1, 2, 0, 0]])
    size = torch.tensor([[2.0, 1, 1], [2.0, 1, 1]], dtype=torch.float64)
    got = merge.merged_pair_table(table, positions, size, 4, 0, "mean", lead=1)
    for b in range(2):
        full = torch.cat([torch.tensor([0]), positions[b] + 1])  # the class token holds itself
        for i in range(4):
            for j in range(4):
                a, c = (full == i).nonzero().flatten(), (full == j).nonzero().flatten()
                want = table[b if per_sample else 0][:, a][:, :, c].mean((1, 2))
                torch.testing.assert_close(got[b, :, i, j], want)
    first = merge.merged_pair_table(table, positions, size, 4, 0, "representative", lead=1)
    torch.testing.assert_close(first[0, :, 1, 1], table[0, :, 1, 1])  # token 1 holds patches 0 and 2: patch 0 first


def test_convit_gpsa_blocks_are_named_not_silently_left_out():
    from timm.models.convit import ConVit

    model = ConVit(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, local_up_to_layer=2,
                   num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    fast, said = _merging(2, model, x)
    assert fast.schedule == [2]  # the one standard block merges
    unmerged = fast.plan.unmerged_attention
    assert [a.name.split(" (")[0] for a in unmerged] == ["block blocks.0.attn", "block blocks.1.attn"]
    assert 0.5 < fast.plan.unmerged_share < 1
    assert any("2 attention ops run on every token" in s and "GPSA" in s for s in said)
    assert "2 attention ops run on every token" in fast.plan.summary()
    torch.testing.assert_close(tome_fx.transform(model, 0, example_inputs=x)(x), model(x), rtol=0, atol=0)


def test_a_plain_vit_accounts_for_every_attention():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    fast, said = _merging(2, model, torch.randn(2, 3, 32, 32))
    assert fast.plan.unmerged_attention == () and fast.plan.attention_macs > 0
    assert not any("attention ops run on every token" in s for s in said)


class _SequenceFirst(torch.nn.Module):
    """OpenAI CLIP's blocks: nn.MultiheadAttention without batch_first, on [tokens, batch, C]."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.norm, self.attn = torch.nn.LayerNorm(dim), torch.nn.MultiheadAttention(dim, 2)

    def forward(self, x):
        x = x.transpose(0, 1)
        h = self.norm(x)
        return (x + self.attn(h, h, h, need_weights=False)[0]).transpose(0, 1)


def test_a_sequence_first_stream_is_named_not_read_as_a_grid():
    """[tokens, batch, C]: per-block merging says it is sequence first, rather than reading the
    batch as the token count ("its 2 tokens are no square grid")."""
    with pytest.raises(tome_fx.UnsupportedModelError, match=r"\('tokens', 'batch', 8\) is sequence first"):
        tome_fx.transform(_SequenceFirst().eval(), 0.5, example_inputs=torch.randn(2, 16, 8), scheme="block")
