"""An independent re-implementation of SparseVLM's decoder loop, written from the authors' code (Gumpest/SparseVLMs,
``llava/model/language_model/modelling_sparse_llama.py`` ``LlamaDynamicvitModel.forward``, ``score.py``
``attn_postprocess_topk`` (v1.5) / ``attn_postprocess_rank`` (v1, commit b72c5d6), ``utils.py``
``cluster_and_merge``), for one row of a LLaVA model (one image, batch 1, as the reference).

It uses no tokprune code: it runs the unpatched decoder layers one by one, computes the pruning layer's attention
eagerly from its q/k, applies the authors' rule after that layer (raters, top-k, rank count, top-30 % recycling,
DPC-kNN merge, merged tokens inserted after the kept visual tokens, positions truncated to 0..L'-1) and decodes
greedily with every layer's new token at that layer's cache length (the reference's ``get_usable_length``).
The one departure: ``cluster_and_merge``'s ``rand * 1e-6`` density noise is left out (ties do not occur on these
random inputs), so the run is deterministic. Each visual token carries an identity: ``("v", i)`` for original
token i, ``("m", stage, j)`` for the j-th merged token of a stage.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from tokprune.patches.compat import cache_kwargs


def cluster_and_merge(x: torch.Tensor, cluster_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' DPC-kNN merge for one row ``x`` (N, C): (merged (cluster_num, C), cluster of each row)."""
    n, c = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / (c ** 0.5)
    dist_nearest, _ = torch.topk(dist, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).type(x.dtype)
    dist_max = dist.flatten().max()
    delta, _ = (dist * mask + dist_max * (1 - mask)).min(dim=-1)
    score = delta * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    idx_cluster = dist[index_down].argmin(dim=0)
    idx_cluster[index_down] = torch.arange(cluster_num)
    all_weight = torch.zeros(cluster_num, 1).index_add_(0, idx_cluster, torch.ones(n, 1)) + 1e-6
    norm_weight = torch.ones(n, 1) / all_weight[idx_cluster]
    merged = torch.zeros(cluster_num, c).index_add_(0, idx_cluster, x * norm_weight)
    return merged, idx_cluster


def _causal(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(1, 1, n, n, dtype=dtype).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1),
                                                              torch.finfo(dtype).min)


def _attention(layer, h: torch.Tensor, pe) -> torch.Tensor:
    """Eager softmax(q k^T * scaling + causal) of a decoder layer on ``h``, mean over heads: (L, L)."""
    attn = layer.self_attn
    hn = layer.input_layernorm(h)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(hn).view(shape).transpose(1, 2)
    k = attn.k_proj(hn).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pe)
    k = repeat_kv(k, attn.num_key_value_groups)
    w = q @ k.transpose(2, 3) * attn.scaling + _causal(h.shape[1], h.dtype)
    return w.softmax(dim=-1).mean(1)[0]


@torch.no_grad()
def run(model, x, cut_after: tuple[int, ...], counts: tuple[int, ...] | None = None,
        scale: float | None = None, bias: float = 0.0, new_tokens: int = 0) -> dict:
    """SparseVLM on one LLaVA row: v1.5 with ``counts`` (the reference's ``sparse_token_list``), or v1 with
    ``scale`` / ``bias``. Returns the last prompt token's logits, per stage the kept identities and the merged
    tokens' source identities, and with ``new_tokens`` the greedy tokens and their per-step logits."""
    ids = x["input_ids"]
    image_id = model.config.image_token_id
    lm = model.model.language_model
    h = model(**x, output_hidden_states=True).hidden_states[0]  # the decoder's input embeddings
    vis = (ids[0] == image_id).nonzero()[:, 0]
    v_start, v_num = int(vis[0]), int(vis.numel())
    text_start = v_start + v_num
    # raters: once, on the input embeddings
    m_v_t = (h[0, v_start:text_start] @ h[0, text_start:].T).softmax(dim=-1).mean(dim=0)
    t_idx = torch.where(m_v_t > m_v_t.mean())[0]
    ident = [("v", i) for i in range(v_num)]
    stages = []
    cache = __import__("transformers").DynamicCache(config=lm.config)
    for li, layer in enumerate(lm.layers):
        n = h.shape[1]
        pos = torch.arange(n)[None]
        pe = lm.rotary_emb(h, pos)
        probs = _attention(layer, h, pe) if li in cut_after else None
        h = layer(h, attention_mask=_causal(n, h.dtype), position_ids=pos, position_embeddings=pe,
                  use_cache=True, **cache_kwargs(cache))
        if probs is None:
            continue
        s = cut_after.index(li)
        relation = probs[text_start + t_idx, v_start:v_start + v_num]  # (raters, visual)
        score = relation.mean(0)
        if scale is not None:  # v1: attn_postprocess_rank
            rank = int(torch.linalg.matrix_rank(relation.float()))
            if v_num - rank == 0:
                stages.append({"kept": set(ident), "merged": []})
                continue
            k = min(int(rank * scale + bias), v_num - 1)
        else:  # v1.5: attn_postprocess_topk
            k = min(counts[s], v_num - 1)
        keep = torch.zeros(v_num, dtype=torch.bool)
        keep[torch.topk(score, k).indices] = True
        pruned = torch.where(~keep)[0]  # index order, as torch.where(pred_score_vis == 0)
        m = int(pruned.numel() * 0.3) + 1
        top = score[pruned].topk(m).indices
        cand = pruned[top]
        cluster_num = int(m / 10) + 1
        merged, assign = cluster_and_merge(h[0, v_start + cand], cluster_num)
        kept_rows = v_start + torch.where(keep)[0]
        h = torch.cat([h[:, :v_start], h[:, kept_rows], merged[None].to(h.dtype), h[:, text_start:]], dim=1)
        new_ident = [("m", s, j) for j in range(cluster_num)]
        stages.append({"kept": {ident[i] for i in torch.where(keep)[0].tolist()} | set(new_ident),
                       "merged": [{ident[int(i)] for i in cand[assign == j]} for j in range(cluster_num)]})
        ident = [ident[i] for i in torch.where(keep)[0].tolist()] + new_ident
        v_num = k + cluster_num
        text_start = v_start + v_num
    logits = model.lm_head(lm.norm(h))[0, -1]
    out = {"logits": logits, "stages": stages, "tokens": [], "step_logits": []}
    tok = int(logits.argmax())
    for _ in range(new_tokens):
        out["tokens"].append(tok)
        h = lm.embed_tokens(torch.tensor([[tok]]))
        for li, layer in enumerate(lm.layers):
            pos = torch.tensor([[cache.get_seq_length(li)]])  # this layer's own cache length
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos),
                      use_cache=True, **cache_kwargs(cache))
        step = model.lm_head(lm.norm(h))[0, -1]
        out["step_logits"].append(step)
        tok = int(step.argmax())
    return out
