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


def test_sd35_dual_attention_merges_per_block_and_is_refused_whole_stream():
    """SD3.5's dual-attention block: a second self-attention reads the block's input (its own
    modulation of the shared norm) and is added after the joint attention's residual. Per
    block it is a branch of its own, merged from the same matching; the stream has no single
    point between the two to merge at, which whole-stream merging says."""
    model, x = _sd3(dual=(0,)), _sd3_inputs()
    fast = tome_fx.sd.apply(model, 0.5, use_rand=False, merge_mlp=True, prop_attn=True)
    with torch.no_grad():
        want = model(**x).sample
        torch.testing.assert_close(fast(**x).sample, want, rtol=1e-9, atol=1e-9)
        assert (tome_fx.sd.apply(model, 0.5, use_rand=False)(**x).sample - want).abs().max() > 1e-4
    assert [p.merged for p in next(iter(fast.plans.values()))] == [("attn", "attn 2", "mlp"), ("attn", "mlp")]
    with pytest.raises(tome_fx.UnsupportedModelError, match="parallel attention branches on one input"):
        tome_fx.transform(model, [4], example_inputs=x)


def _small_vae():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
        sample_size=16, shift_factor=0.0, scaling_factor=1.0).eval()


def _applies_and_restores(pipe, generate) -> dict:
    """``tome_fx.sd.apply`` swaps the pipeline's transformer, which then runs at two sizes;
    ``remove`` gives the original back, bit for bit. Returns the plans made."""
    original, before = pipe.transformer, generate(16)
    assert tome_fx.sd.apply(pipe, 0.5) is pipe and pipe.transformer is not original
    for side in (16, 32):
        assert generate(side).shape[-2:] == (side, side)
    plans = pipe.transformer.plans
    tome_fx.sd.remove(pipe)
    assert pipe.transformer is original and torch.equal(generate(16), before)
    return plans


def test_an_sd3_pipeline_runs_at_two_resolutions_with_guidance_and_is_restored():
    """Built offline from random-init parts, called with prompt embeddings (no text encoders)."""
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16).eval()
    vae = _small_vae()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    embeddings = dict(prompt_embeds=torch.randn(1, 7, 16), pooled_prompt_embeds=torch.randn(1, 8),
                      negative_prompt_embeds=torch.randn(1, 7, 16), negative_pooled_prompt_embeds=torch.randn(1, 8))

    def images(side):
        return pipe(**embeddings, height=side, width=side, num_inference_steps=2, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    plans = _applies_and_restores(pipe, images)
    assert [shapes[0] for shapes in plans] == [(2, 4, 8, 8), (2, 4, 16, 16)]  # guidance doubles
    assert all(p.merged == ("attn",) for plan in plans.values() for p in plan)


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


def _flux(axes=(4, 4, 0), single=2):
    """A small FLUX transformer: one double-stream block, ``single`` single-stream blocks (the
    [text, image] sequence joined inside each). ``axes=(4, 4, 0)``: the rotary table reads the
    ids' rows only, so tokens side by side in a row rotate alike."""
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=single, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=axes).eval().double()


def _flux_inputs(batch=2):
    """A 4 x 4 grid of packed latents whose tokens are copied in pairs along each row (the first
    merge's and a 1 x 2 cell's pairs), with diffusers' documented 2-d ids (no batch)."""
    x = torch.randn(batch, 8, 8, dtype=torch.float64).repeat_interleave(2, 1)
    rows, cols = torch.arange(16).div(4, rounding_mode="floor"), torch.arange(16) % 4
    ids = torch.stack([torch.zeros(16), rows, cols], 1).double()
    return dict(hidden_states=x, encoder_hidden_states=torch.randn(batch, 4, 16, dtype=torch.float64),
                pooled_projections=torch.randn(batch, 8, dtype=torch.float64), timestep=torch.ones(batch).double(),
                img_ids=ids, txt_ids=torch.zeros(4, 3, dtype=torch.float64), return_dict=False)


