"""Shapes-VQA generator and the shipped reference models: the task is what it says, the models are trained, and
accuracy after pruning depends on *which* tokens a method keeps.

Accuracies are asserted on a fixed 200-sample test subset, so they are exact regressions of the shipped weights.
"""

from __future__ import annotations

import collections
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import tokprune
from tokprune.data import ANSWERS, COLORS, QUESTION_TYPES, Obj, Scene, ShapesVQA, answer_of, make_sample
from tokprune.data.render import SEGMENTS, patch_owners
from tokprune.data.shapes import ask
from tokprune.pruners.cls_attention import CLSAttention
from tokprune.registry import METHODS, register_method

N_TEST = 200


def _shipped() -> list[str]:
    from tokprune.reference import names

    return names()


def needs(*names: str) -> pytest.MarkDecorator:
    """Skip, saying why, when a reference model's weights are absent (they are produced by ``python -m
    tokprune.reference.train`` and shipped in the package; a source checkout without them still tests the rest)."""
    missing = [n for n in names if n not in _shipped()]
    return pytest.mark.skipif(bool(missing), reason=f"reference weights not shipped: {', '.join(missing)} "
                              "(tokprune/reference/weights/)")


def obj(kind: str, color: str, x: float, y: float, size: float = 12.0, value: int | None = None) -> Obj:
    rgb = (235, 235, 235) if kind == "digit" else COLORS[color]
    return Obj(kind, color, x, y, size, rgb, value)


# ----------------------------------------------------------------------------------------------- the generator
def test_samples_are_a_function_of_split_seed_and_index() -> None:
    a, b = make_sample(17, "test", seed=3), make_sample(17, "test", seed=3)
    assert a == b
    assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    others = [make_sample(17, "test", seed=4), make_sample(17, "validation", seed=3), make_sample(17, "train", seed=3)]
    assert all(o.scene != a.scene for o in others)
    assert ShapesVQA("test", n=5, seed=3)[4] == make_sample(4, "test", seed=3)


def test_hand_made_scene_answers_and_pixels() -> None:
    scene = Scene((30, 30, 30), (
        obj("circle", "red", 12, 12), obj("square", "blue", 50, 14), obj("triangle", "green", 20, 48),
        obj("triangle", "yellow", 44, 50), obj("digit", "white", 32, 30, 14, value=7),
    ))
    assert answer_of(scene, "color", "what color is the circle ?") == "red"
    assert answer_of(scene, "color", "what color is the square ?") == "blue"
    assert answer_of(scene, "exist", "is there a green triangle ?") == "yes"
    assert answer_of(scene, "exist", "is there a green circle ?") == "no"
    assert answer_of(scene, "count", "how many triangles are there ?") == "2"
    assert answer_of(scene, "count", "how many squares are there ?") == "1"
    assert answer_of(scene, "position", "is the circle on the left or right ?") == "left"
    assert answer_of(scene, "position", "is the square on the left or right ?") == "right"
    assert answer_of(scene, "digit", "what digit is shown ?") == "7"

    img = np.asarray(scene.image())
    assert tuple(img[12, 12]) == COLORS["red"] and tuple(img[14, 50]) == COLORS["blue"]
    assert tuple(img[2, 2]) == (30, 30, 30)
    # a 7 lights the top bar and the right side, not the middle bar or the bottom-left
    assert set(SEGMENTS[7]) == set("abc")
    glyph = img[23:37, 28:36].mean(-1) > 128  # the 14 x 8.4 box around (32, 30)
    assert glyph[0].mean() > 0.8 and glyph[:, -1].mean() > 0.8
    assert glyph[7].mean() < 0.3 and glyph[10:, 0].mean() < 0.3
    # 2x upsampled rendering draws the same scene
    big = np.asarray(scene.image(128))
    assert tuple(big[24, 24]) == COLORS["red"] and tuple(big[28, 100]) == COLORS["blue"]


def test_patch_owners_mark_the_cells_an_object_covers() -> None:
    scene = Scene((0, 0, 0), (obj("square", "red", 20, 20, 12),))  # side 0.85 * 12 = ~10: x, y in [15, 25]
    owners = patch_owners(scene, 8)  # 8 px cells: cells 1..3 on each axis are touched, cell 2 fully
    assert owners[2, 2] == 1 and owners.sum() == owners[1:4, 1:4].sum()
    assert owners[0].sum() == 0 and owners[:, 4:].sum() == 0


