"""Fewer visual tokens into a VLM's language model: ``tome_fx.vlm.apply``.

Most of a VLM's cost is the language model's prefill over the visual tokens, and merging
inside the vision tower alone saves little when every token is un-merged for the language
model. Here the tower returns its merged tokens, in the raster order of each one's first
patch; the model's own projector runs on them; and the prompt is cut to match: each
image's run of placeholder tokens in ``input_ids`` keeps as many as the image has merged
tokens, and the attention mask, position ids, labels and token types lose the same
columns. This happens inside the call, so a processor's output and ``generate(**inputs)``
work unchanged (``generate`` returns the caller's prompt ids followed by the new ones).

The tower is captured per input shape (``tome_fx.transform`` with ``unmerge_outputs=False``),
merging only in the blocks whose output the model reads as its image features (Llava's
``vision_feature_layer``).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .. import api, submodules
from ..call_spec import CallSpec
from ..errors import UnsupportedModelError
from ..merge import merge_down
from ..schedule import clamp_schedule, resolve_schedule, spread

_TOWERS = ("vision_tower", "visual", "vision_model")  # where HF VLMs keep their vision towers
_PER_TOKEN = ("attention_mask", "position_ids", "labels", "token_type_ids", "mm_token_type_ids")  # cut with them


@dataclass
class _Tower:
    """What the merging tower needs: the original, how much to merge, its graphs per input
    shape, and the last call's token state. The prompt sets ``tokens`` (placeholders per
    image) and ``feature_blocks`` (the blocks feeding the features) before each encoding:
    the model, not the prompt, calls the tower."""

    original: torch.nn.Module
    target: tuple[str, Any]  # ("keep", tokens) | ("ratio", share) | ("r", a schedule)
    graphs: dict = field(default_factory=dict)
    tokens: int = 0
    feature_blocks: int | None = None  # None: every block
    sizes: torch.Tensor | None = None  # [images, tokens out], [images, tokens in]: the last call's TokenState
    positions: torch.Tensor | None = None

    def merged_away(self) -> int:
        kind, value = self.target
        if kind == "keep":
            if value > self.tokens:
                raise ValueError(f"keep={value} visual tokens per image, but an image has only {self.tokens}")
            return self.tokens - value
        return round(self.tokens * value)

    def build(self, args: tuple, kwargs: dict) -> api.ToMeModel:
        """The tower captured for this call, its schedule made from its blocks and tokens."""
        name = type(self.original).__name__
        try:
            fast = api._transform(self.original, args, kwargs, api._Options(self._schedule, True, False, False))
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"tome_fx.vlm merges inside the vision tower, and this one ({name}) "
                                        f"cannot merge: {error}. where='output' merges its output instead") from error
        return fast

    def _schedule(self, blocks: int, tokens: int, protected: int) -> list[int]:
        if self.tokens not in (tokens, tokens - protected):
            raise UnsupportedModelError(
                f"the prompt holds {self.tokens} placeholders per image and the vision tower "
                f"({type(self.original).__name__}) {tokens} tokens: the model does not give each tower token a place "
                "of its own (a projector that pools them, image tiles), so merged tokens could not fill the placeholders")
        used = blocks if self.feature_blocks is None else self.feature_blocks
        kind, value = self.target
        if kind == "r":
            if isinstance(value, list) and len(value) > used:
                raise ValueError(f"r lists {len(value)} values, and {used} of the tower's {blocks} blocks feed the "
                                 "image features (the later ones merge nothing)")
            merges = clamp_schedule(resolve_schedule(value, used), tokens, protected)
        else:
            merges = spread(self.merged_away(), used, tokens, protected)
        return merges + [0] * (blocks - used)


class _MergingTower:
    """Mixed over the vision tower's class: returns merged tokens (``_Tower``)."""

    def forward(self, *args, **kwargs):
        tower: _Tower = self._tome_tower
        call = CallSpec.record(tower.original, args, kwargs)
        leaves = pytree.tree_leaves(call.arguments)
        key = (tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in leaves), tower.tokens,
               tower.feature_blocks)
        if key not in tower.graphs:
            tower.graphs[key] = tower.build(args, kwargs)
        outputs, state = tower.graphs[key].forward_with_tokens(*args, **kwargs)
        tower.sizes, tower.positions = state.size, state.positions
        return outputs


