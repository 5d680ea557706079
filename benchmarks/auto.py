"""r="auto" measured: the r it picks for each target, by the cost model and by timing, and a check.

    python benchmarks/auto.py [--out benchmarks/results] [--threads 2]

For each model and batch (the Fashion-MNIST reference at batch 1 and 64, DeiT-T at batch 1,
DeiT-S at batch 8; random init for the DeiTs: speed does not depend on weights) and each
speedup target, ``tome_fx.transform(model, "auto", speedup=target)`` picks r by the FLOP bound
and, with ``measure=True``, by timing candidates on the example batch. Each model chosen is
then timed again beside the original (20 interleaved calls, eager, fp32), which is the
"check" column: whether the target holds on a fresh measurement. Writes auto.json and auto.md.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import warnings

import torch

import tome_fx
from tome_fx.tools import bench, zoo

TARGETS = [1.2, 1.5, 2.0]
CONFIGS = [("fashion-vit", 1), ("fashion-vit", 64), ("deit_tiny_patch16_224", 1), ("deit_small_patch16_224", 8)]


def rows(repeats: int = 20) -> list[dict]:
    table = []
    for name, batch in CONFIGS:
        torch.manual_seed(0)
        loaded = zoo.load(name)
        model, x = loaded.model.eval(), torch.randn(batch, *loaded.input_size)
        for target in TARGETS:
            for measure in (False, True):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fast = tome_fx.transform(model, "auto", example_inputs=x, speedup=target, measure=measure)
                choice = fast.auto_choice
                times = bench.time_interleaved({"original": model, "auto": fast}, x, repeats, warmup=1)
                check = statistics.median(times["original"]) / statistics.median(times["auto"])
                table.append({"model": name, "batch": batch, "target": target, "measure": measure, "r": choice.r,
                              "bound": choice.bounds[choice.r], "measured": choice.measured.get(choice.r),
                              "check": check, "met": choice.met, "why": choice.why,
                              "warning": "; ".join(str(w.message) for w in caught)})
                print(table[-1], flush=True)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| model | batch | target | measure | r | FLOP bound | speedup measured by auto | check (20 calls) | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        measured = "" if row["measured"] is None else f"{row['measured']:.2f}x"
        lines.append(f"| {row['model']} | {row['batch']} | {row['target']}x | {row['measure']} | {row['r']} | "
                     f"{row['bound']:.2f}x | {measured} | {row['check']:.2f}x | "
                     f"{'yes' if row['met'] else 'no: ' + row['why']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = rows()
    text = markdown(table)
    print(text)
    bench.write_report(args.out, "auto", argv, {"rows": table}, text)


if __name__ == "__main__":
    main()
