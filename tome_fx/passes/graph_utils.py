"""Small helpers over torch.fx graphs shared by the passes."""

from __future__ import annotations

import contextlib
import copy
import operator

import torch
from torch.fx import Graph, GraphModule, Node

from ..errors import UnsupportedModelError

aten = torch.ops.aten
# ops that only reinterpret a tensor's shape (reshape, view): the same data, other dims
VIEWS = frozenset({aten.reshape.default, aten.view.default, aten._unsafe_view.default})

# stands in for a symbolic (batch) size when shapes are compared by their products
_SYMBOL_STAND_IN = 1_000_003


def tensor_meta(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def concrete(dim) -> int:
    """An int for a dim; symbolic dims (the batch) become a large stand-in value."""
    if isinstance(dim, int):
        return dim
    expr = dim.node.expr
    return int(expr.subs({s: _SYMBOL_STAND_IN for s in expr.free_symbols}))


def shape_of(node: Node) -> tuple[int, ...]:
    val = tensor_meta(node)
    if val is None:
        raise UnsupportedModelError(f"{describe(node)}: no shape was recorded when the model was captured")
    return tuple(concrete(d) for d in val.shape)


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if path]
    return paths[-1] if paths else ""


def describe(node: Node) -> str:
    """Where a node comes from, for error messages: module path and graph node."""
    path = module_path(node)
    return f"{f'block {path}' if path else 'model top level'} (graph node '{node.name}')"


@contextlib.contextmanager
def at_node(node: Node, doing: str, expected: tuple[type[Exception], ...] = ()):
    """Any exception but a refusal (or one of ``expected``), raised while ``doing`` something
    with ``node``, surfaces as an ``UnsupportedModelError`` naming the node: a bug in tome_fx,
    never a raw crash."""
    try:
        yield
    except (UnsupportedModelError, *expected):
        raise
    except Exception as error:
        raise UnsupportedModelError(
            f"{describe(node)}: tome_fx failed while {doing} `{node.target}` ({type(error).__name__}: {error}); "
            "this is a bug in tome_fx, please report it with this message"
        ) from error


def ancestors(node: Node, stop=lambda n: False) -> set[Node]:
    """Every node ``node`` depends on; the inputs of nodes where ``stop`` holds are not followed."""
    seen: set[Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current is not node and stop(current):
            continue
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def descendants(node: Node) -> set[Node]:
    """Every node that depends on ``node``."""
    seen: set[Node] = set()
    stack = [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


_ASSERTIONS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}


def is_assertion(node: Node) -> bool:
    """A check export recorded (dtype/device asserts): no value flows out of it."""
    return node.op == "call_function" and node.target in _ASSERTIONS


def evaluate_constant(gm: torch.fx.GraphModule, node: Node, batch: int) -> torch.Tensor:
    """Compute a node whose value does not depend on the inputs' values (only, at most, on
    their shapes), with every placeholder a zero tensor of the captured shape at ``batch``."""
    needed = ancestors(node) | {node}
    env: dict[Node, object] = {}
    for current in gm.graph.nodes:
        if current not in needed:
            continue
        if current.op == "placeholder":
            val = current.meta["val"]
            shape = [d if isinstance(d, int) else batch for d in val.shape]
            env[current] = torch.zeros(shape, dtype=val.dtype, device=val.device)
        elif current.op == "get_attr":
            env[current] = operator.attrgetter(current.target)(gm)
        elif current.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((current.args, current.kwargs), env.__getitem__)
            env[current] = current.target(*args, **kwargs)
        else:
            raise UnsupportedModelError(f"{describe(current)}: cannot evaluate `{current.op}` nodes ahead of time")
    return env[node]


def is_parameter(node: Node) -> bool:
    """``node`` reads a parameter of its graph's module (learned; not a buffer or a constant)."""
    module = node.graph.owning_module
    if node.op != "get_attr" or module is None:
        return False
    try:
        module.get_parameter(node.target)
        return True
    except AttributeError:
        return False


def _reads_shape_only(node: Node) -> bool:
    return node.op == "call_function" and node.target == aten.sym_size.int


def depends_on_inputs(node: Node) -> bool:
    """True when a node's *values* depend on a user input; reading only an input's
    shape (``sym_size``, e.g. to expand a class token to the batch) does not count."""
    return node.op == "placeholder" or any(n.op == "placeholder" for n in ancestors(node, _reads_shape_only))


def graph_copy(gm: GraphModule) -> GraphModule:
    """A GraphModule with its own copy of ``gm``'s graph (to rewrite apart), sharing ``gm``'s
    parameters and buffers."""
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = copy.copy(gm.graph._codegen)  # its pytree_info is replaced, never changed in place
    return GraphModule(gm, graph)


def reads_values(user: Node, node: Node) -> bool:
    """Whether ``user`` reads ``node``'s values, not only its dtype (``y.type_as(node)``, as
    diffusers casts back after float32 norms and attention)."""
    return not (user.op == "call_function" and user.target == aten.type_as.default and user.args[0] is not node)


def einsum_letters(node: Node) -> tuple[list[str], str]:
    """The letters of each operand of an ``aten.einsum`` node, one per dim, and of its output:
    an ellipsis becomes letters of its own (right-aligned, as einsum broadcasts it), an
    implicit output the letters that appear once, in order (with the ellipsis first)."""
    equation = node.args[0].replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    parts = inputs.split(",")
    ranks = [len(tensor_meta(t).shape) for t in node.args[1]]
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    width = max([rank - len(part.replace("...", "")) for part, rank in zip(parts, ranks) if "..." in part] or [0])
    ellipsis = "".join(spare[:width])
    operands = [part.replace("...", ellipsis[width - (rank - len(part) + 3):]) if "..." in part else part
                for part, rank in zip(parts, ranks)]
    if arrow:
        return operands, output.replace("...", ellipsis)
    once = sorted(c for c in set("".join(parts).replace(".", "")) if "".join(parts).count(c) == 1)
    return operands, ellipsis + "".join(once)
