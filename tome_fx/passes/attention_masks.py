"""Attention masks: dropped where they pass everything, otherwise merged with the tokens.

HF transformers builds a full ``[B, 1, N, N]`` mask even for images with no padding
(all True, or all 0 when additive). Such a mask is computed from shapes only (no
inputs, no parameters, which could change later), so it is evaluated ahead of time,
once per mask node at two batch sizes; where it lets every query see every key it is
removed, and the attention runs unmasked on any number of tokens. One that does not pass
everything was built from token positions (``tril``, ALiBi from ``arange``): refused.

A real mask (BERT padding) must be one node shared by every block. Merges then only
join tokens whose mask rows and columns are equal (``merge.mask_pairs``), so each
merged token is masked exactly like every original token it holds, and ``RestageMasks``
reads the mask at one original token per merged token before each attention. A pooling
head's own mask over the keys (SigLIP2's) is computed before the first merge, the merges
respect it too (``merge.tome_merge``'s ``key_masks``), and it is read likewise.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import merge
from ..errors import UnsupportedModelError
from .find_blocks import SDPA, AttentionBlock
from .graph_utils import (aten, ancestors, depends_on_inputs, describe, evaluate_constant, is_assertion, is_parameter,
                          tensor_meta)
from .token_flow import FlowPass, TokenFlow


def reads_parameters(mask: Node) -> bool:
    """Masks built from parameters or buffers (or that are one) may change after ``transform``:
    never dropped."""
    return any(node.op == "get_attr" for node in ancestors(mask) | {mask})


_INDEXING = {aten.index.Tensor, aten.gather.default, aten.index_select.default, aten.embedding.default}


def _unmergeable_bias(mask: Node, stream: Node) -> str | None:
    """Why a kept mask or bias cannot follow merged tokens, by what it is built from; None for
    a mask from the inputs alone (padding), which merges exactly (``merge.mask_pairs``)."""
    if stream in ancestors(mask):
        return ("its attention bias is computed from the tokens themselves (e.g. x @ x^T), per pair of tokens; "
                "tome_fx merges only masks built from the model's inputs alone (padding)")
    if depends_on_inputs(mask) and reads_parameters(mask):
        return ("its attention mask combines the inputs (padding) with learned parameters (a relative-position "
                "bias, T5-style), which no longer line up with the tokens once they merge")
    if depends_on_inputs(mask):
        return None
    if any(node.op == "call_function" and node.target in _INDEXING for node in ancestors(mask) | {mask}):
        return ("its attention bias is read from a learned table by token position (a relative-position bias "
                "table), which no longer lines up with the tokens once they merge")
    if not any(is_parameter(node) for node in ancestors(mask) | {mask}):
        return (f"its attention mask (shape {tuple(tensor_meta(mask).shape)}) is a constant over token pairs, built "
                "from token positions alone (a causal mask: autoregressive attention), which merged tokens no longer "
                "have")
    return (f"its attention bias is a learned parameter over token pairs (shape {tuple(tensor_meta(mask).shape)}), "
            "which no longer lines up with the tokens once they merge")


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
        self.kept: list[tuple[Node, Node]] = []  # (node applying it, mask) of the masks left

    def call(self, gm: GraphModule) -> PassResult:
        dropped: set[Node] = set()
        values: dict[Node, list[torch.Tensor] | None] = {}  # blocks usually share one mask node
        for block in self.blocks:
            for applied_by, mask in block.masks:
                if mask not in values:
                    constant = not depends_on_inputs(mask) and not reads_parameters(mask)
                    values[mask] = [evaluate_constant(gm, mask, b) for b in (2, 3)] if constant else None
                if values[mask] is None:
                    self.kept.append((applied_by, mask))
                    continue
                if not all(_passes_everything(v, applied_by) for v in values[mask]):
                    raise UnsupportedModelError(
                        f"{describe(applied_by)}: its attention mask or bias does not depend on the inputs, yet "
                        "does not let every token attend to every other: it is built from token positions (a "
                        "causal mask, an ALiBi-style distance bias), which merged tokens no longer have"
                    )
                if applied_by.target in SDPA:
                    _set_attn_mask(applied_by, None)
                else:
                    applied_by.replace_all_uses_with(applied_by.args[0])
                    gm.graph.erase_node(applied_by)
                dropped.add(mask)
        _erase_unused(gm, dropped)
        return PassResult(gm, bool(dropped))


def _set_attn_mask(sdpa: Node, mask: Node | None) -> None:
    if len(sdpa.args) > 3:
        sdpa.update_arg(3, mask)
    else:
        sdpa.update_kwarg("attn_mask", mask)


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


def shared_mask(kept: list[tuple[Node, Node]], tokens: int, stream: Node) -> Node | None:
    """The one attention mask the blocks share, checked to be laid out ``[.., Q, tokens]``
    and built from the inputs alone (``stream``: the residual stream of the first block)."""
    for applied_by, mask in kept:
        if (why := _unmergeable_bias(mask, stream)) is not None:
            raise UnsupportedModelError(f"{describe(applied_by)}: {why}")
    masks = {mask for _, mask in kept}
    if len(masks) > 1:
        raise UnsupportedModelError(
            f"{describe(kept[0][0])}: the blocks use {len(masks)} different attention masks; "
            "merging is proven only for one mask shared by every block"
        )
    if not masks:
        return None
    mask = masks.pop()
    shape = tensor_meta(mask).shape
    if len(shape) > 4 or len(shape) < 2 or shape[-1] != tokens or shape[-2] not in (1, tokens):
        raise UnsupportedModelError(
            f"{describe(mask)}: attention mask of shape {tuple(shape)} is not laid out [.., queries, keys] "
            f"over the {tokens} tokens"
        )
    return mask


class RestageMasks(FlowPass):
    """Before each attention over merged tokens, read the mask at the current tokens."""

    def __init__(self, flow: TokenFlow, mask: Node | None):
        super().__init__(flow)
        self.mask = mask

    def call(self, gm: GraphModule) -> PassResult:
        graph, modified = gm.graph, False
        for applied_by, layout in self.flow.masked:
            if not layout.merged:
                continue
            with graph.inserting_before(applied_by):
                tokens = graph.call_function(aten.sym_size.int, (layout.size, 1))
                current = graph.call_function(merge.restage_mask, (self.mask, layout.positions, tokens))
            if applied_by.target in SDPA:
                _set_attn_mask(applied_by, current)
            else:
                applied_by.replace_input_with(self.mask, current)
            modified = True
        for applied_by, mask, layout in self.flow.key_masks:
            if not layout.merged:
                continue
            with graph.inserting_before(applied_by):
                tokens = graph.call_function(aten.sym_size.int, (layout.size, 1))
                current = graph.call_function(
                    merge.restage_key_mask, (mask, layout.positions, tokens, layout.batch_axis()[1]))
            applied_by.replace_input_with(mask, current)
            modified = True
        return PassResult(gm, modified)
