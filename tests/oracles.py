"""Independent references for the exactness tests, written without any tokprune code.

* :func:`features` runs the unpatched encoder; :func:`cls_scores` reads [CLS] rows from *eager* attention maps.
* :func:`run_kept` feeds the unpatched model only the kept tokens (pre-LLM reference).
* :func:`layer_loop` runs the language model layer by layer with explicit masks and positions per layer, which
  gives the in-LLM references: pruned keys masked from layer K on ("original" positions), or only the kept tokens
  at re-indexed positions ("compact").
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


@torch.no_grad()
def features(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    return list(model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output)


@torch.no_grad()
def cls_scores(model, pixel_values: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Head-mean [CLS]->patch attention summed over ``layers`` from an eager run (CLS column dropped)."""
    vt = model.model.vision_tower
    impl = vt.config._attn_implementation
    vt.set_attn_implementation("eager")
    try:
        out = vt(pixel_values, output_attentions=True)
    finally:
        vt.set_attn_implementation(impl)
    return sum(out.attentions[i][:, :, 0, 1:].mean(1) for i in layers)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties to the lower index), in ascending order."""
    order = torch.sort(-scores, stable=True).indices[:k]
    return order.sort().values


def image_positions(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    return (ids == image_token_id).nonzero()[:, 0]


@torch.no_grad()
def run_kept(model, ids: torch.Tensor, feats: list[torch.Tensor], kept: list[torch.Tensor], compact: bool):
    """Unpatched model on one sample fed only the kept visual tokens (text tokens all kept)."""
    img = image_positions(ids[0], model.config.image_token_id)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[img] = False
    start = 0
    for f, k in zip(feats, kept):
        keep[img[start:start + f.shape[0]][k]] = True
        start += f.shape[0]
    pos = torch.arange(ids.shape[1])[keep] if not compact else torch.arange(int(keep.sum()))
    mm = {"image": BaseModelOutputWithPooling(pooler_output=[f[k] for f, k in zip(feats, kept)])}
    return model(input_ids=ids[:, keep], position_ids=pos[None], mm_encoder_outputs=mm).logits, keep


@torch.no_grad()
def embed(model, ids: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
    emb = model.model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id)[..., None].expand_as(emb)
    return emb.masked_scatter(mask, torch.cat(feats).to(emb.dtype))


@torch.no_grad()
def layer_loop(model, emb: torch.Tensor, k: int, keep: torch.Tensor, compact: bool) -> torch.Tensor:
    """Logits of one sample (1, N) where decoder layers >= k only see the tokens in ``keep`` (bool, N).

    original positions: every layer runs on the full sequence; from layer k the dropped tokens are masked as keys
    (each still sees itself). compact: from layer k only the kept tokens run, at positions 0..n_kept-1.
    Returns logits at the kept positions.
    """
    lm = model.model.language_model
    n = emb.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pos = torch.arange(n)[None]
    pe = lm.rotary_emb(emb, position_ids=pos)
    h = emb
    for i, layer in enumerate(lm.layers):
        if i == k and compact:
            h = h[:, keep]
            m = keep.sum()
            pos = torch.arange(int(m))[None]
            pe = lm.rotary_emb(h, position_ids=pos)
            causal = torch.ones(m, m, dtype=torch.bool).tril()
        mask = causal
        if i >= k and not compact:
            mask = causal & (keep[None, :] | torch.eye(n, dtype=torch.bool))
        h = layer(h, attention_mask=mask[None, None], position_embeddings=pe, position_ids=pos)
    logits = model.lm_head(lm.norm(h))
    return logits if compact else logits[:, keep]


@torch.no_grad()
def fastv_scores(model, ids: torch.Tensor, feats: list[torch.Tensor], k: int) -> torch.Tensor:
    """Head-mean attention of the last token in layer k-1 (eager run of the unpatched LLM), over image tokens."""
    lm = model.model.language_model
    impl = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        out = lm(inputs_embeds=embed(model, ids, feats), output_attentions=True)
    finally:
        lm.set_attn_implementation(impl)
    row = out.attentions[k - 1][0, :, -1].mean(0)
    return row[image_positions(ids[0], model.config.image_token_id)]
