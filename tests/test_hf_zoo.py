"""HF transformers' vision families beyond isotropic ViTs, as a new user calls them:
``transform(model, 0.5)`` merges (per block where the stream cannot merge whole) or is
refused naming its cause; r=0 is the original. Small configs from each family's own config
class (values after transformers' model testers). This list is the source of the HF rows
of docs/support.md (per-block families).
"""

import warnings

import pytest
import torch
import transformers as T

import tome_fx
from zoo_checks import check_family

_STAGES = dict(image_size=32, hidden_sizes=[16, 32], depths=[1, 1], num_attention_heads=[1, 2], sr_ratios=[2, 1],
               patch_sizes=[7, 3], strides=[4, 2], num_encoder_blocks=2, mlp_ratios=[2, 2])


def _swin(whole=False):
    """Two stages of windows of 4 x 4 tokens (the second block's shifted); ``whole``: one stage
    whose window covers its 8 x 8 grid (no shift)."""
    if whole:
        return T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                                        window_size=8))
    return T.SwinModel(T.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 1], num_heads=[2, 2],
                                    window_size=4))


def _beit():
    return T.BeitModel(T.BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, use_relative_position_bias=True))


def _yolos():
    return T.YolosModel(T.YolosConfig(image_size=[32, 32], patch_size=8, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, num_detection_tokens=3),
                        add_pooling_layer=False)


# family -> (model, the scheme it merges by or the refusal's words, what summary() says)
FAMILIES = {
    # windows merge within each window; the shifted windows' per-window mask leaves that attention unmerged
    "SwinModel": (_swin, "block", ["encoder.layers.0.blocks.0: 256 tokens, 128 merged away in mlp",
                                   "attn: 8 of 16 merged away in each of 16 windows",
                                   "blocks.1: 256 tokens, 128 merged away in mlp", "attn not merged"]),
    "Swinv2Model": (lambda: T.Swinv2Model(T.Swinv2Config(image_size=32, patch_size=2, embed_dim=16, depths=[2, 1],
                                                         num_heads=[2, 2], window_size=4)),
                    "block", ["attn: 8 of 16 merged away in each of 16 windows", "a mask per window"]),
    # spatial-reduction attention: queries merge, keys pooled from every token; Mix-FFN convolves the grid
    "PvtV2Model": (lambda: T.PvtV2Model(T.PvtV2Config(**_STAGES)), "block",
                   ["encoder.layers.0.blocks.0: 64 tokens, 32 merged away in attn", "; mlp not merged"]),
    "SegformerModel": (lambda: T.SegformerModel(T.SegformerConfig(**_STAGES, decoder_hidden_size=16)), "block",
                       ["stages.0.blocks.0: 64 tokens, 32 merged away in attn", "for a convolution or pooling"]),
    # its detection tokens, after the patches, stay out as the class token in front does
    "YolosModel": (_yolos, "block", ["encoder.layer.0: 16 tokens, 8 merged away in attn, mlp"]),
    # the first stage's patches merge beside its group tokens (learned, after them); the later
    # stages run on group tokens, no grid, and are named
    "GroupViTVisionModel": (lambda: T.GroupViTVisionModel(T.GroupViTVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, depths=[1, 1, 1], num_hidden_layers=3,
        num_group_tokens=[16, 8, 0], num_output_groups=[16, 8, 8], image_size=32, patch_size=4)), "block",
        ["stages.0.layers.0: 64 tokens, 32 merged away in attn, mlp",
         "stages.1.layers.0: not merged: every branch not merged: block vision_model.encoder.stages.1.layers.0: its "
         "24 tokens are no square h x w grid"]),
    # its relative-position table (expanded to the batch) is read per merged pair; the class token stays out
    "BeitModel": (_beit, "block", ["layers.0: 16 tokens, 8 merged away in attn, mlp"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_merges_or_is_refused_with_its_cause(family):
    make, expected, said = FAMILIES[family]
    torch.manual_seed(0)
    check_family(make().eval(), torch.randn(2, 3, 32, 32), expected, said, lambda out: out.last_hidden_state)


def _duplicated(patch: int) -> torch.Tensor:
    """Images whose 2 x 2 patch cells hold one patch four times."""
    return torch.randn(2, 3, 32 // (2 * patch), 32 // (2 * patch), dtype=torch.float64).repeat_interleave(
        2 * patch, 2).repeat_interleave(2 * patch, 3)


@pytest.mark.parametrize("family", ["SwinModel", "BeitModel", "YolosModel"])
def test_duplicated_cells_merge_exactly_with_the_tables_zeroed(family):
    """A window that covers the grid (no shift) and position tables zeroed: input duplicated in
    2 x 2 patch cells merges without changing any output (float64); BEiT's class token and
    YOLOS's detection tokens (after the patches) stay out."""
    torch.manual_seed(0)
    model = {"SwinModel": lambda: _swin(whole=True), "BeitModel": _beit, "YolosModel": _yolos}[family]().eval().double()
    for name, parameter in model.named_parameters():
        if "relative_position_bias_table" in name or name == "embeddings.position_embeddings":
            torch.nn.init.zeros_(parameter)
    x = _duplicated(4 if family == "SwinModel" else 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = tome_fx.transform(model, 0.5, example_inputs=x)
    assert "merged away in attn" in fast.summary() or "attn: " in fast.summary(), fast.summary()
    with torch.no_grad():
        torch.testing.assert_close(fast(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=1e-12)
