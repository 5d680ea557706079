"""Joint attention (SD3, FLUX, CogVideoX): image tokens and text tokens joined by a cat along
the tokens into one attention, then cut back into their streams. The image tokens merge, the
text tokens never do; proportional attention gives each merged key its group's weight and each
text key log 1 = 0 (exact-duplicates oracle, float64)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tome_fx
from tome_fx.integrations.per_branch import PerBranchToMe
from tome_fx.passes.branch_merges import BranchSettings

diffusers = pytest.importorskip("diffusers")

DIM, HEADS, TEXT, PATCHES = 8, 2, 5, 16


class _JointBlock(nn.Module):
    """A double-stream block written by hand: ``order`` says which stream comes first in the
    joint sequence, ``cut`` how the output is cut back (slices, or split_with_sizes as FLUX)."""

    def __init__(self, order, cut):
        super().__init__()
        self.order, self.cut = order, cut
        self.img_qkv, self.txt_qkv = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, 3 * DIM)
        self.img_out, self.txt_out, self.mlp = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, img, txt):
        b, n, _ = img.shape
        heads = lambda t: t.unflatten(-1, (3, HEADS, DIM // HEADS)).permute(2, 0, 3, 1, 4)  # noqa: E731
        (iq, ik, iv), (tq, tk, tv) = heads(self.img_qkv(self.norm(img))), heads(self.txt_qkv(txt))
        parts = ((iq, ik, iv), (tq, tk, tv)) if self.order == "image first" else ((tq, tk, tv), (iq, ik, iv))
        q, k, v = (torch.cat([a, c], dim=2) for a, c in zip(*parts))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        sizes = [n, TEXT] if self.order == "image first" else [TEXT, n]
        if self.cut == "split":
            first, second = out.split_with_sizes(sizes, dim=1)
        else:
            first, second = out[:, : sizes[0]], out[:, sizes[0]:]
        img_part, txt_part = (first, second) if self.order == "image first" else (second, first)
        img = img + self.img_out(img_part)
        return img + self.mlp(self.norm(img)), txt + self.txt_out(txt_part)


class _JointModel(nn.Module):
    def __init__(self, order, cut):
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.blocks = nn.ModuleList([_JointBlock(order, cut), _JointBlock(order, cut)])

    def forward(self, x, txt):
        img = self.embed(x)
        for block in self.blocks:
            img, txt = block(img, txt)
        return img, txt


def _pairs(batch=2):
    """Patches duplicated in (even, odd) pairs: ToMe's first merge takes exactly the copies."""
    x = torch.randn(batch, PATCHES, 4, dtype=torch.float64)
    x[:, 0::2] = x[:, 1::2]
    return x, torch.randn(batch, TEXT, DIM, dtype=torch.float64)


@pytest.mark.parametrize("order", ["image first", "text first"])
@pytest.mark.parametrize("cut", ["slices", "split"])
def test_joint_attention_merges_exactly(order, cut):
    torch.manual_seed(0)
    model = _JointModel(order, cut).double().eval()
    x, txt = _pairs()
    fast = tome_fx.transform(model, [4], example_inputs=(x, txt))
    assert fast.schedule == [4, 0]
    with torch.no_grad():
        got, want = fast(x, txt), model(x, txt)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)  # image (un-merged) and text outputs
        x3, txt3 = _pairs(3)
        torch.testing.assert_close(fast(x3, txt3), model(x3, txt3), rtol=1e-9, atol=1e-9)  # another batch
    unfair = tome_fx.transform(model, [4], example_inputs=(x, txt), prop_attn=False)
    with torch.no_grad():
        assert (unfair(x, txt)[1] - want[1]).abs().max() > 1e-4  # the negative control: text reads merged keys


def _sd3(dual=()):
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=dual).eval().double()
    model.pos_embed.pos_embed.zero_()  # positions equal within each cell: merging duplicates stays exact
    return model


def _sd3_inputs():
    """8x8 latents, 2x2 patches: a 4x4 token grid whose 2x2 cells hold four equal tokens."""
    base = torch.randn(2, 4, 2, 2, 2, 2, dtype=torch.float64)  # batch, channels, cell row/col, patch row/col
    latents = base.repeat_interleave(2, 2).repeat_interleave(2, 3)  # each cell's patch copied 2x2
    latents = latents.permute(0, 1, 2, 4, 3, 5).reshape(2, 4, 8, 8)
    return dict(hidden_states=latents, encoder_hidden_states=torch.randn(2, 7, 16, dtype=torch.float64),
                pooled_projections=torch.randn(2, 8, dtype=torch.float64), timestep=torch.ones(2))


def test_sd3_per_block_merging_is_exact_for_duplicate_cells():
    """tomesd's scheme on SD3's joint blocks: each block's image tokens merge after the norm
    (one dst per 2x2 cell), the joint attention and the MLP run on fewer image tokens, and
    each branch un-merges before its residual add."""
    model, x = _sd3(), _sd3_inputs()
    fast = PerBranchToMe(model, BranchSettings(0.5, (4, 4), kinds=frozenset({"attn", "mlp"})), prop_attn=True)
    with torch.no_grad():
        got, want = fast(**x).sample, model(**x).sample
    assert [p.merged for p in fast.plans[next(iter(fast.plans))]] == [("attn", "mlp")] * 2
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    plain = PerBranchToMe(model, BranchSettings(0.5, (4, 4), kinds=frozenset({"attn"})), prop_attn=False)
    with torch.no_grad():
        assert (plain(**x).sample - want).abs().max() > 1e-4  # without proportional attention it is not exact


def test_sd3_whole_stream_merging_is_exact_for_duplicates():
    model, x = _sd3(), _sd3_inputs()
    fast = tome_fx.transform(model, [4], example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(fast(**x).sample, model(**x).sample, rtol=1e-9, atol=1e-9)


def test_sd35_dual_attention_is_refused_for_what_it_is():
    with pytest.raises(tome_fx.UnsupportedModelError, match="parallel attention branches on one input"):
        tome_fx.transform(_sd3(dual=(0,)), [4], example_inputs=_sd3_inputs())
