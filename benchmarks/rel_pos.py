"""How should a merged token see relative positions? Top-1 of the Fashion-MNIST SAM-encoder twin against ratio, per rule.

    python benchmarks/rel_pos.py [--out benchmarks/results]

The SAM-encoder twin of the reference model (``fashion_mnist.create_model(arch="samvit")``:
timm's SAM ViT, windowed and global blocks, decomposed relative positions and no absolute
table; trained by ``train_fashion_mnist.py --arch samvit``) is evaluated on the 10,000 test
images with ``tome_fx.sam.apply`` at each ratio:

- ``mlp``: the MLP branches alone (exact for duplicates, positions untouched);
- ``attn, mean`` / ``attn, representative``: attention branches merge too, with each
  ``rel_pos`` rule (``merge.REL_POS_RULES``);
- ``attn, no positions``: measured here only, the bias of merged pairs dropped (zero), to
  show how much the rule carries;
- ``reference, mlp`` / ``reference, attn``: the absolute-position reference, the same SAM
  encoder with an absolute position table instead of relative positions
  (``arch="samvit_abs"``, trained by ``train_fashion_mnist.py --arch samvit_abs``), merged
  the same way: where no rule is needed, what merging alone costs.

Writes rel_pos.json, rel_pos.md and rel_pos.png.
"""

from __future__ import annotations

import contextlib
import pathlib
from unittest import mock

import torch

import tome_fx  # noqa: F401 (before timm)
from tome_fx import merge, sam
from tome_fx.tools import bench, evaluate, fashion_mnist

RATIOS = [0.0, 0.25, 0.5, 0.75]
VARIANTS = ("mlp", "attn, mean", "attn, representative", "attn, no positions", "reference, mlp", "reference, attn")


def _no_positions(q, table_h, table_w, h, w, positions, size, inner, rule):
    """A stand-in for ``merge.merged_rel_pos_bias``: no bias between merged tokens."""
    return q.new_zeros(q.shape[0], q.shape[1], q.shape[1])


def _variant(model, ratio: float, name: str, probe: torch.Tensor):
    """``sam.apply`` for the variant ``name``, captured on ``probe``'s shape (the stand-in is
    built into the graph then, so it stays after the patch is undone)."""
    if name.endswith("mlp"):
        fast = sam.apply(model, ratio)
    elif name.startswith("reference"):
        fast = sam.apply(model, ratio, attn=True)
    else:
        rule = name.split(", ")[1]
        fast = sam.apply(model, ratio, attn=True, rel_pos="mean" if rule == "no positions" else rule)
    stand_in = mock.patch.object(merge, "merged_rel_pos_bias", _no_positions)
    with torch.no_grad(), stand_in if name.endswith("no positions") else contextlib.nullcontext():
        fast(probe)
    return fast


def rows(batch: int = 500) -> list[dict]:
    models = {"": fashion_mnist.create_model(fashion_mnist.SAMVIT_CHECKPOINT, arch="samvit"),
              "reference": fashion_mnist.create_model(fashion_mnist.SAMVIT_ABS_CHECKPOINT, arch="samvit_abs")}
    images, labels = fashion_mnist.load_split("test")
    variants = {"original": models[""], "reference original": models["reference"]}
    for ratio in RATIOS[1:]:
        for name in VARIANTS:
            model = models["reference" if name.startswith("reference") else ""]
            variants[f"{name} {ratio}"] = _variant(model, ratio, name, images[:batch])
    top1 = evaluate.top1(variants, evaluate.chunks(images, labels, batch), len(images))
    table = []
    for ratio in RATIOS:
        row = {"ratio": ratio}
        for name in VARIANTS:
            original = top1["reference original" if name.startswith("reference") else "original"]
            row[name] = original if ratio == 0 else top1[f"{name} {ratio}"]
            row[f"{name}_drop"] = original - row[name]
        table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| ratio | " + " | ".join(f"{name} | drop" for name in VARIANTS) + " |",
             "|---|" + "---|---|" * len(VARIANTS)]
    lines += [f"| {row['ratio']} | " + " | ".join(f"{row[name]:.2%} | {row[f'{name}_drop']:+.2%}" for name in VARIANTS)
              + " |" for row in table]
    return "\n".join(lines)


def plot(table: list[dict], path: pathlib.Path) -> None:
    with bench.figure(path) as ax:
        for name in VARIANTS:
            ax.plot([row["ratio"] for row in table], [100 * row[f"{name}_drop"] for row in table], "o-", label=name)
        ax.set_xlabel("ratio of each branch's tokens merged away")
        ax.set_ylabel("top-1 drop from the original (points)")
        ax.set_title("Fashion-MNIST SAM-encoder twin: accuracy drop per relative-position rule")


if __name__ == "__main__":
    bench.table_script(__file__, __doc__, rows, markdown, plot)
