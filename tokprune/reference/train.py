"""Train a reference model on Shapes-VQA on a CPU: ``python -m tokprune.reference.train --arch llava|qwen2vl``.

Two stages, both with the auxiliary objectives of :mod:`tokprune.reference.aux`:

1. **vision** (``--vision-steps``): only the ViT (+ projector / merger) runs, trained on the scene objective
   (from [CLS] for LLaVA) and the per-token objective. Cheap, and it gives the LLM informative tokens from its
   first step.
2. **joint** (``--steps``): the whole model end to end on the answer token's cross-entropy, plus the auxiliary
   losses (weight ``--aux``) so the vision side keeps its meaning.

Data is streamed: step ``s`` uses training samples ``[s * batch, (s + 1) * batch)``, so a run is a pure function
of its arguments (deterministic on one thread). ``--minutes`` caps the wall time: the run stops early, keeps the
checkpoint with the best validation accuracy and says so in ``reference.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokprune.data.shapes import QUESTION_TYPES, Sample, ShapesVQA, ask
from tokprune.reference.arch import GRID, Sizes, build_model, build_processor, default_sizes
from tokprune.reference.aux import AuxHeads, Capture, scene_targets, token_targets
from tokprune.reference.evaluate import accuracy, answer_ids, encode
from tokprune.reference.store import save
from tokprune.reference.text import prompt

log = logging.getLogger("tokprune.reference.train")
VISION_OFFSET = 10**8  # training indices of the vision stage, disjoint from the joint stage's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokprune.reference.train", description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("llava", "qwen2vl"), required=True)
    p.add_argument("--out", type=Path, help="output directory (default tokprune/reference/weights/<arch>-shapes)")
    p.add_argument("--init", type=Path, help="start from this saved model directory (fine-tuning) instead of random "
                   "weights; the auxiliary heads start fresh")
    p.add_argument("--note", default="", help="free text recorded in reference.json (e.g. the lineage of --init)")
    p.add_argument("--types", default=",".join(QUESTION_TYPES), help="comma-separated question types")
    p.add_argument("--vision-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=4000, help="joint steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--extra-questions", type=int, default=3,
                   help="further questions about the same image appended after the first answer (more QA "
                        "supervision per image; the first question has the evaluation format)")
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--aux", type=float, default=0.5, help="weight of the auxiliary losses in the joint stage")
    p.add_argument("--where", type=float, default=0.5, help="weight of the token row/column objective: without it "
                   "the position question stays at chance on both families")
    p.add_argument("--scene", type=float, help="weight of the scene objective (default 1 for llava, on [CLS]; 0.1 for "
                   "qwen2vl, where it reads the mean of the visual tokens and, at full weight, slows their learning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--minutes", type=float, default=75.0, help="wall-time cap for the whole run")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    for name in vars(Sizes()):
        p.add_argument("--" + name.replace("_", "-"), type=int, help="model size (default: the shipped size)")
    return p.parse_args(argv)


def dialogue(family: str, sample: Sample, extra: int, seed: int, types: tuple[str, ...]) -> str:
    """The sample's prompt and answer, followed by up to ``extra`` more questions (each of another type) about
    the same scene with their answers: ``user <image> q1 assistant : a1 user q2 assistant : a2 ...``."""
    text = f"{prompt(family, sample.question)} {sample.answer}"
    rng = np.random.default_rng([seed, 7, sample.index])
    added = 0
    for qtype in rng.permutation([t for t in types if t != sample.qtype]):
        if added == extra:
            break
        qa = ask(sample.scene, str(qtype), rng)
        if qa is not None:
            text += f" user {qa[0]} assistant : {qa[1]}"
            added += 1
    return text


def answer_positions(input_ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """(B, N) bool: tokens that are answers, i.e. that follow ``assistant :``."""
    a, c = tokenizer.convert_tokens_to_ids(["assistant", ":"])
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, 2:] = (input_ids[:, :-2] == a) & (input_ids[:, 1:-1] == c)
    return mask


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    """One training run: the model, its auxiliary heads, the data streams, the best checkpoint so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.family = args.arch
        given = {k: getattr(args, k) for k in vars(Sizes()) if getattr(args, k) is not None}
        self.sizes = dataclasses.replace(default_sizes(self.family), **given)
        self.model = build_model(self.family, self.sizes, args.seed)
        if args.init is not None:
            from transformers import AutoModelForImageTextToText

            start = AutoModelForImageTextToText.from_pretrained(args.init, dtype=torch.float32)
            self.model.load_state_dict(start.state_dict())
        self.processor = build_processor(self.family)
        text_width = self.sizes.text_width
        scene_dim = self.sizes.vision_width if self.family == "llava" else text_width
        torch.manual_seed(args.seed + 1)
        self.heads = AuxHeads(scene_dim, text_width, GRID, args.where)
        self.scene_weight = args.scene if args.scene is not None else (1.0 if self.family == "llava" else 0.1)
        self.capture = Capture(self.model, self.family)
        self.types = tuple(args.types.split(","))
        self.train_data = ShapesVQA("train", n=None, seed=args.seed, types=self.types)
        self.val = list(ShapesVQA("validation", n=args.eval_n, seed=args.seed, types=self.types))
        self.history: list[dict[str, Any]] = []
        self.best: tuple[float, dict[str, torch.Tensor] | None, int] = (-1.0, None, -1)
        self.t0 = time.time()
        self.out = args.out or Path(__file__).parent / "weights" / f"{self.family}-shapes"

    def minutes(self) -> float:
        return (time.time() - self.t0) / 60

    def optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                 lr=lr, betas=(0.9, 0.98))

    def aux_losses(self, samples: list) -> tuple[torch.Tensor, dict[str, float]]:
        ls, acc_s = self.heads.scene_loss(self.capture.scene, scene_targets(samples))
        lt, acc_t = self.heads.token_loss(self.capture.tokens, token_targets(samples, GRID))
        return self.scene_weight * ls + lt, {"scene_acc": acc_s, "token_acc": acc_t}

    def vision_params(self) -> list[torch.nn.Parameter]:
        base = self.model.model
        mods = [base.vision_tower, base.multi_modal_projector] if self.family == "llava" else [base.visual]
        return [p for m in mods for p in m.parameters()] + list(self.heads.parameters())

    # ------------------------------------------------------------------ stages
    def run_vision(self) -> None:
        from tqdm import tqdm

        a = self.args
        params = self.vision_params()
        opt = self.optimizer(params, a.vision_lr)
        self.model.train()
        bar = tqdm(range(a.vision_steps), desc="vision", file=sys.stderr, mininterval=30, ascii=True)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, a.vision_steps, a.warmup, a.vision_lr)
            samples = self.train_data.batch(VISION_OFFSET + step * a.batch, a.batch)
            enc = encode(self.processor, self.family, samples)
            if self.family == "llava":
                self.model.model.get_image_features(pixel_values=enc["pixel_values"], vision_feature_layer=-2,
                                                    vision_feature_select_strategy="default")
            else:
                self.model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
            loss, stats = self.aux_losses(samples)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % a.log_every == 0 or step == a.vision_steps - 1:
                msg = f"vision step {step} loss {loss.item():.4f} scene {stats['scene_acc']:.3f} " \
                      f"token {stats['token_acc']:.3f} t {self.minutes():.1f}m"
                log.info(msg)
                bar.set_postfix_str(f"loss {loss.item():.3f}")
            if self.minutes() > a.minutes / 4:
                log.info("vision stage stopped at step %d: a quarter of the time cap is spent", step)
                break

    def run_joint(self) -> int:
        from tqdm import tqdm

        a = self.args
        params = list(self.model.parameters()) + list(self.heads.parameters())
        opt = self.optimizer(params, a.lr)
        bar = tqdm(range(a.steps), desc="joint", file=sys.stderr, mininterval=30, ascii=True)
        step = 0
        for step in bar:
            self.model.train()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, a.steps, a.warmup, a.lr)
            samples = self.train_data.batch(step * a.batch, a.batch)
            texts = [dialogue(self.family, x, a.extra_questions, a.seed, self.types) for x in samples]
            enc = encode(self.processor, self.family, samples, texts)
            ids = enc["input_ids"]
            is_answer = answer_positions(ids, self.processor.tokenizer)
            all_logits = self.model(**enc).logits
            qa = F.cross_entropy(all_logits[:, :-1][is_answer[:, 1:]], ids[is_answer])
            # the first answer of each row is the evaluation task: report its accuracy
            first = is_answer.int().argmax(1)
            logits = all_logits[torch.arange(len(samples)), first - 1]
            target = answer_ids(self.processor, samples)
            aux, stats = self.aux_losses(samples)
            loss = qa + a.aux * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % a.log_every == 0:
                train_acc = (logits.argmax(-1) == target).float().mean().item()
                log.info(f"joint step {step} qa {qa.item():.4f} aux {aux.item():.4f} train_acc {train_acc:.3f} "
                         f"scene {stats['scene_acc']:.3f} token {stats['token_acc']:.3f} t {self.minutes():.1f}m")
                bar.set_postfix_str(f"qa {qa.item():.3f}")
            last = step == a.steps - 1 or self.minutes() > a.minutes
            if (step + 1) % a.eval_every == 0 or last:
                self.validate(step)
            if last:
                break
        return step + 1

    def validate(self, step: int) -> None:
        self.model.eval()
        acc = accuracy(self.model, self.processor, self.val)
        self.history.append({"step": step + 1, "minutes": round(self.minutes(), 2), **acc.as_dict()})
        log.info(f"validation step {step + 1}: {acc}")
        if acc.overall >= self.best[0]:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = (acc.overall, state, step + 1)
            self.model.save_pretrained(self.out / "best")  # inspectable while the run goes on

    def finish(self, joint_steps: int) -> Path:
        a = self.args
        out = self.out
        best_acc, state, best_step = self.best
        if state is not None:
            self.model.load_state_dict(state)
        self.model.eval()
        self.capture.remove()
        train_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        meta = {
            "name": f"{self.family}-shapes",
            "note": a.note,
            "question_types": list(self.types),
            "prompt": "user <image> {question} assistant :" if self.family == "llava"
            else "user <|vision_start|><|image_pad|><|vision_end|> {question} assistant :",
            "sizes": dataclasses.asdict(self.sizes),
            "train": {"args": train_args, "joint_steps_run": joint_steps, "best_step": best_step,
                      "minutes": round(self.minutes(), 1), "device": "cpu", "threads": a.threads,
                      "torch": torch.__version__},
            "validation": {"n": a.eval_n, "best_accuracy": best_acc, "history": self.history},
        }
        shutil.rmtree(out / "best", ignore_errors=True)
        path = save(self.model, self.processor, self.family, out, meta)
        log.info("saved %s (best validation accuracy %.3f at joint step %d)", path, best_acc, best_step)
        return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # logs reach a redirected file as they happen
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    log.info("args %s", json.dumps({k: str(v) for k, v in vars(args).items()}))
    trainer = Trainer(args)
    n = sum(p.numel() for p in trainer.model.parameters())
    log.info("%s: %.2fM parameters", args.arch, n / 1e6)
    trainer.run_vision()
    steps = trainer.run_joint()
    trainer.finish(steps)


if __name__ == "__main__":
    main()
