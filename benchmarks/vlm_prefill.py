"""A Llava-1.5-shaped VLM with fewer visual tokens (``tome_fx.vlm.apply``): prefill and decode
speed against the visual tokens kept, beside the counted FLOP bound.

    python benchmarks/vlm_prefill.py [--layers 2] [--repeats 3] [--out benchmarks/results/vlm]

The model: HF ``LlavaForConditionalGeneration`` at random init (no VLM weights offline) with
LLaVA-1.5's shapes where they set the cost: a CLIP ViT-L/14 tower at 336 px (24 layers,
width 1024, 576 patches and a class token; features from its second-to-last layer), the
two-layer GELU projector, and a Llama of Vicuna-7B's width (4096, MLP 11008, 32 heads,
vocabulary 32064) cut to ``--layers`` layers so that it runs on 2 cores. One image and a
40-token prompt, batch 1.

For each share of visual tokens kept (100%, 50%, 25%, 10%: ``keep`` = 576, 288, 144, 58):

- ``prefill s``: one forward over the prompt (tower, projector, language model), the logits
  of the last token only, as ``generate`` computes them; timed calls go in shuffled rounds;
- ``bound``: the unmerged prefill's FLOPs over this one's (``FlopCounterMode``), and the
  same at Vicuna-7B's full depth (32 layers: the counted FLOPs of the first language-model
  layer taken 32 times instead of ``--layers`` times), where the language model's share,
  and so the gain, is far larger;
- ``decode tok/s``: new tokens per second after the prefill, from ``generate`` with 9 and
  with 1 new token (greedy), timed in shuffled rounds, beside its bound: the unmerged model's
  FLOPs per decoded token over this one's (the same two ``generate`` calls, counted);
- ``cos``: cosine similarity of the language model's last hidden state at the prompt's last
  token to the unmerged model's, averaged over 4 random images (random weights: this says
  how far the merged prompt moves the state, not how good the answers are).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

import tome_fx
import tome_fx.vlm  # noqa: F401
from tome_fx.tools.bench import time_interleaved

IMAGE = 32000
FULL_DEPTH = 32  # Vicuna-7B


def flops(call) -> tuple[int, int]:
    """FLOPs of ``call()`` in all, and in the language model's first layer."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with FlopCounterMode(display=False, custom_mapping={sdpa: cpu_sdpa}) as counter:
        call()
    layer = next(sum(c.values()) for name, c in counter.get_flop_counts().items()
                 if name.endswith("language_model.layers.0"))
    return counter.get_total_flops(), layer


def llava_15(layers: int):
    import transformers

    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                    max_position_embeddings=4096)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    config._attn_implementation = "sdpa"
    return transformers.LlavaForConditionalGeneration(config).eval()


def prompt(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    text = torch.randint(2, 32000, (40,))
    ids = torch.cat([text[:5], torch.full((576,), IMAGE), text[5:]])[None]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 336, 336))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="language model layers (Vicuna-7B has 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/vlm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x = llava_15(args.layers), prompt()
    models = {"100% (576)": model, **{f"{share}% ({keep})": tome_fx.vlm.apply(model, keep=keep)
                                      for share, keep in ((50, 288), (25, 144), (10, 58))}}
    prefill = {name: (lambda inputs, m=m: m(**inputs, logits_to_keep=1)) for name, m in models.items()}
    with torch.no_grad():
        for call in prefill.values():
            call(x)  # captures the merging towers first: FlopCounterMode would count the capture's fake run
        counted = {name: flops(lambda c=call: c(x)) for name, call in prefill.items()}
    full = {name: total + (FULL_DEPTH - args.layers) * layer for name, (total, layer) in counted.items()}
    times = time_interleaved(prefill, x, args.repeats, warmup=1)

    def generating(new):
        return {name: (lambda inputs, m=m: m.generate(**inputs, max_new_tokens=new, min_new_tokens=new,
                                                       do_sample=False)) for name, m in models.items()}

    one, nine = time_interleaved(generating(1), x, args.repeats, 1), time_interleaved(generating(9), x, args.repeats, 1)
    with torch.no_grad():
        per_token = {name: (flops(lambda c=call: c(x))[0] - flops(lambda c=generating(1)[name]: c(x))[0]) / 8
                     for name, call in generating(9).items()}
    cos = {name: [] for name in models}
    with torch.no_grad():
        for seed in range(4):
            inputs = prompt(seed + 1)
            last = {n: m(**inputs, output_hidden_states=True).hidden_states[-1][0, -1] for n, m in models.items()}
            for name in models:
                cos[name].append(torch.nn.functional.cosine_similarity(last[name], last["100% (576)"], 0).item())
    base = statistics.median(times["100% (576)"])
    rows = []
    for name in models:
        prefill_s = statistics.median(times[name])
        decode = 8 / (statistics.median(nine[name]) - statistics.median(one[name]))
        rows.append(dict(kept=name, prefill_s=prefill_s, speedup=base / prefill_s,
                         bound=counted["100% (576)"][0] / counted[name][0], prefill_gflop=counted[name][0] / 1e9,
                         bound_full_depth=full["100% (576)"] / full[name], gflop_full_depth=full[name] / 1e9,
                         decode_tok_s=decode, decode_bound=per_token["100% (576)"] / per_token[name],
                         cos=statistics.mean(cos[name])))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(command="python benchmarks/vlm_prefill.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
                torch=torch.__version__, threads=args.threads, date=time.strftime("%Y-%m-%d"))
    (out / "vlm_prefill.json").write_text(json.dumps(dict(meta=meta, rows=rows, prefill_times=times), indent=1))
    lines = [f"Llava-1.5 shapes (ViT-L/14-336 tower, 7B-width Llama with {args.layers} layers), batch 1, "
             f"{args.threads} CPU threads, fp32, medians of {args.repeats} interleaved calls.", "",
             "| visual tokens kept | prefill s | speedup | FLOP bound | prefill GFLOP | bound at 32 layers "
             "| GFLOP at 32 layers | decode tok/s | decode FLOP bound | cos to unmerged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kept']} | {r['prefill_s']:.2f} | {r['speedup']:.2f}x | {r['bound']:.2f}x | {r['prefill_gflop']:.0f} | "
              f"{r['bound_full_depth']:.2f}x | {r['gflop_full_depth']:.0f} | {r['decode_tok_s']:.2f} | "
              f"{r['decode_bound']:.3f}x | {r['cos']:.3f} |"
              for r in rows]
    (out / "vlm_prefill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
