"""Public API contract: errors, refusals, the original model left untouched, source tracking."""

import pytest
import timm
import torch
from torch import nn

import tome_fx
from tome_fx import UnsupportedModelError


@pytest.fixture(scope="module")
def tiny():
    return timm.create_model("deit_tiny_patch16_224", depth=2, num_classes=4).eval()


def test_original_model_is_not_modified(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = tiny(images)
        fast = tome_fx.transform(tiny, 8)
        fast(images)
        after_out = tiny(images)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert torch.equal(after_out, expected)
    assert all(type(b).forward is timm.models.vision_transformer.Block.forward for b in tiny.blocks)
    # documented: parameters are shared, not copied
    assert fast.graph_module.get_parameter("cls_token") is tiny.cls_token


@pytest.mark.parametrize(
    "r, error, message",
    [
        (-1, ValueError, r"r must be >= 0, got -1"),
        (1.5, ValueError, r"a fraction r must be in \(0, 1\), got 1.5"),
        ("13", TypeError, r"r must be an int"),
        ([1, 2, 3], ValueError, r"r lists 3 values but the model has 2 attention blocks"),
        ((2, 3.0), ValueError, r"inflection must be in \[-1, 1\], got 3.0"),
    ],
)
def test_bad_r_is_rejected_with_a_clear_error(tiny, r, error, message):
    with pytest.raises(error, match=message):
        tome_fx.transform(tiny, r)


def test_wrong_image_size_is_a_clear_error(tiny):
    fast = tome_fx.transform(tiny, 4)
    with pytest.raises(ValueError, match="transform again with example_inputs"):
        fast(torch.randn(1, 3, 160, 160))


def test_batch_size_is_dynamic_including_one(tiny):
    fast = tome_fx.transform(tiny, 4, example_inputs=torch.randn(1, 3, 224, 224))
    with torch.no_grad():
        for batch in (1, 5):
            images = torch.randn(batch, 3, 224, 224)
            single = torch.cat([fast(images[i : i + 1]) for i in range(batch)])
            torch.testing.assert_close(fast(images), single, rtol=1e-5, atol=1e-5)


def test_model_without_stated_input_size_needs_example_inputs():
    class Net(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="example_inputs"):
        tome_fx.transform(Net(), 2)


def test_model_without_attention_is_refused():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedModelError, match="no attention block"):
        tome_fx.transform(cnn, 2, example_inputs=torch.randn(2, 3, 16, 16))


class _Block(nn.Module):
    def __init__(self, dim, tokens, bias_in_block, mlp_view=None):
        super().__init__()
        self.mlp_view = mlp_view
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj, self.mlp = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.pos_bias = nn.Parameter(torch.randn(1, tokens, dim)) if bias_in_block else None

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        if self.pos_bias is not None:
            x = x + self.pos_bias
        if self.mlp_view == "flat":  # tokens folded with the batch, [B*N, C], and back
            return x + self.mlp(self.norm2(x).reshape(b * n, c)).view(b, n, c)
        if self.mlp_view == "scrambled":  # [B*N, C] read back as [N, B, C]: mixes images
            return x + self.mlp(self.norm2(x).reshape(b * n, c)).view(n, b, c).transpose(0, 1)
        return x + self.mlp(self.norm2(x))


class _TinyViT(nn.Module):
    """A user's own ViT: plain PyTorch, class token, sdpa attention."""

    def __init__(self, tokens=16, dim=8, depth=3, bias_in_block=False, readout=0, per_token=False, mlp_view=None):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(*[_Block(dim, tokens + 1, bias_in_block, mlp_view) for _ in range(depth)])
        self.readout, self.per_token = readout, per_token

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        x = self.blocks(x)
        return x if self.per_token else x[:, self.readout]


def test_users_own_vit_is_transformed():
    model = _TinyViT().eval()
    fast = tome_fx.transform(model, 3, example_inputs=torch.randn(2, 16, 4))
    assert fast.plan.protected == 1
    assert fast.token_counts == [17, 14, 11, 8]
    assert fast(torch.randn(3, 16, 4)).shape == (3, 8)


def test_tokens_folded_with_the_batch_are_followed():
    """[B, N, C] -> [B*N, C] -> [B, N, C] around the MLP: the view back is re-inferred."""
    torch.manual_seed(0)
    plain, folded = _TinyViT().eval(), _TinyViT(mlp_view="flat").eval()
    folded.load_state_dict(plain.state_dict())
    x = torch.randn(3, 16, 4)
    got = tome_fx.transform(folded, 3, example_inputs=x)(x)
    torch.testing.assert_close(got, tome_fx.transform(plain, 3, example_inputs=x)(x))


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"bias_in_block": True}, r"block blocks\.0 .*fixed token count"),
        ({"readout": -1}, "counted from the end"),
        ({"mlp_view": "scrambled"}, r"block blocks\.0 .*folds or splits the token axis"),
    ],
)
def test_unprovable_rewrites_are_refused_naming_the_block(kwargs, reason):
    model = _TinyViT(**kwargs).eval()
    with pytest.raises(UnsupportedModelError, match=reason) as info:
        tome_fx.transform(model, 2, example_inputs=torch.randn(2, 16, 4))
    assert "graph node" in str(info.value) or "returns" in str(info.value)


