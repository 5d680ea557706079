"""Paint which patches ended up in which merged token (the ToMe paper's figure).

From the tracked token positions: each final token's group of patches is filled with the group's
mean colour and outlined where it borders another group.
"""

from __future__ import annotations

import math

import torch

import tome_fx


def patch_groups(fast: tome_fx.ToMeModel, image: torch.Tensor) -> torch.Tensor:
    """[gh, gw] index of the final token holding each patch, for one [C, H, W] input.
    Protected tokens (class, registers) are left out; patches tile the image row by row."""
    _, state = fast.forward_with_tokens(image[None])
    patches = state.positions[0, fast.plan.protected:]
    height, width = image.shape[-2:]
    side = math.sqrt(height * width / patches.numel())
    rows, cols = round(height / side), round(width / side)
    if rows * cols != patches.numel():
        raise ValueError(f"{patches.numel()} patch tokens do not tile a {height}x{width} image in a grid")
    return patches.reshape(rows, cols)


def paint(pixels: torch.Tensor, groups: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """``pixels`` [C, H, W] in [0, 1] with every group of patches in its mean colour and
    group borders drawn in white; upscaled by ``scale`` first so borders stay thin."""
    pixels = pixels.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    channels, height, width = pixels.shape
    rows, cols = groups.shape
    cell = groups.repeat_interleave(height // rows, 0).repeat_interleave(width // cols, 1)
    flat_ids = cell.reshape(-1)
    count = torch.zeros(int(flat_ids.max()) + 1).index_add_(0, flat_ids, torch.ones(flat_ids.numel()))
    means = torch.stack([
        torch.zeros_like(count).index_add_(0, flat_ids, pixels[c].reshape(-1)) / count.clamp_min(1)
        for c in range(channels)
    ])
    out = means[:, flat_ids].reshape(channels, height, width)
    border = torch.zeros(height, width, dtype=torch.bool)
    border[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    border[1:, :] |= cell[1:, :] != cell[:-1, :]
    out[:, border] = 1.0
    return out


def render(fast: tome_fx.ToMeModel, image: torch.Tensor, pixels: torch.Tensor, scale: int = 1):
    """A PIL image: the input ``pixels`` ([C, H, W] in [0, 1]) beside its merged groups."""
    from PIL import Image

    with torch.no_grad():
        groups = patch_groups(fast, image)
    original = pixels.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    painted = paint(pixels, groups, scale)
    gap = torch.ones(pixels.shape[0], original.shape[1], max(4, scale))
    both = torch.cat([original, gap, painted], dim=-1).clamp(0, 1)
    array = (both * 255).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray((array.squeeze(-1) if array.shape[-1] == 1 else array).numpy())
