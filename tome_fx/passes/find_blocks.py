"""Find attention blocks by graph structure (not by module names).

An attention block is: an attention op -- aten ``scaled_dot_product_attention``,
``matmul -> (scale/mask/cast) -> softmax -> (dropout/cast) -> matmul`` (or einsums), or linear
attention (a matmul of the queries with a matmul summing over keys and values) -- whose keys
come from the residual stream, and the residual ``add`` that brings its output back
into that stream. The merge goes right after that add, before the MLP branch. An attention
whose residual stream feeds its queries but not its keys is cross-attention (keys from
text, say): not a block of its own. Nor is attention pooling (SigLIP's MAP head): learned
queries that no input feeds, attending over the tokens with no residual around it; the
token-flow analysis gives it proportional attention over its (merged) keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch.fx import Graph, Node

from ..errors import UnsupportedModelError
from .graph_utils import (VIEWS, aten, ancestors, at_node, depends_on_inputs, describe, einsum_letters, is_assertion,
                          module_path, shape_of, tensor_meta)

SDPA = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
EINSUM = aten.einsum.default
# ops allowed between the scores matmul and the softmax, and between softmax and the value matmul
# (tanh: soft-capped logits, cap * tanh(logits / cap), as VideoPrism's)
_LOGIT_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar,
              aten.tanh.default, aten.where.self}
# (dropout_: nn.Dropout(inplace=True) on the weights, as TNT's)
_PASS_THROUGH = {aten.dropout.default, aten.dropout_.default, aten._to_copy.default, aten.to.dtype,
                 aten.type_as.default, aten.clone.default, aten.alias.default}
# views of the logits (SAM adds its decomposed relative positions on a [q_h, q_w, k_h, k_w] view)
RESIDUAL_ADD = {aten.add.Tensor, aten.add_.Tensor}


@dataclass(frozen=True)
class AttentionBlock:
    name: str
    attention: Node  # the sdpa node, the softmax of a manual attention, or a linear attention's sum over keys
    output: Node  # the attention's output (sdpa node, or the value matmul)
    keys: Node  # key operand as the attention consumes it
    key_token_dim: int  # tokens of ``keys``: -2 for sdpa keys, -1 for k^T in q @ k^T
    stream: Node  # residual stream entering the block
    residual: Node  # residual add after the attention: the merge point
    masks: tuple[tuple[Node, Node], ...] = ()  # (node applying it, mask): sdpa attn_mask, or added to logits
    not_one_sequence: str | None = None  # why its keys are not one [batch, heads, tokens, dim] sequence
    key_span: tuple[int, int] = (0, 0)  # keys of other streams before and after the stream's own (joint attention)
    parallel: str | None = None  # why the stream cannot merge after it: another attention reads its input
    # a stream joined with another's inside the block (FLUX's single blocks: [text, image] by a cat):
    # the other's tokens before and after the stream's own, and the cut of the residual holding its own
    joined: tuple[int, int] = (0, 0)
    own_input: Node | None = None  # its piece of the cat that joins the streams
    own_cut: Node | None = None
    why_not_joined: str | None = None  # why the stream's own tokens cannot be told apart in it
    unrolled: bool = False  # its tokens are not in raster order (timm Hiera's mask units): no grid to read

    @property
    def merge_point(self) -> Node:
        """Where the block's tokens merge: after the residual add, or after the cut of it holding
        the stream's own tokens where the block joins another stream in."""
        return self.own_cut if self.own_cut is not None else self.residual


_MASKING = {aten.add.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar}


def _walk_back(node: Node, through: set) -> tuple[Node, list[tuple[Node, Node]]]:
    """Follow the first operand back through ``through`` (the kept values of a ``where``: a mask
    chosen in, ImageGPT's causal one); also the tensors added or masked in."""
    masks = []
    while node.op == "call_function" and node.target in through:
        if node.target == aten.where.self:
            masks.append((node, node.args[0]))
            node = node.args[1]
            continue
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


