"""How should a merged token rotate? Top-1 of the Fashion-MNIST RoPE model against r, per rule.

    python benchmarks/rope.py [--out benchmarks/results]

The RoPE twin of the reference model (``fashion_mnist.create_model(arch="rope")``: timm's
rope-vit, axial rotary terms and no absolute positions, same stem, width, depth and 197
tokens; trained by ``train_fashion_mnist.py --arch rope``) is evaluated on the 10,000 test
images at each schedule with both ``rope`` rules -- ``mean`` (size-weighted mean of the
group's cos/sin rows) and ``representative`` (the first patch's rows) -- beside the
absolute-position reference model at the same token counts. Writes rope.json, rope.md and
rope.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

import tome_fx
from tome_fx import bench, evaluate, fashion_mnist
from tome_fx.passes.rotary_tables import RULES

SCHEDULES = [0, 4, 8, 12, 16, 20, 24, 28, 32, (16, -1), (24, -1)]


def rows(batch: int = 500) -> list[dict]:
    reference = fashion_mnist.create_model()
    rotary = fashion_mnist.create_model(fashion_mnist.ROPE_CHECKPOINT, arch="rope")
    images, labels = fashion_mnist.load_split("test")
    variants, tokens = {}, {}
    for schedule in SCHEDULES:
        label = bench.schedule_label(schedule)
        fast = tome_fx.transform(reference, schedule)
        variants[f"reference {label}"], tokens[label] = fast, fast.token_counts[-1]
        for rule in RULES:
            variants[f"{rule} {label}"] = tome_fx.transform(rotary, schedule, rope=rule)
    top1 = evaluate.top1(variants, evaluate.chunks(images, labels, batch), len(images))
    table = []
    for schedule in SCHEDULES:
        label = bench.schedule_label(schedule)
        row = {"schedule": label, "tokens_out": tokens[label], "reference": top1[f"reference {label}"]}
        row.update({rule: top1[f"{rule} {label}"] for rule in RULES})
        table.append(row)
    for row in table:
        row["reference_drop"] = table[0]["reference"] - row["reference"]
        row.update({f"{rule}_drop": table[0][rule] - row[rule] for rule in RULES})
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| r | tokens out | reference (absolute positions) | drop | RoPE, mean | drop | RoPE, representative | drop |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['schedule']} | {row['tokens_out']} | {row['reference']:.2%} | {row['reference_drop']:+.2%} | "
              + " | ".join(f"{row[rule]:.2%} | {row[f'{rule}_drop']:+.2%}" for rule in RULES) + " |" for row in table]
    return "\n".join(lines)


def plot(table: list[dict], path: pathlib.Path) -> None:
    with bench.figure(path) as ax:
        tokens = [row["tokens_out"] for row in table]
        for key, label in (("reference", "reference (absolute positions)"), ("mean", "RoPE, rope='mean'"),
                           ("representative", "RoPE, rope='representative'")):
            ax.plot(tokens, [100 * row[f"{key}_drop"] for row in table], "o", label=label)
        ax.set_xlabel("tokens after the last block (of 197)")
        ax.set_ylabel("top-1 drop from r=0 (points)")
        ax.set_title("Fashion-MNIST: accuracy drop by schedule, per rotary rule")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = rows()
    text = markdown(table)
    print(text)
    command = "python benchmarks/rope.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "rope.json").write_text(json.dumps({"command": command, "threads": torch.get_num_threads(),
                                               "rows": table}, indent=1))
    (out / "rope.md").write_text(text + "\n")
    plot(table, out / "rope.png")


if __name__ == "__main__":
    main()
