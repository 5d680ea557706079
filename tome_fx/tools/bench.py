"""Throughput of a model against its ToMe versions, timed interleaved in one process.

Every variant of one (model, batch, mode) is built first and warmed up (compiled ones
compile during warm-up); then each round times every variant once, in a shuffled
order, so load changes on a shared machine hit all of them alike. Medians are reported with
min/max, beside the cost model's bound for that schedule.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch

import tome_fx

from .. import merge
from ..schedule import Schedule


@dataclass
class Row:
    model: str
    mode: str  # eager | compiled
    batch: int
    schedule: str
    tokens_out: int
    median_s: float
    min_s: float
    max_s: float
    images_per_s: float
    speedup: float  # original median / this median
    bound: float  # FLOP bound from the cost model (attention blocks)
    merge_share: float | None = None  # fraction of this variant's time spent matching + merging
    impl: str = "tome_fx"  # or the name of a peer implementation timed in the same run
    device: str = "cpu"
    dtype: str = "float32"
    sdpa: str = ""  # the attention kernels one call ran (``sdpa_kernels``)

    @property
    def label(self) -> str:
        """The schedule, and the implementation where it is a peer's."""
        return self.schedule if self.impl == "tome_fx" else f"{self.schedule} ({self.impl})"

    @property
    def reached(self) -> float:
        return self.speedup / self.bound

    def as_dict(self) -> dict:
        return asdict(self) | {"reached": self.reached}


def schedule_label(schedule: Schedule) -> str:
    """As the CLI spells it: ``13``, ``13,-1`` (r, inflection), ``4/4/0`` (per block)."""
    if isinstance(schedule, tuple):
        return f"{schedule[0]},{schedule[1]:g}"
    if isinstance(schedule, list):
        return "/".join(str(r) for r in schedule)
    return str(schedule)


def time_interleaved(models: dict, inputs, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of every model, each once per round after ``warmup`` calls each (two: a
    ``torch.compile``d original compiles again on its second call), in an order shuffled
    every round (seeded): on CPU a call right after another model's runs measurably slower
    (its memory is laid out anew), and a fixed order would charge that to one model. On
    CUDA each call is timed to the end of its kernels."""
    times = {name: [] for name in models}
    order, shuffle = list(models), random.Random(0).shuffle
    on_gpu = any(t.is_cuda for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor))
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    with torch.no_grad():
        for model in models.values():
            for _ in range(warmup):
                model(inputs)
        for _ in range(repeats):
            shuffle(order)
            for name in order:
                sync()
                start = time.perf_counter()
                models[name](inputs)
                sync()
                times[name].append(time.perf_counter() - start)
    return times


def sdpa_kernels(model, inputs) -> str:
    """The ``scaled_dot_product_attention`` kernels one call of ``model`` runs, with counts:
    the backend torch picked for each call (CPU fused, flash, memory-efficient, cuDNN), or
    ``_scaled_dot_product_attention_math``, the unfused fallback. Proportional attention
    passes a float bias, which flash attention cannot take: this shows what runs instead."""
    from collections import Counter

    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        model(inputs)
    kernels = Counter(event.name.removeprefix("aten::") for event in prof.events()
                      if "scaled_dot_product" in event.name and event.name != "aten::scaled_dot_product_attention")
    return ", ".join(f"{name} x{count}" for name, count in sorted(kernels.items()))


def run(name: str, model: torch.nn.Module, input_size, schedules: list[Schedule], *, batch: int, mode: str,
        repeats: int, merge_share: bool = False, peers: dict | None = None, device: str = "cpu",
        dtype: torch.dtype = torch.float32, compile_kwargs: dict | None = None) -> list[Row]:
    """Time the original and one ToMe variant per schedule (r=0 is the original itself).
    With ``merge_share``, each variant's stand-in (``without_merge_cost``) is timed too;
    ``peers`` maps a name to ``make(model, schedule)``, another ToMe implementation timed
    beside tome_fx on every schedule. The model is moved to ``device`` and ``dtype`` first (in place);
    ``compile_kwargs`` go to every ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs)."""
    model = model.to(device=device, dtype=dtype)
    variants = {schedule_label(s): tome_fx.transform(model, s) for s in schedules if s != 0}
    plain = tome_fx.transform(model, 0)
    models = {"0": model, **variants}
    if merge_share:
        models |= {f"{label} stand-in": without_merge_cost(fast) for label, fast in variants.items()}
    peer_models = {(peer, label): make(model, s) for peer, make in (peers or {}).items()
                   for s, label in ((s, schedule_label(s)) for s in schedules if s != 0)}
    models |= {f"{label} {peer}": m for (peer, label), m in peer_models.items()}
    if mode == "compiled":
        kwargs = compile_kwargs or {}
        models = {label: tome_fx.CompiledToMe(m, **kwargs) if isinstance(m, tome_fx.ToMeModel)
                  else torch.compile(m, **kwargs) for label, m in models.items()}
    inputs = torch.randn(batch, *input_size, device=device, dtype=dtype)
    times = time_interleaved(models, inputs, repeats, warmup=2 if mode == "compiled" else 1)
    kernels = {label: sdpa_kernels(m, inputs) for label, m in models.items() if not label.endswith("stand-in")}
    base = statistics.median(times["0"])

    def row(label: str, key: str, impl: str = "tome_fx") -> Row:
        fast, samples = variants.get(label, plain), times[key]
        median = statistics.median(samples)
        stand_in = times.get(f"{key} stand-in")
        return Row(name, mode, batch, label, fast.token_counts[-1], median, min(samples), max(samples),
                   batch / median, base / median, fast.predicted_flops(merging=False) / fast.predicted_flops(),
                   None if stand_in is None else 1 - statistics.median(stand_in) / median, impl,
                   str(torch.device(device)), str(dtype).removeprefix("torch."), kernels.get(key, ""))

    rows = [row(label, label) for label in ["0", *variants]]
    rows += [row(label, f"{label} {peer}", peer) for peer, label in peer_models]
    return rows


def saved_for_backward(run, *args) -> int:
    """Bytes autograd keeps for backward during ``run(*args)``: activation memory,
    deterministic, unlike RSS. Each storage counts once (q, k and v views of one qkv
    buffer are one buffer), and parameters count not at all (the model holds them anyway;
    ``torch.utils.checkpoint`` saves the weights it is passed)."""
    storages = {}

    def pack(t):
        base = t if t._base is None else t._base  # a weight's transpose is still the weight
        if not (base.is_leaf and base.requires_grad):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(*args)
    return sum(storages.values())


def peak_rss(run, *args, every_s: float = 5e-4) -> int:
    """Bytes of resident memory above the level at the start, at the peak of ``run(*args)``,
    sampled every ``every_s`` by a thread (torch ops release the GIL). Approximate and
    process-wide (allocator caching, other threads), so reported beside
    ``saved_for_backward``, not instead of it. Linux (``/proc``)."""
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    start, peak, done = resident(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(every_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run(*args)
    finally:
        done.set()
        sampler.join()
    return max(peak[0], resident()) - start


def _drop_tokens(x, keys, size, positions, r, protected, token_dim, mask=None, key_masks=(), lead=0, trail=0,
                 method="tome", depth=0.0):
    """``merge.tome_merge``'s stand-in: the same output shapes, no matching or merging."""
    tokens = x.shape[1] - r
    return x[:, :tokens], size[:, :tokens], None if positions is None else positions.clamp_max(tokens - 1)


