"""``tokprune tune`` / :mod:`tokprune.eval.tune` on the trained reference model llava-shapes (and a tiny Qwen2.5-VL):
the tuner beats the default configuration on its samples, a seed reproduces it, its JSON round-trips through
``tokprune.apply(config=...)``, the layer-averaged budget and infeasible trials behave as documented, and bad
configurations are refused with an error naming the fix. References here are written without tokprune's tuner code:
the objective is recomputed with plain HF forwards, the FastV budget from its formula by hand.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokprune
from tokprune.eval.progress import Progress
from tokprune.pruners.base import Pruner

optuna = pytest.importorskip("optuna", reason="tokprune tune needs the 'tune' extra (optuna)")

from tokprune.eval import tune as tuning  # noqa: E402

N_SAMPLES, TRIALS = 8, 8


@pytest.fixture(scope="module")
def shapes():
    """(model, batches) of llava-shapes on the first Shapes-VQA training samples, left-padded as the CLI does."""
    from tokprune.commands.tune import load_samples
    from tokprune.eval.models import load
    from tokprune.eval.predict import encode

    bundle = load("llava-shapes")
    prompts, images = load_samples("shapes", N_SAMPLES, bundle, "")
    return bundle.model, [encode(bundle, prompts[:5], images[:5]), encode(bundle, prompts[5:], images[5:])]


def reference_objective(model, batches, method, keep_ratio, options) -> float:
    """Mean cosine of the last prompt token's final hidden state (lm_head's input), pruned vs unpruned, by hand."""
    def last(batch):
        captured = {}
        hook = model.lm_head.register_forward_hook(lambda m, args, out: captured.setdefault("h", args[0]))
        try:
            model(**batch)
        finally:
            hook.remove()
        return captured["h"][:, -1].float()

    with torch.no_grad():
        tokprune.remove(model)
        full = torch.cat([last(b) for b in batches])
        with tokprune.pruned(model, method, keep_ratio=keep_ratio, **options):
            pruned = torch.cat([last(b) for b in batches])
    cos = (full * pruned).sum(-1) / (full.norm(dim=-1) * pruned.norm(dim=-1))
    return float(cos.mean())


# ------------------------------------------------------------------------------------------------ the search
@pytest.mark.parametrize("method, target", [("hiprune", 0.25), ("visionzip", 0.25), ("pdrop", 0.5),
                                            ("vflowopt", 0.25)])
def test_the_tuner_beats_the_default_config_and_reports_the_true_objective(shapes, method, target):
    model, batches = shapes
    result = tuning.tune(model, batches, method, target_ratio=target, trials=TRIALS, seed=0)
    assert not tokprune.is_patched(model)
    assert result.default_objective is not None and result.objective > result.default_objective
    if method == "pdrop":  # cuts before layers 1, 2, 3 of 4: (64 + a + b + k) / 256 <= 0.5, by hand
        k = round(result.keep_ratio * 64)
        a, b = (max(k, int(64 * result.options["lam"] ** i)) for i in (1, 2))
        assert result.layer_average_ratio == (64 + a + b + k) / 256 <= 0.5 + 1 / 64
    elif method == "vflowopt":  # keep_ratio *is* its layer average, solved to within half a token per image
        assert result.keep_ratio == 0.25 and abs(result.layer_average_ratio - 0.25) <= 0.5 / 64
    else:  # pre-LLM: the contract's call as is
        assert result.keep_ratio == 0.25 and result.layer_average_ratio == 0.25
    space = tuning.search_space(method)
    assert set(result.options) == set(space)
    assert all(space[k][1] <= v <= space[k][2] for k, v in result.options.items())
    # the numbers it reports are what plain forwards give
    assert result.objective == pytest.approx(
        reference_objective(model, batches, method, result.keep_ratio, result.options), abs=1e-5)
    if method != "pdrop":  # (pdrop's default runs at its own solved final count)
        assert result.default_objective == pytest.approx(reference_objective(model, batches, method, 0.25, {}),
                                                         abs=1e-5)
    assert result.samples == N_SAMPLES and result.trials == TRIALS == len(result.history)


def test_the_same_seed_gives_the_same_search_and_another_seed_another(shapes):
    model, batches = shapes
    a, b = (tuning.tune(model, batches, "hiprune", 0.25, trials=5, seed=3) for _ in range(2))
    c = tuning.tune(model, batches, "hiprune", 0.25, trials=5, seed=4)
    assert [t.options for t in a.history] == [t.options for t in b.history]
    assert [t.objective for t in a.history] == [t.objective for t in b.history]
    assert (a.options, a.objective) == (b.options, b.objective)
    # trial 0 is the default config (alpha=0.1 lies in the space) for every seed; the sampled ones differ
    assert a.history[0].options == c.history[0].options == {"alpha": 0.1}
    assert [t.options for t in a.history[1:]] != [t.options for t in c.history[1:]]


def test_in_llm_methods_are_compared_at_the_layer_averaged_target(shapes):
    """FastV on llava-shapes' 4-layer LLM at a layer average of 0.5: layer K keeps all 64 tokens for K layers, so
    layer 1 needs (64 + 3 k) / 256 <= 0.5 -> k = 21 final tokens; layer 2 would need k = 0 (infeasible: the
    default config), layer 3 too."""
    model, batches = shapes
    result = tuning.tune(model, batches, "fastv", target_ratio=0.5, trials=6, seed=0)
    assert result.options == {"layer": 1}
    assert result.keep_ratio == 21 / 64 and result.layer_average_ratio == (64 + 3 * 21) / 4 / 64
    assert result.default_objective is None  # layer=2 cannot reach 0.5 with one token left
    infeasible = [t for t in result.history if not t.feasible]
    assert infeasible and all(t.options["layer"] > 1 and t.objective == tuning.INFEASIBLE for t in infeasible)
    assert result.objective == pytest.approx(reference_objective(model, batches, "fastv", 21 / 64, {"layer": 1}),
                                             abs=1e-5)


def test_no_feasible_point_is_an_error_naming_the_target(shapes):
    model, batches = shapes
    with pytest.raises(ValueError, match="no feasible trial for fastv.*raise --target-ratio"):
        tuning.tune(model, batches, "fastv", target_ratio=0.25, trials=3, seed=0)


def test_a_record_above_the_target_makes_the_trial_infeasible(shapes, monkeypatch):
    """The contract's check on the record: a trial run above the target (here forced: keep_ratio 0.5 for a target
    of 0.25) is infeasible however good its objective."""
    model, batches = shapes
    evaluate = tuning.Evaluator(model, batches, "hiprune", 0.25)
    monkeypatch.setattr(tuning, "solve_keep_ratio", lambda *a, **k: 0.5)
    trial = evaluate({"alpha": 0.1})
    assert not trial.feasible and trial.layer_average_ratio == 0.5 and "above the target" in trial.reason
    assert trial.objective > 0.5


def test_a_point_the_method_refuses_is_an_infeasible_trial(shapes):
    model, batches = shapes
    trial = tuning.Evaluator(model, batches, "fastv", 0.9)({"layer": 4})  # the LLM has 4 layers: 1..3
    assert not trial.feasible and "out of range" in trial.reason and trial.objective == tuning.INFEASIBLE


def test_content_ratio_is_the_records_layer_average_without_newlines():
    model, processor = tokprune.testing.tiny_model("llava")
    from tokprune.testing import image_prompt, make_image

    enc = processor(images=make_image(), text=image_prompt(processor), return_tensors="pt")
    with tokprune.pruned(model, "pdrop", keep=2, layers=(1,)), torch.no_grad():
        model(**enc)
        rec = tokprune.last_record(model)
    layers = model.config.get_text_config().num_hidden_layers
    assert tuning.content_ratios(rec, layers) == [(rec.layer_average()[0][0] / 16, 16)]
    # LLaVA-NeXT: newlines ride on top of every budget and are not counted
    model, processor = tokprune.testing.tiny_model("llava_next")
    enc = processor(images=make_image(), text=image_prompt(processor), return_tensors="pt")
    with tokprune.pruned(model, "cls", keep_ratio=0.5), torch.no_grad():
        model(**enc)
        rec = tokprune.last_record(model)
    special = rec.special[0][0]
    content = int((~special).sum())
    assert special.any()
    ((ratio, n),) = tuning.content_ratios(rec, model.config.get_text_config().num_hidden_layers)
    assert n == content and ratio == round(0.5 * content) / content
    assert rec.layer_average()[0][0] / rec.n_visual[0][0] != ratio


def test_tune_runs_on_qwen2_5_vl():
    from tokprune.testing import image_prompt, make_image

    model, processor = tokprune.testing.tiny_model("qwen2_5_vl")
    processor.tokenizer.padding_side = "left"
    enc = dict(processor(images=[make_image(seed=0), make_image(seed=1)], text=[image_prompt(processor)] * 2,
                         return_tensors="pt", padding=True))
    result = tuning.tune(model, [enc], "hiprune", target_ratio=0.5, trials=3, seed=0)
    assert result.feasible_trials == 3 and result.layer_average_ratio <= 0.5 + 1e-9
    assert -1 <= result.objective <= 1 + 1e-6


def test_the_gp_sampler_runs_or_names_scipy(shapes):
    model, batches = shapes
    try:
        import scipy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install scipy"):
            tuning.tune(model, batches, "hiprune", 0.25, trials=3, sampler="gp")
        return
    result = tuning.tune(model, batches, "hiprune", 0.25, trials=4, sampler="gp", seed=0)
    assert result.sampler == "gp" and result.feasible_trials == 4


def test_right_padding_is_refused(shapes):
    model, batches = shapes
    batch = dict(batches[0])
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        tuning.last_states(model, [batch])


def test_the_progress_counter_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = Progress(2, True, "tune", "trial")
    bar.step("best 0.9")
    bar.close()
    assert "[tune] 1/2 best 0.9" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ config files
def test_the_json_round_trips_through_apply_config(shapes, tmp_path):
    model, batches = shapes
    result = tuning.tune(model, batches, "fastv", target_ratio=0.5, trials=4, seed=0)
    path = result.save(tmp_path / "cfg.json")
    data = json.loads(path.read_text())
    assert set(data) <= set(tuning.CONFIG_KEYS)
    for key in ("method", "options", "target_ratio", "objective", "default_objective", "seed", "sampler",
                "tokprune_version"):
        assert key in data
    assert data["tokprune_version"] == tokprune.__version__ and data["default_options"] == {"layer": 2}
    for config in (str(path), path, data):
        tokprune.apply(model, config=config)
        assert model.tokprune.pruner.layer == 1 and model.tokprune.budget.keep_ratio == 21 / 64
        tokprune.remove(model)
    # method named and the same: fine; keyword options and a budget override the file
    tokprune.apply(model, method="fastv", config=path, layer=2, keep=4)
    assert model.tokprune.pruner.layer == 2 and model.tokprune.budget.keep == 4
    tokprune.remove(model)
    # the loaded config reproduces the tuned objective
    assert reference_objective(model, batches, "fastv", data["keep_ratio"], data["options"]) == pytest.approx(
        data["objective"], abs=1e-5)


CONFIG = {"method": "hiprune", "options": {"alpha": 0.5}, "keep_ratio": 0.25}
BAD_CONFIGS = [
    ({**CONFIG, "alpah": 1}, "unknown key(s) alpah"),
    ({"options": {}}, "needs 'method' and 'options'"),
    ({**CONFIG, "options": {"alpha": 2.0}}, "alpha=2.0 is outside the search space of hiprune (float in [0.0, 1.0])"),
    ({**CONFIG, "options": {"alhpa": 0.5}}, "method 'hiprune' has no option alhpa"),
    ({**CONFIG, "options": [0.5]}, "'options' must be an object"),
    ({**CONFIG, "keep_ratio": 1.5}, "keep_ratio must be a kept fraction"),
    ({**CONFIG, "method": "nosuch"}, "unknown method 'nosuch'"),
    ({**CONFIG, "options": {"alpha": 0.5, "wrap_rows": "yes"}}, "wrap_rows must be True"),  # the method's own check
]


@pytest.mark.parametrize("config, message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_configs_are_refused_naming_the_fix(config, message):
    model, _ = tokprune.testing.tiny_model("llava")
    with pytest.raises((ValueError, TypeError)) as err:
        tokprune.apply(model, config=config)
    assert message in str(err.value)
    assert not tokprune.is_patched(model)


def test_config_errors_for_method_and_files(tmp_path):
    model, _ = tokprune.testing.tiny_model("llava")
    with pytest.raises(ValueError, match="tuned for method 'hiprune', not 'fastv'; pass method='hiprune'"):
        tokprune.apply(model, method="fastv", config=CONFIG)
    with pytest.raises(FileNotFoundError, match="write one with tokprune tune --out"):
        tokprune.apply(model, config=tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        tokprune.apply(model, config=tmp_path / "bad.json")
    from tokprune.pruners.hiprune import HiPrune

    with pytest.raises(TypeError, match="pass method by name"):
        tokprune.apply(model, HiPrune(), config=CONFIG)
    with pytest.raises(TypeError, match="pass method="):
        tokprune.apply(model)
    # explicit options are the user's own choice: only the method's validation applies to them
    tokprune.apply(model, config=CONFIG, alpha=3.0)
    assert model.tokprune.pruner.alpha == 3.0
    tokprune.remove(model)


# ------------------------------------------------------------------------------------------------ search spaces
def test_every_declared_search_space_is_valid_and_bad_ones_are_named():
    assert set(tuning.tunable_methods()) >= {"hiprune", "visionzip", "vtc_cls", "fastv", "transprune"}
    for method in tokprune.methods():
        tuning.search_space(method)

    @dataclass
    class Bad(Pruner):
        search_space: ClassVar[dict[str, tuple]] = {"strength": ("float", 0.0, 1.0)}

    with pytest.raises(ValueError, match="'strength' is not an option"):
        tuning.search_space(Bad)
    for space, message in [({"positions": ("cube", 0, 1)}, "kind in"), ({"positions": ("int", 0.5, 2)}, "ints"),
                           ({"positions": ("log", 0.0, 1.0)}, "low > 0"), ({"positions": ("float", 1, 1)}, "low <")]:
        Bad.search_space = space
        with pytest.raises(ValueError, match=message):
            tuning.search_space(Bad)


def test_visionzip_dominant_share_is_the_split_as_a_fraction():
    from tokprune.testing import image_prompt, make_image

    model, processor = tokprune.testing.tiny_model("llava")
    enc = processor(images=make_image(), text=image_prompt(processor), return_tensors="pt")

    def run(**options):
        with tokprune.pruned(model, "visionzip", keep=8, **options), torch.no_grad():
            logits = model(**enc).logits
            rec = tokprune.last_record(model)
        return logits, rec.kept[0][0], [m.sources for m in rec.merged[0] if m]

    share, count = run(dominant_share=0.6), run(dominant=5)  # round(8 * 0.6) = 5 dominant, 3 contextual
    assert torch.equal(share[0], count[0]) and torch.equal(share[1], count[1])
    assert all(torch.equal(a, b) for a, b in zip(share[2][0], count[2][0]))
    with pytest.raises(ValueError, match="dominant_share or dominant/contextual"):
        tokprune.apply(model, "visionzip", keep=8, dominant_share=0.5, dominant=4)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        tokprune.apply(model, "visionzip", keep=8, dominant_share=1.5)


def test_vtc_cls_span_counts_layers_back_from_the_feature_layer():
    from tokprune.testing import image_prompt, make_image

    model, processor = tokprune.testing.tiny_model("llava")
    enc = processor(images=make_image(), text=image_prompt(processor), return_tensors="pt")
    feature = tokprune.api.model_info(model).feature_layer
    kept = {}
    for name, options in {"span": {"span": 2}, "layers": {"layers": (feature - 1, feature)}}.items():
        with tokprune.pruned(model, "vtc_cls", keep=4, **options), torch.no_grad():
            model(**enc)
            kept[name] = tokprune.last_record(model).kept[0][0]
    assert torch.equal(kept["span"], kept["layers"])
    with pytest.raises(ValueError, match="layers= or span="):
        tokprune.apply(model, "vtc_cls", keep=4, span=2, layers=(0,))


def test_pdrop_lam_is_the_papers_lambda():
    from tokprune.api import schedule
    from tokprune.testing import image_prompt, make_image

    # lam=0.5 without a budget is the paper's default schedule; with a budget the stages are max(r, lam^i)
    assert schedule("llava-1.5-7b", "pdrop", lam=0.5) == schedule("llava-1.5-7b", "pdrop")
    assert [s.keep for s in schedule("llava-1.5-7b", "pdrop", lam=0.8, keep_ratio=0.125).stages] == [
        int(576 * 0.8), int(576 * 0.64), 72]
    assert [s.keep for s in schedule("llava-1.5-7b", "pdrop", lam=0.3, keep_ratio=0.125).stages] == [172, 72, 72]
    # it runs exactly as the same explicit ratios (whose exactness tests/test_families.py checks)
    model, processor = tokprune.testing.tiny_model("llava")
    enc = processor(images=make_image(), text=image_prompt(processor), return_tensors="pt")
    out = {}
    for name, options in {"lam": {"lam": 0.8, "keep_ratio": 0.125}, "ratios": {"ratios": (0.8, 0.64, 0.125)}}.items():
        with tokprune.pruned(model, "pdrop", **options), torch.no_grad():
            out[name] = (model(**enc).logits, [st.kept[0][0] for st in tokprune.last_record(model).stages])
    assert torch.equal(out["lam"][0], out["ratios"][0])
    assert all(torch.equal(a, b) for a, b in zip(out["lam"][1], out["ratios"][1]))
    with pytest.raises(ValueError, match="lam or ratios"):
        tokprune.apply(model, "pdrop", lam=0.5, ratios=(0.5, 0.25, 0.125))
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        tokprune.apply(model, "pdrop", lam=1.5)


# ------------------------------------------------------------------------------------------------ the command
def test_the_command_writes_the_config(tmp_path, capsys):
    from tokprune.cli import main

    out = tmp_path / "cfg.json"
    rc = main(["tune", "--method", "hiprune", "--samples", "4", "--trials", "3", "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["method"] == "hiprune" and data["samples"] == 4 and data["trials"] == 3
    assert data["model"] == "llava-shapes" and data["data"] == "shapes" and data["sampler"] == "tpe"
    assert "hiprune: objective" in capsys.readouterr().out


def test_the_command_reads_a_folder_of_images(tmp_path, capsys):
    from tokprune.cli import main
    from tokprune.data import ShapesVQA

    for i, sample in enumerate(ShapesVQA("test", n=3)):
        sample.image(64).save(tmp_path / f"{i}.png")
    rc = main(["tune", "--method", "visionzip", "--data", str(tmp_path), "--question", "what color is the circle ?",
               "--trials", "2", "--no-progress", "--out", str(tmp_path / "cfg.json")])
    assert rc == 0 and json.loads((tmp_path / "cfg.json").read_text())["samples"] == 3
