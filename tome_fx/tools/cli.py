"""tome-fx: Token Merging for any ViT-like model, from the command line.

  demo       one model at one r: token counts, FLOP bound, measured speed, agreement
  bench      throughput sweep over models, r/schedules, batch sizes, eager/compiled
             (JSON + Markdown table + speedup plot)
  eval       top-1 of the original and ToMe versions side by side on an image folder
  visualize  paint which patches merged into which token
  bench-grid per-branch merging timed: an SD-1.5 UNet step (vs tomesd), SD3 joint blocks or SAM's encoder

Models: fashion-vit (the Fashion-MNIST reference model shipped with tome_fx), timm names
(deit_small_patch16_224), tv:NAME (torchvision, tv:vit_b_16), hf:ID_OR_DIR (HF image
classifiers). Weights: --pretrained downloads through the library; --checkpoint loads a
local file (or an HF folder) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from functools import partial

import torch

import tome_fx

from . import bench, demo, zoo


def parse_schedule(text: str):
    """``13`` -> 13; ``13,-1`` -> (13, -1.0) (r, inflection); ``4/4/0`` -> [4, 4, 0] per block;
    ``0.3`` -> 0.3 (that fraction of each block's tokens)."""
    try:
        if "/" in text:
            return [int(v) for v in text.split("/")]
        if "," in text:
            r, inflection = text.split(",")
            return (int(r), float(inflection))
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a schedule: {text!r} (use 13, 13,-1, 4/4/0 or 0.3)") from None


def _add_model_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--model", default=default, help=f"model name (default {default}); see `tome-fx --help`")
    parser.add_argument("--pretrained", action="store_true", help="load pretrained weights (downloads)")
    parser.add_argument("--checkpoint", help="local weights: a timm/torchvision file, or an HF model folder")


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:1, ...)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="weights and inputs (float16: GPU)")


def _set_device(args) -> str:
    """Checks --device and sets --threads; returns where the run happens, for its report."""
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"tome-fx: --device {args.device} asked for, but this torch sees no CUDA GPU")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    where = f"CPU, {torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    return f"{where}, {args.dtype}"


def _compile_kwargs(args) -> dict:
    kwargs = {"mode": args.compile_mode} if args.compile_mode else {}
    return kwargs | ({"options": {"cpp_wrapper": True}} if args.cpp_wrapper else {})


def _load(args) -> zoo.LoadedModel:
    try:
        return zoo.load(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
    except (zoo.WeightsUnavailable, FileNotFoundError) as error:
        raise SystemExit(f"tome-fx: {error}") from None


def _with_form(form: str, model: torch.nn.Module, schedule) -> torch.nn.Module:
    return tome_fx.transform(model, schedule, prop_attn=form)


def _bench(args) -> None:
    from tqdm import tqdm

    where = _set_device(args)
    rows = []
    configs = [(m, b, mode) for m in args.models for b in args.batch for mode in args.modes]
    for name, batch, mode in tqdm(configs, desc="bench", unit="config"):
        loaded = zoo.load(name, checkpoint=None)
        forms = {f"prop_attn={form}": partial(_with_form, form) for form in args.prop_attn}
        rows += bench.run(name, loaded.model, loaded.input_size, [0, *args.r], batch=batch, mode=mode,
                          repeats=args.repeats, merge_share=args.merge_share, peers=forms, device=args.device,
                          dtype=getattr(torch, args.dtype), compile_kwargs=_compile_kwargs(args))
    table = bench.markdown(rows)
    print(f"{where}, medians of {args.repeats} interleaved calls after warm-up")
    print(table)
    print("attention kernels:\n" + "\n".join(sorted({
        f"  {r.model} {r.mode} r={r.schedule}{'' if r.impl == 'tome_fx' else f' ({r.impl})'}: {r.sdpa or 'none'}"
        for r in rows})))
    if args.merge_share:
        print("merge share: 1 - time(stand-in whose merges just drop r tokens) / time(ToMe model)")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "command": "tome-fx " + " ".join(args.argv),
            "threads": torch.get_num_threads(),
            "where": where,
            "torch": torch.__version__,
            "rows": [row.as_dict() for row in rows],
        }
        (out / "bench.json").write_text(json.dumps(report, indent=1))
        (out / "bench.md").write_text(table + "\n")
        bench.plot_speedup(rows, out / "speedup.png")
        print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'speedup.png'}")


def _bench_grid(args) -> None:
    from . import grid_bench

    where = _set_device(args)
    defaults = {"sd": [0.3, 0.5, 0.6], "sam": [0.5, 0.75], "sam2": [0.5, 0.75]}
    rows, ratios = [], args.ratios or defaults.get(args.model, [0.3, 0.5, 0.7])
    for mode in args.modes:
        run = ({"sd": grid_bench.run_sd, "sam": grid_bench.run_sam, "sam2": grid_bench.run_sam2}.get(args.model)
               or partial(grid_bench.run_denoiser, args.model))
        rows += run(ratios, mode, args.repeats, device=args.device, dtype=getattr(torch, args.dtype))
        grid_bench.write(rows, args.out, args.model)  # after each mode: a long run keeps what it has
    print(f"{where}, medians of {args.repeats} interleaved calls after warm-up")
    print((pathlib.Path(args.out) / f"{args.model}.md").read_text())


