"""The peer for the latency benchmark: the official ToMe code's timm patch, as a
monkeypatch of a timm VisionTransformer.

The official repository (facebookresearch/ToMe) is not on PyPI, so it cannot be
installed here. This module rewrites its timm patch from the paper's description and the
structure of its code, keeping the same operations in the same order, because their
count is what sets eager latency: the attention written out (``q @ k^T``, + log(size),
softmax, ``@ v``), the keys averaged over heads, the matching (``a, b = ::2, 1::2``,
``argsort``) and the merge as ``scatter_reduce(sum)`` of ``x * size`` and of ``size``,
then a division. ``tests/reference.py`` is the slow, by-hand version used for checking;
this one is written to be timed.
"""

from __future__ import annotations

import copy
import math

import torch
from timm.models.vision_transformer import Attention, Block, VisionTransformer


def _matching(metric, r, protected):
    """The merge function of bipartite soft matching (class/distillation tokens protected)."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if protected >= 1:
            scores[..., 0, :] = -math.inf
        if protected >= 2:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if protected >= 1:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        if protected >= 2:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


class _PaperAttention(Attention):
    def forward(self, x, size=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = None if size is None else size.log()[:, None, None, :, 0]
        if self.sdpa:  # not in the official code: isolates what its written-out attention is worth
            x = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            if bias is not None:
                attn = attn + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
        return x, k.mean(1)


class _PaperBlock(Block):
    def forward(self, x):
        info = self._tome_info
        x_attn, metric = self.attn(self.norm1(x), info["size"])
        x = x + self.drop_path1(x_attn)
        r = min(info["r"].pop(0), (x.shape[1] - info["protected"]) // 2)
        if r > 0:
            merge = _matching(metric, r, info["protected"])
            size = info["size"] if info["size"] is not None else torch.ones_like(x[..., 0, None])
            x, size = merge(x * size), merge(size)
            x, info["size"] = x / size, size
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _paper_forward(self, x):
    self._tome_info["r"] = [self.r] * len(self.blocks)
    self._tome_info["size"] = None
    return super(type(self), self).forward(x)


def paper_patch(model: VisionTransformer, r: int, sdpa: bool = False) -> VisionTransformer:
    """A copy of a timm ViT (no layer scale, no norms inside attention) patched the way the
    official code patches it, merging ``r`` tokens per block with proportional attention.
    ``sdpa``: its attention through ``scaled_dot_product_attention``, as the original's."""
    model = copy.deepcopy(model)
    model.__class__ = type(f"Paper{type(model).__name__}", (type(model),), {"forward": _paper_forward})
    model.r = r
    model._tome_info = {"r": [], "size": None, "protected": model.num_prefix_tokens}
    for block in model.blocks:
        block.__class__ = _PaperBlock
        block._tome_info = model._tome_info
        block.attn.__class__ = _PaperAttention
        block.attn.sdpa = sdpa
    return model
