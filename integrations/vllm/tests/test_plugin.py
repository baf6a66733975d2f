"""The plugin's settings and refusals (run in vLLM's venv: ``python -m pytest integrations/vllm/tests``).

The comparison with tokprune's Hugging Face path is ``integrations/vllm/ci/check_golden.py`` (engines, golden
results); the selection glue is compared with tokprune's own adapters in the main suite
(``tests/test_vllm_selection.py``). These tests need no engine, except the last, which starts one to check that an
unservable method is refused at engine start.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from tokprune_vllm import config as cfg
from tokprune_vllm.methods import make_pruner, register_servable, servable

from tokprune.pruners.base import ModelInfo

LLAVA = ModelInfo(family="llava", vision_layers=24, feature_layer=22, has_cls=True, llm_layers=32,
                  supports_compact=True)
QWEN = ModelInfo(family="qwen2_vl", vision_layers=32, feature_layer=31, has_cls=False, llm_layers=28,
                 supports_compact=False)
ROOT = Path(__file__).resolve().parents[3]


def conf(**tp):
    return SimpleNamespace(tokprune=tp) if tp else SimpleNamespace()


def test_no_settings_means_no_pruning():
    assert cfg.read(SimpleNamespace()) is None
    assert cfg.read(conf(method=None)) is None


def test_settings_are_read():
    s = cfg.read(conf(method="visionzip", keep=64, dominant=54))
    assert (s.method, s.budget.keep, s.options) == ("visionzip", 64, {"dominant": 54})
    assert s.count(576) == 64
    assert cfg.read(conf(method="cls", keep_ratio=0.25)).count(576) == 144


@pytest.mark.parametrize("raw, match", [
    ({"method": "cls"}, "exactly one of keep"),
    ({"method": "cls", "keep": 0}, "keep must be >= 1"),
    ({"keep": 64}, "no method"),
    ({"method": 3, "keep": 4}, "method must be a string"),
])
def test_bad_settings_name_the_fix(raw, match):
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.read(SimpleNamespace(tokprune=raw))


def test_servable_methods():
    names = servable()
    for name in ("cls", "vtc_cls", "visionzip", "hiprune", "random", "divprune", "vispruner", "downsample"):
        assert name in names
    for name in ("cls", "vtc_cls", "visionzip", "hiprune", "divprune", "vispruner"):
        assert make_pruner(name, {}, LLAVA).name == name
    for name in ("visionzip", "hiprune", "random", "divprune", "vispruner"):
        assert make_pruner(name, {}, QWEN).name == name


@pytest.mark.parametrize("name, options, match", [
    ("fastv", {}, "inside the LLM"),
    ("pdrop", {}, "inside the LLM"),
    ("flowcut", {}, "inside the vision encoder"),
    ("catp", {}, "guided by the prompt's text|pooled"),
    ("nosuch", {}, "no method 'nosuch'"),
    ("random", {"seed_by": "index"}, "seeded from the image"),
    ("cls", {"positions": "original"}, "positions='original'"),
    ("visionzip", {"nosuch": 1}, "unexpected keyword"),
    ("visionzip", {"merge": "encoder"}, "merge='llm'"),
    ("cls", {"score_dtype": "model"}, "score_dtype"),
])
def test_unservable_methods_are_refused_with_a_reason(name, options, match):
    with pytest.raises(cfg.ConfigError, match=match):
        make_pruner(name, options, LLAVA)


def test_downsample_on_qwen_points_to_max_pixels():
    from tokprune_vllm.qwen2_vl import kept_count

    qwen = SimpleNamespace(tokprune={"method": "downsample", "keep": 16}, model_type="qwen2_vl")
    with pytest.raises(cfg.ConfigError, match="max_pixels"):
        kept_count(qwen, 64)


def test_cls_methods_refused_on_qwen():
    with pytest.raises(cfg.ConfigError, match="no \\[CLS\\] token"):
        make_pruner("cls", {}, QWEN)
    assert make_pruner("random", {}, QWEN).seed_by == "content"


def test_register_servable_hook():
    """A vision-only method registered in tokprune later is refused until enabled."""
    from dataclasses import dataclass

    from tokprune_vllm import methods

    from tokprune.pruners.cls_attention import CLSAttention
    from tokprune.registry import METHODS, register_method

    @register_method("vllm_test_rule")
    @dataclass
    class Rule(CLSAttention):
        pass

    try:
        with pytest.raises(cfg.ConfigError, match="not enabled for vLLM"):
            make_pruner("vllm_test_rule", {}, LLAVA)
        register_servable("vllm_test_rule")
        assert make_pruner("vllm_test_rule", {}, LLAVA).name == "vllm_test_rule"
        assert "vllm_test_rule" in servable()
    finally:
        methods.SERVABLE.pop("vllm_test_rule", None)
        METHODS.pop("vllm_test_rule", None)


def test_unservable_method_refused_at_engine_start():
    """An engine asked to serve fastv stops while it starts, with the reason."""
    from vllm import LLM

    with pytest.raises(Exception, match="inside the LLM"):
        LLM(model=str(ROOT / "tokprune/reference/weights/llava-shapes"), dtype="float32", max_model_len=256,
            enforce_eager=True, kv_cache_memory_bytes=64 << 20,
            hf_overrides={"tokprune": {"method": "fastv", "keep": 16}})


def test_compiled_vision_encoder_is_refused():
    """A compiled encoder would run without the taps on its layers: refused with the fix."""
    from tokprune_vllm.engine import check_engine

    with pytest.raises(cfg.ConfigError, match="compile_mm_encoder"):
        check_engine(SimpleNamespace(compilation_config=SimpleNamespace(compile_mm_encoder=True)))
    check_engine(SimpleNamespace(compilation_config=SimpleNamespace(compile_mm_encoder=False)))


def test_refused_families_name_the_reason():
    """LLaVA-NeXT, LLaVA-OneVision and Qwen3-VL with tokprune settings stop at engine start with the reason; without
    settings they are vLLM's own classes."""
    from tokprune_vllm import REFUSED, REFUSING, refuse

    assert set(REFUSING) == set(REFUSED)
    settings = SimpleNamespace(model_config=SimpleNamespace(hf_config=conf(method="cls", keep=16)))
    for arch, target in REFUSING.items():
        cls = getattr(refuse, target.split(":")[1])
        assert cls.__mro__[1].__name__ == arch
        with pytest.raises(cfg.ConfigError, match="tokprune cannot serve " + arch):
            cls(vllm_config=settings)


def test_settings_on_an_unserved_model_are_refused():
    """A model class that is not the plugin's (vLLM's own, for any other architecture) would ignore the settings:
    the runner's load_model refuses it; the plugin's classes and models without settings pass."""
    from tokprune_vllm.runner import check_served
    from torch import nn

    with pytest.raises(cfg.ConfigError, match="does not serve"):
        check_served(nn.Linear(1, 1), conf(method="cls", keep=16))
    check_served(nn.Linear(1, 1), conf())
    served = nn.Linear(1, 1)
    served.tokprune = None
    check_served(served, conf(method="cls", keep=16))
