"""Insert a ToMe merge after the attention residual add of every block with r > 0 (after
the cut of it holding the stream's own tokens, where the block joins another stream in).

The merge node (``tome_fx.merge.tome_merge``) takes the block's residual output, the
keys its attention used, the running ``size`` and ``positions`` (where each
original token now sits), the shared attention mask if there is one, and the masks over
keys of attentions outside the blocks (a pooling head's); every later use of the residual
output reads the merged tokens instead.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import merge
from .find_blocks import AttentionBlock
from .token_flow import BATCH, TOKEN, Layout


@dataclass
class MergeNodes:
    seeds: dict[Node, Layout]  # merged token tensors (and the first stream) with their layouts
    size: Node | None  # size after the last merge
    positions: Node | None  # positions after the last merge


class InsertMerges(PassBase):
    def __init__(self, blocks: list[AttentionBlock], schedule: list[int], protected: int, mask: Node | None,
                 key_masks: tuple[tuple[Node, int], ...] = (), method: str = "tome"):
        super().__init__()
        self.blocks, self.schedule, self.protected, self.mask = blocks, schedule, protected, mask
        self.method = method  # the merge policy (``merge.POLICIES``)
        self.key_masks = key_masks  # (mask over keys outside the blocks, entries per sample on its first dim)
        self.result: MergeNodes | None = None

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        stream = self.blocks[0].stream
        seeds = {stream: Layout((BATCH, TOKEN, None), size=None)}
        with graph.inserting_after(stream):
            size = graph.call_function(merge.initial_size, (stream,))
        with graph.inserting_after(size):
            positions = graph.call_function(merge.initial_positions, (stream,))
        for index, (block, r) in enumerate(zip(self.blocks, self.schedule)):
            if r == 0:
                continue
            residual = block.merge_point
            args = (residual, block.keys, size, positions, r, self.protected, block.key_token_dim, self.mask,
                    self.key_masks, *block.key_span, self.method, index / len(self.blocks))
            with graph.inserting_after(residual):
                step = graph.call_function(merge.tome_merge, args)
            with graph.inserting_after(step):
                merged = graph.call_function(operator.getitem, (step, 0))
            # the analysis reads every node's shape as captured (before any merge); so does this one
            merged.meta["val"] = residual.meta["val"]
            with graph.inserting_after(merged):
                size = graph.call_function(operator.getitem, (step, 1))
            with graph.inserting_after(size):
                positions = graph.call_function(operator.getitem, (step, 2))
            residual.replace_all_uses_with(merged, delete_user_cb=lambda user: user is not step)
            seeds[merged] = Layout((BATCH, TOKEN, None), size=size, positions=positions)
        self.result = MergeNodes(seeds, size, positions)
        return PassResult(gm, modified=True)

    def ensures(self, gm: GraphModule) -> None:
        """Every merge reads the size and positions that the one before it wrote (the first, the
        initial ones)."""
        merges = gm.graph.find_nodes(op="call_function", target=merge.tome_merge)
        for before, step in zip([None, *merges], merges):
            size, positions = step.args[2], step.args[3]
            if before is None:
                threaded = size.target is merge.initial_size and positions.target is merge.initial_positions
            else:
                threaded = size.args[0] is before and positions.args[0] is before
            if not threaded:
                raise AssertionError(f"{step.name} does not read the size and positions of the merge before it")
