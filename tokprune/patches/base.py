"""The model-adapter interface: the family plug-in.

An adapter knows *how* a model family runs and nothing about any method; it holds no orchestration. It answers
named family hooks (where the encoder and its layers are, how per-patch values become per-token ones, the token
grid and special tokens, how a budget splits over an image, default positions, extra per-token inputs, the
modalities of a forward's visual inputs, fix-ups after the prefill rewrite) and wires the seams onto the model:

* :class:`~tokprune.patches.prefill.Orchestrator` (family-neutral): the hooks on the top-level
  ``*ForConditionalGeneration``, prefill (layout, vision stage, sequence rewrite) and decode, with one
  :class:`~tokprune.patches.prefill.PrefillState` per prefill;
* :class:`~tokprune.patches.vision_stage.VisionStage`: the encoder taps for the signals a pruner requests;
* :class:`~tokprune.patches.llm_stage.LLMStages`: dropping inside the decoder (one run per prefill);
* :class:`~tokprune.patches.encoder_cut.EncoderCutStage`: dropping between vision-encoder layers.

Family files subclass :class:`Adapter` and fill in the hooks marked "family hook"; none overrides the
orchestration.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from tokprune.config import Budget
from tokprune.eager import eager
from tokprune.patches.encoder_cut import EncoderCutStage
from tokprune.patches.llm_stage import LLMStages
from tokprune.patches.prefill import Orchestrator, PrefillState
from tokprune.patches.sequence import paired_text_positions
from tokprune.patches.threads import PerThread
from tokprune.patches.vision_stage import VisionStage
from tokprune.pruners.base import ModelInfo, Pruner, UnsupportedError
from tokprune.record import PruneRecord
from tokprune.schedule import Schedule
from tokprune.selection import Placement, image_budget

#: a thread that has run no prefill on this model yet
_NO_RECORD = object()

#: the image normalisation of the CLIP, LLaVA(-NeXT) and Qwen-VL processors
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    #: the calling thread's last image prefill's record (see :attr:`record`)
    _thread_record = PerThread(lambda: _NO_RECORD)

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
        self.llm = LLMStages(self, layers, {k: pruner.llm_stage_request(self.info, k) for k in layers}
                             ) if layers else None
        self.record = None  # the last image prefill's record (tokprune.last_record)
        self.orchestrator = Orchestrator(self)
        self._handles: list[Any] = []

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

    @property
    def record(self) -> PruneRecord | None:
        """What ``tokprune.last_record`` reports: the record of the calling thread's last prefill (two threads on one
        model each read their own), or, in a thread that ran none, the model's last one."""
        own = self._thread_record
        return self._model_record if own is _NO_RECORD else own

    @record.setter
    def record(self, value: PruneRecord | None) -> None:
        self._thread_record = value
        self._model_record = value

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

    def relayout(self, encoded: Any) -> Any | None:
        """The encoder outputs with the items laid out the family's own way, where that differs from the layout
        the processor wrote placeholders for and ``generate`` bookkeeps (the orchestrator then resizes each item's
        placeholder run to its new token count before the vision stage, :mod:`tokprune.patches.relayout`); None
        (the default): as they are. Family hook (LLaVA-NeXT's ``per_tile_reference``: the references' spatial
        layout)."""
        return None

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
        got = image_budget(self.pruner, self.info, self.budget, special)
        return got.n, got.keep

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

    def prune_encoder_outputs(self, out: Any, placements: list[Placement], source: list[int] | None = None) -> Any:
        """Encoder outputs holding only the surviving tokens, new (merged) ones in their slots (families with extra
        per-token outputs extend this and merge them the same way). ``source``: per item, the encoded image it is
        a copy of (beams expanded by ``generate``), None when each item is its own."""
        new = out.__class__(**dict(out.items()))
        new.pooler_output = [self.build_encoder_rows(j if source is None else source[j], p, f)
                             if p.encoder_rows is not None else p.build(f)
                             for j, (f, p) in enumerate(zip(out.pooler_output, placements))]
        return new

    # ------------------------------------------------------------------ merges before the projector
    def build_encoder_rows(self, image: int, placement: Placement, features: torch.Tensor) -> torch.Tensor:
        """The LLM tokens of an encoder-space decision (:class:`~tokprune.pruners.base.VisionDecision`
        ``encoder_rows``), in row order: ``project(rows @ E)`` with ``E`` encoded image ``image``'s encoder
        sequence. Rows the decision marks as copies of the image's tokens (``row_copies``) are those tokens of
        ``features`` (the model's own projection of them), the rest are projected: the projector runs on the new
        rows only."""
        enc = self.encoder_sequence(image)
        rows = placement.encoder_rows.to(device=enc.device, dtype=torch.float32)
        if rows.shape[1] != enc.shape[0]:
            raise RuntimeError(f"encoder_rows have {rows.shape[1]} columns, the encoder sequence {enc.shape[0]} tokens")
        if placement.row_copies is None:
            return self.project(rows @ enc.float()).to(device=features.device, dtype=features.dtype)
        at, tokens = (t.to(features.device) for t in placement.row_copies)
        m = int(rows.shape[0])
        fresh = torch.ones(m, dtype=torch.bool, device=features.device).index_fill_(0, at, False)
        # the projected rows' indices, ascending: a host-known count (m - copies), no sync
        todo = torch.argsort(fresh.to(torch.int8), descending=True, stable=True)[:m - int(at.numel())]
        out = features.new_empty(m, features.shape[-1])
        out[at] = features[tokens]
        new = self.project(rows[todo.to(rows.device)] @ enc.float())
        out[todo] = new.to(device=features.device, dtype=features.dtype)
        return out

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

    def fixed_visual_tokens(self) -> int | None:
        """Visual tokens of every image when the family fixes them (LLaVA-1.5: 576), so ``apply`` can check a count
        budget at once; None (the default) when they depend on the image."""
        return None

    def visual_modalities(self, kw: dict) -> set[str]:
        """The modalities of the visual inputs a forward call carries (pixels or pre-encoded outputs): "image",
        and "video" for families whose processors make video inputs (refused until video pruning lands)."""
        mm = kw.get("mm_encoder_outputs") or {}
        return {"image"} if kw.get("pixel_values") is not None or mm.get("image") is not None else set()

    def after_rewrite(self, new: dict, positions: torch.Tensor) -> dict:
        """Family fix-ups after the prefill's per-token inputs were gathered to the kept tokens (``positions``: the
        unpruned prompt's position ids). Default: none."""
        return new

    def decode_inputs(self, kw: dict, past: int, state: PrefillState) -> dict:
        """Family fix-ups of a decode step's kwargs from its prefill's ``state.family`` (``past``: tokens in the
        cache). Default: none. Qwen builds M-RoPE positions from the prefill's own ``rope_deltas``."""
        return kw

    def encode_images(self, kw: dict) -> Any:
        """Run the model's own ``get_image_features`` with the pixel kwargs of a forward call."""
        fn = self.base.get_image_features
        names = set(inspect.signature(fn).parameters) - {"kwargs"}
        return fn(**{k: v for k, v in kw.items() if k in names and v is not None}, return_dict=True)

    # ------------------------------------------------------------------ install / remove
    def current_state(self) -> PrefillState | None:
        """The per-prefill state of the forward in progress (its prefill's, or the one a decode step continues);
        None for a text-only forward or outside a forward."""
        return self.orchestrator.current()

    def install(self) -> None:
        orch = self.orchestrator
        self._handles.append(self.model.register_forward_pre_hook(eager(orch.pre_forward), with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(eager(orch.post_forward), always_call=True))
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
        self.orchestrator.reset()
