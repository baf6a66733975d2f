"""Shared test settings."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models gain nothing from intra-op threads, and spinning threads crawl when the CPU is shared; the
    real-size (slow) tests keep every thread."""
    n = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
