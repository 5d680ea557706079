"""Ops that act on each token's own channels, heads or experts are exact after merging, and
einsum is read as the products and sums it spells (exact-duplicates oracle, float64)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tome_fx
from tome_fx import UnsupportedModelError

DIM, PATCHES = 8, 16
DUPLICATES = [2, 6, 10, 14]  # set-A positions (class token at 0) that copy their set-B neighbour


def _attention(q, k, v, form):
    if form == "einsum":
        return torch.einsum("bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).mul(0.5).softmax(-1), v)
    if form == "einsum_swapped":  # operands in the other order, letters of its own
        return torch.einsum("bhkd,bhqk->bhqd", v, torch.einsum("bhkd,bhqd->bhqk", k, q).softmax(-1))
    if form == "cosine":  # Swin-V2 style
        return (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2) * 10).softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


class _Block(nn.Module):
    def __init__(self, form, mlp):
        super().__init__()
        self.form, self.mlp_kind = form, mlp
        self.norm = nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.router, self.experts = nn.Linear(DIM, 4), nn.Parameter(torch.randn(4, DIM, DIM) / 3)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        x = x + self.proj(_attention(q, k, v, self.form).transpose(1, 2).reshape(b, n, c))
        if self.mlp_kind == "hand_norm":  # a LayerNorm written by hand, with std and var
            h = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + x.var(-1, keepdim=True).sqrt() + 1e-5)
            return x + h + torch.logsumexp(h, -1, keepdim=True) + torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        h = self.norm(x)
        logits = self.router(h)
        if self.mlp_kind == "top1":  # top-1 mixture of experts: argmax over experts, per token
            gate = F.one_hot(logits.argmax(-1), 4).to(h.dtype)
        else:  # top-2 by topk, softmax-weighted
            gate = (logits >= logits.topk(2, dim=-1).values[..., -1:]).to(h.dtype) * logits.softmax(-1)
        return x + torch.einsum("bne,bnd,edc->bnc", gate, h, self.experts)


class _Model(nn.Module):
    def __init__(self, form="sdpa", mlp="top1", head="cls"):
        super().__init__()
        self.head = head
        self.embed = nn.Linear(4, DIM)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.blocks = nn.Sequential(_Block(form, mlp), _Block(form, mlp))
        self.kproj, self.query = nn.Linear(DIM, DIM), nn.Parameter(torch.randn(1, DIM))

    def forward(self, x):
        t = self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1))
        if self.head == "einsum_pool":  # a learned-query pooling head written with einsum
            a = torch.einsum("bnc,qc->bqn", self.kproj(t), self.query).softmax(-1)
            return torch.einsum("bqn,bnc->bqc", a, t)[:, 0]
        if self.head == "max":
            return t.max(1).values
        return t[:, 0]


def _duplicated(batch=2):
    x = torch.randn(batch, PATCHES, 4, dtype=torch.float64)
    for position in DUPLICATES:
        x[:, position - 1] = x[:, position]
    return x


def _check_exact(model):
    torch.manual_seed(0)
    model = model.double().eval()
    x = _duplicated()
    fast = tome_fx.transform(model, [len(DUPLICATES)], example_inputs=x)
    assert fast.schedule[0] == len(DUPLICATES) and fast.plan.protected == 1
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-9, atol=1e-9)
    return fast


@pytest.mark.parametrize("form", ["einsum", "einsum_swapped", "cosine"])
def test_einsum_and_cosine_attention_merge_exactly(form):
    _check_exact(_Model(form))


@pytest.mark.parametrize("mlp", ["hand_norm", "top1", "top2"])
def test_per_token_reductions_and_routing_merge_exactly(mlp):
    _check_exact(_Model(mlp=mlp))


@pytest.mark.parametrize("head", ["einsum_pool", "max"])
def test_einsum_pooling_and_max_over_tokens_merge_exactly(head):
    """The einsum pooling head crashed with a raw ValueError; ``x.max(1).values`` was refused."""
    _check_exact(_Model(head=head))


class _OverTokens(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op, self.embed = op, nn.Linear(4, DIM)
        self.block = _Block("sdpa", "top1")

    def forward(self, x):
        t = self.block(self.embed(x))
        return {"argmax": lambda: t.argmax(1), "indices": lambda: t.max(1).indices,
                "logsumexp": lambda: torch.logsumexp(t, 1), "cumsum": lambda: t.cumsum(1)[:, 0]}[self.op]()


@pytest.mark.parametrize("op, reason", [
    ("argmax", "`aten.argmax.default` over the token axis"),
    ("indices", "where the max or min over tokens lies"),
    ("logsumexp", "`aten.logsumexp.default` over the token axis"),
    ("cumsum", "`aten.cumsum.default` over the token axis"),
])
def test_other_ops_over_tokens_are_refused(op, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        tome_fx.transform(_OverTokens(op).eval(), 2, example_inputs=torch.randn(2, PATCHES, 4))


def test_an_internal_error_surfaces_as_a_refusal_naming_the_node(monkeypatch):
    """A bug inside a rule must not reach the user as a raw ValueError or IndexError."""
    from tome_fx.passes import token_flow

    def broken(self, node):
        raise IndexError("tuple index out of range")

    monkeypatch.setitem(token_flow._RULES, torch.ops.aten.linear.default, broken)
    with pytest.raises(UnsupportedModelError, match=r"graph node 'linear.*IndexError.*bug in tome_fx"):
        tome_fx.transform(_Model().eval(), 2, example_inputs=torch.randn(2, PATCHES, 4))


class _AcrossSamples(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form, self.embed, self.block = form, nn.Linear(4, DIM), _Block("sdpa", "top1")

    def forward(self, x):
        t = self.block(self.embed(x))
        if self.form == "einsum":
            return torch.einsum("bnc,anc->ba", t, t)
        if self.form == "matmul":
            return (t.transpose(1, 2).unsqueeze(1) @ t.unsqueeze(0)).sum((-1, -2))
        return (t.unsqueeze(1) * t.unsqueeze(0)).sum((-1, -2))


@pytest.mark.parametrize("form", ["einsum", "matmul", "pointwise"])
def test_pairing_tokens_across_samples_is_refused(form):
    """Found by review: token n of one sample times token n of another (the batch on two axes)
    was accepted; each sample merged other tokens, so position n holds other originals."""
    with pytest.raises(UnsupportedModelError, match="puts the batch on two axes"):
        tome_fx.transform(_AcrossSamples(form).eval(), 2, example_inputs=torch.randn(2, PATCHES, 4))


# -- found by review of the diffusion-transformer rules -----------------------------------------

class _SliceWrittenWeights(nn.Module):
    """After an sdpa block, attention weights written into slices of a fresh tensor (or padded
    with ones): the weights would be scaled by size twice, and a padded row of ones not at all."""

    def __init__(self, how):
        super().__init__()
        self.how, self.qkv, self.out = how, nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2)
        if self.how is None:
            a = F.scaled_dot_product_attention(q, k, v)
        elif self.how == "slices":
            weights = torch.empty_like(scores)
            weights[..., :1, :, :] = scores[:, :1].softmax(-1)
            weights[..., 1:, :, :] = (scores[:, 1:] * 0.5).softmax(-1)
            a = weights @ v
        else:
            a = F.pad(scores.softmax(-1), (0, 0, 0, 0, 0, 1), value=1.0) @ torch.cat([v, v[:, :1]], 1)
            a = a[:, :2] + 0.01 * a[:, 2:]
        return x + self.out(a.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("how, reason", [("slices", "writes into a slice of a tensor weights over tokens"),
                                         ("pad", "pads weights over tokens with entries that are not weights")])
def test_weights_written_into_slices_or_padded_are_refused(how, reason):
    model = nn.Sequential(_SliceWrittenWeights(None), _SliceWrittenWeights(how)).double().eval()
    with pytest.raises(tome_fx.UnsupportedModelError, match=reason):
        tome_fx.transform(model, [4], example_inputs=torch.randn(2, 16, 8, dtype=torch.float64))


def test_a_fresh_tensor_written_into_another_is_made_functional():
    from tome_fx.passes.functional_writes import FunctionalWrites

    class Writes(nn.Module):
        def forward(self, x):
            out, tmp = torch.empty_like(x), torch.empty_like(x[..., :2])
            tmp[..., :1], tmp[..., 1:] = x[..., 1:2], x[..., :1]
            out[..., :2], out[..., 2:] = tmp, x[..., 2:]
            return out * 2

    x = torch.randn(2, 4, 4)
    graph_module = torch.export.export(Writes(), (x,)).module()
    FunctionalWrites()(graph_module)
    assert not any(n.target == torch.ops.aten.copy_.default for n in graph_module.graph.nodes)
    torch.testing.assert_close(graph_module(x), Writes()(x))
