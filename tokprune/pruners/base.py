"""The Pruner interface: a method decides *which* visual tokens to keep, knowing nothing about any model.

A method is a small dataclass whose fields are its hyper-parameters. It is a schedule of stages:

* a **vision stage** (before the LLM) declares the encoder signals it needs with :meth:`Pruner.vision_request`
  and returns, per image, the sorted indices to keep from :meth:`Pruner.select_vision`;
* **LLM stages** (inside the decoder, before the layers named by :meth:`Pruner.llm_layers`) score the surviving
  visual tokens from signals of that layer and return which to keep from :meth:`Pruner.select_llm`.

The model adapter owns everything else (spans, positions, masks, cache, batching). Selection rules are pure
tensor functions, so they can be tested on hand-made inputs and reused by other runtimes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from tokprune.kernels import select_topk
from tokprune.schedule import Schedule, StageBudget

#: position policies: "compact" re-indexes every stage's survivors contiguously; "original" keeps each token's
#: position id; "compact_pre_llm" re-indexes after the pre-LLM (vision) stage and keeps those ids at LLM cuts (the
#: LLM numbers the shortened sequence 0..L1-1, later cuts drop ids, decode goes on at L1 + t: VFlowOpt's reference)
POSITIONS = ("compact", "original", "compact_pre_llm")
#: the precision of attention scores (see :attr:`Pruner.score_dtype`)
SCORE_DTYPES = ("float32", "model")
#: the policies that re-index the pre-LLM stage's survivors
VISION_COMPACT = ("compact", "compact_pre_llm")


class UnsupportedError(ValueError):
    """A method cannot run on a model (e.g. it needs a [CLS] token the vision encoder does not have)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a pruner may know about the model it is applied to (filled in by the adapter)."""

    family: str
    vision_layers: int
    feature_layer: int  # 0-based encoder layer whose output feeds the projector
    has_cls: bool
    llm_layers: int
    supports_compact: bool  # whether kept tokens may be re-indexed contiguously (not for M-RoPE)
    #: whether a method may drop tokens inside the vision encoder: False where the LLM's visual tokens are not a
    #: subset of the encoder's (LLaVA-OneVision's anyres_max resize blends neighbouring crop tokens)
    encoder_cuts: bool = True
    #: whether the adapter builds LLM tokens before its projector (``VisionDecision.encoder_rows``) in this layout
    encoder_merge: bool = False

    def encoder_layer(self, layer: int, what: str = "vision layer") -> int:
        """The 0-based encoder layer ``layer`` names (a negative one counts from the last); an error names the
        valid range. ``what``: how the error names the option (e.g. ``"hiprune: object_layer"``)."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{what} must be an int (0-based encoder layer), got {layer!r}")
        resolved = layer + self.vision_layers if layer < 0 else layer
        if not 0 <= resolved < self.vision_layers:
            raise ValueError(f"{what}={layer} is out of range for an encoder with {self.vision_layers} layers; pass "
                             f"a layer in [0, {self.vision_layers - 1}] (or a negative one counting from the last)")
        return resolved


_HINTING: list[bool] = []  # set while _runs_on asks every method (so their refusals compute no hint)


def _runs_on(info: ModelInfo) -> list[str]:
    """The registered methods whose check accepts ``info`` with their default options (for error hints)."""
    from tokprune.registry import METHODS

    out = []
    _HINTING.append(True)
    try:
        for name, cls in sorted(METHODS.items()):
            try:
                cls().check(info)
            except (ValueError, TypeError):  # UnsupportedError is a ValueError
                continue
            out.append(name)
    finally:
        _HINTING.pop()
    return out


class ScoreSink:
    """Where a stage's scores are noted when the runtime asks for them (``tokprune.apply(..., record_scores=True)``).

    Every ``vision_scores`` / ``llm_scores`` a :class:`Pruner` subclass defines notes its return value in the sink
    of the signals it was given (the outermost call only, so a ``super()`` call is not noted twice), so the scores
    reach the record whether the method selects with the default top-k, its own ``select_*`` or through another
    method that delegates to it (composition). ``values``: the noted scores, in call order."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.depth = 0

    @property
    def first(self) -> Any:
        """The first scores noted (the ones the stage selected by), or None when it selected without scoring."""
        return self.values[0] if self.values else None


def _noting_scores(fn: Callable) -> Callable:
    """``fn`` (a ``vision_scores`` / ``llm_scores``) noting its result in the signals' :class:`ScoreSink`."""

    @functools.wraps(fn)
    def scores(self: Any, signals: Any, *args: Any, **kwargs: Any) -> Any:
        sink = getattr(signals, "score_sink", None)
        if sink is None:
            return fn(self, signals, *args, **kwargs)
        sink.depth += 1
        try:
            out = fn(self, signals, *args, **kwargs)
        finally:
            sink.depth -= 1
        if sink.depth == 0:
            sink.values.append(out)
        return out

    scores.__tokprune_noting__ = True
    return scores


