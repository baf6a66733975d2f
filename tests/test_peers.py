"""benchmarks/peers.py: the reference-style implementations (eager attention maps, as the methods' own code gets
them) keep the same tokens as tokprune and give the same logits, on tiny models with different images per sample;
the script runs end to end. Times are never compared here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tokprune import configs

ROOT = Path(__file__).resolve().parents[1]


def _peers():
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def peers():
    return _peers()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return configs.build_model("tiny-llava", "cpu")


@pytest.mark.parametrize("scale", ["llava-1.5", "llava-next"])
@pytest.mark.parametrize("index", range(7))
def test_reference_style_keeps_the_same_tokens_and_logits(peers, model, scale, index):
    peer = peers.peers(model, fastv_layer=2)[index]
    x = peers.inputs_for(model, scale, batch=2, n_text=10)
    assert not torch.equal(x["pixel_values"][0], x["pixel_values"][-1])  # different images per sample
    with torch.inference_mode():
        check = peers.check_equal(model, x, peer, keep=4, fastv_layer=2)
    assert check["kept_equal"], (peer.style, check)
    assert check["max_logit_diff"] <= 1e-4, (peer.style, check)


def test_hiprune_anchors_and_visionzip_merges_match_on_a_larger_grid(peers):
    """An 8x8 patch grid at keep 32: HiPrune places round(32 * 0.1 / 5) = 1 anchor with its buffers (none below
    keep 25, so the 4x4 tiny grid never exercises them); VisionZip merges 5 contextual tokens."""
    from transformers import AutoConfig

    d = {k: v for k, v in configs.config_dict("tiny-llava").items() if not k.startswith("_")}
    d["vision_config"].update(image_size=112)
    d["image_seq_length"] = 64
    torch.manual_seed(0)
    model = configs.build_model(AutoConfig.for_model(**d), "cpu")
    x = peers.inputs_for(model, "llava-1.5", batch=2, n_text=10)
    assert round(32 * 0.1 / 5) == 1
    for peer in peers.peers(model, fastv_layer=2):
        if peer.method in ("visionzip", "hiprune", "vispruner"):
            with torch.inference_mode():
                check = peers.check_equal(model, x, peer, keep=32, fastv_layer=2)
            assert check["ok"], (peer.style, check)


def test_check_fails_on_a_different_rule(peers, model):
    """The check can fail: a reference that ranks by the wrong CLIP layer keeps other tokens."""
    wrong = peers.Peer("cls", "wrong layer", "", lambda m, x, k: peers.cls_reference(m, x, k, [0]), True)
    x = peers.inputs_for(model, "llava-1.5", batch=2, n_text=10)
    with torch.inference_mode():
        check = peers.check_equal(model, x, wrong, keep=4, fastv_layer=2)
    assert peers._feature_layer(model) != 0 and not check["ok"]


def test_peak_memory_in_process_is_a_number(peers):
    setup = peers.Setup("tiny-llava", None, None, 2, 4, "float32", "cpu")
    mib = peers.peak_memory(setup, "llava-1.5", 2, 10, "FasterVLM: eager CLIP, output_attentions")
    assert isinstance(mib, float) and mib >= 0


def test_quick_run_writes_tables(peers, tmp_path):
    assert peers.main(["--quick", "--no-memory", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "peers.json").read_text())
    assert all(c["ok"] for c in data["meta"]["checks"].values()) and len(data["meta"]["checks"]) == 7
    settings = {(r["scale"], r["batch"]) for r in data["rows"]}
    assert settings == {("llava-1.5", 1), ("llava-1.5", 2), ("llava-next", 1)}
    assert {r["case"] for r in data["rows"] if not r["reference"]} == {
        "tokprune cls", "tokprune vtc_cls", "tokprune visionzip", "tokprune hiprune", "tokprune vispruner",
        "tokprune fastv"}
    assert all(len(r["runs_ms"]) == 2 and r["time_ratio"] > 0 for r in data["rows"])
    md = (tmp_path / "peers.md").read_text()
    assert "kept sets equal" in md and "DIFFER" not in md


def test_check_is_judged_on_the_same_features_when_only_the_encoders_rounding_differs(peers, model, monkeypatch):
    """When tokprune's SDPA run keeps other tokens than an eager-CLIP reference, the check runs tokprune again with
    the vision tower eager and judges on that; it reports both, and restores the tower's attention."""
    peer = next(p for p in peers.peers(model, fastv_layer=2) if p.method == "vispruner")
    real = peers.run_tokprune

    def sdpa_reorders(m, x, method, keep, fastv_layer):  # stands in for rounding that reorders a near-tie
        logits, kept = real(m, x, method, keep, fastv_layer)
        if m.model.vision_tower.config._attn_implementation != "eager":
            kept = [[k.flip(0) for k in row] for row in kept]
        return logits, kept

    monkeypatch.setattr(peers, "run_tokprune", sdpa_reorders)
    x = peers.inputs_for(model, "llava-1.5", batch=2, n_text=10)
    impl = model.model.vision_tower.config._attn_implementation
    with torch.inference_mode():
        check = peers.check_equal(model, x, peer, keep=4, fastv_layer=2)
    assert not check["kept_equal"] and check["same_features"]["kept_equal"] and check["ok"]
    assert model.model.vision_tower.config._attn_implementation == impl
    assert "with tokprune's encoder also eager: kept sets equal" in peers._same_features(check)
