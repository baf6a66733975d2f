"""The family-neutral orchestrator: what happens at each forward of a patched model, for any family.

An :class:`~tokprune.patches.base.Adapter` is the family plug-in (where the encoder and its layers are, how its
values become per-token ones, the token layout, positions, extra per-token inputs); this module drives it through
those named hooks and never names a family. Per forward of the top-level ``*ForConditionalGeneration``:

* **prefill** (a prompt with visual items and no cache yet): :meth:`Orchestrator.layout` reads the prompt's
  :class:`VisualLayout` (each visual item's features, span, grid, special tokens, owner and modality), a
  :class:`PrefillState` is created for this prefill alone, the vision stage runs (signals, the selection core of
  :mod:`tokprune.selection`, the sequence rewrite re-packed to the longest pruned row), and the LLM stages get
  their own run;
* **decode** (a cache with tokens in it): the prefill's state is found again by the cache object the step passes
  (so two requests interleaved on one model never share state), the 2D mask is rebuilt for the pruned prompt and
  "compact" positions shifted;
* a text-only forward gets no state.

**Expanded rows** (beam search, ``num_return_sequences > 1``): ``generate`` runs the encoder once per image, then
repeats the encoder's output tensors (the same objects) and the prompt rows ``expand_size`` times. The layout maps
every item to the encoded image it is (:func:`encoder_sources`, by identity), so the vision signals are computed
once per encoded image and handed to each copy; every copy is then selected like its source row run alone (the
selection is per row, so per-row method state such as VFlowOpt's importance exists for every beam).

Video items are recognised (a family reports them through ``visual_modalities``) and refused with a clear error
until video pruning has its own issue; nothing else here assumes images.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokprune.patches.compat import get_cache
from tokprune.patches.relayout import Resized, resize_runs
from tokprune.patches.sequence import image_spans, left_repad, mask_to_2d, padded_right, repack, take
from tokprune.pruners.base import VISION_COMPACT, PrefillContext
from tokprune.record import Merged, PruneRecord, Stage
from tokprune.selection import Budgets, Placement

if TYPE_CHECKING:
    from tokprune.patches.base import Adapter

#: the modalities a visual item may have; only images are pruned so far
MODALITIES = ("image", "video")


@dataclass
class DecodeState:
    """What decode steps need to stay consistent with a pruned prefill."""

    n_full: int  # prompt length generate() believes in
    n_pruned: int  # prompt length the cache holds (layer 0)
    mask: torch.Tensor  # (B, n_pruned) 2D mask of the pruned prompt
    offset: torch.Tensor | None  # (B,) position shift of a re-indexed pre-LLM stage ("compact", "compact_pre_llm")
    mask_all: bool | None = None  # whether ``mask`` is all ones, read once (a host sync) at the first decode step

    def all_ones(self) -> bool:
        """Whether the pruned prompt's mask is all ones; read on the host once per prefill, not at every step."""
        if self.mask_all is None:
            self.mask_all = bool(self.mask.all())  # sync: once per generate (first decode step), cached
        return self.mask_all


@dataclass
class PrefillState:
    """Everything one prefill learns, created at that prefill and handed down: its record, the method's context,
    what decode steps need and the LLM stages' run. Found again by the KV cache a decode step passes, so two
    prefills of one model (two requests interleaved by a serving loop) never share state."""

    record: PruneRecord
    ctx: PrefillContext
    decode: DecodeState | None = None
    llm: Any = None  # the LLMRun of this prefill, when the method has LLM stages
    #: what a family keeps for this prefill's decode steps (Qwen: ``rope_deltas``), read by ``Adapter.decode_inputs``
    family: dict = field(default_factory=dict)