@pytest.mark.parametrize("schedule", [[8], [0, 8]])
def test_flux_whole_stream_merging_is_exact_for_duplicates(schedule):
    """The rotary table is computed from the ids and read per merged token (text rows kept); the
    single blocks join the text in, the merge takes the image cut after each. With duplicates
    rotating alike, merging them changes nothing; ids that differ within pairs make the rope
    rule approximate, and no proportional attention is the negative control."""
    x = _flux_inputs()
    model = _flux()
    fast = tome_fx.transform(model, schedule, example_inputs=x)
    with torch.no_grad():
        want = model(**x)[0]
        torch.testing.assert_close(fast(**x)[0], want, rtol=1e-9, atol=1e-9)
        unfair = tome_fx.transform(model, schedule, example_inputs=x, prop_attn=False)
        assert (unfair(**x)[0] - want).abs().max() > 1e-4
        rotating = _flux(axes=(2, 2, 4))
        approximate = tome_fx.transform(rotating, schedule, example_inputs=x)(**x)[0]
        assert (approximate - rotating(**x)[0]).abs().max() > 1e-4


def test_flux_per_block_merging_is_exact_for_duplicate_cells():
    """``tome_fx.sd.apply`` on FLUX: the patch grid comes from ``img_ids``; the double block
    merges its image stream, each single block the image piece of its joined sequence."""
    model, x = _flux(), _flux_inputs()
    fast = tome_fx.sd.apply(model, 0.5, sx=2, sy=1, use_rand=False, merge_mlp=True, prop_attn=True)
    with torch.no_grad():
        want = model(**x)[0]
        torch.testing.assert_close(fast(**x)[0], want, rtol=1e-9, atol=1e-9)
        assert (tome_fx.sd.apply(model, 0.5, sx=2, sy=1, use_rand=False)(**x)[0] - want).abs().max() > 1e-4
    (plan,) = fast.plans.values()
    assert [(p.name, p.tokens, p.r) for p in plan] == [
        ("transformer_blocks.0", 16, 8), ("single_transformer_blocks.0", 16, 8), ("single_transformer_blocks.1", 16, 8)]
    with torch.no_grad():
        fast.compile(fullgraph=True)
        x["hidden_states"] = torch.randn_like(x["hidden_states"])  # no ties for the sorts to break apart
        eager = tome_fx.sd.apply(model, 0.5, sx=2, sy=1, use_rand=False, merge_mlp=True, prop_attn=True)(**x)[0]
        torch.testing.assert_close(fast(**x)[0], eager, rtol=1e-5, atol=1e-5)  # FLUX rotates in float32


