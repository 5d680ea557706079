"""Architectures the pass cannot make correct are refused with the block and the reason."""

import pytest
import timm
import torch
import torchvision
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
        r"block encoder\.layers\.0\.blocks\.0\.attention .*read from a learned table by token position",
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
        r"block layers\.0\.attention .*read from a learned table by token position",
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


def test_torchvision_maxvit_names_its_windowed_attention():
    """MaxViT's attention (einsum over [batch, windows, heads, tokens, dim]) is found, and the
    refusal says why it cannot merge, not that there is no attention."""
    model = torchvision.models.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16], block_layers=[1],
        head_dim=8, stochastic_depth_prob=0.0, num_classes=3,
    ).eval()
    with pytest.raises(UnsupportedModelError, match=r"graph node 'softmax'.* attention within windows"):
        tome_fx.transform(model, 2, example_inputs=torch.randn(2, 3, 32, 32))


class _PositionMasked(torch.nn.Module):
    """A user's ViT whose attention mask is built in forward from token positions."""

    def __init__(self, kind, dim=8):
        super().__init__()
        self.kind = kind
        self.embed, self.qkv, self.proj = (torch.nn.Linear(4, dim), torch.nn.Linear(dim, 3 * dim),
                                           torch.nn.Linear(dim, dim))

    def forward(self, x):
        h = self.embed(x)
        n = h.shape[1]
        position = torch.arange(n, device=h.device)
        if self.kind == "alibi":  # a distance bias, ALiBi-style
            mask = -(position[:, None] - position[None, :]).abs().to(h.dtype) * 0.5
        else:  # a causal mask made by hand
            mask = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        q, k, v = self.qkv(h).reshape(*h.shape[:2], 3, 2, 4).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return h + self.proj(attended.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("kind", ["alibi", "tril"])
def test_masks_built_from_token_positions_are_refused_at_transform_time(kind):
    with pytest.raises(UnsupportedModelError, match="built from token positions"):
        tome_fx.transform(_PositionMasked(kind).eval(), 2, example_inputs=torch.randn(2, 16, 4))


class _Biased(torch.nn.Module):
    """A block whose sdpa gets a bias built from ``kind``."""

    def __init__(self, kind, dim=8, tokens=16):
        super().__init__()
        self.kind = kind
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.bias = torch.nn.Parameter(torch.zeros(1, 2, tokens, tokens))  # zero at init, learned later

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        bias = {"tokens": (x @ x.transpose(1, 2)).unsqueeze(1) * 0.01, "parameter": self.bias}.get(self.kind)
        return x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                             .transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("kind, reason", [
    ("tokens", "computed from the tokens themselves"),
    ("parameter", r"a learned parameter over token pairs \(shape \(1, 2, 16, 16\)\)"),
])
def test_a_bias_is_refused_for_what_it_is_built_from(kind, reason):
    """An input-dependent bias was blamed on a relative-position table; a learned [1, H, N, N]
    bias that starts at zero was taken for no mask and dropped (trained weights ignored)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), _Biased(kind), _Biased(kind)).eval()
    with pytest.raises(UnsupportedModelError, match=reason):
        tome_fx.transform(model, 2, example_inputs=torch.randn(2, 16, 4))


def test_transforming_a_tome_model_again_points_to_the_original():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), _Biased("none"), _Biased("none")).eval()
    x = torch.randn(2, 16, 4)
    fast = tome_fx.transform(model, 2, example_inputs=x)
    assert fast.original is model and tome_fx.compile(model, 2, example_inputs=x).original is model
    with pytest.raises(UnsupportedModelError, match=r"already a tome_fx model \(ToMeModel\).*`model.original`"):
        tome_fx.transform(fast, 4, example_inputs=x)
    with pytest.raises(UnsupportedModelError, match=r"submodule `1` is already a tome_fx model.*`model.1.original`"):
        tome_fx.transform(torch.nn.Sequential(torch.nn.Identity(), fast), 4, example_inputs=x)


def test_hf_gpt2_with_its_defaults_is_refused_for_its_causal_mask():
    """GPT-2 returns a DynamicCache by default, which torch.export cannot capture: it is captured
    with use_cache=False (said in a warning), and the true reason is reported."""
    model = T.GPT2Model(T.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)).eval()
    with pytest.warns(UserWarning, match="use_cache=False"), pytest.raises(UnsupportedModelError, match="a causal mask"):
        tome_fx.transform(model, 2, example_inputs=dict(input_ids=torch.randint(0, 50, (2, 12))))


def test_timm_hiera_is_refused_for_windows_and_pooling():
    model = timm.create_model("hiera_tiny_224", img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1),
                              num_classes=3).eval()
    with pytest.raises(UnsupportedModelError, match=r"mask units.*between the stages of a hierarchical"):
        tome_fx.transform(model, 2, example_inputs=torch.randn(2, 3, 64, 64))


class _PaddedWithBias(torch.nn.Module):
    """A padding mask from the inputs plus a learned bias over token pairs (T5-style)."""

    def __init__(self):
        super().__init__()
        self.embed, self.blocks = torch.nn.Linear(4, 8), torch.nn.ModuleList([_Biased("none"), _Biased("none")])
        self.rel = torch.nn.Parameter(torch.randn(2, 16, 16))

    def forward(self, x, pad):
        mask = (1.0 - pad[:, None, None, :]) * -1e4 + self.rel
        t = self.embed(x)
        for block in self.blocks:
            b, n, c = t.shape
            q, k, v = block.qkv(t).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
            t = t + block.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                               .transpose(1, 2).reshape(b, n, c))
        return t


def test_a_padding_mask_with_a_learned_bias_is_refused_at_transform_time():
    """Found by review: it was taken for a padding mask, and failed at call time blaming padding."""
    with pytest.raises(UnsupportedModelError, match="combines the inputs .padding. with learned parameters"):
        tome_fx.transform(_PaddedWithBias().eval(), 2, example_inputs=(torch.randn(2, 16, 4), torch.ones(2, 16)))
