"""Training with ToMe on: accuracy and wall time of the Fashion-MNIST reference model.

    python benchmarks/train_fashion_mnist.py --epochs 9 --tome 16 \\
        --out benchmarks/results/training_accuracy/vit_r16.safetensors > .../train_r16.log
    python benchmarks/train_fashion_mnist.py --epochs 9 --tome 16,-1 \\
        --out benchmarks/results/training_accuracy/vit_r16_-1.safetensors > .../train_r16_-1.log
    python benchmarks/train_fashion_mnist.py --epochs 2 --out /tmp/vit_r0.safetensors > .../train_r0_timing.log
    python benchmarks/training_accuracy.py [--out benchmarks/results]

The ToMe paper trains with merging on and reports about the same accuracy, trained faster.
Here the reference recipe (``train_fashion_mnist.py``: 9 epochs, seed 0) runs with a
constant r=16 and with the decreasing schedule (16, -1), beside the shipped reference model
(the same recipe without ToMe). Each model is evaluated on the 10,000 test images at r=0
and at both schedules. Training time is 9 x the median epoch (training steps alone: a
median, since other jobs shared the 2 cores during some epochs); the reference's epoch is
timed by running the recipe again for 2 epochs (``train_r0_timing.log``; an epoch's time
does not depend on the learning-rate schedule). Writes training_accuracy.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import torch

import tome_fx
from tome_fx.tools import bench, evaluate, fashion_mnist

HERE = pathlib.Path(__file__).parent / "results" / "training_accuracy"
SCHEDULES = [0, 16, (16, -1)]
EPOCHS = 9
# the shipped reference's test accuracy after each epoch (benchmarks/README.md)
BASELINE_CURVE = [0.753, 0.826, 0.840, 0.860, 0.877, 0.890, 0.899, 0.903, 0.904]


def _file(label: str) -> str:
    return label.replace(",", "_")


def read_log(path: pathlib.Path) -> dict:
    """Per-epoch records of a ``train_fashion_mnist.py`` log."""
    epochs = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    seconds = [e["seconds"] for e in epochs]
    return {"curve": [e["test_accuracy"] for e in epochs], "curve_r0": [e.get("test_accuracy_r0") for e in epochs],
            "epoch_seconds": seconds, "minutes": EPOCHS * statistics.median(seconds) / 60}


def table(test_x, test_y) -> list[dict]:
    rows = []
    for trained in SCHEDULES:
        label = bench.schedule_label(trained)
        checkpoint = fashion_mnist.CHECKPOINT if trained == 0 else HERE / f"vit_r{_file(label)}.safetensors"
        model = fashion_mnist.create_model(checkpoint).eval()
        models = {bench.schedule_label(s): tome_fx.transform(model, s, example_inputs=test_x[:2]) if s else model
                  for s in SCHEDULES}
        top1 = evaluate.top1(models, evaluate.chunks(test_x, test_y, 500), len(test_y), progress=False)
        row = {"trained_with": label, "top1": top1}
        if trained == 0:
            row |= {"minutes": read_log(HERE / "train_r0_timing.log")["minutes"], "curve": BASELINE_CURVE}
        else:
            row |= read_log(HERE / f"train_r{_file(label)}.log")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = " | ".join(f"top-1 at r={bench.schedule_label(s)}" for s in SCHEDULES)
    lines = [f"| trained with | training minutes | speedup | {head} |", "|---|---|---|" + "---|" * len(SCHEDULES)]
    for row in rows:
        cells = " | ".join(f"{100 * row['top1'][bench.schedule_label(s)]:.2f}%" for s in SCHEDULES)
        lines.append(f"| r={row['trained_with']} | {row['minutes']:.1f} | {rows[0]['minutes'] / row['minutes']:.2f}x "
                     f"| {cells} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        curve = row["curve"]
        ax.plot(range(1, len(curve) + 1), [100 * a for a in curve], marker="o",
                label=f"trained with r={row['trained_with']}" + (", evaluated with it" if row["trained_with"] != "0"
                                                                  else ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Fashion-MNIST reference model, trained with ToMe on")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    test_x, test_y = fashion_mnist.load_split("test")
    rows = table(test_x, test_y)
    text = markdown(rows)
    print(text)
    out = pathlib.Path(args.out)
    command = "python benchmarks/training_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "training_accuracy.json").write_text(json.dumps(
        {"command": command, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    (out / "training_accuracy.md").write_text(text + "\n")
    plot(rows, out / "training_accuracy.png")


if __name__ == "__main__":
    main()
