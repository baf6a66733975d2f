"""Checks before work: bad input fails before a model loads, with one line naming the fix (issue 22, item 9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tokprune
from tokprune.cli import main
from tokprune.testing import image_prompt, make_image, tiny_model


def _no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokprune.eval import models

    def no_load(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load", no_load)


@pytest.mark.parametrize("args, message", [
    (["--methods", "cls", "--keep", "8,8"], "--keep 8 is listed twice in '8,8'"),
    (["--methods", "cls", "--keep-ratio", "0.5,.5"], "--keep-ratio '0.5,.5': a value is listed twice"),
    (["--methods", "cls,", "--keep", "8"], "--methods 'cls,' has an empty item"),
    (["--methods", "cls,,fastv", "--keep", "8"], "has an empty item"),
    (["--methods", "cls,cls", "--keep", "8"], "cls is listed twice"),
])
def test_eval_lists_refuse_empty_and_repeated_items(args: list[str], message: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _no_load(monkeypatch)
    assert main(["eval", "--model", "llava-shapes", "--tasks", "shapes", "--out", str(tmp_path / "o"),
                 "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_eval_checks_out_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _no_load(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out, message in ((blocker / "run", "is not a folder"), (blocker, "is a file")):
        assert main(["eval", "--model", "llava-shapes", "--tasks", "shapes", "--methods", "cls", "--keep", "8",
                     "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0] and message in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--config", "tiny-llava", "--keep", "4,4"], "4 is listed twice"),
    (["bench", "--config", "tiny-llava", "--keep", "4", "--methods", "cls,"], "empty item"),
    (["show", "--keep", "8,8", "--out", "k.png"], "listed twice"),
    (["show", "--methods", "cls,", "--out", "k.png"], "--methods 'cls,' has an empty item"),
])
def test_other_commands_refuse_empty_and_repeated_items(argv: list[str], message: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def llava() -> tuple[Any, Any]:
    return tiny_model("llava")


@pytest.mark.parametrize("keep", [np.int64(4), np.int32(4), torch.tensor(4), torch.tensor(4, dtype=torch.int32)])
def test_keep_accepts_numpy_and_torch_integer_scalars(llava: tuple[Any, Any], keep: Any) -> None:
    model, proc = llava
    inputs = proc(images=make_image(seed=0), text=image_prompt(proc), return_tensors="pt")
    with torch.no_grad():
        with tokprune.pruned(model, "cls", keep=keep):
            got = model(**inputs).logits
            assert tokprune.last_record(model).n_kept == [[4]]
        with tokprune.pruned(model, "cls", keep=4):
            want = model(**inputs).logits
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="keep must be an int"):
        tokprune.apply(model, "cls", keep=np.float64(4))


def test_a_bad_seed_is_a_clear_error(llava: tuple[Any, Any]) -> None:
    model, _ = llava
    with pytest.raises(TypeError, match=r"random: seed must be an int .*got 'x'"):
        tokprune.apply(model, "random", keep=4, seed="x")
    assert not tokprune.is_patched(model)
    tokprune.apply(model, "random", keep=4, seed=np.int64(3))
    tokprune.remove(model)


def test_tile_budget_on_a_model_that_is_not_llava_next_names_the_family(llava: tuple[Any, Any]) -> None:
    model, _ = llava
    with pytest.raises(TypeError, match=r"tile_budget is a llava_next / llava_onevision family option \(models "
                                        r"LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration\), "
                                        r"not an option of this llava model"):
        tokprune.apply(model, "cls", keep=4, tile_budget="global")


def test_the_cls_free_hint_comes_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import dataclass

    from tokprune.pruners.base import VisionRequest
    from tokprune.pruners.random import RandomPrune
    from tokprune.registry import METHODS

    @dataclass
    class Newcomer(RandomPrune):
        def vision_request(self, info: Any) -> VisionRequest:
            return VisionRequest()

    monkeypatch.setitem(METHODS, "zz_newcomer", Newcomer)
    model, _ = tiny_model("qwen2_vl")
    with pytest.raises(tokprune.UnsupportedError) as e:
        tokprune.apply(model, "cls", keep=2)
    hint = str(e.value).split("methods that run without one here: ")[1]
    names = hint.split(", ")
    assert "zz_newcomer" in names and "fastv" in names and "random" in names
    assert "cls" not in names and "vtc_cls" not in names


def test_a_truncated_image_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from tokprune.data.images import open_rgb
    from tokprune.eval.tasks import load_task

    good = tmp_path / "good.png"
    make_image(seed=0).save(good)
    bad = tmp_path / "cut.png"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(OSError, match=f"{bad}: cannot read the image"):
        open_rgb(bad)
    (tmp_path / "data.jsonl").write_text('{"image": "cut.png", "question": "q", "answer": "a"}\n')
    example = load_task(str(tmp_path)).examples[0]
    with pytest.raises(OSError, match="cut.png: cannot read the image"):
        example.image(None)
    monkeypatch.chdir(tmp_path)
    assert main(["show", "--image", str(bad), "--out", "k.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--image {bad}: cannot read the image" in err[0]
