"""Deployed ToMe: ONNX Runtime and AOTInductor beside PyTorch eager and torch.compile,
DeiT-S at batch 8 on CPU, the original against ToMe, all timed interleaved in one run.

    OMP_NUM_THREADS=2 python benchmarks/deploy.py --out benchmarks/results/deploy

Each model is exported once with a dynamic batch (``torch.onnx.export(..., dynamo=True)``,
``torch.export`` + ``aoti_compile_and_package``) at batch 2 and timed at batch 8; ONNX
Runtime gets the same thread count as torch. Every runtime's ToMe output is checked
against PyTorch eager before timing. Writes ``deploy.json`` and ``deploy.md`` (about 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile

import torch

import tome_fx  # before timm (the torchvision guard)
import timm  # noqa: I001
from tome_fx.tools import bench

MODEL, BATCH, SCHEDULES = "deit_small_patch16_224", 8, [13, 16]


class OnnxRuntime:
    """An exported model in an ONNX Runtime CPU session, called like the module."""

    def __init__(self, model, example, path, threads):
        import onnxruntime as ort

        batch = torch.export.Dim("batch", min=1, max=256)
        torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}},
                          verbose=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def __call__(self, images):
        return torch.from_numpy(self.session.run(None, {self.name: images.numpy()})[0])


def aot_inductor(model, example, path):
    """``torch.export`` with a dynamic batch, compiled ahead of time and loaded back."""
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    return torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/deploy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(MODEL).eval()
    example, images = torch.randn(2, 3, 224, 224), torch.randn(BATCH, 3, 224, 224)
    variants = {0: model, **{r: tome_fx.transform(model, r) for r in SCHEDULES}}
    runtimes = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for r, m in variants.items():
            runtimes[("PyTorch eager", r)] = m
            runtimes[("torch.compile", r)] = tome_fx.CompiledToMe(m) if r else torch.compile(m)
            runtimes[("ONNX Runtime", r)] = OnnxRuntime(m, example, pathlib.Path(tmp) / f"r{r}.onnx", args.threads)
            runtimes[("AOTInductor", r)] = aot_inductor(m, example, pathlib.Path(tmp) / f"r{r}.pt2")
        errors = {}
        for (runtime, r), run in runtimes.items():
            want = variants[r](images)
            errors[runtime, r] = (run(images) - want).abs().max().item()
            assert errors[runtime, r] < 1e-3 * want.abs().max().item(), (runtime, r, errors[runtime, r])
        times = bench.time_interleaved({f"{k[0]} r={k[1]}": v for k, v in runtimes.items()}, images,
                                       args.repeats, warmup=2)
    median = {key: statistics.median(times[f"{key[0]} r={key[1]}"]) for key in runtimes}
    rows = []
    for runtime, r in runtimes:
        fast = variants[r] if r else None
        rows.append({
            "runtime": runtime, "r": r, "median_s": median[runtime, r], "images_per_s": BATCH / median[runtime, r],
            "speedup_over_this_runtime_original": median[runtime, 0] / median[runtime, r],
            "speedup_over_eager_original": median["PyTorch eager", 0] / median[runtime, r],
            "bound": fast.predicted_flops(merging=False) / fast.predicted_flops() if fast else 1.0,
            "max_abs_diff_from_eager": errors[runtime, r],
        })
    lines = [f"{MODEL}, batch {BATCH}, fp32, {torch.get_num_threads()} threads, medians of {args.repeats} "
             "interleaved calls (`python benchmarks/deploy.py`)", "",
             "| runtime | r | img/s | speedup over the same runtime's original | over PyTorch eager original "
             "| FLOP bound | max abs diff from PyTorch eager |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {row['runtime']} | {row['r']} | {row['images_per_s']:.1f} | "
              f"{row['speedup_over_this_runtime_original']:.2f}x | {row['speedup_over_eager_original']:.2f}x | "
              f"{row['bound']:.2f}x | {row['max_abs_diff_from_eager']:.1e} |" for row in rows]
    table = "\n".join(lines)
    print(table)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy.md").write_text(table + "\n")
    (out / "deploy.json").write_text(json.dumps({
        "command": "python benchmarks/deploy.py", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": MODEL, "batch": BATCH, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
