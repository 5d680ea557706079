"""Merge policies compared: top-1 of the Fashion-MNIST reference model and its RoPE twin per policy.

    python benchmarks/policies.py [--out benchmarks/results]

Each policy of ``tome_fx.merge.POLICIES`` (``tome_fx.transform(model, r, method=...)``) runs
the same schedules on both models, evaluated on the 10,000 test images: constant r from small
to the largest the 197 tokens allow (r=32: 197 -> 5 tokens after 6 blocks), and ToMe's
decreasing schedules (``(r, -1)``), where policies differ most. Tokens out and the FLOP bound
(the cost model's, with ToMe's matching) are the schedule's: policies differ in which tokens
merge, not how many (PiToMe scores all N x N token pairs, ToMe N/2 x N/2, a small share of a
block). Writes policies.json, policies.md and policies.png.
"""

from __future__ import annotations

import pathlib

import tome_fx
from tome_fx import merge
from tome_fx.tools import bench, evaluate, fashion_mnist

SCHEDULES = [0, 8, 16, 24, 28, 32, (16, -1), (24, -1), (32, -1)]
MODELS = {"reference": "vit", "rope twin": "rope"}


def rows(batch: int = 500) -> list[dict]:
    images, labels = fashion_mnist.load_split("test")
    table = []
    for name, arch in MODELS.items():
        model = fashion_mnist.create_model({"vit": fashion_mnist.CHECKPOINT, "rope": fashion_mnist.ROPE_CHECKPOINT}[arch],
                                           arch=arch)
        variants, plans = {}, {}
        for schedule in SCHEDULES:
            for method in merge.POLICIES:
                if schedule == 0 and method != "tome":
                    continue
                fast = tome_fx.transform(model, schedule, method=method)
                variants[f"{method} {bench.schedule_label(schedule)}"] = fast
                plans[bench.schedule_label(schedule)] = fast
        top1 = evaluate.top1(variants, evaluate.chunks(images, labels, batch), len(images))
        original = top1["tome 0"]
        for label, fast in plans.items():
            row = {"model": name, "schedule": label, "tokens_out": fast.token_counts[-1],
                   "bound": fast.predicted_flops(merging=False) / fast.predicted_flops()}
            for method in merge.POLICIES:
                accuracy = top1[f"tome {label}" if label == "0" else f"{method} {label}"]
                row[method], row[f"{method}_drop"] = accuracy, original - accuracy
            table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    methods = list(merge.POLICIES)
    lines = ["| model | r | tokens out | FLOP bound | " + " | ".join(f"{m} | drop" for m in methods) + " |",
             "|---|---|---|---|" + "---|---|" * len(methods)]
    lines += [f"| {row['model']} | {row['schedule']} | {row['tokens_out']} | {row['bound']:.2f}x | "
              + " | ".join(f"{row[m]:.2%} | {row[f'{m}_drop']:+.2%}" for m in methods) + " |" for row in table]
    return "\n".join(lines)


def plot(table: list[dict], path: pathlib.Path) -> None:
    with bench.figure(path) as ax:
        for name in MODELS:
            for method in merge.POLICIES:
                points = sorted((row["tokens_out"], 100 * row[f"{method}_drop"]) for row in table
                                if row["model"] == name and "," not in row["schedule"])
                ax.plot(*zip(*points), "o-" if name == "reference" else "s--", label=f"{name}, {method}")
        ax.set_xlabel("tokens after the last block (constant r)")
        ax.set_ylabel("top-1 drop from the original (points)")
        ax.set_title("Fashion-MNIST: accuracy drop per merge policy")


if __name__ == "__main__":
    bench.table_script(__file__, __doc__, rows, markdown, plot)
