"""diffusers transformers that hand their tokens back as a grid: DiT (class-conditional,
adaLN-zero) and PixArt (cross-attention to text). Their unpatchify reshape splits the
token axis, so it reads the tokens un-merged; the noise prediction comes out on the full grid."""

import pytest
import torch

import tome_fx

diffusers = pytest.importorskip("diffusers")

SIDE, PATCH, GRID = 8, 2, 4  # 8x8 latents, 2x2 patches: a 4x4 grid of 16 tokens
SMALL = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
             sample_size=SIDE, patch_size=PATCH, norm_num_groups=1)
FAMILIES = {
    "DiT": lambda: diffusers.DiTTransformer2DModel(**SMALL, num_embeds_ada_norm=10),
    "PixArt": lambda: diffusers.PixArtTransformer2DModel(**SMALL, cross_attention_dim=16, caption_channels=12),
}


def make(name, dtype=torch.float32):
    torch.manual_seed(0)
    return FAMILIES[name]().eval().to(dtype)


def inputs(name, batch=2, dtype=torch.float32):
    x = {"hidden_states": torch.randn(batch, 4, SIDE, SIDE, dtype=dtype), "timestep": torch.arange(batch) + 3}
    if name == "DiT":
        return x | {"class_labels": torch.arange(batch) % 10}
    return x | {"encoder_hidden_states": torch.randn(batch, 5, 12, dtype=dtype),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


@pytest.mark.parametrize("name", FAMILIES)
def test_r0_is_the_identity_and_merging_keeps_the_grid(name):
    model, x = make(name), inputs(name)
    with torch.no_grad():
        want = model(**x).sample
        torch.testing.assert_close(tome_fx.transform(model, 0, example_inputs=x)(**x).sample, want)
        fast = tome_fx.transform(model, 3, example_inputs=x)
        got = fast(**x).sample
    assert fast.token_counts == [16, 13, 10]
    assert len(fast.plan.unmerged_at) == 1  # the unpatchify reshape
    summary = fast.plan.summary()
    assert "16 tokens in, 3 merged, 13 out" in summary and f"un-merged before {fast.plan.unmerged_at[0]}" in summary
    assert got.shape == want.shape and not torch.allclose(got, want)


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_duplicate_patches_merge_without_changing_the_prediction(name):
    """Positions zeroed, every other set-A patch a copy of its set-B neighbour: merging the
    copies in block 0 and un-merging them for the unpatchify leaves the output unchanged."""
    model, x = make(name, torch.float64), inputs(name, dtype=torch.float64)
    model.pos_embed.pos_embed.zero_()
    latents = x["hidden_states"]
    pairs = list(range(0, GRID * GRID, 4))  # token p: row p // GRID, column p % GRID
    for p in pairs:
        (r, c), (rs, cs) = divmod(p, GRID), divmod(p + 1, GRID)
        latents[..., PATCH * r : PATCH * r + PATCH, PATCH * c : PATCH * c + PATCH] = (
            latents[..., PATCH * rs : PATCH * rs + PATCH, PATCH * cs : PATCH * cs + PATCH]
        )
    fast = tome_fx.transform(model, [len(pairs)], example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(fast(**x).sample, model(**x).sample, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_matches_eager(name):
    model = make(name)
    compiled = tome_fx.compile(model, 3, example_inputs=inputs(name), fullgraph=True)
    x = inputs(name, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**x).sample, compiled.model(**x).sample, rtol=1e-4, atol=1e-4)


# -- refusals that named the wrong cause (each now names the true one) ---------------------------------

def test_a_product_without_softmax_that_is_not_linear_attention_is_named():
    """``(q @ kᵀ) @ v`` with no softmax: not a softmax attention, and not linear attention (whose
    first product sums over the keys' tokens)."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            return x + self.proj((q @ k.transpose(1, 2)) @ v / x.shape[1])

    with pytest.raises(tome_fx.UnsupportedModelError, match="not as linear attention does"):
        tome_fx.transform(torch.nn.Sequential(Block(), Block()).eval(), 2, example_inputs=torch.randn(2, 16, 8))


@pytest.mark.parametrize("name", FAMILIES)
def test_per_block_merging_through_sd_apply_is_exact_for_duplicate_cells(name):
    """``tome_fx.sd.apply`` on a diffusion transformer merges per block on its patch grid:
    with positions zeroed and the 2x2 cells of patches identical, the output is unchanged."""
    import tome_fx.sd

    model = make(name, torch.float64)
    model.pos_embed.pos_embed.zero_()
    x = inputs(name, dtype=torch.float64)
    cells = torch.randn(2, 4, 2, 2, 2, 2, dtype=torch.float64)  # batch, channels, cell row/col, patch row/col
    x["hidden_states"] = cells.repeat_interleave(2, 2).repeat_interleave(2, 3).permute(0, 1, 2, 4, 3, 5).reshape(2, 4, 8, 8)
    fast = tome_fx.sd.apply(model, 0.5, use_rand=False, merge_crossattn=True, merge_mlp=True, prop_attn=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(**x).sample, model(**x).sample, rtol=1e-9, atol=1e-9)
    assert all(p.tokens == GRID * GRID and p.r == 8 for plan in fast.plans.values() for p in plan)