#: vision signal kinds a method may request, and what each holds per visual token (see :class:`Signal`)
SIGNAL_KINDS: dict[str, str] = {
    "cls": "attention of the [CLS] query (row 0) to the token",
    "received": "attention the token receives: column mean of softmax(q k^T) over all queries of its image (a "
                "windowed block: the window's column sum over the image's query count)",
    "rows": "attention from the query patches chosen by ``queries``, mean over those queries",
    "keys": "key states of the token",
    "values": "value states of the token",
    "hidden_in": "hidden state entering the encoder layer",
    "hidden_out": "hidden state leaving the encoder layer",
    "pixels": "raw pixels of the token's patch(es), un-normalised, (channels, values) per token",
    "encoder_kept": "1.0 where the token survived the method's in-encoder cuts (:class:`EncoderCut`), else 0.0",
}
#: vision signal kinds read at the encoder's input or output as a whole, named without a layer
LAYERLESS_KINDS = ("pixels", "encoder_kept")
#: kinds computed from attention probabilities (``heads`` chooses head mean or per head)
ATTENTION_KINDS = ("cls", "received", "rows")
HEADS = ("mean", "all")


@dataclass(frozen=True)
class Signal:
    """One named per-layer signal of the vision encoder, e.g. ``Signal("received", 8)``.

    ``kind``: a key of :data:`SIGNAL_KINDS`; ``layer``: 0-based encoder layer (None for ``"pixels"``, which are
    read at the encoder's input and un-normalised with ``mean`` / ``std``, default: the family processor's
    normalisation, CLIP's for every built-in family). ``heads``: ``"mean"`` (one value,
    or one vector for keys/values, per token) or ``"all"`` (a trailing head axis). ``queries`` (kind ``"rows"``):
    a function from the received attention of the same layer and encoder sequence, (n_seq, n_patches) head mean,
    to the query patches whose rows are wanted: (n_seq, R) long indices, or a (n_seq, n_patches) bool mask when
    the number varies per sequence (VFlowOpt's hubs ``received > t * mean``); a sequence whose mask chooses no
    query gets NaN (the method decides the fallback). The adapter aligns every
    signal with the visual tokens the LLM receives (per image, first axis = token).
    """

    kind: str
    layer: int | None = None
    heads: str = "mean"
    queries: Callable[[torch.Tensor], torch.Tensor] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in SIGNAL_KINDS:
            raise ValueError(f"unknown vision signal {self.kind!r}; known: {', '.join(SIGNAL_KINDS)}")
        if self.heads not in HEADS:
            raise ValueError(f"heads must be one of {HEADS}, got {self.heads!r}")
        if self.kind in LAYERLESS_KINDS:
            if self.layer is not None:
                raise ValueError(f"{self.kind} describe the whole encoder call: pass no layer")
        elif isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"a vision signal names a 0-based encoder layer, got layer={self.layer!r}")
        if (self.kind == "rows") != (self.queries is not None):
            raise ValueError("pass queries= exactly for signals of kind 'rows' (the function choosing query patches)")


@dataclass(frozen=True)
class VisionRequest:
    """The encoder signals a vision stage needs; an empty request still makes a vision stage (e.g. ``random``).

    ``paired_text``: also hand the stage, per image, the LLM input embeddings of its *paired text* (CATP's
    alignment target; see :attr:`VisionSignals.paired_text`)."""

    signals: tuple[Signal, ...] = ()
    paired_text: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "signals", tuple(self.signals))

    def layers(self) -> list[int]:
        """Encoder layers that are tapped, sorted."""
        return sorted({s.layer for s in self.signals if s.layer is not None})


#: per-sequence signals an in-encoder cut may request (computed from q/k/v in the attention tap of the layer)
CUT_SIGNALS: dict[str, str] = {
    "cls_row": "(n,) head-mean softmax row of the sequence's first token ([CLS]) over its n current tokens",
    "mean_query_row": "(n,) head-mean softmax row of the token-mean query (per head) over the n current tokens",
    "values": "(H, n, d) value states per head",
    "value_mean": "(n, d) head-mean value states",
    "keys": "(H, n, d) key states per head",
}


@dataclass(frozen=True)
class EncoderCut:
    """Where a method drops tokens *inside* the vision encoder (FlowCut; a ToMe-style method would use it too).

    ``layers``: 0-based encoder layers after which :meth:`Pruner.cut_encoder` is asked (tokens it drops are gone
    for every later layer); ``signals``: the keys of :data:`CUT_SIGNALS` it needs at each of them. The seam
    (:mod:`tokprune.patches.encoder_cut`) computes them in the attention tap (no eager attention, no N x N map).
    """

    layers: tuple[int, ...]
    signals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        object.__setattr__(self, "signals", tuple(self.signals))
        unknown = [s for s in self.signals if s not in CUT_SIGNALS]
        if unknown:
            raise ValueError(f"unknown encoder-cut signal(s) {unknown}; known: {', '.join(CUT_SIGNALS)}")


