"""Independent references for the exactness tests, written without any tokprune code.

* :func:`features` runs the unpatched encoder; :func:`cls_scores` reads [CLS] rows from *eager* attention maps.
* :func:`run_kept` feeds the unpatched model only the kept tokens (pre-LLM reference); :func:`greedy_decode`
  generates from such a prompt by hand, with explicit positions at every step (no ``generate()`` bookkeeping).
* :func:`layer_loop` / :func:`cuts_loop` run the language model layer by layer with explicit masks and positions
  per layer, which gives the in-LLM references for any number of cuts: pruned keys masked from each cut's layer on
  ("original" positions), or only the surviving tokens at re-indexed positions ("compact").
"""

from __future__ import annotations

import contextlib

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


@torch.no_grad()

def _cache(kw: dict):
    """The KV cache of a forward call's kwargs (named ``cache`` from transformers 5.24, ``past_key_values`` before)."""
    return kw["cache"] if kw.get("cache") is not None else kw.get("past_key_values")

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


def next_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """The position of the first generated token after a prompt at ``position_ids``: one past the prompt's largest
    position, per row. Qwen's (4, B, N) = [text row; t; h; w]: the M-RoPE rows all continue from the largest of
    their prompt values (text after an image restarts at the image's max + 1, so this is the last token's), the
    text row (masks only) from its own last value. (B, N) or (1, N): the largest value + 1. Returns (..., B, 1)."""
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        rope = position_ids[1:].amax(dim=(0, 2))[None, :, None].expand(3, -1, 1)
        return torch.cat([position_ids[:1, :, -1:], rope]) + 1
    if position_ids.dim() == 3:
        return position_ids.amax(dim=(0, 2))[None, :, None].expand(position_ids.shape[0], -1, 1) + 1
    return position_ids.amax(-1, keepdim=True) + 1


@torch.no_grad()
def greedy_decode(model, n_new: int, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, shift: int = 0, **prefill):
    """Greedy decoding by hand on the unpatched model, with explicit positions at every step and no ``generate()``
    bookkeeping: prefill ``input_ids`` at ``position_ids`` (with the ``prefill`` kwargs: encoder outputs, token
    types), then feed each argmax token at :func:`next_positions` + step (+ ``shift`` on the position rows, to
    show a wrong decode rule is visible). Returns ``sequences`` (B, N + n_new) and per-step ``logits`` (the raw
    last-token logits), the fields ``generate(return_dict_in_generate=True, output_logits=True)`` returns."""
    import inspect
    from types import SimpleNamespace

    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True,
                **prefill)
    nxt = next_positions(position_ids)
    if shift:
        nxt = torch.cat([nxt[:1], nxt[1:] + shift]) if nxt.shape[0] == 4 and nxt.dim() == 3 else nxt + shift
    seq, logits = input_ids, []
    for step in range(n_new):
        last = out.logits[:, -1]
        logits.append(last)
        token = last.argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], 1)
        if step == n_new - 1:
            break
        cache = getattr(out, "cache", None)
        cache = cache if cache is not None else out.past_key_values
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        out = model(input_ids=token, position_ids=nxt + step, attention_mask=attention_mask, use_cache=True,
                    **{cache_name: cache})
    return SimpleNamespace(sequences=seq, logits=tuple(logits))


@torch.no_grad()
def embed(model, ids: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
    emb = model.model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id)[..., None].expand_as(emb)
    return emb.masked_scatter(mask, torch.cat(feats).to(emb.dtype))


@torch.no_grad()
def layer_loop(model, emb: torch.Tensor, k: int, keep: torch.Tensor, compact: bool) -> torch.Tensor:
    """Logits of one sample (1, N) where decoder layers >= k only see the tokens in ``keep`` (bool, N): one cut
    of :func:`cuts_loop`."""
    return cuts_loop(model, emb, [(k, keep)], compact)


