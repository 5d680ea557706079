"""An independent implementation of ToMe on timm VisionTransformers, written the way the
paper's code is (``a, b = x[..., ::2, :], x[..., 1::2, :]``, -inf rows/columns for protected
tokens, ``scatter_reduce``), running timm's modules by hand. Tests compare tome_fx with it.

The one deliberate difference from the paper's code: unmerged tokens are always kept in
ascending original order (the paper sorts them only when there is a class token).
"""

import math

import torch


def paper_matching(metric, r, protected):
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    for position in range(protected):
        if position % 2 == 0:
            scores[..., position // 2, :] = -math.inf
        else:
            scores[..., :, position // 2] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        front = [(unm if p % 2 == 0 else dst)[:, p // 2 : p // 2 + 1] for p in range(protected)]
        return torch.cat(front + [unm[:, (protected + 1) // 2 :], dst[:, protected // 2 :]], dim=1)

    return merge


def reference_vit(model, images, schedule, prop_attn=True):
    """timm VisionTransformer (eval) with ToMe, by hand. Returns (logits, final sizes)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    protected = model.num_prefix_tokens
    size = None
    for block, r in zip(model.blocks, schedule):
        attn = block.attn
        y = block.norm1(x)
        batch, tokens, _ = y.shape
        qkv = attn.qkv(y).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        y = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
        x = x + block.ls1(attn.proj(attn.norm(y)))
        r = min(r, (x.shape[1] - protected) // 2)
        if r > 0:
            merge = paper_matching(k.mean(1), r, protected)
            if size is None:
                size = torch.ones_like(x[..., :1])
            x = merge(x * size)
            size = merge(size)
            x = x / size
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    if model.global_pool == "avg":
        weights = size[:, protected:] if size is not None else torch.ones_like(x[:, protected:, :1])
        pooled = (x[:, protected:] * weights).sum(1) / weights.sum(1)
        return model.head(model.head_drop(model.fc_norm(pooled))), size
    return model.forward_head(x), size