def _scores_operands(scores: Node) -> tuple[Node, Node, int] | None:
    """(queries, keys, the keys' token dim) of the product that gives the logits, whose last
    axis is the keys' tokens: ``q @ k^T``, or an einsum with either operand order; None where
    no single operand holds that axis."""
    operands = _operands(scores)
    if len(operands) != 2:
        return None
    if scores.target in MATMUL:
        return operands[0], operands[1], -1
    letters, output = einsum_letters(scores)
    holding = [i for i in (0, 1) if output[-1] in letters[i]]
    if len(holding) != 1:
        return None
    keys = holding[0]
    return operands[1 - keys], operands[keys], letters[keys].index(output[-1]) - len(letters[keys])


def _values_of(product: Node, weights: Node) -> Node | None:
    """The values in ``weights @ values`` (or an einsum of the two, either order)."""
    operands = _operands(product)
    if product.target in MATMUL:
        return operands[1] if operands[:1] == [weights] else None
    return operands[1 - operands.index(weights)] if weights in operands and operands[0] is not operands[1] else None


def _transposed_product(user: Node) -> tuple[Node, Node] | None:
    """(product, values) where ``user`` transposes the weights' last two axes into ``values @
    weights^T`` (EfficientViT-M's and SHViT's attention: the output holds the tokens last)."""
    if user.op != "call_function" or user.target != aten.transpose.int:
        return None
    ndim = len(shape_of(user))
    if sorted(d % ndim for d in user.args[1:3]) != [ndim - 2, ndim - 1]:
        return None
    found = [(p, p.args[0]) for p in user.users
             if p.op == "call_function" and p.target in MATMUL and p.args[1] is user and p.args[0] is not user]
    return found[0] if len(found) == 1 and len(user.users) == 1 else None


@dataclass(frozen=True)
class ManualAttention:
    queries: Node
    keys: Node  # the keys operand as the scores product reads it
    key_token_dim: int
    values: Node
    output: Node  # the product of the weights and the values
    masks: tuple[tuple[Node, Node], ...]  # (node adding it, mask) between the scores and the softmax


def manual_attention(softmax: Node) -> ManualAttention | None:
    """The parts of ``matmul -> softmax -> matmul`` (or einsums) around ``softmax``, or None.
    The weights may have other users too (a returned attention map): the token-flow analysis
    rules on them."""
    scores, masks = _walk_back(softmax.args[0], _LOGIT_OPS | _PASS_THROUGH | VIEWS)
    found = _scores_operands(scores)
    if found is None:
        return None
    consumers = _consumers(softmax, _PASS_THROUGH | VIEWS)  # (views: GroupViT's weights, reshaped for bmm)
    products = [(user, values) for user, read in consumers if (values := _values_of(user, read)) is not None]
    products += [pair for user, _ in consumers if (pair := _transposed_product(user))]
    if len(products) != 1:
        return None
    (output, values), (queries, keys, key_token_dim) = products[0], found
    return ManualAttention(queries, keys, key_token_dim, values, output, tuple(masks))


_SHAPE_OPS = {aten.transpose.int, aten.permute.default, aten.view.default, aten.reshape.default,
              aten.unflatten.int, aten.flatten.using_ints, aten.contiguous.default}


def _kernel(node: Node) -> Node:
    """The op that made ``node``, past dtype casts and reshapes (a feature map: ReLU, ELU)."""
    while node.op == "call_function" and node.target in CASTS | _SHAPE_OPS and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def linear_attention(product: Node) -> ManualAttention | None:
    """Attention without a softmax (Sana's ReLU linear attention): ``product`` applies to the
    queries a summary that is itself a matmul contracting the tokens of keys and values
    (``(V φ(K)ᵀ) φ(Q)`` or ``φ(Q) (φ(K)ᵀ V)``), every operand computed from the inputs. Of the
    summary's operands, the keys are the one made by the queries' own feature map. The token-flow
    analysis makes the sum over tokens size-weighted, which is exact for merged duplicates."""
    if product.op != "call_function" or product.target not in MATMUL:
        return None
    first, second = product.args[:2]
    for summary, queries, query_dim in ((_uncast(first), second, -1), (_uncast(second), first, -2)):
        if not (summary.op == "call_function" and summary.target in MATMUL):
            continue
        left, right = summary.args[:2]
        tokens = tensor_meta(left).shape[-1]
        if tensor_meta(queries).shape[query_dim] != tokens or not all(map(depends_on_inputs, (left, right, queries))):
            continue
        mapped = [i for i, operand in enumerate((left, right))
                  if _kernel(operand).target == _kernel(queries).target and _kernel(operand) is not _kernel(queries)]
        if len(mapped) != 1:
            return None  # which operand holds the keys is not told apart by a feature map
        keys, values, key_dim = (left, right, -1) if mapped == [0] else (right, left, -2)
        return ManualAttention(queries, keys, key_dim, values, product, ())
    return None


