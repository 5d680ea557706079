"""Proportional attention: add log(size) to the logits of every attention over merged tokens.

For ``scaled_dot_product_attention`` the bias goes into ``attn_mask`` (combined with a
mask already there); for a manual attention it is added to the softmax input.
"""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .. import merge
from .graph_utils import aten, tensor_meta
from .token_flow import FlowPass


class ProportionalAttention(FlowPass):
    def call(self, gm: GraphModule) -> PassResult:
        graph, modified = gm.graph, False
        for softmax, dim in self.flow.softmaxes:
            logits = softmax.args[0]
            layout = self.flow.layouts[logits]
            if not layout.merged:
                continue
            with graph.inserting_before(softmax):
                batch_dim, inner = layout.batch_axis()
                bias = graph.call_function(
                    merge.log_size_bias,
                    (layout.size, logits, batch_dim, dim, layout.start, inner, layout.lead, layout.trail),
                )
                softmax.update_arg(0, graph.call_function(aten.add.Tensor, (logits, bias)))
            modified = True
        for sdpa in self.flow.sdpas:
            query, keys = sdpa.args[0], sdpa.args[1]
            layout = self.flow.layouts[keys]
            if not layout.merged:
                continue
            mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
            batch_dim, inner = layout.batch_axis()
            with graph.inserting_before(sdpa):
                bias = graph.call_function(
                    merge.log_size_bias,
                    (layout.size, query, batch_dim, tensor_meta(query).dim() - 1, layout.start, inner,
                     layout.lead, layout.trail),
                )
                mask = graph.call_function(merge.add_attention_bias, (mask, bias))
            if len(sdpa.args) > 3:
                sdpa.update_arg(3, mask)
            else:
                sdpa.update_kwarg("attn_mask", mask)
            modified = True
        return PassResult(gm, modified)