def _arguments(method, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by name, ``**kwargs`` flattened in."""
    signature = inspect.signature(method)
    bound = signature.bind(*args, **kwargs).arguments
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
    return bound


def _cache_of(arguments: dict[str, Any]):
    return arguments.get("cache", arguments.get("past_key_values"))


@dataclass
class _Prompt:
    """The VLM's side: cuts the prompt to the merged visual tokens and, with ``prop_attn``,
    gives the language model's keys their log(size)."""

    original: torch.nn.Module
    settings: dict[str, Any]  # apply's arguments, to make this model again (pickling)
    tower: _Tower
    image_token: int
    sizes: torch.Tensor | None = None  # [images, kept] patches per visual token, last call
    pending: torch.Tensor | None = None  # [batch, n] log(size) of each row's visual tokens, cut prompt
    read: torch.Tensor | None = None  # [batch] how many of each row's pending sizes the model has read
    key_bias: torch.Tensor | None = None  # [batch, keys] log(size) of each key in the cache
    cut_caches: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # caches holding a cut prompt

    def cut(self, model, arguments: dict[str, Any]) -> dict[str, Any]:
        """``arguments`` with the images encoded (``mm_encoder_outputs``) and the prompt cut to
        their merged tokens; unchanged without images."""
        if arguments.get("pixel_values_videos") is not None:
            raise UnsupportedModelError("tome_fx.vlm merges image tokens, and video inputs (pixel_values_videos) are "
                                        "not merged yet: call the original model (tome_fx.vlm.remove) for video")
        if arguments.get("pixel_values") is None:
            return arguments
        ids = arguments.get("input_ids")
        if ids is None:
            raise ValueError("tome_fx.vlm cuts each image's placeholder tokens out of input_ids to match its merged "
                             "tokens: pass input_ids (not inputs_embeds) with pixel_values")
        slots, mrope = ids == self.image_token, hasattr(model.base_model, "get_rope_index")
        if arguments.get("position_ids") is None and mrope:
            arguments = dict(arguments, position_ids=_mrope_positions(model, arguments))
        full, kept, encoded, consumed, merged_into = self._encode(model, arguments, slots)
        arguments = {k: v for k, v in arguments.items() if k not in consumed}
        arguments["mm_encoder_outputs"] = {"image": encoded}
        # each slot's place in its image, in reading order; an image keeps its first `kept` slots
        order = torch.zeros_like(ids).masked_scatter(slots, torch.arange(int(slots.sum()), device=ids.device))
        keep = ~slots | (order % full < kept)
        length = int(keep[0].sum())
        if (keep.sum(1) != length).any():
            raise ValueError("the prompts of one batch hold different numbers of images; cut to their merged tokens "
                             "they would differ in length: call with one such prompt at a time")
        for name in ("input_ids", *_PER_TOKEN):
            value = arguments.get(name)
            if isinstance(value, torch.Tensor) and value.shape[-2:] == ids.shape:
                if name == "position_ids" and kept < full:
                    value = _merged_positions(value, slots, keep, merged_into, kept)
                arguments[name] = value[..., keep].view(*value.shape[:-2], ids.shape[0], length)
        counts = slots[keep].view(ids.shape[0], length).sum(1)  # each row's visual tokens, in reading order
        rows = torch.arange(int(counts.max()), device=ids.device) < counts[:, None]
        self.pending = self.sizes.new_zeros(rows.shape).masked_scatter(rows, self.sizes.log().flatten())
        if mrope:  # decoding without position_ids goes on from the cut
            cut = arguments["position_ids"]
            model.base_model.rope_deltas = (cut.amax(dim=(0, 2)) + 1 - length).view(-1, 1)
        return arguments

    def _encode(self, model, arguments: dict[str, Any], slots: torch.Tensor):
        """The images through the model's own ``get_image_features``, the tower merging
        (``where="tower"``) or its output merged after (``"output"``): placeholders per image,
        tokens kept per image, the encoding, the arguments it took, and for each image's
        placeholders the kept token each went to."""
        encode = model.base_model.get_image_features
        taken = [k for k in inspect.signature(encode).parameters if k != "kwargs" and arguments.get(k) is not None]
        images, count = len(arguments.get("image_grid_thw", arguments["pixel_values"])), int(slots.sum())
        if count % images:
            raise ValueError(f"{count} image placeholder tokens for {images} images: not the same number per image")
        full = self.tower.tokens = count // images
        self.tower.feature_blocks = _feature_blocks(model, arguments.get("vision_feature_layer"))
        encoded = encode(**{k: arguments[k] for k in taken}, return_dict=True)
        features = encoded.pooler_output
        if len({f.shape[-2] for f in features}) != 1:
            raise UnsupportedModelError(f"images of one call have different numbers of tokens "
                                        f"{sorted({f.shape[-2] for f in features})}: give them one size")
        if self.settings["where"] == "output":
            stacked = torch.stack(list(features)) if not isinstance(features, torch.Tensor) else features
            if stacked.shape[1] != full:
                raise UnsupportedModelError(f"{stacked.shape[1]} image features per image for {full} placeholders")
            merged, self.sizes, merged_into = merge_down(stacked, full - self.tower.merged_away())
            encoded.pooler_output = merged if isinstance(features, torch.Tensor) else type(features)(merged.unbind())
            return full, merged.shape[1], encoded, taken, merged_into
        kept = features[0].shape[-2]
        self.sizes = self.tower.sizes[:, -kept:]
        return full, kept, encoded, taken, self.tower.positions[:, -full:] - (self.tower.sizes.shape[1] - kept)

    def bias(self, arguments: dict[str, Any]) -> torch.Tensor | None:
        """log(size) for every key of this call, ``[batch, 1, 1, keys]``: the keys already
        cached keep theirs, and this call's visual tokens take theirs from ``pending`` (a
        split prefill takes them chunk by chunk); every other key gets 0. None where every
        key gets 0 (a text-only prompt), so sdpa keeps its causal fast path."""
        ids, cache = arguments["input_ids"], _cache_of(arguments)
        past = cache.get_seq_length() if cache is not None else 0
        slots = ids == self.image_token
        new = torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
        if not past:  # a sequence starts (again, without a cache): its visual tokens are read from the first
            self.read = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        if slots.any():
            pending = self.pending if self.pending is not None else new.new_zeros(1, 0)
            pending = pending.repeat_interleave(ids.shape[0] // pending.shape[0], 0)
            index = self.read[:, None] + slots.cumsum(1) - 1  # each slot's place in its row's pending sizes
            if (index[slots] >= pending.shape[1]).any():
                raise ValueError("image placeholders in a cut prompt with no merged visual tokens left to fill them: "
                                 "call the tome_fx.vlm model with the images (pixel_values) and the uncut prompt")
            new = torch.where(slots, pending.to(new.dtype).gather(1, index.clamp(0, pending.shape[1] - 1)), new)
            self.read = self.read + slots.sum(1)
        before = self.key_bias if self.key_bias is not None and past else new.new_zeros(ids.shape[0], 0)
        before = torch.nn.functional.pad(before[:, :past], (0, past - min(past, before.shape[1])))
        self.key_bias = torch.cat([before, new], 1)
        if not self.key_bias.any():
            return None
        limit = cache.get_max_length() if cache is not None else None  # a static cache's keys: all its slots
        keys = self.key_bias if not isinstance(limit, int) or limit <= past + ids.shape[1] else \
            torch.nn.functional.pad(self.key_bias, (0, limit - self.key_bias.shape[1]))
        return keys[:, None, None, :]


def _mrope_positions(model, arguments: dict[str, Any]) -> torch.Tensor:
    """M-RoPE models (Qwen2-VL): the positions of the uncut prompt, [3, batch, tokens], as
    the model computes them from its ids and image grids, for the cut to map."""
    wanted = inspect.signature(model.base_model.get_rope_index).parameters
    if "mm_token_type_ids" in wanted and arguments.get("mm_token_type_ids") is None:
        raise ValueError(f"{type(model).__name__} places image tokens by `mm_token_type_ids`, which the processor "
                         "returns beside input_ids: pass it")
    positions, _ = model.base_model.get_rope_index(
        arguments["input_ids"], **{k: arguments.get(k) for k in wanted if k not in ("input_ids", "kwargs")})
    return positions


def _merged_positions(position_ids: torch.Tensor, slots, keep, merged_into: torch.Tensor, kept: int) -> torch.Tensor:
    """``position_ids`` with each image's first ``kept`` slots given its merged tokens'
    positions: the mean of the positions of the patches each holds (rounded), so patches
    that shared a position give the merged token that position."""
    lead = position_ids.shape[:-2]
    given = position_ids[..., slots].view(*lead, *merged_into.shape).to(torch.float64)
    index = merged_into.expand_as(given)
    sums = given.new_zeros(*lead, merged_into.shape[0], kept).scatter_add(-1, index, given)
    counts = given.new_zeros(sums.shape).scatter_add(-1, index, torch.ones_like(given))
    merged = (sums / counts).round().to(position_ids.dtype)
    first = slots & keep  # the kept slots, image by image
    return position_ids.masked_scatter(first.expand_as(position_ids), merged.flatten(-2))


class _FewerVisualTokens:
    """Mixed over the VLM's class: its calls cut the prompt to the merged visual tokens."""

    def forward(self, *args, **kwargs):
        prompt: _Prompt = self._tome_prompt
        arguments = prompt.cut(self, _arguments(super().forward, args, kwargs))
        if prompt.settings["prop_attn"] and arguments.get("input_ids") is not None:
            bias = prompt.bias(arguments)
            if bias is not None:  # sdpa adds it to the logits of every attention in the language model
                arguments["position_bias"] = bias.to(self.dtype)
        out = super().forward(**arguments)
        if "mm_encoder_outputs" in arguments and getattr(out, "cache", None) is not None:
            prompt.cut_caches.add(out.cache)  # it holds the cut prompt, not the ids the caller has
        return out

    def generate(self, inputs=None, *args, **kwargs):
        prompt: _Prompt = self._tome_prompt
        cache = _cache_of(kwargs)
        if cache is not None and cache in prompt.cut_caches:
            raise ValueError("this cache holds a prompt that tome_fx.vlm cut to its merged visual tokens, and the ids "
                             "passed with it hold every placeholder: call again without the cache")
        given = kwargs.get("input_ids", inputs)
        if inputs is not None:
            kwargs["input_ids"] = inputs
        arguments = prompt.cut(self, kwargs)
        out = super().generate(None, *args, **arguments)
        cut = arguments.get("input_ids")
        if given is None or cut is None or cut.shape == given.shape:
            return out
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        restored = torch.cat([given.repeat_interleave(sequences.shape[0] // given.shape[0], 0),
                              sequences[:, cut.shape[1]:]], 1)
        if isinstance(out, torch.Tensor):
            return restored
        if getattr(out, "cache", None) is not None:  # it holds the cut prompt, not the ids returned
            prompt.cut_caches.add(out.cache)
        out.sequences = restored
        return out

    def __reduce_ex__(self, protocol):
        """Pickled as the model ``apply`` was given and its settings: loading applies again."""
        prompt: _Prompt = self._tome_prompt
        return _reapply, (prompt.original, prompt.settings)


def _reapply(model: torch.nn.Module, settings: dict[str, Any]) -> torch.nn.Module:
    return apply(model, **settings)


def _tower_path(model: torch.nn.Module) -> str:
    base = model.base_model
    prefix = next(name for name, module in model.named_modules() if module is base)
    for name in _TOWERS:
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return f"{prefix}.{name}".lstrip(".")
    raise UnsupportedModelError(f"{type(model).__name__}: no vision tower found (looked for {list(_TOWERS)} on "
                                f"{type(base).__name__}); pass tower= its module path")


def _feature_blocks(model: torch.nn.Module, layer: int | list[int] | None = None) -> int | None:
    """How many of the tower's blocks feed the image features: ``vision_feature_layer``
    (this call's, else the config's), an index into the tower's hidden states, 0 being the
    embeddings; None (every block) for models that read its last state."""
    layer = getattr(model.config, "vision_feature_layer", None) if layer is None else layer
    if layer is None:
        return None
    if not isinstance(layer, int):
        raise UnsupportedModelError(f"{type(model).__name__} joins features of its vision layers {layer} per token; "
                                    "those layers would hold different merged tokens")
    blocks = model.config.vision_config.num_hidden_layers
    return layer if layer >= 0 else blocks + 1 + layer


def apply(model: torch.nn.Module, ratio: float | int | list[int] | None = None, *, keep: int | None = None,
          prop_attn: bool = False, where: str = "tower", tower: str | None = None) -> torch.nn.Module:
    """A copy of the VLM ``model`` whose language model gets fewer visual tokens: the vision
    tower merges them, and each call cuts the prompt's placeholders to match (see the module
    docstring). The copy is of the model's own class; its modules are copies sharing the
    original's parameters and config, so ``model`` is untouched (an in-place change of a
    parameter, ``.to()`` included, shows in both).

    How many: ``ratio``, the share of each image's visual tokens merged away (a float in
    (0, 1)), or ToMe's r per block (an int, or a list per block); or ``keep``, the visual
    tokens kept per image. ``prop_attn``: the language model's attention adds log(size) to
    each visual key, as ToMe's proportional attention does in the tower (through sdpa's
    ``position_bias``; the language model must run ``sdpa`` attention). ``where``: ``"tower"``
    merges inside the vision tower (ToMe, matching on the attention keys); ``"output"``
    merges the tower's output, the image features, by ToMe's matching on the features
    themselves (``merge.merge_down``): for towers that cannot merge inside (Qwen2-VL's runs
    every image as one sequence in windows, then merges 2 x 2 cells). ``tower``: the vision
    tower's module path, where it is not found by name. The sizes of the last call's visual
    tokens (patches, or features, each stands for) are ``visual_token_sizes(model)``.
    """
    if (ratio is None) == (keep is None):
        raise TypeError("give one of ratio (a share merged away, or ToMe's r per block) and keep (tokens kept)")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep is the number of visual tokens kept per image, >= 1, got {keep!r}")
        target = ("keep", keep)
    elif isinstance(ratio, float):
        if not 0 < ratio < 1:
            raise ValueError(f"ratio is the share of visual tokens merged away, in (0, 1), got {ratio}")
        target = ("ratio", ratio)
    else:
        resolve_schedule(ratio, max(len(ratio), 1) if isinstance(ratio, list) else 1)  # type errors now
        target = ("r", ratio)
    if isinstance(getattr(model, "_tome_prompt", None), _Prompt):
        model = remove(model)
    if not submodules.generates(model):
        raise TypeError(f"tome_fx.vlm.apply takes a VLM that generates (an HF ...ForConditionalGeneration), "
                        f"got {type(model).__name__}")
    if prop_attn and (kind := model.config.get_text_config()._attn_implementation) != "sdpa":
        raise ValueError(f"prop_attn adds log(size) to the visual keys through sdpa's position_bias, and this "
                         f"language model runs {kind!r} attention: load it with attn_implementation='sdpa'")
    if where not in ("tower", "output"):
        raise ValueError(f"where is 'tower' or 'output', not {where!r}")
    if where == "output" and target[0] == "r":
        raise ValueError("ToMe's r per block counts merges in the tower's blocks; merging its output, give keep= or "
                         "a ratio (a float)")
    path = tower or _tower_path(model)
    image_token = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
    state = _Tower(model.get_submodule(path), target)
    settings = dict(ratio=ratio, keep=keep, prop_attn=prop_attn, where=where, tower=tower)
    prompt = _Prompt(model, settings, state, image_token)
    if where == "output":
        return submodules.retyped(submodules.swapped(model, {}), _FewerVisualTokens, _tome_prompt=prompt)
    _feature_blocks(model)  # a refusal now rather than at the first call
    swapped = submodules.swapped(model, {path: lambda t: submodules.retyped(t, _MergingTower, _tome_tower=state)})
    return submodules.retyped(swapped, _FewerVisualTokens, _tome_prompt=prompt)


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """The VLM that ``apply`` was given (a model it did not make is returned as it is)."""
    prompt = getattr(model, "_tome_prompt", None)
    return prompt.original if isinstance(prompt, _Prompt) else model


def visual_token_sizes(model: torch.nn.Module) -> torch.Tensor:
    """[images, kept], the last call's: how many patches each visual token stands for."""
    sizes = model._tome_prompt.sizes
    if sizes is None:
        raise ValueError("no call with images yet: the sizes are the last such call's")
    return sizes
