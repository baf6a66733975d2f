"""tokprune's hooks run outside ``torch.compile``, so a patched model can be compiled.

Every hook and attention tap tokprune installs decides on the host (which tokens to keep, how many, where they go)
and keeps per-prefill state in Python objects. Traced by TorchDynamo, that code would be specialised on the first
call's values and its side effects (signals appended to per-thread lists, records, the prefill state) replayed or
lost: a compiled model then saw an empty tap list, or reused an earlier image's decision. :func:`eager` marks a hook
with ``torch.compiler.disable``: Dynamo breaks the graph at the hook, runs it (and everything it calls) as plain
Python, and compiles the model code around it.

What follows for a compiled, patched model: the decoder (and any module that runs outside tokprune's hooks) is
compiled; at an image prefill the vision encoder runs eagerly, since the prefill hook runs it to read its signals;
an LLM-stage method's layer hooks break the decoder's graph at the layers they hook.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager(fn: F) -> F:
    """``fn`` (a hook, a tap, a wrapped model method) run as plain Python even inside a compiled model: Dynamo
    skips it and every frame it calls (``recursive=True``). Idempotent: a function it returned comes back as is."""
    if getattr(fn, "_tokprune_eager", False):
        return fn
    wrapped = torch.compiler.disable(fn, recursive=True)
    wrapped._tokprune_eager = True
    return wrapped


_frames_at_reset = 0


def forget_compiled_code() -> None:
    """Drop the code ``torch.compile`` traced so far, when it traced any since the last call: called whenever
    tokprune adds or removes hooks (``apply``, ``remove``, the end of a ``pruned`` block, a copy's own patch).

    TorchDynamo does not guard compiled code on the hooks of the modules it inlines (its default
    ``skip_nnmodule_hook_guards``) nor on the attention-function table tokprune's taps wrap, so code compiled before
    a patch changed would go on running the old patch, or none: wrong answers with no error. After the reset every
    compiled model (this one and any other in the process) traces again at its next call, under the hooks it has
    then. A process that never compiled anything pays nothing. It also turns TorchDynamo's guards on module hooks on
    (``skip_nnmodule_hook_guards = False``, for the process): one compiled decoder-layer forward serves every layer,
    and without those guards the code traced for a layer without tokprune's hooks ran for a hooked one."""
    global _frames_at_reset
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return
    # one code object serves every decoder layer; with hook guards skipped, code compiled for a layer without
    # tokprune's hooks would be reused for a hooked one (TranSPrune's observers were skipped from the second call on)
    dynamo.config.skip_nnmodule_hook_guards = False
    try:
        from torch._dynamo.utils import counters

        frames = int(counters["frames"]["total"])
    except (ImportError, KeyError, TypeError):  # an internal that moved: reset every time, still correct
        frames = _frames_at_reset + 1
    if frames != _frames_at_reset:
        torch.compiler.reset()
        _frames_at_reset = frames
