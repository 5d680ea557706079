"""Capture a model as an aten-level fx graph with a dynamic batch dimension."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .call_spec import CallSpec
from .errors import UnsupportedModelError

ExampleInputs = tuple[tuple[Any, ...], dict[str, Any]]


def _stated_input_size(model: torch.nn.Module) -> tuple[int, ...] | None:
    """Per-sample input shape where the model states it: timm's patch embedding (which follows
    an ``img_size=`` override) or ``pretrained_cfg``; HF's ``config.image_size``/``num_channels``
    (and ``num_frames`` for video); torchvision's ``image_size``."""
    embed = getattr(model, "patch_embed", None)
    img_size, proj = getattr(embed, "img_size", None), getattr(embed, "proj", None)
    if isinstance(img_size, tuple) and isinstance(getattr(proj, "in_channels", None), int):
        return (proj.in_channels, *img_size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(cfg["input_size"])
    config = getattr(model, "config", None)
    side, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(channels, int) and side:
        size = (channels, *((side, side) if isinstance(side, int) else side))
        frames = getattr(config, "num_frames", None)
        return (frames, *size) if isinstance(frames, int) else size
    conv = getattr(model, "conv_proj", None)
    if isinstance(getattr(model, "image_size", None), int) and isinstance(getattr(conv, "in_channels", None), int):
        return (conv.in_channels, model.image_size, model.image_size)
    return None


def default_example_inputs(model: torch.nn.Module) -> torch.Tensor | None:
    """A batch of two random inputs of the size the model states, or None."""
    input_size = _stated_input_size(model)
    if input_size is None:
        return None
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else None
    return torch.randn(2, *input_size, dtype=dtype, device=device)


def normalize_example_inputs(model: torch.nn.Module, example_inputs) -> ExampleInputs:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional args or a dict of keyword args."""
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
        if example_inputs is None:
            raise ValueError(
                f"{type(model).__name__} does not state its input size; pass example_inputs "
                "(a tensor, a tuple of positional args, or a dict of keyword args)"
            )
    if isinstance(example_inputs, dict):
        inputs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        inputs = tuple(example_inputs), {}
    else:
        inputs = (example_inputs,), {}
    if not any(batch_mask(inputs)):
        leaves = pytree.tree_leaves(inputs)
        hint = " (convert arrays with torch.from_numpy)" if any(hasattr(v, "__array__") for v in leaves) else ""
        raise TypeError(
            "example_inputs hold no torch.Tensor with a batch dimension (got "
            f"{', '.join(type(v).__name__ for v in leaves) or 'nothing'}){hint}; pass a tensor, a tuple of "
            "positional args or a dict of keyword args, as the model's forward takes them"
        )
    return inputs


def tensors_of(inputs) -> list[torch.Tensor]:
    """The tensors among ``inputs`` (any nesting of args/kwargs), in order."""
    return [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]


def batch_mask(inputs) -> tuple[bool, ...]:
    """Which of ``tensors_of(inputs)`` hold the batch on dim 0: those whose dim 0 is the first
    such tensor's. Others (FLUX's 2-d ``img_ids``/``txt_ids``, a table passed in) and 0-d
    tensors keep their shape whatever the batch."""
    tensors = tensors_of(inputs)
    batch = next((t.shape[0] for t in tensors if t.dim() > 0), None)
    return tuple(t.dim() > 0 and t.shape[0] == batch for t in tensors)


def batched_tensors(inputs, mask: tuple[bool, ...] | None = None) -> list[torch.Tensor]:
    """The tensors among ``inputs`` that hold the batch (by ``mask``, else ``batch_mask``)."""
    tensors = tensors_of(inputs)
    return [t for t, batched in zip(tensors, batch_mask(inputs) if mask is None else mask) if batched]


def _map_batched(fn, inputs, mask: tuple[bool, ...]):
    """``inputs`` with ``fn`` applied to the tensors that hold the batch."""
    leaves, spec = pytree.tree_flatten(inputs)
    flags = iter(mask)
    return pytree.tree_unflatten(
        [fn(v) if isinstance(v, torch.Tensor) and next(flags) else v for v in leaves], spec)


def _with_batch_of_two(arguments: dict[str, Any], mask: tuple[bool, ...]) -> dict[str, Any]:
    """torch.export specializes a batch of 1 to a constant; trace with 2 to keep it dynamic."""
    if any(t.shape[0] != 1 for t in batched_tensors(arguments, mask)):
        return arguments
    return _map_batched(lambda t: torch.cat([t, t]), arguments, mask)


@contextlib.contextmanager
def _constants_bound(model: torch.nn.Module, constants: dict[str, Any]):
    """``model.forward`` with ``constants`` bound in (an instance attribute, removed after):
    torch.export then sees the tensors alone. (Non-tensor values in ``**kwargs`` beside a
    dynamic batch trip up its ``dynamic_shapes`` matching.)"""
    had = "forward" in model.__dict__
    saved = model.__dict__.get("forward")
    model.forward = functools.partial(model.forward, **constants)
    try:
        yield
    finally:
        if had:
            model.forward = saved
        else:
            del model.forward


def capture(model: torch.nn.Module, call: CallSpec, dynamic_batch: bool = True) -> torch.fx.GraphModule:
    """``torch.export`` the model as called in ``call`` (batch dynamic, unless not
    ``dynamic_batch``) and return its unlifted GraphModule, which takes the tensors as
    ``call.graph_call`` lays them out.

    Parameters and buffers of the result are the model's own tensors (shared, not copied).
    """
    mask = batch_mask(call.arguments)
    arguments = _with_batch_of_two(call.arguments, mask) if dynamic_batch else call.arguments
    args, kwargs = call.graph_call(arguments)
    batch = torch.export.Dim("batch", min=1)
    marked = {id(t) for t in batched_tensors(arguments, mask)}
    try:
        with _constants_bound(model, call.constants()):
            named = inspect.signature(model.forward).bind(*args, **kwargs).arguments
            dynamic = {name: pytree.tree_map(lambda v: {0: batch} if id(v) in marked else None, value)
                       for name, value in named.items()} if dynamic_batch else None
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic)
    except Exception as error:  # export raises many types; all mean "not capturable"
        raise UnsupportedModelError(
            f"torch.export could not capture {type(model).__name__}{' with a dynamic batch' if dynamic_batch else ''}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    return program.module()
