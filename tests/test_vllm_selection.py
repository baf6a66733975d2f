"""The vLLM plugin's selection glue (integrations/vllm/tokprune_vllm/selection.py, which imports neither vLLM nor
transformers) against tokprune's own: the taps split vLLM's attention calls into the sequences tokprune's taps
see and compute tokprune's values on them; the kept sets, merges and budgets come from tokprune's selection core.
The end-to-end comparison with vLLM itself runs in the vLLM CI job (.ci/vllm.sh)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

PLUGIN = Path(__file__).resolve().parents[1] / "integrations" / "vllm"
sys.path.insert(0, str(PLUGIN))

from tokprune_vllm.selection import EncoderTaps, check_request, select, vision_budget  # noqa: E402

from tokprune.config import Budget  # noqa: E402
from tokprune.encoder_taps import tap_values  # noqa: E402
from tokprune.pruners.base import ModelInfo, PrefillContext, Signal, VisionSignals  # noqa: E402
from tokprune.pruners.divprune import DivPrune  # noqa: E402
from tokprune.pruners.visionzip import VisionZip  # noqa: E402
from tokprune.pruners.vispruner import VisPruner  # noqa: E402
from tokprune.selection import image_budget, select_vision  # noqa: E402

INFO = ModelInfo(family="llava", vision_layers=4, feature_layer=2, has_cls=True, llm_layers=4,
                 supports_compact=True)
QWEN = ModelInfo(family="qwen2_vl", vision_layers=4, feature_layer=3, has_cls=False, llm_layers=4,
                 supports_compact=False)


def test_plugin_selection_imports_neither_vllm_nor_transformers():
    """The plugin's method side (settings, methods, selection) imports only tokprune's transformers-free modules."""
    code = f"""
import sys
sys.path.insert(0, {str(PLUGIN)!r})
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "vllm"):
            raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, Block())
import tokprune_vllm.config, tokprune_vllm.methods, tokprune_vllm.selection
assert not any(m.split(".")[0] in ("transformers", "vllm") for m in sys.modules)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


class FakeEncoderAttention(nn.Module):
    """vLLM's ``MMEncoderAttention`` interface: (B, N, H * d) or (B, N, H, d) q / k / v, ``cu_seqlens`` for packed
    sequences, ``num_heads`` / ``head_size`` / ``scale``."""

    def __init__(self, heads: int = 4, d: int = 8) -> None:
        super().__init__()
        self.num_heads = self.num_kv_heads = heads
        self.head_size, self.scale = d, d ** -0.5

    def forward(self, query, key, value, cu_seqlens=None):
        return query


SIGNALS = [Signal("cls", 1), Signal("cls", 1, heads="all"), Signal("received", 1), Signal("keys", 1),
           Signal("keys", 1, heads="all"), Signal("values", 1)]


@pytest.mark.parametrize("sig", SIGNALS)
def test_taps_split_packed_calls_into_tokprune_values(sig):
    """A packed call (batch 1, ``cu_seqlens``) of two sequences gives, per sequence, exactly what tokprune's tap
    computes on that sequence alone; a batched 3-D call gives the batched values."""
    g = torch.Generator().manual_seed(0)
    att = FakeEncoderAttention()
    taps = EncoderTaps({1: att})
    lens = [6, 10]
    q, k, v = (torch.randn(1, sum(lens), 4, 8, generator=g) for _ in range(3))
    att(q, k, v, cu_seqlens=torch.tensor([0, 6, 16]))
    got = taps.values(sig)
    assert len(got) == 2
    for j, (lo, hi) in enumerate([(0, 6), (6, 16)]):
        seq = [x[:, lo:hi].transpose(1, 2) for x in (q, k, v)]
        want = tap_values([sig], *seq, None, 8 ** -0.5)[sig]
        torch.testing.assert_close(got[j], want, rtol=0, atol=0)
    taps.clear()
    qb, kb, vb = (torch.randn(3, 5, 32, generator=g) for _ in range(3))
    att(qb, kb, vb)
    want = tap_values([sig], *(x.unflatten(-1, (4, 8)).transpose(1, 2) for x in (qb, kb, vb)), None, 8 ** -0.5)[sig]
    torch.testing.assert_close(taps.values(sig)[0], want, rtol=0, atol=0)
    taps.clear()
    taps.remove()
    att(qb, kb, vb)
    with pytest.raises(RuntimeError, match="without tokprune's tap"):  # removed: nothing is recorded
        taps.values(sig)


