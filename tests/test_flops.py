"""tokprune.flops: analytic counts against torch's FlopCounterMode, the papers' LLaVA-1.5-7B numbers, records."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokprune
import tokprune.api
import tokprune.signals
from tokprune import configs, flops
from tokprune.flops import TokenSchedule, estimate, for_budget, from_record
from tokprune.patches.compat import cache_kwargs, output_cache

# small images keep each forward at a few ms; the Qwen2.5 one gives windows of unequal size (8x10 patches)
TINY = {
    "tiny-llava": None,
    "tiny-llava-next": (40, 56),  # non-square: unpadding removes rows
    "tiny-llava-onevision": (84, 112),  # a 4x4 crop grid that anyres_max_2 shrinks to 2x2
    "tiny-qwen2-vl": (84, 112),
    "tiny-qwen2.5-vl": (112, 140),
    "tiny-qwen3-vl": (96, 64),
}


def _tiny(name: str, attn: str = "eager"):
    return configs.build_model(name, "cpu", attn_implementation=attn)


def _layer_flops(counter: FlopCounterMode, n_layers: int) -> list[int]:
    """FLOPs FlopCounterMode attributed to each decoder layer ``...layers.<l>`` of the module it watched."""
    out = [0] * n_layers
    for name, ops in counter.get_flop_counts().items():
        head, _, idx = name.rpartition(".")
        if head.endswith("layers") and idx.isdigit() and name.count(".") == 2:
            out[int(idx)] += sum(ops.values())
    return out


# ------------------------------------------------------------------ whole model == FlopCounterMode (unpruned)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_full_convention_equals_flop_counter(name: str, attn: str) -> None:
    # batch 2 x 2 images: vision per image, projector, every LLM layer and the lm_head on all tokens. With sdpa the
    # CPU kernel is counted through the formula flops.counted_flops registers; eager needs nothing.
    config = configs.load(name)
    model = _tiny(name, attn)
    inputs = configs.example_inputs(config, n_text=10, n_images=2, batch=2, image_size=TINY[name])
    counted = flops.counted_flops(model, **inputs)
    sched = TokenSchedule.unpruned(config, n_text=10, n_images=2, image_size=TINY[name])
    assert inputs["input_ids"].shape[1] == sched.tokens[0]
    report = estimate(config, [sched, sched])
    assert report.vision > 0 and report.projector > 0 and report.lm_head > 0
    assert report.total == counted


def test_cpu_sdpa_formula_counts_attention() -> None:
    # torch has no formula for the CPU SDPA kernel and would count 0 here (toolchain.md 4)
    from torch.utils import flop_counter

    flops.register_cpu_sdpa_formula()
    flops.register_cpu_sdpa_formula()  # idempotent
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry
    q = torch.randn(1, 2, 5, 8)
    assert flops.counted_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q) == 2 * (2 * 2 * 5 * 5 * 8)


def test_decode_steps_equal_flop_counter() -> None:
    config = configs.load("tiny-llava")
    model = _tiny("tiny-llava")
    inputs = configs.example_inputs(config, n_text=8)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache, step_flops = output_cache(out), []
    for _ in range(3):
        nxt = torch.tensor([[7]])
        step_flops.append(flops.counted_flops(model, input_ids=nxt, **cache_kwargs(cache), use_cache=True))
    report = estimate(config, TokenSchedule.unpruned(config, n_text=8), decode_steps=3)
    assert report.decode_per_token == step_flops[0]
    assert report.decode == sum(step_flops)
    assert step_flops[0] < step_flops[1] < step_flops[2]  # the KV grows by one token per step


def test_logits_to_keep_counts_lm_head_rows() -> None:
    config = configs.load("tiny-llava")
    model = _tiny("tiny-llava")
    inputs = configs.example_inputs(config, n_text=8)
    counted = flops.counted_flops(model, **inputs, logits_to_keep=1)
    assert estimate(config, TokenSchedule.unpruned(config, n_text=8), logits_to_keep=1).total == counted


# ------------------------------------------------------------------ pruned schedules == FlopCounterMode


@pytest.mark.parametrize("layer,keep", [(0, 4), (2, 5), (3, 1)])
def test_pruned_llm_equals_language_model_on_fewer_tokens(layer: int, keep: int) -> None:
    # An in-LLM drop at layer K means layers < K run on the full prompt and layers >= K on the shorter one; so
    # per-layer counts of the language model run on each length must add up to the analytic prefill.
    config = configs.load("tiny-llava")
    lm = _tiny("tiny-llava").model.language_model
    n_text, d = 10, config.text_config.hidden_size
    sched = TokenSchedule.unpruned(config, n_text=n_text).pruned(layer, keep)
    n_layers = config.text_config.num_hidden_layers
    per_len = {}
    for n in {sched.tokens[0], sched.tokens[-1]}:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            lm(inputs_embeds=torch.randn(1, n, d))
        per_len[n] = _layer_flops(counter, n_layers)
    measured = [per_len[n][i] for i, n in enumerate(sched.tokens)]
    report = estimate(config, sched)
    assert list(report.llm_layers) == measured
    assert sched.visual == (16,) * layer + (keep,) * (n_layers - layer)


def test_vision_cut_equals_clip_layers_on_fewer_tokens() -> None:
    # FlowCut-style drop inside the ViT: CLIP layers >= 2 see kept + CLS tokens, and so does the projector.
    config = configs.load("tiny-llava")
    model = _tiny("tiny-llava")
    layers = model.model.vision_tower.encoder.layers
    work = flops.image_work(config).cut(2, 5)
    assert work.layer_tokens == (17, 17, 6) and work.projector_tokens == 5
    d = config.vision_config.hidden_size
    measured = 0
    for layer, n in zip(layers, work.layer_tokens):
        measured += flops.counted_flops(layer, torch.randn(1, n, d), None)
    conv = model.model.vision_tower.embeddings.patch_embedding
    measured += flops.counted_flops(conv, torch.randn(1, 3, 56, 56))
    arch = flops.describe(config)
    assert flops.vision_flops(arch.vision, work) == measured
    proj = flops.counted_flops(model.model.multi_modal_projector, torch.randn(1, 5, d))
    assert flops.projector_flops(arch.projector, work.projector_tokens) == proj


@pytest.mark.parametrize("method", ["random", "fastv"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_apply_forward_equals_analytic_pruned_schedule(name: str, method: str) -> None:
    # The core's pruned forward, counted by torch, against the schedule built from its own record. The only
    # extra FLOPs are the method's scoring: random scores nothing; fastv computes one attention row of the last
    # prompt token against the whole prompt in LLM layer K-1 (from q and k, never a full map): 2 * L * q_dim.
    import tokprune

    config = configs.load(name)
    model = _tiny(name, "sdpa")
    inputs = configs.example_inputs(config, n_text=10, batch=2, image_size=TINY[name])
    tokprune.apply(model, method=method, keep=4)
    try:
        counted = flops.counted_flops(model, **inputs)
        record = tokprune.last_record(model)
    finally:
        tokprune.remove(model)
    schedules = from_record(config, record, **flops.geometry_from_inputs(inputs))
    unpruned = TokenSchedule.unpruned(config, n_text=10, image_size=TINY[name])
    assert all(s.images == unpruned.images and s.n_text == 10 for s in schedules)
    assert all(s.visual[-1] < unpruned.visual[-1] for s in schedules)
    if method == "fastv":
        assert all(s.visual[:2] == unpruned.visual[:2] for s in schedules)
    llm = flops.describe(config).llm
    scoring = 2 * 2 * inputs["input_ids"].shape[1] * llm.q_dim if method == "fastv" else 0
    assert counted - estimate(config, schedules).total == scoring


@pytest.mark.parametrize("method", ["cls", "random", "fastv"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_method_schedule_estimate_equals_the_forward_record(name: str, method: str) -> None:
    # What `tokprune flops --method M` prints (the method's schedule for the image size) must be what the pruned
    # forward runs: on LLaVA-NeXT the row newlines a method keeps ride on top of `keep` in both.
    if method == "cls" and ("qwen" in name or "onevision" in name):
        pytest.skip("cls needs a [CLS] token")
    config = configs.load(name)
    model = _tiny(name, "sdpa")
    inputs = configs.example_inputs(config, n_text=10, batch=1, image_size=TINY[name])
    tokprune.apply(model, method=method, keep=4)
    try:
        with torch.no_grad():
            model(**inputs)
        record = tokprune.last_record(model)
    finally:
        tokprune.remove(model)
    sched = tokprune.api.schedule(config, method, keep=4, image_size=TINY[name])
    n_text = inputs["input_ids"].shape[1] - sched.n_visual
    assert estimate(config, from_record(config, record, **flops.geometry_from_inputs(inputs))) == for_budget(
        config, schedule=sched, n_text=n_text, image_size=TINY[name])
    if name in ("tiny-llava-next", "tiny-llava-onevision") and method != "fastv":
        assert sched.special > 0 and sched.plan()[-1][1] == 4 + sched.special


def test_apply_cls_scoring_is_one_cls_row() -> None:
    # cls: the [CLS] query against the 17 CLIP tokens at the feature layer, per image (2 * 17 * 32 FLOPs)
    import tokprune

    config = configs.load("tiny-llava")
    model = _tiny("tiny-llava", "sdpa")
    inputs = configs.example_inputs(config, n_text=10, batch=2)
    with tokprune.pruned(model, "cls", keep=4):
        counted = flops.counted_flops(model, **inputs)
        record = tokprune.last_record(model)
    schedules = from_record(config, record)
    assert schedules == [TokenSchedule.unpruned(config, n_text=10).pruned(0, 4)] * 2
    assert counted - estimate(config, schedules).total == 2 * (2 * 17 * 32)
    # last_record(model).flops: the same count, with the unpruned forward (counted by torch) as its baseline
    assert record.flops.total == estimate(config, schedules).total
    assert record.flops.baseline.total == flops.counted_flops(model, **inputs)


# ------------------------------------------------------------------ real configs on the meta device


def test_llava_7b_meta_counts_equal_analytic() -> None:
    # The full VLM forward calls .item() (not possible on meta), so the parts are run separately: the 7B
    # LLaMA decoder + lm_head on 576 + 64 tokens, and CLIP-L/336 + projector on one image.
    config = configs.load("llava-1.5-7b")
    model = configs.build_model(config, "meta", torch.bfloat16)
    sched = TokenSchedule.unpruned(config, n_text=64)
    report = estimate(config, sched)
    hidden = torch.randn(1, 640, 4096, device="meta", dtype=torch.bfloat16)
    llm = flops.counted_flops(lambda: model.lm_head(model.model.language_model(inputs_embeds=hidden)[0]))
    assert llm == report.llm_prefill + report.lm_head
    pixels = torch.randn(1, 3, 336, 336, device="meta", dtype=torch.bfloat16)
    vis = flops.counted_flops(model.model.vision_tower, pixels)
    proj = flops.counted_flops(model.model.multi_modal_projector,
                               torch.randn(1, 576, 1024, device="meta", dtype=torch.bfloat16))
    assert (vis, proj) == (report.vision, report.projector)
    # the decoder alone on the 576 visual tokens, halved, is the papers' 3ndm count
    only_visual = flops.counted_flops(model.model.language_model, inputs_embeds=hidden[:, :576])
    assert only_visual == 2 * estimate(config, sched, "3ndm").total


# ------------------------------------------------------------------ the papers' LLaVA-1.5-7B numbers (methods 12.2)


def _t(report: flops.FlopsReport, digits: int = 2) -> float:
    return round(report.tflops, digits)


_META: dict[str, object] = {}


def _method(name: str, method: str, keep: int | None = None, keep_ratio: float | None = None,
            layer: int | None = None, **kw) -> flops.FlopsReport:
    """FLOPs of a registered method: its schedule (asked from the method, on a meta-device model built once per
    config) counted by ``tokprune.flops.for_budget``."""
    if name not in _META:
        _META[name] = configs.build_model(configs.load(name), device="meta")
    model = _META[name]
    opts = {"layer": layer} if layer is not None else {}
    n = flops.image_work(model.config, image_size=kw.get("image_size")).llm_tokens
    sched = tokprune.api.schedule(model, method, keep=keep, keep_ratio=keep_ratio, n_visual=n, **opts)
    return for_budget(model.config, sched, **kw)


PDROP = [(8, 0.5), (16, 0.25), (24, 0.125)]  # PyramidDrop's preset: after layers 8/16/24 keep 1/2, 1/4, 1/8
TRANSPRUNE = [(7, 504), (9, 360), (12, 72)]  # TransPrune-High: 576 -> 504 -> 360 -> 72


def test_llava_7b_paper_numbers() -> None:
    cfg = configs.load("llava-1.5-7b")
    base = TokenSchedule.unpruned(cfg)
    assert _t(estimate(cfg, base, "3ndm")) == 3.82
    assert _t(estimate(cfg, base, "2ndm")) == 2.99
    llm = flops.describe(cfg).llm
    assert round(flops.paper_layer_macs(llm, 576, 3) / 1e9, 1) == 119.3
    assert round(flops.paper_layer_macs(llm, 640, 3) / 1e9, 1) == 132.9  # 576 + 64 text tokens
    for keep, g, t3, t2 in [(192, 39.2, 1.25, 0.98), (128, 26.0, 0.83, 0.65), (64, 13.0, 0.42, 0.32)]:
        assert round(flops.paper_layer_macs(llm, keep, 3) / 1e9, 1) == g
        assert _t(_method("llava-1.5-7b", "cls", keep=keep, convention="3ndm")) == t3
        assert _t(_method("llava-1.5-7b", "cls", keep=keep, convention="2ndm")) == t2
    fastv = [_t(_method("llava-1.5-7b", "fastv", keep=k, convention="3ndm")) for k in (192, 128, 64)]
    assert fastv == [1.41, 1.02, 0.63]
    assert _t(_method("llava-1.5-7b", "fastv", keep_ratio=0.5, convention="3ndm")) == 2.01
    assert _t(_method("llava-1.5-7b", "fastv", keep_ratio=0.25, convention="3ndm")) == 1.12
    assert _t(for_budget(cfg, stages=PDROP, convention="3ndm")) == 1.78
    tp = for_budget(cfg, stages=TRANSPRUNE, convention="3ndm")
    assert _t(tp) == 1.56 and round(tp.ratio() * 100, 1) == 40.8
    assert round(_method("llava-1.5-7b", "cls", keep=192, convention="3ndm").ratio() * 100, 1) == 32.8


def test_transprune_schedule_is_576_504_360_72() -> None:
    cfg = configs.load("llava-1.5-7b")
    r = for_budget(cfg, stages=TRANSPRUNE, convention="2ndm")
    llm = flops.describe(cfg).llm
    expected = [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    assert list(r.llm_layers) == [flops.paper_layer_macs(llm, n, 2) for n in expected]


# ------------------------------------------------------------------ for_budget / method schedules / report


def test_for_budget_fastv_layer_and_ratio_helpers() -> None:
    cfg = configs.load("llava-1.5-7b")
    r = _method("llava-1.5-7b", "fastv", keep=144, n_text=64)
    assert r.baseline is not None and r.convention == "full"
    llm = flops.describe(cfg).llm
    assert r.llm_layers[1] == flops.llm_layer_flops(llm, 640) and r.llm_layers[2] == flops.llm_layer_flops(llm, 208)
    assert r.vision == r.baseline.vision  # pruning in the LLM saves nothing in the encoder
    assert 0 < r.ratio() < 1 and r.reduction() == pytest.approx(1 - r.ratio())
    assert r.ratio(part="llm_prefill") < r.ratio()
    # the same budget at a later layer costs more; keep_ratio 0.25 of 576 == keep 144; a method-free cut at 2
    assert _method("llava-1.5-7b", "fastv", keep=144, layer=8).total > r.total
    assert _method("llava-1.5-7b", "fastv", keep_ratio=0.25).total == r.total
    assert for_budget(cfg, keep=144, layer=2).total == r.total
    # two images: keep is per image
    two = _method("llava-1.5-7b", "cls", keep=64, n_images=2)
    assert two.llm_layers[0] == flops.llm_layer_flops(llm, 64 * 2 + 64)
    assert r.as_dict()["ratio"] == pytest.approx(r.ratio())


def test_for_budget_errors() -> None:
    cfg = configs.load("llava-1.5-7b")
    with pytest.raises(ValueError, match="unknown method"):
        _method("llava-1.5-7b", "no-such-method", keep=4)
    with pytest.raises(ValueError, match="exactly one"):
        for_budget(cfg)
    with pytest.raises(ValueError, match="larger than"):
        _method("llava-1.5-7b", "cls", keep=1000)
    with pytest.raises(ValueError, match="exactly one"):
        for_budget(cfg, keep=4, stages=[(0, 4)])
    with pytest.raises(TypeError, match="tokprune.configs.load"):
        for_budget("llava-1.5-7b", keep=4)  # flops loads nothing itself
    with pytest.raises(ValueError, match="convention"):
        estimate(cfg, TokenSchedule.unpruned(cfg), "4ndm")
    with pytest.raises(ValueError, match="layers"):
        estimate(cfg, TokenSchedule((576,) * 3))
    with pytest.raises(ValueError, match="compare"):
        for_budget(cfg, keep=4).ratio(estimate(cfg, TokenSchedule.unpruned(cfg), "3ndm"))


def test_method_schedules_come_from_the_methods() -> None:
    """Every registered method has a schedule, on every shipped family where it runs; flops counts it as is."""
    model = configs.build_model(configs.load("llava-1.5-7b"), device="meta")
    fastv = tokprune.api.schedule(model, "fastv", keep=144)
    assert fastv.plan() == [(2, 144)] and fastv.meaning == "final"
    assert tokprune.api.schedule(model, "fastv", keep=144, layer=5).plan() == [(5, 144)]
    assert tokprune.api.schedule(model, "cls", keep=64).plan() == [(0, 64)]
    assert tokprune.api.schedule(model, "random", keep_ratio=1.0).plan() == [(0, 576)]  # keep-all: the identity
    qwen = configs.build_model(configs.load("qwen2-vl-7b"), device="meta")
    with pytest.raises(tokprune.UnsupportedError, match="no \\[CLS\\] token"):
        tokprune.api.schedule(qwen, "cls", keep=64)  # the core refuses cls on Qwen, and so does the estimate
    r = for_budget(qwen.config, tokprune.api.schedule(qwen, "fastv", keep=64))
    assert "before LLM layer 2" in r.notes[0]


def test_qwen_image_geometry() -> None:
    q25 = configs.load("qwen2.5-vl-7b")
    w = flops.image_work(q25, image_size=(448, 644))  # -> 32 x 46 patches, 16 x 23 tokens
    assert (w.grid, w.llm_tokens) == ((1, 32, 46), 368)
    assert sum(w.windows) == 32 * 46 and max(w.windows) == 64 and len(w.windows) == 4 * 6
    assert flops.image_work(q25, llm_tokens=368).grid == (1, 32, 46)  # 368 = 16 x 23, the near-square pair
    q3 = configs.load("qwen3-vl-8b")
    assert flops.image_work(q3).llm_tokens == 576 and flops.image_work(q3).patches == 48 * 48
    nxt = configs.load("llava-next-7b")
    assert (flops.image_work(nxt).sequences, flops.image_work(nxt).llm_tokens) == (5, 576 + 48 * 49)


def test_gqa_and_head_dim_enter_the_count() -> None:
    # Qwen2-7B: 28 query heads, 4 KV heads of 128; a per-layer count without GQA would be larger
    llm = flops.describe(configs.load("qwen2-vl-7b")).llm
    assert (llm.q_dim, llm.kv_dim, llm.ffn_mats) == (3584, 512, 3)
    n = 100
    expected = 2 * n * 3584 * (2 * 3584 + 2 * 512) + 4 * n * n * 3584 + 6 * n * 3584 * 18944
    assert flops.llm_layer_flops(llm, n) == expected
    q3 = flops.describe(configs.load("qwen3-vl-8b"))
    assert (q3.llm.q_dim, q3.llm.kv_dim, q3.projector.copies) == (4096, 1024, 4)


# ------------------------------------------------------------------ from_record


def _idx(*counts: int) -> list[torch.Tensor]:
    return [torch.arange(c) for c in counts]


def _record(n_visual, seq_len, stages, merged=None, **extra) -> SimpleNamespace:
    stages = [SimpleNamespace(kind=k, layer=layer, kept=kept) for k, layer, kept in stages]
    return SimpleNamespace(n_visual=n_visual, seq_len=seq_len, stages=stages, merged=merged, **extra)


def test_from_record_llm_and_vision_stages() -> None:
    cfg = configs.load("llava-1.5-7b")
    # sample 0: two images, pre-LLM to 64 + 32, then an LLM stage at 8 to 16 + 16; sample 1: one image, 100 kept
    rec = _record(
        n_visual=[[576, 576], [576]], seq_len=[1152 + 40, 576 + 20],
        stages=[("vision", None, [_idx(64, 32), _idx(100)]), ("llm", 8, [_idx(16, 16), _idx(50)])],
    )
    s0, s1 = from_record(cfg, rec)
    assert s0.n_text == 40 and s1.n_text == 20
    assert s0.visual == (96,) * 8 + (32,) * 24 and s1.visual == (100,) * 8 + (50,) * 24
    assert s0.n_images == 2 and s0.images[0] == flops.image_work(cfg)  # pruning after the ViT: full encoder
    both = estimate(cfg, [s0, s1])
    assert both.total == estimate(cfg, s0).total + estimate(cfg, s1).total
    assert from_record(cfg, rec, n_text=7)[1].n_text == 7
    # no stage at all: the unpruned schedule
    plain = from_record(cfg, _record([[576]], [640], []))[0]
    assert plain == TokenSchedule.unpruned(cfg, n_text=64)


def test_from_record_matches_for_budget() -> None:
    cfg = configs.load("llava-1.5-7b")
    rec = _record([[576]], [640], [("llm", 2, [_idx(144)])])
    expected = _method("llava-1.5-7b", "fastv", keep=144, n_text=64)
    assert estimate(cfg, from_record(cfg, rec)) == expected
    # record_report: what last_record(model).flops shows, with the unpruned prompt as baseline
    report = flops.record_report(cfg, rec)
    assert report == expected and report.baseline == expected.baseline and report.ratio() == expected.ratio()


def test_from_record_vit_stage_and_merged_tokens() -> None:
    cfg = configs.load("llava-1.5-7b")
    # 128 kept + 10 new tokens, each in a dropped slot of the image: the stage's kept indices hold all 138
    merged = [[SimpleNamespace(sources=[torch.tensor([0, 1])] * 10, slots=torch.arange(128, 138))]]
    rec = _record([[576]], [640], [("vision", 11, [_idx(138)])], merged=merged)
    (s,) = from_record(cfg, rec)
    assert s.visual == (138,) * 32  # new tokens counted once, as LLM tokens
    assert s.images[0].layer_tokens == (577,) * 11 + (139,) * 13
    assert estimate(cfg, s).vision < estimate(cfg, TokenSchedule.unpruned(cfg)).vision


def test_from_record_qwen_and_next_geometry() -> None:
    q25 = configs.load("qwen2.5-vl-7b")
    rec = _record([[368]], [400], [("vision", None, [_idx(92)])])
    (guess,) = from_record(q25, rec)
    assert guess.notes and "near-square" in guess.notes[0]
    (exact,) = from_record(q25, rec, image_grid_thw=[[(1, 32, 46)]])
    assert not exact.notes and exact.images[0].grid == (1, 32, 46) and exact.visual == (92,) * 28
    nxt = configs.load("llava-next-7b")
    n = flops.image_work(nxt, image_size=(500, 700)).llm_tokens
    rec = _record([[n]], [n + 30], [("llm", 2, [_idx(200)])])
    (no_size,) = from_record(nxt, rec)
    assert no_size.images == () and "image sizes unknown" in no_size.notes[0]
    assert estimate(nxt, no_size).vision == 0
    (sized,) = from_record(nxt, rec, image_sizes=[[(500, 700)]])
    assert sized.images[0].llm_tokens == n and estimate(nxt, sized).vision > 0


# ------------------------------------------------------------------ shipped configs + CLI


# dims from the public config.json files (see tokprune/configs/*.json "_source")
# (LLM layers, d, m, q_dim, kv_dim, ViT layers, ViT width, parameters in billions of the built model; the model
# cards print 7.06, 13.4, 7.06, 8.03, 8.29, 8.29, 3.75 and 8.77 B)
EXPECTED = {
    "llava-1.5-7b": (32, 4096, 11008, 4096, 4096, 24, 1024, 7.06),
    "llava-1.5-13b": (40, 5120, 13824, 5120, 5120, 24, 1024, 13.35),
    "llava-next-7b": (32, 4096, 11008, 4096, 4096, 24, 1024, 7.06),
    "llava-onevision-7b": (28, 3584, 18944, 3584, 512, 26, 1152, 8.03),
    "qwen2-vl-7b": (28, 3584, 18944, 3584, 512, 32, 1280, 8.29),
    "qwen2.5-vl-7b": (28, 3584, 18944, 3584, 512, 32, 1280, 8.29),
    "qwen2.5-vl-3b": (36, 2048, 11008, 2048, 256, 32, 1280, 3.75),
    "qwen3-vl-8b": (36, 4096, 12288, 4096, 1024, 27, 1152, 8.77),
}


@pytest.mark.parametrize("name", configs.names())
def test_every_shipped_config_loads_and_builds_on_meta(name: str) -> None:
    model = configs.build_model(name, "meta", torch.bfloat16)
    assert all(p.device.type == "meta" for p in model.parameters())
    arch = flops.describe(configs.load(name))
    if name in EXPECTED:
        llm, vit = arch.llm, arch.vision
        params = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
        dims = (llm.layers, llm.hidden, llm.ffn, llm.q_dim, llm.kv_dim, vit.layers, vit.hidden, params)
        assert dims == EXPECTED[name]
    # the analytic LLM is the built model's: its linear weights have exactly the shapes the count uses
    n_linear = sum(m.weight.numel() for m in model.model.language_model.layers[0].modules()
                   if isinstance(m, torch.nn.Linear))
    assert flops.llm_layer_flops(arch.llm, 1, 0) == 2 * n_linear


def test_load_from_path_and_errors(tmp_path) -> None:
    import json

    d = configs.config_dict("tiny-llava")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    assert configs.load(tmp_path / "m").text_config.hidden_size == 64
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert configs.load(str(tmp_path / "c.json")).model_type == "llava"
    with pytest.raises(FileNotFoundError, match="shipped"):
        configs.load("no-such-model")


def _cli(argv: list[str]) -> int:
    from tokprune.cli import main

    return main(argv)


def test_cli_flops(capsys, tmp_path) -> None:
    assert _cli(["flops", "--config", "llava-1.5-7b", "--method", "fastv", "--keep-ratio", "0.5",
                 "--convention", "3ndm"]) == 0
    out = capsys.readouterr().out
    assert "2.007" in out and "3.817" in out and "52.6%" in out and "before LLM layer 2" in out
    js = tmp_path / "f.json"
    assert _cli(["flops", "--config", "qwen2.5-vl-7b", "--method", "random", "--keep", "64", "--json", str(js)]) == 0
    import json

    data = json.loads(js.read_text())
    assert data["pruned"]["convention"] == "full" and 0 < data["pruned"]["ratio"] < 1
    assert _cli(["flops", "--config", "llava-1.5-7b", "--method", "bogus", "--keep", "4"]) == 2
    assert "unknown method" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["pdrop", "transprune"])
def test_probe_work_is_counted_exactly(method: str) -> None:
    # PyramidDrop / TransPrune score each cut with a probe of the next layer's q/k: the record says how many query
    # rows each probe computed, and the analytic count then equals what torch counts in the pruned forward (the
    # probe runs the key projection on every token and the query projection on its rows only, no value / output
    # projection, no kernel)
    config = configs.load("tiny-llava")
    model = _tiny("tiny-llava", "sdpa")
    inputs = configs.example_inputs(config, n_text=10, batch=2)
    with tokprune.pruned(model, method, keep=4):
        counted = flops.counted_flops(model, **inputs)
        record = tokprune.last_record(model)
    probed = [st for st in record.stages if st.kind == "llm"]
    assert probed and all(st.probe_rows is not None for st in probed)
    schedules = from_record(config, record)
    assert all(len(s.probes) == len(probed) for s in schedules)
    without = [flops.TokenSchedule(s.visual, s.n_text, s.images, s.notes) for s in schedules]
    assert estimate(config, schedules).total > estimate(config, without).total
    assert counted == estimate(config, schedules).total


@pytest.mark.parametrize("name", sorted(TINY))
def test_received_attention_reads_are_counted_exactly(name: str) -> None:
    # HiPrune reads the received attention of two ViT layers: with SDPA no probabilities exist, so its tap
    # recomputes each layer's q k^T over every query row. The record names those layers, and the analytic count
    # (read_flops: half the layer's attention FLOPs, windowed blocks within their windows) then equals what torch
    # counts in the pruned forward, on every family (Qwen2.5-VL: a windowed and a full-attention block), on the
    # softmax path. The log-sum-exp path (CPU SDPA calls without a mask) extends q and k by one column that carries
    # -lse into the product: torch counts exactly 2 n^2 more per head there (read / head_dim).
    config = configs.load(name)
    model = _tiny(name, "sdpa")
    inputs = configs.example_inputs(config, n_text=10, batch=2, image_size=TINY[name])
    with tokprune.pruned(model, "hiprune", keep=4):
        counted_lse = flops.counted_flops(model, **inputs)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tokprune.signals, "_lse_call", lambda *a: False)  # every read takes the softmax path
            counted = flops.counted_flops(model, **inputs)
        record = tokprune.last_record(model)
    layers = sorted(set(tokprune.api.make_pruner("hiprune", {}).layers(tokprune.api.model_info(model))))
    assert record.encoder_reads == layers
    schedules = from_record(config, record, **flops.geometry_from_inputs(inputs))
    assert all(w.reads == tuple(layers) for s in schedules for w in s.images)
    arch = flops.describe(config)
    without = [dataclasses.replace(s, images=tuple(dataclasses.replace(w, reads=()) for w in s.images))
               for s in schedules]
    reads = sum(flops.read_flops(arch.vision, w, e) for s in schedules for w in s.images for e in w.reads)
    assert reads > 0 and estimate(config, schedules).total == estimate(config, without).total + reads
    assert counted == estimate(config, schedules).total
    vc = config.vision_config
    head_dim = arch.vision.hidden // (getattr(vc, "num_attention_heads", None) or vc.num_heads)
    assert reads % head_dim == 0 and counted_lse == counted + reads // head_dim
    if name == "tiny-qwen2.5-vl":  # one windowed block: its read is half its windowed attention term
        (w,) = schedules[0].images
        assert 2 in arch.vision.windowed and 2 in w.reads and len(w.windows) > 1
        d, n = arch.vision.hidden, w.layer_tokens[2]
        dense = 8 * n * d * d + 2 * n * d * arch.vision.ffn * arch.vision.ffn_mats
        assert 2 * flops.read_flops(arch.vision, w, 2) == flops.vit_layer_flops(arch.vision, w, 2) - dense * w.sequences
