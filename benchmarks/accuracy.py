"""Accuracy vs speed on real data: the Fashion-MNIST reference ViT and MiniLM embeddings.

    python benchmarks/accuracy.py [--out benchmarks/results] [--batch 64] [--repeats 20]

Fashion-MNIST: top-1 on the 10,000 test images (``apt-get install dataset-fashion-mnist``)
for each schedule, next to the throughput of the same model (eager and ``torch.compile``,
fp32, timed interleaved) and the cost model's FLOP bound for the whole model (blocks and
merges from ``tome_fx.cost``, plus the conv stem, counted). MiniLM: cosine of mean-pooled
sentence embeddings, ToMe vs original, padded to 32 tokens. Writes accuracy.json,
accuracy.md and accuracy.png (accuracy vs speedup).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

import torch

import tome_fx
from tome_fx import cost
from tome_fx.tools import bench, evaluate, fashion_mnist, text_agreement

SCHEDULES = [0, 4, 8, 12, 16, 20, 24, 28, 32, (16, -1), (24, -1)]


def stem_flops(model: torch.nn.Module) -> int:
    """FLOPs per image outside the blocks (the conv stem; the head is a 64x10 linear), which
    ToMe does not change: part of the whole-model bound."""
    with torch.no_grad():
        return cost.counted_flops(lambda: model.patch_embed(torch.zeros(1, 1, 28, 28)))


def fashion_rows(batch: int, repeats: int) -> list[dict]:
    model = fashion_mnist.create_model()
    images, labels = fashion_mnist.load_split("test")
    variants = {bench.schedule_label(s): tome_fx.transform(model, s) for s in SCHEDULES}
    accuracy = evaluate.top1(variants, evaluate.chunks(images, labels, 500), len(images))
    eager = bench.time_interleaved(variants, images[:batch], repeats)
    compiled = bench.time_interleaved({k: tome_fx.CompiledToMe(v) for k, v in variants.items()}, images[:batch],
                                      repeats, warmup=2)
    fixed = stem_flops(model)
    rows = []
    for label, fast in variants.items():
        row = {"schedule": label, "tokens_out": fast.token_counts[-1], "top1": accuracy[label],
               "drop": accuracy["0"] - accuracy[label],
               "bound": (fast.predicted_flops(merging=False) + fixed) / (fast.predicted_flops() + fixed)}
        for mode, times in (("eager", eager), ("compiled", compiled)):
            median = statistics.median(times[label])
            row[f"images_per_s_{mode}"] = batch / median
            row[f"speedup_{mode}"] = statistics.median(times["0"]) / median
        rows.append(row)
    return rows


def minilm_rows() -> list[dict]:
    agreement = text_agreement.sentence_agreement(text_agreement.minilm_path(), [1, 2, 3, 4], length=32)
    return [{"r": r, "tokens": f"{counts[0]}->{counts[-1]}", "cosine_mean": mean, "cosine_min": low}
            for r, (mean, low, counts) in agreement.items()]


def markdown(fashion: list[dict], minilm: list[dict]) -> str:
    lines = ["| r | tokens out | top-1 | drop | img/s eager | speedup eager | img/s compiled | speedup compiled | bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['schedule']} | {row['tokens_out']} | {row['top1']:.2%} | {row['drop']:+.2%} | "
              f"{row['images_per_s_eager']:.0f} | {row['speedup_eager']:.2f}x | {row['images_per_s_compiled']:.0f} | "
              f"{row['speedup_compiled']:.2f}x | {row['bound']:.2f}x |" for row in fashion]
    lines += ["", "| MiniLM r | tokens | cosine mean | cosine min |", "|---|---|---|---|"]
    lines += [f"| {row['r']} | {row['tokens']} | {row['cosine_mean']:.4f} | {row['cosine_min']:.4f} |"
              for row in minilm]
    return "\n".join(lines)


def plot(fashion: list[dict], path: pathlib.Path) -> None:
    with bench.figure(path) as ax:
        for mode in ("eager", "compiled"):
            speed = [row[f"speedup_{mode}"] for row in fashion]
            ax.plot(speed, [100 * row["top1"] for row in fashion], "o", label=mode)
            for row, x in zip(fashion, speed):
                ax.annotate(row["schedule"], (x, 100 * row["top1"]), fontsize=6, textcoords="offset points",
                            xytext=(3, 3))
        ax.axhline(100 * fashion[0]["top1"] - 1, color="grey", linestyle=":", label="1 point below the original")
        ax.set_xlabel("speedup over the original (2 CPU threads, fp32)")
        ax.set_ylabel("Fashion-MNIST top-1 (%)")
        ax.set_title("reference ViT: accuracy vs speed by r schedule")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--batch", type=int, default=64, help="batch size of the timed calls")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    fashion, minilm = fashion_rows(args.batch, args.repeats), minilm_rows()
    table = markdown(fashion, minilm)
    print(table)
    bench.write_report(args.out, "accuracy", argv, {"batch": args.batch, "fashion_mnist": fashion, "minilm": minilm},
                       table, lambda path: plot(fashion, path))


if __name__ == "__main__":
    main()
