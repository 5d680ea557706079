"""Load a model by name for the CLI and benchmarks, with its preprocessing.

Names: ``fashion-vit`` (the Fashion-MNIST reference model, weights shipped with
tome_fx), any timm name (``deit_small_patch16_224``), ``tv:NAME`` for torchvision
(``tv:vit_b_16``) and ``hf:ID_OR_DIR`` for HF image classifiers (``hf:ViTConfig``: random
init at a config class's default size). Weights come from the
library's own loading path (hub download, or ``checkpoint=`` a local file / HF folder);
when they cannot be reached, ``WeightsUnavailable`` says how to pass them locally.
"""

from __future__ import annotations

import os
import pathlib
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

import torch

from . import fashion_mnist

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but could not be loaded."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    input_size: tuple[int, int, int]  # channels, height, width
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str  # where the weights came from, for reports
    transform: Callable | None = None  # the weights' own eval preprocessing (PIL image -> tensor), if known

    def eval_transform(self) -> Callable:
        """PIL image -> input tensor, as the weights were evaluated: timm's data config
        (resize, centre crop, normalise), torchvision's weights preset; else ``preprocess``."""
        return self.transform or self.preprocess

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image as a normalised [C, H, W] tensor of the model's input size."""
        channels, height, width = self.input_size
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().div(255)
        pixels = pixels.reshape(height, width, channels).permute(2, 0, 1)
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return (pixels - mean) / std


_REACHABLE: dict[str, str | None] = {}  # host -> why it is unreachable (None: reachable), once per process


def _hub_host() -> str:
    return urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _check_reachable(host: str, name: str, how: str, timeout: float = 3.0) -> None:
    """Raise ``WeightsUnavailable`` at once where ``host`` cannot be reached: one quick connection,
    remembered for the process, instead of the download client's minute of retries per model."""
    if host == _hub_host() and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        _REACHABLE[host] = "HF_HUB_OFFLINE is set"
    if host not in _REACHABLE:
        began = time.perf_counter()
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _REACHABLE[host] = None
        except OSError as error:
            _REACHABLE[host] = f"no connection to {host} ({type(error).__name__} after {time.perf_counter() - began:.1f} s)"
    if _REACHABLE[host] is not None:
        raise WeightsUnavailable(f"pretrained weights for {name} are not reachable: {_REACHABLE[host]}; {how}")


def _unavailable(name: str, error: Exception, how: str) -> WeightsUnavailable:
    first_line = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return WeightsUnavailable(f"pretrained weights for {name} are not reachable ({first_line}); {how}")


def _timm(name: str, pretrained: bool, checkpoint: str | None) -> LoadedModel:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: not fashion-vit, tv:NAME, hf:ID_OR_DIR or a timm model name")
    if not (pretrained or checkpoint):
        return _timm_loaded(timm.create_model(name), "random init")
    how = "pass --checkpoint FILE (.safetensors/.pth of the timm model)"
    if not checkpoint:
        _check_reachable(_hub_host(), name, how)
    try:
        if checkpoint:  # timm's own loading path, from a local file
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": checkpoint})
        else:
            model = timm.create_model(name, pretrained=True)
    except Exception as error:  # hub errors have no common base class
        raise _unavailable(name, error, how) from error
    return _timm_loaded(model, checkpoint or "pretrained")


def _timm_loaded(model: torch.nn.Module, weights: str) -> LoadedModel:
    from timm.data import create_transform, resolve_data_config

    cfg = model.pretrained_cfg
    transform = create_transform(**resolve_data_config({}, model=model))
    return LoadedModel(model.eval(), tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]), weights,
                       transform)


def _torchvision(name: str, pretrained: bool, checkpoint: str | None) -> LoadedModel:
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    weights = "random init"
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        weights = checkpoint
    elif pretrained:
        how = "pass --checkpoint FILE (a torchvision state_dict)"
        entry = torchvision.models.get_model_weights(name).DEFAULT
        _check_reachable(urllib.parse.urlparse(entry.url).hostname, name, how)
        try:
            model.load_state_dict(entry.get_state_dict(progress=False))
        except Exception as error:  # download failures surface as URLError, OSError, ...
            raise _unavailable(name, error, how) from error
        weights = "pretrained"
    side = model.image_size
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()  # resize, crop, normalise
    return LoadedModel(model.eval(), (3, side, side), IMAGENET_MEAN, IMAGENET_STD, weights, preset)


def _hf(name: str, pretrained: bool, checkpoint: str | None) -> LoadedModel:
    import transformers

    source = checkpoint or name
    if not (pretrained or checkpoint or pathlib.Path(name).is_dir()):
        config_class = getattr(transformers, name, None)
        if not (isinstance(config_class, type) and issubclass(config_class, transformers.PretrainedConfig)):
            raise ValueError(f"hf:{name}: pass --pretrained (a hub id), --checkpoint DIR, or a config class "
                             "name such as hf:ViTConfig for random init at the default size")
        model = transformers.AutoModelForImageClassification.from_config(config_class())
        source = f"random init ({name} defaults)"
    else:
        how = "pass --checkpoint DIR (a folder saved with save_pretrained)"
        if not pathlib.Path(source).is_dir():
            _check_reachable(_hub_host(), name, how)
        try:
            model = transformers.AutoModelForImageClassification.from_pretrained(source)
        except OSError as error:
            raise _unavailable(name, error, how) from error
    config = model.config
    side = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return LoadedModel(model.eval(), (config.num_channels, side, side), (0.5,) * 3, (0.5,) * 3, source)


def _fashion(name: str, pretrained: bool, checkpoint: str | None) -> LoadedModel:
    path = checkpoint or fashion_mnist.CHECKPOINT
    model = fashion_mnist.create_model(path)
    return LoadedModel(model, (1, 28, 28), (fashion_mnist.MEAN,), (fashion_mnist.STD,), str(path))


_PREFIXES: dict[str, Callable[[str, bool, str | None], LoadedModel]] = {"tv:": _torchvision, "hf:": _hf}


def load(name: str, *, pretrained: bool = False, checkpoint: str | pathlib.Path | None = None) -> LoadedModel:
    """The named model in eval mode, with its input size and normalisation."""
    checkpoint = str(checkpoint) if checkpoint else None
    if name == "fashion-vit":
        return _fashion(name, pretrained, checkpoint)
    for prefix, loader in _PREFIXES.items():
        if name.startswith(prefix):
            return loader(name[len(prefix):], pretrained, checkpoint)
    return _timm(name, pretrained, checkpoint)
