"""A ToMe model behaves like the module it replaces: modes, calling convention, persistence."""

import copy
import inspect
import io
import pickle

import pytest
import timm
import torch
import transformers as T
from torch import nn

import tome_fx

IMAGES = (3, 64, 64)


def _deit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2, num_classes=4, **kwargs).eval()


@pytest.fixture(scope="module")
def stochastic():
    """Dropout everywhere and drop-path: train mode changes what the model computes."""
    return _deit(drop_rate=0.2, proj_drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3)


def _flags(model):
    return [m.training for m in model.modules()]


def test_train_and_eval_switch_dropout_and_drop_path_as_in_the_original(stochastic):
    x = torch.randn(3, *IMAGES)
    flags = _flags(stochastic)
    fast = tome_fx.transform(stochastic, 0)
    assert fast.training is False
    assert fast.train() is fast and fast.training is True
    reference = copy.deepcopy(stochastic).train()
    torch.manual_seed(1)
    got = fast(x)
    torch.manual_seed(1)
    want = reference(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # same random draws, same ops
    fast.eval()
    assert fast.training is False
    torch.testing.assert_close(fast(x), stochastic(x), rtol=0, atol=0)
    assert _flags(stochastic) == flags  # switching modes never touches the original


def test_a_model_transformed_in_train_mode_drops_dropout_in_eval(stochastic):
    x = torch.randn(3, *IMAGES)
    fast = tome_fx.transform(copy.deepcopy(stochastic).train(), 4)
    assert fast.training is True
    assert not torch.equal(fast(x), fast(x))  # dropout is on
    parent = nn.Sequential(fast).eval()  # a parent's eval() reaches it
    assert fast.training is False and not any(_flags(parent))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), fast(x), rtol=0, atol=0)
        torch.testing.assert_close(fast(x), tome_fx.transform(stochastic, 4)(x), rtol=0, atol=0)


def test_train_mode_gives_gradients_to_the_shared_parameters():
    model = _deit()
    fast = tome_fx.transform(model, 4).train()
    fast(torch.randn(2, *IMAGES)).sum().backward()
    assert model.blocks[1].mlp.fc2.weight.grad is not None  # the same tensors as the original's


def test_called_with_keyword_arguments_and_shows_the_original_signature():
    model = _deit()
    fast = tome_fx.transform(model, 4)
    x = torch.randn(2, *IMAGES)
    assert inspect.signature(fast) == inspect.signature(model.forward)
    assert inspect.signature(fast.forward) == inspect.signature(model.forward)
    with torch.no_grad():
        torch.testing.assert_close(fast(x=x), fast(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'images'"):
        fast(images=x)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(fast, (x,), dynamic_shapes=({0: batch},))  # as users write it
    x5 = torch.randn(5, *IMAGES)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x5), fast(x5), rtol=1e-5, atol=1e-5)


def test_hf_keyword_inputs():
    model = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, image_size=16, patch_size=4)).eval()
    fast = tome_fx.transform(model, 2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(pixel_values=x).pooler_output, fast(x).pooler_output, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`output_hidden_states` was left out .* fixed in the captured graph"):
        fast(x, output_hidden_states=True)


class _Flagged(nn.Module):
    """A user's ViT with non-tensor and optional tensor arguments."""

    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, bias=None, *, return_features: bool = False, scale: float = 1.0):
        h = self.embed(x) * scale
        q, k, v = self.qkv(h).reshape(*h.shape[:2], 3, 2, 4).permute(2, 0, 3, 1, 4)
        h = h + self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        if bias is not None:
            h = h + bias
        return h if return_features else h.mean(1)


def test_values_fixed_at_transform_time_cannot_change_silently():
    model = _Flagged().eval()
    x = torch.randn(2, 16, 4)
    fast = tome_fx.transform(model, 2, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(fast(x, return_features=False, scale=1.0), fast(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"`return_features` was False when the model was transformed"):
            fast(x, return_features=True)
        with pytest.raises(ValueError, match=r"`scale` was 1.0 .* in this call it is 2.0"):
            fast(x, scale=2.0)
        with pytest.raises(ValueError, match=r"`bias` was None .* it is a float32 tensor of shape"):
            fast(x, torch.zeros(2, 1, 8))
        features = tome_fx.transform(model, 2, example_inputs={"x": x, "return_features": True})
        assert features(x=x, return_features=True).shape == (2, 16, 8)
        restored = pickle.loads(pickle.dumps(features))  # transformed again with the same arguments
        torch.testing.assert_close(restored(x, return_features=True), features(x, return_features=True))
        with pytest.raises(TypeError, match="missing a required argument: 'x'"):
            features(return_features=True)


def test_state_dict_has_the_original_keys_and_round_trips():
    model, other = _deit(), _deit()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    fast = tome_fx.transform(model, 4)
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(2, *IMAGES)
    fast_other = tome_fx.transform(other, 4)
    with torch.no_grad():
        copied = copy.deepcopy(fast)
        copied.load_state_dict(other.state_dict())  # an original's checkpoint loads into the ToMe model
        torch.testing.assert_close(copied(x), fast_other(x), rtol=0, atol=0)
        copied.load_state_dict(fast.state_dict())
        torch.testing.assert_close(copied(x), fast(x), rtol=0, atol=0)
        assigned = copy.deepcopy(fast).train()  # both mode graphs see assigned tensors
        assigned.load_state_dict(other.state_dict(), assign=True)
        torch.testing.assert_close(assigned.eval()(x), fast_other(x), rtol=0, atol=0)


def test_deepcopy_is_independent_of_the_original():
    model = _deit()
    fast = tome_fx.transform(model, 4)
    x = torch.randn(2, *IMAGES)
    with torch.no_grad():
        before = fast(x)
        copied = copy.deepcopy(fast)
        torch.testing.assert_close(copied(x), before, rtol=0, atol=0)
        for p in copied.parameters():
            p.zero_()
        torch.testing.assert_close(fast(x), before, rtol=0, atol=0)
        assert not torch.equal(copied(x), before)


def test_pickle_and_torch_save_round_trip(stochastic):
    fast = tome_fx.transform(copy.deepcopy(stochastic), 4).train()
    x = torch.randn(2, *IMAGES)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.training and loaded.schedule == fast.schedule
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), fast.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(pickle.loads(pickle.dumps(fast))(x), fast(x), rtol=0, atol=0)


def test_compiled_model_copies_and_refuses_pickling_with_advice():
    model = _deit()
    compiled = tome_fx.compile(model, 4, fullgraph=True)
    assert inspect.signature(compiled) == inspect.signature(model.forward)
    with pytest.raises(TypeError, match=r"save the ToMeModel \(`compiled.model`\)"):
        pickle.dumps(compiled)
    x = torch.randn(2, *IMAGES)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(compiled)(x=x), compiled.model(x), rtol=1e-4, atol=1e-4)