def _adds_after(output: Node, graph_order: dict[Node, int]) -> list[tuple[Node, Node]]:
    """The adds downstream of ``output`` in graph order, each with its operand that does not
    come from ``output`` (the one a residual connection brings in)."""
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
    return [(add, other) for add in sorted(candidates, key=graph_order.__getitem__)
            for mine, other in (add.args[:2], add.args[1::-1]) if isinstance(other, Node) and mine in seen]


def _residual_add(output: Node, keys: Node, graph_order: dict[Node, int]) -> tuple[Node, Node] | None:
    """First add downstream of ``output`` whose other operand is an ancestor of the keys (seen
    through dtype casts): the add, and that ancestor, the residual stream."""
    key_ancestors = ancestors(keys) | {keys}
    for add, other in _adds_after(output, graph_order):
        stream = next((n for n in (other, _uncast(other), _unscaled(_uncast(other))) if n in key_ancestors), None)
        if stream is not None:
            return add, stream
    return None


def _other_residual(output: Node, keys: Node, graph_order: dict[Node, int]) -> tuple[str, Node] | None:
    """Why the add after ``output`` is not this attention's residual connection, where its other
    operand is still computed from what the keys are computed from: ("parallel", add) where that
    operand is the stream with another branch added (SD3.5's dual attention: two attentions on
    one normed input, added one after the other); ("subset", add) where it is some of the block
    input's tokens (the class token alone: CaiT's class attention, CrossViT's fusion, VOLO's
    head; the patches alone: TimeSformer's divided attention); ("changed", add) where it is a
    projection or pooling of the block's input (a stage change, Hiera's)."""
    key_ancestors = ancestors(keys) | {keys}
    for add, other in _adds_after(output, graph_order):
        if not ancestors(other) & key_ancestors:
            continue
        chain, stack = set(), [other]  # back along the stream: through residual adds and casts
        while stack:
            node = stack.pop()
            chain.add(node)
            if node.op == "call_function" and node.target in RESIDUAL_ADD | CASTS:
                stack += [a for a in node.args[:2] if isinstance(a, Node) and a not in chain]
        if chain & key_ancestors:
            return "parallel", add
        node = _uncast(other)
        while node.op == "call_function" and node.target in VIEWS | {aten.clone.default, aten.contiguous.default}:
            node = node.args[0]
        cut = node.op == "call_function" and (
            node.target == aten.slice.Tensor and node.args[1] % len(shape_of(node)) == 1
            or node.target == aten.select.int and node.args[1] % len(shape_of(node.args[0])) == 1)
        return ("subset" if cut and ancestors(node) & key_ancestors else "changed"), add
    return None


def _key_span(keys: Node, token_dim: int, stream: Node) -> tuple[int, int]:
    """How many of the keys' tokens come from other streams, before and after the stream's own:
    in joint attention (SD3's, FLUX's, CogVideoX's) the stream's tokens are joined with another
    stream's by a cat along the tokens upstream of the keys (of the keys themselves, or of the
    normed tokens they are projected from); the matching reads the stream's piece only. The
    nearest such cat counts."""
    stream_shape, key_shape = tensor_meta(stream).shape, tensor_meta(keys).shape
    if len(stream_shape) != 3 or key_shape[token_dim] == stream_shape[1]:
        return 0, 0
    frontier, seen = [keys], {keys}
    while frontier:
        for node in frontier:
            if node.op == "call_function" and node.target == aten.cat.default:
                meta = tensor_meta(node)
                dim = (node.args[1] if len(node.args) > 1 else 0) % meta.dim()
                sizes = [tensor_meta(part).shape[dim] for part in node.args[0]]
                own = [i for i, part in enumerate(node.args[0]) if part is stream or stream in ancestors(part)]
                if meta.shape[dim] == key_shape[token_dim] and len(own) == 1 and sizes[own[0]] == stream_shape[1]:
                    return sum(sizes[: own[0]]), sum(sizes[own[0] + 1:])
        frontier = [p for n in frontier if n is not stream for p in n.all_input_nodes if p not in seen]
        seen.update(frontier)
    return 0, 0  # the driver refuses it where it would merge (other refusals may come first)


CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default}


def scales(node: Node, stream: Node) -> bool:
    """``node`` multiplies ``stream`` by a tensor no input feeds: a residual scaled before the add
    (``x * gamma + branch``, CAFormer's ResScale), the stream as the merges see it."""
    if node.op != "call_function" or node.target != aten.mul.Tensor or stream not in node.args[:2]:
        return False
    other = node.args[1] if node.args[0] is stream else node.args[0]
    return isinstance(other, Node) and not depends_on_inputs(other)


def _unscaled(node: Node) -> Node:
    """The stream ``node`` scales (``scales``), or ``node``."""
    data = [a for a in node.args[:2] if isinstance(a, Node)] if node.op == "call_function" else []
    return next((a for a in data if scales(node, a) and depends_on_inputs(a)), node)


def _uncast(node: Node) -> Node:
    """``node`` before dtype casts: mixed-precision code adds ``h.float()`` back in, not ``h``."""
    while node.op == "call_function" and node.target in CASTS and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def in_scope(path: str, scope: tuple[str, ...]) -> bool:
    """``path`` is one of the module paths in ``scope`` or under one; every path is, without a scope."""
    return not scope or any(path == s or path.startswith(s + ".") for s in scope)


def find_attention_blocks(graph: Graph, scope: tuple[str, ...] = (),
                          stage_changes: list[StageChange] | None = None, sequential: bool = True
                          ) -> list[AttentionBlock]:
    """The attention blocks in graph order; with ``scope`` (module paths), only those under it:
    attention elsewhere is left as captured, unexamined. An attention whose block changes the
    token grid is refused, or with ``stage_changes`` (a list) put there and left as it is.
    ``sequential``: the blocks must form one stream, each reading the one before (whole-stream
    merging); per-block merging takes any blocks."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    blocks: list[AttentionBlock] = []
    for node in graph.nodes:
        if (node.op == "call_function" and in_scope(module_path(node), scope)
                and (node.target in SDPA | SOFTMAX or linear_attention(node) is not None)):
            with at_node(node, "looking for an attention block at"):
                block = _block_at(node, order)
            if isinstance(block, StageChange):
                if stage_changes is None:
                    raise UnsupportedModelError(block.reason)
                stage_changes.append(block)
            elif isinstance(block, _Parallel):
                if not blocks:
                    raise UnsupportedModelError(block.reason)
                blocks[-1] = replace(blocks[-1], parallel=block.reason)
            elif block is not None:
                blocks.append(block)
    if sequential:
        _check_sequential(blocks)
    return _joined_streams(blocks)


def _joined_streams(blocks: list[AttentionBlock]) -> list[AttentionBlock]:
    """Blocks whose residual stream is the chain's tokens joined with another stream's by a
    ``cat`` along the tokens (FLUX's single-stream blocks: ``cat([text, image])``, attention and
    MLP over both, the sum cut back into the two). The stream's own piece is the part computed
    from the previous block's merge point; its tokens merge, at the cut of the residual that
    holds them again; the matching reads their keys only. (The first block's stream may be a
    cat too: a class token and the patches, the model's own sequence.)"""
    resolved = []
    for prev, block in zip([None, *blocks], blocks):
        stream = block.stream
        joins = (stream.op == "call_function" and stream.target == aten.cat.default and tensor_meta(stream).dim() == 3
                 and (stream.args[1] if len(stream.args) > 1 else 0) % 3 == 1)
        if prev is None or not joins:
            resolved.append(block)
            continue
        parts = stream.args[0]
        sizes = [tensor_meta(p).shape[1] for p in parts]
        anchor = resolved[-1].merge_point
        own = [i for i, p in enumerate(parts) if p is anchor or anchor in ancestors(p)]
        if len(own) != 1:
            resolved.append(replace(block, why_not_joined=(
                f"its stream {describe(stream)} joins {len(parts)} token sequences by a cat, and {len(own)} of them "
                "are computed from the previous block's tokens, not one")))
            continue
        lead, own_tokens = sum(sizes[: own[0]]), sizes[own[0]]
        trail = sum(sizes) - lead - own_tokens
        cuts = [u for u in _past_whole_slices(block.residual) if u.args[1] % 3 == 1
                and _slice_bounds(u, sum(sizes)) == (lead, lead + own_tokens)]
        why = None if len(cuts) == 1 else (
            f"its stream joins another's tokens with its own by {describe(stream)}, and the sum after its attention "
            f"({describe(block.residual)}) is not cut back to the stream's {own_tokens} tokens by one slice")
        resolved.append(replace(block, joined=(lead, trail), key_span=(lead, trail), own_input=parts[own[0]],
                                own_cut=cuts[0] if cuts else None, why_not_joined=why))
    return resolved


def _past_whole_slices(node: Node) -> list[Node]:
    """The slices reading ``node``, past slices that keep a whole axis (``x[:, a:b]`` is
    captured as a slice of dim 0 from 0 to the end, then one of dim 1)."""
    found = []
    for user in node.users:
        if user.op == "call_function" and user.target == aten.slice.Tensor:
            whole = _slice_bounds(user, tensor_meta(node).shape[user.args[1]])
            found += _past_whole_slices(user) if whole == (0, tensor_meta(node).shape[user.args[1]]) else [user]
    return found


def _slice_bounds(node: Node, length: int) -> tuple[int, int] | None:
    """(start, end) of a unit-step ``aten.slice`` over an axis of ``length`` entries."""
    start, end, step = (list(node.args[2:5]) + [None, None, 1][len(node.args[2:5]):])
    if step != 1 or not all(isinstance(b, int) or b is None for b in (start, end)):
        return None
    start, end = start or 0, length if end is None else end
    start, end = start + length if start < 0 else start, end + length if end < 0 else end
    return min(start, length), min(end, length)


@dataclass(frozen=True)
class _Parallel:
    """An attention found to be a parallel branch of the block before it, and why the stream
    cannot merge between them."""

    reason: str


@dataclass(frozen=True)
class StageChange:
    """An attention whose block changes the token grid (Hiera's pooled stage transitions), or
    whose residual adds to some of its input's tokens (``subset``: a class token alone): named,
    with why it is no block to merge in."""

    name: str
    reason: str
    subset: bool = False


def _block_at(node: Node, order: dict[Node, int]) -> AttentionBlock | _Parallel | None:
    """The attention block whose attention is ``node`` (an sdpa or a softmax), or None where
    ``node`` is no self-attention over a residual stream (cross-attention, pooling)."""
    if node.target in SDPA:
        queries, keys, key_token_dim, output = node.args[0], node.args[1], -2, node
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        masks = [(node, mask)] if isinstance(mask, Node) else []
    else:
        found = manual_attention(node) if node.target in SOFTMAX else linear_attention(node)
        if found is None:
            return None
        queries, keys, key_token_dim, output, masks = (found.queries, found.keys, found.key_token_dim,
                                                       found.output, found.masks)
        if node.target in MATMUL:  # linear attention: its sum over the keys' tokens is the attention
            node = next(_uncast(a) for a in output.args[:2] if a is not queries)
    found = _residual_add(output, keys, order)
    if node.target in MATMUL and (found is None or tensor_meta(keys).shape[key_token_dim] != tensor_meta(found[1]).shape[1]):
        return None  # not linear attention: its sum over keys must run over the stream's tokens
    if found is None and _residual_add(output, queries, order) is not None:
        return None  # cross-attention: keys from another sequence (text); its queries are followed as tokens
    if found is None and not depends_on_inputs(queries):
        return None  # attention pooling: learned queries (a MAP head) read the tokens as keys and values
    key_meta = tensor_meta(keys)
    shape = None if key_meta is None else tuple(d if isinstance(d, int) else "batch" for d in key_meta.shape)
    windowed = (f"keys must be [batch, heads, tokens, dim] (4-d), got {shape}: attention within windows, or over a "
                "grid folded into several axes, is not one sequence of tokens") if shape is None or len(shape) != 4 else None
    unrolled = any(kind.endswith(".MaskUnitAttention") for _, kind in (node.meta.get("nn_module_stack") or {}).values())
    if unrolled:
        windowed = (f"keys of shape {shape}: timm's Hiera attends within mask units (its tokens unrolled so that each "
                    "unit's are contiguous, then cut into units), not over one sequence of tokens; merging within mask "
                    "units is not built (SAM 2's Hiera keeps a token grid and merges with tome_fx.sam.apply)")
    if found is None:
        other = _other_residual(output, keys, order)
        if other is not None and other[0] == "parallel":
            return _Parallel(  # a branch of the block before it (SD3.5's second attention)
                f"attention at {describe(node)}: its output is added ({describe(other[1])}) onto the stream after "
                "another branch's, while its keys read the stream from before that branch: parallel attention "
                "branches on one input (SD3.5's dual attention) leave no single point between them to merge the "
                "stream at; merge per block instead (tome_fx.sd.apply)")
        if other is not None:
            why = ("is some of the block input's tokens, not all of them: the class token alone (CaiT's class "
                   "attention, CrossViT's fusion, VOLO's class head) or the patches without it (TimeSformer's divided "
                   "space-time attention)" if other[0] == "subset" else
                   "is computed from the block's input (projected or pooled), not the input itself: the token count "
                   "or width changes here, as between the stages of a hierarchical model (Hiera, MViT)")
            return StageChange(module_path(other[1]) or module_path(node) or node.name, (
                f"attention at {describe(node)}: " + (f"{windowed}; and " if windowed else "")
                + f"the residual added after it ({describe(other[1])}) {why}"), other[0] == "subset")
        raise UnsupportedModelError(
            f"attention at {describe(node)} has no residual connection around it; "
            "token merging is defined for residual transformer blocks"
        )
    residual, stream = found
    span = (0, 0) if windowed else _key_span(keys, key_token_dim, stream)
    name = module_path(residual) or module_path(node) or node.name
    return AttentionBlock(name, node, output, keys, key_token_dim, stream, residual, tuple(masks),
                          windowed and f"attention at {describe(node)}: {windowed}", key_span=span, unrolled=unrolled)


def _check_sequential(blocks: list[AttentionBlock]) -> None:
    """Each block must read the residual stream the previous block wrote."""
    for i, (prev, block) in enumerate(zip(blocks, blocks[1:])):
        if prev.residual not in ancestors(block.keys):
            earlier = next((b for b in reversed(blocks[:i]) if b.residual in ancestors(block.keys)), None)
            how = (f"it reads the stream of an earlier block ({describe(earlier.residual)}): two streams of blocks "
                   "interleave (TNT's pixel and patch streams)" if earlier is not None else
                   "it reads no earlier block's output: the blocks form separate chains (two towers)")
            raise SeparateChains(
                f"the attention of {describe(block.attention)} does not read the output of the block before it "
                f"({describe(prev.residual)}); {how}, and only a single stream of sequential blocks can be merged "
                "whole-stream (per-block merging takes separate streams: a fraction r)", _chain_scopes(blocks))
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
            queries, keys, values = manual.queries, manual.keys, manual.values
            consumer = next(u for u in queries.users if set(_operands(u)) == {queries, keys})
        else:
            continue
        found |= (ancestors(queries) | {queries} | ancestors(keys) | {keys}) - ancestors(values) - {values}
        entries.update({queries: consumer, keys: consumer})
    return found, entries


_CHANNELS_ON_DIM_1 = {aten.conv2d.default, aten.convolution.default, aten.batch_norm.default, aten.group_norm.default}


def channels_first(stream: Node) -> bool:
    """A 4-d stream laid out [batch, channels, h, w], as convolutional hybrids keep it (NextViT,
    Visformer, FastViT, CoAtNet): a convolution or a batch/group norm reads it (their channels
    are dim 1), or, where no layer norm reads its last axis, its last two axes are a square grid
    its dim 1 is not part of."""
    shape = shape_of(stream)
    if len(shape) != 4:
        return False
    readers = [u for u in stream.users if u.op == "call_function" and u.args and u.args[0] is stream]
    if any(u.target in _CHANNELS_ON_DIM_1 for u in readers):
        return True
    if any(u.target == aten.layer_norm.default for u in readers):  # normalised over its last axis: channels last
        return False
    return shape[2] == shape[3] != shape[1]


def channels_first_why(stream: Node) -> str:
    return (f"its residual stream {('batch', *shape_of(stream)[1:])} is channels first ([batch, channels, h, w], as "
            "convolutional hybrids keep it: NextViT, Visformer, FastViT, CoAtNet); merging a channels-first stream "
            "is not built")


def unrecognised_attention(softmax: Node) -> str | None:
    """Why ``softmax`` is attention over a product of two computed tensors that block finding
    does not take as one (its weights meet the values through other ops); None where it is
    no such attention."""
    through = _LOGIT_OPS | _PASS_THROUGH | VIEWS | {aten.permute.default}
    scores = _walk_back(softmax.args[0], through)[0]
    mixed = scores.op == "call_function" and scores.target in _CHANNELS_ON_DIM_1 | {aten.linear.default}
    if mixed:  # logits through a convolution or a linear over the heads (talking-heads attention)
        scores = _walk_back(scores.args[0], through)[0]
    if scores.op != "call_function" or scores.target not in MATMUL | {EINSUM}:
        return None
    operands = _scores_operands(scores)
    if operands is None or not all(depends_on_inputs(o) for o in operands[:2]) or (manual_attention(softmax) and not mixed):
        return None
    if mixed:
        return ("its logits and weights are mixed across heads around the softmax (talking-heads attention: "
                "CaiT's linears over the heads, EfficientFormer-v2's convolutions), a form not recognised as an "
                "attention block, so its tokens do not merge")
    users = [user for user, _ in _consumers(softmax, _PASS_THROUGH)]
    through = ", ".join(sorted({str(u.target).replace("aten.", "") for u in users}))
    return (f"its softmax weights go on through {through} rather than straight into a product with the values (as "
            "gated positional attention mixes two softmaxes, ConViT's GPSA), a form not recognised as an attention "
            "block, so its tokens do not merge")


def first_unrecognised(graph: Graph, scope: tuple[str, ...] = ()) -> str | None:
    """The first softmax attention in ``scope`` whose form is not recognised, and why; None if none."""
    for node in graph.nodes:
        if (node.op == "call_function" and node.target in SOFTMAX and in_scope(module_path(node), scope)
                and (why := unrecognised_attention(node))):
            return f"{describe(node)}: {why}"
    return None


def why_no_blocks(graph: Graph, scope: tuple[str, ...] = ()) -> str:
    """What the graph holds instead of an attention block: attention whose output is added to
    no stream its keys come from (keys or queries pooled from the stream, MViT's), a product of
    two tensors computed from the inputs with no softmax around it that is not linear attention,
    or nothing."""
    in_softmax_attention, attentions = set(), []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in SOFTMAX and (found := manual_attention(node)):
            in_softmax_attention |= {found.output} | {u for u in found.queries.users if found.keys in u.all_input_nodes}
            attentions.append(node)
        elif node.op == "call_function" and node.target in SDPA:
            attentions.append(node)
    attentions = [a for a in attentions if in_scope(module_path(a), scope)]
    if odd := first_unrecognised(graph, scope):
        return odd
    if attentions:
        return (f"{len(attentions)} attention ops (the first at {describe(attentions[0])}) are added to no residual "
                "stream their keys are computed from: cross-attention, attention pooling, or keys and queries pooled "
                "from the stream before the attention (MViT's pooling attention)")
    for node in graph.nodes:
        if (node.op == "call_function" and node.target in MATMUL | {EINSUM} and node not in in_softmax_attention
                and in_scope(module_path(node), scope)):
            operands = list(node.args[1]) if node.target == EINSUM else list(node.args[:2])
            if len(operands) == 2 and all(isinstance(o, Node) and depends_on_inputs(o) for o in operands):
                return (f"{describe(node)} multiplies two tensors computed from the inputs with no softmax between "
                        "them, and not as linear attention does (the queries times a sum over the keys' tokens): "
                        "tome_fx merges softmax attention (sdpa, or matmul-softmax-matmul) and linear attention")
    return "there is no self-attention to merge"
