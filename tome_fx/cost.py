"""FLOP cost model of ViT blocks under ToMe, as sympy expressions.

It counts what ``torch.utils.flop_counter.FlopCounterMode`` counts: 2 FLOPs per
multiply-add of every matmul, linear and attention. A block that receives N tokens of
width C, has MLP ratio m and merges r tokens (after its attention, before its MLP) costs

- attention linears (qkv, projection): ``8 N C^2``;
- attention (``q k^T`` and ``attn v``): ``4 N^2 C``;
- its merge, when r > 0: the cosine similarity of the ceil(N/2) set-A keys with the
  floor(N/2) set-B keys, averaged over heads (width d = C / heads): ``2 ceil(N/2) floor(N/2) d``;
- MLP (two linears) over the merged tokens: ``4 m (N - r) C^2``.

Everything is per image, times the batch. Patch embedding and head cost the same with or
without ToMe, so the bound on speedup is the ratio of the blocks' costs with them added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import sympy
import torch

from .schedule import Schedule, clamp_schedule, resolve_schedule

aten = torch.ops.aten

batch, tokens, width, depth, head_dim = sympy.symbols("B N C L d", positive=True, integer=True)
mlp_ratio = sympy.Symbol("m", positive=True)
r, block = sympy.symbols("r l", nonnegative=True, integer=True)  # tokens merged per block; block index


def block_flops(n, c=width, m=mlp_ratio, r_=0, d=head_dim, every_pair=False):
    """One block receiving ``n`` tokens and merging ``r_`` of them, merge included, per image."""
    return 8 * n * c**2 + 4 * n**2 * c + 4 * m * (n - r_) * c**2 + (merge_flops(n, d, every_pair) if r_ else 0)


def merge_flops(n, d=head_dim, every_pair=False):
    """Similarity matrix of one merge over ``n`` tokens with ``d``-wide keys, per image: set A
    against set B (ToMe's), or ``every_pair`` of tokens (PiToMe's energy, ``n^2``)."""
    if every_pair:
        return 2 * sympy.sympify(n) ** 2 * d
    half = sympy.sympify(n) / 2
    return 2 * sympy.ceiling(half) * sympy.floor(half) * d


def blocks_flops(token_counts: Sequence, schedule: Sequence, c=width, m=mlp_ratio, d=head_dim, b=1):
    """Every block given the tokens entering each block and the tokens each merges away."""
    return b * sum(block_flops(n, c, m, k, d) for n, k in zip(token_counts, schedule))


def constant_r_flops(n=tokens, c=width, m=mlp_ratio, depth_=depth, r_=r, d=head_dim, b=batch):
    """Closed form over ``depth_`` blocks when every block merges ``r_`` tokens (no
    clamping, merge cost as ``n^2 d / 2``): block l receives ``n - l r`` tokens."""
    n_l = n - block * r_
    per_block = 8 * n_l * c**2 + 4 * n_l**2 * c + 4 * m * (n_l - r_) * c**2 + n_l**2 * d / 2
    return b * sympy.simplify(sympy.summation(per_block, (block, 0, depth_ - 1)))


def counted_flops(call) -> int:
    """FLOPs of ``call()`` as ``FlopCounterMode`` counts them (matmuls, linears, convolutions,
    attention): the bound for models whose blocks vary too much for one formula -- a UNet's
    resnets and cross-attention, SAM's windows -- read off the graph that actually runs."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    # CPU's fused attention kernel has no formula of its own: the same as the other sdpa kernels
    with FlopCounterMode(display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}) as counter:
        call()
    return counter.get_total_flops()


def token_counts(n: int, schedule: Sequence[int]) -> list[int]:
    """Tokens entering each block."""
    counts = [n]
    for k in schedule[:-1]:
        counts.append(counts[-1] - k)
    return counts


@dataclass(frozen=True)
class ViTDims:
    """What the cost of a plain ViT depends on."""

    tokens: int
    width: int
    depth: int
    mlp_ratio: float = 4.0
    heads: int = 1
    protected: int = 1  # tokens that never merge (class token)

    def flops(self, schedule: Schedule = 0) -> int:
        """The blocks' FLOPs per image under ``schedule`` (clamped as ``transform`` does)."""
        merged = clamp_schedule(resolve_schedule(schedule, self.depth), self.tokens, self.protected)
        counts = token_counts(self.tokens, merged)
        return int(blocks_flops(counts, merged, self.width, self.mlp_ratio, self.width // self.heads))


def speedup_bound(schedule: Schedule, dims: ViTDims, fixed_flops: float = 0) -> float:
    """FLOPs without ToMe over FLOPs with it; ``fixed_flops``: what the rest of the model
    (patch embedding, head) costs per image."""
    return (dims.flops(0) + fixed_flops) / (dims.flops(schedule) + fixed_flops)


def schedule_for_reduction(target: float, dims: ViTDims) -> int:
    """The smallest constant r whose blocks cost at most ``(1 - target)`` of the original.

    The closed form (``constant_r_flops``) is solved for real r; the integer answer is then
    checked and adjusted against the exact, clamped count."""
    if not 0 <= target < 1:
        raise ValueError(f"target is a fraction of FLOPs to remove, in [0, 1); got {target}")
    budget = (1 - target) * dims.flops(0)
    closed = constant_r_flops(dims.tokens, dims.width, dims.mlp_ratio, dims.depth, r, dims.width // dims.heads, 1)
    roots = [float(root) for root in sympy.solve(closed - budget, r) if root.is_real and root >= 0]
    limit = (dims.tokens - dims.protected) // 2
    k = min(int(min(roots)) if roots else 0, limit)
    while k > 0 and dims.flops(k - 1) <= budget:
        k -= 1
    while k < limit and dims.flops(k) > budget:
        k += 1
    if dims.flops(k) > budget:
        raise ValueError(f"no constant r removes {target:.0%} of the blocks' FLOPs of {dims}")
    return k
