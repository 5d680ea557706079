"""timm's attention families beyond isotropic ViTs, as a new user calls them:
``transform(model, 0.5)`` (defaults: ``scheme="auto"``) merges -- whole-stream, or per block
where the stream cannot merge whole -- or is refused naming its cause; r=0 is the original.

Small configs (a few blocks, 32-64 px) from each family's own constructor. This list is the
source of the timm rows of docs/support.md (per-block families).
"""

import warnings

import pytest
import torch

import tome_fx

timm = pytest.importorskip("timm")


def _swinv2_cr():
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr

    return SwinTransformerV2Cr(img_size=(32, 32), patch_size=2, window_size=8, embed_dim=16, depths=(1, 1),
                               num_heads=(2, 2), num_classes=3)


def _gcvit():
    from timm.models.gcvit import GlobalContextVit

    return GlobalContextVit(img_size=64, window_size=(4, 4, 4, 2), embed_dim=16, depths=(1, 1, 1, 1),
                            num_heads=(1, 2, 2, 4), num_classes=3)


def _twins():
    from timm.models.twins import Twins

    return Twins(img_size=32, patch_size=2, embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(1, 1),
                 sr_ratios=(2, 1), wss=(4, 4), num_classes=3)


def _pit():
    from timm.models.pit import PoolingVisionTransformer

    return PoolingVisionTransformer(img_size=32, patch_size=4, stride=2, base_dims=(8, 8), depth=(1, 1), heads=(2, 2),
                                    mlp_ratio=2, num_classes=3)


def _levit():
    from timm.models.levit import Levit

    return Levit(img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3), num_classes=3)


# family -> (model, input size, the scheme it merges by, or the refusal's words)
FAMILIES = {
    "swinv2_cr": (_swinv2_cr, 32, "block"),
    "gcvit": (_gcvit, 64, "block"),
    "twins": (_twins, 32, "block"),
    # the class token and the pooled patches are joined again at each stage change
    "pit": (_pit, 32, "joins 2 token sequences by a cat"),
    # its linears run BatchNorm on the tokens flattened with the batch, then `reshape_as` back
    "levit": (_levit, 64, "per block: .*`aten.reshape_as.default`"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_merges_or_is_refused_with_its_cause(family):
    make, size, expected = FAMILIES[family]
    model = make().eval()
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if expected not in ("stream", "block"):
            with pytest.raises(tome_fx.UnsupportedModelError, match=expected):
                tome_fx.transform(model, 0.5, example_inputs=x)
            return
        fast = tome_fx.transform(model, 0.5, example_inputs=x)
        identity = tome_fx.transform(model, 0, example_inputs=x)
    assert isinstance(fast, tome_fx.ToMeModel if expected == "stream" else tome_fx.LocalToMe)
    if expected == "block":
        assert any(p.merged for plan in fast.plans.values() for p in plan), fast.summary()
    with torch.no_grad():
        ref = model(x)
        assert fast(x).shape == ref.shape
        torch.testing.assert_close(identity(x), ref, rtol=0, atol=0)
