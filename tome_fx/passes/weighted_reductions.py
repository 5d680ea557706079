"""Weight reductions over tokens by size, so a merged token counts once per token it holds.

A mean over tokens becomes the size-weighted mean; a sum over tokens, or a matmul that
contracts them (a Gram matrix ``x^T x``, second-order pooling), reads its operand
scaled by size (channel attention's queries, when sdpa contracts the tokens: Florence-2's DaViT);
a p-norm over them (XCiT's), scaled by size ** (1 / p). Which reductions need it comes from the token-flow analysis: sums over
weights over tokens (attention's weights x values) are exact as they are.
"""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .. import merge
from .graph_utils import aten, tensor_meta
from .token_flow import FlowPass


class WeightedReductions(FlowPass):
    def call(self, gm: GraphModule) -> PassResult:
        graph, modified = gm.graph, False
        for weighting in self.flow.weightings:
            node = weighting.node
            operands = list(node.args[1]) if node.target == aten.einsum.default else node.args
            tokens = operands[weighting.operand]
            layout = self.flow.layouts[tokens]
            if not layout.merged:
                continue
            where = (layout.batch_dim(), weighting.token_dim, layout.start)
            with graph.inserting_before(node):
                if weighting.mean:
                    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
                    weight = graph.call_function(merge.size_bias, (layout.size, len(layout.roles), *where))
                    # rewritten in place: the analysis's records (a returned mean, say) still name it
                    node.target, node.args, node.kwargs = merge.weighted_mean, (tokens, weight, list(node.args[1]), keepdim), {}
                else:
                    scaled = graph.call_function(merge.scale_by_size, (tokens, layout.size, *where, weighting.power))
                    if node.target == aten.scaled_dot_product_attention.default and node.kwargs.get("scale") is None:
                        # channel attention: its default scale reads the (merged) token count; keep the captured one
                        node.update_kwarg("scale", tensor_meta(tokens).shape[-1] ** -0.5)
                    if node.target == aten.einsum.default:
                        operands[weighting.operand] = scaled
                        node.update_arg(1, operands)
                    else:
                        node.update_arg(weighting.operand, scaled)
            modified = True
        return PassResult(gm, modified)
