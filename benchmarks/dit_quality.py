"""Sample quality of a diffusion transformer with and without token merging, measured on the
Fashion-MNIST DiT trained here (``benchmarks/train_fashion_dit.py``; no SD3/FLUX weights
exist offline).

    python benchmarks/dit_quality.py [--per-class 30] [--steps 50] [--out benchmarks/results/dit_quality]

Every setting draws the same samples: the same class labels, the same starting noise, DDIM
with ``--steps`` steps and classifier-free guidance. For each setting it reports

- ``accuracy``: the Fashion-MNIST reference ViT's top-1 on the samples, against the class each
  was asked for (the conditional fidelity);
- ``fid_real``: the Frechet distance between the reference ViT's pre-logit features (64-d) of
  the samples and of the 10 000 test images;
- ``fid_base``: the same distance to the unmerged model's samples;
- ``pixel_mae``: the mean absolute difference, in [0, 1] pixels, to the unmerged model's sample
  from the same noise (how far merging moves each image);
- ``seconds``: wall time of the sampling (2 CPU threads; not a speed figure: this model is
  tiny and the run shares the machine).

``samples.png``: the first sample of each class for the unmerged model, per-block merging at
0.5 and whole-stream merging at r = 16 (rows), from the same noise.

Settings: per-block merging (``tome_fx.sd.apply``: attention only, and attention + MLP) at
ratios 0.3 / 0.5 / 0.7; at 0.5 with proportional attention, and reusing each matching for 2 and
5 steps (``reuse=k``); whole-stream merging (``tome_fx.transform``, un-merged before the
unpatchify) at r = 8 / 16 / 24 tokens per block. Results go to ``dit_quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

import tome_fx
import tome_fx.sd
from tome_fx.tools import fashion_mnist

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
import train_fashion_dit as trained  # noqa: E402

WEIGHTS = HERE / "results" / "fashion_dit"


def load_dit() -> torch.nn.Module:
    from safetensors.torch import load_file

    model = trained.create_model()
    model.load_state_dict(load_file(str(WEIGHTS / "dit.safetensors")))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def sample(model, labels: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float, batch: int) -> torch.Tensor:
    """DDIM samples (normalised pixels, [N, 1, 32, 32]) for ``labels`` from ``noise``; each
    step runs the prompted and the unprompted (null class) halves as one batch."""
    from diffusers import DDIMScheduler

    # the data are normalised pixels (about -0.8 to 2.0), so x0 predictions are not clipped to [-1, 1]
    scheduler = DDIMScheduler.from_config(trained.scheduler().config, clip_sample=False)
    scheduler.set_timesteps(steps)
    out = []
    for start in range(0, len(labels), batch):
        y, x = labels[start: start + batch], noise[start: start + batch].clone()
        both = torch.cat([y, torch.full_like(y, trained.CLASSES)])
        for t in scheduler.timesteps:
            eps = model(torch.cat([x, x]), timestep=t.expand(2 * len(y)), class_labels=both).sample
            cond, uncond = eps.chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def features_and_logits(classifier, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference ViT's pre-logit features and logits of 28 x 28 normalised images."""
    feats, logits = [], []
    for start in range(0, len(images), batch):
        x = classifier.forward_head(classifier.forward_features(images[start: start + batch]), pre_logits=True)
        feats.append(x.double())
        logits.append(classifier.head(x))
    return torch.cat(feats), torch.cat(logits)


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (FID's formula)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(cov_a cov_b) from the eigenvalues of sqrt(cov_a) cov_b sqrt(cov_a) (symmetric, PSD)
    vals, vecs = torch.linalg.eigh(cov_a)
    root = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root @ cov_b @ root).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Normalised pixels back to [0, 1]."""
    return (images * fashion_mnist.STD + fashion_mnist.MEAN).clamp(0, 1)


def cropped(images: torch.Tensor) -> torch.Tensor:
    """32 x 32 samples cut to the 28 x 28 the classifier reads, clamped to valid pixels."""
    return (to_unit(images[..., 2:30, 2:30]) - fashion_mnist.MEAN) / fashion_mnist.STD


def settings(model: torch.nn.Module, example: dict):
    yield "unmerged", model
    for ratio in (0.3, 0.5, 0.7):
        yield f"per-block attn {ratio}", tome_fx.sd.apply(model, ratio, use_rand=False)
        yield f"per-block attn+mlp {ratio}", tome_fx.sd.apply(model, ratio, use_rand=False, merge_mlp=True)
    yield "per-block attn 0.5 prop_attn", tome_fx.sd.apply(model, 0.5, use_rand=False, prop_attn=True)
    for k in (2, 5):
        yield f"per-block attn 0.5 reuse={k}", tome_fx.sd.apply(model, 0.5, use_rand=False, reuse=k)
    for r in (8, 16, 24):
        yield f"whole-stream r={r}", tome_fx.transform(model, r, example_inputs=example)


SHOWN = ("unmerged", "per-block attn 0.5", "whole-stream r=16")


def save_grid(out: pathlib.Path) -> None:
    """``samples.png``: the first sample of each class (columns) for each setting in ``SHOWN``
    (rows), from the ``.pt`` files the run keeps."""
    from PIL import Image

    rows = [torch.cat(list(torch.load(out / f"{name.replace(' ', '_')}.pt")[:, 0]), 1) for name in SHOWN]
    grid = (torch.cat(rows, 0) * 255).byte().numpy()
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(out / "samples.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=300, help="samples per sampling run (all, by default)")
    parser.add_argument("--only", default=None, help="run only settings whose name contains this")
    parser.add_argument("--out", default=str(HERE / "results" / "dit_quality"))
    parser.add_argument("--grid-only", action="store_true", help="only redraw samples.png from a run's .pt files")
    args = parser.parse_args(argv)
    if args.grid_only:
        return save_grid(pathlib.Path(args.out))
    torch.set_num_threads(2)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, classifier = load_dit(), fashion_mnist.create_model()
    test_images, _ = fashion_mnist.load_split("test")
    real_feats, _ = features_and_logits(classifier, test_images)
    labels = torch.arange(trained.CLASSES).repeat_interleave(args.per_class)
    noise = torch.randn(len(labels), 1, trained.SIDE, trained.SIDE, generator=torch.Generator().manual_seed(0))
    batch = min(args.batch, len(labels))
    example = dict(hidden_states=noise[:batch].repeat(2, 1, 1, 1), timestep=torch.full((2 * batch,), 999),
                   class_labels=labels[:batch].repeat(2))

    rows, base = [], None
    for name, denoiser in settings(model, example):
        if args.only and args.only not in name and name != "unmerged":
            continue
        began = time.perf_counter()
        images = sample(denoiser, labels, noise, args.steps, args.guidance, batch)
        seconds = time.perf_counter() - began
        feats, logits = features_and_logits(classifier, cropped(images))
        row = dict(setting=name, accuracy=float((logits.argmax(1) == labels).float().mean()),
                   fid_real=frechet(feats, real_feats), seconds=round(seconds, 1))
        if base is None:
            base = (images, feats)
        row.update(fid_base=frechet(feats, base[1]),
                   pixel_mae=float((to_unit(images) - to_unit(base[0])).abs().mean()))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if name in SHOWN:
            torch.save(to_unit(images[:: args.per_class]), out / f"{name.replace(' ', '_')}.pt")
    meta = dict(samples=len(labels), steps=args.steps, guidance=args.guidance, sampler="DDIM",
                model="benchmarks/results/fashion_dit (6 blocks, width 64, 256 tokens)")
    (out / "dit_quality.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"{meta['samples']} samples ({args.per_class} per class), DDIM {args.steps} steps, guidance "
             f"{args.guidance}; reference ViT on the 28 x 28 crop.", "",
             "| setting | accuracy | FID to test set | FID to unmerged | pixel MAE to unmerged | s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['accuracy']:.3f} | {r['fid_real']:.2f} | {r['fid_base']:.2f} | "
              f"{r['pixel_mae']:.4f} | {r['seconds']} |" for r in rows]
    (out / "dit_quality.md").write_text("\n".join(lines) + "\n")
    save_grid(out)


if __name__ == "__main__":
    main()
