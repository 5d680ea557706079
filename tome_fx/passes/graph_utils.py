"""Small helpers over torch.fx graphs shared by the passes."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.fx import Node

from ..errors import UnsupportedModelError

aten = torch.ops.aten

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


def is_symbolic(dim) -> bool:
    return not isinstance(dim, int)


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if path]
    return paths[-1] if paths else ""


def describe(node: Node) -> str:
    """Where a node comes from, for error messages: module path and graph node."""
    path = module_path(node)
    return f"{f'block {path}' if path else 'model top level'} (graph node '{node.name}')"


def input_nodes(node: Node) -> Iterator[Node]:
    """Every Node among a node's args and kwargs, nested lists included, in order."""
    yield from _flatten_nodes((node.args, node.kwargs))


def _flatten_nodes(value) -> Iterator[Node]:
    if isinstance(value, Node):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten_nodes(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten_nodes(item)


def ancestors(node: Node) -> set[Node]:
    seen: set[Node] = set()
    stack = [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def depends_on_inputs(node: Node) -> bool:
    """True when a node's *values* depend on a user input; reading only an input's
    shape (``sym_size``, e.g. to expand a class token to the batch) does not count."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return True
        if current.op == "call_function" and current.target == aten.sym_size.int:
            continue
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return False
