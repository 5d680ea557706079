"""Proportional attention: add log(size) to the logits of every attention over merged tokens.

A ``scaled_dot_product_attention`` call becomes ``merge.proportional_sdpa``, which adds it to
the mask (the call's own, if any) or, without one, folds it into the keys (``form="flash"``,
chosen by ``"auto"`` where FlashAttention would run), since a float mask rules that kernel
out. For a manual attention it is added to the softmax input.
"""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .. import merge
from .graph_utils import aten
from .token_flow import FlowPass, TokenFlow


def form_of(prop_attn: bool | str) -> str | None:
    """The sdpa form that ``prop_attn`` (True, False, or one of ``merge.PROP_ATTN_FORMS``) asks
    for: None for off, ``"auto"`` for True."""
    if prop_attn is True or prop_attn is False:
        return "auto" if prop_attn else None
    if prop_attn not in merge.PROP_ATTN_FORMS:
        raise ValueError(f"prop_attn is True, False or one of {list(merge.PROP_ATTN_FORMS)}, not {prop_attn!r}")
    return prop_attn


def _argument(node, index: int, name: str, default):
    """An sdpa argument given by position or keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


class ProportionalAttention(FlowPass):
    def __init__(self, flow: TokenFlow, form: str = "auto"):
        super().__init__(flow)
        self.form = form  # of sdpa without a mask (``merge.PROP_ATTN_FORMS``)

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
            batch_dim, inner = layout.batch_axis()
            sdpa.target = merge.proportional_sdpa
            sdpa.args = (query, keys, sdpa.args[2], layout.size, batch_dim, layout.start, inner, layout.lead,
                         layout.trail, _argument(sdpa, 4, "dropout_p", 0.0), _argument(sdpa, 5, "is_causal", False),
                         sdpa.kwargs.get("scale"), sdpa.kwargs.get("enable_gqa", False), self.form,
                         _argument(sdpa, 3, "attn_mask", None))
            sdpa.kwargs = {}
            modified = True
        return PassResult(gm, modified)
