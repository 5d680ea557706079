"""Per-branch merging, timed: a Stable Diffusion UNet step, diffusion transformers' blocks at
their real widths (SD3-medium, FLUX.1, Wan 2.1) and SAM's and SAM 2's image encoders.

Both at the sizes users run (random init: speed does not depend on weights). Every
variant is built and warmed up first (compiled ones compile then), then timed calls go
in rounds (``bench.time_interleaved``). Beside each time: the FLOP bound, the original's
FLOPs over the variant's as ``FlopCounterMode`` counts them on the graphs that run
(``cost.counted_flops``), and for SD the largest difference from tomesd's output at
equal settings.
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import tome_fx

from .. import cost
from ..integrations import sam, sd
from .bench import time_interleaved


@dataclass
class GridRow:
    model: str
    variant: str  # original | tomesd r=... | tome_fx r=... [branches]
    mode: str  # eager | compiled
    median_s: float
    min_s: float
    max_s: float
    speedup: float  # the original's median (same mode) over this one's
    bound: float | None  # FLOP bound (counted); None where not counted
    max_abs_diff_vs_tomesd: float | None = None
    merge_share: float | None = None  # the merge ops' seconds alone over the variant's (timed alongside)


def sd15_unet() -> tuple[torch.nn.Module, tuple]:
    """diffusers' default UNet2DConditionModel is SD-1.5-shaped (320/640/1280/1280, two
    layers per level); SD 1.5's text width is 768. Inputs: a 512 px image's 64 x 64 latents,
    batch 2 (classifier-free guidance)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768).eval()
    return unet, (torch.randn(2, 4, 64, 64), torch.tensor(500), torch.randn(2, 77, 768))


def _bounds(calls: dict, inputs) -> dict[str, float]:
    """The original's counted FLOPs over each variant's (after a first call of each)."""
    flops = {name: cost.counted_flops(lambda c=call: c(inputs)) for name, call in calls.items()}
    return {name: flops["original"] / f for name, f in flops.items()}


def _timed(times: dict, model: str, mode: str, bounds: dict, diffs: dict) -> list[GridRow]:
    base = statistics.median(times["original"])
    return [
        GridRow(model, name, mode, statistics.median(t), min(t), max(t), base / statistics.median(t),
                bounds.get(name), diffs.get(name))
        for name, t in times.items()
    ]


def _to(model: torch.nn.Module, inputs, device: str, dtype: torch.dtype):
    """Model and inputs on ``device``, floating-point ones in ``dtype``."""
    move = (lambda t: t.to(device, dtype if t.is_floating_point() else t.dtype))
    return model.to(device=device, dtype=dtype), torch.utils._pytree.tree_map_only(torch.Tensor, move, inputs)


