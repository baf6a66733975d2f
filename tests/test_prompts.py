"""Interleaved few-shot prompts: the span map found from token ids, on every family, and few-shot Shapes-VQA."""

from __future__ import annotations

import pytest
import torch

from tokprune.data.icl import POOL_START, ShapesICL
from tokprune.prompts import icl, icl_batch, span_map
from tokprune.testing import families, make_image, tiny_model

MODELS = {f: tiny_model(f) for f in families()}
QUESTIONS = ["what color is it ?", "how many dog ?", "is it a cat ?", "what is on the left ?"]
ANSWERS = ["red", "two", "yes", "cat"]


def shots(n: int, seed: int = 0) -> list[tuple]:
    """``n`` demonstrations with images of different sizes (so the image token counts differ)."""
    return [(make_image(56 + 28 * (i % 3), 56 + 28 * (i % 2), seed=seed + i), QUESTIONS[i % 4], ANSWERS[i % 4])
            for i in range(n)]


QUERY = (make_image(84, 56, seed=99), "how many cat ?")


def decode(proc, ids) -> str:
    return proc.tokenizer.decode(ids).replace(" ", "")


def n_image_tokens_alone(proc, image) -> int:
    """How many visual tokens ``image`` gets in a one-image prompt (the processor's own layout)."""
    from tokprune.prompts import image_tag

    x = proc(images=[image], text=f"user {image_tag(proc)} what ? assistant :", return_tensors="pt")
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    return int((x["input_ids"] == image_id).sum())


@pytest.mark.parametrize("family", families())
@pytest.mark.parametrize("n_shots", [0, 1, 4])
def test_span_map_finds_each_image_and_its_paired_text(family, n_shots):
    model, proc = MODELS[family]
    demos = shots(n_shots)
    prompt = icl(proc, demos, QUERY)
    ids = prompt.inputs["input_ids"][0]
    spans = prompt.spans[0]
    assert [s.role for s in spans] == ["shot"] * n_shots + ["query"]
    assert [s.shot for s in spans] == [*range(n_shots), None]
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    every = torch.cat([s.tokens for s in spans])
    assert torch.equal(every, (ids == image_id).nonzero()[:, 0])  # all image tokens, each once, in order
    for s, image in zip(spans, [*(d[0] for d in demos), QUERY[0]]):
        assert s.tokens.numel() == n_image_tokens_alone(proc, image)
        assert torch.equal(s.tokens, torch.arange(int(s.tokens[0]), int(s.tokens[-1]) + 1))  # one run
    for s, (_, q, a) in zip(spans, demos):  # a demonstration's text: its question and answer, nothing after
        text = decode(proc, ids[s.text])
        assert text.startswith(q.replace(" ", "")) and text.endswith(a)
    q_text = decode(proc, ids[spans[-1].text])
    assert q_text.startswith(QUERY[1].replace(" ", "")) and q_text.endswith("assistant:")
    with torch.no_grad():
        assert torch.isfinite(model(**prompt.inputs).logits).all()  # the prompt is one the model accepts


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batch_of_prompts_with_different_numbers_of_shots(family):
    _, proc = MODELS[family]
    batch = icl_batch(proc, [(shots(4), QUERY), (shots(1, seed=7), QUERY)])
    mask = batch.inputs["attention_mask"]
    assert [len(r) for r in batch.spans] == [5, 2]
    assert bool((mask[1] == 0).any())  # the shorter prompt is left-padded
    for b, row in enumerate(batch.spans):
        single = icl(proc, *([(shots(4), QUERY), (shots(1, seed=7), QUERY)][b]))
        offset = int((mask[b] == 0).sum())
        for s, t in zip(row, single.spans[0]):
            assert torch.equal(s.tokens - offset, t.tokens) and torch.equal(s.text - offset, t.text)


def test_adjacent_images_need_counts():
    _, proc = MODELS["llava"]
    x = proc(images=[make_image(56, 56), make_image(56, 56)], text="user <image><image> what ? assistant :",
             return_tensors="pt")
    with pytest.raises(ValueError, match="counts="):
        span_map(proc, x["input_ids"][0], n_shots=1)
    spans = span_map(proc, x["input_ids"][0], n_shots=1, counts=[16, 16])
    assert [s.tokens.numel() for s in spans] == [16, 16] and spans[0].text.numel() == 0


def test_prompt_without_images_is_an_error():
    _, proc = MODELS["llava"]
    ids = proc.tokenizer("user what ? assistant :", return_tensors="pt")["input_ids"][0]
    with pytest.raises(ValueError, match="no image tokens"):
        span_map(proc, ids)


def test_shapes_icl_episodes_are_deterministic_and_disjoint():
    data = ShapesICL("test", shots=4, n=20)
    a, b = data[3], ShapesICL("test", shots=4, n=20)[3]
    assert [s.index for s in a.shots] == [s.index for s in b.shots] and a.query.index == b.query.index == 3
    for ep in data:
        assert len(ep.shots) == 4 and len({s.index for s in ep.shots}) == 4
        assert all(s.qtype == ep.query.qtype for s in ep.shots)
        assert all(s.index >= POOL_START for s in ep.shots) and ep.query.index < POOL_START
    assert len({tuple(s.answer for s in ep.shots) for ep in data}) > 1  # demonstrations vary
    with pytest.raises(ValueError):
        ShapesICL(shots=-1)


def test_four_shot_prompt_on_a_reference_model():
    from tokprune.reference import load
    from tokprune.reference.arch import image_size
    from tokprune.reference.evaluate import family_of

    model, proc = load("llava-shapes")
    ep = ShapesICL("test", shots=4, n=1)[0]
    demos, query = ep.triples(image_size(family_of(model)))
    prompt = icl(proc, demos, query)
    assert [s.tokens.numel() for s in prompt.spans[0]] == [64] * 5
    with torch.no_grad():
        logits = model(**prompt.inputs).logits[0, -1]
    assert torch.isfinite(logits).all()


CHAT = ("{% for m in messages %}{{ m['role'] }} :{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>"
        "{% else %} {{ c['text'] }}{% endif %}{% endfor %} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}")


def test_chat_template_is_used_when_the_processor_has_one():
    _, proc = tiny_model("llava")
    proc.chat_template = CHAT
    demos = shots(2)
    prompt = icl(proc, demos, QUERY)
    assert prompt.texts[0].startswith("user : <image> what color is it ? </s> assistant : red </s>")
    ids = prompt.inputs["input_ids"][0]
    for s, (_, q, a) in zip(prompt.spans[0], demos):
        text = decode(proc, ids[s.text])
        assert text.startswith(q.replace(" ", "")) and text.endswith(a) and "</s>" not in text
    assert decode(proc, ids[prompt.spans[0][-1].text]).endswith("assistant:")
