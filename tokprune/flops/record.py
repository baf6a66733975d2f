"""Record conversion: the token schedules of a pruning record (what one prefill really kept), and its FLOPs
against the same prompt unpruned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from tokprune.flops.arch import Architecture, TokenSchedule, VisionWork, config_of, describe, image_work
from tokprune.flops.count import FlopsReport, estimate


def from_record(config: Any, record: Any, n_text: int | Sequence[int] | None = None, *,
                image_sizes: Sequence[Sequence[tuple[int, int]]] | None = None,
                image_grid_thw: Sequence[Sequence[tuple[int, int, int]]] | None = None) -> list[TokenSchedule]:
    """One :class:`TokenSchedule` per sample of a pruning record (``tokprune.record.PruneRecord``).

    Stages apply in order: kind ``"vision"`` shrinks every LLM layer (and, when ``stage.layer`` is a ViT layer,
    the ViT from that layer on); ``record.encoder_cuts`` (tokens dropped between encoder layers) shrink the ViT
    layers after each cut; ``record.encoder_reads`` (layers whose received attention a tap recomputed) become each
    image's ``VisionWork.reads``; kind ``"llm"`` shrinks LLM layers ``stage.layer`` and later. New (merged) tokens
    take dropped slots of their image (``record.merged[b][i].slots``), which are part of the stage's kept indices,
    so a stage's kept count is its LLM token count. ``n_text`` defaults to
    ``record.seq_len[b]`` minus the sample's visual tokens. Per-image sizes (LLaVA-NeXT: (H, W); Qwen: grid t,h,w)
    come from the arguments or from ``record.image_sizes`` / ``record.image_grid_thw`` when present; without them
    LLaVA-NeXT's vision part is left out and Qwen2.5-VL windows assume a near-square grid (see ``notes``).
    """
    config = config_of(config)
    arch = describe(config)
    image_sizes = image_sizes if image_sizes is not None else getattr(record, "image_sizes", None)
    image_grid_thw = image_grid_thw if image_grid_thw is not None else getattr(record, "image_grid_thw", None)
    cuts = getattr(record, "encoder_cuts", None) or []
    reads = tuple(getattr(record, "encoder_reads", None) or ())
    first = 0  # index of sample b's first image among the encoder's sequences (images in batch order)
    out = []
    for b, n_vis in enumerate(record.n_visual):
        n_vis = [int(n) for n in n_vis]
        if n_text is None:
            text = int(record.seq_len[b]) - sum(n_vis)
        else:
            text = int(n_text) if isinstance(n_text, int) else int(n_text[b])
        visual = [sum(n_vis)] * arch.llm.layers
        probes = []
        works, notes = _record_images(config, arch, b, n_vis, image_sizes, image_grid_thw)
        if cuts and works:
            works = [_encoder_cut(w, cuts, first + i) for i, w in enumerate(works)]
        if reads and works:
            works = [replace(w, reads=reads) for w in works]
        first += len(n_vis)
        for st in record.stages:
            counts = [int(k.numel()) for k in st.kept[b]]
            if st.kind == "vision":
                start = 0
                if st.layer is not None and works:
                    works = [w.cut(st.layer, c) for w, c in zip(works, counts)]
            elif st.kind == "llm":
                start = int(st.layer)
                rows = getattr(st, "probe_rows", None)
                if rows is not None:  # the probe ran on the tokens entering the stage, before its cut
                    probes.append((start, visual[start] + text, int(rows[b])))
            else:
                raise ValueError(f"unknown stage kind {st.kind!r}")
            total = sum(counts)
            visual[start:] = [total] * (len(visual) - start)
        out.append(TokenSchedule(tuple(visual), text, tuple(works), tuple(notes), tuple(probes)))
    return out


def _encoder_cut(work: VisionWork, cuts: Sequence[tuple[int, Sequence[Any]]], seq: int) -> VisionWork:
    """``work`` when encoder sequence ``seq`` kept ``len(kept[seq])`` tokens after each cut layer (FlowCut-style
    dropping inside the encoder, ``record.encoder_cuts``): every later ViT layer and the projector/merger run on
    the survivors (the seam writes the projector's output back into the full layout afterwards)."""
    tokens = list(work.layer_tokens)
    for layer, kept in cuts:
        tokens[int(layer) + 1:] = [int(kept[seq].numel())] * (len(tokens) - int(layer) - 1)
    last = int(cuts[-1][1][seq].numel()) - work.cls  # the [CLS] token (kept at 0) does not enter the projector
    return replace(work, layer_tokens=tuple(tokens), projector_tokens=min(work.projector_tokens, last))


def geometry_from_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The per-sample image geometry :func:`from_record` needs, read from a forward's inputs: ``image_sizes``
    (LLaVA-NeXT) and ``image_grid_thw`` (Qwen), split by sample (images are assumed evenly spread over the batch)."""
    batch = len(inputs["input_ids"])
    out: dict[str, Any] = {}
    for key in ("image_sizes", "image_grid_thw"):
        value = inputs.get(key)
        if value is not None:
            rows = [tuple(int(v) for v in r) for r in (value.tolist() if hasattr(value, "tolist") else value)]
            per = len(rows) // batch
            out[key] = [rows[b * per:(b + 1) * per] for b in range(batch)]
    return out


def record_report(config: Any, record: Any, convention: str = "full", *, logits_to_keep: int = 0,
                  **geometry: Any) -> FlopsReport:
    """FLOPs of the prefill a pruning record describes (batch summed), with the same prompt unpruned as
    ``.baseline``: what ``tokprune.last_record(model).flops`` reports. ``geometry``: ``n_text``, ``image_sizes``,
    ``image_grid_thw`` as for :func:`from_record`."""
    unpruned = SimpleNamespace(n_visual=record.n_visual, seq_len=record.seq_len, stages=[], merged=None,
                               image_sizes=getattr(record, "image_sizes", None),
                               image_grid_thw=getattr(record, "image_grid_thw", None))
    kw = dict(logits_to_keep=logits_to_keep)
    report = estimate(config, from_record(config, record, **geometry), convention, **kw)
    return replace(report, baseline=estimate(config, from_record(config, unpruned, **geometry), convention, **kw))


def _record_images(config: Any, arch: Architecture, b: int, n_vis: list[int], image_sizes: Any,
                   grids: Any) -> tuple[list[VisionWork], list[str]]:
    """Unpruned vision work of sample ``b``'s images, from whatever size information is at hand."""
    if arch.vision is None:
        return [], []
    if arch.family == "llava":
        return [image_work(config) for _ in n_vis], []
    if arch.family in ("llava_next", "llava_onevision"):
        if image_sizes is None:
            return [], ["vision part not counted: LLaVA-NeXT image sizes unknown (pass image_sizes)"]
        works = [image_work(config, image_size=tuple(int(x) for x in s)) for s in image_sizes[b]]
        if arch.family == "llava_onevision":  # an image of a multi-image sample is its base tile + one newline
            works = [replace(w, projector_tokens=w.patches, llm_tokens=n, sequences=1, newlines=1)
                     if n == w.patches + 1 != w.llm_tokens else w for w, n in zip(works, n_vis)]
        return works, []
    if grids is not None:
        return [image_work(config, grid_thw=tuple(int(x) for x in g)) for g in grids[b]], []
    notes = ["Qwen2.5-VL grid unknown: window attention assumes a near-square grid"] if arch.vision.windowed else []
    return [image_work(config, llm_tokens=n) for n in n_vis], notes


