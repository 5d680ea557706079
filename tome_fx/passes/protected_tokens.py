"""Count the protected tokens: learned tokens put in front of the patch tokens.

Class, distillation and register tokens are parameters concatenated along the token
axis before the first block. They are found structurally -- a ``cat`` whose operands
do not depend on the model inputs -- and must never merge.
"""

from __future__ import annotations

from torch.fx import Node

from ..errors import UnsupportedModelError
from .graph_utils import aten, depends_on_inputs, describe, tensor_meta

_ELEMENTWISE_TO_INPUT = {aten.add.Tensor, aten.dropout.default, aten.clone.default, aten._to_copy.default}


def count_protected_tokens(stream: Node) -> int:
    """Learned tokens at the front of the first block's residual stream ``stream`` [B, N, C]."""
    node = stream
    while node.op == "call_function" and node.target in _ELEMENTWISE_TO_INPUT:
        data = [a for a in node.args if isinstance(a, Node) and depends_on_inputs(a)]
        if len(data) != 1:
            return 0
        node = data[0]
    if node.op != "call_function" or node.target != aten.cat.default:
        return 0
    parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    if dim % 3 != 1:
        raise UnsupportedModelError(f"{describe(node)}: tokens are assembled along dim {dim}, expected dim 1")
    protected, seen_data = 0, False
    for part in parts:
        if depends_on_inputs(part):
            seen_data = True
        elif seen_data:
            raise UnsupportedModelError(
                f"{describe(node)}: learned tokens are appended after the patch tokens; "
                "only learned tokens in front (class/distillation/register) can be protected"
            )
        else:
            protected += tensor_meta(part).shape[1]
    return protected