def test_to_dtype_and_device():
    model = _deit()
    fast = tome_fx.transform(copy.deepcopy(model), 4)
    x = torch.randn(2, *IMAGES)
    assert fast.to("cpu") is fast
    fast.to(torch.float64)
    with torch.no_grad():
        want = tome_fx.transform(model.double(), 4)(x.double())
        got = fast(x.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    fast.train().eval()  # a mode captured after the conversion uses the converted weights
    assert fast(x.double()).dtype == torch.float64


@pytest.mark.parametrize(
    "inputs, message",
    [
        ("an image", r"hold no torch.Tensor with a batch dimension \(got str\)"),
        ([1, 2, 3], r"\(got int, int, int\)"),
    ],
)
def test_example_inputs_that_are_not_tensors_are_explained(inputs, message):
    with pytest.raises(TypeError, match=message):
        tome_fx.transform(_Flagged(), 2, example_inputs=inputs)


def test_numpy_example_inputs_suggest_from_numpy():
    with pytest.raises(TypeError, match="torch.from_numpy"):
        tome_fx.transform(_Flagged(), 2, example_inputs=torch.randn(2, 16, 4).numpy())


def test_torchscript_modules_are_explained():
    model = _Flagged().eval()
    traced = torch.jit.trace(model, torch.randn(2, 16, 4))
    with pytest.raises(TypeError, match="TorchScript module .* pass the nn.Module it was made from"):
        tome_fx.transform(traced, 2, example_inputs=torch.randn(2, 16, 4))


def test_a_tensor_of_another_dtype_is_refused_and_equal_numbers_are_accepted():
    """The dtype of a tensor argument may steer the captured code (a bool mask filled, a float
    mask added); an int where a float was captured is the same value to Python."""
    model = _Flagged().eval()
    x = torch.randn(2, 16, 4)
    fast = tome_fx.transform(model, 2, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(fast(x, scale=1), fast(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`x` was a float32 tensor .* it is a float64 tensor"):
        fast(x.double())


def test_to_dtype_keeps_buffers_shared_and_what_is_saved_loads():
    model = _deit()
    model.register_buffer("scale", torch.ones(1))
    fast = tome_fx.transform(model, 4).to(torch.float64)
    assert model.scale.dtype == torch.float64 and model.scale is fast.get_buffer("scale")
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    x = torch.randn(2, *IMAGES, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), fast(x), rtol=0, atol=0)


def test_a_dtype_change_made_through_another_tome_model_is_followed():
    """Two ToMe models of one original (an r sweep): converting one converts the shared
    weights and buffers, and the other captures again for them on its next call."""
    model = _deit()
    model.register_buffer("scale", torch.ones(1))
    first, second = tome_fx.transform(model, 0), tome_fx.transform(model, 4)
    first.to(torch.float64)
    x = torch.randn(2, *IMAGES, dtype=torch.float64)
    with torch.no_grad():
        got = second(x)
        want = tome_fx.transform(copy.deepcopy(model), 4)(x)
    assert got.dtype == torch.float64 and second.get_buffer("scale") is model.scale
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_model_has_the_original_keys_and_keeps_its_mode_when_copied():
    model = _deit()
    compiled = tome_fx.compile(model, 4)
    assert list(compiled.state_dict()) == list(model.state_dict())
    assert copy.deepcopy(compiled).training is False
    assert compiled.train().model.training is True
    compiled.eval().to(torch.float64)  # through the model's own .to(): captured again for float64
    assert compiled.model.graph_module is not None and model.blocks[0].mlp.fc1.weight.dtype == torch.float64
    x = torch.randn(2, *IMAGES, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), compiled.model(x), rtol=1e-6, atol=1e-6)


def test_a_mode_that_merges_differently_says_how():
    """timm's patch dropout keeps fewer tokens in training: the train-mode graph cannot share
    the eval-mode schedule, and the error shows both token counts."""
    fast = tome_fx.transform(_deit(patch_drop_rate=0.5), 2)
    with pytest.raises(tome_fx.UnsupportedModelError, match=r"in train mode the model merges differently: tokens "
                                                           r"per block \[9, .*against \[17,"):
        fast.train()
