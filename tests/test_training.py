"""Training with ToMe (issue 13): gradients through the merges equal an independent
implementation of the paper's algorithm (tests/reference.py) in float64."""

import copy
import datetime
import os
import pickle
import sys

import pytest
import torch

import tome_fx  # before timm: the DDP test's worker processes import this module afresh
import timm  # noqa: I001
from reference import reference_vit
from tome_fx.tools.bench import saved_for_backward


@pytest.mark.parametrize("schedule", [4, (4, -1)], ids=["constant", "decreasing"])
def test_gradients_equal_the_reference_in_float64(schedule):
    """Matching is discrete (argsort); the size-weighted average and proportional attention
    carry the gradients. In train mode (dropout 0), every parameter's gradient of the ToMe
    model equals the reference's, and so does the input's."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=3,
                              num_classes=10).double().train()
    fast = tome_fx.transform(model, schedule, example_inputs=torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert fast.training and fast.token_counts[-1] < fast.token_counts[0]
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    target = torch.randint(0, 10, (3,))

    def gradients(run):
        model.zero_grad(set_to_none=True)
        x = images.clone().requires_grad_()
        torch.nn.functional.cross_entropy(run(x), target).backward()
        return [x.grad] + [p.grad for p in model.parameters()]

    want = gradients(lambda x: reference_vit(model, x, fast.schedule)[0])
    got = gradients(fast)
    assert all(g is not None for g in got)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_a_compiled_training_step_matches_eager():
    """``torch.compile`` of a whole step (forward, backward, optimizer step) on a ToMe model:
    the updated weights equal an eager step's. (Dynamo splits such a step at ``backward`` and
    ``zero_grad`` by design, so it is not one graph; the ToMe forward compiles whole.)"""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                              embed_dim=64, num_heads=2, num_classes=10).train()
    images, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    states = []
    for compiled in (False, True):
        trained = copy.deepcopy(model)
        fast = tome_fx.transform(trained, 4, example_inputs=images)
        optimizer = torch.optim.SGD(fast.parameters(), lr=0.1)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(fast(images), target)
            loss.backward()
            optimizer.step()
            return loss

        (torch.compile(step) if compiled else step)()
        states.append({k: v.detach().clone() for k, v in trained.state_dict().items()})
    assert any(not torch.equal(states[0][k], v) for k, v in model.state_dict().items())
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-5)


def _small_deit(depth=2):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=depth,
                             embed_dim=64, num_heads=2, num_classes=10).train()


def test_bf16_autocast_training_runs_and_reaches_every_weight():
    model = _small_deit()
    images, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    fast = tome_fx.transform(model, 4, example_inputs=images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fast(images)
    assert logits.dtype == torch.bfloat16
    torch.nn.functional.cross_entropy(logits.float(), target).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    model, images = _small_deit(), torch.randn(4, 3, 32, 32)
    plain = tome_fx.transform(model, 4, example_inputs=images)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    wrapped = tome_fx.transform(checkpointed, 4, example_inputs=images)
    assert wrapped.grad_checkpointing and not plain.grad_checkpointing
    plain(images).sum().backward()
    wrapped(images).sum().backward()
    for a, b in zip(model.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_still_saves_memory():
    """torch.export traces through torch.utils.checkpoint; the blocks are checkpointed again
    after the passes, so backward keeps about what timm's own checkpointing keeps."""
    model, images = _small_deit(depth=4), torch.randn(8, 3, 32, 32)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    assert saved_for_backward(checkpointed, images) < saved_for_backward(model, images) / 4  # timm's saving
    wrapped = tome_fx.transform(checkpointed, 4, example_inputs=images)
    plain = tome_fx.transform(model, 4, example_inputs=images)
    assert saved_for_backward(wrapped, images) < saved_for_backward(plain, images) / 4


def test_set_grad_checkpointing_switches_it_and_keeps_the_model_whole():
    """On a ToMe model of a model without checkpointing: the state dict keeps the original's
    keys, no module is added, and outputs without gradients (eval, no_grad) are unchanged."""
    model, images = _small_deit(depth=3), torch.randn(4, 3, 32, 32)
    fast = tome_fx.transform(model, 4, example_inputs=images)
    before, modules = saved_for_backward(fast, images), [name for name, _ in fast.named_modules()]
    with torch.no_grad():
        want = fast(images)
    fast.set_grad_checkpointing()
    assert fast.grad_checkpointing and "grad_checkpointing=True" in repr(fast)
    assert saved_for_backward(fast, images) < before / 3
    assert list(fast.state_dict()) == list(model.state_dict())
    assert [name for name, _ in fast.named_modules()] == modules
    with torch.no_grad():
        torch.testing.assert_close(fast(images), want, rtol=0, atol=0)
    for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert copied.grad_checkpointing
        with torch.no_grad():
            torch.testing.assert_close(copied(images), want, rtol=0, atol=0)
    fast.eval()
    fast(images).sum().backward()  # eval mode captures again, checkpointed too
    fast.set_grad_checkpointing(False)
    assert saved_for_backward(fast.train(), images) == before
    assert not model.grad_checkpointing  # the original is left alone


def test_hf_activation_checkpointing_carries_over():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=128, num_labels=10)).train()
    images = torch.randn(4, 3, 32, 32)
    plain = tome_fx.transform(model, 4, example_inputs=images)
    model.activation_checkpointing_enable()
    checkpointed = tome_fx.transform(model, 4, example_inputs=images)
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    assert saved_for_backward(checkpointed, images) < saved_for_backward(plain, images) / 3


def test_a_compiled_checkpointed_training_step_matches_eager():
    model, images, target = _small_deit(), torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads = []
    for compiled in (False, True):
        fast = tome_fx.transform(model, 4, example_inputs=images)
        fast.set_grad_checkpointing()
        model.zero_grad(set_to_none=True)

        def step():
            torch.nn.functional.cross_entropy(fast(images), target).backward()

        (torch.compile(step) if compiled else step)()
        grads.append([p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _ddp_worker(rank, world, init_file, images, target, out):
    """One process of a DDP run: its share of the batch, gradients averaged over processes."""
    import torch.distributed as dist

    # a collective that cannot complete raises after a minute instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    model = _small_deit().double()
    fast = tome_fx.transform(model, 4, example_inputs=images[:2])
    ddp = torch.nn.parallel.DistributedDataParallel(fast)
    share = images.shape[0] // world
    part = slice(rank * share, (rank + 1) * share)
    torch.nn.functional.cross_entropy(ddp(images[part]), target[part]).backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out)
    dist.destroy_process_group()
    # the work is done and saved; a worker's interpreter shutdown can hang after gloo (2 runs in 6
    # here, every step finished first), which would stall mp.spawn: leave at once, exit code 0
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def test_ddp_on_two_processes_gives_the_single_process_gradients(tmp_path, monkeypatch):
    """A ToMe model wrapped in DistributedDataParallel (gloo, 2 CPU processes) computes the
    gradients of one process on the whole batch, in float64."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback: not whatever the hostname resolves to

    images, target = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), images, target, str(out)), nprocs=2)
    model = _small_deit().double()
    torch.nn.functional.cross_entropy(tome_fx.transform(model, 4, example_inputs=images[:2])(images), target).backward()
    for got, p in zip(torch.load(out), model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-12)
