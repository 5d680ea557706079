"""Writes into slices of a fresh tensor, made functional before the analysis reads the graph.

``out = torch.empty_like(x); out[..., 0::2] = a; out[..., 1::2] = b`` (Wan's rotary
embedding) is captured as ``copy_`` into slice views of ``out``: the values reach ``out``'s
readers through a mutation, not an edge, so the token-flow analysis would not see them.
Each such write becomes ``slice_scatter`` (``out = out.slice_scatter(a, ...)``), and ``out``'s
readers read the last one: the same values, now on the graph's edges. Only the plain pattern
is rewritten -- a tensor made fresh (``empty_like`` and kin), written through direct slices
each used by one ``copy_``, read only after the last write; any other mutation is left for
the analysis to refuse.

A whole write, ``x.copy_(y)`` with ``y`` of ``x``'s shape and dtype (MViTv2 adds its relative
positions to a view of its logits and copies them back), becomes ``y`` itself where nothing
reads ``x`` or a view of it after the write, and ``x`` is computed in the graph, no view of
another tensor.
"""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .graph_utils import aten

# ops whose result may share memory with their first operand
_VIEWING = {aten.alias.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor,
            aten.select.int, aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim,
            aten.expand.default, aten.as_strided.default, aten.t.default, aten.flatten.using_ints,
            aten.unflatten.int, aten.narrow.default, aten.diagonal.default}
_FRESH = {aten.empty_like.default, aten.zeros_like.default, aten.new_empty.default, aten.new_zeros.default,
          aten.empty.memory_format, aten.zeros.default}


class FunctionalWrites(PassBase):
    def call(self, gm: GraphModule) -> PassResult:
        graph, modified = gm.graph, False
        for base in [n for n in graph.nodes if n.op == "call_function" and n.target in _FRESH]:
            order = {node: i for i, node in enumerate(graph.nodes)}  # the rewrites of earlier bases added nodes
            writes = [(view, next(iter(view.users))) for view in base.users
                      if view.target == aten.slice.Tensor and len(view.users) == 1
                      and next(iter(view.users)).target == aten.copy_.default and next(iter(view.users)).args[0] is view]
            readers = [u for u in base.users if u not in {view for view, _ in writes}]
            if not writes or any(order[r] < max(order[c] for _, c in writes) for r in readers):
                continue
            current = base
            for view, copy in sorted(writes, key=lambda w: order[w[1]]):
                with graph.inserting_after(copy):
                    current = graph.call_function(aten.slice_scatter.default, (current, copy.args[1], *view.args[1:]))
                current.meta["val"] = base.meta.get("val")
            for reader in readers:
                reader.replace_input_with(base, current)
            for view, copy in writes:
                graph.erase_node(copy)
                graph.erase_node(view)
            modified = True
        modified |= self._whole_writes(graph)
        if modified:
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    @staticmethod
    def _whole_writes(graph) -> bool:
        order = {node: i for i, node in enumerate(graph.nodes)}
        modified = False
        for copy in [n for n in graph.nodes if n.op == "call_function" and n.target == aten.copy_.default]:
            dst, src = copy.args[:2]
            if (dst.op != "call_function" or dst.target in _VIEWING or "val" not in dst.meta or "val" not in src.meta
                    or dst.meta["val"].shape != src.meta["val"].shape or dst.meta["val"].dtype != src.meta["val"].dtype):
                continue
            aliases, stack = {dst}, [dst]
            while stack:  # views of dst, which would see the write too
                for user in stack.pop().users:
                    if user.op == "call_function" and user.target in _VIEWING and user not in aliases:
                        aliases.add(user)
                        stack.append(user)
            if any(order[user] > order[copy] for a in aliases for user in a.users if user is not copy):
                continue
            copy.replace_all_uses_with(src)
            graph.erase_node(copy)
            modified = True
        return modified
