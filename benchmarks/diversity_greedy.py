"""DivPrune's greedy and VisPruner's duplicate removal at LLaVA-1.5-7B sizes: their time as a share of the LLM
prefill they feed, on the same device, in one run.

    python benchmarks/diversity_greedy.py     # writes benchmarks/results/cpu-xeon-2c-loaded/diversity-greedy.{md,json}

Timed (fastest of ``--repeats``; fp32 on CPU, bf16 inputs on CUDA):

* ``divprune``: :func:`tokprune.rules.divprune.divprune_select` on one image of ``--tokens`` x ``--dim`` projected
  tokens (576 x 4096: LLaVA-1.5-7B's LLM width), keeping ``--keep`` (the (N, N) cosine matrix plus ``keep`` greedy
  steps);
* ``vispruner``: :func:`tokprune.rules.vispruner.vispruner_select` on the same count of CLIP-L features
  (``--clip-dim`` 1024, before the projector, as the reference), ``important_ratio`` 0.5, keeping ``--keep``;
* the prefill they sit in: one LLaMA-7B-width decoder layer (hidden 4096, 32 heads, FFN 11008, SDPA) on the
  pruned prompt (``keep`` visual + ``--text`` text tokens), timed, scaled by 32 layers. The vision encoder and
  projector are left out of the denominator (a conservative share).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tokprune.rules.divprune import divprune_select
from tokprune.rules.vispruner import vispruner_select


def best_of(fn, repeats: int, device: str = "cpu") -> float:
    """Fastest of ``repeats`` calls (one untimed call first on CUDA; synchronised around each timed one)."""
    cuda = device.startswith("cuda")
    if cuda:
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def layer_time(n_tokens: int, repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32, dim: int = 4096,
               heads: int = 32, ffn: int = 11008) -> float:
    """Fastest of ``repeats`` forwards of one LLaMA-7B-width decoder layer on ``n_tokens`` tokens."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=dim, num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=ffn,
                      num_hidden_layers=1, vocab_size=32)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).eval().to(device, dtype)
    h = torch.randn(1, n_tokens, dim, device=device, dtype=dtype)
    pos = torch.arange(n_tokens, device=device)[None]
    pe = LlamaRotaryEmbedding(cfg).to(device)(h, pos)
    with torch.no_grad():
        return best_of(lambda: layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos), repeats,
                       device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--clip-dim", type=int, default=1024)
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--text", type=int, default=95)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the prefill layer then runs in bf16)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/cpu-xeon-2c-loaded/diversity-greedy")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = a.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    proj = torch.randn(1, a.tokens, a.dim, device=dev, dtype=dtype)
    clip = torch.randn(1, a.tokens, a.clip_dim, device=dev, dtype=dtype)
    cls = torch.rand(1, a.tokens, device=dev)
    with torch.no_grad():
        t_div = best_of(lambda: divprune_select(proj, a.keep), a.repeats, dev)
        t_vis = best_of(lambda: vispruner_select(cls, clip, a.keep, 0.5), a.repeats, dev)
    n_prefill = a.keep + a.text
    lt = layer_time(n_prefill, max(2, a.repeats // 2), dev, dtype)
    prefill = 32 * lt
    import transformers

    res = {"tokens": a.tokens, "dim": a.dim, "clip_dim": a.clip_dim, "keep": a.keep, "text": a.text,
           "divprune_s": t_div, "vispruner_s": t_vis, "prefill_tokens": n_prefill, "llama7b_layer_s": lt,
           "prefill_32_layers_s": prefill, "divprune_share": t_div / prefill, "vispruner_share": t_vis / prefill,
           "device": (torch.cuda.get_device_name() + ", bf16 inputs" if dev.startswith("cuda") else
                      f"CPU ({platform.processor() or platform.machine()}), {a.threads} threads, shared and loaded"),
           "torch": torch.__version__, "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = [
        "# DivPrune's greedy and VisPruner's duplicate removal at LLaVA-1.5-7B sizes",
        "",
        f"One image of {a.tokens} tokens, keep {a.keep}; {res['device']}, torch {res['torch']}; "
        f"{res['date']}. Regenerate: `python benchmarks/diversity_greedy.py` (`--device cuda` on a GPU).",
        "",
        "| what | time | share of the prefill |",
        "|---|---|---|",
        f"| divprune: cosine matrix + {a.keep} greedy steps, {a.tokens} x {a.dim} | {1000 * t_div:.1f} ms | "
        f"{100 * t_div / prefill:.2f} % |",
        f"| vispruner: ranking + duplicate removal, {a.tokens} x {a.clip_dim} | {1000 * t_vis:.1f} ms | "
        f"{100 * t_vis / prefill:.2f} % |",
        f"| LLM prefill, LLaMA-7B width, {n_prefill} tokens ({a.keep} visual + {a.text} text) | "
        f"{prefill:.1f} s | one layer timed ({1000 * lt:.0f} ms) x 32 |",
        "",
        "Fastest of the repeats; the 2 shared cores were loaded by other work during the run, which slows every",
        "line (the shares are ratios within this run). One thread: on the loaded machine 2-thread runs of small",
        "reductions stall on thread hand-offs (tens of ms per round). The vision encoder is not in the denominator.",
    ]
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
