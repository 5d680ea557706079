"""Un-merge the per-token tensors a model returns, so outputs keep their original shapes.

Along every token axis, each original token takes the value of the merged token that
holds it (a gather by ``positions``). Mean pooling over the original positions then
equals size-weighted pooling over the merged tokens, so a user's own pooling (with an
attention mask, say) keeps working unchanged. An axis of weights over tokens (an
attention map's keys) is split instead: each original token takes its share, the merged
weight divided by the group's size, so the weights still sum to what they summed to.
"""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .. import merge
from .token_flow import TOKEN, FlowPass, is_weights


class UnmergeOutputs(FlowPass):
    def call(self, gm: GraphModule) -> PassResult:
        graph, modified = gm.graph, False
        output = graph.output_node()
        for node in self.flow.outputs:
            layout = self.flow.layouts[node]
            if not layout.merged:
                continue
            restored = node
            for dim in layout.dims(TOKEN):
                split = layout.size if is_weights(layout.roles[dim]) else None
                with graph.inserting_before(output):
                    restored = graph.call_function(
                        merge.unmerge, (restored, layout.positions, layout.batch_dim(), dim, layout.start, split)
                    )
            restored.meta["val"] = node.meta.get("val")
            output.replace_input_with(node, restored)
            modified = True
        return PassResult(gm, modified)
