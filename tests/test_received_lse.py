"""Received attention from the attention kernel's row log-sum-exps (tokprune/attention.py, tokprune/signals.py).

A tap that reads received attention asks the attention wrapper for the softmax's row log-sum-exps; on an unmasked
CPU SDPA call the wrapper runs SDPA's own flash kernel with them returned. Checked here: that kernel's output is
bit for bit what ``F.scaled_dot_product_attention`` (and transformers' ``sdpa_attention_forward``) return; the
received attention from the log-sum-exps equals the softmax path's; the wrapper takes the path only where the call
is exactly that kernel's; and a pruned model keeps the same tokens with it as without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import tokprune
import tokprune.signals as signals
from tokprune.attention import received_attention, received_from_lse, sdpa_with_lse
from tokprune.signals import LSE_KWARG, TAPS, _lse_call, _wrap
from tokprune.testing import QWEN_IMAGE_TAG, make_image, tiny_model


def _qkv(b: int, h: int, n: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).mul(2.0).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 7, 16), (2, 3, 130, 80), (1, 16, 300, 64)])
def test_the_kernel_with_lse_is_sdpa_bit_for_bit(shape, dtype):
    q, k, v = _qkv(*shape, dtype=dtype)
    scale = shape[-1] ** -0.5
    out, lse = sdpa_with_lse(q, k, v, scale)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, scale=scale))
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse, logits.logsumexp(-1), atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [3, 64, 1000])
def test_received_from_lse_is_the_softmax_column_mean(dtype, chunk):
    q, k, v = _qkv(2, 4, 150, 32, dtype=dtype, seed=1)
    scale = 32 ** -0.5
    _, lse = sdpa_with_lse(q, k, v, scale)
    got = received_from_lse(q, k, lse, scale, chunk=chunk)
    p = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale).softmax(-1)
    want = p.mean(2)  # an independent statement: the full probability matrix, column means
    # bf16 q/k: the kernel's row sums come from bf16 products, so the probabilities differ by ~1e-2 relative
    torch.testing.assert_close(got, want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-7)
    assert torch.allclose(got.sum(-1), torch.ones(2, 4), atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    via = received_attention(q, k, None, scale, chunk=chunk, lse=lse)
    assert torch.equal(via, got)  # received_attention hands an unmasked call with an lse to received_from_lse


def test_received_attention_ignores_the_lse_under_a_mask_or_model_dtype():
    q, k, v = _qkv(1, 2, 20, 8, seed=2)
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    mask[..., 15:] = False
    wrong = torch.zeros(1, 2, 20)  # an lse that would give wrong values if it were used
    assert torch.equal(received_attention(q, k, mask, 0.3, lse=wrong), received_attention(q, k, mask, 0.3))
    assert torch.equal(received_attention(q, k, None, 0.3, model_dtype=True, lse=wrong),
                       received_attention(q, k, None, 0.3, model_dtype=True))


class _Attn(nn.Module):
    is_causal = False


@pytest.fixture
def tapped():
    mod, seen = _Attn(), []
    TAPS.add(mod, lambda m, q, k, v, mask, s, kw: seen.append(kw.get(LSE_KWARG)), lse=True)
    yield mod, seen
    TAPS.discard(mod)


def test_wrapper_output_is_sdpa_attention_forwards_and_the_tap_gets_the_lse(tapped):
    mod, seen = tapped
    q, k, v = _qkv(1, 4, 50, 16, seed=3)
    kw = dict(scaling=0.25, dropout=0.0, is_causal=False)
    got = _wrap(sdpa_attention_forward)(mod, q, k, v, None, **kw)
    want = sdpa_attention_forward(mod, q, k, v, None, **kw)
    assert torch.equal(got[0], want[0]) and got[1] is None
    assert seen[-1] is not None and seen[-1].shape == (1, 4, 50)
    torch.testing.assert_close(seen[-1], (torch.matmul(q, k.transpose(-1, -2)) * 0.25).logsumexp(-1))


@pytest.mark.parametrize("case", ["mask", "dropout", "causal", "gqa", "grad", "positional", "no-scaling", "eager",
                                  "math-only", "compiling"])
def test_wrapper_runs_every_other_call_as_before(tapped, case, monkeypatch):
    mod, seen = tapped
    q, k, v = _qkv(1, 4, 30, 16, seed=4)
    kw, args, mask, orig = dict(scaling=0.25, is_causal=False), (), None, sdpa_attention_forward
    if case == "mask":
        mask = torch.ones(1, 1, 30, 30, dtype=torch.bool)
    elif case == "dropout":
        kw["dropout"] = 0.1
    elif case == "causal":
        kw["is_causal"] = True
    elif case == "gqa":
        mod.num_key_value_groups = 2
        k, v = k[:, :2], v[:, :2]
    elif case == "grad":
        q.requires_grad_(True)
    elif case == "positional":
        args, kw = (0.0, 0.25), {}
    elif case == "no-scaling":
        kw.pop("scaling")
    elif case == "eager":
        orig = None
    elif case == "compiling":  # traced by Dynamo: the model's own function (the tap runs outside the graph anyway)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _lse_call(orig, mod, q, k, v, mask, args, kw) or case == "math-only"
    if case == "math-only":  # SDPA restricted to its math kernel: the flash kernel is not SDPA's choice
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            assert not _lse_call(orig, mod, q, k, v, mask, args, kw)
        return
    if case != "eager":
        _wrap(orig)(mod, q, k, v, mask, *args, **kw)
        assert seen[-1] is None


def _prune(family: str, method: str, **kw):
    model, proc = tiny_model(family)
    tag = QWEN_IMAGE_TAG if family.startswith("qwen") else "<image>"
    x = proc(images=[make_image(112, 84), make_image(84, 112, seed=1)], text=f"user {tag} {tag} what ? assistant :",
             return_tensors="pt")
    tokprune.apply(model, method, keep_ratio=0.25, **kw)
    with torch.no_grad():
        logits = model(**x).logits
    rec = tokprune.last_record(model)
    return [t.tolist() for s in rec.stages for row in s.kept for t in row], logits


@pytest.mark.parametrize("family, method", [("qwen2_5_vl", "hiprune"), ("qwen2_5_vl", "vflowopt"),
                                            ("qwen2_vl", "visionzip"), ("qwen2_vl", "vispruner"),
                                            ("llava", "hiprune")])
def test_pruned_models_keep_the_same_tokens_with_the_lse_path(monkeypatch, family, method):
    calls = []
    real = signals.sdpa_with_lse
    monkeypatch.setattr(signals, "sdpa_with_lse", lambda *a: calls.append(1) or real(*a))
    kept, logits = _prune(family, method)
    assert calls, "the received-attention tap did not get the kernel's log-sum-exps"
    monkeypatch.setattr(signals, "_lse_call", lambda *a: False)  # the softmax path
    calls.clear()
    kept_ref, logits_ref = _prune(family, method)
    assert not calls
    assert kept == kept_ref
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=1e-5)
