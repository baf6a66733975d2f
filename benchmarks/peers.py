"""tokprune next to the way the methods' own code gets its scores: from *eager* attention maps.

The reference code of FasterVLM (``cls``), VTC-CLS (``vtc_cls``), VisionZip, HiPrune and VisPruner runs the CLIP
tower with ``output_attentions=True`` (every layer's (heads, n, n) map materialised, eager attention in every layer)
and reads the rows it needs (VisionZip also the feature layer's raw keys); FastV's code turns ``output_attentions``
on in LLM layer K-1 (that layer runs eager attention) and cuts before layer K; LightCompress gets the same row by
running layer K-1 normally and then re-running its attention module eagerly. This script re-implements those styles
on the same Hugging Face model (no tokprune code on the reference path; each selection as the authors' code does
it, at tokprune's default settings on LLaVA-1.5), checks that each keeps the same tokens as tokprune and gives the
same logits, and times them round-robin against tokprune (SDPA everywhere, rows from q/k in taps).

    python benchmarks/peers.py --estimate --skip llava-next:8                       # minutes the next two take
    python benchmarks/peers.py --skip llava-next:8 --no-memory --out DIR            # checks + timings
    python benchmarks/peers.py --memory-only --out DIR                              # peak memory, every setting
    python benchmarks/peers.py --quick --out /tmp/peers                             # tiny config, seconds (tests)

Scales: ``llava-1.5`` = one 336 px image (576 visual tokens); ``llava-next`` = 2880 visual tokens, five 576-token
images in the same LLaVA-1.5 model (the five crops of a 672 px LLaVA-NeXT image, without the anyres packing and
newline tokens: the encoder, the maps and the LLM see the same token counts). Peak memory: every case once more in a
fresh process (peak RSS above the built model's on CPU, ``max_memory_allocated`` on CUDA). Writes
``<out>/peers.{json,md}``. Weights are random: the timings and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokprune  # noqa: E402
from tokprune import configs  # noqa: E402
from tokprune.eval.proxy import reduce_depth  # noqa: E402

SCALES = {"llava-1.5": 1, "llava-next": 5}  # images of 576 tokens per sample
Kept = list[list[torch.Tensor]]  # per sample, per image: sorted kept indices into its visual tokens


# ------------------------------------------------------------------------------------------ reference styles
def _feature_layer(model: torch.nn.Module) -> int:
    """0-based CLIP layer whose output LLaVA consumes (``vision_feature_layer`` counts hidden states)."""
    cfg = model.config
    return cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1) - 1


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise indices of the k largest scores, ties to the lower index, ascending."""
    return torch.sort(-scores, dim=-1, stable=True).indices[..., :k].sort(-1).values


def _pruned_prompt(inputs: dict[str, Any], image_id: int, n_images: int, kept_per_image: list[int]) -> torch.Tensor:
    """Columns of the prompt that stay: every text token and the first ``kept_per_image[i]`` placeholders of image
    ``i`` (all samples share one layout, see ``configs.example_inputs``)."""
    ids = inputs["input_ids"][0]
    img = (ids == image_id).nonzero()[:, 0]
    keep = ids != image_id
    per = img.numel() // n_images
    for i, k in enumerate(kept_per_image):
        keep[img[i * per: i * per + k]] = True
    return keep


def clip_reference(model: torch.nn.Module, inputs: dict[str, Any], keep: int, select: Callable[..., Any]
                   ) -> tuple[torch.Tensor, Kept]:
    """The eager-CLIP scaffold of the [CLS]-attention methods' reference code: the vision tower runs with
    ``output_hidden_states=True, output_attentions=True`` (every layer's (B, heads, n, n) map materialised);
    ``select(out, keep, model)`` turns that output into, per image, the encoder-space tokens the projector maps
    ((keep, D) rows) and the kept patch indices (ascending). The prompt keeps ``keep`` placeholders per image
    (contiguous positions, LLaVA's ``inputs_embeds`` path). Returns the last token's logits and the kept sets."""
    inner, cfg = model.model, model.config
    pixels = inputs["pixel_values"]
    out = inner.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
    tokens, idx = select(out, keep, model)
    kept_feats = inner.multi_modal_projector(tokens)
    batch = inputs["input_ids"].shape[0]
    n_images = pixels.shape[0] // batch
    cols = _pruned_prompt(inputs, cfg.image_token_id, n_images, [keep] * n_images)
    mm = {"image": BaseModelOutputWithPooling(pooler_output=list(kept_feats))}
    logits = model(input_ids=inputs["input_ids"][:, cols], attention_mask=inputs["attention_mask"][:, cols],
                   mm_encoder_outputs=mm, use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits, [list(idx[b * n_images:(b + 1) * n_images]) for b in range(batch)]


def _patches_of(out: Any, model: torch.nn.Module) -> torch.Tensor:
    """The feature layer's patch features (LLaVA's "default" strategy: [CLS] dropped), (images, N, D)."""
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _gathered(feats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1]))


