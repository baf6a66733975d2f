"""The model-adapter interface and the machinery every family shares.

An adapter knows *how* a model family runs and nothing about any method. It

* hands the vision stage to :class:`~tokprune.patches.vision_stage.VisionStage`, which taps the encoder for the
  signals a pruner requests (through two generic family hooks) and runs the selection;
* at prefill, in one forward pre-hook on the top-level ``*ForConditionalGeneration``, locates each image's span
  from token ids, asks the pruner's vision stage which tokens to keep and rewrites every per-token input
  (input_ids, attention_mask, position_ids, labels, ...) plus the encoder outputs, re-padding rows on the left;
* at decode, rebuilds the 2D mask (``generate`` keeps the unpruned one) and shifts positions when kept tokens
  were re-indexed;
* hands LLM stages to :class:`~tokprune.patches.llm_stage.LLMStages`, which drops tokens inside the decoder;
* hands a method's in-encoder cuts to :class:`~tokprune.patches.encoder_cut.EncoderCutStage`, which drops tokens
  between vision-encoder layers (family hooks ``cut_layout`` / ``cut_heads``).

Family files subclass :class:`Adapter` and fill in the few hooks marked "family hook".
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tokprune.config import Budget
from tokprune.patches.compat import get_cache
from tokprune.patches.encoder_cut import EncoderCutStage
from tokprune.patches.llm_stage import LLMStages
from tokprune.patches.sequence import image_spans, left_repad, mask_to_2d, paired_text_positions, take
from tokprune.patches.vision_stage import Placement, VisionStage, content_label
from tokprune.pruners.base import VISION_COMPACT, ModelInfo, PrefillContext, Pruner, UnsupportedError
from tokprune.record import Merged, PruneRecord, Stage
from tokprune.schedule import Schedule

#: the image normalisation of the CLIP, LLaVA(-NeXT) and Qwen-VL processors
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class _DecodeState:
    """What decode steps need to stay consistent with a pruned prefill."""

    cache: Any
    n_full: int  # prompt length generate() believes in
    n_pruned: int  # prompt length the cache holds (layer 0)
    mask: torch.Tensor  # (B, n_pruned) 2D mask of the pruned prompt
    offset: torch.Tensor | None  # (B,) position shift of a re-indexed pre-LLM stage ("compact", "compact_pre_llm")
    mask_all: bool | None = None  # whether ``mask`` is all ones, read once (a host sync) at the first decode step


class Adapter:
    """Base adapter. Subclasses set ``model_classes`` and implement the family hooks."""

    family: ClassVar[str] = "base"
    #: class names of the ``*ForConditionalGeneration`` models this adapter handles
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: forward kwargs that carry pixels; dropped once the encoder outputs are passed instead
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes", "image_grid_thw")
    #: per-token forward kwargs rewritten with the sequence, with their padding value
    token_keys: ClassVar[dict[str, int]] = {"labels": -100}
    #: family options ``tokprune.apply`` accepts next to the method's: name -> allowed values, the default first
    options: ClassVar[dict[str, tuple[Any, ...]]] = {}
    #: fill ``Stage.scores`` (``tokprune.apply(..., record_scores=True)``)
    record_scores: bool = False
    #: per image, the last vision stage's scores over its original tokens (set by ``select_vision``), or None
    _vision_scores: list[torch.Tensor] | None = None

    def __init__(self, model: nn.Module, pruner: Pruner, budget: Budget, **options: Any) -> None:
        self.model, self.pruner, self.budget = model, pruner, budget
        self.opts = self.resolve_options(options)
        self.info = self.model_info()
        pruner.check(self.info)
        self.positions = pruner.resolved_positions(self.info)
        self.vision_request = pruner.vision_request(self.info)
        self.vision = VisionStage(self, self.vision_request) if self.vision_request is not None else None
        cut = pruner.encoder_cut(self.info)
        self.encoder_cut = EncoderCutStage(self, cut) if cut is not None else None
        layers = pruner.llm_layers(self.info)
        self.llm = LLMStages(self, layers, pruner.llm_request(self.info)) if layers else None
        self.record: PruneRecord | None = None
        self._decode: _DecodeState | None = None
        self._handles: list[Any] = []
        self._warned_embeds = False

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The family options with defaults filled in; an unknown name or value raises, naming the valid ones."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            known = ", ".join(sorted(cls.options)) or "none"
            raise TypeError(f"the {cls.family} adapter has no option {', '.join(unknown)}; its options: {known}")
        for name, value in options.items():
            if value not in cls.options[name]:
                raise ValueError(f"{name} must be one of {cls.options[name]}, got {value!r}")
        return {name: options.get(name, allowed[0]) for name, allowed in cls.options.items()}

    @classmethod
    def describe(cls, model: nn.Module) -> ModelInfo:
        """The :class:`ModelInfo` of ``model`` without patching anything (a model on the meta device will do):
        the one factory of ModelInfo, so FLOPs plans and the CLI see exactly what ``apply`` sees."""
        probe = cls.__new__(cls)  # model_info reads only the modules
        probe.model = model
        return probe.model_info()

    # ------------------------------------------------------------------ family hooks
    def model_info(self) -> ModelInfo:  # family hook
        raise NotImplementedError

    @property
    def base(self) -> nn.Module:
        """The inner ``*Model`` (holds the vision tower, projector and language model)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.base.language_model

    @property
    def vision_tower(self) -> nn.Module:  # family hook
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def vision_layer(self, layer: int) -> tuple[nn.Module, nn.Module]:  # family hook
        """(block, attention module) of encoder layer ``layer`` (0-based): where vision signals are tapped."""
        raise NotImplementedError

    def to_tokens(self, calls: list[torch.Tensor], features: list[torch.Tensor],
                  reduce: str = "mean") -> list[torch.Tensor]:
        """Per-patch values seen inside the encoder, one (n_seq, n_patches, ...) block per attention call in call
        order, as per-LLM-token values aligned with each image's ``features`` (n_i, ...). ``reduce``: how patches
        that become one token combine ("mean", or "concat" along the last axis for pixels)."""  # family hook
        raise NotImplementedError

    def received_per_image(self, calls: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per attention call, ``received`` (each key's column mean over the call's queries) as the column mean over
        all queries of the key's image: the same where a call is one image or tile (the default); a windowed block
        (Qwen2.5-VL) overrides it, since queries of other windows pay a key 0. Family hook."""
        return calls

    def windowed_layer(self, layer: int) -> bool:
        """Whether encoder layer ``layer`` attends within windows of an image (one attention call per window).
        Family hook; default False."""
        return False

    def pixel_patches(self, pixels: torch.Tensor, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> torch.Tensor:
        """The encoder's input pixels, un-normalised, per patch of its sequence: (n_seq, n_patches, C, values)
        (a [CLS] slot holds NaN). Family hook."""
        raise NotImplementedError

    def pixel_normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the family's processors normalise pixels with (CLIP's for every built-in family); a
        ``Signal("pixels", mean=..., std=...)`` overrides it for a processor configured otherwise."""
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def token_layout(self, features: list[torch.Tensor], kw: dict) -> tuple[list[torch.Tensor] | None,
                                                                            list[torch.Tensor]]:
        """Per image, each visual token's (row, col, part) grid coordinates (n_i, 3) (None when the forward does
        not say) and its special-token mask (n_i,) (tokens that carry no patch). Default: none special, no grid."""
        return None, [torch.zeros(f.shape[0], dtype=torch.bool, device=f.device) for f in features]

    def budget_parts(self, signals: Any, image_budget: Callable[[torch.Tensor], int]
                     ) -> list[tuple[int, torch.Tensor, int, tuple[int, int]]]:
        """How a vision budget is spent: (image, token indices, tokens to keep, owner) per part; ``image_budget``
        gives an image's vision-stage budget from its special-token mask. Default: one part per image holding its
        content (non-special) tokens. LLaVA-NeXT splits per tile."""
        # sync: once per image per prefill, the content tokens' indices (a variable-size output)
        return [(j, (~sp).nonzero()[:, 0], image_budget(sp), owner)
                for j, (sp, owner) in enumerate(zip(signals.special, signals.owners))]

    def image_budget(self, special: torch.Tensor) -> tuple[int, int]:
        """(content tokens, user budget) of an image with this special-token mask: ``keep`` / ``keep_ratio``
        count its content tokens (an error names both counts when a count budget exceeds them)."""
        n = int((~special).sum())  # sync: once per image per prefill, the content-token count sizes every budget
        rounding = self.pruner.ratio_rounding
        try:
            keep = self.budget.count(n, rounding=rounding)
        except ValueError:  # the error names what was counted (reads the mask again, on the error path only)
            keep = self.budget.count(n, content_label(special), rounding=rounding)
        return n, keep

    def schedule(self, special: torch.Tensor) -> Schedule:
        """The method's per-stage budgets for an image with this special-token mask (see :meth:`image_budget`)."""
        return self.pruner.schedule(self.info, *self.image_budget(special), keep_ratio=self.budget.keep_ratio)

    def special_token_ids(self) -> set[int]:
        """The ids the model config names as special (``*_token_id`` of the config and its text config: image,
        video, vision start/end, bos, eos, pad), never part of an image's paired text."""
        ids: set[int] = set()
        for cfg in (self.model.config, self.model.config.get_text_config()):
            for name, value in vars(cfg).items():
                vals = value if isinstance(value, (list, tuple)) else [value]
                if name.endswith(("_token_id", "_token_index")):
                    ids |= {int(v) for v in vals if isinstance(v, int) and not isinstance(v, bool)}
        return ids

    def paired_text(self, ids: torch.Tensor, mask2d: torch.Tensor | None,
                    spans: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Per image (row-major), the LLM input embeddings of its paired text (see
        :attr:`~tokprune.pruners.base.VisionSignals.paired_text`): found from token ids, never from offsets."""
        embed = self.model.get_input_embeddings()
        positions = paired_text_positions(ids, mask2d, spans, self.special_token_ids() | {self.image_token_id})
        return [embed(ids[bi, pos]) for bi, row in enumerate(positions) for pos in row]

    def default_positions(self, input_ids: torch.Tensor, mask2d: torch.Tensor | None, kw: dict) -> torch.Tensor:
        """The position ids the unpatched model would use when none are passed."""  # family hook
        b, n = input_ids.shape
        return torch.arange(n, device=input_ids.device).expand(b, n)

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the language model for the given positions (used for "compact" positions in the LLM)."""
        return self.language_model.rotary_emb(x, position_ids=position_ids)

    def prune_encoder_outputs(self, out: Any, placements: list[Placement]) -> Any:
        """Encoder outputs holding only the surviving tokens, new (merged) ones in their slots (families with extra
        per-token outputs extend this and merge them the same way)."""
        new = out.__class__(**dict(out.items()))
        new.pooler_output = [self.build_encoder_rows(j, p, f) if p.encoder_rows is not None else p.build(f)
                             for j, (f, p) in enumerate(zip(out.pooler_output, placements))]
        return new

    # ------------------------------------------------------------------ merges before the projector
    def build_encoder_rows(self, image: int, placement: Placement, features: torch.Tensor) -> torch.Tensor:
        """The LLM tokens of an encoder-space decision (:class:`~tokprune.pruners.base.VisionDecision`
        ``encoder_rows``), in row order: ``project(rows @ E)`` with ``E`` image ``image``'s encoder sequence."""
        enc = self.encoder_sequence(image)
        rows = placement.encoder_rows.to(device=enc.device, dtype=torch.float32)
        if rows.shape[1] != enc.shape[0]:
            raise RuntimeError(f"encoder_rows have {rows.shape[1]} columns, the encoder sequence {enc.shape[0]} tokens")
        return self.project(rows @ enc.float()).to(device=features.device, dtype=features.dtype)

    def encoder_sequence(self, image: int) -> torch.Tensor:
        """(n_enc, D_enc) the feature layer's tokens of image ``image`` ([CLS] first where the encoder has one), as
        the projector's input is taken from them. Family hook (encoder-space merges)."""
        raise UnsupportedError(f"the {self.family} adapter does not merge tokens before its projector; use the "
                               "method's merge of LLM tokens")

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """(m, D_enc) encoder-space tokens -> (m, D_llm) through the model's projector. Family hook."""
        raise UnsupportedError(f"the {self.family} adapter does not merge tokens before its projector")

    def cut_layout(self) -> str:
        """How the vision encoder holds its sequences for an in-encoder cut: "batch" ((B, N, D), one image or tile
        per row, CLIP) or "packed" ((L, D), images packed with ``cu_seqlens``, Qwen). Family hook."""
        raise NotImplementedError(f"the {self.family} adapter does not support dropping tokens inside its encoder")

    def cut_heads(self) -> tuple[nn.Module | None, list[nn.Module]]:
        """(module run right after the last encoder layer, whose input a cut after that layer shortens, or None;
        modules whose per-token output is scattered back into the full token layout). Family hook."""
        raise NotImplementedError(f"the {self.family} adapter does not support dropping tokens inside its encoder")

    def cut_budgets(self, n_tokens: list[int]) -> list[int]:
        """The user's budget resolved for each encoder sequence that becomes ``n_tokens[s]`` LLM tokens (one image
        per sequence by default)."""
        return [self.budget.count(n, rounding=self.pruner.ratio_rounding) for n in n_tokens]

    def cut_strip(self) -> int:
        """Leading encoder tokens that the batch-layout head never reads (LLaVA's [CLS] under "default")."""
        return 0

    def encode_images(self, kw: dict) -> Any:
        """Run the model's own ``get_image_features`` with the pixel kwargs of a forward call."""
        fn = self.base.get_image_features
        names = set(inspect.signature(fn).parameters) - {"kwargs"}
        return fn(**{k: v for k, v in kw.items() if k in names and v is not None}, return_dict=True)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        if self.vision is not None:
            self.vision.install()
        if self.encoder_cut is not None:
            self.encoder_cut.install()
        if self.llm is not None:
            self.llm.install()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        if self.vision is not None:
            self.vision.remove()
        if self.encoder_cut is not None:
            self.encoder_cut.remove()
        if self.llm is not None:
            self.llm.remove()
        self._handles = []
        self._decode = None

    # ------------------------------------------------------------------ the top-level hook
    def _pre_forward(self, module: nn.Module, args: tuple, kw: dict) -> tuple[tuple, dict]:
        if args:
            kw = {**kw, "input_ids": args[0]}
            args = ()
        ids = kw.get("input_ids")
        pkv = get_cache(kw)
        past = pkv.get_seq_length() if pkv is not None else 0
        has_images = kw.get("pixel_values") is not None or (kw.get("mm_encoder_outputs") or {}).get("image") is not None
        if ids is None and has_images:
            raise ValueError("tokprune locates images by their token ids: pass input_ids, not inputs_embeds")
        # the id check is evaluated last, so decode steps (cache, no pixels) never run it
        # sync: once per prefill, to know whether the prompt has images
        if ids is None and past == 0 and kw.get("inputs_embeds") is not None:
            return args, self._unpruned_embeds(kw)
        if ids is not None and (past == 0 or has_images) and bool((ids == self.image_token_id).any()):
            if not has_images:
                raise ValueError(
                    "input_ids hold image tokens but no pixel_values were passed, so there is no image to encode "
                    "or prune; pass the processor's pixel_values (with image_sizes / image_grid_thw) together "
                    "with input_ids, or remove the image tokens from the prompt"
                )
            if past > 0:
                raise NotImplementedError(
                    "a new image in a continued (cached) conversation is not supported yet; "
                    "start generation from the full prompt"
                )
            return (), self._prefill(kw)
        if past > 0:
            if self._decode is not None and (self._decode.cache is None or pkv is self._decode.cache):
                kw = self._decode_step(kw, past)
            if self.llm is not None and self.llm.owns(pkv):
                self.llm.phase = "decode"
            return (), kw
        if past == 0:  # a new text-only sequence: forget the last prefill
            self._decode = None
            self.record = None  # last_record() must not report an earlier image prompt as this one's
            if self.llm is not None:
                self.llm.reset()
        return args, kw

    def _unpruned_embeds(self, kw: dict) -> dict:
        """A prefill from ``inputs_embeds`` alone (features merged by hand): tokprune cannot tell which rows are
        image tokens, so nothing is pruned; warn once per patch and leave a record whose ``notes`` say why."""
        why = ("inputs_embeds without input_ids / pixel_values: tokprune cannot locate the image tokens, so "
               f"{self.pruner.name} pruned nothing in this prefill; pass input_ids and pixel_values (the "
               "processor's outputs) to prune")
        if not self._warned_embeds:
            warnings.warn(why, stacklevel=4)
            self._warned_embeds = True
        self._decode = None
        if self.llm is not None:
            self.llm.reset()
        embeds, mask = kw["inputs_embeds"], kw.get("attention_mask")
        # sync: once per such prefill, the host-side prompt lengths of the record
        lengths = mask.sum(-1).tolist() if mask is not None and mask.dim() == 2 else [embeds.shape[1]] * len(embeds)
        record = PruneRecord(method=self.pruner.name, n_visual=[[] for _ in lengths],
                             seq_len=[int(n) for n in lengths])
        record.notes.append(why)
        self.record = record
        return kw

    def _image_features(self, kw: dict) -> Any:
        mm = kw.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None:
            return mm["image"]
        if self.vision is not None:
            self.vision.clear()
        return self.encode_images(kw)

    def _prefill(self, kw: dict) -> dict:
        ids = kw["input_ids"]
        b, n = ids.shape
        mask2d = mask_to_2d(kw.get("attention_mask"), n)
        feats_out = self._image_features(kw)
        feats = list(feats_out.pooler_output)
        counts = [int(f.shape[0]) for f in feats]
        spans = image_spans(ids, self.image_token_id, counts)
        rows_images = _row_image_ids(spans)
        pos = kw.get("position_ids")
        if pos is None:
            pos = self.default_positions(ids, mask2d, kw)
        record = PruneRecord(
            method=self.pruner.name,
            n_visual=[[counts[j] for j in row] for row in rows_images],
            # sync: once per prefill, the record's host-side prompt lengths
            seq_len=(mask2d.sum(1).tolist() if mask2d is not None else [n] * b),
            config=self.model.config,
        )
        for key in ("image_sizes", "image_grid_thw"):
            if kw.get(key) is not None and len(kw[key]) == len(counts):
                # sync: once per prefill, image sizes for the record (the model's own forward reads them too)
                per_image = [tuple(int(v) for v in r) for r in kw[key].tolist()]
                setattr(record, key, [[per_image[j] for j in row] for row in rows_images])
        new = dict(kw)
        for key in self.pixel_keys:
            new.pop(key, None)
        new["mm_encoder_outputs"] = {**(kw.get("mm_encoder_outputs") or {}), "image": feats_out}
        if pos is not kw.get("position_ids"):
            new["position_ids"] = pos
        origin = [[torch.arange(c, device=ids.device) for c in (counts[j] for j in row)] for row in rows_images]
        ctx = PrefillContext(self.info, self.vision_request, self.positions)
        grid, special = self.token_layout(feats, kw)
        record.special = [[special[j].to(ids.device) for j in row] for row in rows_images]
        record.notes = ctx.notes  # the method's remarks on this prefill, as its stages run
        if self.encoder_cut is not None:
            record.encoder_cuts = list(self.encoder_cut.history)

        if self.vision is not None:
            t0 = time.perf_counter()
            owners = [(bi, j) for bi, row in enumerate(rows_images) for j in range(len(row))]
            signals = self.vision.signals(feats, owners, ctx, grid, special)
            if self.vision_request.paired_text:
                signals.paired_text = self.paired_text(ids, mask2d, spans)
            placements, self._vision_scores = self.vision.select(signals, self.record_scores)
            keeps = [p.slots.to(ids.device) for p in placements]
            if any(p.n_new for p in placements):
                record.merged = [[Merged(placements[j].sources(), placements[j].slots[placements[j].new_at])
                                  if placements[j].n_new else None for j in row] for row in rows_images]
            keep_mask = ids != self.image_token_id
            for row_spans, row_imgs, bi in zip(spans, rows_images, range(b)):
                for span, j in zip(row_spans, row_imgs):
                    keep_mask[bi, span[keeps[j]]] = True
            idx, valid = left_repad(keep_mask)
            new_pos_of = torch.full((b, n), -1, dtype=torch.long, device=ids.device)
            new_pos_of.scatter_(1, idx, torch.arange(idx.shape[1], device=ids.device).expand_as(idx))
            new_pos_of = new_pos_of.masked_fill(~keep_mask, -1)
            spans = [[new_pos_of[bi, span[keeps[j]]] for span, j in zip(rs, ri)]
                     for bi, (rs, ri) in enumerate(zip(spans, rows_images))]
            origin = [[keeps[j] for j in ri] for ri in rows_images]
            record.stages.append(Stage("vision", None, origin))
            if self._vision_scores is not None:
                record.stages[-1].scores = [[self._vision_scores[j] for j in ri] for ri in rows_images]
            new = self._rewrite_prefill(new, ids, mask2d, pos, keep_mask, idx, valid)
            new["mm_encoder_outputs"]["image"] = self.prune_encoder_outputs(feats_out, placements)
            n_pruned = idx.shape[1]
            mask_pruned = take(mask2d if mask2d is not None else torch.ones_like(ids), idx, valid, 0)
            offset = None
            if self.positions in VISION_COMPACT:
                dropped = ((ids == self.image_token_id) & ~keep_mask).sum(1)
                offset = dropped
            self._decode = _DecodeState(get_cache(kw), n, n_pruned, mask_pruned, offset)
            record.timings["select_vision_s"] = time.perf_counter() - t0
        else:
            self._decode = None
            mask_pruned = mask2d
        if self.llm is not None:
            if kw.get("labels") is not None:
                raise NotImplementedError(f"{self.pruner.name} drops tokens inside the LLM; labels are not supported")
            self.llm.begin(new, spans, origin, mask_pruned, record, ctx)
        self.record = record
        return new

    def _rewrite_prefill(self, new: dict, ids: torch.Tensor, mask2d: torch.Tensor | None, pos: torch.Tensor,
                         keep_mask: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> dict:
        pad_id = self.model.config.get_text_config().pad_token_id
        new["input_ids"] = take(ids, idx, valid, pad_id if pad_id is not None else 0)
        full_mask = mask2d if mask2d is not None else torch.ones_like(ids)
        mask = take(full_mask, idx, valid, 0)
        # with no mask and no cache, transformers reads gaps in position_ids as packed-sequence boundaries: keep an
        # explicit all-ones mask whenever "original" positions have gaps
        # sync: once per prefill (one read for both): were tokens dropped, is the pruned mask all ones (then None,
        # so that SDPA can use is_causal)
        dropped, full = torch.stack([(~keep_mask).any(), mask.all()]).tolist()
        gaps = self.positions == "original" and dropped
        new["attention_mask"] = None if full and not gaps else mask
        if self.positions in VISION_COMPACT:  # the pre-LLM stage re-indexes its survivors
            dropped_before = ((ids == self.image_token_id) & ~keep_mask).long().cumsum(1)
            pos = pos - dropped_before  # as if the dropped tokens never existed
        new["position_ids"] = take(pos, idx, valid, 0)
        for key, fill in self.token_keys.items():
            if new.get(key) is not None:
                new[key] = take(new[key], idx, valid, fill)
        return new

    def _decode_step(self, kw: dict, past: int) -> dict:
        st = self._decode
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
        elif not _mask_all(st):
            new["attention_mask"] = torch.cat([st.mask, st.mask.new_ones(st.mask.shape[0], t)], 1)
        if st.offset is not None and kw.get("position_ids") is not None:
            new["position_ids"] = kw["position_ids"] - st.offset.view(-1, 1)
        return new


def _mask_all(st: _DecodeState) -> bool:
    """Whether the pruned prompt's mask is all ones; read on the host once per prefill, not at every step."""
    if st.mask_all is None:
        st.mask_all = bool(st.mask.all())  # sync: once per generate (first decode step), cached
    return st.mask_all


def _row_image_ids(spans: list[list[torch.Tensor]]) -> list[list[int]]:
    """Global (row-major) image index of every image of every row."""
    out, j = [], 0
    for row in spans:
        out.append(list(range(j, j + len(row))))
        j += len(row)
    return out
