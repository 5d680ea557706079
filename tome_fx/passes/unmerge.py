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
"""

from __future__ import annotations

from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from .. import merge
from .token_flow import TOKEN, FlowPass, Layout, TokenFlow, is_weights


def _unmerged(graph: Graph, value: Node, layout: Layout) -> Node:
    """Nodes (inserted at the graph's insertion point) un-merging ``value`` along every token axis."""
    for dim in layout.dims(TOKEN):
        split = layout.size if is_weights(layout.roles[dim]) else None
        value = graph.call_function(merge.unmerge, (value, layout.positions, layout.batch_dim(), dim, layout.start, split))
    return value


class Unmerge(FlowPass):
    def __init__(self, flow: TokenFlow, outputs: bool):
        super().__init__(flow)
        self.outputs = outputs

    def call(self, gm: GraphModule) -> PassResult:
        graph, modified = gm.graph, False
        for node in self.flow.unmerges:
            layout = self.flow.layouts[node.args[0]]
            if layout.merged:
                with graph.inserting_before(node):
                    node.update_arg(0, _unmerged(graph, node.args[0], layout))
                modified = True
        output = graph.output_node()
        for node in self.flow.outputs if self.outputs else ():
            layout = self.flow.layouts[node]
            if layout.merged:
                with graph.inserting_before(output):
                    restored = _unmerged(graph, node, layout)
                restored.meta["val"] = node.meta.get("val")
                output.replace_input_with(node, restored)
                modified = True
        return PassResult(gm, modified)
