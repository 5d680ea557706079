"""Architectures the pass cannot make correct are refused with the block and the reason."""

import pytest
import timm
import torch
import transformers as T

import tome_fx
from tome_fx import UnsupportedModelError

CASES = {
    "timm Swin (windowed attention on a 2-d grid)": (
        lambda: timm.create_model(
            "swin_tiny_patch4_window7_224", img_size=56, embed_dim=32, depths=(1, 1), num_heads=(2, 2), num_classes=3
        ),
        (3, 56, 56),
        r"block layers\.0\.blocks\.0: residual stream has shape .*\(windowed",
    ),
    "HF Swin (shifted windows, relative position bias)": (
        lambda: T.SwinModel(
            T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
        ),
        (3, 32, 32),
        r"block encoder\.layers\.0\.blocks\.0\.attention .*learned parameters",
    ),
    "timm BEiT (relative position bias table)": (
        lambda: timm.create_model(
            "beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3
        ),
        (3, 32, 32),
        r"block blocks\.0\.attn .*relative-position bias",
    ),
    "HF BEiT (relative position bias table)": (
        lambda: T.BeitModel(
            T.BeitConfig(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                use_relative_position_bias=True,
            )
        ),
        (3, 16, 16),
        r"block layers\.0\.attention .*learned parameters",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_is_refused_with_block_and_reason(case):
    make, shape, message = CASES[case]
    model = make().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=message):
        tome_fx.transform(model, 2, example_inputs=torch.randn(2, *shape))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_zero_initialised_bias_table_is_not_mistaken_for_no_mask():
    """timm BEiT's bias tables start at zero: evaluating them ahead of time would find an
    all-pass mask, but trained weights loaded later would then be silently ignored."""
    model = CASES["timm BEiT (relative position bias table)"][0]().eval()
    assert all(not p.any() for n, p in model.named_parameters() if "relative_position_bias_table" in n)
    with pytest.raises(UnsupportedModelError):
        tome_fx.transform(model, 2, example_inputs=torch.randn(2, 3, 32, 32))
