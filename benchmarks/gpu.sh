#!/usr/bin/env bash
# The GPU benchmark, for a machine with a CUDA GPU (none was lent while this was written, so
# benchmarks/results/gpu/ does not exist yet). Compare with the paper's V100 table: ViT-S/16
# off the shelf, 953 -> 1564 im/s at r=13 (fp16). Each command prints which sdpa kernels ran.
# Proportional attention in its bias form passes a float mask, so flash attention cannot run (the
# memory-efficient or cuDNN kernel should, not _scaled_dot_product_attention_math); its flash form
# (prop_attn="flash", what the default picks on CUDA in fp16) folds log(size) into a key column,
# and _scaled_dot_product_flash_attention should run. Both forms are timed beside the default.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/gpu
# DeiT-S/B and ViT-L at batch 64 and 256, fp16, eager and compiled
tome-fx bench --device cuda --dtype float16 --models deit_small_patch16_224 deit_base_patch16_224 \
    vit_large_patch16_224 --r 8 13 16 --batch 64 256 --modes eager compiled --repeats 20 --merge-share \
    --prop-attn bias flash \
    --out $out/vit
# batch 1 with CUDA graphs (torch.compile mode="reduce-overhead")
tome-fx bench --device cuda --dtype float16 --models deit_small_patch16_224 --r 13 --batch 1 \
    --modes compiled --compile-mode reduce-overhead --repeats 50 --out $out/batch1
# the SD-1.5-shaped UNet step at 512 px against tomesd
tome-fx bench-grid sd --device cuda --dtype float16 --modes eager compiled --repeats 10 --out $out/grid
