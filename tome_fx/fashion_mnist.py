"""The Fashion-MNIST reference model: real data and trained weights, offline.

ImageNet weights cannot be downloaded here, so accuracy-vs-r is measured on a small
timm ViT trained on Fashion-MNIST (Debian package ``dataset-fashion-mnist``). Its
28x28 images with 2x2 patches give 196 patch tokens plus a class token: the token
count of ViT-B/16 at 224, so merge schedules mean the same thing.
"""

from __future__ import annotations

import gzip
import pathlib

import torch

DATA_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
CHECKPOINT = pathlib.Path(__file__).parent / "assets" / "vit_fashion_mnist.safetensors"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# per-channel statistics of the training images, so inputs are roughly zero-mean unit-variance
MEAN, STD = 0.2860, 0.3530
MODEL_KWARGS = dict(img_size=28, patch_size=2, in_chans=1, num_classes=len(CLASSES),
                    embed_dim=64, depth=6, num_heads=2, mlp_ratio=3.0)


def create_model(checkpoint: str | pathlib.Path | None = CHECKPOINT) -> torch.nn.Module:
    """The reference ViT (eval mode); weights from ``checkpoint`` unless it is None."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **MODEL_KWARGS)
    if checkpoint is not None:
        path = pathlib.Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"no reference checkpoint at {path}; train one with "
                "`python benchmarks/train_fashion_mnist.py` or pass the file you have")
        model.load_state_dict(load_file(str(path)))
    return model.eval()


def _read_idx(path: pathlib.Path) -> torch.Tensor:
    """An idx(.gz) file (the MNIST format) as a uint8 tensor of its stated shape."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def load_split(split: str, data_dir: str | pathlib.Path = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 28, 28] normalised float32, labels [N] int64) of ``train`` or ``test``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = pathlib.Path(data_dir)
    images_file = folder / f"{prefix}-images-idx3-ubyte.gz"
    if not images_file.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder}; install it with "
            "`apt-get install dataset-fashion-mnist` or pass the folder holding the idx files")
    images = _read_idx(images_file).unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").long()
    return images, labels
