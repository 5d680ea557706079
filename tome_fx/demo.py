"""Demo: DeiT-S with Token Merging -- token counts, FLOPs, measured speed, output agreement.

    python -m tome_fx.demo [--model deit_small_patch16_224] [--r 13] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import tome_fx


def _load(name: str, pretrained: bool, checkpoint: str | None) -> tuple[torch.nn.Module, str]:
    import timm

    if checkpoint:  # timm's own loading path, from a local file
        overlay = {"file": checkpoint}
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval(), checkpoint
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True).eval(), "pretrained weights"
        except Exception as error:  # hub unreachable, no cached weights, ...
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
            print(f"pretrained weights are not reachable ({reason});")
            print("  using RANDOM INIT: token counts, FLOPs and speed hold; agreement figures mean little.")
            print("  (pass --checkpoint FILE to load weights from a local .safetensors/.pth file)")
    return timm.create_model(name, pretrained=False).eval(), "random init"


def _flops(model, images) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return counter.get_total_flops()


def _time(models: dict, images, repeats: int) -> dict[str, list[float]]:
    """Interleaved timing after one warm-up call each, so load changes hit both alike."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(images)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--r", type=int, default=13, help="tokens merged per block")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model")
    parser.add_argument("--checkpoint", help="local weights file (.safetensors or .pth) for --model")
    parser.add_argument("--no-pretrained", action="store_true", help="skip the attempt to download weights")
    args = parser.parse_args(argv)

    model, weights = _load(args.model, not args.no_pretrained, args.checkpoint)
    fast = tome_fx.transform(model, args.r)
    print(f"{args.model} ({weights}), r={args.r}, {torch.get_num_threads()} threads, batch {args.batch}, fp32")
    print(f"protected tokens: {fast.plan.protected}")
    print("tokens per block:", " ".join(str(n) for n in fast.token_counts))

    one = torch.randn(1, *fast.input_shapes[0])
    flops_base, flops_fast = _flops(model, one), _flops(fast, one)
    print(f"FLOPs/image: {flops_base / 1e9:.2f} G -> {flops_fast / 1e9:.2f} G "
          f"({flops_base / flops_fast:.2f}x fewer; the speedup bound)")

    images = torch.randn(args.batch, *one.shape[1:])
    times = _time({"original": model, "tome": fast}, images, args.repeats)
    base, tome = statistics.median(times["original"]), statistics.median(times["tome"])
    print(f"time/batch (median of {args.repeats}): original {base:.3f} s, tome {tome:.3f} s -> "
          f"{base / tome:.2f}x measured vs {flops_base / flops_fast:.2f}x bound "
          f"({(base / tome) / (flops_base / flops_fast):.0%} of it)")

    with torch.no_grad():
        a, b = model(images), fast(images)
    cosine = torch.nn.functional.cosine_similarity(a, b).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"output agreement on random images: cosine {cosine:.4f}, top-1 agreement {top1:.0%}")


if __name__ == "__main__":
    main()
