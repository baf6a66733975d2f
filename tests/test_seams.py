"""The seams a method builds on, exercised by minimal test-only pruners on every family (tiny random models).

Each pruner here is the smallest method that needs one seam; references come from ``tests/oracles.py`` (no tokprune
code): eager attention maps of the encoder, the unpatched model fed the kept tokens, M-RoPE positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from test_families import (
    GEN,
    SIZES,
    TOL,
    ZOO,
    assert_same_generation,
    inputs,
    kept_tokens_reference,
    n_visual_newlines,
    positions,
    prompt,
)

import oracles
import tokprune
from tokprune.pruners.base import (
    LLMRequest,
    ModelInfo,
    Pruner,
    Signal,
    VisionDecision,
    VisionRequest,
    VisionSignals,
)
from tokprune.signals import attention_rows, received_attention, varlen_chunks
from tokprune.testing import families, make_image

ALL = families()


@dataclass
class ReceivedTopK(Pruner):
    """Test-only: keep the tokens that receive the most attention (HiPrune's / VFlowOpt's signal) in one layer."""

    layer: int = 0

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest((Signal("received", self.layer),))

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        return signals[Signal("received", self.layer)]


@dataclass
class EverySignal(Pruner):
    """Test-only: requests every signal kind of one layer and keeps the first tokens; stores what it saw."""

    layer: int = 0
    seen: dict | None = None

    def request(self, info: ModelInfo) -> tuple[Signal, ...]:
        hubs = lambda rec: rec.topk(2, dim=-1).indices  # noqa: E731 (VFlowOpt-style hubs: most received)
        kinds = [Signal("received", self.layer), Signal("received", self.layer, heads="all"),
                 Signal("rows", self.layer, queries=hubs), Signal("keys", self.layer),
                 Signal("values", self.layer, heads="all"), Signal("hidden_in", self.layer),
                 Signal("hidden_out", self.layer), Signal("pixels")]
        return tuple(kinds + ([Signal("cls", self.layer)] if info.has_cls else []))

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest(self.request(info))

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor]:
        self.seen = {"signals": signals}
        return [torch.arange(k) for k in ks]


@dataclass
class MergeDropped(Pruner):
    """Test-only: keep the k-1 tokens of largest feature norm and merge every dropped token into one mean token."""

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest()

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[VisionDecision]:
        out = []
        for f, k in zip(signals.features, ks):
            kept = oracles.topk_sorted(f.float().norm(dim=-1), k - 1)
            assign = torch.zeros(f.shape[0], dtype=torch.long)
            assign[kept] = -1
            out.append(VisionDecision(kept, assign))
        return out


def _global(family: str) -> dict:
    """LLaVA-NeXT, LLaVA-OneVision: one budget over the whole image (so a score's top-k is the image's top-k)."""
    return {"tile_budget": "global"} if family in ("llava_next", "llava_onevision") else {}


def _vision_layers(family: str) -> list[int]:
    return [0, 1] if family == "qwen2_5_vl" else [1]  # Qwen2.5-VL: a windowed and a full-attention block


@pytest.mark.parametrize("family, layer", [(f, layer) for f in ALL for layer in _vision_layers(f)])
def test_received_attention_top_k_on_every_family(family, layer):
    """Kept = top-k of the received attention read from eager maps; logits = the model fed the kept tokens."""
    fam = ZOO[family]
    x = inputs(fam)
    k = 6
    with torch.no_grad():
        tokprune.apply(fam.model, ReceivedTopK(layer=layer), keep=k, **_global(family))
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        ref = kept_tokens_reference(fam, x, rec.kept[0])
        scores = oracles.received(fam.model, x, layer)
    for kept, s in zip(rec.kept[0], scores):
        newline = torch.isnan(s)
        content = (~newline).nonzero()[:, 0]
        top = content[oracles.topk_sorted(s[content], k)]
        assert torch.equal(kept, torch.cat([top, newline.nonzero()[:, 0]]).sort().values)
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("family", ALL)
def test_every_signal_kind_is_aligned_with_the_visual_tokens(family):
    fam = ZOO[family]
    x = inputs(fam)
    pruner = EverySignal(layer=1)
    with torch.no_grad(), tokprune.pruned(fam.model, pruner, keep=3, **_global(family)):
        fam.model(**x)
        sig = pruner.seen["signals"]
        maps = oracles.vision_attention(fam.model, x, 1)
    n = [int(f.shape[0]) for f in sig.features]
    heads = maps[0].shape[1]
    for s, per_image in sig.values.items():
        assert [int(v.shape[0]) for v in per_image] == n, s
        assert all(torch.isfinite(v).all() for v in per_image), s  # parts hold content tokens only
    rec = sig[Signal("received", 1, heads="all")]
    assert rec[0].shape[1:] == (heads,)
    ref = oracles.per_token(fam.model, x, [a.mean(-2).permute(0, 2, 1) for a in maps])
    for r, o in zip(rec, ref):  # the pruner sees each image's content tokens (newline slots of the oracle: NaN)
        assert torch.allclose(r, o[~torch.isnan(o).any(-1)], atol=1e-6)
    hidden = sig[Signal("hidden_out", 1)]
    if family in ("llava", "llava_next"):  # the feature layer's output through the projector is what the LLM
        # receives (LLaVA-OneVision: layer 1 is not its feature layer, see tests/test_onevision.py)
        proj = [fam.model.model.multi_modal_projector(h) for h in hidden]
        assert all(torch.allclose(p, f, atol=1e-5) for p, f in zip(proj, sig.features))


@pytest.mark.parametrize("family", ALL)
def test_raw_pixels_per_token_are_the_unnormalised_patches(family):
    fam = ZOO[family]
    x = inputs(fam)
    raw = fam.proc(images=[oracles_image(j) for j in range(2)], text=x_text(fam), return_tensors="pt",
                   do_normalize=False)
    pruner = EverySignal(layer=1)  # a full-attention block everywhere (hub rows are refused on windowed ones)
    with torch.no_grad(), tokprune.pruned(fam.model, pruner, keep=2, **_global(family)):
        fam.model(**x)
    got = pruner.seen["signals"][Signal("pixels")]
    if fam.qwen:  # (patches, C * T * p * p) rows; per token the mean of its merge unit's 4 patches
        c = 3
        rows = raw["pixel_values"].reshape(1, -1, c, raw["pixel_values"].shape[-1] // c)
        ref = oracles.per_token(fam.model, raw, [rows], inside=False)
        got = [g.unflatten(-1, (4, -1)).mean(-2) for g in got]
    else:
        p = fam.model.config.vision_config.patch_size
        px = oracles.clip_pixels(fam.model, raw)
        patches = px.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(1, 2).flatten(-2)
        cls = [patches[:, :1] * float("nan")] if oracles.has_cls(fam.model) else []  # SigLIP: no [CLS] slot
        ref = oracles.per_token(fam.model, raw, [torch.cat([*cls, patches], 1)])
    for g, r in zip(got, ref):
        r = r[~torch.isnan(r).flatten(1).any(-1)]
        assert g.shape == r.shape and torch.allclose(g, r, atol=1e-5)


def oracles_image(j: int):
    return make_image(*SIZES[j], seed=j)


def x_text(fam) -> str:
    return prompt(fam, 2)


@pytest.mark.parametrize("family", ALL)
def test_token_grid_coordinates_and_newline_mask(family):
    fam = ZOO[family]
    x = inputs(fam)
    pruner = EverySignal(layer=1)  # a full-attention block everywhere (hub rows are refused on windowed ones)
    with torch.no_grad(), tokprune.pruned(fam.model, pruner, keep=2, **_global(family)):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    sig = pruner.seen["signals"]
    if fam.qwen:  # (row, col) of a token = its M-RoPE (h, w) position minus the image's first one
        pos = positions(fam, x)[:, 0]
        img = (x["input_ids"][0] == fam.image_id).nonzero()[:, 0]
        for run, grid in zip(torch.split(img, rec.n_visual[0]), sig.grid):
            hw = pos[2:, run].T
            assert torch.equal(grid[:, :2], hw - hw.min(0).values)
        assert not any(s.any() for s in rec.special[0])
    else:
        anyres = family in ("llava_next", "llava_onevision")
        newlines = [n_visual_newlines(fam, x, j) for j in range(2)] if anyres else [0, 0]
        assert [int(s.sum()) for s in rec.special[0]] == newlines
        for grid in sig.grid:  # content tokens only; each (row, col, part) unique
            assert len({tuple(r) for r in grid.tolist()}) == grid.shape[0]
            base = grid[grid[:, 2] == 0]
            side = int(base.shape[0] ** 0.5)
            assert base[:, 0].max() == side - 1 and base[:, 1].max() == side - 1


def test_received_attention_in_chunks_equals_the_dense_column_mean():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 37, 8), torch.randn(2, 2, 37, 8)
    mask = torch.ones(2, 1, 37, 37, dtype=torch.bool)
    mask[1, :, :, 30:] = False  # keys hidden from every query
    kk = k.repeat_interleave(2, 1)
    dense = ((q @ kk.transpose(-1, -2)) * 0.3).masked_fill(~mask, float("-inf")).softmax(-1).mean(2)
    assert torch.allclose(received_attention(q, k, mask, 0.3, chunk=5), dense, atol=1e-6)
    assert torch.allclose(received_attention(q, k, None, 0.3, chunk=64)[0], dense[0], atol=1e-6)


def test_unmasked_received_attention_with_reused_chunk_buffers_is_the_column_mean():
    """The unmasked path writes every chunk into two buffers allocated once (the last chunk shorter: a prefix of
    them): the same values as a fresh softmax per chunk (bitwise) and as the dense column mean."""
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 41, 8) * 2, torch.randn(2, 4, 41, 8)
    dense = ((q @ k.transpose(-1, -2)) * 0.3).softmax(-1).mean(2)
    fresh = sum(((q[:, :, i:i + 6] @ k.transpose(-1, -2)) * 0.3).softmax(-1).sum(2) for i in range(0, 41, 6)) / 41
    got = received_attention(q, k, None, 0.3, chunk=6)  # 6 full chunks, then one of 5 queries
    assert torch.allclose(got, dense, atol=1e-6)
    assert torch.allclose(got, fresh, rtol=1e-6, atol=1e-7)
    assert torch.equal(received_attention(q, k, None, 0.3, chunk=6), got)  # the buffers leak nothing across calls


def test_varlen_call_is_split_per_sequence():
    """A FlashAttention varlen call (two images packed) gives the same rows as two separate calls."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    cu = torch.tensor([0, 4, 10])
    chunks = varlen_chunks(q, k, v, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu})
    assert [c[0].shape[2] for c in chunks] == [4, 6]
    rows = torch.zeros(1, 1, dtype=torch.long)
    second = attention_rows(chunks[1][0], chunks[1][1], None, 0.5, rows, causal=False)
    assert torch.allclose(second, (q[:, :, 4:5] @ k[:, :, 4:].transpose(-1, -2) * 0.5).softmax(-1), atol=1e-6)
    assert len(varlen_chunks(q, k, v, {})) == 1


