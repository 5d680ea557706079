"""timm's attention families beyond isotropic ViTs, as a new user calls them:
``transform(model, 0.5)`` (defaults: ``scheme="auto"``) merges -- whole-stream, or per block
where the stream cannot merge whole -- or is refused naming its cause; r=0 is the original.

Small configs (a few blocks, 32-64 px) from each family's own constructor. This list is the
source of the timm rows of docs/support.md (per-block families).
"""

import pytest
import torch

import tome_fx
from zoo_checks import check_family

timm = pytest.importorskip("timm")


def _swinv2_cr():
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr

    return SwinTransformerV2Cr(img_size=(32, 32), patch_size=2, window_size=8, embed_dim=16, depths=(1, 1),
                               num_heads=(2, 2), num_classes=3)


def _gcvit():
    from timm.models.gcvit import GlobalContextVit

    return GlobalContextVit(img_size=64, window_size=(4, 4, 4, 2), embed_dim=16, depths=(2, 1, 1, 1),
                            num_heads=(1, 2, 2, 4), num_classes=3)


def _twins():
    from timm.models.twins import Twins

    return Twins(img_size=32, patch_size=2, embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(2, 1),
                 sr_ratios=(2, 1), wss=(4, 4), num_classes=3)


def _pvt_v2():
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    return PyramidVisionTransformerV2(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), sr_ratios=(2, 1),
                                      mlp_ratios=(2, 2), num_classes=3)


def _xcit():
    from timm.models.xcit import Xcit

    return Xcit(img_size=64, patch_size=8, embed_dim=16, depth=1, num_heads=2, cls_attn_layers=1, num_classes=3)


def _visformer():
    from timm.models.visformer import Visformer

    return Visformer(img_size=64, init_channels=8, embed_dim=48, depth=(1, 1, 1), num_heads=2, num_classes=3)


def _mvitv2():
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    return MultiScaleVit(MultiScaleVitCfg(depths=(2,), embed_dim=16, num_heads=1), img_size=64, num_classes=3)


def _davit():
    from timm.models.davit import DaVit

    return DaVit(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), window_size=4, num_classes=3)


def _pit():
    from timm.models.pit import PoolingVisionTransformer

    return PoolingVisionTransformer(img_size=32, patch_size=4, stride=2, base_dims=(8, 8), depth=(1, 1), heads=(2, 2),
                                    mlp_ratio=2, num_classes=3)


def _levit():
    from timm.models.levit import Levit

    return Levit(img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3), num_classes=3)


def _beit():
    from timm.models.beit import Beit

    return Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, use_abs_pos_emb=False,
                use_rel_pos_bias=True, num_classes=3)


def _tnt():
    return timm.create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=3)


# family -> (model, input size, the scheme it merges by or the refusal's words, what summary() says)
FAMILIES = {
    "swinv2_cr": (_swinv2_cr, 32, "block", ["attn: 32 of 64 merged away in each of 4 windows"]),
    # window attention merges; the global-query block's queries are no merged tokens
    "gcvit": (_gcvit, 64, "block", ["stages.0.blocks.0: 256 tokens, 128 merged away in mlp",
                                    "attn: 8 of 16 merged away in each of 16 windows",
                                    "stages.0.blocks.1: 256 tokens, 128 merged away in mlp", "attn not merged"]),
    # locally-grouped attention cuts the token sequence into windows (not merged yet); global
    # sub-sampled attention pools its keys from the whole grid while its queries merge
    "twins": (_twins, 32, "block", ["blocks.0.0: 256 tokens, 128 merged away in mlp",
                                    "attn not merged: block blocks.0.0 (graph node 'add'): the attn branch reshapes",
                                    "to cut it into windows", "blocks.0.1: 256 tokens, 128 merged away in attn, mlp"]),
    # spatial-reduction attention: the queries merge, the keys are pooled from every token; its
    # Mix-FFN convolves the grid
    "pvt_v2": (_pvt_v2, 32, "block", ["stages.0.blocks.0: 64 tokens, 32 merged away in attn", "; mlp not merged",
                                      "for a convolution or pooling over the grid"]),
    # cross-covariance attention (queries and keys L2-normalised over the tokens, weighted by size);
    # its local patch interaction convolves the grid; the class-attention stage reads the class
    # token beside the patches
    "xcit": (_xcit, 64, "block", ["blocks.0: 64 tokens, 32 merged away in attn, mlp 2; mlp not merged",
                                  "cls_attn_blocks.0: not merged"]),
    # windowed spatial attention and channel attention (channels attend to channels over every token)
    "davit": (_davit, 32, "block", ["attn: 8 of 16 merged away in each of 4 windows",
                                    "stages.0.blocks.0.1: 64 tokens, 32 merged away in attn"]),
    # the class token stays out; the relative-position table is read per merged pair
    "beit": (_beit, 32, "block", ["blocks.0: 16 tokens, 8 merged away in attn, mlp"]),
    # two interleaved streams: pixels within each patch, and the patches behind a class token
    "tnt": (_tnt, 32, "block", ["blocks.0: 16 tokens, 8 merged away in attn, mlp",
                                "blocks.0: 4 tokens, 2 merged away in attn, mlp"]),
    # pooled stages: the class token, projected, is joined again in front of the pooled grid, and stays out
    "pit": (_pit, 32, "block", ["transformers.0.blocks.0: 225 tokens, 112 merged away in attn, mlp",
                                "transformers.1.blocks.0: 64 tokens, 32 merged away in attn, mlp"]),
    # pooling attention: its queries, keys and values are pooled from the grid by convolutions (its
    # relative positions are written into its logits by an in-place copy); the MLPs merge
    "mvitv2": (_mvitv2, 64, "block", ["stages.0.blocks.0: 256 tokens, 128 merged away in mlp",
                                      "attn not merged", "attn.pool_q"]),
    # a convolutional hybrid: its stream stays [batch, channels, h, w]
    "visformer": (_visformer, 64, r"whole-stream: .*is channels first.*; per block: .*is channels first", []),
    # its linears run BatchNorm on the tokens flattened with the batch, then `reshape_as` back; the
    # attention that downsamples between stages (a pooled residual) stays unmerged
    "levit": (_levit, 64, "block", ["stages.0.blocks.0: 16 tokens, 8 merged away in attn, mlp"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_merges_or_is_refused_with_its_cause(family):
    make, size, expected, said = FAMILIES[family]
    check_family(make().eval(), torch.randn(2, 3, size, size), expected, said)


def test_talking_heads_attention_is_named_where_nothing_merges():
    """CaiT mixes its heads' logits and weights by linears around the softmax (talking heads),
    a form not recognised; its class-attention blocks hold no grid to merge: the warning names
    the talking heads, not a ratio that rounds to no token."""
    from timm.models.cait import Cait

    model = Cait(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, depth_token_only=1, num_classes=3)
    with pytest.warns(UserWarning, match="merges no token.*talking-heads attention"):
        tome_fx.transform(model.eval(), 0.5, example_inputs=torch.randn(2, 3, 32, 32), scheme="block")
