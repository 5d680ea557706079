"""SAM's image encoder (Meta's segment_anything, HF SamModel, timm samvit): MLP branches merge,
and with ``attn=True`` attention branches too (per window in windowed blocks).

Small configs: a 128 px image, 16 px patches (an 8 x 8 grid), windows of 4 (aligned with
the 2 x 2 merge cells, so duplicate cells stay duplicates through windowed attention),
global attention in blocks 1 and 3, decomposed relative positions on.
"""

import numpy as np
import pytest
import torch

import tome_fx
from tome_fx import sam
from tome_fx.local import LocalToMe

pytest.importorskip("segment_anything")

from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402

IMG, PATCH, GRID = 128, 16, 8


def _segment_anything():
    return ImageEncoderViT(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=4, num_heads=2, out_chans=32,
                           use_rel_pos=True, window_size=4, global_attn_indexes=(1, 3))


def _hf(attention: str = "sdpa"):
    from transformers import SamConfig, SamModel, SamVisionConfig

    vision = SamVisionConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=IMG,
                             patch_size=PATCH, window_size=4, global_attn_indexes=[1, 3], output_channels=32,
                             mlp_dim=128)
    return SamModel(SamConfig(vision_config=vision.to_dict(), attn_implementation=attention))


def _timm():
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    return VisionTransformerSAM(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=4, num_heads=2, window_size=4,
                                global_attn_indexes=(1, 3), use_rel_pos=True, neck_chans=32, num_classes=0,
                                global_pool="")


# builder, and how to get the image embeddings from what it builds
FAMILIES = {
    "segment_anything": (_segment_anything, lambda m, x: m(x)),
    "hf": (_hf, lambda m, x: m.get_image_embeddings(x)),
    "hf eager": (lambda: _hf("eager"), lambda m, x: m.get_image_embeddings(x)),  # its bias flattened by reshape_as
    "timm": (_timm, lambda m, x: m(x)),
}


def _model(family: str, zero_positions: bool = False):
    """float64, every weight random (HF initialises SAM's linears to ~1e-10: outputs ~0)."""
    torch.manual_seed(0)
    model = FAMILIES[family][0]().double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if zero_positions and ("pos" in name.split(".")[-1]):  # pos_embed, rel_pos_h, rel_pos_w
                p.zero_()
            elif p.dim() > 1:
                p.normal_(0, 0.3 / p.shape[-1] ** 0.5 * (3 if p.dim() == 4 else 1))
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


