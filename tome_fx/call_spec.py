"""The original model's calling convention, kept by the transformed one.

``torch.export`` flattens a call into the tensors it was given: every other argument
(a ``return_features`` flag, ``output_attentions``, an argument left at its default) is
baked into the graph. ``CallSpec`` records the call made at capture and lays out later
calls as the graph takes them, so the original's positional and keyword arguments are accepted in
any form Python allows, and a baked-in value that a later call changes raises instead of
being silently ignored. The binding is plain Python (no ``inspect`` at call time), so
dynamo traces it under ``torch.compile``.
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

_P = inspect.Parameter
_MISSING = object()


def _default(param: inspect.Parameter):
    if param.kind is _P.VAR_POSITIONAL:
        return ()
    if param.kind is _P.VAR_KEYWORD:
        return {}
    return _MISSING if param.default is _P.empty else param.default


def _same(captured, given) -> bool:
    """``given`` fits a graph captured with ``captured``: a tensor where it had a tensor,
    equal values (and containers of the same shape) everywhere else."""
    if isinstance(captured, torch.Tensor):  # its dtype and rank may steer the captured code; sizes are checked later
        return isinstance(given, torch.Tensor) and (given.dtype, given.dim()) == (captured.dtype, captured.dim())
    if isinstance(captured, (tuple, list)):
        return (
            type(given) is type(captured)
            and len(given) == len(captured)
            and all(_same(c, g) for c, g in zip(captured, given))
        )
    if isinstance(captured, dict):
        return (
            isinstance(given, dict)
            and given.keys() == captured.keys()
            and all(_same(captured[k], given[k]) for k in captured)
        )
    if isinstance(captured, numbers.Number) and isinstance(given, numbers.Number):
        return bool(given == captured)  # 0 for False, 2 for 2.0, numpy scalars: Python treats them alike
    if type(given) is not type(captured):
        return False
    try:
        return bool(given == captured)
    except Exception:  # an object whose == is not a truth value
        return given is captured


def _describe(value) -> str:
    if value is _MISSING:
        return "left out"
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{'an' if dtype[0] in 'aeiou' else 'a'} {dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def _holds_tensor(value) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


@dataclass(frozen=True)
class CallSpec:
    """The arguments a model was captured with, by parameter name. The graph takes the
    tensors (by keyword, except positional-only and ``*args`` ones); every other argument
    is a constant bound into the model's forward while it is captured."""

    signature: inspect.Signature
    arguments: dict[str, Any]  # every argument given at capture (others took their defaults)
    chosen: tuple[str, ...] = ()  # arguments tome_fx set itself where the call left them out

    def choose(self, name: str, value) -> CallSpec:
        """The call with ``name=value`` where the model takes ``name`` (as a parameter, or in its
        ``**kwargs``) and the call left it out; later calls that leave it out get the same value."""
        params = self.signature.parameters
        var_keyword = next((p.name for p in params.values() if p.kind is _P.VAR_KEYWORD), None)
        if name in params and params[name].kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY):
            if name in self.arguments:
                return self
            arguments = {**self.arguments, name: value}
        elif var_keyword is not None and name not in params:
            extra = self.arguments.get(var_keyword, {})
            if name in extra:
                return self
            arguments = {**self.arguments, var_keyword: {**extra, name: value}}
        else:
            return self
        return CallSpec(self.signature, arguments, self.chosen + (name,))

    @classmethod
    def record(cls, model: torch.nn.Module, args: tuple, kwargs: dict) -> CallSpec:
        signature = inspect.signature(model.forward)
        return cls(signature, dict(signature.bind(*args, **kwargs).arguments))  # TypeError as the model would raise

    def graph_call(self, arguments: dict[str, Any]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the tensors among ``arguments`` (values by parameter name),
        as the captured graph takes them."""
        args, kwargs = [], {}
        for name, value in arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is _P.VAR_POSITIONAL:
                args.extend(value)
            elif kind is _P.POSITIONAL_ONLY:
                args.append(value)
            elif kind is _P.VAR_KEYWORD:
                kwargs.update((key, v) for key, v in value.items() if _holds_tensor(v))
            elif _holds_tensor(value):
                kwargs[name] = value
        return tuple(args), kwargs

    def constants(self) -> dict[str, Any]:
        """The captured non-tensor keyword arguments, bound into the forward at capture."""
        found = {}
        for name, value in self.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is _P.VAR_KEYWORD:
                found.update((key, v) for key, v in value.items() if not _holds_tensor(v))
            elif kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY) and not _holds_tensor(value):
                found[name] = value
        return found

    def original_call(self) -> tuple[tuple, dict]:
        """The capture's own call, as ``(args, kwargs)`` for the original's forward."""
        arguments = {name: {k: v for k, v in value.items() if k not in self.chosen}
                     if self.signature.parameters[name].kind is _P.VAR_KEYWORD else value
                     for name, value in self.arguments.items() if name not in self.chosen}
        bound = inspect.BoundArguments(self.signature, arguments)
        return bound.args, bound.kwargs

    def with_tensors(self, convert) -> CallSpec:
        """The same call with every tensor argument passed through ``convert``."""
        return CallSpec(self.signature, pytree.tree_map(lambda v: convert(v) if isinstance(v, torch.Tensor) else v,
                                                        self.arguments), self.chosen)

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Lay out a call made the way the original accepts it (positional or keyword) as the
        graph expects it. Raises ``TypeError`` where the original would (a missing or unknown
        argument) and ``ValueError`` where a value baked in at capture would change."""
        values = self._bind_names(args, kwargs)
        for name, param in self.signature.parameters.items():
            default = _default(param)
            captured = self.arguments.get(name, default)
            given = values.get(name, captured if name in self.chosen else default)
            if given is _MISSING:
                raise TypeError(f"forward() missing a required argument: '{name}'")
            if param.kind is _P.VAR_KEYWORD:  # each extra keyword on its own
                for key in captured.keys() | given.keys():
                    left_out = captured.get(key, _MISSING) if key in self.chosen else _MISSING
                    self._check(key, captured.get(key, _MISSING), given.get(key, left_out))
            else:
                self._check(name, captured, given)
        return self.graph_call({name: values.get(name, self.arguments[name]) for name in self.arguments})

    @staticmethod
    def _check(name: str, captured, given) -> None:
        if not _same(captured, given):
            raise ValueError(
                f"argument `{name}` was {_describe(captured)} when the model was transformed, and "
                f"such values are fixed in the captured graph; in this call it is {_describe(given)}. "
                "Call tome_fx.transform again with example_inputs that pass it"
            )

    def _bind_names(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        params = list(self.signature.parameters.values())
        values: dict[str, Any] = {}
        takes_positional = [p for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
        var_positional = next((p.name for p in params if p.kind is _P.VAR_POSITIONAL), None)
        var_keyword = next((p.name for p in params if p.kind is _P.VAR_KEYWORD), None)
        for param, value in zip(takes_positional, args):
            values[param.name] = value
        if len(args) > len(takes_positional):
            if var_positional is None:
                raise TypeError(f"forward() takes {len(takes_positional)} positional arguments but {len(args)} were given")
            values[var_positional] = tuple(args[len(takes_positional) :])
        named = {p.name: p for p in params if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)}
        for key, value in kwargs.items():
            if key in values:
                raise TypeError(f"forward() got multiple values for argument '{key}'")
            if key in named:
                values[key] = value
            elif var_keyword is not None:
                values.setdefault(var_keyword, {})[key] = value
            else:
                raise TypeError(f"forward() got an unexpected keyword argument '{key}'")
        return values
