"""Latency and narrow-model report: tome_fx against the official ToMe patch's algorithm
(``paper_tome.py``), eager and compiled, with the merge's share of time, and the deploy
targets checked on the result.

    OMP_NUM_THREADS=2 python benchmarks/latency.py --out benchmarks/results/latency --tag after

Each (model, batch, mode) is one interleaved run (``tome_fx.tools.bench.run``): the original,
tome_fx, its merge-free stand-in and the peer, in shuffled rounds, so every ratio in a row was
measured under the same load. Writes ``TAG.json`` and ``TAG.md`` (about 15 minutes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

import tome_fx  # before timm (the torchvision guard)
from tome_fx.tools import bench, zoo

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from paper_tome import paper_patch  # noqa: E402

R = 13
# (model, batch, mode, repeats): eager at batch 1, 8 and 32, compiled where the targets ask;
# "compiled+cpp" is torch.compile with inductor's C++ wrapper (options={"cpp_wrapper": True})
CONFIGS = [
    ("deit_tiny_patch16_224", 1, "eager", 60),
    ("deit_tiny_patch16_224", 8, "eager", 20),
    ("deit_tiny_patch16_224", 32, "eager", 8),
    ("deit_small_patch16_224", 1, "eager", 40),
    ("deit_small_patch16_224", 8, "eager", 12),
    ("deit_tiny_patch16_224", 1, "compiled", 60),
    ("deit_small_patch16_224", 1, "compiled", 40),
    ("deit_small_patch16_224", 8, "compiled", 12),
    ("deit_tiny_patch16_224", 1, "compiled+cpp", 60),
    ("deit_small_patch16_224", 1, "compiled+cpp", 40),
]
# the official patch as it is, and with the original's fused attention kept (to tell the two costs apart)
PEERS = {"paper": paper_patch, "paper+sdpa": lambda model, r: paper_patch(model, r, sdpa=True)}
COMPILE_KWARGS = {"compiled": None, "compiled+cpp": {"options": {"cpp_wrapper": True}}}
FASHION = ("fashion-vit", 64, "compiled", 20, [4, 8, 16, 24])


def targets(rows: list[bench.Row]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each of the deploy issue's latency targets."""
    def find(model, batch, mode, schedule=str(R), impl="tome_fx"):
        return next(r for r in rows if (r.model, r.batch, r.mode, r.schedule, r.impl) == (model, batch, mode,
                                                                                          schedule, impl))

    out = []
    for model, batch, mode, _ in CONFIGS:
        fx, peer = find(model, batch, mode), find(model, batch, mode, impl="paper")
        if mode == "eager" or (model, batch) == ("deit_small_patch16_224", 8):
            out.append((f"{model} b{batch} {mode}: tome_fx at least as fast as the paper patch",
                        f"{fx.speedup:.2f}x vs {peer.speedup:.2f}x", fx.median_s <= peer.median_s))
    for model, batch, mode, share in [("deit_tiny_patch16_224", 1, "eager", 0.85),
                                      ("deit_small_patch16_224", 1, "compiled", 0.90),
                                      ("deit_small_patch16_224", 1, "compiled+cpp", 0.90)]:
        fx = find(model, batch, mode)
        out.append((f"{model} b{batch} {mode}: >= {share:.0%} of the bound",
                    f"{fx.speedup:.2f}x of {fx.bound:.2f}x = {fx.reached:.0%}", fx.reached >= share))
    name, batch, mode, _, schedules = FASHION
    for r in schedules:
        fx = find(name, batch, mode, str(r))
        out.append((f"{name} b{batch} {mode} r={r}: not slower, merge share <= 5%",
                    f"{fx.speedup:.2f}x, share {fx.merge_share:.1%}", fx.speedup >= 1 and fx.merge_share <= 0.05))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/latency")
    parser.add_argument("--tag", default="after", help="file name: before/after a change")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, batch, mode, repeats in CONFIGS:
        torch._dynamo.reset()  # each config compiles the same classes anew: dynamo's recompile limit would send
        loaded = zoo.load(name, checkpoint=None)  # the later ones (the original, the patch) back to eager
        new = bench.run(name, loaded.model, loaded.input_size, [0, R], batch=batch, mode=mode.split("+")[0],
                        repeats=repeats, merge_share=True, peers=PEERS,
                        compile_kwargs=COMPILE_KWARGS.get(mode))
        for row in new:
            row.mode = mode
        rows += new
        print(bench.markdown(new).split("\n", 2)[2], flush=True)
    name, batch, mode, repeats, schedules = FASHION
    loaded = zoo.load(name, checkpoint=None)
    rows += bench.run(name, loaded.model, loaded.input_size, [0, *schedules], batch=batch, mode=mode,
                      repeats=repeats, merge_share=True)
    checks = targets(rows)
    table = bench.markdown(rows) + "\n\n| target | measured | met |\n|---|---|---|\n" + "\n".join(
        f"| {target} | {measured} | {'yes' if met else 'no'} |" for target, measured, met in checks)
    print(table)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.md").write_text(
        f"{torch.get_num_threads()} threads, fp32, r={R}; medians of interleaved calls (python "
        f"benchmarks/latency.py --tag {args.tag}); tome_fx {tome_fx.__version__}\n\n{table}\n")
    (out / f"{args.tag}.json").write_text(json.dumps({
        "command": f"python benchmarks/latency.py --tag {args.tag}", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "rows": [row.as_dict() for row in rows],
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in checks]}, indent=1))


if __name__ == "__main__":
    main()