def _duplicate_cells(batch: int = 2) -> torch.Tensor:
    """An image whose patches repeat in 2 x 2 cells."""
    torch.manual_seed(1)
    cells = torch.randn(batch, 3, GRID // 2, 1, PATCH, GRID // 2, 1, PATCH, dtype=torch.float64)
    return cells.expand(-1, -1, -1, 2, -1, -1, 2, -1).reshape(batch, 3, IMG, IMG)


def _embed(family, model, x):
    with torch.no_grad():
        return FAMILIES[family][1](model, x)


def _apply(model, ratio, **kwargs):
    """``sam.apply``: a new encoder, or (HF SamModel) the model with its encoder swapped."""
    result = sam.apply(model, ratio, **kwargs)
    encoder = result.vision_encoder if hasattr(result, "vision_encoder") else result
    assert isinstance(encoder, LocalToMe)
    return result, encoder


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_is_the_identity(family):
    model = _model(family)
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    expected = _embed(family, model, x)
    fast, encoder = _apply(model, 0.0)
    # timm resamples its position table in float32 (bicubic, to the same size) under torch.export
    tolerance = 1e-7 if family == "timm" else 1e-12
    torch.testing.assert_close(_embed(family, fast, x), expected, rtol=0, atol=tolerance)
    assert not next(iter(encoder.plans.values()))


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_merging_is_exact_for_duplicate_tokens(family, ratio):
    """Patches duplicated in the 2 x 2 cells, positions zeroed: the merged MLPs (sources merged
    into their cell's dst: some at 0.5, all at 0.75) leave the embeddings unchanged; a random
    image changes them."""
    model = _model(family, zero_positions=True)
    x = _duplicate_cells()
    noise = torch.randn_like(x)
    expected, expected_noise = _embed(family, model, x), _embed(family, model, noise)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    fast, encoder = _apply(model, ratio)
    torch.testing.assert_close(_embed(family, fast, x), expected, rtol=0, atol=1e-10)
    (plan,) = encoder.plans.values()
    assert len(plan) == 4 and all(p.merged == ("mlp",) and p.r == int(64 * ratio) and p.tokens == 64 for p in plan)
    assert (_embed(family, fast, noise) - expected_noise).abs().max() > 1e-3
    sam.remove(fast)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_merging_is_exact_for_duplicate_tokens(family, ratio):
    """``attn=True``: global blocks merge their attention branch over the whole grid, windowed
    blocks within each window (aligned with the 2 x 2 cells here). With relative positions
    zeroed, merging the duplicates with proportional attention leaves the embeddings
    unchanged; without proportional attention it does not (the attention runs on fewer keys
    of unequal sizes)."""
    model = _model(family, zero_positions=True)
    x = _duplicate_cells()
    expected = _embed(family, model, x)
    fast, encoder = _apply(model, ratio, attn=True)
    tolerance = 1e-7 if family == "hf eager" else 1e-10  # HF's eager softmax runs in float32
    torch.testing.assert_close(_embed(family, fast, x), expected, rtol=0, atol=tolerance)
    (plan,) = encoder.plans.values()
    window = (4, 16, int(16 * ratio))  # 4 windows of 4 x 4 tokens in each image
    assert [p.windows for p in plan] == [window, None, window, None]
    assert all(p.merged == ("attn", "mlp") and p.r == int(64 * ratio) for p in plan)
    if ratio == 0.5:  # (at 0.75 every token holds 4 patches: log(size) is the same for all keys)
        plain = LocalToMe(encoder.model, encoder.settings, prop_attn=False)
        with torch.no_grad():
            first = (lambda out: out[0]) if family.startswith("hf") else (lambda out: out)  # HF returns a ModelOutput
            assert (first(plain(x)) - first(encoder(x))).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_relative_positions_are_read_per_merged_pair(family):
    """Rewriting each decomposed relative-position bias as one op changes no value; merged,
    each rule computes it per merged pair, and the rules differ."""
    from tome_fx.call_spec import CallSpec
    from tome_fx.capture import capture
    from tome_fx.merge import merged_rel_pos_bias, rel_pos_bias
    from tome_fx.passes.relative_positions import RelativePositionBias

    model = _model(family)
    encoder = model.vision_encoder if family.startswith("hf") else model
    x = torch.randn(1, 3, IMG, IMG, dtype=torch.float64)
    call = CallSpec.record(encoder, (x,), {})
    gm = capture(encoder, call, dynamic_batch=False)
    args, kwargs = call.graph_call(call.arguments)
    with torch.no_grad():
        expected = gm(*args, **kwargs)
        RelativePositionBias()(gm)
        torch.testing.assert_close(gm(*args, **kwargs), expected, rtol=0, atol=1e-12)
    assert sum(n.target is rel_pos_bias for n in gm.graph.nodes) == 4
    outputs = {}
    for rule in ("mean", "representative"):
        fast, wrapper = _apply(model, 0.5, attn=True, rel_pos=rule)
        outputs[rule] = _embed(family, fast, x)
        (runner, _), = wrapper._graphs.values()
        assert [n.args[-1] for n in runner.graph.nodes if n.target is merged_rel_pos_bias] == [rule] * 4
    assert (outputs["mean"] - outputs["representative"]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="rel_pos"):
        sam.apply(model, 0.5, attn=True, rel_pos="nearest")


def test_compiled_equals_eager():
    model = _model("segment_anything")
    x = torch.randn(1, 3, IMG, IMG, dtype=torch.float64)
    eager = _embed("segment_anything", sam.apply(model, 0.5, attn=True), x)
    fast = sam.apply(model, 0.5, attn=True)
    fast.compile(fullgraph=True)
    torch.testing.assert_close(_embed("segment_anything", fast, x), eager, rtol=0, atol=1e-10)
    assert fast.summary().startswith("inputs ((1, 3, 128, 128),): 4 blocks merge")


def test_predictor_set_image_and_predict():
    """SamPredictor runs on the swapped encoder; ``remove`` gives the original back."""
    from segment_anything import SamPredictor

    torch.manual_seed(0)
    model = Sam(
        image_encoder=_segment_anything(),
        prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(GRID, GRID), input_image_size=(IMG, IMG),
                                     mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=2, iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2)),
    ).eval()
    encoder = model.image_encoder
    predictor = SamPredictor(model)
    image = np.random.default_rng(0).integers(0, 256, (96, IMG, 3), dtype=np.uint8)  # resized and padded to 128
    predictor.set_image(image)
    original = predictor.features.clone()
    assert sam.apply(predictor, 0.5) is predictor and isinstance(model.image_encoder, LocalToMe)
    predictor.set_image(image)
    assert predictor.features.shape == original.shape and not torch.equal(predictor.features, original)
    masks, scores, _ = predictor.predict(point_coords=np.array([[40, 50]]), point_labels=np.array([1]))
    assert masks.shape == (3, 96, IMG) and scores.shape == (3,)
    sam.apply(predictor, 0.5, attn=True)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=np.array([[40, 50]]), point_labels=np.array([1]))
    assert masks.shape == (3, 96, IMG) and model.image_encoder.settings.kinds == {"attn", "mlp"}
    assert sam.remove(predictor).model.image_encoder is encoder


