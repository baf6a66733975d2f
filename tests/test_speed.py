"""The speed machinery of issue #16 on tiny configs: depth-reduced proxies, the speed-up study, profiles, the host-sync
counter, the scoring-memory check and the one-command CPU/GPU scripts. Times are checked to exist, never compared."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokprune
from tokprune import configs, flops
from tokprune.cli import main
from tokprune.eval import bench, speed, syncs
from tokprune.eval.profile import profile_prefill, scoring_memory
from tokprune.eval.proxy import depth_of, reduce_depth
from tokprune.patches.sequence import kept_slots, left_repad

ROOT = Path(__file__).resolve().parents[1]
TINY = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"]


def _vision_blocks(model: torch.nn.Module) -> int:
    base = model.model
    if hasattr(base, "visual"):
        return len(base.visual.blocks)
    return len(base.vision_tower.vision_model.encoder.layers if hasattr(base.vision_tower, "vision_model")
               else base.vision_tower.encoder.layers)


# ------------------------------------------------------------------ proxy


@pytest.mark.parametrize("name", TINY)
def test_reduce_depth_builds_fewer_layers_and_runs(name):
    full = configs.load(name)
    before = full.to_dict()
    cfg, depth = reduce_depth(full, llm_layers=3, vision_layers=2)
    assert full.to_dict() == before  # the input config is untouched
    model = configs.build_model(cfg, "cpu")
    assert len(model.model.language_model.layers) == 3 and _vision_blocks(model) == 2
    assert depth.llm == (3, 4) and depth.vision[0] == 2 and depth.is_proxy
    assert depth_of(cfg).llm == (3, 3)
    with torch.inference_mode():
        model(**configs.example_inputs(cfg, n_text=10))
    # the analytic count follows the reduced config: 3 of 4 identical LLM layers
    full_llm = flops.estimate(full, flops.TokenSchedule.unpruned(full, n_text=10)).llm_layers
    red_llm = flops.estimate(cfg, flops.TokenSchedule.unpruned(cfg, n_text=10)).llm_layers
    assert list(red_llm) == list(full_llm[:3])


def test_reduce_depth_cuts_per_block_lists_and_refuses_bad_depths():
    cfg, depth = reduce_depth(configs.load("qwen2.5-vl-7b"), 4, 8)
    assert cfg.vision_config.fullatt_block_indexes == [7] and cfg.vision_config.depth == 8
    assert len(cfg.text_config.layer_types) == 4 and cfg.text_config.num_hidden_layers == 4
    assert depth.label() == "depth-reduced proxy: LLM 4 of 28 layers, vision 8 of 32 layers"
    assert "full-attention ViT blocks [7]" in depth.notes[0]
    # the real ViT ends on a full-attention block, so the proxy's last block is one (VFlowOpt reads it)
    cfg4, depth4 = reduce_depth(configs.load("qwen2.5-vl-7b"), 4, 4)
    assert cfg4.vision_config.fullatt_block_indexes == [3] and "blocks [3] (real: [7, 15, 23, 31]" in depth4.notes[0]
    assert flops.describe(cfg4).vision.windowed == frozenset({0, 1, 2})
    assert reduce_depth(configs.load("qwen2.5-vl-7b"), 4, 32)[0].vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    assert reduce_depth(configs.load("qwen3-vl-8b"), None, 10)[0].vision_config.deepstack_visual_indexes == [8]
    assert not reduce_depth(configs.load("llava-1.5-7b"))[1].is_proxy
    for bad in (0, 33, 2.5, True):
        with pytest.raises(ValueError, match="llm_layers"):
            reduce_depth(configs.load("llava-1.5-7b"), llm_layers=bad)
    with pytest.raises(ValueError, match="vision_layers"):
        reduce_depth(configs.load("llava-1.5-7b"), vision_layers=25)


def test_bench_cli_proxy_says_so_and_scales_flops(tmp_path, capsys):
    out = tmp_path / "proxy.json"
    args = ["bench", "--config", "tiny-llava", "--llm-layers", "3", "--vision-layers", "2", "--methods", "cls,fastv",
            "--keep", "4", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--new-tokens", "2", "--n-text", "10",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert "depth-reduced proxy: LLM 3 of 4 layers, vision 2 of 3 layers" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["meta"]["depth"]["llm_layers"] == [3, 4] and data["meta"]["depth"]["proxy"]
    reduced, _ = reduce_depth(configs.load("tiny-llava"), 3, 2)
    base = flops.estimate(reduced, flops.TokenSchedule.unpruned(reduced, n_text=10), logits_to_keep=1).tflops
    full = configs.load("tiny-llava")
    assert data["results"][0]["tflops"] == pytest.approx(base)
    assert base < flops.estimate(full, flops.TokenSchedule.unpruned(full, n_text=10), logits_to_keep=1).tflops
    assert main(args[:3] + ["--llm-layers", "9"] + args[5:]) == 2  # more layers than the model has


# ------------------------------------------------------------------ speed study and profiles


@pytest.fixture(scope="module")
def proxy():
    full = configs.load("tiny-llava")
    cfg, depth = reduce_depth(full, 3, None)
    return configs.build_model(cfg, "cpu"), full, depth


def test_speed_run_measures_every_part(proxy, tmp_path):
    model, full, depth = proxy
    cases = bench.grid(["cls", "fastv", "bogus"], keeps=[4])
    report = speed.run(model, cases, bench.Prompt(n_text=10), min_repeats=1, max_repeats=2, warmup=0,
                       full_config=full, depth=depth, progress=False, meta={"model": "tiny-llava"})
    base, cls, fastv, bogus = report.rows
    assert not tokprune.is_patched(model)
    assert (cls.kind, fastv.kind) == ("vision", "llm") and "unknown method" in bogus.error
    for r in (base, cls, fastv):
        assert r.prefill_ms > 0 and r.encoder_ms > 0 and len(r.runs_ms) == 2
    for r in (cls, fastv):
        assert r.scoring_ms > 0 and r.select_ms > 0 and r.overhead_ms == r.scoring_ms + r.select_ms
        assert r.bound == pytest.approx(base.tflops / r.tflops) and r.of_bound == pytest.approx(r.speedup / r.bound)
    assert base.scoring_ms is None and base.bound == 1.0
    # encoder ratios: measured against the unpruned row; no tokens dropped inside the encoder -> bound 1
    assert cls.encoder_speedup == pytest.approx(base.encoder_ms / cls.encoder_ms) and cls.encoder_bound == 1.0
    assert (cls.overhead_goal, fastv.overhead_goal) == (0.01, 0.03)
    # the real-depth bound: the same pruning on the 4-layer model
    assert fastv.full_depth_bound > fastv.bound and cls.full_depth_bound > cls.bound
    # the overhead's share of the real-depth prefill: this prefill scaled by the case's real / proxy FLOPs
    geometry = flops.geometry_from_inputs(configs.example_inputs(model.config, n_text=10))
    for r in (cls, fastv):
        rec = _record_of(model, r)
        real = flops.record_report(full, rec, logits_to_keep=1, **geometry).total
        proxy_total = flops.record_report(model.config, rec, logits_to_keep=1, **geometry).total
        assert r.real_depth_scale == pytest.approx(real / proxy_total) and r.real_depth_scale > 1.0
        assert r.real_depth_share == pytest.approx(r.overhead_ms / (r.prefill_ms * real / proxy_total))
    md = report.to_markdown()
    assert "depth-reduced proxy: LLM 3 of 4 layers" in md and "| cls keep=4 | vision | 4 |" in md
    assert md.count("| <= 1% ") == 1 and md.count("| <= 3% ") == 1
    js, _ = report.write(tmp_path)
    snippet = speed.readme_snippet([js])
    assert "| fastv keep=4 |" in snippet and "CPU" in snippet


def _record_of(model, row):
    """The record of one prefill of ``row``'s case (same inputs as the speed run)."""
    tokprune.apply(model, method=row.method, keep=row.keep)
    try:
        with torch.inference_mode():
            model(**configs.example_inputs(model.config, n_text=10), use_cache=True, logits_to_keep=1)
        return tokprune.last_record(model)
    finally:
        tokprune.remove(model)