def without_merge_cost(fast: tome_fx.ToMeModel) -> tome_fx.ToMeModel:
    """A copy of ``fast`` whose merges just drop the last r tokens. Timed beside ``fast``
    (eager or compiled, called the same way), it isolates what matching + merging cost: the
    rest of the model runs on the same token counts. A profiler would not do: its per-op
    overhead inflates the merge's many small ops, and it cannot see into compiled code."""
    stand_in = copy.deepcopy(fast)
    for graph_module in (stand_in.graph_module, stand_in.forward_graph_module):
        for node in graph_module.graph.find_nodes(op="call_function", target=merge.tome_merge):
            node.target = _drop_tokens
        graph_module.recompile()
    return stand_in


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | mode | batch | r | tokens out | img/s | median s (min-max) | speedup | bound | reached | merge share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} | {row.mode} | {row.batch} | {row.label} | {row.tokens_out} | {row.images_per_s:.1f} | "
            f"{row.median_s:.3f} ({row.min_s:.3f}-{row.max_s:.3f}) | {row.speedup:.2f}x | {row.bound:.2f}x | "
            f"{row.reached:.0%} | {'' if row.merge_share is None else f'{row.merge_share:.1%}'} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def figure(path):
    """Axes for one report plot (no display needed), written to ``path`` as PNG on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        yield ax
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_speedup(rows: list[Row], path) -> None:
    """Speedup vs r (constant schedules), one line per (model, mode, batch), bounds dashed."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.schedule.isdigit():
            groups.setdefault((row.model, row.mode, row.batch, row.impl), []).append(row)
    with figure(path) as ax:
        for (model, mode, batch, impl), group in groups.items():
            group.sort(key=lambda row: int(row.schedule))
            rs = [int(row.schedule) for row in group]
            name = f"{model} {mode} b{batch}" + ("" if impl == "tome_fx" else f" {impl}")
            line, = ax.plot(rs, [row.speedup for row in group], marker="o", label=name)
            ax.plot(rs, [row.bound for row in group], linestyle="--", color=line.get_color(), alpha=0.6)
        ax.set_xlabel("r (tokens merged per block)")
        ax.set_ylabel("speedup over the original")
        ax.set_title("measured (solid) vs FLOP bound (dashed)")


def table_script(script: str, doc: str, rows, markdown, plot=None, argv=None) -> None:
    """The ``main`` of a benchmark script that makes one table: ``--out`` (default: the
    ``results`` folder beside ``script``, its ``__file__``; ``doc``, its docstring), ``rows()``
    printed as ``markdown(rows)`` and written by ``write_report`` (with ``plot(rows, path)``)."""
    import argparse
    import pathlib

    path = pathlib.Path(script)
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=str(path.parent / "results"))
    args = parser.parse_args(argv)
    table = rows()
    text = markdown(table)
    print(text)
    write_report(args.out, path.stem, argv, {"rows": table}, text, plot and (lambda out: plot(table, out)))


def write_report(out, name: str, argv, report: dict, text: str, plot=None) -> None:
    """A benchmark script's results under ``out``: ``name``.json (the command that made them,
    the threads, and ``report``), ``name``.md (``text``) and, with ``plot`` (called with the
    path), ``name``.png. ``argv``: the script's arguments (None: the command line's)."""
    import json
    import pathlib
    import sys

    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/{name}.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (folder / f"{name}.json").write_text(json.dumps({"command": command, "threads": torch.get_num_threads(),
                                                     **report}, indent=1))
    (folder / f"{name}.md").write_text(text + "\n")
    if plot is not None:
        plot(folder / f"{name}.png")
