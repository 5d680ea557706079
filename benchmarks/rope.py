"""How should a merged token rotate? Top-1 of the Fashion-MNIST RoPE model against r, per rule.

    python benchmarks/rope.py [--out benchmarks/results]

The RoPE twin of the reference model (``fashion_mnist.create_model(arch="rope")``: timm's
rope-vit, axial rotary terms and no absolute positions, same stem, width, depth and 197
tokens; trained by ``train_fashion_mnist.py --arch rope``) is evaluated on the 10,000 test
images at each schedule with both ``rope`` rules -- ``mean`` (size-weighted mean of the
group's cos/sin rows) and ``representative`` (the first patch's rows) -- and with a third
candidate measured here only, ``coords``: the rotation at the size-weighted mean of the
group's grid coordinates, from the model's own frequencies. tome_fx sees finished cos/sin
tables, not coordinates, so ``coords`` is built for timm's axial RoPE alone
(``coords_rule``), and ships only if it wins. Beside them: the absolute-position reference
model at the same token counts. Writes rope.json, rope.md and rope.png.
"""

from __future__ import annotations

import pathlib
from unittest import mock

import torch

import tome_fx
from tome_fx import merge
from tome_fx.tools import bench, evaluate, fashion_mnist
from tome_fx.passes.rotary_tables import RULES

SCHEDULES = [0, 4, 8, 12, 16, 20, 24, 28, 32, (16, -1), (24, -1)]


CANDIDATES = (*RULES, "coords")


def coords_rule(rope: torch.nn.Module):
    """A stand-in for ``merge.restage_table`` that gives each merged token the rotation at
    the size-weighted mean of its patches' grid coordinates: the rotary angles are linear in
    the coordinates, so that is the mean of the angles, rebuilt from timm's own grid and
    bands (checked to reproduce the model's table bit for bit)."""
    from timm.layers import pos_embed_sincos as sincos

    grid = sincos.build_fourier_pos_embed(
        list(rope.feat_shape), bands=rope.bands, in_pixels=rope.in_pixels, ref_feat_shape=rope.ref_feat_shape,
        grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing, grid_type=rope.grid_type,
        normalize_coords=rope.normalize_coords, include_grid=True)[0]
    angles = sincos._rope_layout((grid * rope.bands).flatten(-2).flatten(0, -2), rope.rotate_half)
    sin, cos = rope.pos_embed.chunk(2, -1)
    assert torch.equal(angles.sin(), sin) and torch.equal(angles.cos(), cos)
    restage = merge.restage_table

    def restage_coords(table, positions, size, ndim, batch_dim, token_dim, start, rule):
        mean = restage(angles, positions, size, ndim, batch_dim, token_dim, start, "mean")
        if torch.equal(table, sin):
            return mean.sin()
        assert torch.equal(table, cos), "a rotary table that is neither of the model's"
        return mean.cos()

    return restage_coords


def rows(batch: int = 500) -> list[dict]:
    reference = fashion_mnist.create_model()
    rotary = fashion_mnist.create_model(fashion_mnist.ROPE_CHECKPOINT, arch="rope")
    images, labels = fashion_mnist.load_split("test")
    variants, tokens = {}, {}
    for schedule in SCHEDULES:
        label = bench.schedule_label(schedule)
        fast = tome_fx.transform(reference, schedule)
        variants[f"reference {label}"], tokens[label] = fast, fast.token_counts[-1]
        for rule in RULES:
            variants[f"{rule} {label}"] = tome_fx.transform(rotary, schedule, rope=rule)
        with mock.patch.object(merge, "restage_table", coords_rule(rotary.rope)):  # the graph keeps the stand-in
            variants[f"coords {label}"] = tome_fx.transform(rotary, schedule)
    top1 = evaluate.top1(variants, evaluate.chunks(images, labels, batch), len(images))
    table = []
    for schedule in SCHEDULES:
        label = bench.schedule_label(schedule)
        row = {"schedule": label, "tokens_out": tokens[label], "reference": top1[f"reference {label}"]}
        row.update({rule: top1[f"{rule} {label}"] for rule in CANDIDATES})
        table.append(row)
    for row in table:
        row["reference_drop"] = table[0]["reference"] - row["reference"]
        row.update({f"{rule}_drop": table[0][rule] - row[rule] for rule in CANDIDATES})
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| r | tokens out | reference (absolute positions) | drop | "
             + " | ".join(f"RoPE, {rule} | drop" for rule in CANDIDATES) + " |",
             "|---|---|---|---|" + "---|---|" * len(CANDIDATES)]
    lines += [f"| {row['schedule']} | {row['tokens_out']} | {row['reference']:.2%} | {row['reference_drop']:+.2%} | "
              + " | ".join(f"{row[rule]:.2%} | {row[f'{rule}_drop']:+.2%}" for rule in CANDIDATES) + " |"
              for row in table]
    return "\n".join(lines)


def plot(table: list[dict], path: pathlib.Path) -> None:
    with bench.figure(path) as ax:
        tokens = [row["tokens_out"] for row in table]
        for key, label in (("reference", "reference (absolute positions)"),
                           *((rule, f"RoPE, {rule}") for rule in CANDIDATES)):
            ax.plot(tokens, [100 * row[f"{key}_drop"] for row in table], "o", label=label)
        ax.set_xlabel("tokens after the last block (of 197)")
        ax.set_ylabel("top-1 drop from r=0 (points)")
        ax.set_title("Fashion-MNIST: accuracy drop by schedule, per rotary rule")


if __name__ == "__main__":
    bench.table_script(__file__, __doc__, rows, markdown, plot)
