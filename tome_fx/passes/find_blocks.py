"""Find attention blocks by graph structure (not by module names).

An attention block is: an attention op -- aten ``scaled_dot_product_attention``, or
``matmul -> (scale/mask/cast) -> softmax -> (dropout/cast) -> matmul`` (or einsums) -- whose keys
come from the residual stream, and the residual ``add`` that brings its output back
into that stream. The merge goes right after that add, before the MLP branch. An attention
whose residual stream feeds its queries but not its keys is cross-attention (keys from
text, say): not a block of its own. Nor is attention pooling (SigLIP's MAP head): learned
queries that no input feeds, attending over the tokens with no residual around it; the
token-flow analysis gives it proportional attention over its (merged) keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Graph, Node

from ..errors import UnsupportedModelError
from .graph_utils import aten, ancestors, depends_on_inputs, describe, is_assertion, module_path, tensor_meta

SDPA = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
EINSUM = aten.einsum.default
# ops allowed between the scores matmul and the softmax, and between softmax and the value matmul
_LOGIT_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar}
_PASS_THROUGH = {aten.dropout.default, aten._to_copy.default, aten.to.dtype, aten.type_as.default, aten.clone.default}
# views of the logits (SAM adds its decomposed relative positions on a [q_h, q_w, k_h, k_w] view)
_LOGIT_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
RESIDUAL_ADD = {aten.add.Tensor, aten.add_.Tensor}


@dataclass(frozen=True)
class AttentionBlock:
    name: str
    attention: Node  # the sdpa node, or the softmax of a manual attention
    output: Node  # the attention's output (sdpa node, or the value matmul)
    keys: Node  # key operand as the attention consumes it
    key_token_dim: int  # tokens of ``keys``: -2 for sdpa keys, -1 for k^T in q @ k^T
    stream: Node  # residual stream entering the block
    residual: Node  # residual add after the attention: the merge point
    masks: tuple[tuple[Node, Node], ...] = ()  # (node applying it, mask): sdpa attn_mask, or added to logits
    not_one_sequence: str | None = None  # why its keys are not one [batch, heads, tokens, dim] sequence


_MASKING = {aten.add.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar}


def _walk_back(node: Node, through: set) -> tuple[Node, list[tuple[Node, Node]]]:
    """Follow the first operand back through ``through``; also the tensors added or masked in."""
    masks = []
    while node.op == "call_function" and node.target in through:
        if node.target in _MASKING and isinstance(node.args[1], Node):
            masks.append((node, node.args[1]))
        node = node.args[0]
    return node, masks


def _consumers(node: Node, through: set) -> list[tuple[Node, Node]]:
    """The users of ``node`` past any chain of ``through`` ops, each with the operand it reads."""
    found, stack = [], [node]
    while stack:
        current = stack.pop()
        for user in current.users:
            if is_assertion(user):
                continue
            if user.op == "call_function" and user.target in through:
                stack.append(user)
            else:
                found.append((user, current))
    return found


def _operands(node: Node) -> list:
    """The tensor operands of a matmul or a two-operand einsum."""
    if node.op != "call_function":
        return []
    if node.target in MATMUL:
        return list(node.args[:2])
    if node.target == EINSUM and len(node.args[1]) == 2:
        return list(node.args[1])
    return []


def _key_token_dim(scores: Node) -> int:
    """Where the keys operand of the scores holds the tokens: the logits' last axis."""
    if scores.target in MATMUL:
        return -1  # q @ k^T
    inputs, output = scores.args[0].replace(" ", "").split("->")
    keys = inputs.split(",")[1]
    return keys.index(output[-1]) - len(keys)


def manual_attention(softmax: Node) -> tuple[Node, Node, int, Node, list[tuple[Node, Node]]] | None:
    """(queries, keys operand, its token dim, output, masks) of ``matmul -> softmax -> matmul`` (or
    einsums), or None. The weights may have other users too (a returned attention map): the
    token-flow analysis rules on them."""
    scores, masks = _walk_back(softmax.args[0], _LOGIT_OPS | _PASS_THROUGH | _LOGIT_VIEWS)
    if len(_operands(scores)) != 2:
        return None
    values = [user for user, read in _consumers(softmax, _PASS_THROUGH) if _operands(user)[:1] == [read]]
    if len(values) != 1:
        return None
    queries, keys = _operands(scores)
    return queries, keys, _key_token_dim(scores), values[0], masks


def _residual_add(output: Node, keys: Node, graph_order: dict[Node, int]) -> tuple[Node, Node] | None:
    """First add downstream of ``output`` whose other operand is an ancestor of the keys."""
    key_ancestors = ancestors(keys) | {keys}
    frontier, seen, candidates = [output], {output}, []
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            frontier.append(user)
            if user.op == "call_function" and user.target in RESIDUAL_ADD:
                candidates.append(user)
    for add in sorted(candidates, key=graph_order.__getitem__):
        for mine, other in (add.args[:2], add.args[1::-1]):
            if isinstance(other, Node) and mine in seen | {output} and other in key_ancestors:
                return add, other
    return None


