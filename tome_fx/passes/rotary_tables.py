"""Rotary terms for merged tokens: a per-token table read per merged token.

RoPE models (timm EVA-02 and rope-vit, HF DINOv3) multiply queries and keys by cos/sin
tables with one row per patch. A merged token stands for several patches; ``rope`` says
which rotation it gets (``merge.restage_table``):

- ``"mean"``: the size-weighted mean of its patches' rows, so its logit with any query is
  the mean of what its patches' logits were (for identical keys). The default: on the
  Fashion-MNIST RoPE model it loses less accuracy (benchmarks/rope.py).
- ``"representative"``: the row of its first patch (raster order).

Neither is exact; the token-flow analysis accepts a table only where it multiplies
queries or keys alone and is shared by the batch (a buffer, or computed from position inputs
as FLUX's ids). In joint attention the rows of the other stream's tokens stay as they are.
"""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .. import merge
from .token_flow import TOKEN, FlowPass, TokenFlow

RULES = ("mean", "representative")


class RestageTables(FlowPass):
    def __init__(self, flow: TokenFlow, rule: str):
        super().__init__(flow)
        self.rule = rule

    def call(self, gm: GraphModule) -> PassResult:
        graph, modified = gm.graph, False
        for node, table, layout in self.flow.tables:
            if not layout.merged:
                continue
            (token_dim,) = layout.dims(TOKEN)
            batch_dim, inner = layout.batch_axis()
            with graph.inserting_before(node):
                current = graph.call_function(merge.restage_table, (
                    table, layout.positions, layout.size, len(layout.roles), batch_dim, token_dim,
                    layout.start, self.rule, layout.lead, layout.trail, inner))
            node.replace_input_with(table, current)
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: GraphModule) -> None:
        """Every table meeting merged tokens is read per merged token."""
        for node, table, layout in self.flow.tables:
            if layout.merged and table in node.all_input_nodes:
                raise AssertionError(f"{node.name}: still reads the table {table.name} over the original tokens")

