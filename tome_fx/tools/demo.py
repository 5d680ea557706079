"""Demo: DeiT-S with Token Merging -- token counts, FLOPs, measured speed, output agreement.

    python -m tome_fx.demo [--model deit_small_patch16_224] [--r 13] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import tome_fx

from . import zoo
from .bench import time_interleaved


def _load(name: str, pretrained: bool, checkpoint: str | None) -> tuple[torch.nn.Module, str]:
    """The model from ``zoo``; unreachable pretrained weights fall back to random init, said loudly."""
    try:
        loaded = zoo.load(name, pretrained=pretrained, checkpoint=checkpoint)
    except zoo.WeightsUnavailable as error:
        print(error)
        print("  using RANDOM INIT: token counts, FLOPs and speed hold; agreement figures mean little.")
        loaded = zoo.load(name)
    return loaded.model, loaded.weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name (or tv:NAME, fashion-vit)")
    parser.add_argument("--r", type=int, default=13, help="tokens merged per block")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model")
    parser.add_argument("--checkpoint", help="local weights file (.safetensors or .pth) for --model")
    parser.add_argument("--no-pretrained", action="store_true", help="skip the attempt to download weights")


def run(args: argparse.Namespace) -> None:
    model, weights = _load(args.model, not args.no_pretrained, args.checkpoint)
    fast = tome_fx.transform(model, args.r)
    print(f"{args.model} ({weights}), r={args.r}, {torch.get_num_threads()} threads, batch {args.batch}, fp32")
    print(f"protected tokens: {fast.plan.protected}")
    print("tokens per block:", " ".join(str(n) for n in fast.token_counts))

    flops_base, flops_fast = fast.predicted_flops(merging=False), fast.predicted_flops()
    bound = flops_base / flops_fast
    print(f"FLOPs/image in the attention blocks (cost model): {flops_base / 1e9:.2f} G -> {flops_fast / 1e9:.2f} G "
          f"({bound:.2f}x fewer; the speedup bound)")

    images = torch.randn(args.batch, *fast.input_shapes[0])
    times = time_interleaved({"original": model, "tome": fast}, images, args.repeats)
    base, tome = statistics.median(times["original"]), statistics.median(times["tome"])
    print(f"time/batch (median of {args.repeats}): original {base:.3f} s, tome {tome:.3f} s -> "
          f"{base / tome:.2f}x measured vs {bound:.2f}x bound ({(base / tome) / bound:.0%} of it)")

    with torch.no_grad():
        a, b = model(images), fast(images)
    cosine = torch.nn.functional.cosine_similarity(a, b).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"output agreement on random images: cosine {cosine:.4f}, top-1 agreement {top1:.0%}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
