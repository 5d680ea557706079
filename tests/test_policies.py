"""Merge policies (``method=``): ToMe's bipartite matching, PiToMe's energy matching and
prune-then-merge, each behind the same merge machinery, so every path gets each one."""

import pytest
import timm
import torch

import tome_fx
from tome_fx import merge

from test_text_models import padded_batch, tiny_bert

METHODS = list(merge.POLICIES)


def _twinned_vit():
    """A small ViT (float64, positions zeroed) and images whose 64 patches come in 32 identical
    pairs: merging a pair leaves every output unchanged, with proportional attention."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=3, num_classes=5).eval().double()
    with torch.no_grad():
        model.pos_embed.zero_()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    patches = images.unfold(2, 4, 4).unfold(3, 4, 4)  # [B, C, 8, 8, 4, 4] view into images
    flat = patches.reshape(2, 3, 64, 4, 4).clone()
    flat[:, :, 1::2] = flat[:, :, ::2]
    patches.copy_(flat.reshape(2, 3, 8, 8, 4, 4))
    return model, images


@pytest.mark.parametrize("schedule", [[32], [16], [8, 8, 8]])
@pytest.mark.parametrize("method", METHODS)
def test_duplicates_merge_exactly_under_each_policy(method, schedule):
    """The oracle, where each policy promises it (``merge.POLICIES[...].exact``): ToMe and
    prune-merge for any schedule; PiToMe where the twins are the 2r most energetic tokens, so in
    one merging block (after it, a merged token has no twin left and may outrank a pair)."""
    if method == "pitome" and len(schedule) > 1:
        pytest.skip("PiToMe merges every source it picks: exact only while every candidate has a twin")
    model, images = _twinned_vit()
    fast = tome_fx.transform(model, schedule, method=method)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), model(images), rtol=1e-10, atol=1e-10)
    assert fast.token_counts[-1] == 65 - sum(schedule) and fast.method == method


def test_policies_differ_on_real_inputs():
    model, _ = _twinned_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        outs = {m: tome_fx.transform(model, 8, method=m)(x) for m in METHODS}
    assert not torch.allclose(outs["tome"], outs["pitome"]) and not torch.allclose(outs["tome"], outs["prune_merge"])


def test_energy_matching_keeps_isolated_tokens_and_merges_within_clusters():
    """A tight cluster of six tokens among six lone ones: with r=3 the six most energetic (the
    cluster) are the candidates, alternately sources and dsts in energy order, and each source
    merges into its most similar dst; the lone tokens and the protected one stay."""
    torch.manual_seed(0)
    centres = torch.eye(8, dtype=torch.float64)
    tokens = [centres[7]]  # protected
    tokens += [centres[0] + 0.01 * torch.randn(8, dtype=torch.float64) for _ in range(6)]
    tokens += [centres[1 + i] for i in range(6)]
    metric = torch.stack(tokens)[None]
    m = merge.energy_matching(metric, 3, protected=1, depth=0.5)
    src, dst = m.a[0, m.src_idx[0]].tolist(), m.b[0, m.dst_idx[0]].tolist()
    assert set(src) | set(m.b[0].tolist()) == set(range(1, 7))  # the candidates: the cluster
    similarity = torch.nn.functional.normalize(metric[0], dim=-1) @ torch.nn.functional.normalize(metric[0], dim=-1).T
    assert all(similarity[s, d] == similarity[s, dst].max() for s, d in zip(src, dst))
    assert m.a[0, m.unm_idx[0]].tolist() == [0, *range(7, 13)]  # kept in order
    x = torch.randn(1, 13, 4, dtype=torch.float64)
    merged, size, positions = merge.merge_matched(m, x, merge.initial_size(x))
    assert merged.shape == (1, 10, 4) and size.sum() == 13 and torch.equal(merged[0, 0], x[0, 0])
    torch.testing.assert_close(merge.unmerge(merged, positions, 0, 1)[0, 10:], x[0, 10:], rtol=0, atol=0)


def test_prune_keeps_the_dst_and_adds_the_sizes():
    """``keep_dst`` (prune-merge's early blocks): each merged pair keeps its dst's value, and the
    dst's size counts both, so proportional attention still weighs it as two tokens."""
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    metric = torch.randn(2, 8, 5, dtype=torch.float64)
    early = merge.prune_merge_matching(metric, 3, depth=0.25)
    late = merge.prune_merge_matching(metric, 3, depth=0.5)
    assert early.keep_dst and not late.keep_dst
    pruned, size, positions = merge.merge_matched(early, x, merge.initial_size(x))
    averaged, size_late, _ = merge.merge_matched(late, x, merge.initial_size(x))
    assert torch.equal(size, size_late) and size.sum() == 16
    torch.testing.assert_close(merge.unmerge(pruned, positions, 0, 1)[:, 1::2], x[:, 1::2], rtol=0, atol=0)
    assert not torch.allclose(pruned, averaged)


@pytest.mark.parametrize("method", ["pitome", "prune_merge"])
def test_padding_never_merges_with_real_tokens_under_each_policy(method):
    """A BERT batch with padding: the policy's pair masks (over all tokens for PiToMe) keep
    padding and real tokens apart, and the real tokens' outputs ignore what the padding holds."""
    model, batch = tiny_bert("sdpa"), padded_batch([12, 8, 5, 3])
    fast = tome_fx.transform(model, 2, example_inputs=batch, method=method)
    with torch.no_grad():
        out, state = fast.forward_with_tokens(**batch)
        noisy = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"], 7))
        out_noisy = fast(**noisy)
    real = batch["attention_mask"].bool()
    for row in range(real.shape[0]):
        assert set(state.positions[row][real[row]].tolist()).isdisjoint(state.positions[row][~real[row]].tolist())
    torch.testing.assert_close(out_noisy.last_hidden_state[real], out.last_hidden_state[real], rtol=0, atol=0)


def test_pitome_compiles_whole_and_exports():
    """The energy matching is plain tensor code: one graph under torch.compile(fullgraph=True),
    and torch.export takes it (its order by comparisons, as ToMe's)."""
    model, images = _twinned_vit()
    model, images = model.float(), images.float()
    fast = tome_fx.transform(model, 8, method="pitome")
    with torch.no_grad():
        eager = fast(images)
        torch.testing.assert_close(tome_fx.compile(model, 8, method="pitome", fullgraph=True)(images), eager,
                                   rtol=1e-4, atol=1e-4)
    exported = torch.export.export(fast, (images,))
    torch.testing.assert_close(exported.module()(images), eager, rtol=1e-5, atol=1e-5)


def test_an_unknown_method_is_refused_before_capture():
    model, _ = _twinned_vit()
    with pytest.raises(ValueError, match="method is one of"):
        tome_fx.transform(model, 8, method="tofu")


def test_a_token_alone_in_its_mask_group_is_kept_not_forced_to_merge():
    """A mask that sets one token apart (alike to none but itself): ToMe merges around it, and
    PiToMe no longer picks it as a source with no dst to go to (its energy would be its own)."""
    torch.manual_seed(0)
    x = torch.randn(1, 9, 8)
    group = torch.zeros(1, 9, dtype=torch.long)
    group[0, 8] = 1
    compatible = group[:, :, None] == group[:, None, :]
    for r in (1, 2, 3):
        m = merge.energy_matching(x, r, 1, compatible)
        assert 8 in m.a[0, m.unm_idx[0]].tolist()


def test_the_cost_model_counts_pitomes_matching_over_every_pair():
    model, _ = _twinned_vit()
    tome, pitome = (tome_fx.transform(model, 8, method=m) for m in ("tome", "pitome"))
    assert pitome.predicted_flops() > tome.predicted_flops()
    assert pitome.predicted_flops(merging=False) == tome.predicted_flops(merging=False)