def test_an_unregistered_pruner_instance_and_its_options():
    fam = ZOO["llava"]
    with pytest.raises(TypeError, match="to the ReceivedTopK instance itself"):
        tokprune.apply(fam.model, ReceivedTopK(), keep=2, layer=1)
    with pytest.raises(ValueError, match="encoder has 3 layers"):
        tokprune.apply(fam.model, ReceivedTopK(layer=7), keep=2)
    assert not tokprune.is_patched(fam.model)


def test_one_pruner_instance_shared_by_two_models_keeps_no_state():
    """Per-prefill state lives in the context handed to each stage, so one instance serves two models at once."""
    from tokprune.pruners.cls_attention import CLSAttention

    pruner = CLSAttention()
    before = dict(vars(pruner))
    llava, nxt = ZOO["llava"], ZOO["llava_next"]
    with torch.no_grad(), tokprune.pruned(llava.model, pruner, keep=3), tokprune.pruned(nxt.model, pruner, keep=3):
        for fam in (llava, nxt, llava):
            fam.model(**inputs(fam))
            assert tokprune.last_record(fam.model).n_kept[0][0] >= 3
    assert vars(pruner) == before


@pytest.mark.parametrize("family", ALL)
def test_merge_every_dropped_token_into_one_mean_token(family):
    """The new token takes the first dropped slot (its position id too); logits = the unpatched model fed the kept
    tokens with that slot's features replaced by the mean of the dropped ones (every DeepStack level alike)."""
    fam = ZOO[family]
    x = inputs(fam)
    k = 4
    with torch.no_grad():
        tokprune.apply(fam.model, MergeDropped(), keep=k, **_global(family))
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        feats = [f.float() for f in oracles.features_of(fam.model, x)]
        expected = []
        for f, sp in zip(feats, rec.special[0]):
            content = (~sp).nonzero()[:, 0]
            kept = content[oracles.topk_sorted(f[content].norm(dim=-1), k - 1)]
            dropped = content[~torch.isin(content, kept)]
            expected.append((kept, dropped))
        slots = [torch.cat([kp, dr[:1], sp.nonzero()[:, 0]]).sort().values
                 for (kp, dr), sp in zip(expected, rec.special[0])]

        def replace(j, full, fed):
            kept, dropped = expected[j]
            fed = fed.clone()
            fed[(slots[j] == dropped[0]).nonzero()[0, 0]] = full[dropped].float().mean(0).to(full.dtype)
            return fed

        ref = kept_tokens_reference(fam, x, slots, replace=replace)
        ref_gen = kept_tokens_reference(fam, x, slots, generate=True, replace=replace)
    assert [torch.equal(a, b) for a, b in zip(rec.kept[0], slots)] == [True, True]
    for m, (_, dropped) in zip(rec.merged[0], expected):
        assert torch.equal(m.sources[0], dropped) and m.slots.tolist() == [int(dropped[0])]
    assert rec.n_kept[0] == [k + int(sp.sum()) for sp in rec.special[0]]
    assert (out - ref).abs().max() <= TOL
    assert_same_generation(gen, ref_gen)
    from tokprune.flops import from_record

    assert set(from_record(fam.model.config, rec)[0].visual) == {sum(rec.n_kept[0])}  # new tokens counted once


