"""Joint attention (SD3, FLUX, CogVideoX): image tokens and text tokens joined by a cat along
the tokens into one attention, then cut back into their streams. The image tokens merge, the
text tokens never do; proportional attention gives each merged key its group's weight and each
text key log 1 = 0 (exact-duplicates oracle, float64)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tome_fx
import tome_fx.sd

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
        if self.cut == "values in the other order":
            v = torch.cat([parts[1][2], parts[0][2]], dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        sizes = [n, TEXT] if self.order == "image first" else [TEXT, n]
        if self.cut == "split":
            first, second = out.split_with_sizes(sizes, dim=1)
        elif self.cut == "from the end":  # the second stream counted from the end
            first, second = out[:, : -sizes[1]], out[:, -sizes[1]:]
        elif self.cut == "narrow from the end":
            first, second = out.narrow(1, 0, sizes[0]), out.narrow(1, -sizes[1], sizes[1])
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
@pytest.mark.parametrize("cut", ["slices", "split", "from the end"])
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
    """tomesd's scheme on SD3's joint blocks (``tome_fx.sd.apply`` on the transformer): each
    block's image tokens merge after the norm (one dst per 2x2 cell of the patch grid), the
    joint attention and the MLP run on fewer image tokens, and each branch un-merges before
    its residual add."""
    model, x = _sd3(), _sd3_inputs()
    fast = tome_fx.sd.apply(model, 0.5, use_rand=False, merge_mlp=True, prop_attn=True)
    with torch.no_grad():
        got, want = fast(**x).sample, model(**x).sample
    assert [(p.tokens, p.r, p.merged) for p in fast.plans[next(iter(fast.plans))]] == [(16, 8, ("attn", "mlp"))] * 2
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    plain = tome_fx.sd.apply(model, 0.5, use_rand=False)  # tomesd's defaults: no proportional attention
    with torch.no_grad():
        assert (plain(**x).sample - want).abs().max() > 1e-4  # the negative control


def test_sd3_whole_stream_merging_is_exact_for_duplicates():
    model, x = _sd3(), _sd3_inputs()
    fast = tome_fx.transform(model, [4], example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(fast(**x).sample, model(**x).sample, rtol=1e-9, atol=1e-9)


def test_sd35_dual_attention_is_refused_for_what_it_is():
    with pytest.raises(tome_fx.UnsupportedModelError, match="parallel attention branches on one input"):
        tome_fx.transform(_sd3(dual=(0,)), [4], example_inputs=_sd3_inputs())


def test_an_sd3_pipeline_runs_at_two_resolutions_with_guidance_and_is_restored():
    """Built offline from random-init parts, called with prompt embeddings (no text encoders)."""
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
        sample_size=16, shift_factor=0.0, scaling_factor=1.0).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    embeddings = dict(prompt_embeds=torch.randn(1, 7, 16), pooled_prompt_embeds=torch.randn(1, 8),
                      negative_prompt_embeds=torch.randn(1, 7, 16), negative_pooled_prompt_embeds=torch.randn(1, 8))

    def images(side):
        return pipe(**embeddings, height=side, width=side, num_inference_steps=2, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    before = images(16)
    assert tome_fx.sd.apply(pipe, 0.5) is pipe and pipe.transformer is not transformer
    for side in (16, 32):
        assert images(side).shape == (1, 3, side, side)
    assert [shapes[0] for shapes in pipe.transformer.plans] == [(2, 4, 8, 8), (2, 4, 16, 16)]  # guidance doubles
    assert all(p.merged == ("attn",) for plan in pipe.transformer.plans.values() for p in plan)
    tome_fx.sd.remove(pipe)
    assert pipe.transformer is transformer and torch.equal(images(16), before)


def test_sd3_per_block_compiled_equals_eager():
    """Random latents: with duplicate cells the scores tie, and eager and compiled sorts may
    break ties apart (merging other, equally good, pairs)."""
    model, x = _sd3().float(), {k: v.float() for k, v in _sd3_inputs().items()}
    x["hidden_states"] = torch.randn(2, 4, 8, 8)
    fast = tome_fx.sd.apply(model, 0.5, use_rand=False, merge_mlp=True)
    with torch.no_grad():
        eager = fast(**x).sample
        fast.compile(fullgraph=True)
        torch.testing.assert_close(fast(**x).sample, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cut, reason", [
    ("narrow from the end", "narrows the token axis from a start counted from the end"),
    ("values in the other order", "keys and values are different token sequences"),
])
def test_found_by_review_are_refused(cut, reason):
    """A narrow counted from the end crashed at run time; keys and values joined in different
    orders were accepted (key i no longer paired with value i once tokens merge)."""
    x, txt = _pairs()
    with pytest.raises(tome_fx.UnsupportedModelError, match=reason):
        tome_fx.transform(_JointModel("text first", cut).double().eval(), [4], example_inputs=(x, txt))
