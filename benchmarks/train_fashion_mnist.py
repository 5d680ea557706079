"""Train the Fashion-MNIST reference ViT (tome_fx.fashion_mnist) on CPU and save it.

    python benchmarks/train_fashion_mnist.py [--arch vit|rope|samvit|samvit_abs] [--epochs 10] [--tome R] [--out FILE]

``--arch rope`` trains the rotary twin (tome_fx/tools/assets/vit_rope_fashion_mnist.safetensors) with
the same recipe, for choosing how merged tokens rotate. ``--tome 16`` (or ``16,-1``) trains
through ``tome_fx.transform(model, schedule)`` with merging on, as the ToMe paper does; each
epoch then reports test accuracy with that schedule and with r=0 (the plain model).

AdamW with warm-up and cosine decay, label smoothing, random shifts and flips, fp32
(bf16 autocast measured no faster on this 2-core machine).
Test accuracy is printed after every epoch (its "seconds" are the training steps alone);
the checkpoint is written after every epoch too, so an interrupted run still leaves the
best weights so far.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F

import tome_fx  # (before timm: torchvision import shim)
from tome_fx.tools import fashion_mnist
from tome_fx.tools.cli import parse_schedule


def _augment(images: torch.Tensor) -> torch.Tensor:
    """Random shifts of up to 2 pixels and horizontal flips, per image."""
    batch = images.shape[0]
    padded = F.pad(images, (2, 2, 2, 2), value=float(-fashion_mnist.MEAN / fashion_mnist.STD))
    dx, dy = torch.randint(0, 5, (2, batch))
    rows = (torch.arange(28) + dy[:, None])[:, :, None].expand(batch, 28, 28)
    cols = (torch.arange(28) + dx[:, None])[:, None, :].expand(batch, 28, 28)
    out = padded[torch.arange(batch)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(batch) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum((model(images[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(images), batch))
    return correct / len(images)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke runs)")
    parser.add_argument("--arch", choices=("vit", "rope", "samvit", "samvit_abs"), default="vit")
    parser.add_argument("--out", help="default: the shipped checkpoint of --arch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="start from these weights (a further cosine cycle) instead of random init")
    parser.add_argument("--tome", type=parse_schedule, default=0, metavar="SCHEDULE",
                        help="train with merging on at this schedule (13, 13,-1, ...); default 0: off")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    train_x, train_y = fashion_mnist.load_split("train")
    test_x, test_y = fashion_mnist.load_split("test")
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
    model = fashion_mnist.create_model(checkpoint=args.init, arch=args.arch)
    # The ToMe model shares the plain model's parameters: the optimizer steps both.
    net = tome_fx.transform(model, args.tome, example_inputs=train_x[:2]) if args.tome else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = len(train_x) // args.batch
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch // 2
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, total) / total)))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, {torch.get_num_threads()} threads, "
          f"{steps_per_epoch} steps/epoch", flush=True)

    out = pathlib.Path(args.out or {"vit": fashion_mnist.CHECKPOINT, "rope": fashion_mnist.ROPE_CHECKPOINT,
                                       "samvit": fashion_mnist.SAMVIT_CHECKPOINT,
                                       "samvit_abs": fashion_mnist.SAMVIT_ABS_CHECKPOINT}[args.arch])
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.time()
    best, history = (evaluate(net, test_x, test_y) if args.init else 0.0), []
    for epoch in range(args.epochs):
        net.train()
        start, order, seen_loss = time.time(), torch.randperm(len(train_x)), 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch:(step + 1) * args.batch]
            loss = F.cross_entropy(net(_augment(train_x[idx])), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            seen_loss += loss.item()
        seconds = time.time() - start
        accuracy = evaluate(net, test_x, test_y)
        history.append({"epoch": epoch + 1, "loss": seen_loss / steps_per_epoch, "test_accuracy": accuracy,
                        "seconds": seconds})
        if args.tome:
            history[-1]["test_accuracy_r0"] = evaluate(model, test_x, test_y)
        print(json.dumps(history[-1]), flush=True)
        if accuracy >= best:
            best = accuracy
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out),
                      metadata={"test_accuracy": f"{accuracy:.4f}", "epoch": str(epoch + 1)})
    print(f"best test accuracy {best:.4f}; weights in {out}; "
          f"{sum(h['seconds'] for h in history) / 60:.1f} min training, {(time.time() - began) / 60:.1f} min in all")


if __name__ == "__main__":
    main()
