"""Training step time and activation memory with ToMe, eager and compiled (issue 13).

    python benchmarks/training.py [--out benchmarks/results] [--repeats 5]

For the Fashion-MNIST reference architecture (batch 64) and DeiT-S (batch 8, 224 px), both
at random init (speed does not depend on the weights): one training step (forward,
backward, SGD step) of the original (r=0) and of a ToMe model per schedule, eager and
compiled (``torch.compile`` of the original, ``tome_fx.CompiledToMe`` of the ToMe models:
forward and backward compiled, the optimizer step eager), plus gradient checkpointing
(timm's own for r=0, ``set_grad_checkpointing`` for ToMe) in eager. All timed interleaved
in one run, beside the bytes autograd saves for backward (``saved_tensors_hooks``:
deterministic), the peak resident memory the first step adds in a fresh process (eager
and checkpointed; sampled, so approximate) and the cost model's FLOP bound (forward FLOPs
without / with merging; backward's matmuls scale alike, so forward + backward has the
same ratio). Writes training.json and training.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import subprocess
import sys

import torch

import tome_fx
from tome_fx.tools import bench, fashion_mnist

SCHEDULES = [0, 8, 16, 24, (16, -1)]
CHECKPOINTED = [0, (16, -1)]


def step_of(model, images, target):
    """One training step of ``model`` as a call on the images (for ``bench.time_interleaved``)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)

    def step(x):
        with torch.enable_grad():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()

    return step


def _checkpointed(model, schedule, images):
    if schedule == 0:
        copied = copy.deepcopy(model)
        copied.set_grad_checkpointing(True)
        return copied
    fast = tome_fx.transform(model, schedule, example_inputs=images)
    fast.set_grad_checkpointing(True)
    return fast


def rows(name, model, images, repeats):
    model.train()
    target = torch.randint(0, 10 if name == "fashion-vit" else 1000, (images.shape[0],))
    fast = {bench.schedule_label(s): tome_fx.transform(model, s, example_inputs=images) for s in SCHEDULES if s}
    eager = {"0": model, **fast}
    variants = {
        **{("eager", label): m for label, m in eager.items()},
        **{("compiled", label): tome_fx.CompiledToMe(m) if label != "0" else torch.compile(model)
           for label, m in eager.items()},
        **{("checkpointed", bench.schedule_label(s)): _checkpointed(model, s, images) for s in CHECKPOINTED},
    }
    steps = {key: step_of(m, images, target) for key, m in variants.items()}
    times = bench.time_interleaved(steps, images, repeats)  # warm-up compiles
    medians = {key: statistics.median(t) for key, t in times.items()}
    out = []
    for (mode, label), m in variants.items():
        plan = fast.get(label, fast["8"]).plan  # r=0: the original: any ToMe plan, merging left out
        merging = label != "0"
        base = medians["compiled" if mode == "compiled" else "eager", "0"]
        out.append({
            "model": name, "batch": images.shape[0], "mode": mode, "schedule": label,
            "tokens_out": plan.token_counts[-1] if merging else plan.token_counts[0],
            "step_s": medians[mode, label], "speedup": base / medians[mode, label],
            "bound": plan.predicted_flops(merging=False) / plan.predicted_flops(merging=merging),
            "saved_mb": bench.saved_for_backward(m, images) / 2**20,
            "peak_rss_mb": None if mode == "compiled" else _fresh_peak_rss(name, mode, label, images.shape[0]),
        })
    return out


def _model(name: str):
    import timm

    if name == "fashion-vit":
        return fashion_mnist.create_model(None), (1, 28, 28), 10
    if name.startswith("deit_tiny"):  # --quick
        return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, depth=4), (3, 64, 64), 1000
    return timm.create_model(name, pretrained=False), (3, 224, 224), 1000


def _fresh_peak_rss(name: str, mode: str, label: str, batch: int) -> float:
    """MiB of resident memory the first training step adds, in a fresh process: in this one
    the allocator already holds memory from every earlier step."""
    run = subprocess.run([sys.executable, __file__, "--rss", name, mode, label, str(batch)],
                         capture_output=True, text=True, check=True)
    return float(run.stdout.split()[-1])


def _print_peak_rss(name: str, mode: str, label: str, batch: int) -> None:
    torch.manual_seed(0)
    model, shape, classes = _model(name)
    images = torch.randn(batch, *shape)
    schedule = {bench.schedule_label(s): s for s in SCHEDULES}[label]
    if mode == "checkpointed":
        variant = _checkpointed(model.train(), schedule, images)
    else:
        variant = tome_fx.transform(model.train(), schedule, example_inputs=images) if schedule else model.train()
    step = step_of(variant, images, torch.randint(0, classes, (batch,)))
    print(bench.peak_rss(step, images) / 2**20)


def markdown(table) -> str:
    lines = ["| model | batch | r | tokens out | mode | step (s) | speedup | bound | saved for backward (MiB) | "
             "peak RSS added (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = {"eager": 0, "compiled": 1, "checkpointed": 2}
    for r in sorted(table, key=lambda r: (r["model"] != "fashion-vit", order[r["mode"]])):
        rss = "—" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['schedule']} | {r['tokens_out']} | {r['mode']} | "
                     f"{r['step_s']:.3f} | {r['speedup']:.2f}x | {r['bound']:.2f}x | {r['saved_mb']:.1f} | {rss} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a small DeiT (smoke run)")
    parser.add_argument("--rss", nargs=4, metavar=("MODEL", "MODE", "R", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss:
        return _print_peak_rss(*args.rss[:3], int(args.rss[3]))
    table = []
    for name, batch in (("fashion-vit", 8 if args.quick else 64),
                        ("deit_tiny_quick" if args.quick else "deit_small_patch16_224", 4 if args.quick else 8)):
        torch.manual_seed(0)
        model, shape, _ = _model(name)
        table += rows(name, model, torch.randn(batch, *shape), args.repeats)
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
