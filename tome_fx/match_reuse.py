"""Match reuse across denoising steps (``tome_fx.sd.apply(..., reuse=k)``).

Computing the matching is the merge's main cost, and a denoiser's tokens change little from
one step to the next (AsymRnR, ToMA and SDTM reuse matchings so). For one input shape there
are two graphs (``branch_merges.apply_branch_tome``'s ``matchings``): one matches and stores
each block's matching in buffers, one reads them instead. A step is told apart by the
``timestep`` argument (a call without one is a step of its own); calls within one step
(FLUX's and Wan's prompted and unprompted calls) are slots, each with its own buffers, so each
reuses its own matching. A slot matches at its first step and then every ``every`` steps; a
timestep higher than the last, or a call beyond ``SLOTS`` at one timestep, starts a new
generation, which matches first. A model called without ``timestep`` does not reuse.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.fx import GraphModule


SLOTS = 4  # calls per step at most: prompted, unprompted, and room for an image-guidance pair


class MatchReuse:
    """Runs one input shape's store and reuse graphs; ``prepare`` wraps each graph module made
    (``torch.compile`` where the model is compiled)."""

    def __init__(self, store: GraphModule, reuse: GraphModule, every: int, prepare: Callable):
        self.templates, self.every, self.prepare = (store, reuse), every, prepare
        self.slots: list[tuple] = []  # per slot: (store graph, reuse graph) sharing their buffers
        self.matched: dict[int, int] = {}  # slot -> the step it last matched at
        self.step, self.slot, self.last = 0, 0, None

    def __call__(self, step_value, *args, **kwargs):
        equal = self.last is not None and _equal(step_value, self.last)
        same_step = equal and self.slot + 1 < SLOTS
        if (equal and not same_step) or _rises(step_value, self.last):
            # the timestep went up, or stayed past the slots of one step (one-step models): a new
            # generation, whose first step matches
            self.matched.clear()
        self.step, self.slot = (self.step, self.slot + 1) if same_step else (self.step + 1, 0)
        self.last = step_value.detach().clone() if isinstance(step_value, torch.Tensor) else step_value
        while len(self.slots) <= self.slot:
            self.slots.append(self._new_slot())
        store, reuse = self.slots[self.slot]
        if self.slot in self.matched and self.step - self.matched[self.slot] < self.every:
            return reuse(*args, **kwargs)
        self.matched[self.slot] = self.step
        return store(*args, **kwargs)

    def rewrap(self, prepare: Callable) -> None:
        """Wrap every graph module anew (``compile`` after graphs were made)."""
        self.prepare = prepare
        self.slots = [tuple(prepare(getattr(g, "_orig_mod", g)) for g in pair) for pair in self.slots]

    def _new_slot(self) -> tuple:
        """Module copies of the two graphs (the graph and parameters shared) with buffers of
        their own for the matchings, shared between the two."""
        store, reuse = (GraphModule(t, t.graph) for t in self.templates)
        for name, buffer in self.templates[0].named_buffers():
            if name.startswith("matching_"):
                fresh = torch.zeros_like(buffer)
                store.register_buffer(name, fresh, persistent=False)
                reuse.register_buffer(name, fresh, persistent=False)
        return self.prepare(store), self.prepare(reuse)


def _rises(value, last) -> bool:
    """Whether the timestep went up since the last call (denoising only ever lowers it)."""
    if value is None or last is None:
        return False
    if isinstance(value, torch.Tensor) or isinstance(last, torch.Tensor):
        value, last = torch.as_tensor(value).float().cpu(), torch.as_tensor(last).float().cpu()
        return value.shape == last.shape and bool((value > last).any())
    return value > last


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))
    return a == b