def test_tokens_read_at_fixed_positions_are_protected():
    """A readout of token 5 keeps tokens 0..5 in place: they are protected like learned ones."""
    model = _TinyViT(readout=5).eval()
    fast = tome_fx.transform(model, 100, example_inputs=torch.randn(2, 16, 4))
    assert fast.plan.protected == 6
    assert fast.schedule[0] == (17 - 6) // 2  # r is clamped with the six tokens left out
    assert tome_fx.transform(_TinyViT(per_token=True), 2, example_inputs=torch.randn(2, 16, 4)).plan.protected == 1


def test_per_token_outputs_are_unmerged_to_the_original_positions():
    model = _TinyViT(per_token=True).eval()
    x = torch.randn(3, 16, 4)
    drop_in = tome_fx.transform(model, 3, example_inputs=x)
    merged = tome_fx.transform(model, 3, example_inputs=x, unmerge_outputs=False)
    with torch.no_grad():
        full = drop_in(x)
        tokens, state = merged.forward_with_tokens(x)
    assert full.shape == model(x).shape == (3, 17, 8)
    assert tokens.shape == (3, 8, 8) and state.size.shape == (3, 8)
    # every original token holds its group's value ...
    torch.testing.assert_close(full, tokens.gather(1, state.positions[..., None].expand(-1, -1, 8)))
    # ... so a plain mean over original positions is the size-weighted mean over merged tokens
    weighted = (tokens * state.size[..., None]).sum(1) / state.size.sum(1, keepdim=True)
    torch.testing.assert_close(full.mean(1), weighted)
    assert torch.equal(full[:, 0], tokens[:, 0])  # the class token stays in place
    # merged tokens come in the raster order of their first patches
    first = torch.full((3, 8), 17).scatter_reduce(1, state.positions, torch.arange(17).expand(3, -1), "amin")
    assert (first.diff(dim=1) > 0).all()


def test_trace_source_partitions_the_patches(tiny):
    fast = tome_fx.transform(tiny, 20, trace_source=True)
    with torch.no_grad():
        _, state = fast.forward_with_tokens(torch.randn(2, 3, 224, 224))
    assert state.source.shape == (2, fast.token_counts[-1], 197)
    assert torch.equal(state.source.sum(1), torch.ones(2, 197))
    assert torch.equal(state.source.sum(2), state.size)
    assert state.source[:, 0, 0].eq(1).all()  # the class token holds itself only
    assert state.source[:, 0].sum(-1).eq(1).all()


def test_prop_attn_can_be_switched_off(tiny):
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        with_prop = tome_fx.transform(tiny, 16)(images)
        without = tome_fx.transform(tiny, 16, prop_attn=False)(images)
    assert not torch.allclose(with_prop, without)


