"""Top-1 accuracy of a model and its ToMe versions, side by side on the same batches.

Data: an ImageFolder layout (one sub-folder per class, sorted names give the class
indices, as for ImageNet's val set in synset folders), read by torchvision's
``ImageFolder`` and a ``DataLoader`` whose worker processes decode while the models run,
with the weights' own preprocessing (``LoadedModel.eval_transform``); or a folder holding
the Fashion-MNIST idx files (its test split). Each model's time is kept apart from the
time spent waiting on the loader, so a speedup is never hidden behind decoding.
"""

from __future__ import annotations

import pathlib
import time
from typing import Iterable, Iterator

import torch

from . import fashion_mnist
from .zoo import LoadedModel

LAYOUT = "expected one sub-folder of images per class (ImageFolder layout)"


def image_folder(root: str | pathlib.Path, transform):
    """torchvision's ``ImageFolder`` over ``root/<class>/``, images through ``transform``."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root), transform=transform)
    except FileNotFoundError as error:  # no class folders, or no images in them
        raise FileNotFoundError(f"no images in {root}: {LAYOUT}") from error


def chunks(images: torch.Tensor, labels: torch.Tensor, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of in-memory tensors."""
    return ((images[i:i + batch], labels[i:i + batch]) for i in range(0, len(images), batch))


def batches(data: str | pathlib.Path, loaded: LoadedModel, batch: int, limit: int = 0,
            workers: int = 0) -> tuple[Iterable, int]:
    """(iterable of (images, labels) batches, number of images) for a data folder; an
    ImageFolder is decoded by ``workers`` processes (0: in this one)."""
    data = pathlib.Path(data)
    if (data / "t10k-images-idx3-ubyte.gz").is_file():
        images, labels = fashion_mnist.load_split("test", data)
        if limit:
            images, labels = images[:limit], labels[:limit]
        return chunks(images, labels, batch), len(images)
    dataset = image_folder(data, loaded.eval_transform())
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers), len(dataset)


def logits_of(output) -> torch.Tensor:
    """Class logits from a model's output (a tensor, or an HF output with ``.logits``)."""
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.no_grad()
def top1(models: dict[str, torch.nn.Module], data: Iterable, total: int, progress: bool = True,
         seconds: dict[str, float] | None = None) -> dict[str, float]:
    """Top-1 accuracy of every model over the same batches. ``seconds``, if given, receives
    each model's time in its calls, ``"loader"`` (time spent waiting for batches) and ``"total"``."""
    from tqdm import tqdm

    correct, spent = dict.fromkeys(models, 0), dict.fromkeys([*models, "loader"], 0.0)
    seen, began = 0, time.perf_counter()
    with tqdm(total=total, unit="img", disable=not progress, desc="eval") as bar:
        batches = iter(data)
        while True:
            waited = time.perf_counter()
            images, labels = next(batches, (None, None))
            spent["loader"] += time.perf_counter() - waited
            if images is None:
                break
            for name, model in models.items():
                start = time.perf_counter()
                correct[name] += (logits_of(model(images)).argmax(-1) == labels).sum().item()
                spent[name] += time.perf_counter() - start
            seen += len(labels)
            bar.update(len(labels))
    if seconds is not None:
        seconds.update(spent, total=time.perf_counter() - began)
    return {name: count / seen for name, count in correct.items()}