@dataclass
class EncoderStep:
    """What :meth:`Pruner.cut_encoder` sees after encoder layer ``layer``, one entry per encoder *sequence* (a
    LLaVA image or tile, a Qwen image) in the order the encoder holds them.

    ``signals[name][s]``: the requested :data:`CUT_SIGNALS` over sequence ``s``'s current tokens, the ``prefix``
    leading special tokens ([CLS]) included. ``origin[s]``: each current token's index in the sequence as it
    entered the encoder. ``unit``: patches per LLM token (a Qwen 2x2 merge unit: 4; 1 on CLIP); the seam drops
    whole units, so a pruner answers in units. ``keep[s]`` / ``n_tokens[s]``: the user's budget resolved for the
    image this sequence becomes (LLM tokens) and its LLM tokens before any cut. ``state[s]``: a dict the steps of
    one encoder call share (a method's running scores).
    """

    layer: int
    info: ModelInfo
    prefix: int
    unit: int
    keep: list[int]
    n_tokens: list[int]
    signals: dict[str, list[torch.Tensor]]
    origin: list[torch.Tensor]
    state: list[dict[str, Any]]


@dataclass
class PrefillContext:
    """Per-prefill state handed to every stage of one forward (never stored on the pruner).

    ``info``: the model; ``request``: the vision request resolved at ``apply``; ``positions``: the resolved
    position mode; ``state``: a dict a method's stages share within one prefill (accumulated scores, the vision
    importance reused by LLM stages), empty at the start of each prefill.
    """

    info: ModelInfo
    request: VisionRequest | None = None
    positions: str = "original"
    state: dict[str, Any] = field(default_factory=dict)
    #: what the method says about this prefill (e.g. CATP: "row 0: one image, stage 1 only"); the record's ``notes``
    notes: list[str] = field(default_factory=list)