def run_sd(ratios: list[float], mode: str, repeats: int, all_branches: float | None = 0.5, device: str = "cpu",
           dtype: torch.dtype = torch.float32) -> list[GridRow]:
    """Original, tomesd and ``tome_fx.sd`` at each ratio (self-attention only, tomesd's
    default), plus ``tome_fx.sd`` merging every branch at ``all_branches``; ``use_rand=False``
    so outputs compare."""
    import tomesd

    unet, inputs = _to(*sd15_unet(), device, dtype)
    patched = copy.deepcopy(unet)
    variants: dict = {"original": unet}
    for ratio in ratios:
        variants[f"tome_fx r={ratio}"] = sd.apply(unet, ratio, use_rand=False)
    if all_branches:
        variants[f"tome_fx r={all_branches} attn+crossattn+mlp"] = sd.apply(
            unet, all_branches, use_rand=False, merge_crossattn=True, merge_mlp=True)

    def tomesd_at(ratio, model):
        def call(x):
            if mode == "eager":  # re-patching only sets the ratio; compiled, it would recompile
                tomesd.apply_patch(patched, ratio=ratio, use_rand=False)
            return model(*x)
        return call

    if mode == "compiled":
        # one ratio: tomesd swaps classes and keeps its ratio in a dict, so a ratio change recompiles
        ratios = [0.5] if 0.5 in ratios else ratios[:1]
        for name, m in variants.items():
            if isinstance(m, sd.ToMeUNet):
                m.compile()
        variants["original"] = torch.compile(unet)
        tomesd.apply_patch(patched, ratio=ratios[0], use_rand=False)
        patched_call = torch.compile(patched)
    else:
        patched_call = patched
    calls = {name: (lambda x, m=m: m(*x)) for name, m in variants.items()}
    calls.update({f"tomesd r={ratio}": tomesd_at(ratio, patched_call) for ratio in ratios})
    with torch.no_grad():
        # the first call captures (and compiles): FlopCounterMode would count the capture's fake run
        outputs = {name: call(inputs).sample for name, call in calls.items()}
        bounds = _bounds(calls, inputs) if mode == "eager" else {}
    diffs = {f"tome_fx r={r}": float((outputs[f"tome_fx r={r}"] - outputs[f"tomesd r={r}"]).abs().max())
             for r in ratios if f"tome_fx r={r}" in outputs}
    times = time_interleaved(calls, inputs, repeats, warmup=1 if mode == "eager" else 2)
    return _timed(times, "SD-1.5 UNet 512px b2", mode, bounds, diffs)


def sd3_medium_blocks(layers: int = 2) -> tuple[torch.nn.Module, dict]:
    """SD3-medium's width (1536, 24 heads of 64, T5 text width 4096, pooled 2048) at 1024 px:
    128 x 128 latents of 16 channels, 2 x 2 patches, so 4096 image tokens joined with 333 text
    tokens in every block; ``layers`` blocks (the last one text-final, as SD3's) instead of 24
    so that a step fits 2 cores. Batch 2 (classifier-free guidance)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=layers,
                                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                  caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                  pos_embed_max_size=192).eval()
    inputs = dict(hidden_states=torch.randn(2, 16, 128, 128), encoder_hidden_states=torch.randn(2, 333, 4096),
                  pooled_projections=torch.randn(2, 2048), timestep=torch.tensor([500.0, 500.0]))
    return model, inputs


def flux_blocks(double: int = 1, single: int = 1) -> tuple[torch.nn.Module, dict]:
    """FLUX.1's width (3072, 24 heads of 128, T5 text width 4096, pooled 768, RoPE axes 16/56/56)
    at 1024 px: 128 x 128 latents of 16 channels packed 2 x 2, so 4096 image tokens joined with
    512 text tokens; ``double`` double-stream and ``single`` single-stream blocks instead of 19
    and 38. Batch 1 (FLUX.1-dev's guidance is distilled into one call)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    inputs = dict(hidden_states=torch.randn(1, 4096, 64), encoder_hidden_states=torch.randn(1, 512, 4096),
                  pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=torch.stack([torch.zeros(4096), rows.flatten().float(), cols.flatten().float()], 1),
                  txt_ids=torch.zeros(512, 3))
    return model, inputs


