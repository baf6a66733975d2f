"""The ``tokprune`` command: one-line errors for bad arguments, and the demo on every family.

Bad arguments are table-driven: each row is a command line and a piece of text the one-line error must contain
(the argument to fix). Each must exit non-zero without a traceback, before any model is built where the argument
alone is wrong.
"""

from __future__ import annotations

import argparse

import pytest

import tokprune
from tokprune.cli import main
from tokprune.testing import families

FAST_BENCH = ["--device", "cpu", "--n-text", "8", "--new-tokens", "2", "--warmup", "0", "--repeats", "1",
              "--no-progress"]

BAD = [
    # the command itself
    ([], "required: command"),
    (["bogus"], "invalid choice: 'bogus'"),
    # show (checked before the model loads)
    (["show", "--methods", "bogus"], "unknown method 'bogus'"),
    (["show", "--keep", "0"], "--keep 0"),
    (["show", "--keep", "lots"], "neither a token count"),
    (["show", "--image", "/nonexistent.png"], "--image /nonexistent.png"),
    (["show", "--out", "kept.jpg"], "--out kept.jpg"),
    (["show", "--out", "/nonexistent/dir/x.png"], "/nonexistent"),
    (["show", "--model", "no-such-model-dir"], "--model no-such-model-dir"),
    # demo
    (["demo", "--method", "bogus"], "unknown method 'bogus'"),
    (["demo", "--keep", "1000"], "keep=1000 is larger than the 64 visual tokens"),
    (["demo", "--keep", "0"], "argument --keep"),
    (["demo", "--keep-ratio", "0"], "argument --keep-ratio"),
    (["demo", "--keep-ratio", "1.5"], "argument --keep-ratio"),
    (["demo", "--keep", "4", "--keep-ratio", "0.5"], "not allowed with argument --keep"),
    (["demo", "--model", "qwen2vl-shapes", "--method", "cls"], "no [CLS] token"),
    (["demo", "--model", "bogus"], "--model 'bogus'"),
    (["demo", "--family", "bogus"], "--family 'bogus'"),
    (["demo", "--family", "qwen2_vl", "--method", "vtc_cls"], "no [CLS] token"),
    (["demo", "--family", "llava", "--keep", "17"], "keep=17 is larger than the 16 visual tokens"),
    (["demo", "--family", "llava_next", "--save", "x.png"], "--save"),
    (["demo", "--family", "llava", "--save", "x.jpg"], "--save x.jpg"),
    (["demo", "--save", "/nonexistent/dir/x.png"], "--save /nonexistent/dir/x.png"),
    (["demo", "--save", "x.png", "--show", "0"], "--show"),
    (["demo", "--samples", "0"], "argument --samples"),
    (["demo", "--family", "llava", "--samples", "5"], "--samples applies to the reference models"),
    (["demo", "--new-tokens", "5"], "--new-tokens applies to the tiny models"),
    # flops
    (["flops"], "--config"),
    (["flops", "--config", "bogus", "--method", "fastv", "--keep", "4"], "--config: no config 'bogus'"),
    (["flops", "--config", "llava-1.5-7b"], "pass a budget"),
    (["flops", "--config", "llava-1.5-7b", "--method", "fastv"], "pass a budget"),
    (["flops", "--config", "llava-1.5-7b", "--method", "nosuch", "--keep", "64"], "unknown method 'nosuch'"),
    (["flops", "--config", "llava-1.5-7b", "--method", "bogus", "--keep", "64"], "unknown method 'bogus'"),
    (["flops", "--config", "llava-1.5-7b", "--stages", "foo"], "argument --stages: expected LAYER:KEPT"),
    (["flops", "--config", "llava-1.5-7b", "--stages", "2:1.5"], "argument --stages"),
    (["flops", "--config", "llava-1.5-7b", "--stages", "2:0.5", "--keep", "4"], "--stages is the whole schedule"),
    (["flops", "--config", "llava-1.5-7b", "--keep", "4", "--n-text", "-5"], "argument --n-text"),
    (["flops", "--config", "llava-1.5-7b", "--keep", "1000"], "keep=1000 is larger than the 576"),
    (["flops", "--config", "llava-1.5-7b", "--keep-ratio", "0"], "argument --keep-ratio"),
    (["flops", "--config", "llava-1.5-7b", "--keep", "4", "--image-size", "big"], "argument --image-size"),
    (["flops", "--config", "llava-1.5-7b", "--keep", "4", "--image-size", "672x672"], "--image-size: LLaVA-1.5"),
    (["flops", "--config", "llava-1.5-7b", "--keep", "4", "--json", "/nonexistent/dir/x.json"], "--json"),
    (["flops", "--config", "llava-1.5-7b", "--keep", "4", "--convention", "4ndm"], "argument --convention"),
    (["flops", "--config", "llava-1.5-7b", "--keep", "4", "--convention", "3ndm", "--decode-steps", "8"],
     "--decode-steps"),
    # bench
    (["bench", "--config", "bogus"], "--config: no config 'bogus'"),
    (["bench", "--config", "tiny-llava"], "pass a budget"),
    (["bench", "--config", "tiny-llava", "--keep", "4", "--repeats", "0"], "argument --repeats"),
    (["bench", "--config", "tiny-llava", "--keep", "4", "--warmup", "-1"], "argument --warmup"),
    (["bench", "--config", "tiny-llava", "--keep", "4,x"], "argument --keep"),
    (["bench", "--config", "tiny-llava", "--keep-ratio", "0.5,0"], "argument --keep-ratio"),
    (["bench", "--config", "tiny-llava", "--keep", "4", "--methods", "cls,bogus"], "--methods: unknown method"),
    (["bench", "--config", "tiny-llava", "--keep", "4", "--device", "tpu"], "--device 'tpu'"),
    (["bench", "--config", "tiny-llava", "--keep", "4", "--new-tokens", "1"], "--new-tokens"),
    (["bench", "--config", "tiny-llava", "--keep", "4", "--out", "/dev/null/x"], "--out /dev/null/x"),
    (["bench", "--config", "tiny-llava", "--keep", "4", "--batch", "0"], "argument --batch"),
    (["bench", "--config", "tiny-qwen2-vl", "--keep", "2", "--n-text", "1", "--images", "2"], "--n-text"),
    # tune (checked before the model loads)
    (["tune", "--out", "c.json"], "required: --method"),
    (["tune", "--method", "bogus", "--out", "c.json"], "unknown method 'bogus'"),
    (["tune", "--method", "random", "--out", "c.json"], "--method random: declares no search space"),
    (["tune", "--method", "hiprune", "--out", "c.txt"], "--out c.txt: pass a .json file"),
    (["tune", "--method", "hiprune", "--out", "/nonexistent/dir/c.json"], "/nonexistent"),
    (["tune", "--method", "hiprune", "--out", "c.json", "--target-ratio", "0"], "argument --target-ratio"),
    (["tune", "--method", "hiprune", "--out", "c.json", "--trials", "0"], "argument --trials"),
    (["tune", "--method", "hiprune", "--out", "c.json", "--samples", "x"], "argument --samples"),
    (["tune", "--method", "hiprune", "--out", "c.json", "--sampler", "cmaes"], "argument --sampler"),
    (["tune", "--method", "hiprune", "--out", "c.json", "--data", "/nonexistent"], "--data /nonexistent"),
    (["tune", "--method", "hiprune", "--out", "c.json", "--model", "no-such-model-dir/"], "--model no-such-model-dir"),
    (["tune", "--method", "vtc_cls", "--out", "c.json", "--model", "qwen2vl-shapes"], "no [CLS] token"),
]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("argv, names", BAD, ids=[" ".join(a) or "(none)" for a, _ in BAD])
def test_bad_arguments_give_one_line_naming_the_fix(argv, names, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a failing command might write lands in the repository
    rc, out, err = _run(argv, capsys)
    assert rc not in (0, None)
    assert "Traceback" not in out + err
    assert names in err
    assert len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_bench_on_cuda_without_cuda_is_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = _run(["bench", "--config", "tiny-llava", "--keep", "4", "--device", "cuda"], capsys)
    assert rc == 2 and "--device cuda" in err and "--device cpu" in err


def test_bench_refuses_a_model_too_large_for_memory_and_says_what_to_do(capsys, monkeypatch):
    from tokprune.commands import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 20 * 10**9)  # a 20 GB machine
    rc, _, err = _run(["bench", "--config", "llava-1.5-7b", "--keep", "64", "--device", "cpu"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "needs about 33.9 GB" in err and "--dtype bfloat16 (about 17.0 GB)" in err and "tiny config" in err


def test_bench_exits_1_when_a_requested_case_fails(capsys):
    rc, out, err = _run(["bench", "--config", "tiny-qwen2-vl", "--methods", "cls,fastv", "--keep", "2", *FAST_BENCH],
                        capsys)
    assert rc == 1
    assert "| fastv keep=2 | 2 |" in out and "| cls keep=2 | error: UnsupportedError" in out
    assert "case 'cls keep=2' failed" in err and "1 of 3 cases failed" in err
    assert "**warning:** a tiny model" in out  # CPU timings of a tiny model are flagged in the table


def test_debug_shows_the_traceback():
    with pytest.raises(FileNotFoundError, match="bogus"):
        main(["--debug", "flops", "--config", "bogus", "--keep", "4"])
    with pytest.raises(FileNotFoundError, match="bogus"):
        main(["flops", "--config", "bogus", "--keep", "4", "--debug"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tokprune {tokprune.__version__}"


def test_flops_json_is_written(tmp_path, capsys):
    import json

    js = tmp_path / "f.json"
    assert main(["flops", "--config", "llava-1.5-7b", "--stages", "8:0.5,16:0.25,24:0.125", "--convention", "3ndm",
                 "--json", str(js)]) == 0
    assert "1.777" in capsys.readouterr().out  # PyramidDrop's published 1.78 T, from an explicit schedule
    assert json.loads(js.read_text())["stages"] == [[8, 0.5], [16, 0.25], [24, 0.125]]


DEFAULT_METHOD = {"llava": "cls", "llava_next": "cls", "llava_onevision": "fastv", "qwen2_vl": "fastv",
                  "qwen2_5_vl": "fastv", "qwen3_vl": "fastv"}


@pytest.mark.parametrize("method", [None, "fastv", "random"])
@pytest.mark.parametrize("family", families())
def test_demo_every_family(family, method, capsys):
    argv = ["demo", "--family", family, "--new-tokens", "3"] + ([] if method is None else ["--method", method])
    assert main(argv) == 0
    out = capsys.readouterr().out
    used = method or DEFAULT_METHOD[family]
    line = next(x for x in out.splitlines() if x.startswith(f"{used:<11}: visual tokens"))
    n_vis, n_kept = (int(x) for x in line.split("visual tokens ")[1].split(" (")[0].split(" -> "))
    assert 1 <= n_kept < n_vis  # the default budget prunes something on every family
    assert "nothing is pruned" not in out
    assert f"keep-all   : keep_ratio=1.0, {n_vis} -> " in out and "outputs identical to the unpruned model" in out
    if method is None and used != "cls":
        assert f"method     : {used} (default; cls cannot run here" in out


def test_demo_with_a_budget_that_keeps_everything_says_so(capsys):
    assert main(["demo", "--family", "qwen2_vl", "--keep", "4", "--new-tokens", "2"]) == 0
    assert "keeps all 4 visual tokens, so nothing is pruned" in capsys.readouterr().out


def test_demo_prunes_and_keep_all_agrees(capsys):
    assert main(["demo", "--family", "llava", "--keep", "4"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens 16 -> 4" in out
    assert "outputs identical to the unpruned model" in out


def test_demo_fastv_with_ratio(capsys):
    assert main(["demo", "--family", "llava", "--method", "fastv", "--keep-ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens 16 -> 8 (stages: llm@2)" in out


@pytest.mark.parametrize("family, size", [("llava", (4, 4)), ("qwen2_vl", (2, 2))])
def test_demo_tiny_save_writes_a_labelled_picture(family, size, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    png = tmp_path / "kept.png"
    assert main(["demo", "--family", family, "--keep", "1", "--new-tokens", "2", "--save", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape[1] == 256 and img.shape[0] > 256  # the picture plus a band of labels above it
    band = img[: img.shape[0] - 256]
    assert (band < 128).any() and (band > 128).any()  # dark text on white


def test_demo_on_the_reference_model_draws_kept_tokens(capsys, tmp_path):
    from tokprune.reference import names

    if "llava-shapes" not in names():
        pytest.skip("llava-shapes weights not shipped")
    png = tmp_path / "kept.png"
    assert main(["demo", "--samples", "20", "--show", "1", "--save", str(png)]) == 0
    out = capsys.readouterr().out
    assert "cls        : accuracy" in out and "keeping 8 of 64 visual tokens" in out
    assert "random     : accuracy" in out and "logits identical to the unpruned model" in out
    grid = [line.strip() for line in out.splitlines() if line.startswith("    ")]
    assert len(grid) == 8 and sum(c in "#+" for line in grid for c in line) == 8
    from PIL import Image

    width, height = Image.open(png).size
    assert width == 256 and height > 256  # labelled: method, question and answers above the picture


def test_argument_types_parse_what_they_promise():
    from tokprune.commands import args

    assert args.stages("2:0.5, 8:64") == [(2, 0.5), (8, 64)]
    assert args.image_size("672X1008") == (672, 1008)
    assert args.comma_list(args.positive_int, "counts")("192, 128,64") == [192, 128, 64]
    for bad in ("192,128,,64", "192,", "64,64"):  # an empty or repeated item is an error, never dropped or run twice
        with pytest.raises(argparse.ArgumentTypeError):
            args.comma_list(args.positive_int, "counts")(bad)
    assert args.kept_fraction("1") == 1.0


def test_weight_estimate_is_the_built_models_size():
    import torch

    from tokprune import configs
    from tokprune.commands.memory import weight_bytes

    model = configs.build_model("tiny-qwen2-vl", "cpu", torch.float32)
    assert weight_bytes(configs.load("tiny-qwen2-vl"), torch.float32) == sum(
        p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(configs.load("tiny-qwen2-vl"), torch.bfloat16) * 2 == weight_bytes(
        configs.load("tiny-qwen2-vl"), torch.float32)


# ---------------------------------------------------------------------------------------------- --option
@pytest.mark.parametrize("text, value", [("layer=3", 3), ("keep_ratio=0.5", 0.5), ("scaled=true", True),
                                         ("scaled=False", False), ("seed=none", None), ("layers=8,16,24", (8, 16, 24)),
                                         ("layers=(8, 16)", (8, 16)), ("ratios=[0.5,0.25]", (0.5, 0.25)),
                                         ("positions=original", "original"), ("positions='compact'", "compact")])
def test_option_values_are_typed_as_in_python(text, value):
    from tokprune.commands.args import method_option

    key, got = method_option(text)
    assert key == text.split("=")[0] and got == value and type(got) is type(value)


def test_flops_option_is_the_python_apis_option(capsys):
    """``--option layer=3`` counts what ``schedule(config, "fastv", keep=192, layer=3)`` runs (FastV's K)."""
    import tokprune.api
    from tokprune.configs import load
    from tokprune.flops import for_budget

    assert main(["flops", "--config", "llava-1.5-7b", "--method", "fastv", "--keep", "192", "--option", "layer=3"]) == 0
    out = capsys.readouterr().out
    config = load("llava-1.5-7b")
    want = for_budget(config, schedule=tokprune.api.schedule(config, "fastv", keep=192, layer=3))
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert float(total[2]) == pytest.approx(want.total / 1e12, abs=1e-3)
    assert main(["flops", "--config", "llava-1.5-7b", "--method", "fastv", "--keep", "192"]) == 0
    assert capsys.readouterr().out.splitlines()[-2] != out.splitlines()[-2]  # layer 2 (default) differs


@pytest.mark.parametrize("argv, names", [
    (["show", "--methods", "fastv,pdrop", "--option", "layer=1"], ["pdrop", "has no option layer", "layers"]),
    (["show", "--option", "layer=1"], ["--option needs --methods"]),
    (["flops", "--config", "tiny-llava", "--method", "fastv", "--keep", "4", "--option", "layer=x"],
     ["layer", "int", "'x'"]),
    (["bench", "--config", "tiny-llava", "--methods", "fastv", "--keep", "4", "--option", "layer=1",
      "--option", "layer=2"], ["given twice"]),
    (["eval", "--model", "llava-shapes", "--tasks", "shapes", "--methods", "cls", "--keep", "8", "--out", "o",
      "--option", "nope=1"], ["'cls' has no option nope"]),
    (["show", "--methods", "fastv", "--option", "layer"], ["KEY=VALUE"]),
])
def test_bad_options_are_one_line_before_any_model_loads(argv, names, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(n in err for n in names), err


def test_bench_and_eval_cells_carry_the_options():
    from tokprune.eval.bench import grid
    from tokprune.eval.grid import GridSpec

    cases = grid(["fastv"], [4], options={"layer": 1})
    assert cases[1].options == (("layer", 1),) and cases[1].label == "fastv keep=4 layer=1"
    spec = GridSpec(model="m", tasks=["t"], methods=["fastv"], keeps=[4], options={"layer": 1})
    by_method = {v.name: dict(v.options) for v in spec.variants()}
    assert by_method["fastv"] == {"layer": 1} and by_method["random"] == {}  # baselines keep their defaults


def test_show_option_reaches_the_method(tmp_path, capsys):
    """``show --option layer=1`` draws FastV cutting after layer 1, as ``compare(..., layer=1)`` does."""
    from PIL import Image

    from tokprune.testing import tiny_model
    from tokprune.viz import compare

    png = tmp_path / "k.png"
    assert main(["show", "--model", "tiny:llava", "--methods", "fastv", "--keep", "4", "--size", "48",
                 "--option", "layer=1", "--out", str(png)]) == 0
    model, proc = tiny_model("llava")
    from tokprune.data import ShapesVQA

    sample = ShapesVQA("test", n=1)[0]
    image = sample.image(256)
    want = compare(model, proc, image, ["fastv"], [4], question=sample.question, size=48, layer=1)
    assert Image.open(png).convert("RGB").tobytes() == want.convert("RGB").tobytes()


def test_flops_ratio_on_a_method_without_it_names_the_methods_that_take_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "llava-shapes", "--tasks", "shapes", "--methods", "cls,pdrop", "--keep", "8",
                 "--flops-ratio", "0.5", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "cls take no flops_ratio budget" in err and "pdrop, transprune, vflowopt" in err