def test_speed_run_encoder_bound_counts_encoder_cuts(proxy):
    """FlowCut drops tokens inside the encoder: its row's encoder bound (vision + projector FLOPs) is above 1."""
    model, full, depth = proxy
    report = speed.run(model, bench.grid(["flowcut"], keeps=[4]), bench.Prompt(n_text=10), min_repeats=1,
                       max_repeats=1, warmup=0, full_config=full, depth=depth, progress=False)
    base, flowcut = report.rows
    assert flowcut.error is None and flowcut.encoder_bound > 1.0 and flowcut.encoder_speedup > 0
    assert base.encoder_bound == 1.0


def test_speed_script_and_gpu_script_take_every_registered_method():
    """benchmarks/speed.py times every registered method by default (few-shot ones on their own prompt), and
    neither one-command script narrows the list, so a method added to the registry is timed without edits."""
    spec = importlib.util.spec_from_file_location("speed_bench", ROOT / "benchmarks" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    methods, icl = mod.method_lists(mod.parse(["--config", "tiny-llava", "--keep", "4", "--out", "x"]))
    assert sorted(methods + icl) == sorted(tokprune.methods()) and icl == ["catp"]
    assert mod.method_lists(mod.parse(["--config", "c", "--keep", "4", "--out", "x", "--icl-methods", ""]))[1] == []
    for script in ("gpu.sh", "cpu.sh"):
        text = (ROOT / "benchmarks" / script).read_text()
        assert "--methods" not in text, f"{script} names methods: new registered ones would be left out"
    gpu = (ROOT / "benchmarks" / "gpu.sh").read_text()
    assert "QUICK=\"kernels syncs peers speed\"" in gpu and "${*:-quick}" in gpu and "benchmarks/peers.py" in gpu
    assert "ESTIMATE, NOT A MEASUREMENT" in gpu  # no GPU figure exists: the header says its times are guesses


def test_speed_run_stops_at_its_budget(proxy):
    model, _, _ = proxy
    report = speed.run(model, bench.grid(["random"], keeps=[4]), bench.Prompt(n_text=10), min_repeats=1,
                       max_repeats=3, budget_s=0.0, warmup=0, progress=False)
    assert report.meta["repeats"] == 1 and "budget" in report.meta["repeats_reason"]


def test_profile_splits_the_prefill(proxy, tmp_path):
    model, _, _ = proxy
    inputs = configs.example_inputs(model.config, n_text=10)
    s = profile_prefill(model, inputs, "fastv", keep=4, top=5, trace=tmp_path / "t.json")
    assert not tokprune.is_patched(model)
    assert s.label == "fastv keep=4" and len(s.top_ops) == 5 and Path(s.trace).stat().st_size > 0
    assert all(v >= 0 for v in s.stages.values()) and s.stages["tokprune scoring (taps)"] > 0
    assert "| operator | calls | self ms | share |" in s.to_markdown()


def test_scoring_never_materialises_attention_matrices():
    """A CLIP-L-wide encoder (577 tokens, 16 heads): the [CLS] scoring's largest tensor is O(N x D) (the float32
    keys), far below one heads x N x N matrix; the same for FastV's last-token row in the LLM."""
    d = {k: v for k, v in configs.config_dict("tiny-llava").items() if not k.startswith("_")}
    d["vision_config"].update(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336,
                              num_hidden_layers=2, projection_dim=768)
    d["image_seq_length"] = 576
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**d)
    model = configs.build_model(cfg, "cpu")
    inputs = configs.example_inputs(cfg, n_text=10)
    n, heads, dim = 577, 16, 1024
    cls = scoring_memory(model, inputs, "cls", keep=64)
    assert cls.calls == 1 and cls.largest_numel <= n * dim < heads * n * n // 8
    fastv = scoring_memory(model, inputs, "fastv", keep=64)
    n_llm = 576 + 10
    assert fastv.calls == 1 and fastv.largest_numel <= n_llm * 64 < 4 * n_llm * n_llm // 8


