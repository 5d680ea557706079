"""Deploying a ToMe model (issue 14, in progress): ONNX Runtime and AOTInductor. (``torch.export`` with a
dynamic batch: ``test_module_behaviour``.) Each is exported at batch 2 and run at batch 5."""

from unittest import mock

import pytest
import torch

import tome_fx
import timm  # noqa: I001
from tome_fx import merge


def test_the_export_order_is_the_stable_argsort():
    """Under torch.export the matching's order is built from comparisons (ONNX has no stable
    sort); it must equal the stable argsort, ties and -inf (protected tokens) included."""
    torch.manual_seed(0)
    values = torch.randn(4, 33)
    values[:, ::3] = values[:, 1::3]  # ties
    values[:, :2] = -torch.inf
    want = merge.descending_order(values)
    assert torch.equal(want, values.argsort(dim=-1, descending=True, stable=True))
    with mock.patch("torch.compiler.is_exporting", return_value=True):
        assert torch.equal(merge.descending_order(values), want)


def _deit():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                              embed_dim=64, num_heads=2, num_classes=10).eval()
    torch.nn.init.normal_(model.head.weight)  # a head that reads the tokens
    return model, "x", lambda out: out


def _hf_vit():
    import transformers as T

    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=4, num_labels=10)).eval()
    return model, "pixel_values", lambda out: out.logits


@pytest.mark.parametrize("build", [_deit, _hf_vit], ids=["timm-deit", "hf-vit"])
def test_onnx_runtime_runs_the_exported_model_at_another_batch_size(tmp_path, build):
    import onnxruntime as ort

    model, name, logits = build()
    fast = tome_fx.transform(model, 4, example_inputs=torch.randn(2, 3, 32, 32))
    batch = torch.export.Dim("batch", min=1, max=64)
    path = tmp_path / "model.onnx"
    torch.onnx.export(fast, (torch.randn(2, 3, 32, 32),), str(path), dynamo=True,
                      dynamic_shapes={name: {0: batch}}, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, 32, 32)
    (got, *_) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        want = logits(fast(images))
    assert not torch.allclose(want, logits(model(images)))  # it merged
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


def test_aot_inductor_package_runs_and_matches(tmp_path):
    model, name, logits = _deit()
    fast = tome_fx.transform(model, 4, example_inputs=torch.randn(2, 3, 32, 32))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(fast, (torch.randn(2, 3, 32, 32),), dynamic_shapes={name: {0: batch}})
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "deit.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(runner(images), logits(fast(images)), rtol=1e-4, atol=1e-4)
