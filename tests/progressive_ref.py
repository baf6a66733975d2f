"""Independent references of the progressive in-LLM methods (PyramidDrop, TransPrune), written without tokprune code.

* :func:`llava_loop`: LLaVA-1.5's decoder run layer by layer on one sample, the tokens of each cut removed from
  that layer on, at contiguous ("compact") or original positions. With a ``scorer`` it also *selects*: at a cut
  before layer K it computes layer K's attention rows by hand (its norm, q/k, RoPE, causal softmax, eager) on the
  hidden states entering K, and module I/O from forward hooks on ``self_attn`` / ``mlp``.
* :func:`ttv_reference` / :func:`iga_reference`: TransPrune's formulas on those raw inputs.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def next_layer_rows(layer, h: torch.Tensor, pe, queries: torch.Tensor) -> torch.Tensor:
    """Head-mean causal softmax rows of ``layer`` on ``h`` (1, n, D) for query slots ``queries``, mean over them."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    b, n, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pe)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    s = (q @ k.transpose(-1, -2)).float() * attn.scaling
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1)[0][:, queries].mean(0).mean(0)  # heads, then queries


def ttv_reference(x: torch.Tensor, y: torch.Tensor, direction: str = "code") -> torch.Tensor:
    """(n,) TTV of one module on one sample's tokens: ||y||/||x|| * softmax over tokens of 1 - cos (or 1 - |cos|)."""
    x, y = x.float(), y.float()
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-8)
    delta = 1 - cos if direction == "code" else 1 - cos.abs()
    return y.norm(dim=-1) / x.norm(dim=-1) * torch.exp(delta) / torch.exp(delta).sum()


def normalised(v: torch.Tensor) -> torch.Tensor:
    return v / (v.sum() + 1e-8)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores.float(), k, sorted=True).indices).values


class Recorder:
    """Forward hooks on ``self_attn`` / ``mlp`` of the given layers: (input, output) of the last call."""

    def __init__(self, layers, which) -> None:
        self.io: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        for i in which:
            for part, mod in (("attn", layers[i].self_attn), ("mlp", layers[i].mlp)):
                self.handles.append(mod.register_forward_hook(self._hook(i, part), with_kwargs=True))

    def _hook(self, i, part):
        def hook(module, args, kw, out):
            x = args[0] if args else kw["hidden_states"]
            self.io[(i, part)] = (x.detach()[0], (out[0] if isinstance(out, tuple) else out).detach()[0])
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def llava_loop(model, emb: torch.Tensor, image: torch.Tensor, cuts: list, compact: bool, scorer=None, observe=()):
    """Logits (1, n_alive, V) of one sample, the decoder run layer by layer; ``image``: prompt positions of the
    image tokens. ``cuts``: (layer, keep) with keep a count (needs ``scorer``) or a bool mask over the sequence.
    ``scorer(kind, ...)``: see the tests. Returns (logits, alive positions, [kept indices into the image per cut])."""
    lm = model.model.language_model
    n = emb.shape[1]
    alive = torch.arange(n)
    h = emb
    rec = Recorder(lm.layers, observe) if observe else None
    ttv_by_pos: dict[int, torch.Tensor] = {}
    kept_log = []
    try:
        for i, layer in enumerate(lm.layers):
            m = h.shape[1]
            pos = torch.arange(m)[None] if compact else alive[None]
            pe = lm.rotary_emb(h, position_ids=pos)
            for c, keep in cuts:
                if c != i:
                    continue
                is_img = torch.isin(alive, image)
                if isinstance(keep, int):
                    score = scorer(layer=layer, h=h, pe=pe, alive=alive, is_img=is_img, ttv=ttv_by_pos, cut=c)
                    top = topk_sorted(score, keep)
                    sel = ~is_img
                    sel[is_img.nonzero()[:, 0][top]] = True
                else:
                    sel = keep[alive]
                h, alive = h[:, sel], alive[sel]
                kept_log.append((image[:, None] == alive[None]).any(1).nonzero()[:, 0])
                m = h.shape[1]
                pos = torch.arange(m)[None] if compact else alive[None]
                pe = lm.rotary_emb(h, position_ids=pos)
            mask = torch.ones(m, m, dtype=torch.bool).tril()[None, None]
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
            if rec is not None and i in observe:
                t = torch.zeros(n)
                for part in ("attn", "mlp"):
                    x, y = rec.io[(i, part)]
                    t[alive] += ttv_reference(x, y, getattr(scorer, "direction", "code"))
                ttv_by_pos[i] = t
    finally:
        if rec is not None:
            rec.close()
    return model.lm_head(lm.norm(h)), alive, kept_log


def pdrop_scorer(layer, h, pe, alive, is_img, ttv, cut):
    """PyramidDrop: the last prompt token's row with the next layer's q/k."""
    return next_layer_rows(layer, h, pe, torch.tensor([h.shape[1] - 1]))[is_img]


class TransPruneScorer:
    """TransPrune: norm(sum of TTV of the observed layers < cut) + norm(instruction rows), over the image."""

    def __init__(self, first_instruction: int, direction: str = "code") -> None:
        self.first, self.direction = first_instruction, direction

    def __call__(self, layer, h, pe, alive, is_img, ttv, cut):
        instr = (alive >= self.first).nonzero()[:, 0]
        iga = next_layer_rows(layer, h, pe, instr)[is_img]
        lays = [t for lay, t in ttv.items() if lay < cut]
        t = torch.stack(lays).sum(0)[alive][is_img] if lays else torch.zeros(int(is_img.sum()))
        return normalised(t) + normalised(iga)

