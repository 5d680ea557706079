"""Submodules transformed where a model calls them, swapped into a shallow copy of it.

A model that generates (HF ``GenerationMixin``: a VLM, an LLM) calls itself once per new
token with a growing key/value cache and other arguments at every step; no one captured
graph holds that. What merges is a part called once per prompt (the vision tower), so
that part is captured on its own, with the arguments the model passes it in an example
call, and the model runs as it always did around it: ``generate()``, the cache and every
argument keep working.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch


def generates(model: torch.nn.Module) -> bool:
    """Whether ``model`` decodes step by step (HF's ``GenerationMixin``)."""
    return callable(getattr(model, "generate", None)) and callable(getattr(model, "prepare_inputs_for_generation", None))


def recorded_calls(model: torch.nn.Module, paths: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """``(args, kwargs)`` of each submodule's first call during ``model(*args, **kwargs)``."""
    calls: dict[str, tuple[tuple, dict]] = {}

    def hook(path):
        def record(_, call_args, call_kwargs):
            calls.setdefault(path, (call_args, call_kwargs))

        return record

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [p for p in paths if p not in calls]
    if missing:
        raise ValueError(f"scope {missing} is not called when the model runs on example_inputs, so there is nothing "
                         "to capture it with: pass example_inputs that reach it (pixel_values for a vision tower)")
    return calls


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    """A copy sharing parameters, buffers and children, whose own registries (children,
    parameters, buffers, hooks) are new dicts: a swap or an assignment on it leaves
    ``module`` alone."""
    twin = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, dict):
            setattr(twin, name, type(value)(value))
    return twin


def _shallow_tree(model: torch.nn.Module) -> torch.nn.Module:
    """``_shallow`` copies of ``model`` and every module under it, linked as the originals
    are (a module held twice stays one): switching modes, hooks and swaps on the copy leave
    ``model`` alone, while parameters and buffers are shared."""
    copies: dict[int, torch.nn.Module] = {}

    def copy_of(module: torch.nn.Module) -> torch.nn.Module:
        if id(module) not in copies:
            twin = copies[id(module)] = _shallow(module)
            for name, child in module._modules.items():
                twin._modules[name] = None if child is None else copy_of(child)
        return copies[id(module)]

    return copy_of(model)


def swapped(model: torch.nn.Module, replace: dict[str, Callable[[torch.nn.Module], torch.nn.Module]]) -> torch.nn.Module:
    """A copy of ``model`` (``_shallow_tree``) in which each submodule at a path of
    ``replace`` is ``replace[path](submodule)``."""
    root = _shallow_tree(model)
    for path, make in replace.items():
        parent, _, name = path.rpartition(".")
        root.get_submodule(parent)._modules[name] = make(model.get_submodule(path))
    return root


_MIXED: dict[tuple[type, type], type] = {}


def _wrapping(impl: Callable, original: Callable) -> Callable:
    """``impl`` under ``original``'s name and signature (HF reads ``forward``'s parameters)."""
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return impl(self, *args, **kwargs)

    return method


def retyped(module: torch.nn.Module, mixin: type, **state) -> torch.nn.Module:
    """A shallow copy of ``module`` whose class is ``mixin`` over the module's own (so it is
    still an instance of it and keeps its parameters' names), with ``state`` set on it. The
    methods the mixin defines show the signatures of those they override."""
    base = type(module)
    if (base, mixin) not in _MIXED:
        methods = {name: _wrapping(impl, getattr(base, name)) for name, impl in vars(mixin).items()
                   if callable(impl) and not name.startswith("__") and callable(getattr(base, name, None))}
        _MIXED[base, mixin] = type(f"{mixin.__name__.lstrip('_')}{base.__name__}", (mixin, base),
                                   {"__module__": mixin.__module__, **methods})
    twin = _shallow(module)
    twin.__class__ = _MIXED[base, mixin]
    twin.__dict__.update(state)
    return twin