def test_a_flux_pipeline_runs_at_two_resolutions_with_guidance_and_is_restored():
    """Built offline from random-init parts (no text encoders), with true classifier-free
    guidance (a prompted and an unprompted call per step)."""
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    vae = _small_vae()
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    embeddings = dict(prompt_embeds=torch.randn(1, 5, 16), pooled_prompt_embeds=torch.randn(1, 8),
                      negative_prompt_embeds=torch.randn(1, 5, 16), negative_pooled_prompt_embeds=torch.randn(1, 8))

    def images(side):
        return pipe(**embeddings, height=side, width=side, num_inference_steps=2, true_cfg_scale=2.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    plans = _applies_and_restores(pipe, images)
    assert [shapes[0] for shapes in plans] == [(1, 16, 16), (1, 64, 16)]  # 4 x 4 and 8 x 8 grids
    assert [p.tokens for plan in plans.values() for p in plan] == [16, 16, 64, 64]


def _wan():
    """A small Wan transformer (video, self-attention with a 3-d rotary table computed from the
    latent grid, cross-attention to the text); the table's column part is set to no rotation,
    so tokens side by side in a row rotate alike. Its norms run in float32 (``.float()``), so
    duplicates merge exactly only to float32 precision."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32).eval().double()
    rope = model.rope
    columns = slice(rope.t_dim + rope.h_dim, None)
    rope.freqs_cos[:, columns], rope.freqs_sin[:, columns] = 1.0, 0.0
    return model


def _wan_inputs():
    """2 frames of 8 x 8 latents, 2 x 2 patches: 2 x 4 x 4 tokens, copied in pairs along rows."""
    cells = torch.randn(2, 4, 2, 4, 2, 2, 2, dtype=torch.float64)  # batch, channels, frame, row, column pair, patch
    latents = cells.repeat_interleave(2, 4).permute(0, 1, 2, 3, 5, 4, 6).reshape(2, 4, 2, 8, 8)
    return dict(hidden_states=latents, timestep=torch.ones(2).double(),
                encoder_hidden_states=torch.randn(2, 4, 16, dtype=torch.float64), return_dict=False)


def test_wan_merges_exactly_for_duplicates_per_block_and_whole_stream():
    """The rotary table (written into slices of a fresh tensor, made functional first) is read per
    merged token; per block (2 x 4 x 4 tokens as an 8 x 4 grid of frames' rows) and whole-stream."""
    model, x = _wan(), _wan_inputs()
    with torch.no_grad():
        want = model(**x)[0]
        per_block = tome_fx.sd.apply(model, 0.5, sx=2, sy=1, use_rand=False, merge_mlp=True, prop_attn=True)
        torch.testing.assert_close(per_block(**x)[0], want, rtol=1e-5, atol=1e-5)
        whole = tome_fx.transform(model, [16], example_inputs=x)
        torch.testing.assert_close(whole(**x)[0], want, rtol=1e-5, atol=1e-5)
        # without proportional attention (some pairs merged: were all, every key would count alike)
        plain = tome_fx.sd.apply(model, 0.25, sx=2, sy=1, use_rand=False, merge_mlp=True)
        assert (plain(**x)[0] - want).abs().max() > 1e-3
    (plan,) = per_block.plans.values()
    assert [(p.tokens, p.r, p.merged) for p in plan] == [(32, 16, ("attn", "mlp"))] * 2
    x["hidden_states"] = torch.randn_like(x["hidden_states"])
    with torch.no_grad():
        eager = per_block(**x)[0]
        per_block.compile(fullgraph=True)
        torch.testing.assert_close(per_block(**x)[0], eager, rtol=1e-5, atol=1e-5)


def test_a_wan_pipeline_runs_at_two_resolutions_with_guidance_and_is_restored():
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=1,
                                     scale_factor_spatial=2).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    embeddings = dict(prompt_embeds=torch.randn(1, 6, 16), negative_prompt_embeds=torch.randn(1, 6, 16))

    def video(side):
        return pipe(**embeddings, height=side, width=side, num_frames=3, num_inference_steps=2, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").frames

    plans = _applies_and_restores(pipe, video)
    assert [p.tokens for plan in plans.values() for p in plan] == [64, 64, 256, 256]


def test_match_reuse_across_steps():
    """``reuse=k``: a block's matching is computed at one step and reused for the next k - 1.
    Steps are told apart by the timestep; FLUX's prompted and unprompted calls of one step
    each keep their own matching. k=1 is no reuse, bit for bit; compiled runs the same."""
    model = _flux().float()
    x = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in _flux_inputs().items()}
    torch.manual_seed(1)
    latents = torch.randn(4, 2, 2, 16, 8)  # per step, a prompted and an unprompted call

    def run(fast):
        with torch.no_grad():
            return [fast(**dict(x, hidden_states=h, timestep=torch.full((2,), t)))[0]
                    for t, pair in zip((1.0, 0.8, 0.6, 0.4), latents) for h in pair]

    def apply(**kw):
        return tome_fx.sd.apply(model, 0.5, use_rand=False, sx=2, sy=1, **kw)

    plain = run(apply())
    assert all(torch.equal(a, b) for a, b in zip(plain, run(apply(reuse=1))))
    reusing = apply(reuse=2)
    every_other = run(reusing)  # match at steps 1 and 3, reuse at 2 and 4
    assert [torch.equal(a, b) for a, b in zip(plain, every_other)] == [True, True, False, False] * 2
    assert all(torch.equal(a, b) for a, b in zip(every_other, run(reusing)))  # a new generation matches anew
    with torch.no_grad():  # a one-step model: every call at one timestep, each a generation of its own
        matching, reused = ([m(**dict(x, hidden_states=h, timestep=torch.ones(2)))[0] for h in latents.flatten(0, 1)[:6]]
                            for m in (apply(), apply(reuse=2)))
    assert all(torch.equal(a, b) for a, b in zip(matching, reused))
    compiled = apply(reuse=2)
    compiled.compile(fullgraph=True)
    torch.testing.assert_close(run(compiled), every_other, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reuse must be an int >= 1"):
        apply(reuse=0)


def _sana(layers=1):
    """A small Sana transformer; with one block, no convolution (its Mix-FFN's) mixes the
    duplicate tokens before the attention merges them."""
    torch.manual_seed(0)
    return diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=layers,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1, mlp_ratio=2.0).eval().double()


def _sana_inputs():
    """8 x 8 latents in 1 x 1 patches whose 2 x 2 cells hold four equal tokens."""
    cells = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    return dict(hidden_states=cells.repeat_interleave(2, 2).repeat_interleave(2, 3), timestep=torch.ones(2).double(),
                encoder_hidden_states=torch.randn(2, 5, 16, dtype=torch.float64), return_dict=False)


def test_sana_linear_attention_merges_exactly_per_block():
    """Sana's ReLU linear attention, ``(V φ(K)ᵀ) φ(Q)`` normalised by the sum of φ(K)ᵀφ(Q): its
    sums over the keys become size-weighted, which makes merging duplicates exact with or
    without proportional attention (no softmax to bias). Its Mix-FFN convolves the token grid,
    so whole-stream merging is refused, naming that; per block the MLP branch stays unmerged."""
    model, x = _sana(), _sana_inputs()
    with torch.no_grad():
        want = model(**x)[0]
        for prop_attn in (True, False):  # Sana's attention runs in float32: exact to its precision
            fast = tome_fx.sd.apply(model, 0.5, use_rand=False, prop_attn=prop_attn)
            torch.testing.assert_close(fast(**x)[0], want, rtol=1e-6, atol=1e-6)
        assert [(p.tokens, p.r, p.merged) for p in next(iter(fast.plans.values()))] == [(64, 32, ("attn",))]
        x["hidden_states"] = torch.randn_like(x["hidden_states"])
        model = _sana(layers=2)
        fast = tome_fx.sd.apply(model, 0.5, use_rand=False)
        eager = fast(**x)[0]
        fast.compile(fullgraph=True)
        torch.testing.assert_close(fast(**x)[0], eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(tome_fx.UnsupportedModelError, match="Mix-FFN"):
        tome_fx.transform(model, [8], example_inputs=x)
    with pytest.raises(tome_fx.UnsupportedModelError, match="the mlp branch reshapes its tokens back to their grid"):
        tome_fx.sd.apply(model, 0.5, merge_mlp=True)(**x)


def test_the_denoiser_benchmark_runs(monkeypatch):
    """``tome-fx bench-grid flux`` on a small FLUX: every variant runs, the bound is counted,
    the merge share and the reusing variant are reported."""
    from tome_fx.tools import grid_bench

    x = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in _flux_inputs(1).items() if k != "return_dict"}
    monkeypatch.setitem(grid_bench.DENOISERS, "flux", (lambda: (_flux().float(), x), "small FLUX"))
    rows = grid_bench.run_denoiser("flux", [0.5], "eager", repeats=1)
    assert [r.variant for r in rows] == ["original", "per block r=0.5", "per block r=0.5 reused",
                                         "whole stream r=0.5", "per block r=0.5 attn+mlp"]
    assert rows[1].bound > 1 and 0 < rows[1].merge_share
    assert rows[2].bound is None and rows[2].merge_share is None  # reused: no bound of its own


def test_cogvideox_merges_exactly_for_duplicates_per_block_and_whole_stream():
    """CogVideoX joins the text and video tokens in its norm's output (before the projections),
    so the matching reads the video's part of the joined keys."""
    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, text_embed_dim=16,
        time_embed_dim=8, sample_width=8, sample_height=8, sample_frames=5, patch_size=2, max_text_seq_length=4,
        use_rotary_positional_embeddings=False).eval().double()
    model.patch_embed.pos_embedding.zero_()
    patches = torch.randn(2, 2, 4, 4, 2, 2, 2, dtype=torch.float64)  # batch, frame, channel, row, column pair, 2 x 2 px
    latents = patches.unsqueeze(5).expand(-1, -1, -1, -1, -1, 2, -1, -1).permute(0, 1, 2, 3, 6, 4, 5, 7)
    x = dict(hidden_states=latents.reshape(2, 2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 4, 16, dtype=torch.float64),
             timestep=torch.ones(2).long(), return_dict=False)
    with torch.no_grad():
        want = model(**x)[0]
        per_block = tome_fx.sd.apply(model, 0.5, sx=2, sy=1, use_rand=False, prop_attn=True, merge_mlp=True)
        torch.testing.assert_close(per_block(**x)[0], want, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(tome_fx.transform(model, [16], example_inputs=x)(**x)[0], want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make", [lambda: (_sd3(dual=(0,)), dict(_sd3_inputs(), return_dict=False)),
                                  lambda: (_flux(), _flux_inputs()), lambda: (_wan(), _wan_inputs()),
                                  lambda: (_sana(), _sana_inputs())], ids=["sd3.5", "flux", "wan", "sana"])
def test_r0_is_the_identity(make):
    model, x = make()
    with torch.no_grad():
        assert torch.equal(tome_fx.transform(model, 0, example_inputs=x)(**x)[0], model(**x)[0])