def test_transform_points_to_sam_apply():
    with pytest.raises(tome_fx.UnsupportedModelError, match=r"tome_fx\.sam\.apply"):
        tome_fx.transform(_model("segment_anything").float(), 4, example_inputs=(torch.randn(1, 3, IMG, IMG),))


class _GridBlock(torch.nn.Module):
    """A block on a [B, h, w, C] stream whose MLP branch ends in ``tail`` (an op to prove)."""

    def __init__(self, tail, dim=32, w=4):  # (wide enough that matching its 16 tokens pays)
        super().__init__()
        self.tail, self.norm1, self.norm2 = tail, torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj, self.mlp = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        self.table = torch.nn.Parameter(torch.randn(w, dim))

    def forward(self, x):
        b, h, w, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, h * w, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, h, w, c))
        return x + self.tail(self, self.mlp(self.norm2(x)))


GRID_TAILS = {
    "per-token (accepted)": lambda m, y: torch.nn.functional.gelu(y) * 2,
    "a table over the grid's inner axis": lambda m, y: y + m.table,
    "a mean over the inner axis": lambda m, y: y - y.mean(2, keepdim=True),
    "inner axis folded before the tokens": lambda m, y: y.permute(0, 2, 1, 3).reshape(y.shape[0], -1, y.shape[3])
    .view(y.shape[0], y.shape[2], y.shape[1], y.shape[3]).permute(0, 2, 1, 3),
    "inner axis split": lambda m, y: y.reshape(y.shape[0], y.shape[1], y.shape[2] // 2, -1).flatten(2).view(y.shape),
    "inner axis kept apart in a view": lambda m, y: y.view(*y.shape[:3], 2, -1).flatten(3),
}


@pytest.mark.parametrize("tail", GRID_TAILS)
def test_a_merged_grid_only_meets_per_token_ops(tail):
    """At run time a merged grid is [B, N', 1, C] where the graph says [B, h, w, C]: any op that
    reads its inner axis as the grid's width is refused, never run on the wrong axis."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_GridBlock(GRID_TAILS[tail]), _GridBlock(GRID_TAILS[tail])).eval()
    x = torch.randn(2, 4, 4, 32)
    encoder = sam.apply(model, 0.5)
    if tail.endswith("(accepted)"):
        assert encoder(x).shape == x.shape and not torch.allclose(encoder(x), model(x))
        return
    with pytest.raises(tome_fx.UnsupportedModelError, match="grid|fixed token count"):
        encoder(x)


def test_new_weights_assigned_to_the_encoder_are_used():
    """Graphs read the tensors they were captured with: weights assigned later (not copied in)
    get a new graph, never a stale one."""
    model = _model("segment_anything")
    x = torch.randn(1, 3, IMG, IMG, dtype=torch.float64)
    fast = sam.apply(model, 0.5)
    before = _embed("segment_anything", fast, x)
    model.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items()}, assign=True)
    after = _embed("segment_anything", fast, x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _embed("segment_anything", sam.apply(model, 0.5), x), rtol=0, atol=0)
    assert len(fast._graphs) == 1  # the stale graph is dropped


def test_timm_hiera_is_refused_naming_mask_units():
    import timm

    model = timm.create_model("hiera_tiny_224", img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1),
                              num_classes=3).eval()
    with pytest.raises(tome_fx.UnsupportedModelError, match="mask units.*tome_fx.sam.apply"):
        sam.apply(model, 0.5)(torch.randn(1, 3, 64, 64))


# SAM 2 (PyPI sam2): its Hiera image encoder keeps a [B, h, w, C] token grid through four stages,
# pooling it 2x between them; windowed blocks, and global ones in stage 3.


class _Tokens(torch.nn.Module):
    """Stands in for Hiera's overlapping patch embedding: the input [B, C, h, w] is the token grid."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def _sam2_encoder(seed: int = 0):
    """A small Hiera + FPN neck (float64): stages of 2 blocks on a 32 x 32 token grid (16, 8, 4
    after each pooled stage change), windows of 4, 4, global, 2; positions zeroed."""
    pytest.importorskip("sam2")
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    torch.manual_seed(seed)
    trunk = Hiera(embed_dim=64, num_heads=1, stages=(2, 2, 2, 2), global_att_blocks=(5,), window_spec=(4, 4, 4, 2),
                  window_pos_embed_bkg_spatial_size=(4, 4))
    neck = FpnNeck(PositionEmbeddingSine(num_pos_feats=32, normalize=True), d_model=32,
                   backbone_channel_list=trunk.channel_list, fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
    encoder = ImageEncoder(trunk, neck, scalp=1).double().eval()
    trunk.patch_embed = _Tokens()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "pos_embed" not in name:
                p.normal_(0, 0.3 / p.shape[-1] ** 0.5) if p.dim() > 1 else p.normal_(0.0, 0.1)
    return encoder


@pytest.mark.parametrize("attn", [False, True])
def test_sam2_hiera_merging_is_exact_for_duplicate_tokens(attn):
    """Tokens repeated in 16 x 16 blocks (so duplicates survive three 2x poolings), positions
    zeroed: every stage's MLP branches (and with ``attn``, attention within windows and over the
    whole grid) merge and leave every output unchanged; the pooled stage changes merge nothing,
    and say so."""
    encoder = _sam2_encoder()
    torch.manual_seed(1)
    x = torch.randn(2, 64, 2, 1, 2, 1, dtype=torch.float64).expand(-1, -1, -1, 16, -1, 16).reshape(2, 64, 32, 32)
    with torch.no_grad():
        expected = encoder(x)
        fast = sam.apply(encoder, 0.5, attn=attn)
        got = fast(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    (plan,) = fast.plans.values()
    merging = [p for p in plan if p.merged]
    assert [p.name for p in merging] == [f"trunk.blocks.{i}" for i in (0, 1, 3, 5, 7)]
    assert [p.tokens for p in merging] == [1024, 1024, 256, 64, 16]
    expected_windows = [(64, 16, 8), (64, 16, 8), (16, 16, 8), None, (4, 4, 2)] if attn else [None] * 5
    assert [p.windows for p in merging] == expected_windows
    assert [p.tile for p in merging] == [(16, 16)] * 2 + [None] * 3  # (the first stage's width-64 MLPs)
    assert [p.name for p in plan if not p.merged] == [f"trunk.blocks.{i}" for i in (2, 4, 6)]
    assert "trunk.blocks.2: not merged: its block changes the token grid" in fast.summary()


def test_sam2_image_predictor_runs_on_the_swapped_encoder():
    pytest.importorskip("sam2")
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu",
                       hydra_overrides_extra=["++model.image_size=256"])  # random init: no weights offline
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # its sizes for 1024 px, at 256
    image = np.random.default_rng(0).integers(0, 256, (200, 256, 3), dtype=np.uint8)
    encoder = model.image_encoder
    assert sam.apply(predictor, 0.5, attn=True) is predictor and isinstance(model.image_encoder, LocalToMe)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=np.array([[40, 50]]), point_labels=np.array([1]))
    assert masks.shape == (3, 200, 256) and scores.shape == (3,)
    assert sam.remove(predictor).model.image_encoder is encoder


@pytest.mark.parametrize("window", [8, 2])
def test_windows_the_size_of_the_grid_or_of_a_cell(window):
    """A window as large as the grid (no padding) still merges within it, exactly for duplicates;
    windows with no whole merge cell leave that attention branch unmerged (the plan says so)."""
    model = ImageEncoderViT(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=2, num_heads=2, out_chans=32,
                            use_rel_pos=True, window_size=window, global_attn_indexes=(1,)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_() if "pos" in name.split(".")[-1] else p.normal_(0, 0.3 / p.shape[-1] ** 0.5)
    x = _duplicate_cells()
    sx = 2 if window == 8 else 4  # 2 x 2 windows hold no 4 x 4 cell
    fast = sam.apply(model, 0.5, attn=True, sx=sx, sy=sx)
    with torch.no_grad():
        out, expected = fast(x), model(x)
    (plan,) = fast.plans.values()
    if window == 8:
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
        assert plan[0].windows == (1, 64, 32) and "in its window" in fast.summary()
    else:
        assert plan[0].merged == ("mlp",) and plan[0].windows is None and plan[1].merged == ("attn", "mlp")


def test_timm_samvit_with_rotary_terms_merges_attention():
    """timm's samvit with RoPE instead of relative positions: the rotary tables (heads folded
    in the batch) are read per merged token, per window too."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    torch.manual_seed(0)
    model = VisionTransformerSAM(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=2, num_heads=2, window_size=4,
                                 global_attn_indexes=(1,), use_rel_pos=False, use_rope=True, use_abs_pos=False,
                                 neck_chans=32, num_classes=0, global_pool="").double().eval()
    x = torch.randn(1, 3, IMG, IMG, dtype=torch.float64)
    fast = sam.apply(model, 0.5, attn=True)
    with torch.no_grad():
        out, expected = fast(x), model(x)
    assert out.shape == expected.shape and (out - expected).abs().max() > 0  # approximate: positions differ
    (runner, _), = fast._graphs.values()
    assert sum(n.target is tome_fx.merge.restage_table for n in runner.graph.nodes) == 8  # cos, sin; q, k; 2 blocks


def test_a_large_grid_of_narrow_tokens_is_matched_within_tiles():
    """Matching scores every source against every dst: on a grid of many narrow tokens (SAM 2's
    first stage) that costs more than merging the MLP saves, so its tokens match within tiles
    of the grid, and the summary says so; attention per window still merges per window."""
    encoder = _sam2_encoder()
    x = torch.randn(1, 64, 64, 64, dtype=torch.float64)  # 4096 tokens of width 64 in stage 1
    fast = sam.apply(encoder, 0.5, attn=True)
    with torch.no_grad():
        fast(x)
    (plan,) = fast.plans.values()
    first = plan[0]
    assert first.name == "trunk.blocks.0" and first.merged == ("attn", "mlp") and first.windows == (256, 16, 8)
    assert first.tile == (16, 16) and first.r == 2048
    assert "2048 merged away in mlp (matched within 16 x 16-token tiles)" in fast.summary()


@pytest.mark.parametrize("width, merges", [(64, True), (16, False)])
def test_a_grid_that_no_tiling_makes_cheap_enough_merges_only_where_matching_pays(width, merges):
    """22 x 22 tokens (11 x 11 cells: no tiling but the whole grid), whole-grid matching above a
    quarter of what merging the MLP saves: at width 64 it still costs less than it saves, so the
    grid matches as a whole; at width 16 it costs more, so the MLPs stay unmerged, the call
    warns that it merges nothing, and the summary says why."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=176, patch_size=8, embed_dim=width, depth=2, num_heads=2, out_chans=32,
                              use_rel_pos=True, window_size=4, global_attn_indexes=(1,)).eval()
    fast = sam.apply(encoder, 0.5)
    if merges:
        with torch.no_grad():
            fast(torch.randn(1, 3, 176, 176))
        (plan,) = fast.plans.values()
        assert [(p.merged, p.tile) for p in plan] == [(("mlp",), None)] * 2
        return
    x = torch.randn(1, 3, 176, 176)
    with torch.no_grad(), pytest.warns(UserWarning, match="merges no token .* matching its 484 tokens costs"):
        torch.testing.assert_close(fast(x), encoder(x))
    (plan,) = fast.plans.values()
    assert [(p.name, p.merged) for p in plan] == [("blocks.0", ()), ("blocks.1", ())]
    assert "blocks.0: not merged: mlp not merged: matching its 484 tokens costs" in fast.summary()
    assert "more than the" in fast.summary() and "no tiling of its grid brings that under 25%" in fast.summary()


def test_a_relative_position_bias_in_another_form_is_refused_naming_it(monkeypatch):
    """The bias computed by broadcast products instead of einsums: not recognised, so attention
    cannot merge, and the refusal says it is the relative-position bias (not an op deep in it);
    MLP branches still merge."""
    import segment_anything.modeling.image_encoder as image_encoder

    def products(attn, q, rel_pos_h, rel_pos_w, q_size, k_size):
        (q_h, q_w), (k_h, k_w) = q_size, k_size
        table_h = image_encoder.get_rel_pos(q_h, k_h, rel_pos_h)
        table_w = image_encoder.get_rel_pos(q_w, k_w, rel_pos_w)
        grid = q.reshape(q.shape[0], q_h, q_w, -1)[:, :, :, None, :]
        rel_h, rel_w = (grid * table_h[None, :, None]).sum(-1), (grid * table_w[None, None]).sum(-1)
        logits = attn.view(q.shape[0], q_h, q_w, k_h, k_w) + rel_h[..., None] + rel_w[..., None, :]
        return logits.view(q.shape[0], q_h * q_w, k_h * k_w)

    monkeypatch.setattr(image_encoder, "add_decomposed_rel_pos", products)
    model = _model("segment_anything")
    x = torch.randn(1, 3, IMG, IMG, dtype=torch.float64)
    with pytest.raises(tome_fx.UnsupportedModelError, match=r"block blocks\.0: its attention cannot merge: .* "
                       r"relative-position bias in a form tome_fx does not recognise"):
        _embed("segment_anything", sam.apply(model, 0.5, attn=True), x)
    assert _embed("segment_anything", sam.apply(model, 0.5), x).shape == _embed("segment_anything", model, x).shape