def cls_select(layers: list[int]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """FasterVLM / VTC-CLS: the head-mean [CLS]->patch rows of ``layers`` summed, the top ``keep`` patches."""
    def select(out: Any, keep: int, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        scores = sum(out.attentions[i][:, :, 0, 1:].mean(1) for i in layers)
        idx = _top(scores, keep)
        return _gathered(_patches_of(out, model), idx), idx
    return select


def cls_reference(model: torch.nn.Module, inputs: dict[str, Any], keep: int, layers: list[int]
                  ) -> tuple[torch.Tensor, Kept]:
    """FasterVLM / VTC-CLS style (:func:`clip_reference` with :func:`cls_select`)."""
    return clip_reference(model, inputs, keep, cls_select(layers))


def vispruner_select(out: Any, keep: int, model: torch.nn.Module, important_ratio: float = 0.5
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """VisPruner (Theia-4869/VisPruner ``encode_images``): the feature layer's [CLS]->patch row, mean over heads;
    ``int(keep * ratio)`` important patches by descending score; the rest in descending order lose, round by round,
    ``min(8, R - diverse)`` tokens: the even-position tokens with the highest best cosine to an odd-position one
    (normalised feature-layer patch features); kept = important + what remains, in raster order. Sorts are
    stable (ties to the lower index; the reference's ``argsort`` leaves tie order unspecified)."""
    f = _feature_layer(model)
    feats = _patches_of(out, model)
    b = feats.shape[0]
    attn = out.attentions[f][:, :, 0, 1:].mean(1)
    important = int(keep * important_ratio)
    diverse = keep - important
    order = torch.argsort(attn, dim=-1, descending=True, stable=True)
    residual = order[:, important:]
    unit = feats / feats.norm(dim=-1, keepdim=True)
    rows = torch.arange(b, device=feats.device)[:, None]
    while True:
        r_now = residual.shape[1]
        r = min(8, r_now - diverse)
        if r <= 0:
            break
        tok = unit[rows, residual]
        best = (tok[:, ::2] @ tok[:, 1::2].transpose(-1, -2)).max(-1).values
        distinct = torch.argsort(best, dim=-1, descending=True, stable=True)[:, r:]
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=-1)
    idx = torch.cat([order[:, :important], residual], dim=-1).sort(-1).values
    return _gathered(feats, idx), idx


def hiprune_object_layer(model: torch.nn.Module) -> int:
    """The reference's object layer, ``HIPRUNE_OBJECT_LAYER=9`` (0-based 8 of CLIP's 24), at the same relative
    depth on a shallower tower, never past the feature layer."""
    n = model.config.vision_config.num_hidden_layers
    return min(round(8 * n / 24), _feature_layer(model))


def hiprune_select(out: Any, keep: int, model: torch.nn.Module, alpha: float = 0.1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """HiPrune (Danielement321/HiPrune ``LLaVA/llava/model/llava_arch.py`` ``encode_images``): received attention =
    the map's mean over heads and over all queries, [CLS] column dropped, at the object layer and at the feature
    layer; ``round(keep * alpha / 5)`` anchors (top at the object layer) with flat offsets -1, +1, -W, +W clamped
    to the image, de-duplicated; the rest by the feature layer's score with the chosen ones pushed down by 1;
    kept in raster order. Per image, as the reference's loop."""
    feats = _patches_of(out, model)
    n = feats.shape[1]
    width = int(n ** 0.5)
    deep = out.attentions[_feature_layer(model)].mean(1).mean(1)[:, 1:].clone()
    shallow = out.attentions[hiprune_object_layer(model)].mean(1).mean(1)[:, 1:]
    n_anchor = round(keep * alpha / 5)
    kept = []
    for i in range(feats.shape[0]):
        anchors = torch.topk(shallow[i], n_anchor).indices
        chosen = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1)
        chosen = torch.unique(chosen)
        taken = torch.zeros(n, dtype=torch.bool, device=feats.device)
        taken[chosen] = True
        deep[i] -= taken.to(deep.dtype)
        rest = torch.topk(deep[i], keep - chosen.numel()).indices
        kept.append(torch.cat([chosen, rest]).sort().values)
    idx = torch.stack(kept)
    return _gathered(feats, idx), idx


def visionzip_select(out: Any, keep: int, model: torch.nn.Module, keys: list[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip (dvlab-research/VisionZip ``visionzip/clip_encoder.py``): at the feature layer, the [CLS]->patch
    row summed over heads ranks ``dominant - 1`` patches (``dominant = round(keep * 54 / 64)`` counts [CLS]); the
    other patches' head-mean raw keys (``k_proj`` output, captured in ``keys``), L2-normalised, pick ``contextual``
    uniform targets (``step = max(1, M // C)``) and every other one joins its most similar target; a contextual
    token = target + mean of its members. Tokens (encoder space, with [CLS]): [CLS], dominant patches in raster
    order, contextual tokens. Its "kept set" is the slots tokprune's record gives it: the dominant patches, the
    targets and, for [CLS] (not a patch under LLaVA's "default" strategy), the lowest other free patch."""
    f = _feature_layer(model)
    hidden = out.hidden_states[f + 1]
    b, n1, d = hidden.shape
    heads = model.config.vision_config.num_attention_heads
    metric = keys[-1].view(b, n1, heads, -1).mean(2)
    dominant = round(keep * 54 / 64)
    contextual = keep - dominant
    dom = _top(out.attentions[f][:, :, 0, 1:].sum(1), dominant - 1)
    is_dom = torch.zeros(b, n1 - 1, dtype=torch.bool, device=hidden.device)
    is_dom.scatter_(1, dom, True)
    m = n1 - 1 - (dominant - 1)
    rest = (~is_dom).nonzero()[:, 1].view(b, m)  # the other patches, raster order
    key = _gathered(metric[:, 1:], rest)
    key = key / key.norm(dim=-1, keepdim=True)
    h_rest = _gathered(hidden[:, 1:], rest)
    step = max(1, m // contextual)
    targets = torch.arange(0, m, step, device=hidden.device)[:contextual]
    others = torch.ones(m, dtype=torch.bool, device=hidden.device)
    others[targets] = False
    sim = key[:, others] @ key[:, targets].transpose(1, 2)
    onehot = torch.zeros(b, int(others.sum()), contextual, dtype=hidden.dtype, device=hidden.device)
    onehot.scatter_(2, sim.argmax(2, keepdim=True), 1)
    counts = onehot.sum(1).clamp(min=1)[..., None]
    ctx = h_rest[:, targets] + onehot.transpose(1, 2) @ h_rest[:, others] / counts
    tokens = torch.cat([hidden[:, :1], _gathered(hidden[:, 1:], dom), ctx], dim=1)
    slots = torch.cat([dom, rest[:, targets]], dim=1)
    free = torch.ones(b, n1 - 1, dtype=torch.bool, device=hidden.device)
    free.scatter_(1, slots, False)
    cls_slot = free.to(torch.int8).argmax(1, keepdim=True)
    return tokens, torch.cat([cls_slot, slots], dim=1).sort(-1).values


def visionzip_reference(model: torch.nn.Module, inputs: dict[str, Any], keep: int) -> tuple[torch.Tensor, Kept]:
    """VisionZip style: :func:`clip_reference` with the feature layer's raw keys captured by a hook on its
    ``k_proj`` (the reference patches CLIP's attention forward to return them)."""
    keys: list[torch.Tensor] = []
    vt = model.model.vision_tower
    layer = getattr(vt, "vision_model", vt).encoder.layers[_feature_layer(model)]
    hook = layer.self_attn.k_proj.register_forward_hook(lambda mod, a, o: keys.append(o))
    try:
        return clip_reference(model, inputs, keep, lambda o, k, m: visionzip_select(o, k, m, keys))
    finally:
        hook.remove()


def fastv_reference(model: torch.nn.Module, inputs: dict[str, Any], keep: int, layer: int, rerun: bool
                    ) -> tuple[torch.Tensor, Kept]:
    """FastV style (``rerun=False``: layer K-1 runs eager attention and returns its weights) or LightCompress style
    (``rerun=True``: layer K-1 runs SDPA, then its attention module runs again eagerly for the weights). The last
    prompt token's head-mean row over the visual tokens ranks them; the top ``keep`` of each image (tokprune's
    per-image budget; FastV's code knows one image, whose span it ranks as one); survivors keep their original
    positions from layer K on. The decoder runs layer by layer here."""
    inner, cfg = model.model, model.config
    lm = inner.language_model
    ids = inputs["input_ids"]
    batch, n = ids.shape
    feats = inner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    emb = lm.get_input_embeddings()(ids)
    h = emb.masked_scatter((ids == cfg.image_token_id)[..., None].expand_as(emb), torch.cat(list(feats)).to(emb.dtype))
    pos = torch.arange(n, device=ids.device)[None].expand(batch, n)
    pe = lm.rotary_emb(h, position_ids=pos)
    causal = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)[None, None]
    img = (ids[0] == cfg.image_token_id).nonzero()[:, 0]
    n_images = inputs["pixel_values"].shape[0] // batch
    weights: list[torch.Tensor] = []
    text_cfg = lm.config
    for i, block in enumerate(lm.layers):
        if i == layer:
            row = weights[0][:, :, -1, img].mean(1).view(batch, n_images, -1)  # (B, images, tokens per image)
            per = row.shape[-1]
            offsets = torch.arange(n_images, device=ids.device)[None, :, None] * per
            chosen = img[(_top(row, keep) + offsets).view(batch, -1)]
            stay = torch.ones(batch, n, dtype=torch.bool, device=ids.device)
            stay[:, img] = False
            stay.scatter_(1, chosen, True)
            h = h[stay].view(batch, -1, h.shape[-1])
            pos = pos[stay].view(batch, -1)
            pe = lm.rotary_emb(h, position_ids=pos)
        if i == layer - 1 and not rerun:
            impl = text_cfg._attn_implementation
            hook = block.self_attn.register_forward_hook(lambda m, a, out: weights.append(out[1]))
            text_cfg._attn_implementation = "eager"
            try:
                h = block(h, attention_mask=causal, position_embeddings=pe, position_ids=pos)
            finally:
                text_cfg._attn_implementation = impl
                hook.remove()
        elif i == layer - 1:
            normed = block.input_layernorm(h)
            h = block(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
            impl = text_cfg._attn_implementation
            text_cfg._attn_implementation = "eager"
            try:
                weights.append(block.self_attn(normed, attention_mask=causal, position_embeddings=pe)[1])
            finally:
                text_cfg._attn_implementation = impl
        else:
            h = block(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
    logits = model.lm_head(lm.norm(h[:, -1:]))[:, -1]
    kept = []
    for b in range(batch):
        vis = (chosen[b] - img[0]).sort().values  # offsets into the visual span
        kept.append([vis[(vis >= i * per) & (vis < (i + 1) * per)] - i * per for i in range(n_images)])
    return logits, kept


@dataclass(frozen=True)
class Peer:
    """A reference-style implementation of a tokprune method: ``run(model, inputs, keep) -> (logits, kept)``."""

    method: str
    style: str
    describe: str
    run: Callable[[torch.nn.Module, dict[str, Any], int], tuple[torch.Tensor, Kept]]
    eager_vision: bool = False


def peers(model: torch.nn.Module, fastv_layer: int) -> list[Peer]:
    """The reference styles for ``model`` (its CLIP depth fixes the [CLS] layers, as tokprune's defaults do)."""
    from tokprune.pruners.cls_attention import DEFAULT_SPAN

    f = _feature_layer(model)
    span = list(range(max(0, f - DEFAULT_SPAN + 1), f + 1))
    return [
        Peer("cls", "FasterVLM: eager CLIP, output_attentions", f"[CLS] row of CLIP layer {f}",
             lambda m, x, k: cls_reference(m, x, k, [f]), True),
        Peer("vtc_cls", "VTC-CLS: eager CLIP, output_attentions", f"[CLS] rows of CLIP layers {span[0]}..{span[-1]}",
             lambda m, x, k: cls_reference(m, x, k, span), True),
        Peer("visionzip", "VisionZip: eager CLIP, output_attentions + raw keys",
             f"[CLS] row of CLIP layer {f}, merged contextual tokens", visionzip_reference, True),
        Peer("hiprune", "HiPrune: eager CLIP, output_attentions",
             f"received attention of CLIP layers {hiprune_object_layer(model)} and {f}",
             lambda m, x, k: clip_reference(m, x, k, hiprune_select), True),
        Peer("vispruner", "VisPruner: eager CLIP, output_attentions",
             f"[CLS] row of CLIP layer {f}, duplicates by feature cosine",
             lambda m, x, k: clip_reference(m, x, k, vispruner_select), True),
        Peer("fastv", "FastV: eager LLM layer K-1, output_attentions", f"cut before LLM layer {fastv_layer}",
             lambda m, x, k: fastv_reference(m, x, k, fastv_layer, rerun=False)),
        Peer("fastv", "LightCompress: re-run layer K-1's attention eagerly", f"cut before LLM layer {fastv_layer}",
             lambda m, x, k: fastv_reference(m, x, k, fastv_layer, rerun=True)),
    ]


# ------------------------------------------------------------------------------------------------ one case
def _kwargs(method: str, fastv_layer: int) -> dict[str, Any]:
    return {"layer": fastv_layer} if method == "fastv" else {}


def run_tokprune(model: torch.nn.Module, inputs: dict[str, Any], method: str, keep: int, fastv_layer: int
                 ) -> tuple[torch.Tensor, Kept]:
    """One tokprune prefill (patch applied before, removed after): last-token logits and the last stage's kept."""
    tokprune.apply(model, method=method, keep=keep, **_kwargs(method, fastv_layer))
    try:
        logits = model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
        return logits, tokprune.last_record(model).stages[-1].kept
    finally:
        tokprune.remove(model)


def eager_map_bytes(model: torch.nn.Module, inputs: dict[str, Any], peer: Peer) -> int:
    """Bytes of the largest eager attention map ``peer`` materialises (scores and their softmax: twice this at
    once): LLM layer K-1's (batch, heads, n, n) for the FastV styles, one CLIP layer's maps of all images else."""
    p = next(model.parameters())
    if peer.eager_vision:
        v = model.config.vision_config
        n = (v.image_size // v.patch_size) ** 2 + 1
        return inputs["pixel_values"].shape[0] * v.num_attention_heads * n * n * p.element_size()
    b, n = inputs["input_ids"].shape
    return b * model.config.text_config.num_attention_heads * n * n * p.element_size()


def _check_ram(model: torch.nn.Module, inputs: dict[str, Any], peer: Peer) -> None:
    """On CPU, refuse a reference case whose eager map (x2: scores + softmax) would not fit the available RAM, rather
    than let the kernel's OOM killer pick a process on a shared machine."""
    if next(model.parameters()).device.type != "cpu":
        return
    need = 2 * eager_map_bytes(model, inputs, peer)
    avail = _meminfo_kib("MemAvailable") * 1024
    if need > 0.8 * avail:
        b, n = inputs["input_ids"].shape
        raise MemoryError(f"peers: {peer.style} at batch {b}, {n} tokens needs ~{need / 2**30:.1f} GiB for its eager "
                          f"attention maps, {avail / 2**30:.1f} GiB available: leave this setting out (--skip "
                          "llava-next:8) or run it on a larger machine")


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/meminfo has no {key}")


@contextmanager
def _eager_vision(model: torch.nn.Module, on: bool = True) -> Iterator[None]:
    """The vision tower in eager attention inside the block (``on``), its own implementation again after."""
    vt = model.model.vision_tower
    impl = vt.config._attn_implementation
    if on:
        vt.set_attn_implementation("eager")
    try:
        yield
    finally:
        if on:
            vt.set_attn_implementation(impl)


def run_peer(model: torch.nn.Module, inputs: dict[str, Any], peer: Peer, keep: int) -> tuple[torch.Tensor, Kept]:
    """One reference-style prefill; the vision tower runs eager while it needs ``output_attentions``."""
    _check_ram(model, inputs, peer)
    with _eager_vision(model, peer.eager_vision):
        return peer.run(model, inputs, keep)


def _compare(ours: tuple[torch.Tensor, Kept], ref: tuple[torch.Tensor, Kept]) -> tuple[bool, float]:
    """(every image's kept set equal, max abs difference of the last-token logits)."""
    (a_logits, a_kept), (b_logits, b_kept) = ours, ref
    same = all(torch.equal(a.cpu(), b.cpu()) for ra, rb in zip(a_kept, b_kept) for a, b in zip(ra, rb))
    same = same and [len(r) for r in a_kept] == [len(r) for r in b_kept]
    return bool(same), (a_logits.float() - b_logits.float()).abs().max().item()


def _same_features(check: dict[str, Any]) -> str:
    """The markdown clause of a check that needed the same-features run (:func:`check_equal`)."""
    sf = check.get("same_features")
    if sf is None:
        return ""
    return (f" (SDPA vs eager rounding; with tokprune's encoder also eager: kept sets "
            f"{'equal' if sf['kept_equal'] else 'DIFFER'}, max |logit diff| {sf['max_logit_diff']:.1e})")


def check_equal(model: torch.nn.Module, inputs: dict[str, Any], peer: Peer, keep: int, fastv_layer: int,
                atol: float = 1e-4) -> dict[str, Any]:
    """Same kept sets and last-token logits within ``atol`` (max abs difference) for tokprune and ``peer``.

    tokprune runs as it is timed (SDPA). Where that differs from an eager-CLIP reference, the check runs tokprune
    once more with the vision tower in eager attention, so that both see the same encoder arithmetic; then
    ``same_features`` holds that result and ``ok`` is judged on it. Why: VisPruner's duplicate removal ranks
    near-equal cosines (random-weight CLIP features are close to one another), so SDPA's and eager attention's
    float rounding alone can reorder a round and change the diverse set of an image (seen on 1 of 10 images at
    2880 tokens). Run on the same features, the two rules must keep the same tokens exactly."""
    ref = run_peer(model, inputs, peer, keep)
    same, diff = _compare(run_tokprune(model, inputs, peer.method, keep, fastv_layer), ref)
    out: dict[str, Any] = {"kept_equal": same, "max_logit_diff": diff, "ok": bool(same and diff <= atol)}
    if out["ok"] or not peer.eager_vision:
        return out
    with _eager_vision(model):
        same, diff = _compare(run_tokprune(model, inputs, peer.method, keep, fastv_layer), ref)
    out["same_features"] = {"kept_equal": same, "max_logit_diff": diff}
    out["ok"] = bool(same and diff <= atol)
    return out


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class Setup:
    config: str
    llm_layers: int | None
    vision_layers: int | None
    fastv_layer: int
    keep: int
    dtype: str
    device: str


def build(setup: Setup) -> tuple[torch.nn.Module, Any]:
    full = configs.load(setup.config)
    cfg, depth = reduce_depth(full, setup.llm_layers, setup.vision_layers)
    torch.manual_seed(0)
    return configs.build_model(cfg, setup.device, getattr(torch, setup.dtype)), depth


def inputs_for(model: torch.nn.Module, scale: str, batch: int, n_text: int) -> dict[str, Any]:
    p = next(model.parameters())
    return configs.example_inputs(model.config, n_text=n_text, n_images=SCALES[scale], batch=batch,
                                  device=p.device, dtype=p.dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case_names(model: torch.nn.Module, fastv_layer: int) -> list[tuple[str, Peer | None, str]]:
    """(label, peer or None for tokprune, method) for every case of one setting, tokprune next to its peers."""
    out: list[tuple[str, Peer | None, str]] = []
    for p in peers(model, fastv_layer):
        if not any(o[2] == p.method and o[1] is None for o in out):
            out.append((f"tokprune {p.method}", None, p.method))
        out.append((p.style, p, p.method))
    return out


def run_case(model: torch.nn.Module, inputs: dict[str, Any], case: tuple[str, Peer | None, str], setup: Setup
             ) -> None:
    label, peer, method = case
    if peer is None:
        run_tokprune(model, inputs, method, setup.keep, setup.fastv_layer)
    else:
        run_peer(model, inputs, peer, setup.keep)


def peak_memory(setup: Setup, scale: str, batch: int, n_text: int, label: str) -> float:
    """Peak memory (MiB) of one run of case ``label`` above the built model, in this (fresh) process."""
    model, _ = build(setup)
    inputs = inputs_for(model, scale, batch, n_text)
    case = next(c for c in _case_names(model, setup.fastv_layer) if c[0] == label)
    dev = next(model.parameters()).device
    with torch.inference_mode():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            run_case(model, inputs, case, setup)
            torch.cuda.synchronize(dev)
            return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        base = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        run_case(model, inputs, case, setup)
        return (_status_kib("VmHWM") - base) / 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _fresh_peak(args: argparse.Namespace, scale: str, batch: int, label: str) -> float | None:
    cmd = [sys.executable, __file__, "--memory-case", scale, str(batch), label, *_setup_argv(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(
        __file__).resolve().parents[1])})
    if done.returncode:
        print(f"[peers] memory of {label} at {scale} b{batch} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(done.stdout.strip().splitlines()[-1])


def _setup_argv(args: argparse.Namespace) -> list[str]:
    if args.quick:
        return ["--quick", "--device", args.device, "--dtype", args.dtype]
    out = ["--config", args.config, "--fastv-layer", str(args.fastv_layer), "--keep", str(args.keep),
           "--n-text", str(args.n_text), "--device", args.device, "--dtype", args.dtype]
    if args.llm_layers:
        out += ["--llm-layers", str(args.llm_layers)]
    if args.vision_layers:
        out += ["--vision-layers", str(args.vision_layers)]
    return out


def _settings(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(scale, batch) pairs to run, ``--skip`` left out."""
    settings = [(s, b) for s in args.scales.split(",") for b in [int(x) for x in args.batches.split(",")]]
    return [x for x in settings if f"{x[0]}:{x[1]}" not in (args.skip or "").split(",")]


def _memory_rows(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Peak memory of every row's case, one fresh process each (``--memory-settings`` narrows the settings).
    ``--memory-jobs`` > 1 runs that many processes at once: each measures only its own peak (RSS or
    ``max_memory_allocated`` of its own process), so they do not disturb each other's figure."""
    wanted = (args.memory_settings or "").split(",")
    todo = [r for r in rows if not args.memory_settings or f"{r['scale']}:{r['batch']}" in wanted]

    def one(row: dict[str, Any]) -> None:
        t = time.perf_counter()
        row["peak_mib"] = _fresh_peak(args, row["scale"], row["batch"], row["case"])
        print(f"[peers] memory {row['scale']} b{row['batch']} {row['case']}: {row['peak_mib']} "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.memory_jobs)) as pool:
        list(pool.map(one, todo))


def measure(args: argparse.Namespace, write: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    setup = Setup(args.config, args.llm_layers, args.vision_layers, args.fastv_layer, args.keep, args.dtype,
                  args.device)
    t0 = time.perf_counter()
    model, depth = build(setup)
    dev = next(model.parameters()).device
    cases = _case_names(model, setup.fastv_layer)
    settings = _settings(args)
    results: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    if args.memory_only:  # no timing, no checks: one fresh process per case and setting (load-insensitive)
        del model
        results = [{"scale": scale, "batch": batch, "visual_tokens": 576 * SCALES[scale], "method": method,
                    "case": label, "reference": peer is not None}
                   for scale, batch in settings for label, peer, method in cases
                   if not args.memory_settings or f"{scale}:{batch}" in args.memory_settings.split(",")]
        _memory_rows(args, results)
        return assemble(args, depth, dev, checks, results, t0)
    with torch.inference_mode():
        # equality first, in float32 (1e-4 is a float32 tolerance), batch 2 of the first scale, different images
        checker = model if setup.dtype == "float32" else build(replace(setup, dtype="float32"))[0]
        x = inputs_for(checker, settings[0][0], 2, args.n_text)
        for label, peer, _ in cases:
            if peer is not None:
                t = time.perf_counter()
                checks[label] = check_equal(checker, x, peer, setup.keep, setup.fastv_layer)
                print(f"[peers] check {label}: {checks[label]} ({time.perf_counter() - t:.0f} s)", file=sys.stderr,
                      flush=True)
        del checker
        for scale, batch in settings:
            x = inputs_for(model, scale, batch, args.n_text)
            times: dict[str, list[float]] = {c[0]: [] for c in cases}
            for r in range(args.rounds):
                for case in cases:
                    _sync(dev)
                    t = time.perf_counter()
                    run_case(model, x, case, setup)
                    _sync(dev)
                    times[case[0]].append((time.perf_counter() - t) * 1e3)
                print(f"[peers] {scale} b{batch} round {r + 1}/{args.rounds} ({time.perf_counter() - t0:.0f} s in): "
                      + ", ".join(f"{k} {v[-1]:.0f}" for k, v in times.items()), file=sys.stderr, flush=True)
            for label, peer, method in cases:
                ms = statistics.median(times[label][1:] if args.rounds > 2 else times[label])
                results.append({"scale": scale, "batch": batch, "visual_tokens": 576 * SCALES[scale],
                                "method": method, "case": label, "reference": peer is not None,
                                "median_ms": ms, "runs_ms": [round(t, 1) for t in times[label]]})
            if write is not None:  # a partial table after every setting: a stopped run keeps what it measured
                write(assemble(args, depth, dev, checks, results, t0))
    del model
    if not args.no_memory:
        _memory_rows(args, results)
    return assemble(args, depth, dev, checks, results, t0)


def estimate(args: argparse.Namespace) -> dict[str, float]:
    """Predicted wall seconds of this command's timing run and of its ``--memory-only`` run, from one warm run of
    every case at llava-1.5 batch 1 on this machine, scaled by batch x images (the proxy's cost is near linear in
    the tokens; attention's quadratic part makes llava-next somewhat dearer: an estimate, not a measurement)."""
    setup = Setup(args.config, args.llm_layers, args.vision_layers, args.fastv_layer, args.keep, args.dtype,
                  args.device)
    t = time.perf_counter()
    model, _ = build(setup)
    t_build = time.perf_counter() - t
    dev = next(model.parameters()).device
    cases = _case_names(model, setup.fastv_layer)
    x = inputs_for(model, "llava-1.5", 1, args.n_text)
    unit: dict[str, float] = {}
    with torch.inference_mode():
        for case in cases:
            run_case(model, x, case, setup)  # warm
            _sync(dev)
            t = time.perf_counter()
            run_case(model, x, case, setup)
            _sync(dev)
            unit[case[0]] = time.perf_counter() - t
    per_round = sum(unit.values())
    weights = [batch * SCALES[scale] for scale, batch in _settings(args)]
    checks = 2 * 2 * sum(unit[c[0]] for c in cases if c[1] is not None)  # batch 2, tokprune + reference
    timing = t_build + checks + args.rounds * per_round * sum(weights)
    start = 6.0  # a fresh process: interpreter, torch and transformers imports
    memory = sum(len(cases) * (start + t_build) + per_round * w for w in weights) / max(1, args.memory_jobs)
    out = {"build_s": t_build, "per_case_b1_s": unit, "timing_s": timing, "memory_only_s": memory}
    print(f"[peers] estimate on this machine: build {t_build:.0f} s; one llava-1.5 b1 round of {len(cases)} cases "
          f"{per_round:.1f} s; the timing run ({args.rounds} rounds, settings "
          f"{', '.join(f'{s}:{b}' for s, b in _settings(args))}) ~{timing / 60:.1f} min; --memory-only over the "
          f"same settings ~{memory / 60:.1f} min (estimates: batch x images scaling of the b1 round)", flush=True)
    return out


def assemble(args: argparse.Namespace, depth: Any, dev: torch.device, checks: dict[str, Any],
             results: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """The saved table: rows with their ratios against tokprune's row of the same method and setting, and meta."""
    from tokprune.eval.speed import cpu_model

    for row in results:
        ours = next(r for r in results if r["method"] == row["method"] and r["scale"] == row["scale"]
                    and r["batch"] == row["batch"] and not r["reference"])
        if "median_ms" in row:
            row["time_ratio"] = row["median_ms"] / ours["median_ms"]
        if row.get("peak_mib") is not None and ours.get("peak_mib") is not None:
            row["memory_ratio"] = row["peak_mib"] / ours["peak_mib"] if ours["peak_mib"] > 0 else None
            row["memory_extra_mib"] = row["peak_mib"] - ours["peak_mib"]
    device = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
              else f"CPU {cpu_model()}, {torch.get_num_threads()} threads")
    meta = {"model": args.config, "depth": depth.as_dict(), "device": device, "dtype": args.dtype,
            "keep_per_image": args.keep, "fastv_layer": args.fastv_layer, "n_text": args.n_text,
            "rounds": 0 if args.memory_only else args.rounds, "memory_only": bool(args.memory_only),
            "median_of": "rounds 2.." if args.rounds > 2 else "all rounds",
            "timed": "round-robin, one run of every case per round", "loaded": args.loaded,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s": round(time.perf_counter() - t0, 1), "checks": checks,
            "peaks": "fresh process per case: peak RSS above the built model's (CPU) or max_memory_allocated "
                     "above the weights (CUDA)"}
    return {"meta": meta, "rows": results}


VISIONZIP_NOTE = ("VisionZip's output is not a subset of the patches ([CLS] + dominant patches + merged contextual "
                  "tokens): its kept set is the slots tokprune's record gives those tokens (the dominant patches, "
                  "the contextual targets, the lowest free patch for [CLS]); the merged tokens are checked through "
                  "the logits")


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, fmt) + suffix


def to_markdown(data: dict[str, Any]) -> str:
    m = data["meta"]
    loaded = " (shared, loaded by other jobs while this ran)" if m["loaded"] else ""
    if m.get("memory_only"):
        lines = [f"## peak memory, tokprune vs reference-style implementations: {m['model']}", "",
                 f"device: **{m['device']}**{loaded} · dtype {m['dtype']} · {m['depth']['label']} · keep "
                 f"{m['keep_per_image']} per 576-token image · FastV cut before LLM layer {m['fastv_layer']} · "
                 f"{m['n_text']} text tokens · random weights · torch {m['torch']} · {m['date']}", "",
                 f"Peak memory: {m['peaks']}. memory ratio = reference style / tokprune, same setting (> 1: tokprune "
                 "is smaller). The equality checks run with the timings (peers.md).", "",
                 "| scale | batch | method | implementation | peak MiB | memory ratio |", "|---|---|---|---|---|---|"]
        for r in data["rows"]:
            lines.append(f"| {r['scale']} ({r['visual_tokens']} visual) | {r['batch']} | {r['method']} | "
                         f"{r['case']} | {_num(r.get('peak_mib'), '.0f')} | "
                         f"{_num(r.get('memory_ratio'), '.2f', 'x')} |")
        return "\n".join(lines) + "\n"
    lines = [f"## tokprune vs reference-style implementations: {m['model']}", "",
             f"device: **{m['device']}**{loaded} · "
             f"dtype {m['dtype']} · {m['depth']['label']} · keep {m['keep_per_image']} per 576-token image · FastV "
             f"cut before LLM layer {m['fastv_layer']} · {m['n_text']} text tokens · {m['timed']}, medians of "
             f"{m['median_of']} of {m['rounds']} · random weights · torch {m['torch']} · {m['date']}", "",
             "Equality (float32, batch 2, different images): " + "; ".join(
                 f"{k}: kept sets {'equal' if v['kept_equal'] else 'DIFFER'}, max |logit diff| "
                 f"{v['max_logit_diff']:.1e}" + _same_features(v) for k, v in m["checks"].items()), "",
             f"{VISIONZIP_NOTE}.", "",
             f"time / memory ratio = reference style / tokprune, same setting (> 1: tokprune is faster / smaller). "
             f"Peak memory: {m['peaks']}.", "",
             "| scale | batch | method | implementation | prefill ms | time ratio | peak MiB | memory ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['scale']} ({r['visual_tokens']} visual) | {r['batch']} | {r['method']} | {r['case']} "
                     f"| {r['median_ms']:.0f} | {r['time_ratio']:.2f}x | {_num(r.get('peak_mib'), '.0f')} | "
                     f"{_num(r.get('memory_ratio'), '.2f', 'x')} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llava-1.5-7b")
    p.add_argument("--llm-layers", type=int, default=2)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--fastv-layer", type=int, default=1, help="FastV's K (default 1: the proxy has 2 LLM layers)")
    p.add_argument("--keep", type=int, default=64, help="visual tokens kept per 576-token image")
    p.add_argument("--n-text", type=int, default=95)
    p.add_argument("--scales", default="llava-1.5,llava-next")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--skip", help="settings left out, e.g. llava-next:8 (comma-separated)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    p.add_argument("--memory-only", action="store_true",
                   help="only the fresh-process peak memory of every case and setting (no timing, no checks; "
                        "load-insensitive: may run beside other jobs); writes <tag>-memory.{json,md} by default")
    p.add_argument("--memory-jobs", type=int, default=1,
                   help="fresh memory processes run at once (each measures only its own peak; GPU: 4-8)")
    p.add_argument("--estimate", action="store_true",
                   help="print the expected minutes of this timing run and of --memory-only, from one warm "
                        "llava-1.5 batch-1 round, and exit")
    p.add_argument("--memory-settings", help="measure memory only in these settings, e.g. llava-1.5:4,llava-next:1")
    p.add_argument("--loaded", action="store_true", help="say in the table that the machine was shared and loaded")
    p.add_argument("--quick", action="store_true", help="tiny-llava, batch 1 and 2, 2 rounds: checks the script")
    p.add_argument("--tag", default="peers")
    p.add_argument("--out")
    p.add_argument("--memory-case", nargs=3, metavar=("SCALE", "BATCH", "CASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.quick:
        args.config, args.llm_layers, args.vision_layers, args.keep = "tiny-llava", None, None, 4
        args.n_text, args.batches, args.rounds, args.fastv_layer = 10, "1,2", 2, 2
        args.skip = "llava-next:2"
    if args.memory_only and args.no_memory:
        p.error("--memory-only and --no-memory exclude each other")
    if args.memory_only and args.tag == "peers":
        args.tag = "peers-memory"
    if not args.memory_case and not args.estimate and not args.out:
        p.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.memory_case:
        scale, batch, label = args.memory_case
        setup = Setup(args.config, args.llm_layers, args.vision_layers, args.fastv_layer, args.keep, args.dtype,
                      args.device)
        print(peak_memory(setup, scale, int(batch), args.n_text, label))
        return 0
    if args.estimate:
        estimate(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(data: dict[str, Any]) -> None:
        (out / f"{args.tag}.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        (out / f"{args.tag}.md").write_text(to_markdown(data), encoding="utf-8")

    data = measure(args, write)
    write(data)
    print(to_markdown(data))
    if args.memory_only:
        return 0 if all(r.get("peak_mib") is not None for r in data["rows"]) else 1
    return 0 if all(c["ok"] for c in data["meta"]["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