def _eval(args) -> None:
    from .evaluate import batches, top1

    loaded = _load(args)
    models = {"original": loaded.model}
    models.update({f"r={bench.schedule_label(s)}": tome_fx.transform(loaded.model, s) for s in args.r})
    data, total = batches(args.data, loaded, args.batch, args.limit, args.workers)
    print(f"{args.model} ({loaded.weights}) on {total} images of {args.data}")
    seconds = {}
    accuracy = top1(models, data, total, progress=not args.quiet, seconds=seconds)
    base = accuracy["original"]
    for name, value in accuracy.items():
        print(f"{name:>12}: top-1 {value:.2%}" + ("" if name == "original" else f"  ({value - base:+.2%})")
              + f"   model alone {total / seconds[name]:.1f} img/s")
    print(f"{'end-to-end':>12}: {total / seconds['total']:.1f} img/s through all {len(models)} models, "
          f"{seconds['loader']:.1f} s of {seconds['total']:.1f} s waiting on the loader ({args.workers} workers)")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({
            "model": args.model, "weights": loaded.weights, "images": total, "top1": accuracy,
            "model_images_per_s": {name: total / seconds[name] for name in models},
            "end_to_end_images_per_s": total / seconds["total"], "loader_wait_s": seconds["loader"],
            "workers": args.workers}, indent=1))


def _visualize(args) -> None:
    from PIL import Image

    from .visualize import render

    loaded = _load(args)
    fast = tome_fx.transform(loaded.model, args.r)
    try:
        picture = Image.open(args.image)
    except OSError as error:
        raise SystemExit(f"tome-fx: cannot read image {args.image}: {error}") from None
    image = loaded.preprocess(picture)
    mean, std = torch.tensor(loaded.mean)[:, None, None], torch.tensor(loaded.std)[:, None, None]
    scale = max(1, 224 // max(loaded.input_size[1:]))
    render(fast, image, image * std + mean, scale).save(args.output)
    print(f"{args.model}, r={args.r}: {fast.token_counts[0]} -> {fast.token_counts[-1]} tokens; wrote {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome-fx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo.add_arguments(commands.add_parser("demo", help="one model at one r, measured", description=demo.__doc__))

    p = commands.add_parser("bench", help="throughput sweep (JSON, Markdown, plot)", description=bench.__doc__)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"], help="model names (random init)")
    p.add_argument("--r", nargs="+", type=parse_schedule, default=[4, 8, 13, 16],
                   help="schedules to time besides the original: 13, 13,-1 (decreasing), 4/4/0 (per block)")
    p.add_argument("--batch", nargs="+", type=int, default=[8])
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager"])
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant (after warm-up)")
    _add_device_arguments(p)
    how = p.add_mutually_exclusive_group()  # torch.compile takes a mode or options, not both
    how.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
                     help="torch.compile mode for --modes compiled (reduce-overhead: CUDA graphs, for batch 1)")
    how.add_argument("--cpp-wrapper", action="store_true",
                     help="compile with inductor's C++ wrapper: less Python per call, for CPU at small batch")
    p.add_argument("--merge-share", action="store_true",
                   help="also time a stand-in of each variant whose merges just drop tokens: the merge's share")
    p.add_argument("--prop-attn", nargs="+", choices=["bias", "flash"], default=[],
                   help="also time each schedule with proportional attention in this form (a float mask, or "
                   "folded into a key column so FlashAttention can run); the default form is 'auto'")
    p.add_argument("--out", help="folder for bench.json, bench.md and speedup.png")

    p = commands.add_parser("bench-grid", help="merging timed at full size: SD UNet, SD3/FLUX/Wan blocks, SAM encoders",
                            description="Merging timed at full size: an SD-1.5-shaped UNet at 512 px, batch 2, "
                            "against tomesd; diffusion transformer blocks at their real widths (two SD3-medium "
                            "joint blocks at 1024 px, batch 2; one FLUX.1 double and one single block at 1024 px; "
                            "two Wan 2.1 1.3B blocks on a 17 x 256 x 256 clip) per block, reusing matchings and "
                            "whole-stream; or SAM's ViT-B or SAM 2.1's Hiera-B+ image encoder at 1024 px, MLP "
                            "branches merging alone and with attention.")
    p.add_argument("model", choices=["sd", "sd3", "flux", "wan", "sam", "sam2"])
    p.add_argument("--ratios", nargs="+", type=float, default=None,
                   help="ratios to time (default: sd 0.3 0.5 0.6, sam and sam2 0.5 0.75, transformers 0.3 0.5 0.7)")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager"])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant (after warm-up)")
    _add_device_arguments(p)
    p.add_argument("--out", default="benchmarks/results/grid", help="folder for MODEL.json and MODEL.md")

    p = commands.add_parser("eval", help="top-1, original vs ToMe, on an image folder",
                            description="Top-1 accuracy of the original and ToMe versions on the same images.")
    _add_model_arguments(p, "fashion-vit")
    p.add_argument("--data", required=True,
                   help="ImageFolder layout (one sub-folder per class), or the folder of the Fashion-MNIST idx files")
    p.add_argument("--r", nargs="+", type=parse_schedule, default=[4, 8, 13, 16], help="schedules to evaluate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images only")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes decoding images (default: up to 8)")
    p.add_argument("--out", help="write the accuracies as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = commands.add_parser("visualize", help="paint merged patch groups",
                            description="Paint each final token's patches in their mean colour, with outlines.")
    p.add_argument("image", help="an image file")
    _add_model_arguments(p, "fashion-vit")
    p.add_argument("--r", type=parse_schedule, default=16, help="tokens merged per block (or a schedule)")
    p.add_argument("-o", "--output", default="tome_groups.png", help="PNG to write")
    return parser


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    {"demo": demo.run, "bench": _bench, "bench-grid": _bench_grid, "eval": _eval,
     "visualize": _visualize}[args.command](args)


if __name__ == "__main__":
    main()
