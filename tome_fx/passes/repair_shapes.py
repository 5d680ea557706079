"""Repair shape arguments that the token count flows into.

A captured graph spells shapes as constants (``reshape(x, [s0, 197, 3, 6, 64])``).
After merging, the token entry must follow the merged tensor instead: it becomes
``sym_size(input, token_dim)``. Where the tokens are folded with the batch on one side
(``[197*s0, 384]``) the entry becomes -1, so the view infers it; any other -1 there is
fixed at its captured size (the analysis checked it holds neither batch nor tokens).
Which entry is the token entry comes from the token-flow analysis, never from matching
the integer.
"""

from __future__ import annotations

import operator
import sys

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .graph_utils import aten, tensor_meta
from .token_flow import FlowPass


class RepairShapes(FlowPass):
    def call(self, gm: GraphModule) -> PassResult:
        modified = False
        for fix in self.flow.shape_args:
            source = fix.node.args[0]
            if not self.flow.layouts[source].merged or fix.node.args[1][fix.position] == -1:
                continue
            shape = list(fix.node.args[1])
            if fix.in_dim is None:
                captured = tensor_meta(fix.node).shape
                shape = [captured[k] if entry == -1 else entry for k, entry in enumerate(shape)]
                shape[fix.position] = -1
            else:
                with gm.graph.inserting_before(fix.node):
                    shape[fix.position] = gm.graph.call_function(aten.sym_size.int, (source, fix.in_dim))
            fix.node.update_arg(1, shape)
            modified = True
        for node, dim in self.flow.open_splits:  # [lead, rest] along the tokens: the rest runs to the end
            if self.flow.layouts[node.args[0]].merged:
                lead = node.args[1][0]
                with gm.graph.inserting_before(node):
                    tokens = gm.graph.call_function(aten.sym_size.int, (node.args[0], dim))
                    node.update_arg(1, [lead, gm.graph.call_function(operator.sub, (tokens, lead))])
                modified = True
        for node, index, dim, from_end, entries in self.flow.joint_bounds:  # cuts of a joint sequence
            bound = entries
            with gm.graph.inserting_before(node):
                if from_end:
                    tokens = gm.graph.call_function(aten.sym_size.int, (node.args[0], dim))
                    bound = gm.graph.call_function(operator.sub, (tokens, entries)) if entries else tokens
                if node.target == aten.narrow.default and index == 3:  # narrow's length, not its end
                    bound = gm.graph.call_function(operator.sub, (bound, node.args[2]))
            node.update_arg(index, bound)
            modified = True
        for node, dim, merged in self.flow.joint_splits:  # the merged piece takes what the others leave
            sizes = list(node.args[1])
            with gm.graph.inserting_before(node):
                tokens = gm.graph.call_function(aten.sym_size.int, (node.args[0], dim))
                sizes[merged] = gm.graph.call_function(operator.sub, (tokens, sum(sizes) - sizes[merged]))
            node.update_arg(1, sizes)
            modified = True
        for node in self.flow.open_slices:
            if self.flow.layouts[node.args[0]].merged:
                if node.target == aten.narrow.default:  # its length runs to the end
                    with gm.graph.inserting_before(node):
                        tokens = gm.graph.call_function(aten.sym_size.int, (node.args[0], node.args[1]))
                        node.update_arg(3, gm.graph.call_function(operator.sub, (tokens, node.args[2])))
                else:
                    node.update_arg(3, sys.maxsize)
                modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: GraphModule) -> None:
        """No shape argument over merged tokens still holds the captured token count."""
        for fix in self.flow.shape_args:
            entry = fix.node.args[1][fix.position]
            if self.flow.layouts[fix.node.args[0]].merged and isinstance(entry, int) and entry != -1:
                raise AssertionError(f"{fix.node.name}: shape entry {fix.position} still holds {entry}")