def in_scope(path: str, scope: tuple[str, ...]) -> bool:
    """``path`` is one of the module paths in ``scope`` or under one; every path is, without a scope."""
    return not scope or any(path == s or path.startswith(s + ".") for s in scope)


def find_attention_blocks(graph: Graph, scope: tuple[str, ...] = ()) -> list[AttentionBlock]:
    """The attention blocks in graph order; with ``scope`` (module paths), only those under it:
    attention elsewhere is left as captured, unexamined."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    blocks: list[AttentionBlock] = []
    for node in graph.nodes:
        if node.op != "call_function" or not in_scope(module_path(node), scope):
            continue
        if node.target in SDPA:
            queries, keys, key_token_dim, output = node.args[0], node.args[1], -2, node
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            masks = [(node, mask)] if isinstance(mask, Node) else []
        elif node.target in SOFTMAX:
            found = manual_attention(node)
            if found is None:
                continue
            queries, keys, key_token_dim, output, masks = found
        else:
            continue
        found = _residual_add(output, keys, order)
        if found is None and _residual_add(output, queries, order) is not None:
            continue  # cross-attention: keys from another sequence (text); its queries are followed as tokens
        if found is None and not depends_on_inputs(queries):
            continue  # attention pooling: learned queries (a MAP head) read the tokens as keys and values
        if found is None:
            raise UnsupportedModelError(
                f"attention at {describe(node)} has no residual connection around it; "
                "token merging is defined for residual transformer blocks"
            )
        residual, stream = found
        key_meta = tensor_meta(keys)
        not_one_sequence = None
        if key_meta is None or key_meta.dim() != 4:
            not_one_sequence = (
                f"attention at {describe(node)}: keys must be [batch, heads, tokens, dim] (4-d), got "
                f"{None if key_meta is None else tuple(key_meta.shape)}: attention within windows, or over "
                "a grid folded into several axes, is not one sequence of tokens"
            )
        name = module_path(residual) or module_path(node) or node.name
        blocks.append(AttentionBlock(name, node, output, keys, key_token_dim, stream, residual, tuple(masks),
                                     not_one_sequence))
    _check_sequential(blocks)
    return blocks


def _check_sequential(blocks: list[AttentionBlock]) -> None:
    """Each block must read the residual stream the previous block wrote."""
    for prev, block in zip(blocks, blocks[1:]):
        if prev.residual not in ancestors(block.keys):
            raise SeparateChains(
                f"block {block.name}: its attention does not read the output of block {prev.name}; "
                "only a single stream of sequential blocks can be merged", _chain_scopes(blocks)
            )
        if prev.residual is block.residual:
            raise UnsupportedModelError(f"blocks {prev.name} and {block.name} share one residual add")


class SeparateChains(UnsupportedModelError):
    """The blocks form separate chains (CLIP's two towers); ``scopes`` names each chain."""

    def __init__(self, message: str, scopes: list[str]):
        super().__init__(message)
        self.scopes = scopes


def _chain_scopes(blocks: list[AttentionBlock]) -> list[str]:
    """For each chain of sequential blocks, the shortest module path that holds all its
    blocks and no other chain's (chains with no such path are left out)."""
    chains: list[list[AttentionBlock]] = []
    for block in blocks:
        chain = next((c for c in chains if c[-1].residual in ancestors(block.keys)), None)
        chain.append(block) if chain is not None else chains.append([block])
    common = []
    for chain in chains:
        parts = [b.name.split(".") for b in chain]
        common.append([p[0] for p in zip(*parts) if len(set(p)) == 1])
    scopes = []
    for i, parts in enumerate(common):
        others = [c for j, c in enumerate(common) if j != i]
        depth = next((k for k in range(1, len(parts) + 1) if all(c[:k] != parts[:k] for c in others)), None)
        if depth is not None:
            scopes.append(".".join(parts[:depth]))
    return scopes


def query_key_paths(graph: Graph) -> tuple[set[Node], dict[Node, Node]]:
    """Nodes on the way into the queries or keys of an attention and not into its values
    (where rotary position embeddings act), and each query or key operand with the op that
    consumes it (the sdpa, or the scores matmul)."""
    found: set[Node] = set()
    entries: dict[Node, Node] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA:
            (queries, keys, values), consumer = node.args[:3], node
        elif node.target in SOFTMAX and (manual := manual_attention(node)) is not None:
            queries, keys, _, output, _ = manual
            values, consumer = _operands(output)[1], next(u for u in queries.users if _operands(u) == [queries, keys])
        else:
            continue
        found |= (ancestors(queries) | {queries} | ancestors(keys) | {keys}) - ancestors(values) - {values}
        entries.update({queries: consumer, keys: consumer})
    return found, entries