def wan_blocks(layers: int = 2) -> tuple[torch.nn.Module, dict]:
    """Wan 2.1 1.3B's width (1536, 12 heads of 128, FFN 8960, UMT5 text width 4096) on a small
    clip: 17 frames at 256 x 256 px, 5 x 32 x 32 latents of 16 channels in 1 x 2 x 2 patches,
    so 1280 video tokens and 512 text tokens (cross-attention); ``layers`` blocks instead of
    30. Batch 1 (the pipeline calls the prompted and unprompted halves apart)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=layers).eval()
    inputs = dict(hidden_states=torch.randn(1, 16, 5, 32, 32), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 512, 4096))
    return model, inputs


DENOISERS = {
    "sd3": (sd3_medium_blocks, "SD3-medium width, 2 blocks, 1024px b2"),
    "flux": (flux_blocks, "FLUX.1 width, 1 double + 1 single block, 1024px b1"),
    "wan": (wan_blocks, "Wan2.1-1.3B width, 2 blocks, 17x256x256 b1"),
}


def run_denoiser(name: str, ratios: list[float], mode: str, repeats: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> list[GridRow]:
    """A diffusion transformer's blocks (``DENOISERS``): the original and, at each ratio,
    ``tome_fx.sd`` per block (attention, tomesd's default), the same reusing its matchings
    (every call after the first: the cost of a step that does not match, so a step with
    ``reuse=k`` costs (matching step + (k - 1) x this) / k) and whole-stream merging
    (``tome_fx.transform``); at 0.5 per block with the MLP too. The same variants eager and
    compiled. Eager, beside each: the counted FLOP bound, and per block the merge's share
    (``GridRow.merge_share``): the merge ops alone at that ratio, timed alongside, over the
    per-block step."""
    build, label = DENOISERS[name]
    model, inputs = _to(*build(), device, dtype)
    variants: dict = {"original": model}
    for ratio in ratios:
        variants[f"per block r={ratio}"] = sd.apply(model, ratio, use_rand=False)
        variants[f"per block r={ratio} reused"] = sd.apply(model, ratio, use_rand=False, reuse=2**30)
        variants[f"whole stream r={ratio}"] = tome_fx.transform(model, ratio, example_inputs=inputs)
    variants["per block r=0.5 attn+mlp"] = sd.apply(model, 0.5, use_rand=False, merge_mlp=True)
    if mode == "compiled":
        for k, m in variants.items():
            if isinstance(m, sd.ToMeUNet):
                m.compile()  # fullgraph, per input shape
            else:
                variants[k] = torch.compile(m)
    steps = itertools.count()
    # a reusing variant gets a step of its own each call, so it matches once and reuses after
    calls = {k: (lambda x, m=m: m(**dict(x, timestep=x["timestep"] - next(steps) * 1e-3))) if k.endswith("reused")
             else (lambda x, m=m: m(**x)) for k, m in variants.items()}
    with torch.no_grad():
        for call in calls.values():
            call(inputs)  # captures (and compiles) first: FlopCounterMode would count the capture's fake run
        bounds = _bounds({k: c for k, c in calls.items() if "reused" not in k}, inputs) if mode == "eager" else {}
        if mode == "eager":
            for ratio in ratios:
                plan = next(iter(variants[f"per block r={ratio}"].plans.values()))
                calls[f"merge ops r={ratio}"] = _merge_ops(plan, model, inputs)
    times = time_interleaved(calls, inputs, repeats, warmup=1 if mode == "eager" else 2)
    merge_ops = {k.removeprefix("merge ops "): times.pop(k) for k in list(times) if k.startswith("merge ops")}
    rows = _timed(times, label, mode, bounds, {})
    for row in rows:
        share = merge_ops.get(row.variant.removeprefix("per block "))
        if share:
            row.merge_share = statistics.median(share) / row.median_s
    return rows


def _merge_ops(plan, model: torch.nn.Module, inputs: dict):
    """One step's merge ops alone, eager, at ``plan``'s sizes: per block the matching
    (``grid_order``), a merge of the branch input and an un-merge of its output."""
    from .. import merge
    from ..call_spec import CallSpec

    (h, w), batch = sd._patch_grid(model, CallSpec.record(model, (), inputs))
    x = torch.randn(batch, h * w, model.config.num_attention_heads * model.config.attention_head_dim,
                    device=inputs["hidden_states"].device, dtype=inputs["hidden_states"].dtype)

    def step(_):
        for block in plan:
            merged, _, positions = merge.branch_merge(x, merge.grid_order(x, h, w, 2, 2, block.r, False))
            merge.branch_unmerge(merged, positions, x)

    return step


def run_sam(ratios: list[float], mode: str, repeats: int, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> list[GridRow]:
    """segment_anything's ViT-B image encoder at 1024 x 1024, batch 1."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    encoder = sam_model_registry["vit_b"](checkpoint=None).image_encoder.eval()
    return _sam_rows(encoder, "SAM ViT-B encoder 1024px b1", ratios, mode, repeats, device, dtype)


def run_sam2(ratios: list[float], mode: str, repeats: int, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> list[GridRow]:
    """SAM 2.1's Hiera-B+ image encoder (trunk and FPN neck) at 1024 x 1024, batch 1."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    encoder = build_sam2("configs/sam2.1/sam2.1_hiera_b+.yaml", None, device="cpu").image_encoder.eval()
    return _sam_rows(encoder, "SAM 2.1 Hiera-B+ encoder 1024px b1", ratios, mode, repeats, device, dtype)


def _sam_rows(encoder: torch.nn.Module, label: str, ratios: list[float], mode: str, repeats: int, device: str,
              dtype: torch.dtype) -> list[GridRow]:
    """A SAM image encoder timed at each ratio with its MLP branches merging alone, then its
    attention too (``rel_pos="mean"``), and at the largest ratio attention with
    ``rel_pos="representative"`` (the cheaper rule)."""
    encoder, inputs = _to(encoder, torch.randn(1, 3, 1024, 1024), device, dtype)
    calls = {"original": encoder}
    for r in ratios:
        calls[f"tome_fx r={r} mlp"] = sam.apply(encoder, r)
        calls[f"tome_fx r={r} attn+mlp"] = sam.apply(encoder, r, attn=True)
    calls[f"tome_fx r={max(ratios)} attn+mlp representative"] = sam.apply(encoder, max(ratios), attn=True,
                                                                         rel_pos="representative")
    if mode == "compiled":
        for name, m in calls.items():
            if name != "original":
                m.compile()
        calls["original"] = torch.compile(encoder)
    with torch.no_grad():
        for m in calls.values():
            m(inputs)  # captures (and compiles) first: FlopCounterMode would count the capture's fake run
        bounds = _bounds(calls, inputs) if mode == "eager" else {}
    times = time_interleaved(calls, inputs, repeats, warmup=1)
    return _timed(times, label, mode, bounds, {})


def write(rows: list[GridRow], out: str, name: str) -> None:
    """``name``.json (every row) and ``name``.md under ``out``: per model a table with a line
    per variant, each mode's median and speedup side by side with its share of the bound."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    modes = list(dict.fromkeys(r.mode for r in rows))
    by = {(r.model, r.variant, r.mode): r for r in rows}
    diffs = any(r.max_abs_diff_vs_tomesd is not None for r in rows)
    head = ["variant", "FLOP bound", "merge share"] + ["max abs diff vs tomesd"] * diffs
    for mode in modes:
        head += [f"{mode} s (min-max)", f"{mode} speedup", f"{mode} / bound"]
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        lines += [f"{model}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for variant in dict.fromkeys(r.variant for r in rows if r.model == model):
            found = [by[model, variant, m] for m in modes if (model, variant, m) in by]
            bound = next((r.bound for r in found if r.bound), None)
            share = next((r.merge_share for r in found if r.merge_share), None)
            diff = next((r.max_abs_diff_vs_tomesd for r in found if r.max_abs_diff_vs_tomesd is not None), None)
            cells = [variant, "" if bound is None else f"{bound:.2f}x", "" if share is None else f"{share:.1%}"]
            cells += ["" if diff is None else f"{diff:.1e}"] * diffs
            for mode in modes:
                r = by.get((model, variant, mode))
                cells += ["", "", ""] if r is None else [
                    f"{r.median_s:.2f} ({r.min_s:.2f}-{r.max_s:.2f})", f"{r.speedup:.2f}x",
                    "" if bound is None else f"{r.speedup / bound:.0%}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    (folder / f"{name}.md").write_text("\n".join(lines))