def cuts_loop(model, emb: torch.Tensor, cuts: list[tuple[int, torch.Tensor]], compact: bool) -> torch.Tensor:
    """Logits of one sample (1, N) where, for every cut ``(k, keep)`` (keep: bool over the N prompt tokens), decoder
    layers >= k only see the tokens in ``keep``.

    original positions: every layer runs on the full sequence; from each cut on its dropped tokens are masked as
    keys (each still sees itself). compact: at each cut only the surviving tokens go on, re-indexed 0..m-1 (as if
    the dropped ones never existed). Returns logits at the tokens surviving every cut.
    """
    lm = model.model.language_model
    n = emb.shape[1]
    alive = torch.arange(n)  # prompt positions of the rows of h (compact)
    seen = torch.ones(n, dtype=torch.bool)  # keys every query may see (original)
    pos = torch.arange(n)[None]
    pe = lm.rotary_emb(emb, position_ids=pos)
    h = emb
    for i, layer in enumerate(lm.layers):
        for k, keep in cuts:
            if k != i:
                continue
            if compact:
                stay = keep[alive]
                h, alive = h[:, stay], alive[stay]
                pos = torch.arange(alive.numel())[None]
                pe = lm.rotary_emb(h, position_ids=pos)
            else:
                seen = seen & keep
        m = h.shape[1]
        mask = torch.ones(m, m, dtype=torch.bool).tril()
        if not compact:
            mask = mask & (seen[None, :] | torch.eye(n, dtype=torch.bool))
        h = layer(h, attention_mask=mask[None, None], position_embeddings=pe, position_ids=pos)
    logits = model.lm_head(lm.norm(h))
    if compact:
        return logits
    final = torch.ones(n, dtype=torch.bool)
    for _, keep in cuts:
        final &= keep
    return logits[:, final]


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


# ---------------------------------------------------------------------------------------------- vision encoders
@torch.no_grad()
def vision_attention(model, x, layer: int) -> list[torch.Tensor]:
    """Eager attention probabilities of vision encoder layer ``layer``: one (n_seq, H, n, n) block per attention
    call, in call order (LLaVA: all images; LLaVA-NeXT: all tiles; Qwen: one image or window per call)."""
    import importlib

    inner = model.model
    if hasattr(inner, "visual"):  # Qwen: capture what the eager kernel returns for that block's attention
        vt = inner.visual
        attn = vt.blocks[layer].attn
        mod = importlib.import_module(type(attn).__module__)
        orig, seen = mod.eager_attention_forward, []

        def capture(module, *args, **kwargs):
            out, weights = orig(module, *args, **kwargs)
            if module is attn:
                seen.append(weights)
            return out, weights

        impl = vt.config._attn_implementation
        vt.set_attn_implementation("eager")
        mod.eager_attention_forward = capture
        try:
            vt(x["pixel_values"], grid_thw=x["image_grid_thw"])
        finally:
            mod.eager_attention_forward = orig
            vt.set_attn_implementation(impl)
        return seen
    vt = inner.vision_tower
    impl = vt.config._attn_implementation
    vt.set_attn_implementation("eager")
    try:
        return [vt(clip_pixels(model, x), output_attentions=True).attentions[layer]]
    finally:
        vt.set_attn_implementation(impl)


@torch.no_grad()
def features_of(model, x) -> list[torch.Tensor]:
    """The unpatched encoder's features per image, from a processor output (any family)."""
    extra = {k: x[k] for k in ("image_grid_thw", "image_sizes") if k in x}
    return list(model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True,
                                               **extra).pooler_output)


def clip_pixels(model, x) -> torch.Tensor:
    """The tiles CLIP encodes: every image (LLaVA) or each image's real tiles (LLaVA-NeXT pads the tile axis)."""
    pv = x["pixel_values"]
    if pv.dim() == 4:
        return pv
    return torch.cat([p[:k] for p, k in zip(pv, tiles_per_image(model, x))])


def tiles_per_image(model, x) -> list[int]:
    """Tiles each anyres image sends through the encoder (LLaVA-OneVision: one per image of a multi-image sample)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    n = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in x["image_sizes"]]
    if x.get("batch_num_images") is not None:  # LLaVA-OneVision: base tile only where a sample has several images
        single = [int(c) == 1 for c in x["batch_num_images"] for _ in range(int(c))]
        n = [k if one else 1 for k, one in zip(n, single)]
    return n


def pack(model, values: list[torch.Tensor], sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
    """The model's own packing of per-tile values, by keyword: LLaVA-NeXT with the "default" strategy (no [CLS]
    in the values), LLaVA-OneVision with its config's ``vision_aspect_ratio``."""
    cfg = model.config
    extra = ({"vision_aspect_ratio": cfg.vision_aspect_ratio} if hasattr(cfg, "vision_aspect_ratio")
             else {"vision_feature_select_strategy": "default"})
    packed, _ = model.model.pack_image_features(image_features=values, image_sizes=sizes, image_newline=newline,
                                                **extra)
    return list(packed)


