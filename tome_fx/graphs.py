"""How a ToMe model stays one ``nn.Module`` with its original: the bookkeeping under ``ToMeModel``.

A ``GraphsPerMode`` runs graphs captured from an original model, one per train/eval mode
(dropout, drop-path and every other mode-dependent op are captured as the mode runs them),
all reading one tree of parameters, buffers and submodules, which it shares with the
original. ``.to()`` keeps the sharing and captures again where the weights' dtype or device
changed; ``copy.deepcopy`` copies the tree once and points every graph at the copy. What a
graph is (and how it is captured) is the subclass's: ``ToMeModel`` in ``api.py``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch

# what a module's parameters, buffers and submodules live in: the model owns one tree, and
# every graph it captured reads its weights from it
TREE = ("_parameters", "_buffers", "_non_persistent_buffers_set")
_GUARDS = "_guards_fn"  # export's input-guard module: each graph keeps its own


def mode_of(model: torch.nn.Module) -> bool | None:
    """The mode every submodule is in, or None where they differ."""
    modes = {module.training for module in model.modules()}
    return modes.pop() if len(modes) == 1 else None


@contextlib.contextmanager
def in_mode(model: torch.nn.Module, mode: bool | None):
    """``model`` switched to train (True) or eval (False) mode, every submodule's own flag
    restored afterwards; None leaves it as it is."""
    saved = [(module, module.training) for module in model.modules()]
    try:
        if mode is not None:
            model.train(mode)
        yield
    finally:
        for module, training in saved:
            module.training = training


def adopt_buffers(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Point ``target``'s buffers at ``source``'s of the same name where ``.to()`` replaced one
    side's: a ToMe model and its original keep one set of buffers."""
    theirs = dict(source.named_buffers())
    for name, buffer in target.named_buffers():
        if name in theirs and theirs[name] is not buffer:
            owner, _, attr = name.rpartition(".")
            target.get_submodule(owner)._buffers[attr] = theirs[name]


class InstanceSignature:
    """``inspect.signature(instance)`` reads ``__signature__``: the forward's, without ``self``.
    On the class it is None, so the class's own signature is left alone."""

    def __get__(self, instance, owner):
        return None if instance is None else inspect.signature(instance.forward)


def with_signature(cls: type, signature: inspect.Signature) -> type:
    """A subclass of ``cls`` whose ``forward`` shows ``signature`` (the original model's), so
    that ``inspect`` and ``torch.export`` bind arguments to the original's parameter names."""

    def forward(self, *args, **kwargs):
        return cls.forward(self, *args, **kwargs)

    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    forward.__signature__ = signature.replace(parameters=[this, *signature.parameters.values()])
    forward.__doc__ = cls.forward.__doc__
    namespace = {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return type(cls.__name__, (cls,), namespace)


class GraphsPerMode(torch.nn.Module):
    """Graphs captured from ``source``, one per mode, sharing one tree of weights with it.
    Subclasses say how a graph is captured (``_capture``) and what changes when the weights
    move to another dtype or device (``_retarget``)."""

    __signature__ = InstanceSignature()

    def __init__(self, source: torch.nn.Module, graph_module: torch.fx.GraphModule, mode: bool | None):
        super().__init__()
        self.__dict__.update(_source=source, _graphs={}, _mode=mode)
        for attr in TREE:
            object.__setattr__(self, attr, getattr(graph_module, attr))
        self._modules.update((name, m) for name, m in graph_module._modules.items() if name != _GUARDS)
        self._attach(mode, graph_module)
        self.__dict__["_captured_for"] = self._weights_kind()
        torch.nn.Module.train(self, source.training)

    def _capture(self, mode: bool | None) -> torch.fx.GraphModule:
        raise NotImplementedError

    def _retarget(self, dtype: torch.dtype, device: torch.device) -> None:
        """The weights moved to ``dtype``/``device``: adapt what the next capture reads."""

    def _attach(self, mode: bool | None, graph_module: torch.fx.GraphModule) -> None:
        """Run ``graph_module`` in ``mode``, reading this model's weights."""
        self._share_weights(graph_module)
        self._graphs[mode] = graph_module

    def _share_weights(self, graph_module: torch.fx.GraphModule) -> None:
        """Make ``graph_module`` read every parameter, buffer and submodule from this model."""
        for attr in TREE:
            object.__setattr__(graph_module, attr, getattr(self, attr))
        graph_module._modules.update(self._modules)

    def _recapture(self) -> None:
        """Drop every graph and capture the current mode's again."""
        self._graphs.clear()
        self._attach(self._mode, self._capture(self._mode))

    @property
    def original(self) -> torch.nn.Module:
        """The model this one was made from (it shares its parameters)."""
        return self._source

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The rewritten graph the current mode runs."""
        return self._graphs[self._mode]

    def train(self, mode: bool = True):
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        if mode != self._mode:
            if mode not in self._graphs:
                self._attach(mode, self._capture(mode))
            self.__dict__["_mode"] = mode
        return super().train(mode)

    def _weights_kind(self) -> tuple[torch.dtype, torch.device] | None:
        weights = next((p for p in self.parameters() if p.is_floating_point()), None)
        return None if weights is None else (weights.dtype, weights.device)

    def _apply(self, fn, recurse=True):
        """``.to()`` and friends: parameters change in place (the original sees them), buffers are
        replaced (the original gets the new ones too, so the two stay one model)."""
        result = super()._apply(fn, recurse)
        adopt_buffers(self._source, self)
        self._follow_weights()
        return result

    def _follow_weights(self) -> None:
        """Where the weights' dtype or device changed since the graph was captured (through this
        model, or through another one sharing the original), take the original's buffers and
        capture the graph again for them: captured code may depend on the dtype (an upcast
        softmax, say)."""
        kind = self._weights_kind()
        if kind is None or kind == self._captured_for:
            return
        adopt_buffers(self, self._source)
        self._retarget(*kind)
        self.__dict__["_captured_for"] = kind
        self._recapture()

    def __deepcopy__(self, memo):
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        for mode, graph_module in copied._graphs.items():
            copied._attach(mode, graph_module)
        return copied
