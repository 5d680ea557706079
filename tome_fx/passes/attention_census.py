"""Every attention op accounted for: the ones no block holds and no merged token reaches.

Block finding recognises attention by its form (``find_blocks``). A softmax over a product
of queries and keys whose weights reach the values through anything else -- ConViT's gated
positional attention mixes two softmaxes before the value product -- is no block, so its
tokens never merge; where no merged token reaches it either, it runs as captured. That is
exact, but a plan that stayed silent about it would overstate what merges: this pass names
each such op, with why, and the share of the attention's multiply-adds it holds, for
``TomePlan.summary`` and the warning ``transform`` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.fx import Graph, Node

from .find_blocks import (_LOGIT_OPS, _PASS_THROUGH, EINSUM, MATMUL, SDPA, SOFTMAX, _walk_back, in_scope,
                          manual_attention, unrecognised_attention)
from .graph_utils import VIEWS, describe, einsum_letters, module_path, shape_of


@dataclass(frozen=True)
class UnmergedAttention:
    """An attention op that runs on every token: where it is, why no block holds it, and its
    multiply-adds (queries times keys, weights times values) at the captured batch."""

    name: str  # ``describe`` of the op
    reason: str
    macs: int


def _product_macs(product: Node) -> int:
    """Multiply-adds of a matmul or einsum: the output's entries times what each one sums over."""
    if product.target == EINSUM:
        letters, output = einsum_letters(product)
        sizes = {c: d for part, node in zip(letters, product.args[1]) for c, d in zip(part, shape_of(node))}
        return math.prod(shape_of(product)) * math.prod(d for c, d in sizes.items() if c not in output)
    return math.prod(shape_of(product)) * shape_of(product.args[0])[-1]


def attention_macs(attention: Node) -> int:
    """Multiply-adds of an sdpa or a softmax attention over the captured batch: its scores
    product and its value product (as many again as the scores' where the values are not found)."""
    if attention.target in SDPA:
        queries, keys, values = (shape_of(a) for a in attention.args[:3])
        return math.prod(queries[:-1]) * keys[-2] * (queries[-1] + values[-1])
    scores = _walk_back(attention.args[0], _LOGIT_OPS | _PASS_THROUGH | VIEWS)[0]
    found = manual_attention(attention)
    return _product_macs(scores) + (_product_macs(found.output) if found else _product_macs(scores))


def unmerged_attention(graph: Graph, merged: set[Node], blocks: set[Node],
                       scope: tuple[str, ...] = ()) -> tuple[tuple[UnmergedAttention, ...], int]:
    """The attention ops in ``scope`` that no block holds (``blocks``: the blocks' attention
    nodes) and no merged token reaches (``merged``: nodes the token-flow analysis follows), and
    the multiply-adds of every attention op in scope, blocks' included."""
    found, total = [], 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SDPA | SOFTMAX or not in_scope(module_path(node), scope):
            continue
        why = None if node.target in SDPA or node in blocks else unrecognised_attention(node)
        if node.target in SOFTMAX and why is None and node not in blocks:
            continue  # a softmax that is no self-attention (pooling, routing) or is a cross-attention's
        macs = attention_macs(node)
        total += macs
        if why is not None and node not in merged:
            found.append(UnmergedAttention(describe(node), why, macs))
    return tuple(found), total
