"""Gradient checkpointing, put back after capture: each block's nodes run under
``torch.utils.checkpoint``.

Users turn checkpointing on (timm ``set_grad_checkpointing``, HF
``gradient_checkpointing_enable``) to trade recomputation for activation memory.
``torch.export`` traces through ``torch.utils.checkpoint``, so the captured graph would save
every activation again. This pass cuts the rewritten graph into one piece per block (its
nodes from the first to the last in graph order, merges included) and calls each piece
through ``checkpoint``: backward then keeps only what enters a block and recomputes the
rest, merge and matching included (argsort is deterministic, and the random state is
restored for dropout).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from .find_blocks import AttentionBlock
from .graph_utils import module_path

_PREFIX = "tome_checkpointed_"


class CheckpointedBlock:
    """A block's subgraph, called under ``torch.utils.checkpoint`` while gradients are on
    (non-reentrant: what dynamo and DDP support). Not an ``nn.Module``, so the model's
    modules and state dict stay the original's; the subgraph takes the weights as inputs."""

    def __init__(self, name: str, body: GraphModule):
        self.block, self.body = name, body
        self.__name__ = self.__qualname__ = f"checkpointed_{name.replace('.', '_')}"

    def __call__(self, *args):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.body, *args, use_reentrant=False)
        return self.body(*args)

    def __repr__(self) -> str:
        return f"CheckpointedBlock({self.block!r})"


class CheckpointBlocks(PassBase):
    def __init__(self, blocks: list[AttentionBlock]):
        self.names = [block.name for block in blocks]

    def _pieces(self, gm: GraphModule) -> list[list[Node]]:
        """Each block's span: from its first node to its last (or to the next block's first),
        computations only; weights and constants enter as inputs. A span of consecutive
        nodes is convex, so cutting it out cannot create a cycle."""
        nodes = list(gm.graph.nodes)

        def owns(node: Node, name: str) -> bool:
            path = module_path(node)
            return path == name or path.startswith(name + ".")

        firsts = [next(i for i, n in enumerate(nodes) if owns(n, name)) for name in self.names]
        lasts = [max(i for i, n in enumerate(nodes) if owns(n, name)) for name in self.names]
        ends = [min(last, following - 1) for last, following in zip(lasts, firsts[1:] + [len(nodes)])]
        return [[n for n in nodes[first:end + 1] if n.op == "call_function"] for first, end in zip(firsts, ends)]

    def call(self, gm: GraphModule) -> PassResult:
        pieces = self._pieces(gm)
        fuse_by_partitions(gm, [dict.fromkeys(piece) for piece in pieces], prefix=_PREFIX)
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target.startswith(_PREFIX):
                body = gm.get_submodule(node.target)
                delattr(gm, node.target)
                node.op, node.target = "call_function", CheckpointedBlock(self.names[int(node.target[len(_PREFIX):])], body)
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        """Every block runs checkpointed, and no piece holds weights of its own."""
        wrapped = [n.target for n in gm.graph.nodes if isinstance(n.target, CheckpointedBlock)]
        if [w.block for w in wrapped] != self.names:
            raise AssertionError(f"checkpointed {[w.block for w in wrapped]}, expected {self.names}")
        for piece in wrapped:
            if any(True for _ in piece.body.parameters()) or any(True for _ in piece.body.buffers()):
                raise AssertionError(f"{piece!r} holds weights: they would not be the model's")
