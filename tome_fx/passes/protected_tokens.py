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


def count_protected_tokens(stream: Node) -> int:
    """Learned tokens at the front of the first block's residual stream ``stream`` [B, N, C]."""
    return _learned_prefix(stream)


def count_joined_tokens(stream: Node, at_end: bool) -> int:
    """Learned tokens joined by a cat along the tokens (followed back through per-token ops) at
    the front of a residual stream [B, N, C], or with ``at_end`` at its end (YOLOS's detection
    tokens after the patches, a class token before them)."""
    node = stream
    while node.op == "call_function" and node.target in _PER_TOKEN and depends_on_inputs(node):
        data = [a for a in node.args if isinstance(a, Node) and depends_on_inputs(a)]
        if len(data) != 1:
            return 0
        node = data[0]
    if node.op != "call_function" or node.target != aten.cat.default or (node.args[1] if len(node.args) > 1 else 0) % 3 != 1:
        return 0
    joined = 0
    for part in (reversed(node.args[0]) if at_end else node.args[0]):
        if depends_on_inputs(part):
            break
        joined += _tokens(part)
    return joined


def _tokens(node: Node) -> int:
    return tensor_meta(node).shape[1]


def _learned_prefix(node: Node) -> int:
    """How many leading tokens (dim 1) of ``node`` do not depend on the inputs' values."""
    if not depends_on_inputs(node):
        return _tokens(node)
    if node.op != "call_function":
        return 0
    if node.target in _PER_TOKEN:
        data = [a for a in node.args if isinstance(a, Node) and depends_on_inputs(a)]
        return _learned_prefix(data[0]) if len(data) == 1 else 0
    if node.target == aten.slice.Tensor:
        if node.args[1] % 3 != 1:  # a slice of the batch or channels keeps every token
            return _learned_prefix(node.args[0])
        start = node.args[2] if len(node.args) > 2 and node.args[2] else 0
        return max(min(_learned_prefix(node.args[0]) - start, _tokens(node)), 0)
    if node.target == aten.cat.default:
        return _cat_prefix(node)
    return 0


def _cat_prefix(node: Node) -> int:
    parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    if dim % 3 != 1:
        raise UnsupportedModelError(f"{describe(node)}: tokens are assembled along dim {dim}, expected dim 1")
    prefix, complete = 0, True
    for part in parts:
        learned = _learned_prefix(part)
        if not complete and learned == _tokens(part):
            raise UnsupportedModelError(
                f"{describe(node)}: learned tokens are appended after the patch tokens; "
                "only learned tokens in front (class/distillation/register) can be protected"
            )
        if complete:
            prefix += learned
            complete = learned == _tokens(part)
    return prefix
