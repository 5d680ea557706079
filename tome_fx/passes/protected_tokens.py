"""Count the protected tokens: learned tokens put in front of the patch tokens (or after them).

Class, distillation and register tokens are parameters concatenated along the token
axis before the first block. They are found structurally -- the leading positions of
the stream whose values do not depend on the model inputs, followed back through
``cat``, token slices and per-token ops (position add, layer norm, dropout) -- and
must never merge.
"""

from __future__ import annotations

from torch.fx import Node

from ..errors import UnsupportedModelError
from .graph_utils import aten, depends_on_inputs, describe, tensor_meta

# ops that act on each token on its own: the learned prefix of their data operand survives
_PER_TOKEN = {
    aten.add.Tensor,
    aten.mul.Tensor,
    aten.dropout.default,
    aten.clone.default,
    aten._to_copy.default,
    aten.layer_norm.default,
}


def count_protected_tokens(stream: Node, appended: bool = False) -> int:
    """Learned tokens at the front of the first block's residual stream ``stream`` [B, N, C];
    ``appended``: learned tokens after the patches are let be (per-block merging keeps them out
    too, ``count_appended_tokens``), else refused."""
    return _learned_prefix(stream, appended)


def count_appended_tokens(stream: Node) -> int:
    """Learned tokens joined after the patches by a cat along the tokens (YOLOS's detection
    tokens), followed back through per-token ops."""
    node = stream
    while node is not None and node.op == "call_function" and node.target in _PER_TOKEN and depends_on_inputs(node):
        node = _data_operand(node)
    if node is None or node.op != "call_function" or node.target != aten.cat.default or _cat_dim(node) % 3 != 1:
        return 0
    appended = 0
    for part in reversed(node.args[0]):
        if depends_on_inputs(part):
            break
        appended += _tokens(part)
    return appended


def _tokens(node: Node) -> int:
    return tensor_meta(node).shape[1]


def _data_operand(node: Node) -> Node | None:
    """The one operand of a per-token op that depends on the inputs (the others are learned)."""
    data = [a for a in node.args if isinstance(a, Node) and depends_on_inputs(a)]
    return data[0] if len(data) == 1 else None


def _cat_dim(node: Node) -> int:
    return node.args[1] if len(node.args) > 1 else 0


def _learned_prefix(node: Node, appended: bool) -> int:
    """How many leading tokens (dim 1) of ``node`` do not depend on the inputs' values."""
    if not depends_on_inputs(node):
        return _tokens(node)
    if node.op != "call_function":
        return 0
    if node.target in _PER_TOKEN:
        data = _data_operand(node)
        return _learned_prefix(data, appended) if data is not None else 0
    if node.target == aten.slice.Tensor:
        if node.args[1] % 3 != 1:  # a slice of the batch or channels keeps every token
            return _learned_prefix(node.args[0], appended)
        start = node.args[2] if len(node.args) > 2 and node.args[2] else 0
        return max(min(_learned_prefix(node.args[0], appended) - start, _tokens(node)), 0)
    if node.target == aten.cat.default:
        return _cat_prefix(node, appended)
    return 0


def _cat_prefix(node: Node, appended: bool) -> int:
    parts, dim = node.args[0], _cat_dim(node)
    if dim % 3 != 1:
        raise UnsupportedModelError(f"{describe(node)}: tokens are assembled along dim {dim}, expected dim 1")
    prefix, complete = 0, True
    for part in parts:
        learned = _learned_prefix(part, appended)
        if not complete and learned == _tokens(part) and not appended:
            raise UnsupportedModelError(
                f"{describe(node)}: learned tokens are appended after the patch tokens; "
                "only learned tokens in front (class/distillation/register) can be protected"
            )
        if complete:
            prefix += learned
            complete = learned == _tokens(part)
    return prefix
