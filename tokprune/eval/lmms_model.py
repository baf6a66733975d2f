"""tokprune's lmms-eval model: any supported Hugging Face VLM (or a reference model), pruned by tokprune.

    lmms-eval --model tokprune --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=cls,keep=64 --tasks pope

``model_args``: ``pretrained`` (hub id, local directory, or ``llava-shapes`` / ``qwen2vl-shapes``), ``method`` and
``keep`` / ``keep_ratio`` (no method: the unpruned model), ``device``, ``dtype``, ``attn``, ``template``,
``max_new_tokens``, and any other key as an option of the method (e.g. ``layer=2`` for fastv). A simple-class
model: ``generate_until`` greedy-decodes, ``loglikelihood`` returns the continuation's NLL (a loss, as
multiple_choice takes the argmin) wrapped in ``GenerationResult`` (lmms-eval 0.7.3 stringifies bare tuples).
``TokenCounts.input_tokens`` is the LLM input length after pruning. Exceptions propagate: a failure is never an
empty answer. Data-parallel runs (``accelerate launch -m lmms_eval ...`` or ``torchrun``) bind each process to its
LOCAL_RANK GPU; lmms-eval shards the requests and gathers the results.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Sequence
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from tokprune.eval import predict


def _device(device: str | None) -> str:
    import torch

    if device and device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def answer_length(bundle: Any, gen_kwargs: dict[str, Any]) -> int:
    """Tokens to generate for one request, as ``tokprune eval`` does: the bundle's fixed answer length (an explicit
    ``max_new_tokens``, or a reference model's one token), else the task's ``max_new_tokens``, else the model's
    default (16)."""
    return int(bundle.answer_tokens or gen_kwargs.get("max_new_tokens") or bundle.max_new_tokens)


def _close_process_group() -> None:
    """Destroy the process group lmms-eval opened for a data-parallel run before the interpreter exits.

    lmms-eval 0.7.3 calls ``init_process_group("gloo")`` on CPU and never destroys it; gloo's threads then meet
    interpreter teardown and a rank may abort ("terminate called without an active exception", exit -6) after
    every result was written, which fails the whole ``torchrun``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


atexit.register(_close_process_group)


class TokPruneLMM(lmms):
    """See the module docstring. ``costs`` collects ``(task, doc_id, Cost)`` of every request answered."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, method: str | None = None, keep: int | None = None,
                 keep_ratio: float | None = None, device: str | None = None, dtype: str | None = None,
                 attn: str = "sdpa", template: str | None = None, max_new_tokens: int | None = None,
                 batch_size: int | str = 1, bundle: Any = None, options: predict.EncodeOptions | None = None,
                 **method_options: Any) -> None:
        super().__init__()
        import torch

        method_options.pop("max_batch_size", None)
        method_options.pop("device_map", None)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.options = dict(options or {})
        self.costs: list[tuple[str, Any, predict.Cost]] = []
        self._undo: Any = None
        if bundle is None:
            if not pretrained:
                raise ValueError("model_args needs pretrained=<hub id, directory, llava-shapes or qwen2vl-shapes>")
            from tokprune.eval import models

            dev = _device(device)
            dtype = dtype or ("bfloat16" if dev.startswith("cuda") else "float32")
            bundle = models.load(str(pretrained), device=dev, dtype=getattr(torch, str(dtype)), attn=attn,
                                 template=template, max_new_tokens=max_new_tokens)
            if method:
                from tokprune.eval.variants import Variant

                variant = Variant(str(method), keep=keep, keep_ratio=keep_ratio,
                                  options=tuple(sorted(method_options.items())))
                from tokprune.eval.models import visual_tokens

                self.options, self._undo = variant.start(bundle, visual_tokens(str(pretrained)))
            elif keep is not None or keep_ratio is not None or method_options:
                raise ValueError("keep / keep_ratio / method options given without method=")
        self.bundle = bundle

    # ------------------------------------------------------------------ lmms-eval's interface
    @property
    def device(self) -> Any:
        return self.bundle.model.device

    def _doc_image(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> Any:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1:
            raise NotImplementedError(f"tokprune's lmms-eval model takes one image per request; {task} doc "
                                      f"{doc_id} has {len(visuals)}")
        return visuals[0].convert("RGB")

    def _batches(self, requests: Sequence[Instance]) -> Iterator[list[tuple[int, Instance]]]:
        indexed = list(enumerate(requests))
        for i in range(0, len(indexed), self.batch_size_per_gpu):
            yield indexed[i:i + self.batch_size_per_gpu]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        out: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[tuple[int, tuple[str, ...]], list[tuple[int, Instance]]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs, *_ = req.args
            until = gen_kwargs.get("until") or ()
            until = (until,) if isinstance(until, str) else tuple(until)
            n = answer_length(self.bundle, gen_kwargs)
            groups.setdefault((n, until), []).append((i, req))
        for (n, until), members in groups.items():
            for j in range(0, len(members), self.batch_size_per_gpu):
                part = members[j:j + self.batch_size_per_gpu]
                prompts, images = [], []
                for _, req in part:
                    ctx, _, doc_to_visual, doc_id, task, split = req.args
                    prompts.append(self.bundle.prompt(ctx))
                    images.append(self._doc_image(doc_to_visual, doc_id, task, split))
                preds = predict.generate(self.bundle, prompts, images, n, self.options, until)
                for (i, req), p in zip(part, preds):
                    self.costs.append((req.args[4], req.args[3], p.cost))
                    n_out = len(self.bundle.tokenizer(p.text, add_special_tokens=False)["input_ids"])
                    out[i] = GenerationResult(text=p.text, token_counts=TokenCounts(
                        input_tokens=p.cost.input_tokens, output_tokens=n_out))
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        out: list[GenerationResult] = [None] * len(requests)  # type: ignore[list-item]
        for part in self._batches(requests):
            contexts, conts, images = [], [], []
            for _, req in part:
                ctx, continuation, doc_to_visual, doc_id, task, split = req.args
                contexts.append(self.bundle.prompt(ctx))
                conts.append(continuation)
                images.append(self._doc_image(doc_to_visual, doc_id, task, split))
            for (i, req), (loss, greedy, cost) in zip(part, predict.choice_losses(self.bundle, contexts, conts,
                                                                                  images, self.options)):
                self.costs.append((req.args[4], req.args[3], cost))
                out[i] = GenerationResult(text=(loss, greedy),  # type: ignore[arg-type]
                                          token_counts=TokenCounts(input_tokens=cost.input_tokens))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("tokprune's lmms-eval model does not do multi-round generation")

    def close(self) -> None:
        """Remove the pruning patch this instance applied (if it applied one)."""
        if self._undo is not None:
            self._undo()
            self._undo = None
