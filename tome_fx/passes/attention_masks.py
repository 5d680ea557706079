"""Attention masks that pass everything are dropped before tokens are merged.

HF transformers builds a full ``[B, 1, N, N]`` mask even for images with no padding
(all True, or all 0 when additive). Such a mask is computed from shapes only, so it is
evaluated ahead of time, at two batch sizes; where it lets every query see every key
it is removed, and the attention runs unmasked on any number of tokens. A mask that
does depend on the inputs, or masks something out, is left for the token-flow analysis.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .find_blocks import SDPA, AttentionBlock
from .graph_utils import aten, ancestors, depends_on_inputs, evaluate_constant, is_assertion


def _passes_everything(mask: torch.Tensor, applied_by: Node) -> bool:
    if applied_by.target == aten.masked_fill.Scalar:  # True marks what is filled in
        return mask.dtype == torch.bool and not mask.any()
    if mask.dtype == torch.bool:
        return applied_by.target in SDPA and bool(mask.all())
    return not mask.any()  # additive: all zeros


class DropAllPassMasks(PassBase):
    def __init__(self, blocks: list[AttentionBlock]):
        super().__init__()
        self.blocks = blocks

    def call(self, gm: GraphModule) -> PassResult:
        dropped: set[Node] = set()
        for block in self.blocks:
            for applied_by, mask in block.masks:
                if depends_on_inputs(mask):
                    continue
                if not all(_passes_everything(evaluate_constant(gm, mask, b), applied_by) for b in (2, 3)):
                    continue
                if applied_by.target in SDPA:
                    if len(applied_by.args) > 3:
                        applied_by.update_arg(3, None)
                    else:
                        applied_by.update_kwarg("attn_mask", None)
                else:
                    applied_by.replace_all_uses_with(applied_by.args[0])
                    gm.graph.erase_node(applied_by)
                dropped.add(mask)
        _erase_unused(gm, dropped)
        return PassResult(gm, bool(dropped))


def _erase_unused(gm: GraphModule, roots: set[Node]) -> None:
    """Erase the dropped masks and whatever only they used."""
    candidates = set(roots)
    for root in roots:
        candidates |= ancestors(root)
    for node in reversed(list(gm.graph.nodes)):
        if is_assertion(node) and set(node.all_input_nodes) <= candidates:
            gm.graph.erase_node(node)
        elif node in candidates and node.op == "call_function" and not node.users:
            gm.graph.erase_node(node)