@dataclass
class VisionSignals:
    """Inputs of a vision stage, one entry per image (or budget part, e.g. a LLaVA-NeXT tile) in row-major order.

    ``features[i]`` (n_i, D): the projected visual tokens the LLM would receive. ``values[signal][i]`` (n_i, ...):
    each requested :class:`Signal`, aligned with ``features[i]`` (index with ``signals[signal]``).
    ``grid[i]`` (n_i, 3) long: each token's (row, col, part) in its image's grid (part: LLaVA-NeXT tile, 0 = base
    tile; Qwen frame); ``special[i]`` (n_i,) bool: tokens that carry no patch (LLaVA-NeXT's ``image_newline``),
    which are never scored and never counted in a budget. ``owners[i]``: (row in the batch, image index within that
    row, or the part's index), so a rule can depend on an image's place in its own prompt but never on what else
    shares the batch. ``ctx``: the per-prefill context. ``paired_text[i]`` (m_i, D), with
    ``VisionRequest(paired_text=True)``: the LLM input embeddings of the image's paired text, found by the adapter
    from token ids: the row's real text tokens after the image's run up to the next image's run (the last image:
    up to the row's last real token), without the ids the model config names as special (``*_token_id``: image,
    video, vision start/end, bos, eos, pad); images with no text between them share the text after the later one.
    A LLaVA-NeXT tile part carries its image's paired text.
    """

    features: list[torch.Tensor]
    values: dict[Signal, list[torch.Tensor]] = field(default_factory=dict)
    owners: list[tuple[int, int]] = field(default_factory=list)
    grid: list[torch.Tensor] | None = None
    special: list[torch.Tensor] | None = None
    ctx: PrefillContext | None = None
    #: per entry, set by :meth:`subset`: (owner of the whole image, indices of this part's tokens into it), so a
    #: method can keep per-image state (VFlowOpt's importance, reused by its LLM stages) across budget parts
    source: list[tuple[tuple[int, int], torch.Tensor]] | None = None
    paired_text: list[torch.Tensor] | None = None
    #: set by the runtime when the stage's scores are wanted (``record_scores``): what ``vision_scores`` returns
    #: is noted there (see :class:`ScoreSink`)
    score_sink: ScoreSink | None = None

    def __getitem__(self, signal: Signal) -> list[torch.Tensor]:
        if signal not in self.values:
            raise KeyError(f"{signal} was not requested; add it to the method's vision_request")
        return self.values[signal]

    def grid_shape(self, i: int) -> tuple[int, int, int]:
        """(rows, cols, parts) spanned by entry ``i``'s tokens in its grid (from :attr:`grid`; one host read), e.g.
        a LLaVA-1.5 image (24, 24, 1), a LLaVA-NeXT tile (24, 24, 1) or a whole image with its tiles (.., .., 5)."""
        if self.grid is None:
            raise ValueError("this model's forward gives no token grid (pass the processor's image sizes)")
        # sync: once per entry, the extent of its grid
        r0, r1, c0, c1, p0, p1 = torch.stack([*self.grid[i].aminmax(dim=0)], 1).flatten().tolist()
        return r1 - r0 + 1, c1 - c0 + 1, p1 - p0 + 1

    def subset(self, parts: list[tuple[int, torch.Tensor]], owners: list[tuple[int, int]]) -> VisionSignals:
        """The signals of ``parts``: (image, token indices) each, presented as separate images."""
        def pick(per_image: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if per_image is None else [per_image[j][idx.to(per_image[j].device)] for j, idx in parts]

        return VisionSignals(
            features=pick(self.features),
            values={s: pick(v) for s, v in self.values.items()},
            owners=owners,
            grid=pick(self.grid),
            special=pick(self.special),
            ctx=self.ctx,
            source=[(self.owners[j], idx) for j, idx in parts] if self.owners else None,
            paired_text=None if self.paired_text is None else [self.paired_text[j] for j, _ in parts],
            score_sink=self.score_sink,
        )


#: what an encoder-space row is (``VisionDecision.row_kinds``)
ENCODER_ROW_KINDS = ("cls", "patch", "merged")


@dataclass
class VisionDecision:
    """A vision stage's answer for one image that also adds new tokens (VisionZip's contextual tokens, VFlowOpt's
    recycled ones); a plain tensor of sorted kept indices is the answer without new tokens.

    ``kept``: sorted indices kept as they are. ``assign`` (n,) long: the new token (0..m-1) each original token
    is merged into, -1 for none (a kept token is never merged). A new token is the ``weights``-weighted mean
    (default: plain mean) of the tokens assigned to it, computed by the adapter with
    :func:`tokprune.kernels.merge_tokens` on the features and, on Qwen3-VL, on every DeepStack level alike.
    ``features`` (m, D): explicit new tokens instead (e.g. a projected [CLS]); ``assign`` then only records their
    sources, and a model with DeepStack levels refuses them. ``len(kept) + m`` must equal the budget. ``slots``
    (m,) long, optional: the dropped token (one of its sources) whose place each new token takes (VFlowOpt's
    recycled token sits at its cell's representative).

    **Encoder space** (``encoder_rows`` (m, n_enc), a merge *before* the projector, VisionZip's reference): the
    image's LLM tokens are, in row order, ``projector(encoder_rows @ E)`` with ``E`` the encoder sequence of the
    image at the feature layer (its [CLS] first where the encoder has one: index 0, patch p at ``1 + p``; as the
    projector's input rows are built), so a row can be any weighted sum (not only a mean) and include the [CLS]
    token. ``kept`` is then empty, ``slots`` (m,) gives the slot each row occupies (distinct; they set the record
    and, with ``positions="original"``, the position ids; with re-indexed positions the LLM sees the rows in row
    order at contiguous positions), and ``assign`` (n,) only records each patch's row for the record (-1: none).
    The method requests ``Signal("hidden_out", feature_layer)``; families without a token-wise projector refuse it.
    An image split into several budget parts (LLaVA-NeXT tiles) answers with one such decision per part, each over
    its part's own sequence (its encoder sequence's [CLS] at 0, the part's token p at ``1 + p``); ``row_kinds``
    (m,) long, optional, says what each row is (:data:`ENCODER_ROW_KINDS`: 0 the [CLS] token, 1 a patch as itself,
    2 a merged token), for a family that lays rows out by kind (LLaVA-NeXT's spatial layout, as VisionZip's
    reference restores dominant patches to their grid places and appends the rest). ``row_copies`` (rows (c,),
    tokens (c,)) long, optional: rows that are one of the image's LLM tokens unchanged (a weight-1 one-hot row on
    that token's column, as VisionZip's dominant patches), so the adapter takes the token the model already
    projected instead of projecting the row again (one image part only; parts of a tiled image project all rows).

    Position policy without ``slots`` (the adapter's, documented in docs/design.md): every new token takes a
    *dropped slot of its own image*: the lowest-index dropped token among its sources not taken by an earlier new
    token, else the lowest free dropped slot. Either way it sits at that slot's place in the sequence with that
    slot's position id (M-RoPE: that patch's (t, h, w)), so re-padding, positions and decode bookkeeping are
    those of a plain keep set.
    """

    kept: torch.Tensor
    assign: torch.Tensor
    weights: torch.Tensor | None = None
    features: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    encoder_rows: torch.Tensor | None = None
    row_kinds: torch.Tensor | None = None
    row_copies: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_new(self) -> int:
        if self.encoder_rows is not None:
            return int(self.encoder_rows.shape[0])
        if self.features is not None:
            return int(self.features.shape[0])
        # sync: once per decision, the number of new tokens (an output shape)
        return int(self.assign.max()) + 1 if self.assign.numel() and bool((self.assign >= 0).any()) else 0


#: query rows an LLM stage may ask attention from: the row's last prompt token, the instruction after its last
#: image (up to the last prompt token), or the query sample (its last image and the text after it)
QUERIES = ("last", "instruction", "sample")
#: where the rows come from: the layer just run (K-1, as it ran) or layer K's own q/k probed on the hidden states
#: entering K (its norm and projections run, its attention kernel does not)
SOURCES = ("previous", "probe")
#: the softmax runs over the whole causal row, or over the visual keys only (FlowCut's LLM cut)
DOMAINS = ("causal", "visual")


@dataclass(frozen=True)
class LLMRequest:
    """The decoder signals an LLM stage needs (the default: FastV's last-token row of layer K-1, head mean).

    ``queries`` / ``source`` / ``domain``: see :data:`QUERIES`, :data:`SOURCES`, :data:`DOMAINS`; rows of several
    query tokens are averaged. ``heads``: "mean" or "all" (a head axis). ``values``: also the layer's value states
    (True: head mean; "heads": per key/value head, (B, Hkv, n, d)). ``observe``: decoder layers whose
    ``self_attn`` and ``mlp`` inputs (after the norm) and outputs (before the residual) are recorded during the
    prefill (TransPrune's transitions). ``row_layers``: decoder layers whose rows (same queries, heads and domain)
    are also recorded *as they run* in the prefill, for a stage that compares layers (CATP's attention increase);
    a stage reads them as ``LLMSignals.rows_at[layer]``. ``keys``: also the post-RoPE key states of the same layer,
    per key/value head, (B, Hkv, n, d) (DART's pivots). ``final_norm``: also the hidden states entering the stage
    passed through the decoder's final norm (``LLMSignals.normed``; DART's ``last_layer_state``).
    ``per_query``: keep one row per query token instead of their mean: ``LLMSignals.attention`` is then (B, R, n)
    ((B, H, R, n) with ``heads="all"``), the R query slots in ``LLMSignals.query_slots`` (SparseVLM's raters are a
    data-dependent subset of the instruction tokens). ``embeddings``: also the decoder's input embeddings (the
    hidden states entering layer 0 at the prefill), over the current slots, in ``LLMSignals.embeddings``
    (SparseVLM chooses its raters from them).
    """

    queries: str = "last"
    source: str = "previous"
    heads: str = "mean"
    domain: str = "causal"
    values: bool | str = False
    observe: tuple[int, ...] = ()
    row_layers: tuple[int, ...] = ()
    per_query: bool = False
    embeddings: bool = False
    keys: bool = False
    final_norm: bool = False

    def __post_init__(self) -> None:
        if self.values not in (False, True, "heads"):
            raise ValueError(f"LLMRequest values must be False, True (head mean) or 'heads', got {self.values!r}")
        for name, allowed in (("queries", QUERIES), ("source", SOURCES), ("heads", HEADS), ("domain", DOMAINS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LLMRequest {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("keys", "final_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LLMRequest {name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "observe", tuple(int(x) for x in self.observe))
        object.__setattr__(self, "row_layers", tuple(int(x) for x in self.row_layers))


@dataclass
class Observed:
    """What one decoder module saw during the prefill, reduced per token: for its input ``x`` (B, n, D, after the
    norm) and output ``y`` (B, n, D, before the residual), ``input_norm`` = ||x||, ``output_norm`` = ||y|| and
    ``cos`` = cos(x, y), each (B, n) float32 (what a transition statistic such as TransPrune's TTV needs; the hook
    reduces at once and keeps no (B, n, D) state alive); ``positions`` (B, n): the prompt position of each slot
    when it ran, and ``valid`` (B, n) bool: the slots that held a real token then (not left padding, not a dead
    slot of a shorter row). :meth:`of` builds one from ``x`` and ``y``."""

    input_norm: torch.Tensor
    output_norm: torch.Tensor
    cos: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None = None

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor, positions: torch.Tensor,
           valid: torch.Tensor | None = None) -> Observed:
        """The per-token statistics of input ``x`` and output ``y`` (computed in float32)."""
        x, y = x.float(), y.float()
        return cls(x.norm(dim=-1), y.norm(dim=-1), torch.nn.functional.cosine_similarity(x, y, dim=-1),
                   positions, valid)


@dataclass
class LLMSignals:
    """Inputs of an LLM stage acting before decoder layer ``layer``.

    ``hidden`` (B, n, D): hidden states entering the layer. ``attention``: the requested rows over the current
    sequence, (B, n) or (B, H, n) with ``heads="all"`` (None without an :class:`LLMRequest`); ``values`` (B, n, d):
    head-mean value states of the same layer, when requested ((B, Hkv, n, d) with ``values="heads"``).
    ``visual[b][i]``: positions in the current sequence of the surviving visual tokens of image ``i`` of row ``b``
    (special tokens such as LLaVA-NeXT newlines are not listed: they are never scored); ``origin[b][i]``: the
    original index of each of them within its image.
    ``positions`` (B, n): the prompt position of every current slot; ``spans``: (B, n) bool masks over the current
    sequence, "instruction" and "sample" (see :data:`QUERIES`) and "context" (the real tokens before the
    sample: the demonstrations of a few-shot prompt); ``rows_at[layer]`` (B, n) or (B, H, n): the rows of a
    ``LLMRequest.row_layers`` layer as it ran, over the current slots (0 where that layer saw no token);
    ``observed[(layer, "attn" | "mlp")]``: the requested modules' per-token input/output statistics so far
    (:class:`Observed`). ``ctx``: the per-prefill context (``ctx.state`` carries a method's
    scores from stage to stage).
    """

    layer: int
    hidden: torch.Tensor
    attention: torch.Tensor | None
    visual: list[list[torch.Tensor]]
    origin: list[list[torch.Tensor]] = field(default_factory=list)
    ctx: PrefillContext | None = None
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    spans: dict[str, torch.Tensor] = field(default_factory=dict)
    observed: dict[tuple[int, str], Observed] = field(default_factory=dict)
    rows_at: dict[int, torch.Tensor] = field(default_factory=dict)
    #: (B,) current slot of each row's last prompt token (the "last" query)
    last: torch.Tensor | None = None
    #: set by the runtime when the stage's scores are wanted: what ``llm_scores`` returns is noted there
    score_sink: ScoreSink | None = None
    #: with ``LLMRequest(per_query=True)``: (B, R) current slot of each query row of ``attention``, -1 for the
    #: padding rows of a row with fewer queries
    query_slots: torch.Tensor | None = None
    #: with ``LLMRequest(embeddings=True)``: (B, n, D) the decoder's input embedding of every current slot (a slot
    #: holding a token recycled by an earlier stage still shows its original token's embedding)
    embeddings: torch.Tensor | None = None
    #: per row and image, (content tokens before any cut, the user's per-image budget): what the schedule was
    #: built from, for a method whose per-stage rule needs more than the stage's count (SparseVLM's split into
    #: kept and recycled tokens)
    budgets: list[list[tuple[int, int]]] = field(default_factory=list)
    #: (B, Hkv, n, d) post-RoPE key states of the layer the rows come from, with ``LLMRequest(keys=True)``
    keys: torch.Tensor | None = None
    #: (B, n, D) ``hidden`` through the decoder's final norm, with ``LLMRequest(final_norm=True)``
    normed: torch.Tensor | None = None
    #: (B, n) bool: current slots holding a real token (not left padding, not a dead slot)
    valid: torch.Tensor | None = None


def check_number(who: str, option: str, value: object, low: float, high: float, what: str) -> float:
    """``value`` as a float when it is a number in [low, high]; else a ValueError naming the option and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not low <= value <= high:
        raise ValueError(f"{who}: {option} must be a number in [{low}, {high}] ({what}), got {value!r}")
    return float(value)


@dataclass
class LLMDecision:
    """An LLM stage's answer for one image that also adds new tokens (SparseVLM's recycled tokens); a plain tensor
    of sorted kept indices is the answer without new tokens.

    ``kept``: sorted indices into ``LLMSignals.visual[b][i]`` kept as they are. ``new`` (m, D): the new tokens'
    hidden states (entering the stage's layer). ``sources[j]``: indices into ``visual[b][i]`` of the dropped tokens
    new token j absorbs. ``len(kept) + m`` is the stage's count. Placement (the adapter's): with "compact" positions
    and no special token left in the image, the new tokens follow the image's kept tokens in order (positions
    contiguous after them: SparseVLM's reference); otherwise each takes a dropped slot of its own image (the lowest
    free one among its sources, else the lowest free one) with that slot's position, as a vision stage's new token.
    """

    kept: torch.Tensor
    new: torch.Tensor
    sources: list[torch.Tensor]

    @property
    def n_new(self) -> int:
        return int(self.new.shape[0])


def topk_groups(scores: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """Sorted top-k indices for each score vector; vectors of equal length and k are batched in one call."""
    out: list[torch.Tensor | None] = [None] * len(scores)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (s, k) in enumerate(zip(scores, ks)):
        groups.setdefault((s.numel(), k), []).append(j)
    for (_, k), members in groups.items():
        idx = select_topk(torch.stack([scores[j] for j in members]), k)
        for row, j in enumerate(members):
            out[j] = idx[row]
    return out  # type: ignore[return-value]


@dataclass
class Pruner:
    """Base class of all methods. ``positions``: "compact" re-indexes kept tokens contiguously, "original"
    keeps each token's position, "compact_pre_llm" re-indexes after the pre-LLM stage only (see
    :data:`POSITIONS`); None picks the paper's default for the model family."""

    name: ClassVar[str] = "base"
    #: one-line description shown in docs and the CLI
    summary: ClassVar[str] = ""
    #: paper reference
    paper: ClassVar[str] = ""
    #: special tokens (LLaVA-NeXT's per-row ``image_newline``) are never scored and never counted in a budget, which
    #: counts content tokens; True keeps them all on top of it at every stage (FasterVLM, HiPrune), False drops them
    #: at the first stage (VisionZip, FlowCut)
    keep_newlines: ClassVar[bool] = True
    #: what ``keep`` means (see :data:`tokprune.schedule.MEANINGS`): the count after the last stage by default
    budget_meaning: ClassVar[str] = "final"
    #: whether each stage's budget is pooled over a prompt's images (counts may move between them; CATP)
    pooled_budget: ClassVar[bool] = False
    #: hyper-parameters ``tokprune tune`` may search (:mod:`tokprune.eval.tune`): each key is a scalar keyword option
    #: of ``tokprune.apply`` for this method, each value ``("float", low, high)``, ``("int", low, high)`` or
    #: ``("log", low, high)`` (a float searched on a log scale, ``low > 0``), bounds inclusive. Keep it small and
    #: model-independent; a point the method refuses on a model (its own validation) is an infeasible trial, and
    #: ``apply(config=...)`` refuses values outside these bounds. Empty: the method has nothing to tune.
    search_space: ClassVar[dict[str, tuple]] = {}
    #: optional budget hooks, declared here with their defaults (a method may make them dataclass fields):
    #: ``flops_ratio``: a target fraction of the unpruned LLM FLOPs, solved into a ``keep_ratio`` at ``apply``
    #: (:mod:`tokprune.budget_solver`); ``prune_ratio``: the fraction of image tokens *removed* (CATP's R), which
    #: excludes ``keep`` / ``keep_ratio``
    flops_ratio: ClassVar[float | None] = None
    prune_ratio: ClassVar[float | None] = None
    #: numeric options checked at construction from this one declaration: ``{option: (low, high, what)}``, bounds
    #: inclusive; a non-number or a value outside raises ``"<method>: <option> must be a number in [low, high]
    #: (what), got ..."``, a valid one becomes a float, None (an unset option) is left alone. A ``search_space``
    #: dimension of the same option must lie inside these bounds (checked by :func:`tokprune.tuned.search_space`).
    numbers: ClassVar[dict[str, tuple[float, float, str]]] = {}
    #: how a ``keep_ratio`` becomes an image's count (:meth:`tokprune.config.Budget.count`): "round" (nearest), or
    #: "floor" (the progressive references' ``int(N * r)``)
    ratio_rounding: ClassVar[str] = "round"

    positions: str | None = None
    #: the precision of attention scores: "float32" (default: logits, softmax and reductions in float32, the better
    #: ranking) or "model": logits in the model's dtype, probabilities and the reduced score rounded to it, as the
    #: references' eager fp16 / bf16 kernels do (near-ties at the cut then go their way). Same on fp32 models.
    score_dtype: str = "float32"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("vision_scores", "llm_scores"):
            fn = vars(cls).get(name)
            if fn is not None and not getattr(fn, "__tokprune_noting__", False):
                setattr(cls, name, _noting_scores(fn))

    def __post_init__(self) -> None:
        if self.positions is not None and self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS} or None, got {self.positions!r}")
        for option, (low, high, what) in self.numbers.items():
            if getattr(self, option) is not None:
                setattr(self, option, check_number(self.name, option, getattr(self, option), low, high, what))
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {SCORE_DTYPES} ('model' rounds attention scores to the "
                             f"model's dtype as the reference code does), got {self.score_dtype!r}")

    # ------------------------------------------------------------------ schedule
    def vision_request(self, info: ModelInfo) -> VisionRequest | None:
        """Signals of the vision stage, or None when the method has no vision stage."""
        return None

    def encoder_cut(self, info: ModelInfo) -> EncoderCut | None:
        """Encoder layers after which the method drops tokens inside the vision encoder, or None (the default)."""
        return None

    def cut_encoder(self, step: EncoderStep) -> list[torch.Tensor | None]:
        """Per encoder sequence of ``step``, sorted positions among its current non-prefix units to keep (None
        keeps all). Called after every layer of :meth:`encoder_cut`."""
        raise NotImplementedError(f"{type(self).__name__} declares an encoder cut but no cut_encoder")

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        """Decoder layers before which LLM stages drop tokens (0-indexed), in increasing order."""
        return ()

    def llm_request(self, info: ModelInfo) -> LLMRequest | None:
        """Decoder signals of the LLM stages (attention rows, values, observed modules), or None for hidden
        states only."""
        return None

    def llm_stage_request(self, info: ModelInfo, layer: int) -> LLMRequest | None:
        """Decoder signals of the LLM stage cutting before ``layer`` (one of :meth:`llm_layers`); each stage asks
        for its own, so stages with different signal sources can run in one prefill (a composition of two LLM
        methods). Default: :meth:`llm_request`, the same for every stage."""
        return self.llm_request(info)

    def check(self, info: ModelInfo) -> None:
        """Raise :class:`UnsupportedError` when the method cannot run on this model; called by ``apply``."""
        if self.positions in VISION_COMPACT and not info.supports_compact:
            raise UnsupportedError(
                f"positions={self.positions!r} is not defined for {info.family} (M-RoPE keeps each token's 3-D "
                "position); use positions='original'"
            )
        if not info.encoder_cuts and self.encoder_cut(info) is not None:
            hint = "" if _HINTING else f"; methods that run here: {', '.join(_runs_on(info))}"
            raise UnsupportedError(
                f"{self.name} drops tokens inside the vision encoder, but {info.family} blends the encoder's tokens "
                f"before the LLM sees them (a bilinear resize of large crop grids), so no encoder cut maps to LLM "
                f"tokens{hint}"
            )
        layers = self.llm_layers(info)
        for k in layers:
            if not 1 <= k < info.llm_layers:
                raise ValueError(
                    f"{self.name}: LLM layer {k} is out of range; the LLM has {info.llm_layers} layers, "
                    f"pass a layer in [1, {info.llm_layers - 1}]"
                )
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"{self.name}: LLM stage layers must be strictly increasing, got {layers}")

    def resolved_positions(self, info: ModelInfo) -> str:
        if self.positions is not None:
            return self.positions
        return self.default_positions(info)

    def default_keep_ratio(self) -> float | None:
        """The kept fraction used when ``apply`` gets no budget at all (None: a budget is required); e.g. a
        progressive method's explicit ratios give their last fraction."""
        return None

    def default_positions(self, info: ModelInfo) -> str:
        """Paper default: pre-LLM methods on LLaVA re-index contiguously; M-RoPE models keep original positions."""
        return "compact" if info.supports_compact else "original"

    # ------------------------------------------------------------------ vision stage
    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        """Importance of every visual token of every image (higher = keep)."""
        raise NotImplementedError(f"{type(self).__name__} has no vision scoring")

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor | VisionDecision]:
        """Per image, sorted kept indices (``ks[i]`` of them) or a :class:`VisionDecision` adding new tokens (kept
        plus new = ``ks[i]``); by default the top-k of :meth:`vision_scores`."""
        return topk_groups(self.vision_scores(signals), ks)

    def vision_stage(self, signals: VisionSignals, ks: list[int], scores: bool = False
                     ) -> tuple[list[torch.Tensor | VisionDecision], list[torch.Tensor] | None]:
        """Run the vision stage: :meth:`select_vision`'s answer and, with ``scores``, the per-part scores it
        selected by (what its ``vision_scores`` returned; None when it selects without scoring). The runtime
        calls this; a method overrides :meth:`select_vision` / :meth:`vision_scores`."""
        if not scores:
            return self.select_vision(signals, ks), None
        sink = ScoreSink()
        signals = dataclasses.replace(signals, score_sink=sink)
        return self.select_vision(signals, ks), sink.first

    # ------------------------------------------------------------------ budgets
    def stage_budget(self, stage: int, n_visual: int, keep: int) -> int:
        """Tokens of an image (``n_visual`` originally) to keep after stage ``stage``, counting every stage of the
        method in order (its vision stage, if any, is stage 0); ``keep`` is the user's per-image budget.
        Progressive methods override this with their schedule."""
        return keep

    def schedule(self, info: ModelInfo, n_visual: int, keep: int, keep_ratio: float | None = None) -> Schedule:
        """The per-stage budgets of an image of ``n_visual`` tokens at budget ``keep``: a pure function of the
        method, run by the adapters (which check every returned count against it) and counted by
        ``tokprune.flops``. Keep-all (``keep == n_visual``) must keep everything at every stage. ``keep_ratio``:
        the ratio ``keep`` was counted from, when the budget was a ratio (progressive methods derive every stage
        from it, as their references do; others ignore it)."""
        kinds = ([("vision", None)] if self.vision_request(info) is not None else []) + [
            ("llm", layer) for layer in self.llm_layers(info)]
        stages, current = [], n_visual
        for s, (kind, layer) in enumerate(kinds):
            current = min(current, self.stage_budget(s, n_visual, keep))
            stages.append(StageBudget(kind, layer, current))
        sched = Schedule(n_visual, tuple(stages), self.budget_meaning, self.pooled_budget)
        if keep >= n_visual and any(st.keep != n_visual for st in stages):
            raise RuntimeError(f"{self.name}: keep-all must keep all {n_visual} tokens at every stage")
        return sched

    def row_budgets(self, info: ModelInfo, stage: int, n_visual: list[int], keep: list[int]) -> list[int]:
        """With ``pooled_budget``: per image of one prompt row (``n_visual`` content tokens and user budget ``keep``
        each, prompt order), the tokens it keeps after schedule stage ``stage``; only the row's sum is binding (the
        method may move tokens between the row's images). Default: each image's own schedule."""
        return [self.schedule(info, n, k).stages[stage].keep for n, k in zip(n_visual, keep)]

    # ------------------------------------------------------------------ LLM stages

    def llm_scores(self, signals: LLMSignals) -> torch.Tensor:
        """Importance (B, n) over the current sequence; only visual positions are read."""
        raise NotImplementedError(f"{type(self).__name__} has no LLM scoring")

    def select_llm(self, signals: LLMSignals, ks: list[list[int]]) -> list[list[torch.Tensor | LLMDecision]]:
        """Per row and image, sorted indices into ``signals.visual[b][i]`` to keep, or an :class:`LLMDecision`
        adding new tokens (kept + new = the budget; fewer where the stage's budget is ``at_most``)."""
        scores = self.llm_scores(signals)
        flat = [scores[b, pos] for b, row in enumerate(signals.visual) for pos in row]
        sel = iter(topk_groups(flat, [k for row in ks for k in row]))
        return [[next(sel) for _ in row] for row in signals.visual]

    def llm_stage(self, signals: LLMSignals, ks: list[list[int]], scores: bool = False
                  ) -> tuple[list[list[torch.Tensor]], torch.Tensor | None]:
        """Run one LLM stage: :meth:`select_llm`'s answer and, with ``scores``, the (B, n) scores it selected by
        (what its ``llm_scores`` returned; None when it selects without scoring)."""
        if not scores:
            return self.select_llm(signals, ks), None
        sink = ScoreSink()
        signals = dataclasses.replace(signals, score_sink=sink)
        return self.select_llm(signals, ks), sink.first

    # ------------------------------------------------------------------ description
    def options(self) -> dict[str, object]:
        """The method's hyper-parameters as a dict (for records and reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
