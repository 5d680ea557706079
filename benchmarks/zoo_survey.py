"""The timm zoo as a new user meets it: ``tome_fx.transform(model, r)`` on the smallest model
of every attention family, at random init, with defaults (``scheme="auto"``).

Each model is tried with an int r (whole-stream merging's ``r=8``) and with a fraction
(``r=0.5``, which lets ``"auto"`` fall back to per-block merging). An outcome is one of:
``stream`` / ``block`` (it merges: the transformed model runs and keeps the output shape),
``no-op`` (it builds but merges nothing, and says so), ``refused`` (``UnsupportedModelError``,
its message), ``crash`` (anything else: a bug). Warnings that name attention left unmerged
are kept beside the outcome.

    python benchmarks/zoo_survey.py            # writes benchmarks/results/zoo_survey.md
    python benchmarks/zoo_survey.py swin_tiny_patch4_window7_224 convit_tiny   # some only
    python benchmarks/zoo_survey.py --hf       # HF transformers: benchmarks/results/zoo_survey_hf.md

The HF models are ``benchmarks/hf_zoo.py``'s tiny configs, one per attention family (copies of
another family's code and towers that pack a batch into one sequence left out), at r=0.5 only.
"""

from __future__ import annotations

import inspect
import sys
import time
import warnings
from pathlib import Path

import tome_fx  # noqa: F401  (first: torchvision's guard)
import torch

# the smallest timm 1.0.31 model of each attention family
TIMM = [
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit3_small_patch16_224", "vit_small_patch14_dinov2",
    "vit_base_patch16_siglip_224", "eva02_tiny_patch14_224", "vit_medium_patch16_rope_reg1_gap_256",
    "beit_base_patch16_224", "beitv2_base_patch16_224", "vitamin_small_224", "aimv2_large_patch14_224",
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224", "gcvit_xxtiny",
    "nextvit_small", "fastvit_mci0", "twins_svt_small", "twins_pcpvt_small", "hiera_tiny_224",
    "pvt_v2_b0", "mvitv2_tiny", "davit_tiny", "efficientformerv2_s0", "efficientformer_l1", "levit_128s",
    "pit_ti_224", "coatnet_0_rw_224", "maxvit_rmlp_pico_rw_256", "crossvit_tiny_240", "xcit_nano_12_p16_224",
    "edgenext_xx_small", "cait_xxs24_224", "mobilevit_xxs", "mobilevitv2_050", "coat_lite_tiny", "coat_tiny",
    "tnt_s_patch16_224", "efficientvit_m0", "efficientvit_b0", "caformer_s18", "volo_d1_224", "convit_tiny",
    "sequencer2d_s", "visformer_tiny", "sam2_hiera_tiny", "samvit_base_patch16", "fastvit_t8", "repvit_m0_9",
    "tiny_vit_5m_224", "nest_tiny", "focalnet_tiny_srf", "mambaout_femto", "rdnet_tiny", "csatv2",
]


def _outcome(model: torch.nn.Module, x: torch.Tensor | dict, r) -> tuple[str, str]:
    """(outcome, detail) of ``transform(model, r)`` and one call; ``x``: the input, or keyword inputs."""
    call = (lambda m: m(**x)) if isinstance(x, dict) else (lambda m: m(x))  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fast = tome_fx.transform(model, r, example_inputs=x)
            with torch.no_grad():
                out, ref = call(fast), call(model)
            out, ref = (getattr(o, "last_hidden_state", o) for o in (out, ref))
        except tome_fx.UnsupportedModelError as error:
            return "refused", str(error)
        except Exception as error:  # a bug: reported as such
            return "crash", f"{type(error).__name__}: {error}"
    said = [str(w.message) for w in caught if any(k in str(w.message) for k in ("merges no", "run on every", "only the"))]
    shapes = [t.shape for t in (out, ref) if isinstance(t, torch.Tensor)]
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        return "crash", f"output shape {tuple(shapes[0])} against {tuple(shapes[1])}"
    if any("merges no" in s for s in said):
        return "no-op", "; ".join(said)
    if isinstance(fast, tome_fx.ToMeModel):
        return "stream", f"schedule {fast.schedule}" + "".join(f"; {s}" for s in said)
    merging = sum(bool(p.merged) for plan in fast.plans.values() for p in plan)
    return "block", f"{merging} blocks merge" + "".join(f"; {s}" for s in said)


def main(names: list[str]) -> None:
    import timm

    rows = []
    for name in names:
        start = time.perf_counter()
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        except Exception as error:
            rows.append((name, "not built", f"{type(error).__name__}: {error}", "", ""))
            continue
        x = torch.randn(2, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
        found = [_outcome(model, x, r) for r in (8, 0.5)]
        rows.append((name, *found[0], *found[1]))
        print(name, found[0][0], found[1][0], f"{time.perf_counter() - start:.0f} s", flush=True)
    lines = ["# timm zoo survey", "", f"`python benchmarks/zoo_survey.py` (timm {timm.__version__}, torch "
             f"{torch.__version__}, random init, batch 2, defaults: `scheme=\"auto\"`).", "",
             "| model | r=8 | detail | r=0.5 | detail |", "|---|---|---|---|---|"]
    clean = lambda s: s.replace("|", "/").replace("\n", " ")[:400]  # noqa: E731
    lines += [f"| {name} | {a} | {clean(da)} | {b} | {clean(db)} |" for name, a, da, b, db in rows]
    counts = {}
    for row in rows:
        counts[row[3]] = counts.get(row[3], 0) + 1
    lines += ["", "At r=0.5: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" of {len(rows)}."]
    if len(names) == len(TIMM):
        out = Path(__file__).parent / "results" / "zoo_survey.md"
        out.write_text("\n".join(lines) + "\n")
        print("wrote", out)
    else:
        print("\n".join(lines))


def main_hf(names: list[str]) -> None:
    import transformers

    import hf_zoo

    chosen = names or [n for n in hf_zoo.HF if "copy" not in hf_zoo.FAMILY[n] and n not in hf_zoo.PACKED]
    rows = []
    for name in chosen:
        start = time.perf_counter()
        make, inputs = hf_zoo.HF[name]
        model = make()
        args, kwargs = inputs(2)
        if kwargs or len(args) != 1:  # all by name
            kwargs = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
        rows.append((name, *_outcome(model, kwargs or args[0], 0.5)))
        print(name, rows[-1][1], f"{time.perf_counter() - start:.0f} s", flush=True)
    lines = ["# HF transformers zoo survey", "", f"`python benchmarks/zoo_survey.py --hf` (transformers "
             f"{transformers.__version__}, torch {torch.__version__}, benchmarks/hf_zoo.py's tiny configs, random init, "
             "batch 2, r=0.5, defaults: `scheme=\"auto\"`).", "", "| model | family | r=0.5 | detail |", "|---|---|---|---|"]
    clean = lambda s: s.replace("|", "/").replace("\n", " ")[:400]  # noqa: E731
    lines += [f"| {name} | {hf_zoo.FAMILY[name]} | {a} | {clean(d)} |" for name, a, d in rows]
    counts = {}
    for row in rows:
        counts[row[1]] = counts.get(row[1], 0) + 1
    lines += ["", "At r=0.5: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" of {len(rows)}."]
    if not names:
        out = Path(__file__).parent / "results" / "zoo_survey_hf.md"
        out.write_text("\n".join(lines) + "\n")
        print("wrote", out)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(2)
    if sys.argv[1:2] == ["--hf"]:
        sys.path.insert(0, str(Path(__file__).parent))
        main_hf(sys.argv[2:])
    else:
        main(sys.argv[1:] or TIMM)