def test_taps_record_a_layers_output_and_name_a_missing_tap():
    """Called as a module or through ``forward`` (what vLLM's ``@support_torch_compile`` blocks do, skipping
    hooks), the layer's output is recorded; after ``remove`` the layer is its class's again."""
    block = nn.Linear(4, 4)
    taps = EncoderTaps({}, {2: block})
    x = torch.randn(3, 5, 4)
    out = block(x)
    torch.testing.assert_close(taps.values(Signal("hidden_out", 2))[0], out.detach())
    taps.clear()
    with pytest.raises(RuntimeError, match="without tokprune's tap"):
        taps.values(Signal("hidden_out", 2))
    torch.testing.assert_close(block.forward(x), out)
    torch.testing.assert_close(taps.values(Signal("hidden_out", 2))[0], out.detach())
    taps.remove()
    assert "forward" not in vars(block)
    taps.clear()
    block(x)
    assert not taps.hidden


def test_unsupported_signals_are_refused():
    from tokprune.pruners.base import VisionRequest

    check_request(VisPruner().vision_request(INFO), "vispruner")  # cls + hidden_out: computed
    with pytest.raises(ValueError, match="'hidden_in' signals"):
        check_request(VisionRequest((Signal("hidden_in", 1),)), "m")


def _signals(info: ModelInfo, feats: list[torch.Tensor], values: dict) -> VisionSignals:
    grid = [torch.stack([torch.arange(f.shape[0]) // 8, torch.arange(f.shape[0]) % 8,
                         torch.zeros(f.shape[0], dtype=torch.long)], 1) for f in feats]
    return VisionSignals(features=feats, values=values, owners=[(j, 0) for j in range(len(feats))], grid=grid,
                         special=[torch.zeros(f.shape[0], dtype=torch.bool) for f in feats],
                         ctx=PrefillContext(info))


@pytest.mark.parametrize("pruner, info", [(VisionZip(merge="llm"), INFO), (DivPrune(), INFO), (VisPruner(), INFO),
                                          (VisPruner(important_ratio=0.25), QWEN), (DivPrune(), QWEN)])
def test_select_is_tokprunes_selection(pruner, info):
    """Two images of different sizes, one prompt row each: the plugin's placements are those of tokprune's
    selection core on the same signals (kept and merged tokens, and the tokens they build), at the budget tokprune
    computes for the image."""
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(64, 16, generator=g), torch.randn(48, 16, generator=g)]
    request = pruner.vision_request(info)
    values = {}
    for sig in request.signals:
        shape = {"keys": (16,), "hidden_out": (12,)}.get(sig.kind, (4,) if sig.heads == "all" else ())
        values[sig] = [torch.rand(f.shape[0], *shape, generator=g) for f in feats]
    budget = Budget(keep_ratio=0.3)
    keeps = [vision_budget(pruner, info, int(f.shape[0]), budget) for f in feats]
    assert keeps == [image_budget(pruner, info, budget, torch.zeros(f.shape[0], dtype=torch.bool)).keep
                     for f in feats] == [19, 14]
    ours = select(pruner, info, request, feats, values, _signals(info, feats, values).grid, keeps, "compact")
    parts = [(j, torch.arange(f.shape[0]), k, (j, 0)) for j, (f, k) in enumerate(zip(feats, keeps))]
    theirs, _ = select_vision(pruner, _signals(info, feats, values), parts)
    for a, b, f, k in zip(ours, theirs, feats, keeps):
        assert a.slots.tolist() == b.slots.tolist() and len(a.slots) == k
        assert a.new_at.tolist() == b.new_at.tolist()
        torch.testing.assert_close(a.build(f), b.build(f), rtol=0, atol=0)


def test_a_wrong_count_is_refused_by_tokprunes_check():
    class Short(DivPrune):
        def select_vision(self, signals, ks):
            return [torch.arange(k - 1) for k in ks]

    feats = [torch.randn(16, 4)]
    with pytest.raises(RuntimeError, match="budget is 5"):
        select(Short(), INFO, Short().vision_request(INFO), feats, {}, _signals(INFO, feats, {}).grid, [5],
               "compact")
