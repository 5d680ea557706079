"""Writes into slices of a fresh tensor, made functional before the analysis reads the graph.

``out = torch.empty_like(x); out[..., 0::2] = a; out[..., 1::2] = b`` (Wan's rotary
embedding) is captured as ``copy_`` into slice views of ``out``: the values reach ``out``'s
readers through a mutation, not an edge, so the token-flow analysis would not see them.
Each such write becomes ``slice_scatter`` (``out = out.slice_scatter(a, ...)``), and ``out``'s
readers read the last one: the same values, now on the graph's edges. Only the plain pattern
is rewritten -- a tensor made fresh (``empty_like`` and kin), written through direct slices
each used by one ``copy_``, read only after the last write; any other mutation is left for
the analysis to refuse.
"""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .graph_utils import aten

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
        if modified:
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