# ------------------------------------------------------------------ host syncs


def _synthetic(x: torch.Tensor) -> None:
    int(x.sum())  # line A
    x[x > 0]
    x.nonzero()  # sync: a test justification


def test_sync_counter_names_kind_and_line():
    c = syncs.count(lambda: _synthetic(torch.arange(4)))
    found = {(s.kind, s.origin.rsplit(":", 1)[-1].split()[0], s.note) for s in c.counts}
    import inspect

    first = inspect.getsourcelines(_synthetic)[1] + 1
    assert found == {("__int__", str(first), None), ("bool-mask __getitem__", str(first + 1), None),
                     ("nonzero", str(first + 2), "a test justification")}


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_decode_steps_are_sync_free_and_prefill_syncs_are_few(name):
    model = configs.build_model(name, "cpu")
    inputs = configs.example_inputs(model.config, n_text=10, batch=2)
    for method in ("fastv", "random"):
        r = syncs.method_syncs(model, inputs, method, keep_ratio=0.5, new_tokens=3)
        assert r.error is None
        assert r.decode_per_step == {}, r.decode_per_step  # the hot path: nothing per generated token
        sequence = {s.kind for s in r.prefill if s.origin.startswith("tokprune/patches/sequence.py")}
        assert sequence <= {"tolist", "__int__"}  # the removed nonzero calls of the sequence surgery stay removed
        assert all(s.origin.startswith("tokprune/") for s in r.prefill)
    md = syncs.report_markdown([r], name)
    assert "| site | kind | per prefill | per decode step | justification |" in md


