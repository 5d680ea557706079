"""Training with ToMe on: accuracy and wall time of the Fashion-MNIST reference model.

    python benchmarks/train_fashion_mnist.py --epochs 9 --tome 16 \\
        --out benchmarks/results/training_accuracy/vit_r16.safetensors > .../train_r16.log
    python benchmarks/train_fashion_mnist.py --epochs 9 --tome 16,-1 \\
        --out benchmarks/results/training_accuracy/vit_r16_-1.safetensors > .../train_r16_-1.log
    python benchmarks/train_fashion_mnist.py --epochs 9 --out /tmp/vit_r0.safetensors > .../train_r0.log
    python benchmarks/training_accuracy.py [--out benchmarks/results]

The ToMe paper trains with merging on and reports about the same accuracy, trained faster.
Here the reference recipe (``train_fashion_mnist.py``: 9 epochs, seed 0) runs three ways:
without ToMe (the shipped reference model; ``train_r0.log`` times the recipe run again in
the same session), with a constant r=16 and with the decreasing schedule (16, -1). Each trained model is evaluated on the 10,000 test images at r=0 and at
both schedules; the training logs give the wall time (training steps alone, and with the
per-epoch evaluation) and the test accuracy after each epoch. Writes
training_accuracy.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import torch

import tome_fx
from tome_fx import bench, evaluate, fashion_mnist

HERE = pathlib.Path(__file__).parent / "results" / "training_accuracy"
SCHEDULES = [0, 16, (16, -1)]
# the shipped reference's own run (benchmarks/README.md: 37 minutes, per-epoch evaluation
# included), where train_r0.log (the recipe run again, without --tome) is missing
BASELINE = {"minutes_in_all": 37.0, "curve": [0.753, 0.826, 0.840, 0.860, 0.877, 0.890, 0.899, 0.903, 0.904]}


def _file(label: str) -> str:
    return label.replace(",", "_")


def read_log(path: pathlib.Path) -> dict:
    """Per-epoch records and the closing line's minutes of a ``train_fashion_mnist.py`` log."""
    lines = path.read_text().splitlines()
    epochs = [json.loads(line) for line in lines if line.startswith("{")]
    in_all = re.search(r"([\d.]+) min in all", lines[-1])
    return {"curve": [e["test_accuracy"] for e in epochs], "curve_r0": [e.get("test_accuracy_r0") for e in epochs],
            "minutes_training": sum(e["seconds"] for e in epochs) / 60,
            "minutes_in_all": float(in_all.group(1)) if in_all else None,
            "epoch_seconds": [e["seconds"] for e in epochs], "epochs": len(epochs)}


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
        log = HERE / f"train_r{_file(label)}.log"
        row |= read_log(log) if log.exists() else BASELINE
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = " | ".join(f"top-1 at r={bench.schedule_label(s)}" for s in SCHEDULES)
    lines = [f"| trained with | epochs | minutes, steps alone | minutes, with evaluation | {head} |",
             "|---|---|---|---|" + "---|" * len(SCHEDULES)]
    for row in rows:
        steps = f"{row['minutes_training']:.1f}" if "minutes_training" in row else "—"
        in_all = f"{row['minutes_in_all']:.1f}" if row.get("minutes_in_all") else "—"
        cells = " | ".join(f"{100 * row['top1'][bench.schedule_label(s)]:.2f}%" for s in SCHEDULES)
        lines.append(f"| r={row['trained_with']} | {len(row['curve'])} | {steps} | {in_all} | {cells} |")
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
