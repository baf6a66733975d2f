"""CATP's stage-1 greedy at real sizes: its time as a share of the LLM prefill on the same device.

    python benchmarks/catp_greedy.py          # writes benchmarks/results/cpu-amd-epyc-2c/catp-greedy.{md,json}

Sizes: a 4-shot-plus-query-and-more prompt of ``--images`` images x ``--tokens`` projected tokens x ``--dim``
(default 8 x 576 x 4096: LLaVA-NeXT-7B / LLaVA-1.5-7B width), R = 0.778 (the paper's middle ratio), so each image
keeps ``floor(576 (1 - R/2)) = 351`` tokens after ``351`` greedy steps. Timed:

* the vectorised greedy (:func:`tokprune.rules.catp.stage1_select`: batched similarity matrices, one batched
  marginal-gain step per pick with the incremental cover update, on the ``tokprune.kernels`` path), all images
  in one call; on CPU that path is now the lazy greedy (same picks, :func:`tokprune.kernels.reference.
  facility_location_lazy`), so tables written before it show the batched step;
* a plain-loop reference (a Python loop over the candidates at every step, each gain one vector op): one image,
  scaled by the number of images (said in the table);
* the LLM prefill it sits in: one LLaMA-7B-width decoder layer (hidden 4096, 32 heads, FFN 11008, SDPA) on the
  whole prompt (images after stage 1 + ``--text`` text tokens), timed once, scaled by 32 layers. The prefill time
  is the *pruned* prompt's (what CATP's stage 1 hands the LLM), a conservative denominator.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from tokprune.rules.catp import similarity_matrix, stage1_select


def plain_loop(x: torch.Tensor, text: torch.Tensor, k: int, lambda1: float = 0.7) -> list[int]:
    """The greedy with a Python loop over candidates (each gain a vector op over the covered tokens)."""
    sim = similarity_matrix(x[None], x[None])[0]
    align = lambda1 * similarity_matrix(x[None], text[None, None])[0, :, 0]
    cover = torch.zeros(x.shape[0])
    picked: list[int] = []
    free = set(range(x.shape[0]))
    for _ in range(k):
        best, best_gain = -1, -math.inf
        for t in sorted(free):
            gain = float((sim[t] - cover).clamp(min=0).sum() + align[t])
            if gain > best_gain:
                best, best_gain = t, gain
        picked.append(best)
        free.discard(best)
        cover = torch.maximum(cover, sim[best])
    return picked


def layer_time(n_tokens: int, dim: int = 4096, heads: int = 32, ffn: int = 11008) -> float:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=dim, num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=ffn,
                      num_hidden_layers=1, vocab_size=32)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).eval()
    rope = LlamaRotaryEmbedding(cfg)
    h = torch.randn(1, n_tokens, dim)
    pos = torch.arange(n_tokens)[None]
    pe = rope(h, pos)
    with torch.no_grad():
        t0 = time.perf_counter()
        layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--text", type=int, default=200)
    p.add_argument("--prune-ratio", type=float, default=0.778)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/cpu-amd-epyc-2c/catp-greedy")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.images, a.tokens, a.dim)
    text = torch.randn(a.images, a.dim)
    k = math.floor(a.tokens * (1 - a.prune_ratio / 2) + 1e-9)
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        picks = stage1_select(x, text, a.prune_ratio)
        times.append(time.perf_counter() - t0)
    vec = min(times)
    t0 = time.perf_counter()
    ref = plain_loop(x[0], text[0], k)
    loop_one = time.perf_counter() - t0
    assert sorted(ref) == picks[0].tolist(), "the plain loop and the vectorised greedy disagree"
    n_prefill = a.images * k + a.text
    layer_runs = [layer_time(n_prefill, a.dim) for _ in range(2)]
    lt = min(layer_runs)
    prefill = 32 * lt
    import transformers

    res = {"images": a.images, "tokens": a.tokens, "dim": a.dim, "prune_ratio": a.prune_ratio, "kept_per_image": k,
           "vectorised_s": round(vec, 3), "vectorised_all_s": [round(t, 3) for t in times],
           "plain_loop_one_image_s": round(loop_one, 2), "plain_loop_scaled_s": round(loop_one * a.images, 1),
           "prefill_tokens": n_prefill, "llama7b_layer_s": round(lt, 2),
           "llama7b_layer_runs_s": [round(t, 2) for t in layer_runs], "prefill_32_layers_s": round(prefill, 1),
           "share_of_prefill": round(vec / prefill, 5),
           "device": f"CPU ({platform.processor() or platform.machine()}), {a.threads} threads",
           "torch": torch.__version__, "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    a.out.with_suffix(".md").write_text(md)
    print(md, end="")


def markdown(res: dict) -> str:
    """The table and its reading, every figure taken from ``res`` (one run's JSON), so the prose cannot drift from
    the numbers."""
    vec, layer_runs = res["vectorised_s"], res["llama7b_layer_runs_s"]
    prefill, loop = res["prefill_32_layers_s"], res["plain_loop_scaled_s"]
    runs, speedup = res["vectorised_all_s"], res["plain_loop_scaled_s"] / res["vectorised_s"]
    lo, hi = min(runs) / max(layer_runs) / 32, max(runs) / min(layer_runs) / 32
    n, t, d = res["images"], res["tokens"], res["dim"]
    lines = [
        "# CATP stage-1 greedy at real sizes",
        "",
        f"{n} images x {t} tokens x {d} dims, R = {res['prune_ratio']} -> {res['kept_per_image']} greedy picks per "
        f"image; {res['device']}, torch {res['torch']}, fp32; {res['date']}. Regenerate: "
        "`python benchmarks/catp_greedy.py`.",
        "",
        "| what | time | note |",
        "|---|---|---|",
        f"| vectorised greedy, all {n} images (one call) | {vec:.2f} s | fastest of {len(runs)} "
        f"({', '.join(f'{r:.1f}' for r in runs)} s) |",
        f"| plain-loop reference | {loop:.0f} s | one image timed ({res['plain_loop_one_image_s']:.1f} s) x {n} |",
        f"| LLM prefill, LLaMA-7B width, {res['prefill_tokens']} tokens | {prefill:.0f} s | one layer timed "
        f"(fastest of {len(layer_runs)}: {', '.join(f'{r:.1f}' for r in layer_runs)} s) x 32 |",
        f"| **greedy / prefill** | **{100 * vec / prefill:.2f} %** | speed-up over the loop: {speedup:.0f}x |",
        "",
        "Each figure is the fastest of its runs in this one run; the spread of the runs above is the noise of the",
        f"machine (2 cores, shared with other work), and pairing any greedy run with any layer run gives "
        f"{100 * lo:.2f}-{100 * hi:.2f} % of the",
        f"prefill. The greedy is memory-bound on the ({n}, {t}, {t}) similarity block (one pass per pick); the plain",
        f"loop is a per-candidate Python loop of vector ops, so it is only {speedup:.0f}x slower.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