def test_sync_free_slot_helpers_equal_nonzero():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        keep = torch.rand(3, 17, generator=g) > 0.4
        keep[:, -1] = True
        lens = keep.sum(1)
        width = int(lens.max())
        slot = keep.long().cumsum(1) - 1 + (width - lens)[:, None]
        rows, cols = keep.nonzero(as_tuple=True)
        idx = torch.zeros(3, width, dtype=torch.long)
        valid = torch.zeros(3, width, dtype=torch.bool)
        idx[rows, slot[rows, cols]] = cols
        valid[rows, slot[rows, cols]] = True
        for got in (left_repad(keep), left_repad(keep, width)):
            assert torch.equal(got[0], idx) and torch.equal(got[1], valid)
        w = 5  # every row holds exactly w kept slots
        exact = torch.zeros(3, 17, dtype=torch.bool)
        for b in range(3):
            exact[b, torch.randperm(17, generator=g)[:w]] = True
        assert torch.equal(kept_slots(exact, w), exact.nonzero()[:, 1].view(3, w))


# ------------------------------------------------------------------ the one-command scripts


@pytest.mark.parametrize("script", ["cpu.sh", "gpu.sh"])
def test_one_command_scripts_run_end_to_end_on_tiny_configs(script, tmp_path):
    env = {**os.environ, "TOKPRUNE_BENCH_TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend on a shared CPU
    steps = ["all", "peers-memory"] if script == "gpu.sh" else []  # gpu.sh's default is its one-call "quick" part
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / script), *steps], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert {"README-snippet.md", "syncs.md", "speed-tiny-llava.json", "speed-tiny-qwen2.5-vl.json",
            "profile-tiny-llava.md"} <= files
    if script == "gpu.sh":
        assert {"bench-tiny-llava-b1.json", "bench-tiny-qwen2.5-vl-b2.json", "speed-tiny-llava-b2.json",
                "kernels_cpu.json", "peers.md", "peers-memory.md"} <= files
        assert "verdict: n/a" in proc.stdout  # the kernels' 2x verdict line (n/a: no Triton kernel on a CPU)
        for step in ("kernels", "syncs", "speed", "peers", "bench", "speed8", "peers-memory"):
            assert f"== {step} took " in proc.stdout, step  # elapsed per step
        memory = json.loads((tmp_path / "peers-memory.json").read_text())
        assert len(memory["rows"]) == 13 and all(r["peak_mib"] is not None for r in memory["rows"])  # 6 + 7 cases
        assert "kept sets equal" in (tmp_path / "peers.md").read_text()
    assert "| cls keep=8 |" in (tmp_path / "README-snippet.md").read_text()


def test_kernel_verdict_keeps_only_kernels_twice_as_fast_at_every_shape():
    """benchmarks/kernel_speed.py's verdict (issue #28: a Triton kernel stays only where it is >= 2x faster than the
    PyTorch path): keep needs >= 2x at every shape; without a Triton timing it says n/a, never keep."""
    spec = importlib.util.spec_from_file_location("kernel_speed_bench", ROOT / "benchmarks" / "kernel_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [{"ops": {"select": {"speedup": 3.0}, "gather": {"speedup": 2.5}}},
            {"ops": {"select": {"speedup": 2.0}, "gather": {"speedup": 1.9}}}]
    v = mod.verdicts({"backend": "triton"}, rows)
    assert v["select"]["verdict"] == "keep" and v["gather"]["verdict"] == "remove"
    assert v["gather"]["min_speedup"] == 1.9
    assert {x["verdict"] for x in mod.verdicts({"backend": "torch-reference"}, rows).values()} == {"n/a"}
    lines = mod.verdict_lines({"backend": "triton"}, rows)
    assert any("select" in x and "KEEP" in x for x in lines) and any("gather" in x and "REMOVE" in x for x in lines)
