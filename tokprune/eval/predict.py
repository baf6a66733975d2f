"""Answers of a (possibly pruned) model to batches of image questions, with what each prefill cost.

Shared by ``tokprune eval`` and the lmms-eval bridge, so that both score the same predictions:

* :func:`generate` greedy-decodes answers (``generate_until``);
* :func:`choice_losses` returns the summed negative log-likelihood of each continuation (``loglikelihood``;
  multiple choice takes the lowest loss).

Each prediction carries the visual tokens the prefill kept (after the last stage, and averaged over LLM layers),
the LLM tokens after pruning and the analytic prefill TFLOPs (whole model, and the papers' 3ndm MACs), read from
tokprune's record of that prefill (:func:`tokprune.flops.from_record`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from tokprune import flops

#: encode options a variant may set (see :mod:`tokprune.eval.variants`)
EncodeOptions = dict[str, Any]


@dataclass
class Cost:
    """What one sample's prefill processed."""

    visual_final: int  # visual tokens entering the last LLM layer
    visual_mean: float  # visual tokens averaged over LLM layers
    input_tokens: int  # LLM tokens after the last pruning stage (text + visual_final)
    tflops: float  # analytic prefill FLOPs, whole model, logits for the last token (10^12)
    tflops_3ndm: float  # the papers' convention: LLM visual tokens only, MACs (10^12)
    visual_special: int = 0  # of visual_final: special tokens kept on top of the budget (LLaVA-NeXT's newlines)


@dataclass
class Prediction:
    text: str
    cost: Cost


def _image_token_id(config: Any) -> int:
    for key in ("image_token_id", "image_token_index"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"{type(config).__name__} names no image token id")


def encode(bundle: Any, prompts: Sequence[str], images: Sequence[Image.Image],
           options: EncodeOptions | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for one image per prompt, left-padded, on the model's device. ``options["image_tokens"]``
    writes that many image tokens per image (the LLaVA downsample baseline); ``options["processor_kwargs"]``
    goes to the processor call (Qwen's pixel budget)."""
    options = options or {}
    proc = bundle.processor
    if "image_tokens" in options:
        tok = bundle.tokenizer
        tag = proc.image_token
        texts = [p.replace(tag, tag * int(options["image_tokens"])) for p in prompts]
        enc = dict(tok(texts, return_tensors="pt", padding=True))
        enc.update(proc.image_processor(list(images), return_tensors="pt"))
    else:
        enc = dict(proc(images=list(images), text=list(prompts), return_tensors="pt", padding=True,
                        **options.get("processor_kwargs", {})))
    enc.pop("token_type_ids", None)
    if bundle.family in ("llava", "llava_next", "llava_onevision"):  # from each row's first real token, as generate()
        enc["position_ids"] = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
    device = bundle.model.device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in enc.items()}


def costs(bundle: Any, inputs: dict[str, torch.Tensor]) -> list[Cost]:
    """Per-sample cost of the prefill that just ran on ``inputs`` (the record when patched, else the inputs)."""
    import tokprune

    model, config = bundle.model, bundle.model.config
    record = tokprune.last_record(model) if tokprune.is_patched(model) else None
    if record is None:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        counts = (ids == _image_token_id(config)).sum(1).tolist()
        record = SimpleNamespace(n_visual=[[int(c)] for c in counts], seq_len=mask.sum(1).tolist(), stages=[],
                                 merged=None)
    schedules = flops.from_record(config, record, **flops.geometry_from_inputs(inputs))
    out = []
    for b, s in enumerate(schedules):
        full = flops.estimate(config, s, "full", logits_to_keep=1).tflops
        paper = flops.estimate(config, s, "3ndm").tflops
        out.append(Cost(int(s.visual[-1]), sum(s.visual) / len(s.visual), int(s.n_text + s.visual[-1]), full, paper,
                        _special_kept(record, b)))
    return out


def _special_kept(record: Any, b: int) -> int:
    """Special tokens (no patch: LLaVA-NeXT's newlines) among sample ``b``'s visual tokens after the last stage."""
    special = getattr(record, "special", None)
    if not special:
        return 0
    kept = record.kept[b] if getattr(record, "stages", None) else [None] * len(special[b])
    return sum(int((mask.cpu() if k is None else mask.cpu()[k.cpu()]).sum()) for mask, k in zip(special[b], kept))


def _pad_id(bundle: Any) -> int:
    tok = bundle.tokenizer
    for v in (tok.pad_token_id, tok.eos_token_id):
        if isinstance(v, int):
            return v
    raise ValueError("the tokenizer has neither a pad nor an eos token")


@torch.inference_mode()
def generate(bundle: Any, prompts: Sequence[str], images: Sequence[Image.Image], max_new_tokens: int,
             options: EncodeOptions | None = None, until: Sequence[str] = ()) -> list[Prediction]:
    """Greedy answers (special tokens removed, cut at the first of ``until``) with their prefill costs."""
    enc = encode(bundle, prompts, images, options)
    if max_new_tokens == 1:  # one greedy token is the argmax of one prefill: skip generate()'s machinery
        new = bundle.model(**enc, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        spent = costs(bundle, enc)
    else:
        gen_in = {k: v for k, v in enc.items() if k != "position_ids"}  # generate() derives them from the mask
        out = bundle.model.generate(**gen_in, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=_pad_id(bundle))
        spent = costs(bundle, gen_in)
        new = out[:, enc["input_ids"].shape[1]:]
    texts = bundle.tokenizer.batch_decode(new, skip_special_tokens=True)
    result = []
    for text, cost in zip(texts, spent):
        for stop in until:
            if stop and stop in text:
                text = text[:text.index(stop)]
        result.append(Prediction(text.strip(), cost))
    return result


@torch.inference_mode()
def choice_losses(bundle: Any, contexts: Sequence[str], continuations: Sequence[str], images: Sequence[Image.Image],
                  options: EncodeOptions | None = None) -> list[tuple[float, bool, Cost]]:
    """For each (context prompt, continuation): the summed NLL of the continuation's tokens (a loss: lower is
    likelier), whether greedy decoding would produce it, and the prefill cost."""
    tok = bundle.tokenizer
    full = [c + x for c, x in zip(contexts, continuations)]
    n_cont = []
    for c, f in zip(contexts, full):
        a, b = tok(c, add_special_tokens=True)["input_ids"], tok(f, add_special_tokens=True)["input_ids"]
        if len(b) <= len(a) or b[:len(a)] != a:
            raise ValueError(f"the continuation of {c!r} does not tokenize as a suffix of it: {f!r}")
        n_cont.append(len(b) - len(a))
    enc = encode(bundle, full, images, options)
    logits = bundle.model(**enc).logits.float()
    spent = costs(bundle, enc)
    ids = enc["input_ids"]
    out = []
    for row, n in enumerate(n_cont):
        target = ids[row, -n:]
        logp = torch.log_softmax(logits[row, -n - 1:-1], dim=-1)
        loss = -logp.gather(-1, target[:, None]).sum().item()
        greedy = bool((logp.argmax(-1) == target).all())
        out.append((loss, greedy, spent[row]))
    return out
