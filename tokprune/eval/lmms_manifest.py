"""The ``lmms_eval.models`` entry point of tokprune: registers the model id ``tokprune`` with lmms-eval.

Deliberately tiny: lmms-eval loads every plugin manifest in one try block, so an import error here (or an
expensive import) would hide or slow every plugin. It imports only lmms-eval's registry; the model class
(:mod:`tokprune.eval.lmms_model`, which imports torch and tokprune) is named by path and loaded lazily.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "tokprune"
SIMPLE_CLASS = "tokprune.eval.lmms_model.TokPruneLMM"


def manifest() -> Any:
    """The ``ModelManifest`` lmms-eval reads from the entry point (a unique id: never replaces a built-in)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=SIMPLE_CLASS)