def has_cls(model) -> bool:
    """Whether the CLIP-style encoder puts a [CLS] token first (SigLIP, LLaVA-OneVision's, does not)."""
    return hasattr(model.model.vision_tower.embeddings, "class_embedding") or hasattr(
        getattr(model.model.vision_tower, "vision_model", None), "class_embedding")


@torch.no_grad()
def per_token(model, x, per_call: list[torch.Tensor], inside: bool = True) -> list[torch.Tensor]:
    """Per-patch values (n_seq, n_patches, ...) of each encoder call, aligned with each image's LLM tokens:
    LLaVA drops [CLS]; LLaVA-NeXT packs the tiles with the model's own packing (newline slots NaN); Qwen joins the
    calls, averages every merge unit (4 consecutive patches) and, for values read ``inside`` the blocks, undoes
    Qwen2.5-VL's window order (the ViT's input is in raster order)."""
    inner = model.model
    if hasattr(inner, "visual"):
        vt = inner.visual
        grid = x["image_grid_thw"]
        per_patch = torch.cat([c.flatten(0, 1) for c in per_call])
        units = per_patch.unflatten(0, (-1, 4)).mean(1)
        if inside and hasattr(vt, "window_size"):  # Qwen2.5-VL: blocks run in window order
            from transformers.vision_utils import get_vision_window_index

            index, _ = get_vision_window_index(grid, spatial_merge_size=vt.spatial_merge_size,
                                               window_size=vt.window_size, patch_size=vt.patch_size)
            units = units[torch.argsort(index)]
        return list(torch.split(units, (grid.prod(-1) // 4).tolist()))
    tiles = torch.cat(per_call)[:, int(has_cls(model)):]
    if x["pixel_values"].dim() == 4:
        return list(tiles)
    out = []
    for j, t in enumerate(torch.split(tiles, tiles_per_image(model, x))):
        flat = t.reshape(*t.shape[:2], -1).float()
        packed = pack(model, [flat], x["image_sizes"][j:j + 1], torch.full((flat.shape[-1],), float("nan")))
        out.append(packed[0].reshape(-1, *t.shape[2:]))
    return out


def received(model, x, layer: int) -> list[torch.Tensor]:
    """Head-mean attention each visual token receives: the column mean over all queries of its image (LLaVA: of its
    attention call, one image or tile). A windowed Qwen2.5-VL block runs one call per window; as in HiPrune's
    reference (one masked attention over the image, summed over all queries) the queries of other windows pay a key
    0, so the window's column *sum* is divided by the image's patch count (not by the window's)."""
    maps = vision_attention(model, x, layer)
    if not hasattr(model.model, "visual"):
        return per_token(model, x, [a.mean(1).mean(-2) for a in maps])
    sums = per_token(model, x, [a.mean(1).sum(-2) for a in maps])
    return [s / int(n) for s, n in zip(sums, x["image_grid_thw"].prod(-1))]


# ---------------------------------------------------------------------------------------------- LLM cuts
class CutMask:
    """Masking oracle for any number of LLM cuts: keeps the whole sequence, and decoder layer ``i`` gets a causal
    mask hiding every prompt key dropped at a cut ``(layer, keep)`` with ``layer <= i`` (each query still sees
    itself). Equivalent to dropping those tokens before each cut layer at their original positions. ``keep``:
    (B, N) bool over the prompt; padded prompts are honoured (the 2D mask of the prefill).

    ``merges``: tokens an LLM stage builds (SparseVLM's recycling) as ``(layer, row, slot, sources)`` prompt
    positions: at the prefill, the hidden state entering ``layer`` at ``slot`` becomes the mean of those entering
    it at ``sources`` (sum over ``count + 1e-6``, the reference's merge), so the slot carries the new token from
    that layer on, at its own position."""

    def __init__(self, model, cuts: list[tuple[int, torch.Tensor]],
                 merges: list[tuple[int, int, int, list[int]]] = ()) -> None:
        self.model, self.cuts, self.merges = model, cuts, list(merges)
        self.handles: list = []

    def __enter__(self) -> CutMask:
        self.handles = [self.model.register_forward_pre_hook(self._top, with_kwargs=True)]
        layers = self.model.model.language_model.layers
        first = min((c for c, _ in self.cuts), default=len(layers))
        self.handles += [layers[i].register_forward_pre_hook(self._layer(i), with_kwargs=True)
                         for i in range(first, len(layers))]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _top(self, module, args, kw):
        pkv = _cache(kw)
        if pkv is None or pkv.get_seq_length() == 0:
            am = kw.get("attention_mask")
            n = self.cuts[0][1].shape[1]
            self.real = am.bool() if am is not None else torch.ones(self.cuts[0][1].shape[0], n, dtype=torch.bool)

    def _layer(self, i: int):
        def hook(module, args, kw):
            hidden = args[0] if args else kw["hidden_states"]
            b, q = hidden.shape[:2]
            mine = [m for m in self.merges if m[0] == i]
            if mine and q == self.real.shape[1]:  # the prefill
                hidden = hidden.clone()
                for _, row, slot, sources in mine:
                    src = hidden[row, sources]
                    hidden[row, slot] = src.sum(0) / (len(sources) + 1e-6)
                args = (hidden, *args[1:]) if args else args
                if not args:
                    kw = {**kw, "hidden_states": hidden}
            keep = self.real.clone()
            for layer, k in self.cuts:
                if layer <= i:
                    keep &= k
            n = keep.shape[1]
            pkv = _cache(kw)
            past = pkv.get_seq_length(module.self_attn.layer_idx) if pkv is not None else 0
            kv = past + q
            ok = torch.cat([keep, torch.ones(b, kv - n, dtype=torch.bool)], 1)
            qpos = torch.arange(past, kv).view(1, 1, q, 1)
            kpos = torch.arange(kv).view(1, 1, 1, kv)
            allowed = (kpos <= qpos) & (ok[:, None, None] | (kpos == qpos))
            if self.model.config.get_text_config()._attn_implementation == "eager":
                allowed = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed,
                                                                                     torch.finfo(hidden.dtype).min)
            return args, {**kw, "attention_mask": allowed}

        return hook


@torch.no_grad()
def eager_rows_under_cuts(model, x, cuts: list[tuple[int, torch.Tensor]], layer: int) -> torch.Tensor:
    """Eager attention probabilities (B, H, N, N) of decoder ``layer`` with the given earlier cuts applied."""
    impl = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with CutMask(model, cuts) if cuts else contextlib.nullcontext():
            return model(**x, output_attentions=True).attentions[layer]
    finally:
        model.set_attn_implementation(impl)



# ---------------------------------------------------------------------------------------------- VisionZip / HiPrune
@torch.no_grad()
def eager_weights_and_keys(model, x, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(attention probabilities (n_seq, H, n, n), keys (n_seq, H, n, d)) of vision layer ``layer`` per attention call,
    captured from the family's own eager kernel (CLIP: every image / tile in one call; Qwen: per image or window)."""
    import importlib

    inner = model.model
    qwen = hasattr(inner, "visual")
    vt = inner.visual if qwen else inner.vision_tower
    attn = vt.blocks[layer].attn if qwen else getattr(vt, "vision_model", vt).encoder.layers[layer].self_attn
    mod = importlib.import_module(type(attn).__module__)
    orig, seen = mod.eager_attention_forward, []

    def capture(module, query, key, *args, **kwargs):
        out, weights = orig(module, query, key, *args, **kwargs)
        if module is attn:
            seen.append((weights, key))
        return out, weights

    impl = vt.config._attn_implementation
    vt.set_attn_implementation("eager")
    mod.eager_attention_forward = capture
    try:
        if qwen:
            vt(x["pixel_values"], grid_thw=x["image_grid_thw"])
        else:
            vt(clip_pixels(model, x))
    finally:
        mod.eager_attention_forward = orig
        vt.set_attn_implementation(impl)
    return seen


def visionzip_groups(s: torch.Tensor, metric: torch.Tensor, dominant: int, contextual_num: int
                     ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """VisionZip on one image (or tile), as the reference's ``CLIPVisionTower_VisionZip.forward`` writes it: the top
    ``dominant`` patches by ``s``; among the rest (raster order) ``contextual_num`` uniform targets and an argmax
    assignment on L2-normalised ``metric``. Returns (dominant indices, [(slot, target, members)] per contextual
    token), a contextual token sitting at the lowest-index free patch among its sources."""
    n = s.shape[0]
    topk_indices = s.topk(dominant).indices
    mask = torch.ones(n, dtype=torch.bool)
    mask[topk_indices] = False
    rest = mask.nonzero()[:, 0]  # raster order
    metric_filtered = metric[rest][None]
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, others, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    member_of = similarity.argmax(dim=2)[0]
    groups = []
    free = torch.ones(n, dtype=torch.bool)
    free[topk_indices] = False
    for c in range(contextual_num):
        target, members = rest[target_indices[c]], rest[others][member_of == c]
        src = torch.cat([target.view(1), members]).sort().values
        cand = src[free[src]]
        slot = cand[0] if cand.numel() else free.nonzero()[0, 0]
        free[slot] = False
        groups.append((slot, target, members))
    return topk_indices, groups


def merge_groups(full: torch.Tensor, groups: list, index: torch.Tensor | None = None) -> torch.Tensor:
    """``full`` (n, D) features (or a DeepStack level) with each contextual token, (target + mean of its members) / 2
    (tokprune's normalised form of the reference's target + mean), in its slot; ``index`` maps group indices."""
    new = full.clone()
    at = (lambda i: i) if index is None else (lambda i: index[i])
    for slot, target, members in groups:
        t = full[at(target)].float()
        new[at(slot)] = (t if not members.numel() else (t + full[at(members)].float().mean(0)) / 2).to(full.dtype)
    return new


@torch.no_grad()
def visionzip_inputs(model, x) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image: VisionZip's dominance score (head-summed [CLS] row of the feature layer; Qwen: received attention)
    and metric (head-mean keys), per LLM token from eager maps (LLaVA-NeXT: packed, NaN at newlines)."""
    inner = model.model
    qwen = hasattr(inner, "visual")
    cfg = model.config
    layer = (len(inner.visual.blocks) - 1 if qwen
             else cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1) - 1)
    calls = eager_weights_and_keys(model, x, layer)
    if qwen:
        scores = per_token(model, x, [w.mean(1).mean(-2) for w, _ in calls])
    else:
        scores = per_token(model, x, [w[:, :, 0].sum(1) for w, _ in calls])
    return scores, per_token(model, x, [k.float().mean(1) for _, k in calls])


@torch.no_grad()
def visionzip_reference(model, x, keep: int, contextual: int | None = None) -> list[tuple[torch.Tensor, object]]:
    """VisionZip on eager maps, one budget per image (LLaVA, Qwen): per image (kept slots sorted, ``merged(full)``
    putting the contextual tokens of any per-token tensor in their slots). Split: ``contextual`` or the paper's
    54:10 scaled; the [CLS] slot of HF's "default" LLaVA features goes to one more patch."""
    scores, keys = visionzip_inputs(model, x)
    contextual_num = keep - round(keep * 54 / 64) if contextual is None else contextual
    out = []
    for s, metric in zip(scores, keys):
        dom, groups = visionzip_groups(s, metric, keep - contextual_num, contextual_num)
        slots = torch.cat([dom] + [g[0].view(1) for g in groups]).sort().values
        out.append((slots, lambda full, groups=groups: merge_groups(full, groups)))
    return out


# ---------------------------------------------------------------------------------------------- VFlowOpt
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _feature_layer(model) -> int:
    inner, cfg = model.model, model.config
    if hasattr(inner, "visual"):
        return len(inner.visual.blocks) - 1
    return cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1) - 1


def _entropy_bits(grey: torch.Tensor) -> torch.Tensor:
    """(n, V) integer grey levels 0..255 -> (n,) Shannon entropy in bits, 256 bins (log2(p + 1e-10))."""
    out = []
    for row in grey:
        p = torch.bincount(row, minlength=256).float() / row.numel()
        out.append(-(p * torch.log2(p + 1e-10)).sum())
    return torch.stack(out)


@torch.no_grad()
def raw_token_pixels(model, x) -> list[torch.Tensor]:
    """Per image (LLaVA, Qwen), each LLM token's raw RGB values in 0..255: ``255 * (pixel_values * std + mean)``
    (CLIP's mean / std), (n, 3, V): a CLIP patch, or a Qwen merge unit's 4 consecutive patches (both frames)."""
    pv = x["pixel_values"].float()
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    if hasattr(model.model, "visual"):
        rows = pv.reshape(pv.shape[0], 3, -1) * std.view(1, 3, 1) + mean.view(1, 3, 1)
        units = rows.unflatten(0, (-1, 4)).permute(0, 2, 1, 3).flatten(2)  # (units, 3, 4 * V)
        return list(torch.split(255 * units, (x["image_grid_thw"].prod(-1) // 4).tolist()))
    p = model.config.vision_config.patch_size
    img = pv * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    patches = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(1, 2).flatten(-2)
    return list(255 * patches)


@torch.no_grad()
def vflowopt_importance(model, x, t: float, alpha: float = 0.0) -> list[torch.Tensor]:
    """VFlowOpt's importance per LLM token of each image from eager maps of the feature layer: per attention
    call, received r = column mean of the head-mean map; hubs r > t * mean(r); c = mean of the hub rows (r when
    there is no hub); + alpha * softmax over the image of the grey-level entropy of raw 0..255 pixels (each channel
    rounded to its integer level before the grey sum)."""
    calls = []
    for a in vision_attention(model, x, _feature_layer(model)):
        a = a.float().mean(1)  # (n_seq, n, n)
        r = a.mean(1)
        c = []
        for seq_a, seq_r in zip(a, r):
            hub = seq_r > t * seq_r.mean()
            c.append(seq_a[hub].mean(0) if hub.any() else seq_r)
        calls.append(torch.stack(c))
    imp = per_token(model, x, calls)
    if alpha:
        # each channel at its integer level first (the reference's per-channel uint8 cast), then the grey sum
        grey = [((px.round().clamp(0, 255) * 0.3333).sum(1)).round().long() for px in raw_token_pixels(model, x)]
        imp = [i + alpha * _entropy_bits(g).softmax(0) for i, g in zip(imp, grey)]
    return imp


def vflowopt_recycle(imp: torch.Tensor, rows: list[int], cols: list[int], keep: int, a: float,
                     group: list[int] | None = None) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """VFlowOpt's stage 1 on one image, written as loops: drop the n_low lowest-importance tokens (ties: lower
    index first), n_low the smallest with ``n - n_low + (non-empty cells among them) == keep``; each cell's
    highest-importance dropped token comes back. Returns (kept indices incl. representatives, [(rep, members)])."""
    import math

    n = imp.shape[0]
    if keep >= n:
        return list(range(n)), []
    group = group or [0] * n
    order = sorted(range(n), key=lambda j: (float(imp[j]), j))
    cell_of = [(group[j], math.floor(rows[j] / a), math.floor(cols[j] / a)) for j in range(n)]
    for n_low in range(n - keep, n + 1):
        cells: dict = {}
        for j in order[:n_low]:
            cells.setdefault(cell_of[j], []).append(j)
        if n - n_low + len(cells) == keep:
            break
    else:
        raise AssertionError("the oracle covers budgets of at least one token per cell")
    groups = [(max(m, key=lambda j: (float(imp[j]), -j)), sorted(m)) for m in cells.values()]
    kept = sorted(set(range(n)) - set(order[:n_low]) | {rep for rep, _ in groups})
    return kept, sorted(groups)


def vflowopt_merge(full: torch.Tensor, groups: list[tuple[int, list[int]]], imp: torch.Tensor) -> torch.Tensor:
    """``full`` (n, D) with each representative replaced by the importance-weighted mean of its cell's members."""
    new = full.clone()
    for rep, members in groups:
        w = imp[members].float().clamp(min=0)
        w = torch.ones_like(w) if w.sum() <= 0 else w
        new[rep] = ((w[:, None] * full[members].float()).sum(0) / w.sum()).to(full.dtype)
    return new


def vflowopt_counts(n: int, keep: int, r2: float, r3: float, spans: tuple[int, int, int]) -> tuple[int, int, int]:
    """Brute force: the pre-LLM count k1 whose stages (each LLM cut keeps ``n - round(n (1 - r))``) average
    closest to ``keep`` over the decoder's layers (ties: fewer tokens)."""
    def stages(k1):
        k2 = max(1, k1 - round(k1 * (1 - r2)))
        return k1, k2, max(1, k2 - round(k2 * (1 - r3)))

    def err(c):
        return abs(sum(k * s for k, s in zip(c, spans)) / sum(spans) - keep)

    return min((stages(k1) for k1 in range(1, n + 1)), key=lambda c: (err(c), c))


def vflowopt_record_merges(model, x, rec, t: float) -> list:
    """Per image of a one-row record: ``full -> full`` putting each recycled token the record lists (its sources
    and slot) as the weighted mean of its sources, weights = the independent importance (alpha = 0)."""
    imp = vflowopt_importance(model, x, t)
    out = []
    for j, merged in enumerate(rec.merged[0]):
        groups = [] if merged is None else [(int(s), src.tolist()) for s, src in zip(merged.slots, merged.sources)]
        out.append(lambda full, groups=groups, w=imp[j]: vflowopt_merge(full, groups, w))
    return out
