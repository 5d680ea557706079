"""Train a small class-conditional DiT on Fashion-MNIST on CPU: the yardstick for how token
merging changes what a diffusion transformer generates (no SD3/FLUX weights exist here).

    python benchmarks/train_fashion_dit.py [--minutes 60] [--out benchmarks/results/fashion_dit]

diffusers' ``DiTTransformer2DModel`` (adaLN-zero, 6 blocks, width 64, 4 heads) in pixel space:
images padded to 32 x 32, 2 x 2 patches, so 256 tokens (a 16 x 16 grid whose 2 x 2 cells
per-block merging uses). DDPM epsilon prediction, cosine noise schedule, 1000 steps; the
label embedding drops the class 10% of the time in training (diffusers' own dropout; the null
class is 10) for classifier-free guidance. AdamW, a short warmup, then a cosine decay over the
time budget; an EMA of the weights (decay warming up to 0.999, so the random init does not
linger in it) is what is saved (``dit.safetensors``, after every epoch), with ``log.jsonl``
(loss per epoch, seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F

import tome_fx  # noqa: F401  (before diffusers: torchvision import shim)
from tome_fx.tools import fashion_mnist

CLASSES, SIDE = 10, 32
CONFIG = dict(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=6,
              sample_size=SIDE, patch_size=2, num_embeds_ada_norm=CLASSES, norm_type="ada_norm_zero")


def create_model():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**CONFIG)


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def padded(images: torch.Tensor) -> torch.Tensor:
    """Normalised 28 x 28 images padded to 32 x 32 with the background value."""
    return F.pad(images, (2, 2, 2, 2), value=float(-fashion_mnist.MEAN / fashion_mnist.STD))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="training time budget")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=200, help="steps of linear learning-rate warmup")
    parser.add_argument("--out", default="benchmarks/results/fashion_dit")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = fashion_mnist.load_split("train")
    images = padded(images)
    model, noise = create_model().train(), scheduler()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    budget, start, epoch, updates = args.minutes * 60, time.perf_counter(), 0, 0
    (out / "config.json").write_text(json.dumps(CONFIG, indent=1))
    with open(out / "log.jsonl", "w") as log:
        while time.perf_counter() - start < budget:
            order, losses, began = torch.randperm(len(images)), [], time.perf_counter()
            for step in range(0, len(images) - args.batch + 1, args.batch):
                elapsed = time.perf_counter() - start
                if elapsed >= budget:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * min(1.0, (updates + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
                index = order[step: step + args.batch]
                x0, y = images[index], labels[index]
                eps = torch.randn_like(x0)
                t = torch.randint(0, noise.config.num_train_timesteps, (len(x0),))
                predicted = model(noise.add_noise(x0, eps, t), timestep=t, class_labels=y).sample
                loss = F.mse_loss(predicted, eps)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                updates += 1
                decay = min(0.999, (1 + updates) / (10 + updates))
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), model.parameters()):
                        e.lerp_(p, 1 - decay)
                losses.append(loss.item())
            epoch += 1
            record = dict(epoch=epoch, loss=sum(losses) / max(len(losses), 1), steps=len(losses),
                          seconds=round(time.perf_counter() - began, 1))
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out / "dit.safetensors"))


if __name__ == "__main__":
    main()
