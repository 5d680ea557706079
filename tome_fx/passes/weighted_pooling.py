"""Make token-average pooling size-weighted, so a merged token counts once per patch."""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .. import merge
from .token_flow import FlowPass


class WeightedPooling(FlowPass):
    def call(self, gm: GraphModule) -> PassResult:
        graph, modified = gm.graph, False
        for mean, token_dim in self.flow.pools:
            tokens = mean.args[0]
            layout = self.flow.layouts[tokens]
            if not layout.merged:
                continue
            keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
            with graph.inserting_before(mean):
                weight = graph.call_function(
                    merge.size_bias, (layout.size, len(layout.roles), layout.batch_dim(), token_dim, layout.start)
                )
                pooled = graph.call_function(merge.weighted_mean, (tokens, weight, list(mean.args[1]), keepdim))
            mean.replace_all_uses_with(pooled)
            graph.erase_node(mean)
            modified = True
        return PassResult(gm, modified)
