"""Training with ToMe (issue 13): gradients through the merges equal an independent
implementation of the paper's algorithm (tests/reference.py) in float64."""

import copy

import pytest
import timm
import torch

import tome_fx
from reference import reference_vit


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
