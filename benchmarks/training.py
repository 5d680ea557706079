"""Training step time and activation memory with ToMe (issue 13; eager so far).

    python benchmarks/training.py [--out benchmarks/results] [--repeats 5]

For the Fashion-MNIST reference architecture (batch 64) and DeiT-S (batch 8, 224 px), both
at random init (speed does not depend on the weights): one training step (forward,
backward, SGD step) per schedule, timed interleaved in one run, beside the bytes autograd
saves for backward (``saved_tensors_hooks``: deterministic, unlike RSS) and the cost
model's FLOP bound (forward FLOPs without / with merging; backward's matmuls scale alike).
Writes training.json and training.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import torch

import tome_fx
from tome_fx import bench, fashion_mnist

SCHEDULES = [0, 8, 16, 24, (16, -1)]


def step_of(model, images, target):
    """One training step of ``model`` as a call on the images (for ``bench.time_interleaved``)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)

    def step(x):
        with torch.enable_grad():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()

    return step


def rows(name, model, images, repeats):
    model.train()
    target = torch.randint(0, 10 if name == "fashion-vit" else 1000, (images.shape[0],))
    variants = {bench.schedule_label(s): tome_fx.transform(model, s, example_inputs=images) for s in SCHEDULES}
    times = bench.time_interleaved({k: step_of(v, images, target) for k, v in variants.items()}, images, repeats)
    base = statistics.median(times["0"])
    out = []
    for label, fast in variants.items():
        median = statistics.median(times[label])
        out.append({"model": name, "batch": images.shape[0], "schedule": label, "tokens_out": fast.token_counts[-1],
                    "step_s": median, "speedup": base / median,
                    "bound": fast.predicted_flops(merging=False) / fast.predicted_flops(),
                    "saved_mb": bench.saved_for_backward(fast, images) / 2**20})
    return out


def markdown(table) -> str:
    lines = ["| model | batch | r | tokens out | step (s) | speedup | bound | saved for backward (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['schedule']} | {r['tokens_out']} | {r['step_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['bound']:.2f}x | {r['saved_mb']:.1f} |" for r in table]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import timm

    torch.manual_seed(0)
    table = rows("fashion-vit", fashion_mnist.create_model(None), torch.randn(64, 1, 28, 28), args.repeats)
    table += rows("deit_small_patch16_224", timm.create_model("deit_small_patch16_224", pretrained=False),
                  torch.randn(8, 3, 224, 224), args.repeats)
    text = markdown(table)
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "training.json").write_text(json.dumps({"command": command, "threads": torch.get_num_threads(),
                                                   "torch": torch.__version__, "rows": table}, indent=1))
    (out / "training.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