def test_generated_answers_are_right_and_balanced() -> None:
    samples = list(ShapesVQA("test", n=500))
    for s in samples:
        assert answer_of(s.scene, s.qtype, s.question) == s.answer, s
        assert s.answer in ANSWERS[s.qtype]
        if s.qtype == "color":  # the asked shape's pixels have the answer's colour
            (target,) = [s.scene.objects[t] for t in s.targets]
            assert target.color == s.answer
            x, y = int(target.x), int(target.y)
            assert np.abs(np.asarray(s.image())[y, x].astype(int) - COLORS[s.answer]).max() <= 20
    by_type = collections.Counter(s.qtype for s in samples)
    assert set(by_type) == set(QUESTION_TYPES) and len(set(by_type.values())) == 1
    for qtype in QUESTION_TYPES:
        answers = collections.Counter(s.answer for s in samples if s.qtype == qtype)
        assert set(answers) == set(ANSWERS[qtype])
        assert max(answers.values()) - min(answers.values()) <= 1, (qtype, answers)
    # shapes are about 2x2 cells of the 8x8 token grid, and a scene has a few objects, so the answer lives in a
    # small part of the image
    cells = [(s.scene.owners(8) > 0).sum() for s in samples]
    assert 4 <= np.mean(cells) <= 20


def test_follow_up_questions_are_answered_from_the_scene() -> None:
    rng = np.random.default_rng(0)
    for i in range(100):
        s = make_sample(i)
        for qtype in QUESTION_TYPES:
            qa = ask(s.scene, qtype, rng)
            if qa is not None:
                assert answer_of(s.scene, qtype, qa[0]) == qa[1] and qa[1] in ANSWERS[qtype]


def test_datasets_view() -> None:
    pytest.importorskip("datasets")
    from tokprune.data.hf import to_dataset

    ds = to_dataset("test", n=6)
    assert len(ds) == 6 and ds[3]["question"] == make_sample(3, "test").question
    assert ds[3]["image"].size == (64, 64)


# ----------------------------------------------------------------------------------------------- shipped models
@pytest.fixture(scope="module")
def test_samples() -> list:
    return list(ShapesVQA("test", n=N_TEST))


@pytest.fixture(scope="module")
def llava() -> tuple[Any, Any]:
    from tokprune.reference import load

    return load("llava-shapes")


@pytest.fixture(scope="module")
def qwen() -> tuple[Any, Any]:
    from tokprune.reference import load

    return load("qwen2vl-shapes")


@needs("llava-shapes", "qwen2vl-shapes")
def test_load_is_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokprune.reference import load, names

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loading a reference model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert names() == ["llava-shapes", "qwen2vl-shapes"]
    for name, cls in [("llava-shapes", "LlavaForConditionalGeneration"),
                      ("qwen2vl-shapes", "Qwen2VLForConditionalGeneration")]:
        model, processor = load(name)
        assert type(model).__name__ == cls and not model.training and model.dtype == torch.float32
        assert processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize("name", [pytest.param("llava", marks=needs("llava-shapes")),
                                  pytest.param("qwen", marks=needs("qwen2vl-shapes"))])
def test_shipped_models_are_trained(name: str, request: pytest.FixtureRequest, test_samples: list) -> None:
    from tokprune.reference.evaluate import accuracy

    model, processor = request.getfixturevalue(name)
    acc = accuracy(model, processor, test_samples)
    assert acc.overall >= 0.90, str(acc)


@dataclass
class LowestCLS(CLSAttention):
    """The opposite of FasterVLM: keep the tokens [CLS] attends to least."""

    def vision_scores(self, signals: Any) -> list[torch.Tensor]:
        return [-s for s in super().vision_scores(signals)]


@pytest.fixture
def lowest_cls():
    register_method("test_lowest_cls")(LowestCLS)
    yield "test_lowest_cls"
    METHODS.pop("test_lowest_cls", None)


def at_one_eighth(model: Any, processor: Any, samples: list, methods: tuple[str, ...]) -> dict[str, float]:
    """Accuracy and target recall of each method keeping 8 of the 64 visual tokens."""
    from tokprune.reference.evaluate import accuracy, target_recall

    result = {}
    for method in methods:
        kept: list[torch.Tensor] = []
        with tokprune.pruned(model, method, keep_ratio=0.125):
            result[method] = accuracy(model, processor, samples, kept=kept).overall
        assert all(k.numel() == 8 for k in kept)
        result[method + " recall"] = target_recall(samples, kept)
    return result


