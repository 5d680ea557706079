"""Un-merge tokens where their original layout is needed again.

Along every token axis, each original token takes the value of the merged token that
holds it (a gather by ``positions``); an axis of weights over tokens (an attention map's
keys) is split instead: each original token takes its share, the merged weight divided
by the group's size, so the weights still sum to what they summed to. This happens

- before a reshape that splits the token axis back into a grid (DiT's unpatchify, a
  dense head's reassemble): the reshape then sees the original token count, as captured;
- at the outputs (``unmerge_outputs=True``), so returned per-token tensors keep their
  shapes: mean pooling over the original positions then equals size-weighted pooling over
  the merged tokens, and a user's own pooling (with an attention mask) works unchanged.

Merged outputs (``unmerge_outputs=False``) are put in the raster order of each token's
first patch instead, with the sizes and positions returned beside them: the matching's own
order (kept tokens, then the receiving set) means nothing to whoever reads them next.
"""

from __future__ import annotations

import operator

from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from .. import merge
from .token_flow import TOKEN, FlowPass, Layout, TokenFlow, is_weights


def _unmerged(graph: Graph, value: Node, layout: Layout) -> Node:
    """Nodes (inserted at the graph's insertion point) un-merging ``value`` along every token axis."""
    batch_dim, inner = layout.batch_axis()
    for dim in layout.dims(TOKEN):
        split = layout.size if is_weights(layout.roles[dim]) else None
        value = graph.call_function(merge.unmerge, (value, layout.positions, batch_dim, dim, layout.start, split, inner))
    return value


def _ordered(graph: Graph, value: Node, layout: Layout) -> Node:
    """Nodes putting ``value``'s tokens in the raster order of their first patches."""
    order = graph.call_function(merge.raster_order, (layout.positions, layout.size))
    for dim in layout.dims(TOKEN):
        value = graph.call_function(merge.reorder, (value, order, layout.batch_dim(), dim, layout.start))
    return value


class Unmerge(FlowPass):
    """Un-merges where the flow asks, and at the outputs (``outputs``) or, given ``state``
    (the final ``(size, positions)``, returned beside the outputs), orders them and it.
    Neither: the outputs hold no merged tokens (per-branch merging un-merges each branch)."""

    def __init__(self, flow: TokenFlow, outputs: bool, state: tuple[Node, Node] | None = None):
        super().__init__(flow)
        self.outputs = outputs
        self.state = state

    def call(self, gm: GraphModule) -> PassResult:
        graph, modified = gm.graph, False
        for node in self.flow.unmerges:
            layout = self.flow.layouts[node.args[0]]
            if layout.merged:
                with graph.inserting_before(node):
                    node.update_arg(0, _unmerged(graph, node.args[0], layout))
                modified = True
        output = graph.output_node()
        for node in self.flow.outputs if self.outputs or self.state else ():
            layout = self.flow.layouts[node]
            if layout.merged:
                with graph.inserting_before(output):
                    restored = (_unmerged if self.outputs else _ordered)(graph, node, layout)
                restored.meta["val"] = node.meta.get("val")
                output.replace_input_with(node, restored)
                modified = True
        if not self.outputs and self.state:
            size, positions = self.state
            with graph.inserting_before(output):
                order = graph.call_function(merge.raster_order, (positions, size))
                state = graph.call_function(merge.reordered_state, (size, positions, order))
                self.state = (graph.call_function(operator.getitem, (state, 0)),
                              graph.call_function(operator.getitem, (state, 1)))
            modified = True
        return PassResult(gm, modified)