def test_prop_attn_forms_agree_and_a_bad_one_is_refused(tiny):
    """``"flash"`` (log(size) folded into a key column, no mask: FlashAttention can run) equals
    ``"bias"`` (a float mask); True picks ``"bias"`` on CPU."""
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        outs = {form: tome_fx.transform(tiny, 16, prop_attn=form)(images) for form in (True, "bias", "flash")}
    assert torch.equal(outs[True], outs["bias"])
    torch.testing.assert_close(outs["flash"], outs["bias"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prop_attn is True, False or one of"):
        tome_fx.transform(tiny, 16, prop_attn="flsh")


class _SeparateQKVBlock(nn.Module):
    """Separate q/k/v linears and a hand-written softmax attention, as users write them."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def split(self, t):
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x):
        h = self.norm1(x)
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        x = x + self.out((weights @ v).transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class _SeparateQKVViT(nn.Module):
    def __init__(self, dim=16, depth=3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(_SeparateQKVBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


def test_users_own_vit_with_separate_qkv_and_manual_softmax():
    model = _SeparateQKVViT().eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        same = tome_fx.transform(model, 0, example_inputs=images)(images)
        fast = tome_fx.transform(model, 3, example_inputs=images)
        merged = fast(images)
        compiled = tome_fx.compile(model, 3, example_inputs=images, fullgraph=True)(images)
    torch.testing.assert_close(same, model(images))
    assert fast.plan.protected == 1 and fast.token_counts == [17, 14, 11, 8]
    assert merged.shape == (3, 5) and not torch.allclose(merged, model(images))
    torch.testing.assert_close(compiled, merged, rtol=1e-4, atol=1e-4)


def test_each_compiled_model_compiles_a_graph_of_its_own():
    """An r sweep in one process: had the models shared one compiled frame, the second would
    be a recompile, and past dynamo's limit (1 here) fall back to eager (fullgraph: raise)."""
    torch._dynamo.reset()
    model = _SeparateQKVViT().eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        for r in (1, 2, 3):
            compiled = tome_fx.compile(model, r, example_inputs=images, fullgraph=True)
            torch.testing.assert_close(compiled(images), compiled.model(images), rtol=1e-4, atol=1e-4)


class _Positioned(torch.nn.Module):
    """Positions passed in as an input of their own, without a batch (as FLUX's ids are), and a
    residual added back through dtype casts (as Wan's is)."""

    def __init__(self, dim=8):
        super().__init__()
        self.embed, self.qkv, self.proj = torch.nn.Linear(4, dim), torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x, table):
        h = self.embed(x) + table
        for _ in range(2):
            b, n, c = h.shape
            q, k, v = self.qkv(h).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
            attended = self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
            h = (h.double() + attended.double()).type_as(h)
        return h.mean(1)


@pytest.mark.parametrize("batch", [1, 2])
def test_an_input_without_a_batch_is_taken_as_it_is(batch):
    model = _Positioned().eval()
    table = torch.zeros(16, 8)  # equal positions: merging duplicates stays exact
    fast = tome_fx.transform(model, 2, example_inputs=(torch.randn(batch, 16, 4), table))
    assert fast.schedule == [2, 2] and fast.input_shapes == [(16, 4)]
    x = torch.randn(3, 16, 4)
    x[:, ::2] = x[:, 1::2]  # every patch has a twin
    torch.testing.assert_close(fast(x, table), model(x, table), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        fast(x, torch.zeros(8, 8))


def test_a_transform_that_merges_nothing_says_so():
    inputs = (torch.randn(2, 16, 4), torch.zeros(16, 8))
    with pytest.warns(UserWarning, match=r"merges no token: r=0.01 comes to 0 in every block \(16 tokens"):
        tome_fx.transform(_Positioned().eval(), 0.01, example_inputs=inputs)


class ToyCache:
    """A key/value cache object that is no pytree, as HF's ``DynamicCache`` is to torch.export."""


class _ReturnsACache(_Positioned):
    def forward(self, x, table, **kwargs):  # use_cache arrives in **kwargs, as in HF's Llava
        out = super().forward(x, table)
        return (out, ToyCache()) if kwargs.get("use_cache", True) else out


def test_a_cache_in_the_outputs_is_left_out_and_said():
    model, inputs = _ReturnsACache().eval(), (torch.randn(2, 16, 4), torch.zeros(16, 8))
    with pytest.warns(UserWarning, match="captured with use_cache=False"):
        fast = tome_fx.transform(model, 0, example_inputs=inputs)
    torch.testing.assert_close(fast(*inputs), model(*inputs, use_cache=False))  # called as before, no cache
    with pytest.raises(ValueError, match="use_cache"):
        fast(*inputs, use_cache=True)


def _merges(graph_module):
    return graph_module.graph.find_nodes(op="call_function", target=tome_fx.merge.tome_merge)


@pytest.mark.parametrize("unmerge_outputs", [True, False])
def test_forward_follows_no_positions_that_nothing_reads(tiny, unmerge_outputs):
    """A classifier's logits read no positions: ``forward``'s graph drops them from every merge
    (fewer ops per merge, what batch-1 latency is made of), with the same outputs; so does
    the raster order that ``unmerge_outputs=False`` computes for the state alone."""
    fast = tome_fx.transform(tiny, 8, unmerge_outputs=unmerge_outputs)
    lean = _merges(fast.forward_graph_module)
    assert lean and all(step.args[3] is None for step in lean)
    targets = [n.target for n in fast.forward_graph_module.graph.nodes]
    assert tome_fx.merge.initial_positions not in targets and tome_fx.merge.raster_order not in targets
    assert all(step.args[3] is not None for step in _merges(fast.graph_module))
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        out, state = fast.forward_with_tokens(images)
        assert torch.equal(fast(images), out)
    assert state.positions.shape == (3, 197)


def test_forward_follows_positions_where_they_are_read(tiny):
    """Per-token outputs are un-merged (they read the last positions), so every merge follows them."""
    tokens = timm.create_model("deit_tiny_patch16_224", depth=2, num_classes=0, global_pool="").eval()
    fast = tome_fx.transform(tokens, 8)
    assert all(step.args[3] is not None for step in _merges(fast.forward_graph_module))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fast(images), fast.forward_with_tokens(images)[0])


def test_forward_follows_positions_that_a_masked_merge_reads():
    """A merge under an attention mask reads the positions (to restage the mask), even where
    the outputs (a classifier's logits) read none."""
    import transformers as T

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                          intermediate_size=64, num_labels=3)
    model = T.BertForSequenceClassification(config).eval()
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    batch = {"input_ids": torch.randint(1, 50, (2, 12)) * mask, "attention_mask": mask}
    fast = tome_fx.transform(model, 2, example_inputs=batch)
    assert all(step.args[3] is not None for step in _merges(fast.forward_graph_module))
    with torch.no_grad():
        assert torch.equal(fast(**batch).logits, fast.forward_with_tokens(**batch)[0].logits)