def test_merge_decisions_are_checked():
    fam = ZOO["llava"]
    x = inputs(fam)

    @dataclass
    class Bad(Pruner):
        mode: str = "count"

        def vision_request(self, info):
            return VisionRequest()

        def select_vision(self, signals, ks):
            n = signals.features[0].shape[0]
            assign = torch.zeros(n, dtype=torch.long)
            if self.mode == "count":  # k kept plus one new token: one too many
                kept = torch.arange(ks[0])
            else:  # a kept token also merged
                kept = torch.arange(ks[0] - 1)
            assign[kept[1:] if self.mode == "kept" else kept] = -1
            return [VisionDecision(kept, assign)] * len(ks)

    for mode, msg in [("count", "where the budget is 2"), ("kept", "cannot also be merged")]:
        with tokprune.pruned(fam.model, Bad(mode=mode), keep=3), pytest.raises(RuntimeError, match=msg):
            fam.model(**x)


def test_next_per_tile_merges_within_each_tile_and_deepstack_refuses_explicit_features():
    fam = ZOO["llava_next"]
    x = inputs(fam, sizes=[(112, 84), (84, 112)])  # 5 tiles per image, none unpadded away
    with torch.no_grad(), tokprune.pruned(fam.model, MergeDropped(), keep=10):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    for m, kept in zip(rec.merged[0], rec.kept[0]):
        assert len(m.sources) == 5 and torch.isin(m.slots, kept).all()  # one new token per tile, in its slots

    @dataclass
    class Explicit(Pruner):
        def vision_request(self, info):
            return VisionRequest()

        def select_vision(self, signals, ks):
            return [VisionDecision(torch.arange(k - 1), torch.tensor([-1] * (k - 1) + [0] * (f.shape[0] - k + 1)),
                                   features=f[:1] * 0) for f, k in zip(signals.features, ks)]

    q3 = ZOO["qwen3_vl"]
    with tokprune.pruned(q3.model, Explicit(), keep=3), pytest.raises(tokprune.UnsupportedError, match="DeepStack"):
        q3.model(**inputs(q3))


