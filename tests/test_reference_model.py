"""The shipped Fashion-MNIST reference model on the real test images."""

import os

import pytest

import tome_fx
from tome_fx.tools import evaluate, fashion_mnist


@pytest.fixture(scope="module")
def test_split():
    try:
        images, labels = fashion_mnist.load_split("test")
    except FileNotFoundError as error:
        if os.environ.get("TOME_FX_REQUIRE_DATA"):
            raise
        pytest.skip(str(error))
    return images[:2000], labels[:2000]


def test_shipped_checkpoint_is_accurate_and_tome_keeps_it(test_split):
    """>= 88% on the first 2000 test images; r=8 (197 -> 149 tokens) costs under 1 point."""
    model = fashion_mnist.create_model()
    images, labels = test_split
    models = {"original": model, "r=8": tome_fx.transform(model, 8)}
    accuracy = evaluate.top1(models, evaluate.chunks(images, labels, 500), len(images), progress=False)
    assert accuracy["original"] >= 0.88
    assert accuracy["r=8"] >= accuracy["original"] - 0.01


def test_shipped_rope_checkpoint_is_accurate_and_tome_keeps_it(test_split):
    """The RoPE twin: >= 88% on the first 2000 test images; r=8 with the default rotary
    rule (``mean``) costs under 1 point."""
    model = fashion_mnist.create_model(fashion_mnist.ROPE_CHECKPOINT, arch="rope")
    images, labels = test_split
    models = {"original": model, "r=8": tome_fx.transform(model, 8)}
    accuracy = evaluate.top1(models, evaluate.chunks(images, labels, 500), len(images), progress=False)
    assert accuracy["original"] >= 0.88
    assert accuracy["r=8"] >= accuracy["original"] - 0.01