@needs("llava-shapes")
def test_which_tokens_are_kept_matters(llava: tuple[Any, Any], test_samples: list, lowest_cls: str) -> None:
    result = at_one_eighth(*llava, test_samples, ("cls", "random", lowest_cls))
    assert result["cls"] >= result["random"] + 0.05, result
    assert result[lowest_cls] <= result["random"] - 0.05, result
    assert result["cls recall"] > result["random recall"] > result[lowest_cls + " recall"], result


@pytest.mark.parametrize("name", [pytest.param("llava", marks=needs("llava-shapes")),
                                  pytest.param("qwen", marks=needs("qwen2vl-shapes"))])
def test_prediction_does_not_depend_on_the_batch(name: str, request: pytest.FixtureRequest) -> None:
    from tokprune.reference.evaluate import encode, family_of

    short = make_sample(4, "test")  # digit question: the shortest prompt, so it is left-padded in a batch
    long = make_sample(3, "test")  # position question: the longest
    assert len(short.question.split()) < len(long.question.split())
    model, processor = request.getfixturevalue(name)
    fam = family_of(model)
    with torch.no_grad():
        alone = model(**encode(processor, fam, [short]), logits_to_keep=1).logits[0, -1]
        batched = model(**encode(processor, fam, [long, short]), logits_to_keep=1).logits[1, -1]
    torch.testing.assert_close(alone, batched, atol=1e-4, rtol=1e-4)


def test_training_is_deterministic_and_round_trips(tmp_path: Any) -> None:
    from safetensors.torch import load_file

    from tokprune.reference import load, read_meta
    from tokprune.reference.evaluate import accuracy
    from tokprune.reference.train import main

    tiny = ["--vision-width", "32", "--text-width", "32", "--vision-layers", "1", "--text-layers", "1",
            "--vision-steps", "2", "--steps", "3", "--batch", "8", "--eval-n", "10", "--eval-every", "3"]
    for run in ("a", "b"):
        main(["--arch", "llava", "--out", str(tmp_path / run), *tiny])
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the saved checkpoint is the one whose validation accuracy was recorded: reloading reproduces it exactly
    model, processor = load(tmp_path / "a")
    recorded = read_meta(tmp_path / "a")["validation"]["best_accuracy"]
    assert accuracy(model, processor, list(ShapesVQA("validation", n=10))).overall == recorded


@needs("llava-shapes")
def test_kept_token_picture_shows_what_cls_kept(llava: tuple[Any, Any]) -> None:
    from PIL import Image

    from tokprune.viz import kept_mask, kept_picture, kept_text

    model, processor = llava
    sample = make_sample(1, "test")
    with tokprune.pruned(model, "cls", keep=8):
        from tokprune.reference.evaluate import predict

        predict(model, processor, [sample])
        kept = tokprune.last_record(model).kept[0][0]
    mask = kept_mask(kept, 8)
    assert mask.sum() == 8 and mask.flatten()[kept].all()
    # [CLS] attention of the trained ViT points at objects: most kept cells hold one
    objects = sample.scene.owners(8) > 0
    assert (mask & objects).sum() >= 6, kept_text(kept, 8, objects)
    text = kept_text(kept, 8, objects).split("\n")
    assert len(text) == 8 and sum(line.count("#") + line.count("+") for line in text) == 8
    pic = np.asarray(kept_picture(sample.image(), kept, 8, size=64, lines=False)).astype(int)
    img = np.asarray(sample.image()).astype(int)
    cells = np.kron(mask, np.ones((8, 8), dtype=bool))
    assert np.array_equal(pic[cells], img[cells])  # kept cells untouched
    assert (pic[~cells] <= img[~cells]).all() and (pic[~cells] < img[~cells]).any()  # dropped cells dimmed
    assert isinstance(kept_picture(sample.image(), kept, 8), Image.Image)


@needs("qwen2vl-shapes")
def test_which_tokens_are_kept_matters_on_qwen(qwen: tuple[Any, Any], test_samples: list) -> None:
    """Qwen2-VL has no [CLS]: FastV's last-token attention is the signal there, and it must beat the floor."""
    result = at_one_eighth(*qwen, test_samples, ("fastv", "random"))
    assert result["fastv"] >= result["random"] + 0.05, result
    assert result["fastv recall"] > result["random recall"], result
