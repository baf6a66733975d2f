"""Shared test settings."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Runtime matrices that run every method through one piece of machinery (beams, re-packing, threads, copies). On
#: the older transformers releases of CI's window (``TOKPRUNE_OLDER_RELEASE=1``) they keep one method of each
#: mechanism: the machinery meets transformers there, the methods' own rules do not change with its release.
BREADTH_FILES = {"test_beam.py", "test_repack.py", "test_threads.py", "test_copies.py"}
REPRESENTATIVE = {"random", "fastv", "pdrop", "visionzip", "divprune", "flowcut", "vflowopt", "sparsevlm"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("TOKPRUNE_OLDER_RELEASE"):
        return
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        method = params.params.get("method") if params is not None else None
        breadth = item.path.name in BREADTH_FILES and isinstance(method, str)
        if breadth and not set(method.split("+")) <= REPRESENTATIVE:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models gain nothing from intra-op threads, and spinning threads crawl when the CPU is shared; the
    real-size (slow) tests keep every thread."""
    n = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