@dataclass
class VisualLayout:
    """The visual items of one prompt, read once per prefill through the family hooks. Items are numbered
    row-major (``rows[b]``: the global indices of row ``b``'s items, in prompt order)."""

    ids: torch.Tensor  # (B, N) input ids
    mask2d: torch.Tensor | None  # (B, N) or None
    positions: torch.Tensor  # position ids the unpatched model would use
    encoded: Any  # the encoder outputs (``pooler_output``: one (n_i, D) tensor per item)
    features: list[torch.Tensor]
    spans: list[list[torch.Tensor]]  # per row, per item: its token positions in the prompt
    rows: list[list[int]]
    grid: list[torch.Tensor] | None
    special: list[torch.Tensor]
    modality: list[str] = field(default_factory=list)
    #: per item, the index of the encoded image it is a copy of (:func:`encoder_sources`); None when every item is
    #: its own encoded image (no expansion)
    source: list[int] | None = None
    #: where the family re-laid items out with other token counts than the processor's placeholders
    #: (``adapter.relayout``): per row, the tokens the prompt gained (negative: lost), and its width before
    added: torch.Tensor | None = None
    n_prompt: int | None = None

    @property
    def counts(self) -> list[int]:
        return [int(f.shape[0]) for f in self.features]

    @property
    def owners(self) -> list[tuple[int, int]]:
        """Per item, (row, index within the row)."""
        return [(bi, i) for bi, row in enumerate(self.rows) for i in range(len(row))]

    def per_row(self, values: list[Any]) -> list[list[Any]]:
        """A per-item list regrouped per row."""
        return [[values[j] for j in row] for row in self.rows]


def encoder_sources(features: list[torch.Tensor]) -> list[int] | None:
    """Per visual item, the index of the encoded image it is (in the encoder's order), or None when every item is
    a different tensor. ``generate`` encodes each image once and, for beam search / ``num_return_sequences``,
    repeats the *same* output tensors per expanded row (``_expand_multimodal_outputs``: ``[A, B] -> [A, B, A, B]``
    per row); copies are recognised by identity, never by position or value. First occurrences keep the encoder's
    order, since each row's first copy comes before its repeats."""
    first: dict[int, int] = {}
    source = [first.setdefault(id(f), len(first)) for f in features]
    return None if len(first) == len(features) else source


def distinct(values: list[Any], source: list[int] | None) -> list[Any]:
    """The first item of each encoded image (``values`` itself when there is no expansion)."""
    if source is None:
        return values
    out: dict[int, Any] = {}
    for v, s in zip(values, source):
        out.setdefault(s, v)
    return [out[s] for s in range(len(out))]


def expand(per_image: list[Any], source: list[int] | None) -> list[Any]:
    """Per-encoded-image values handed to every item that is a copy of that image."""
    return per_image if source is None else [per_image[s] for s in source]


@dataclass
class VisionResult:
    """What the vision stage changed: the rewritten forward kwargs, the items' new spans and kept indices."""

    kwargs: dict
    spans: list[list[torch.Tensor]]
    origin: list[list[torch.Tensor]]
    mask: torch.Tensor | None


