import socket

import pytest
import timm
import torch
from safetensors.torch import save_file

from tome_fx.tools import demo, zoo


def test_demo_loads_local_weights_and_reports(tmp_path, capsys):
    model = timm.create_model("deit_tiny_patch16_224", num_classes=1000)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    demo.main(["--model", "deit_tiny_patch16_224", "--checkpoint", str(path), "--r", "8", "--batch", "2",
               "--repeats", "1"])
    out = capsys.readouterr().out
    assert f"({path})" in out
    assert "tokens per block: 197 189 181" in out
    assert "x measured vs" in out and "FLOPs/image" in out
    # the weights really came from the file: same logits as the model that wrote it
    loaded, _ = demo._load("deit_tiny_patch16_224", True, str(path))
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model.eval()(images))


def test_an_unreachable_hub_is_noticed_once_and_the_demo_falls_back_at_once(monkeypatch, capsys):
    attempts = []

    def unreachable(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(zoo, "_REACHABLE", {})
    demo.main(["--model", "deit_tiny_patch16_224", "--r", "8", "--batch", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "not reachable: no connection to huggingface.co" in out and "RANDOM INIT" in out
    with pytest.raises(zoo.WeightsUnavailable, match="--checkpoint"):
        zoo.load("vit_tiny_patch16_224", pretrained=True)
    assert attempts == [("huggingface.co", 443)]  # one quick probe, remembered; no client retries
