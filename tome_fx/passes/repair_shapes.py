"""Repair shape arguments that the token count flows into.

A captured graph spells shapes as constants (``reshape(x, [s0, 197, 3, 6, 64])``).
After merging, the token entry must follow the merged tensor instead: it becomes
``sym_size(input, token_dim)``. Which entry is the token entry comes from the
token-flow analysis, never from matching the integer.
"""

from __future__ import annotations

import sys

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .graph_utils import aten
from .token_flow import FlowPass


class RepairShapes(FlowPass):
    def call(self, gm: GraphModule) -> PassResult:
        modified = False
        for fix in self.flow.shape_args:
            source = fix.node.args[0]
            if not self.flow.layouts[source].merged or fix.node.args[1][fix.position] == -1:
                continue
            with gm.graph.inserting_before(fix.node):
                live = gm.graph.call_function(aten.sym_size.int, (source, fix.in_dim))
            shape = list(fix.node.args[1])
            shape[fix.position] = live
            fix.node.update_arg(1, shape)
            modified = True
        for node in self.flow.open_slices:
            if self.flow.layouts[node.args[0]].merged:
                node.update_arg(3, sys.maxsize)
                modified = True
        return PassResult(gm, modified)
