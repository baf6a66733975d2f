"""tokprune.eval.bench and ``tokprune bench`` on a tiny CPU model (timings are checked to exist, never compared)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

import tokprune
from tokprune import configs
from tokprune.eval import bench
from tokprune.eval.bench import Case, Prompt
from tokprune.eval.progress import Progress

FAST = dict(new_tokens=3, warmup=1, repeats=2, progress=False)
ONCE = dict(new_tokens=3, warmup=0, repeats=1, progress=False)  # for the slower real-core runs


@pytest.fixture(scope="module")
def tiny():
    return configs.build_model("tiny-llava", "cpu")


def _kv(n_tokens_per_layer: list[int], batch: int = 2) -> int:
    # tiny-llava: 2 KV heads x 16 dims, keys + values, float32
    return sum(2 * batch * 2 * n * 16 * 4 for n in n_tokens_per_layer)


def test_end_to_end_with_the_core(tiny, tmp_path) -> None:
    cases = bench.grid(["cls", "fastv", "bogus"], keeps=[4])
    report = bench.run(tiny, cases, Prompt(n_text=10, batch=2), **ONCE)
    base, cls, fastv, bogus = report.results
    assert [r.label for r in report.results] == ["unpruned", "cls keep=4", "fastv keep=4", "bogus keep=4"]
    for r in (base, cls, fastv):
        assert r.error is None
        assert r.prefill_ms > 0 and r.ttft_ms > 0 and r.decode_tok_s > 0
        assert r.peak_mem_bytes is None  # CPU: no allocator statistics
    # what the prefill left in the cache: cls drops before the LLM, fastv before layer 2 (4 layers, 10 text tokens)
    assert base.kv_bytes == _kv([26] * 4)
    assert cls.kv_bytes == _kv([14] * 4)
    assert fastv.kv_bytes == _kv([26, 26, 14, 14])
    assert (base.visual_tokens, cls.visual_tokens, fastv.visual_tokens) == (16, 4, 4)
    assert cls.ratios["tflops"] < fastv.ratios["tflops"] < 1 == base.ratios["tflops"]
    assert cls.ratios["kv"] == pytest.approx(14 / 26)
    assert base.ratios["prefill_speedup"] == 1.0
    assert base.select_ms is None  # nothing selects in the unpruned model
    assert "unknown method" in bogus.error and bogus.prefill_ms is None
    assert not tokprune.is_patched(tiny)  # every case removed its patch, the failing one included

    md = report.to_markdown()
    assert "CPU" in md and "float32" in md and "| cls keep=4 | 4 |" in md and "error: ValueError" in md
    js, mdfile = report.write(tmp_path / "run")
    data = json.loads(js.read_text())
    assert js.name == "bench.json" and mdfile.read_text() == md
    assert data["meta"]["device"].startswith("CPU") and data["meta"]["dtype"] == "float32"
    assert data["meta"]["batch"] == 2 and data["meta"]["visual_tokens_per_image"] == 16
    assert [r["label"] for r in data["results"]] == [r.label for r in report.results]
    assert report.write(tmp_path / "named.json")[1].name == "named.md"


class FakeAPI:
    """apply/remove/last_record without pruning: records calls, fails on request, returns chosen records."""

    def __init__(self, records: dict[str, object]) -> None:
        self.records, self.calls, self.current = records, [], None

    def apply(self, model, method, keep=None, keep_ratio=None):
        self.calls.append(("apply", method, keep, keep_ratio))
        if method == "broken":
            raise RuntimeError("cannot patch")
        self.current = method
        return model

    def remove(self, model):
        self.calls.append(("remove",))
        return model

    def last_record(self, model):
        return self.records[self.current]


def test_selection_timings_from_the_record_or_na(tiny) -> None:
    full = [[torch.arange(16)], [torch.arange(16)]]
    timed = SimpleNamespace(n_visual=[[16], [16]], seq_len=[26, 26], stages=[], timings={"a_s": 0.002, "b_s": 0.001})
    untimed = SimpleNamespace(n_visual=[[16], [16]], seq_len=[26, 26],
                              stages=[SimpleNamespace(kind="vision", layer=None, kept=full)])
    api = FakeAPI({"timed": timed, "untimed": untimed})
    cases = [Case(), Case("timed", keep=4), Case("untimed", keep_ratio=0.5), Case("broken", keep=2)]
    report = bench.run(tiny, cases, Prompt(n_text=10, batch=2), api=api, **FAST)
    _, t, u, b = report.results
    assert t.select_ms == pytest.approx(3.0) and u.select_ms is None
    assert "n/a" in report.to_markdown().splitlines()[-2]  # the untimed row shows n/a for selection
    assert b.error == "RuntimeError: cannot patch"
    assert api.calls == [("apply", "timed", 4, None), ("remove",), ("apply", "untimed", None, 0.5), ("remove",),
                         ("apply", "broken", 2, None), ("remove",)]
    assert t.visual_tokens == 16 and t.ratios["tflops"] == 1.0  # the fake pruned nothing


def test_run_validates_its_arguments(tiny) -> None:
    with pytest.raises(ValueError, match="first case"):
        bench.run(tiny, [Case("cls", keep=4)], **FAST)
    with pytest.raises(ValueError, match="new_tokens"):
        bench.run(tiny, [Case()], **{**FAST, "new_tokens": 1})


def test_kv_cache_bytes() -> None:
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), 0)
    cache.update(torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16), 1)
    assert bench.kv_cache_bytes(cache) == 2 * 80 * 4 + 2 * 48 * 2
    assert bench.kv_cache_bytes(object()) is None


def test_progress_counter_without_tqdm(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails -> the stderr counter
    bar = Progress(2, True, "bench", "run")
    bar.step("cls keep=4")
    bar.step("cls keep=4")
    bar.close()
    err = capsys.readouterr().err
    assert "[bench] 1/2 cls keep=4" in err and "[bench] 2/2" in err


def _cli(argv: list[str]) -> int:
    from tokprune.cli import main

    return main(argv)


def test_cli_bench(tmp_path, capsys) -> None:
    rc = _cli(["bench", "--config", "tiny-llava", "--methods", "fastv", "--keep", "4", "--keep-ratio", "0.5",
               "--device", "cpu", "--n-text", "8", "--new-tokens", "2", "--warmup", "0", "--repeats", "1",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| fastv keep=4 | 4 |" in out and "| fastv keep_ratio=0.5 | 8 |" in out and "tiny-llava" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["model"] == "tiny-llava" and len(data["results"]) == 3
    assert _cli(["bench", "--config", "tiny-llava", "--device", "cpu"]) == 2
    assert "--keep" in capsys.readouterr().err
