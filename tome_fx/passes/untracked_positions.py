"""The forward graph: a copy of the rewritten graph without the token-state outputs
(``forward`` returns the model's outputs alone), whose merges skip the position
bookkeeping that nothing then reads.

A merge follows where every original token sits (``positions``), for un-merging,
attention masks, rotary tables and ``forward_with_tokens``. Where none of them reads
the positions, following them is about a quarter of a merge's ops, and at batch 1 a
merge's time is its op count. Each merge whose positions only the next merge reads,
and that reads its own only to pass them on (no mask), is given none: it then returns
None for them (``merge.tome_merge``).
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import merge
from .graph_utils import graph_copy


def forward_graph(gm: GraphModule) -> GraphModule:
    """``gm`` (outputs ``(outputs, size, positions)``, as ``apply_tome`` leaves it) as a new
    GraphModule sharing its weights, returning the outputs alone and tracking positions
    only where something reads them."""
    lean = graph_copy(gm)
    DropStateOutputs()(lean)
    UntrackPositions()(lean)
    lean.recompile()
    return lean


class DropStateOutputs(PassBase):
    """The outputs ``(outputs, size, positions)`` become ``outputs``; what computed the
    state for them alone goes too (the raster order of ``unmerge_outputs=False``)."""

    def call(self, gm: GraphModule) -> PassResult:
        output = gm.graph.output_node()
        codegen = gm.graph._codegen
        info = codegen.pytree_info
        original = info.out_spec.child(0)
        dropped = output.args[0][original.num_leaves:]
        output.update_arg(0, tuple(output.args[0][: original.num_leaves]))
        codegen.pytree_info = info._replace(out_spec=original)
        unread, erased = [node for node in dropped if isinstance(node, Node)], set()
        while unread:
            node = unread.pop()
            if node in erased or node.users or node.op != "call_function" or node.is_impure():
                continue
            unread += node.all_input_nodes
            gm.graph.erase_node(node)
            erased.add(node)
        return PassResult(gm, modified=True)


class UntrackPositions(PassBase):
    """From the last merge back: a merge without masks whose positions nothing reads takes
    None for its own, and what computed those goes if nothing else reads it."""

    def call(self, gm: GraphModule) -> PassResult:
        merges = gm.graph.find_nodes(op="call_function", target=merge.tome_merge)
        modified = False
        for step in reversed(merges):
            mask, key_masks = step.args[7], step.args[8]
            out = [u for u in step.users if u.target is operator.getitem and u.args[1] == 2]
            if mask is not None or key_masks or any(u.users for u in out):
                break  # this merge's positions are read: so are those of every merge before it
            for user in out:
                gm.graph.erase_node(user)
            held = step.args[3]
            step.update_arg(3, None)
            if not held.users:
                gm.graph.erase_node(held)
            modified = True
        return PassResult(gm, modified=modified)

    def ensures(self, gm: GraphModule) -> None:
        """Positions stay followed up to the last merge whose positions are read."""
        merges = gm.graph.find_nodes(op="call_function", target=merge.tome_merge)
        untracked = [step.args[3] is None for step in merges]
        if untracked != sorted(untracked):
            raise AssertionError("a merge follows positions after one that does not")