# ---------------------------------------------------------------------------------------------- LLM requests
@dataclass
class ThreeCuts(Pruner):
    """Test-only: three LLM cuts (before layers 1, 2, 3), each scored by the *next* layer's q/k probed on the
    hidden states entering it (PyramidDrop / TransPrune), last prompt token, head mean; budgets shrink evenly."""

    source: str = "probe"

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return (1, 2, 3)

    def llm_request(self, info: ModelInfo) -> LLMRequest:
        return LLMRequest(queries="last", source=self.source)

    def default_positions(self, info: ModelInfo) -> str:
        return "original"

    def stage_budget(self, stage: int, n_visual: int, keep: int) -> int:
        return keep + (n_visual - keep) * (2 - stage) // 3

    def llm_scores(self, signals):
        return signals.attention


@dataclass
class InstructionRows(Pruner):
    """Test-only: one cut before layer 2 scored by the mean row of the instruction tokens after the last image."""

    domain: str = "causal"

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return (2,)

    def llm_request(self, info: ModelInfo) -> LLMRequest:
        return LLMRequest(queries="instruction", domain=self.domain, values=True, observe=(0, 1))

    def default_positions(self, info: ModelInfo) -> str:
        return "original"

    def llm_scores(self, signals):
        assert signals.values is not None and signals.values.shape[1] == signals.hidden.shape[1]
        assert set(signals.observed) == {(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")}
        return signals.attention


def _cuts(fam, x, rec) -> list[tuple[int, torch.Tensor]]:
    """(layer, keep mask over the prompt) of every LLM stage of a one-row record."""
    from test_families import keep_mask

    return [(st.layer, keep_mask(fam, x["input_ids"], rec.n_visual[0], st.kept[0])[None]) for st in rec.stages]


def _expected(score: torch.Tensor, runs, survivors, specials, ks) -> list[torch.Tensor]:
    """Per image: the top-k of ``score`` (over its prompt run) among the surviving content tokens, newlines on top."""
    out = []
    for run, alive, sp, k in zip(runs, survivors, specials, ks):
        content = alive[~sp[alive]]
        top = content[oracles.topk_sorted(score[run][content], k)]
        out.append(torch.cat([top, alive[sp[alive]]]).sort().values)
    return out


@pytest.mark.parametrize("family", ALL)
def test_three_cuts_with_next_layer_probing_equal_the_multi_cut_oracle(family):
    from test_families import image_runs

    fam = ZOO[family]
    x = inputs(fam)
    k = 3
    with torch.no_grad():
        tokprune.apply(fam.model, ThreeCuts(), keep=k)
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        cuts = _cuts(fam, x, rec)
        with oracles.CutMask(fam.model, cuts):
            ref = fam.model(**x).logits
            ref_gen = fam.model.generate(**x, **GEN)
    assert [(st.kind, st.layer) for st in rec.stages] == [("llm", 1), ("llm", 2), ("llm", 3)]
    runs = image_runs(fam, x["input_ids"], rec.n_visual[0])
    survivors = [torch.arange(n) for n in rec.n_visual[0]]
    for s, st in enumerate(rec.stages):
        n_content = [int((~sp).sum()) for sp in rec.special[0]]
        ks = [ThreeCuts().stage_budget(s, n, k) for n in n_content]
        att = oracles.eager_rows_under_cuts(fam.model, x, cuts[:s], st.layer)[0, :, -1].mean(0)
        assert all(torch.equal(a, b) for a, b in zip(st.kept[0], _expected(att, runs, survivors, rec.special[0], ks)))
        survivors = st.kept[0]
    keep = cuts[-1][1][0]
    assert (out[0] - ref[0, keep]).abs().max() <= TOL
    assert_same_generation(gen, ref_gen)


@pytest.mark.parametrize("family, domain", [(f, "causal") for f in ALL] + [("qwen2_vl", "visual"),
                                                                            ("llava_next", "visual")])
def test_instruction_span_rows_select_like_eager_attention(family, domain):
    from test_families import image_runs

    fam = ZOO[family]
    x = inputs(fam)
    k = 4
    with torch.no_grad():
        tokprune.apply(fam.model, InstructionRows(domain=domain), keep=k)
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        cuts = _cuts(fam, x, rec)
        with oracles.CutMask(fam.model, cuts):
            ref = fam.model(**x).logits
        probs = oracles.eager_rows_under_cuts(fam.model, x, [], 1)[0]  # (H, N, N), layer K-1 = 1
    ids = x["input_ids"][0]
    image = ids == fam.image_id
    last_visual = int(image.nonzero().max())
    instruction = torch.arange(ids.shape[0]) > last_visual  # after the last image, to the last prompt token
    rows = probs[:, instruction]
    if domain == "visual":
        rows = rows * image / (rows * image).sum(-1, keepdim=True)
    score = rows.mean(1).mean(0)
    runs = image_runs(fam, x["input_ids"], rec.n_visual[0])
    expected = _expected(score, runs, [torch.arange(n) for n in rec.n_visual[0]], rec.special[0], [k, k])
    assert all(torch.equal(a, b) for a, b in zip(rec.kept[0], expected))
    assert (out[0] - ref[0, cuts[0][1][0]]).abs().max() <= TOL


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_three_cuts_in_a_padded_batch_match_single_runs(family):
    from test_families import prompt as make_prompt

    fam = ZOO[family]
    images = [make_image(w, h, seed=s) for s, (w, h) in enumerate([(112, 84), (56, 84), (84, 112)])]
    texts = [make_prompt(fam, 2, "compare the first and second picture ?"), make_prompt(fam, 1, "what ?")]
    batch = fam.proc(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad(), tokprune.pruned(fam.model, ThreeCuts(), keep_ratio=0.3):
        gen = fam.model.generate(**batch, **GEN)
        singles = [fam.model.generate(**fam.proc(images=ims, text=t, return_tensors="pt"), **GEN)
                   for t, ims in zip(texts, (images[:2], images[2:]))]
    for b, g in enumerate(singles):
        assert torch.equal(gen.sequences[b, -8:], g.sequences[0, -8:])
        assert max((la[b] - lb[0]).abs().max().item() for la, lb in zip(gen.logits, g.logits)) <= TOL


def test_llm_requests_are_validated():
    with pytest.raises(ValueError, match="queries must be one of"):
        LLMRequest(queries="first")
    with pytest.raises(ValueError, match="source must be one of"):
        LLMRequest(source="next")


@dataclass
class VisionThenLLM(Pruner):
    """Test-only: a two-stage schedule, half the surplus dropped before the LLM (largest feature norm) and the rest
    before LLM layer 2 (FastV's row), as VisionZip -> TransPrune stack."""

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest()

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        return [f.float().norm(dim=-1) for f in signals.features]

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return (2,)

    def llm_request(self, info: ModelInfo) -> LLMRequest:
        return LLMRequest()

    def default_positions(self, info: ModelInfo) -> str:
        return "original"

    def stage_budget(self, stage: int, n_visual: int, keep: int) -> int:
        return keep + (n_visual - keep) // 2 if stage == 0 else keep

    def llm_scores(self, signals):
        return signals.attention


@pytest.mark.parametrize("family", ALL)
def test_a_vision_and_llm_schedule_runs_its_budgets_and_equals_its_reference(family):
    from test_families import schedule_reference

    fam = ZOO[family]
    x = inputs(fam)
    k = 3
    with torch.no_grad():
        tokprune.apply(fam.model, VisionThenLLM(), keep=k)
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        ref, final = schedule_reference(fam, x, rec)
    content = [int((~sp).sum()) for sp in rec.special[0]]
    newlines = [int(sp.sum()) for sp in rec.special[0]]
    assert [st.kind for st in rec.stages] == ["vision", "llm"]
    assert [[int(k_.numel()) for k_ in st.kept[0]] for st in rec.stages] == [
        [k + (n - k) // 2 + nl for n, nl in zip(content, newlines)], [k + nl for nl in newlines]]
    assert (out[0] - ref[0, final]).abs().max() <= TOL


def test_a_stage_returning_another_count_than_its_budget_raises():
    fam = ZOO["qwen2_vl"]

    @dataclass
    class Greedy(ThreeCuts):
        def select_llm(self, signals, ks):
            return [[torch.arange(k + 1) for k in row] for row in ks]  # one more than the budget

    with tokprune.pruned(fam.model, Greedy(), keep=2), pytest.raises(RuntimeError, match="where the budget is"):
        fam.model(**inputs(fam))


@dataclass
class PooledShift(Pruner):
    """Test-only: a budget pooled over a prompt's images (CATP): the first image of a row takes one token of the
    last image's share (largest feature norm within each image)."""

    pooled_budget = True
    extra: int = 0  # tokens returned on top of the pooled budget (0: a valid answer)

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest()

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor]:
        rows: dict[int, list[int]] = {}
        for j, (b, _) in enumerate(signals.owners):
            rows.setdefault(b, []).append(j)
        ks = list(ks)
        for members in rows.values():
            if len(members) > 1:
                ks[members[0]] += 1 + self.extra
                ks[members[-1]] -= 1
        return [oracles.topk_sorted(f.float().norm(dim=-1), k) for f, k in zip(signals.features, ks)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_a_pooled_budget_moves_tokens_between_a_prompts_images(family):
    from test_families import schedule_reference

    fam = ZOO[family]
    x = inputs(fam)
    k = 4
    with torch.no_grad():
        tokprune.apply(fam.model, PooledShift(positions="original"), keep=k, **_global(family))
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        ref, final = schedule_reference(fam, x, rec)
    newlines = [int(sp.sum()) for sp in rec.special[0]]
    assert rec.n_kept == [[k + 1 + newlines[0], k - 1 + newlines[1]]]
    assert (out[0] - ref[0, final]).abs().max() <= TOL
    with tokprune.pruned(fam.model, PooledShift(extra=1), keep=k, **_global(family)), pytest.raises(
            RuntimeError, match="for row 0 where its budget is 8"):
        fam.model(**x)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_three_cuts_in_both_position_modes_equal_the_layer_loop(positions):
    """LLaVA-1.5, two images: three probed cuts against a layer-by-layer loop that re-indexes the survivors at every
    cut ("compact") or masks the dropped keys ("original")."""
    from test_families import keep_mask

    fam = ZOO["llava"]
    x = inputs(fam)
    with torch.no_grad():
        tokprune.apply(fam.model, ThreeCuts(positions=positions), keep=3)
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        ids = x["input_ids"]
        cuts = [(st.layer, keep_mask(fam, ids, rec.n_visual[0], st.kept[0])) for st in rec.stages]
        emb = oracles.embed(fam.model, ids, oracles.features(fam.model, x["pixel_values"]))
        ref = oracles.cuts_loop(fam.model, emb, cuts, compact=positions == "compact")
    assert len(rec.stages) == 3 and out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL
