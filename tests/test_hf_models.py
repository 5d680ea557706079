"""HF transformers 5.x vision and video models: drop-in outputs, exact merges of duplicate
patches, eager and sdpa attention, compiled == eager."""

import pytest
import torch
import transformers as T
from torch.utils import _pytree as pytree

import tome_fx

IMG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4)
VIDEO = dict(IMG, num_frames=4, tubelet_size=2)

# name: (factory, protected tokens, tokens are tubelets)
FAMILIES = {
    "ViTForImageClassification": (lambda: T.ViTForImageClassification(T.ViTConfig(**IMG, num_labels=3)), 1, False),
    "ViTModel": (lambda: T.ViTModel(T.ViTConfig(**IMG)), 1, False),
    "DeiTForImageClassificationWithTeacher": (
        lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**IMG, num_labels=3)),
        2,
        False,
    ),
    "CLIPVisionModel": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**IMG)), 1, False),
    # its MAP head: a learned query attends over the (merged) tokens, with proportional attention
    "SiglipVisionModel": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**IMG, vision_use_head=True)), 0, False),
    "Dinov2Model": (lambda: T.Dinov2Model(T.Dinov2Config(**IMG)), 1, False),
    "Dinov2WithRegistersModel": (
        lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**IMG, num_register_tokens=4)),
        5,
        False,
    ),
    "DPTForDepthEstimation": (lambda: _dpt(), 1, False),
    "VideoMAEForVideoClassification": (
        lambda: T.VideoMAEForVideoClassification(T.VideoMAEConfig(**VIDEO, num_labels=3)),
        0,
        True,
    ),
}
IMPLS = ["eager", "sdpa"]


def _dpt():
    """DPT reassembles the hidden states of every block into grids for its depth head. HF's
    init (std 0.02) shrinks the prediction through the head's many convs to ~1e-8, where no
    comparison means anything: the neck and head get PyTorch's default init instead, and the
    last conv a bias that keeps its ReLU open."""
    model = T.DPTForDepthEstimation(T.DPTConfig(
        **IMG, backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 16], fusion_hidden_size=8, reassemble_factors=[2, 1]
    ))
    for module in [*model.neck.modules(), *model.head.modules()]:
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.reset_parameters()
    with torch.no_grad():
        model.head.head[-2].bias.fill_(1.0)
    return model


def make(name, impl, dtype=torch.float32):
    torch.manual_seed(0)
    model = FAMILIES[name][0]()
    model.set_attn_implementation(impl)
    return model.eval().to(dtype)


def inputs(name, batch=2, dtype=torch.float32):
    shape = (4, 3, 16, 16) if FAMILIES[name][2] else (3, 16, 16)
    return torch.randn(batch, *shape, dtype=dtype)


def tensors(output):
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", FAMILIES)
def test_r0_gives_the_original_outputs(name, impl):
    model = make(name, impl)
    x = inputs(name)
    fast = tome_fx.transform(model, 0)  # input size from config.image_size / num_channels
    assert fast.plan.protected == FAMILIES[name][1]
    with torch.no_grad():
        for got, want in zip(tensors(fast(x)), tensors(model(x)), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", FAMILIES)
def test_merging_keeps_output_structure_and_shapes(name, impl):
    model = make(name, impl)
    x = inputs(name, batch=3)
    fast = tome_fx.transform(model, 2, example_inputs=x)
    assert fast.token_counts[-1] == fast.token_counts[0] - 4
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert type(got) is type(want)
    assert [t.shape for t in tensors(got)] == [t.shape for t in tensors(want)]
    assert not all(torch.allclose(g, w) for g, w in zip(tensors(got), tensors(want)))


def _copy_token(pixels, dst, src, tubelets):
    """Make token ``dst`` an exact copy of token ``src`` (patch indices, no protected offset)."""
    p, grid = 4, 4
    if tubelets:  # [B, T, C, H, W], tubelets of 2 frames, tokens ordered (time, row, col)
        (td, kd), (ts, ks) = divmod(dst, grid * grid), divmod(src, grid * grid)
        frames = lambda t: slice(2 * t, 2 * t + 2)  # noqa: E731
    else:
        td = ts = None
        kd, ks = dst, src
        frames = lambda t: slice(None)  # noqa: E731
    rows = lambda k: slice(k // grid * p, k // grid * p + p)  # noqa: E731
    cols = lambda k: slice(k % grid * p, k % grid * p + p)  # noqa: E731
    pixels[:, frames(td), ..., rows(kd), cols(kd)] = pixels[:, frames(ts), ..., rows(ks), cols(ks)]


def _with_duplicate_patches(name, impl="sdpa"):
    """A float64 model with position embeddings zeroed, inputs whose set-A tokens are exact
    copies of their set-B neighbours (every other one: uneven sizes, so proportional attention
    matters), and the schedule that merges exactly those copies in block 0."""
    model = make(name, impl, torch.float64)
    with torch.no_grad():
        for module in model.modules():
            for attr in ("position_embeddings", "position_embedding"):
                table = getattr(module, attr, None)
                table = table.weight if isinstance(table, torch.nn.Embedding) else table
                if isinstance(table, torch.Tensor):
                    table.zero_()
    protected, tubelets = FAMILIES[name][1:]
    x = inputs(name, dtype=torch.float64)
    tokens = protected + (32 if tubelets else 16)
    pairs = list(range(protected + protected % 2, tokens - 1, 2))[::2]
    for a in pairs:
        _copy_token(x, a - protected, a + 1 - protected, tubelets)
    return model, x, [len(pairs)], tokens


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", FAMILIES)
def test_exact_duplicate_patches_merge_without_changing_any_output(name, impl):
    """Merging all the copies in block 0 (proportional attention, weighted pooling, un-merged
    outputs) is exact: to float64's precision with sdpa, to float32's with HF's eager attention,
    which takes its softmax in float32."""
    model, x, schedule, tokens = _with_duplicate_patches(name, impl)
    fast = tome_fx.transform(model, schedule, example_inputs=x)
    assert fast.token_counts == [tokens, tokens - schedule[0], tokens - schedule[0]]
    tol = 1e-9 if impl == "sdpa" else 1e-6
    with torch.no_grad():
        for got, want in zip(tensors(fast(x)), tensors(model(x)), strict=True):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2WithRegistersModel"])
def test_returned_attention_maps_are_unmerged_exactly(name):
    """``output_attentions=True``: each map is un-merged along its queries (copied) and its keys
    (split by size), so with duplicate patches every map equals the original's (to float32's
    precision: HF's eager attention takes its softmax in float32)."""
    model, x, schedule, _ = _with_duplicate_patches(name, "eager")
    fast = tome_fx.transform(model, schedule, example_inputs={"pixel_values": x, "output_attentions": True})
    with torch.no_grad():
        got, want = fast(pixel_values=x, output_attentions=True), model(x, output_attentions=True)
    assert len(got.attentions) == 2
    for g, w in zip(tensors(got), tensors(want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_matches_eager_without_recompiling_for_a_new_batch(name):
    model = make(name, "sdpa")
    compiled = tome_fx.compile(model, 2, fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled(inputs(name, batch=2))
        with torch._dynamo.config.patch(error_on_recompile=True):
            x = inputs(name, batch=5)
            got = compiled(x)
        want = compiled.model(x)
    for g, w in zip(tensors(got), tensors(want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