class Orchestrator:
    """Drives one patched model's forwards through its adapter's family hooks (see the module doc)."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.states: weakref.WeakKeyDictionary[Any, PrefillState] = weakref.WeakKeyDictionary()  # cache -> state
        self.local = threading.local()  # .state: the PrefillState of the forward in progress in this thread
        self.warned_embeds = False  # the inputs_embeds warning is given once per patch

    def current(self) -> PrefillState | None:
        return getattr(self.local, "state", None)

    def reset(self) -> None:
        self.states = weakref.WeakKeyDictionary()
        self.local = threading.local()

    # ------------------------------------------------------------------ hooks on the top-level model
    def pre_forward(self, module: nn.Module, args: tuple, kw: dict) -> tuple[tuple, dict]:
        if args:
            kw = {**kw, "input_ids": args[0]}
            args = ()
        self.local.state = None
        pkv = get_cache(kw)
        past = pkv.get_seq_length() if pkv is not None else 0
        if kw.get("input_ids") is None and past == 0 and kw.get("inputs_embeds") is not None:
            return args, self.unpruned_embeds(kw)
        if self._is_prefill(kw, past):
            return (), self.prefill(kw, pkv)
        if past > 0:
            return (), self.decode(kw, pkv, past)
        self.adapter.record = None  # a text-only prompt: last_record() must not report an earlier image prompt
        return args, kw

    def _is_prefill(self, kw: dict, past: int) -> bool:
        """Whether this forward is a prefill of a prompt with visual items (raising for inputs not supported)."""
        a = self.adapter
        modalities = a.visual_modalities(kw)
        if "video" in modalities:
            raise NotImplementedError(
                f"tokprune does not prune video inputs of {type(a.model).__name__} yet; call tokprune.remove(model) "
                "for video prompts"
            )
        ids = kw.get("input_ids")
        if ids is None and modalities:
            raise ValueError("tokprune locates images by their token ids: pass input_ids, not inputs_embeds")
        # the id check is evaluated last, so decode steps (cache, no pixels) never run it
        # sync: once per prefill, to know whether the prompt has images
        if ids is None or not (past == 0 or modalities) or not bool((ids == a.image_token_id).any()):
            return False
        if not modalities:
            raise ValueError(
                "input_ids hold image tokens but no pixel_values were passed, so there is no image to encode "
                "or prune; pass the processor's pixel_values (with image_sizes / image_grid_thw) together "
                "with input_ids, or remove the image tokens from the prompt"
            )
        if past > 0:
            raise NotImplementedError("a new image in a continued (cached) conversation is not supported yet; "
                                      "start generation from the full prompt")
        return True

    def unpruned_embeds(self, kw: dict) -> dict:
        """A prefill from ``inputs_embeds`` alone (features merged by hand): tokprune cannot tell which rows are
        image tokens, so nothing is pruned; warn once per patch and leave a record whose ``notes`` say why."""
        a = self.adapter
        why = ("inputs_embeds without input_ids / pixel_values: tokprune cannot locate the image tokens, so "
               f"{a.pruner.name} pruned nothing in this prefill; pass input_ids and pixel_values (the "
               "processor's outputs) to prune")
        if not self.warned_embeds:
            warnings.warn(why, stacklevel=5)
            self.warned_embeds = True
        embeds, mask = kw["inputs_embeds"], kw.get("attention_mask")
        # sync: once per such prefill, the host-side prompt lengths of the record
        lengths = mask.sum(-1).tolist() if mask is not None and mask.dim() == 2 else [embeds.shape[1]] * len(embeds)
        record = PruneRecord(method=a.pruner.name, n_visual=[[] for _ in lengths], seq_len=[int(n) for n in lengths])
        record.notes.append(why)
        a.record = record
        return kw

    def post_forward(self, module: nn.Module, args: tuple, out: Any) -> None:
        """Bind a prefill that ran without a cache passed in to the cache the model returned (its decode steps
        pass that one), and end the forward's state."""
        state, self.local.state = self.current(), None
        if state is None or out is None or not hasattr(out, "get"):
            return
        cache = out.get("past_key_values", None)
        cache = cache if cache is not None else out.get("cache", None)
        if cache is not None and cache not in self.states:
            self.states[cache] = state

    # ------------------------------------------------------------------ prefill
    def prefill(self, kw: dict, cache: Any) -> dict:
        """One prefill: a new :class:`PrefillState`, the layout, the vision stage, the LLM stages' run."""
        a = self.adapter
        ctx = PrefillContext(a.info, a.vision_request, a.positions)
        state = self.local.state = PrefillState(PruneRecord(a.pruner.name, [], []), ctx)
        if cache is not None:
            self.states[cache] = state
        layout = self.layout(kw)
        self.fill_record(state.record, layout, kw, ctx)
        budgets = Budgets.build(a.pruner, a.info, a.budget, layout.special)  # one schedule per item size
        new = self.encoder_kwargs(kw, layout)
        origin = [[torch.arange(c, device=layout.ids.device) for c in row] for row in layout.per_row(layout.counts)]
        result = VisionResult(new, layout.spans, origin, layout.mask2d)
        if a.vision is not None:
            result = self.vision_stage(state, layout, new, budgets)
        if a.llm is not None:
            if kw.get("labels") is not None:
                raise NotImplementedError(f"{a.pruner.name} drops tokens inside the LLM; labels are not supported")
            state.llm = a.llm.begin(result.kwargs, result.spans, result.origin, result.mask, state.record, ctx,
                                    budgets.rows(layout.rows))
        a.record = state.record
        return result.kwargs

    def layout(self, kw: dict) -> VisualLayout:
        """The prompt's visual items, through the family hooks (encoder, token layout, default positions)."""
        a = self.adapter
        ids = kw["input_ids"]
        mask2d = mask_to_2d(kw.get("attention_mask"), ids.shape[1])
        encoded = self.encoded_images(kw)
        held = [int(f.shape[0]) for f in encoded.pooler_output]  # the processor's placeholders per item
        encoded = a.relayout(encoded) or encoded
        feats = list(encoded.pooler_output)
        counts = [int(f.shape[0]) for f in feats]
        spans = image_spans(ids, a.image_token_id, held)
        pos = kw.get("position_ids")
        pos = a.default_positions(ids, mask2d, kw) if pos is None else pos
        resized = self.resized(kw, ids, mask2d, pos, spans, counts, held)
        if resized is not None:
            ids, mask2d, pos = resized.ids, resized.mask2d, resized.positions
            spans = image_spans(ids, a.image_token_id, counts)
        rows, j = [], 0
        for row in spans:
            rows.append(list(range(j, j + len(row))))
            j += len(row)
        source = encoder_sources(feats)
        grid, special = a.token_layout(distinct(feats, source), kw)  # once per encoded image
        grid = None if grid is None else expand(grid, source)
        return VisualLayout(ids, mask2d, pos, encoded, feats, spans, rows, grid, expand(special, source),
                            ["image"] * len(feats), source, None if resized is None else resized.added,
                            kw["input_ids"].shape[1])

    def resized(self, kw: dict, ids: torch.Tensor, mask2d: torch.Tensor | None, pos: torch.Tensor,
                spans: list[list[torch.Tensor]], counts: list[int], held: list[int]) -> Resized | None:
        """The prompt with each item's placeholder run resized to its features' count, where the family laid
        the items out with other counts than the processor (``adapter.relayout``); None where they agree."""
        a = self.adapter
        if held == counts:
            return None
        if a.vision is None or any(kw.get(k) is not None for k in a.token_keys):
            raise NotImplementedError(f"{a.pruner.name}: a family layout with other token counts than the prompt's "
                                      "placeholders needs a vision stage and no labels")
        pad_id = a.model.config.get_text_config().pad_token_id
        return resize_runs(ids, mask2d, pos, spans, counts, pad_id if pad_id is not None else 0)

    def encoded_images(self, kw: dict) -> Any:
        """The encoder outputs: ``generate()``'s pre-encoded ones, or the family's ``encode_images`` run now."""
        mm = kw.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None:
            return mm["image"]
        if self.adapter.vision is not None:
            self.adapter.vision.clear()
        return self.adapter.encode_images(kw)

    def fill_record(self, record: PruneRecord, layout: VisualLayout, kw: dict, ctx: PrefillContext) -> None:
        a = self.adapter
        ids = layout.ids
        record.n_visual = layout.per_row(layout.counts)
        # sync: once per prefill, the record's host-side prompt lengths
        record.seq_len = layout.mask2d.sum(1).tolist() if layout.mask2d is not None else [ids.shape[1]] * len(ids)
        record.config = a.model.config
        record.modality = layout.per_row(layout.modality)
        for key in ("image_sizes", "image_grid_thw"):
            if kw.get(key) is not None and len(kw[key]) == len(layout.features):
                # sync: once per prefill, image sizes for the record (the model's own forward reads them too)
                setattr(record, key, layout.per_row([tuple(int(v) for v in r) for r in kw[key].tolist()]))
        record.special = layout.per_row([sp.to(ids.device) for sp in layout.special])
        record.notes = ctx.notes  # the method's remarks on this prefill, as its stages run
        if a.encoder_cut is not None:
            record.encoder_cuts = self.encoder_cuts(layout)
        if layout.source is not None:
            ctx.notes.append(f"generate repeated {max(layout.source) + 1} encoded image(s) over {len(layout.source)} "
                             "LLM items (beam search / num_return_sequences): the encoder and any vision signals ran "
                             "once per image; each expanded row is pruned like that row run alone")

    def encoder_cuts(self, layout: VisualLayout) -> list[tuple[int, list[torch.Tensor]]]:
        """The in-encoder cuts for the record: per encoder sequence, as the encoder ran; where ``generate`` repeated
        the images and each sequence is one image (not a LLaVA-NeXT tile), one entry per item, as ``n_visual``."""
        history = list(self.adapter.encoder_cut.history)
        if layout.source is None:
            return history
        n = max(layout.source) + 1
        return [(layer, expand(kept, layout.source) if len(kept) == n else kept) for layer, kept in history]

    def encoder_kwargs(self, kw: dict, layout: VisualLayout) -> dict:
        """The forward kwargs with the encoder outputs passed in (pixels dropped) and explicit positions."""
        new = {k: v for k, v in kw.items() if k not in self.adapter.pixel_keys}
        new["mm_encoder_outputs"] = {**(kw.get("mm_encoder_outputs") or {}), "image": layout.encoded}
        if layout.positions is not kw.get("position_ids"):
            new["position_ids"] = layout.positions
        return new

    # ------------------------------------------------------------------ the vision stage
    def vision_stage(self, state: PrefillState, layout: VisualLayout, new: dict, budgets: Budgets) -> VisionResult:
        """Signals, the selection core's decision, and the sequence rewrite around it."""
        a, record = self.adapter, state.record
        t0 = time.perf_counter()
        signals = a.vision.signals(layout.features, layout.owners, state.ctx, layout.grid, layout.special,
                                   layout.source)
        if a.vision_request.paired_text:
            signals.paired_text = a.paired_text(layout.ids, layout.mask2d, layout.spans)
        placements, scores = a.vision.select(signals, budgets, a.record_scores)
        keeps = [p.slots.to(layout.ids.device) for p in placements]
        self.record_vision(record, layout, placements, keeps, scores)
        keep_mask = self.keep_mask(layout, keeps)
        real = layout.mask2d.bool() if layout.mask2d is not None else None
        # the batch re-packed: its width is the longest pruned row, padding the cut freed is dropped too
        idx, valid = left_repad(keep_mask) if real is None else repack(keep_mask & real, ~real,
                                                                       padded_right(layout.mask2d))
        new = self.rewrite(new, layout, keep_mask, idx, valid)
        new["mm_encoder_outputs"]["image"] = a.prune_encoder_outputs(layout.encoded, placements, layout.source)
        ids, mask2d = layout.ids, layout.mask2d
        mask_pruned = take(mask2d if mask2d is not None else torch.ones_like(ids), idx, valid, 0)
        offset = ((ids == a.image_token_id) & ~keep_mask).sum(1) if a.positions in VISION_COMPACT else None
        if layout.added is not None:  # runs resized before the stage: decode steps count the processor's prompt
            offset = (0 if offset is None else offset) - layout.added
        state.decode = DecodeState(layout.n_prompt or ids.shape[1], idx.shape[1], mask_pruned, offset)
        record.timings["select_vision_s"] = time.perf_counter() - t0
        spans = self.new_spans(layout, keep_mask, idx, keeps)
        return VisionResult(new, spans, layout.per_row(keeps), mask_pruned)

    def record_vision(self, record: PruneRecord, layout: VisualLayout, placements: list[Placement],
                      keeps: list[torch.Tensor], scores: list[torch.Tensor] | None) -> None:
        record.encoder_reads = self.adapter.vision.received_layers()
        if any(p.n_new for p in placements):
            record.merged = layout.per_row([Merged(p.sources(), p.slots[p.new_at]) if p.n_new else None
                                            for p in placements])
        record.stages.append(Stage("vision", None, layout.per_row(keeps),
                                   layout.per_row(scores) if scores is not None else None))

    def keep_mask(self, layout: VisualLayout, keeps: list[torch.Tensor]) -> torch.Tensor:
        """(B, N) bool: the prompt tokens that stay (every non-visual token, each item's kept slots)."""
        keep_mask = layout.ids != self.adapter.image_token_id
        for bi, (row_spans, row_items) in enumerate(zip(layout.spans, layout.rows)):
            for span, j in zip(row_spans, row_items):
                keep_mask[bi, span[keeps[j]]] = True
        return keep_mask

    def new_spans(self, layout: VisualLayout, keep_mask: torch.Tensor, idx: torch.Tensor,
                  keeps: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Each item's kept tokens' positions in the re-padded sequence."""
        b, n = layout.ids.shape
        new_pos_of = torch.full((b, n), -1, dtype=torch.long, device=idx.device)
        new_pos_of.scatter_(1, idx, torch.arange(idx.shape[1], device=idx.device).expand_as(idx))
        new_pos_of = new_pos_of.masked_fill(~keep_mask, -1)
        return [[new_pos_of[bi, span[keeps[j]]] for span, j in zip(rs, ri)]
                for bi, (rs, ri) in enumerate(zip(layout.spans, layout.rows))]

    def rewrite(self, new: dict, layout: VisualLayout, keep_mask: torch.Tensor, idx: torch.Tensor,
                valid: torch.Tensor) -> dict:
        """Every per-token input gathered to the kept tokens and re-padded; then the family's own fix-ups
        (``adapter.after_rewrite``: Qwen renumbers its text position row and sets ``rope_deltas``)."""
        a = self.adapter
        ids, pos = layout.ids, layout.positions
        pad_id = a.model.config.get_text_config().pad_token_id
        new["input_ids"] = take(ids, idx, valid, pad_id if pad_id is not None else 0)
        mask = take(layout.mask2d if layout.mask2d is not None else torch.ones_like(ids), idx, valid, 0)
        # with no mask and no cache, transformers reads gaps in position_ids as packed-sequence boundaries: keep an
        # explicit all-ones mask whenever "original" positions have gaps
        # sync: once per prefill (one read for both): were tokens dropped, is the pruned mask all ones (then None,
        # so that SDPA can use is_causal)
        dropped, full = torch.stack([(~keep_mask).any(), mask.all()]).tolist()
        gaps = a.positions == "original" and dropped
        new["attention_mask"] = None if full and not gaps else mask
        if a.positions in VISION_COMPACT:  # the pre-LLM stage re-indexes its survivors
            pos = pos - ((ids == a.image_token_id) & ~keep_mask).long().cumsum(1)  # as if dropped never existed
        new["position_ids"] = take(pos, idx, valid, 0)
        for key, fill in a.token_keys.items():
            if new.get(key) is not None:
                new[key] = take(new[key], idx, valid, fill)
        return a.after_rewrite(new, layout.positions)

    # ------------------------------------------------------------------ decode
    def decode(self, kw: dict, cache: Any, past: int) -> dict:
        """A step after a prefill: found by its cache; the pruned prompt's mask and position shift applied."""
        state = self.states.get(cache) if cache is not None else None
        if state is None:  # not a pruned prefill of this model (a text-only conversation, another adapter's)
            return kw
        self.local.state = state
        if state.llm is not None:
            state.llm.phase = "decode"
        kw = kw if state.decode is None else decode_kwargs(kw, past, state.decode)
        return self.adapter.decode_inputs(kw, past, state)


def decode_kwargs(kw: dict, past: int, st: DecodeState) -> dict:
    """A decode step's kwargs for a prompt pruned before the LLM: the 2D mask rebuilt over the pruned prompt
    (``generate`` keeps the unpruned one), "compact" positions shifted by the tokens dropped."""
    ids = kw.get("input_ids")
    q = (ids if ids is not None else kw["inputs_embeds"]).shape[1]
    t = past + q - st.n_pruned  # tokens after the pruned prompt, this step's included
    new = dict(kw)
    am = kw.get("attention_mask")
    if isinstance(am, dict) or (am is not None and am.dim() == 4):  # pre-built for the unpruned length:
        am = None  # let the model rebuild it
        new["attention_mask"] = None
    if am is not None:
        new["attention_mask"] = torch.cat([st.mask.to(am.dtype), am[:, st.n_full:]], 1)
    elif not st.all_ones():
        new["attention_mask"] = torch.cat([st.mask, st.mask.new_ones(st.mask.shape[0], t)], 1)
    if st.offset is not None and kw.get("position_ids") is not None:
        new["position_ids"] = kw["position_ids"] - st.offset.view(-1, 1)
    return new
