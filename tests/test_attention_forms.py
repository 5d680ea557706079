"""Blocks written in forms block finding once missed, each refused with a wrong cause: soft-capped
logits (VideoPrism's ``cap * tanh(logits / cap)``) and weights through ``nn.Dropout(inplace=True)``
(TNT's), "multiplies two tensors ... with no softmax between them"; a residual scaled before the
add (``x * gamma + branch``, CAFormer's ResScale), "the token count or width changes here"; weights
transposed into ``values @ weights^T`` (EfficientViT-M's), "its softmax weights go on through
transpose". Each merges whole-stream now, exact on duplicate patches (float64, the fuzz test's
oracle)."""

import pytest
import torch
from torch import nn

import tome_fx

DIM, PATCHES = 8, 16
DUPLICATES = [2, 6, 10, 14]  # set-A positions (class token at 0) that copy their set-B neighbour


class _Attention(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form, self.qkv, self.proj = form, nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.drop = nn.Dropout(0.0, inplace=True)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) * (c // 2) ** -0.5
        if self.form == "soft_cap":
            logits = 5.0 * torch.tanh(logits / 5.0)
        weights = logits.softmax(-1)
        if self.form == "inplace_dropout":
            weights = self.drop(weights)
        if self.form == "transposed_weights":  # values @ weights^T, tokens last (EfficientViT-M's, SHViT's)
            return self.proj((v.transpose(-2, -1) @ weights.transpose(-2, -1)).permute(0, 3, 1, 2).reshape(b, n, c))
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class _Vit(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.embed, self.cls = nn.Linear(4, DIM), nn.Parameter(torch.randn(1, 1, DIM))
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(4))
        self.attns = nn.ModuleList(_Attention(form) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(2))
        self.gamma = nn.Parameter(torch.rand(DIM) + 0.5) if form == "res_scale" else None

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        for i in range(2):
            x = (x if self.gamma is None else x * self.gamma) + self.attns[i](self.norms[2 * i](x))
            x = (x if self.gamma is None else self.gamma * x) + self.mlps[i](self.norms[2 * i + 1](x))
        return x[:, 0]


@pytest.mark.parametrize("form", ["soft_cap", "inplace_dropout", "res_scale", "transposed_weights"])
def test_attention_form_merges_exactly(form):
    model = _Vit(form).double().eval()
    x = torch.randn(2, PATCHES, 4, dtype=torch.float64)
    for position in DUPLICATES:  # patch i sits at position i + 1
        x[:, position - 1] = x[:, position]
    fast = tome_fx.transform(model, [len(DUPLICATES)], example_inputs=x)
    assert fast.schedule[0] == len(DUPLICATES) and fast.plan.unmerged_attention == ()
    torch.testing.assert_close(fast(x), model(x), rtol=1e-9, atol=1e-9)


def test_a_scaled_residual_merges_per_block_too():
    model, x = _Vit("res_scale").eval(), torch.randn(2, PATCHES, 4)
    fast = tome_fx.transform(model, 0.5, example_inputs=x, scheme="block")
    assert fast.summary().count("8 merged away in attn, mlp") == 2
    assert fast(x).shape == model(x).shape
