"""Top-1 accuracy of a model and its ToMe versions, side by side on the same batches.

Data: an ImageFolder layout (one sub-folder per class, sorted names give the class
indices, as for ImageNet's val set in synset folders), or a folder holding the
Fashion-MNIST idx files (its test split).
"""

from __future__ import annotations

import pathlib
from typing import Iterator

import torch

from . import fashion_mnist
from .zoo import LoadedModel

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def image_folder(root: str | pathlib.Path) -> list[tuple[pathlib.Path, int]]:
    """(file, class index) for every image under ``root/<class>/``."""
    root = pathlib.Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    samples = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise FileNotFoundError(f"no images in {root}: expected one sub-folder of images per class (ImageFolder layout)")
    return samples


def chunks(images: torch.Tensor, labels: torch.Tensor, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of in-memory tensors."""
    return ((images[i:i + batch], labels[i:i + batch]) for i in range(0, len(images), batch))


def batches(data: str | pathlib.Path, loaded: LoadedModel, batch: int, limit: int = 0) -> tuple[Iterator, int]:
    """(iterator of (images, labels) batches, number of images) for a data folder."""
    data = pathlib.Path(data)
    if (data / "t10k-images-idx3-ubyte.gz").is_file():
        images, labels = fashion_mnist.load_split("test", data)
        if limit:
            images, labels = images[:limit], labels[:limit]
        return chunks(images, labels, batch), len(images)
    from PIL import Image

    samples = image_folder(data)[: limit or None]

    def load():
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            with_images = [loaded.preprocess(Image.open(path)) for path, _ in chunk]
            yield torch.stack(with_images), torch.tensor([label for _, label in chunk])

    return load(), len(samples)


def logits_of(output) -> torch.Tensor:
    """Class logits from a model's output (a tensor, or an HF output with ``.logits``)."""
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.no_grad()
def top1(models: dict[str, torch.nn.Module], data: Iterator, total: int, progress: bool = True) -> dict[str, float]:
    """Top-1 accuracy of every model over the same batches."""
    from tqdm import tqdm

    correct = dict.fromkeys(models, 0)
    seen = 0
    with tqdm(total=total, unit="img", disable=not progress, desc="eval") as bar:
        for images, labels in data:
            for name, model in models.items():
                correct[name] += (logits_of(model(images)).argmax(-1) == labels).sum().item()
            seen += len(labels)
            bar.update(len(labels))
    return {name: count / seen for name, count in correct.items()}
