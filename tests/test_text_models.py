"""BERT-style text encoders with a padding ``attention_mask``: padding never merges with real
tokens, attention keeps ignoring it, and MiniLM (real weights) embeddings stay close."""

import os

import pytest
import torch
import transformers as T
from torch.utils import _pytree as pytree

import tome_fx
from tome_fx.tools import text_agreement


def tiny_bert(impl):
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
    )
    model = T.BertModel(config).eval()
    model.set_attn_implementation(impl)
    return model


def padded_batch(lengths, tokens=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (len(lengths), tokens), generator=gen)
    mask = (torch.arange(tokens) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_r0_gives_the_original_outputs_and_the_pooler_keeps_token_0(impl):
    model, batch = tiny_bert(impl), padded_batch([12, 8, 5])
    fast = tome_fx.transform(model, 0, example_inputs=batch)
    assert fast.plan.protected == 1  # the pooler reads token 0, so it keeps its place
    with torch.no_grad():
        got, want = fast(**batch), model(**batch)
    for g, w in zip(pytree.tree_leaves(got), pytree.tree_leaves(want), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("r", [1, 2, 3])
def test_padding_never_merges_with_real_tokens_and_stays_ignored(impl, r):
    model, batch = tiny_bert(impl), padded_batch([12, 8, 5, 3])
    fast = tome_fx.transform(model, r, example_inputs=batch)
    with torch.no_grad():
        out, state = fast.forward_with_tokens(**batch)
        # other token ids under the padding must not change a single real-token output
        noisy = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"], 7))
        out_noisy = fast(**noisy)
    assert out.last_hidden_state.shape == model(**batch).last_hidden_state.shape
    real = batch["attention_mask"].bool()
    for row in range(real.shape[0]):
        held_by_real = set(state.positions[row][real[row]].tolist())
        assert held_by_real.isdisjoint(state.positions[row][~real[row]].tolist())
    torch.testing.assert_close(out_noisy.last_hidden_state[real], out.last_hidden_state[real], rtol=0, atol=0)
    torch.testing.assert_close(out_noisy.pooler_output, out.pooler_output, rtol=0, atol=0)


def test_compiled_matches_eager_with_padding():
    model, batch = tiny_bert("sdpa"), padded_batch([12, 8, 5])
    compiled = tome_fx.compile(model, 2, example_inputs=batch, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(**batch), compiled.model(**batch)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-4, atol=1e-4)


def test_text_models_need_example_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        tome_fx.transform(tiny_bert("sdpa"), 2)


def minilm_path():
    try:
        return text_agreement.minilm_path()
    except ImportError as error:
        if os.environ.get("TOME_FX_REQUIRE_WEIGHTS"):
            raise
        pytest.skip(str(error))


def test_minilm_sentence_embeddings_agree_with_the_original():
    """Real weights, real sentences padded to 32 tokens (docs/figures.md)."""
    rows = text_agreement.sentence_agreement(minilm_path(), [1, 2, 3], length=32)
    for r, (mean, low, counts) in rows.items():
        print(f"r={r}: tokens {counts[0]}->{counts[-1]}, cosine mean {mean:.4f} min {low:.4f}")
    assert rows[2][0] >= 0.97
    assert rows[3][0] >= 0.99
