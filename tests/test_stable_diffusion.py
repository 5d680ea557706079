"""Stable Diffusion through tome_fx.sd: tomesd's results bit for bit (float64), a real
pipeline at two resolutions, and proportional attention as an exact improvement."""

import copy

import pytest
import torch

import tome_fx  # noqa: F401  -- first
from tome_fx import sd

diffusers = pytest.importorskip("diffusers")
tomesd = pytest.importorskip("tomesd")

SMALL = dict(sample_size=16, in_channels=4, out_channels=4, cross_attention_dim=16, attention_head_dim=8,
             norm_num_groups=8)
UNETS = {
    # SD 1.5 / 2.x style: cross-attention, one transformer layer per block
    "sd15": lambda: diffusers.UNet2DConditionModel(
        **SMALL, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SDXL style: text_time added conditioning, several transformer layers per block
    "sdxl": lambda: diffusers.UNet2DConditionModel(
        **SMALL, layers_per_block=1, block_out_channels=(32, 64), transformer_layers_per_block=(2, 2),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16,
    ),
}


def _unet(name):
    torch.manual_seed(0)
    return UNETS[name]().eval().double()


def _inputs(name, batch=2, side=16):
    kwargs = dict(sample=torch.randn(batch, 4, side, side, dtype=torch.float64), timestep=torch.tensor(7),
                  encoder_hidden_states=torch.randn(batch, 5, 16, dtype=torch.float64))
    if name == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 16, dtype=torch.float64),
                                       "time_ids": torch.randn(batch, 6, dtype=torch.float64)}
    return kwargs


def _run(unet, x):
    """Sample, timestep and text positionally (tomesd's size hook reads the first argument)."""
    rest = {k: v for k, v in x.items() if k not in ("sample", "timestep", "encoder_hidden_states")}
    return unet(x["sample"], x["timestep"], x["encoder_hidden_states"], **rest).sample


@pytest.mark.parametrize("name", UNETS)
@pytest.mark.parametrize(
    "options",
    [
        dict(ratio=0.5),
        dict(ratio=0.3, merge_crossattn=True, merge_mlp=True),
        dict(ratio=0.6, max_downsample=2, sx=2, sy=1),
    ],
    ids=["defaults", "all-branches", "downsample2-sx2-sy1"],
)
def test_equals_tomesd_without_randomness(name, options):
    unet, x = _unet(name), _inputs(name)
    reference = copy.deepcopy(unet)  # tomesd patches the classes of the modules it is given
    tomesd.apply_patch(reference, use_rand=False, **options)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    fast = sd.apply(unet, use_rand=False, **options)
    with torch.no_grad():
        want, got, original = _run(reference, x), _run(fast, x), _run(unet, x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got, original)  # merging did something
    (plan,) = fast.plans.values()
    assert plan and all(block.r > 0 for block in plan)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert type(unet) is diffusers.UNet2DConditionModel


def test_random_destinations_follow_the_seed_and_odd_batches_turn_them_off():
    unet, x = _unet("sd15"), _inputs("sd15")
    fast, fixed = sd.apply(unet, ratio=0.5), sd.apply(unet, ratio=0.5, use_rand=False)
    with torch.no_grad():
        torch.manual_seed(3)
        a = fast(**x).sample
        torch.manual_seed(3)
        torch.testing.assert_close(fast(**x).sample, a, rtol=0, atol=0)
        assert not torch.allclose(a, fixed(**x).sample)
        odd = _inputs("sd15", batch=3)
        torch.testing.assert_close(fast(**odd).sample, fixed(**odd).sample, rtol=0, atol=0)


def test_proportional_attention_makes_merging_duplicates_exact():
    """A transformer's 4x4 token grid whose two source tokens copy their cell's dst: merging
    them in self-attention is exact with proportional attention (tomesd's plain merge is not)."""
    torch.manual_seed(0)
    block = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                         norm_num_groups=4, cross_attention_dim=16).eval().double()
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    x[..., 0, 1], x[..., 2, 1] = x[..., 0, 0], x[..., 2, 0]  # dst tokens are the cells' top-left ones
    text = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        want = block(x, encoder_hidden_states=text).sample
        for prop_attn, exact in ((True, True), (False, False)):
            fast = sd.apply(block, ratio=2 / 16, use_rand=False, prop_attn=prop_attn)
            got = fast(x, encoder_hidden_states=text).sample
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-9) is exact
            assert next(iter(fast.plans.values()))[0].r == 2


def test_a_pipeline_runs_at_two_resolutions_with_guidance_and_is_restored():
    torch.manual_seed(0)
    unet = UNETS["sd15"]()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=4, sample_size=16)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = torch.randn(1, 5, 16), torch.randn(1, 5, 16)

    def images(side):
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=side, width=side,
                    num_inference_steps=2, guidance_scale=5.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    original = images(32)
    assert sd.apply(pipe, ratio=0.5) is pipe and isinstance(pipe.unet, sd.ToMeUNet)
    assert pipe.unet.config.in_channels == 4 and pipe.unet.dtype == torch.float32
    merged = images(32)
    assert images(48).shape == (1, 3, 48, 48)
    assert merged.shape == original.shape and not torch.allclose(merged, original)
    assert list(pipe.unet.plans)[0][0] == (2, 4, 16, 16)  # guidance doubles the batch
    sd.remove(pipe)
    assert pipe.unet is unet
    torch.testing.assert_close(images(32), original, rtol=0, atol=0)


def test_compiled_equals_eager_and_summary():
    """``compile`` runs each captured graph under torch.compile(fullgraph=True), including the
    ones captured after it (a new resolution)."""
    unet = _unet("sd15")
    eager = sd.apply(unet, 0.5, use_rand=False, merge_mlp=True)
    fast = sd.apply(unet, 0.5, use_rand=False, merge_mlp=True)
    fast.compile(fullgraph=True)
    x = _inputs("sd15")
    with torch.no_grad():
        torch.testing.assert_close(_run(fast, x), _run(eager, x), rtol=1e-7, atol=1e-7)  # inductor's own sums
    assert "merged away in attn, mlp" in fast.summary()
    again = sd.apply(fast, 0.3)  # applying again starts from the UNet, with the new settings
    assert again.unet is unet and again.settings.ratio == 0.3 and "unet" not in again._modules


def test_an_apply_that_merges_nothing_says_so_and_names_what_would_merge():
    """SDXL's first level has no attention: at tomesd's default max_downsample=1 no block
    merges (in tomesd too). The first call warns and names max_downsample=2."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        **SMALL, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval().double()
    x = _inputs("sd15")
    with pytest.warns(UserWarning, match=r"merges no token .*max_downsample=2 would merge"):
        _run(sd.apply(unet, 0.5, use_rand=False), x)
    fast = sd.apply(unet, 0.5, max_downsample=2, use_rand=False)
    _run(fast, x)
    assert fast.plans and isinstance(fast.summary(), str) and "merged away in attn" in fast.summary()
