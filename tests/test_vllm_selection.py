"""The vLLM plugin's selection glue (integrations/vllm/tokprune_vllm/selection.py, which imports no vLLM) against
tokprune's own Hugging Face seam: the same signal values from the same q / k, and the same placement of kept and
merged tokens. The end-to-end comparison with vLLM itself runs in the vLLM CI job (.ci/vllm.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "vllm"))

from tokprune_vllm.selection import place, tap_value  # noqa: E402

from tokprune.patches.vision_stage import Placement as HFPlacement  # noqa: E402
from tokprune.patches.vision_stage import _ImageChoice, tap_values  # noqa: E402
from tokprune.pruners.base import ModelInfo, PrefillContext, Signal, VisionSignals  # noqa: E402
from tokprune.pruners.visionzip import VisionZip  # noqa: E402

INFO = ModelInfo(family="llava", vision_layers=4, feature_layer=2, has_cls=True, llm_layers=4,
                 supports_compact=True)


@pytest.mark.parametrize("sig", [Signal("cls", 2), Signal("cls", 2, heads="all"), Signal("received", 1),
                                 Signal("keys", 2), Signal("keys", 2, heads="all"), Signal("values", 2)])
def test_tap_values_equal_tokprune_taps(sig):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 17, 8, generator=g) for _ in range(3))
    ours = tap_value(sig, q, k, v, 8 ** -0.5)
    theirs = tap_values([sig], q, k, v, None, 8 ** -0.5)[sig]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _hf_place(pick, n: int, k: int) -> HFPlacement:
    img = _ImageChoice(n, torch.device("cpu"))
    img.add(pick, torch.arange(n), k, "visionzip")
    return img.place(None, torch.zeros(n, dtype=torch.bool))


@pytest.mark.parametrize("keep", [8, 16, 63])
def test_visionzip_placement_equals_tokprune(keep):
    """Kept and merged tokens sit where tokprune's adapters put them, and build the same token features."""
    g = torch.Generator().manual_seed(keep)
    n, d = 64, 32
    feats = torch.randn(n, d, generator=g)
    f = INFO.feature_layer
    values = {Signal("cls", f, heads="all"): [torch.rand(n, 4, generator=g)],
              Signal("keys", f): [torch.randn(n, 16, generator=g)]}
    i = torch.arange(n)
    grid = [torch.stack([i // 8, i % 8, torch.zeros_like(i)], 1)]
    sig = VisionSignals(features=[feats], values=values, owners=[(0, 0)], grid=grid,
                        special=[torch.zeros(n, dtype=torch.bool)], ctx=PrefillContext(INFO))
    pick = VisionZip(merge="llm").select_vision(sig, [keep])[0]  # the plugin's merge space
    ours, theirs = place(pick, n, keep, "visionzip"), _hf_place(pick, n, keep)
    assert ours.slots.tolist() == theirs.slots.tolist()
    assert ours.new_at.tolist() == theirs.new_at.tolist()
    torch.testing.assert_close(ours.build(feats), theirs.build(feats), rtol=0, atol=0)


def test_wrong_count_is_refused():
    with pytest.raises(RuntimeError, match="budget is 5"):
        place(torch.arange(4), 10, 5, "m")
    with pytest.raises(RuntimeError, match="sorted, unique"):
        place(torch.tensor([3, 1]), 10, 2, "m")
