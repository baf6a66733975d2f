"""Tests for tokprune.kernels: the PyTorch reference against brute-force oracles, the Triton kernels (CPU interpreter)
against the reference, offline GPU compilation of the kernels, and backend dispatch."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tokprune import kernels
from tokprune.kernels import dispatch, reference

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------------------------------------------
# Oracles: deliberately naive Python loops, independent of the implementation tricks.
# ------------------------------------------------------------------------------------------------------------------


def oracle_topk(scores: torch.Tensor, k, mask=None, width=None) -> torch.Tensor:
    """Sort (-score, index) with Python's sort after float32 conversion; NaN -> -inf; pad with -1."""
    s = scores.to(torch.float32)
    b, n = s.shape
    ks = [int(v) for v in k] if isinstance(k, torch.Tensor) else [int(k)] * b
    width = max(ks, default=0) if width is None else width
    out = torch.full((b, width), -1, dtype=torch.int64)
    for r in range(b):
        items = []
        for i, v in enumerate(s[r].tolist()):
            if mask is not None and not bool(mask[r, i]):
                continue
            v = -math.inf if math.isnan(v) else v
            items.append((-v, i))
        chosen = sorted(i for _, i in sorted(items)[: ks[r]])
        out[r, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
    return out


def oracle_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.zeros((x.shape[0], idx.shape[1], x.shape[2]), dtype=x.dtype)
    for b in range(x.shape[0]):
        for j, i in enumerate(idx[b].tolist()):
            if i >= 0:
                out[b, j] = x[b, i]
    return out


def oracle_merge(x, assign, m, weights=None, base=None, base_weight=None) -> torch.Tensor:
    """float64 loops over the documented formula."""
    b, n, d = x.shape
    out = torch.zeros((b, m, d), dtype=torch.float64)
    for bb in range(b):
        for t in range(m):
            num = torch.zeros(d, dtype=torch.float64)
            den = 0.0
            if base is not None:
                bw = 1.0 if base_weight is None else (
                    float(base_weight[bb, t]) if isinstance(base_weight, torch.Tensor) else float(base_weight))
                num += bw * base[bb, t].double()
                den += bw
            for i in range(n):
                if int(assign[bb, i]) == t:
                    w = 1.0 if weights is None else float(weights[bb, i])
                    num += w * x[bb, i].double()
                    den += w
            if den != 0:
                out[bb, t] = num / den
            elif base is not None:
                out[bb, t] = base[bb, t].double()
    return out


def make_scores(kind: str, b: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random and adversarial score rows: ties, constant rows, NaN/inf/signed zeros/denormals."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        s = torch.randn(b, n, generator=g)
    elif kind == "ties":
        s = torch.randint(0, 3, (b, n), generator=g).float()
    elif kind == "const":
        s = torch.full((b, n), 0.5)
    elif kind == "special":
        pool = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-40, 1.0, -1.0, 3.0e38])
        s = pool[torch.randint(0, len(pool), (b, n), generator=g)]
    else:
        raise AssertionError(kind)
    return s.to(dtype)


def rel_tol(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("TOKPRUNE_KERNELS", "torch")


# ------------------------------------------------------------------------------------------------------------------
# PyTorch reference vs oracles
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "ties", "const", "special"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_reference_topk_matches_oracle(kind, dtype):
    s = make_scores(kind, 3, 37, dtype, seed=1)
    for k in (0, 1, 5, 36, 37):
        assert torch.equal(reference.select_topk(s, k), oracle_topk(s, k)), (kind, dtype, k)


def test_reference_topk_ties_go_to_lower_index_and_signed_zero_ties():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [-0.0, 0.0, -0.0, 0.0, -1.0], [math.nan, math.nan, -math.inf, 0, 0]])
    assert reference.select_topk(s, 2).tolist() == [[1, 2], [0, 1], [3, 4]]
    # NaN counts as -inf, so row 2 ties NaN, NaN, -inf and keeps the lower indices
    assert reference.select_topk(s, 4).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 3, 4]]


def test_reference_topk_1d_mask_ragged_and_noncontiguous():
    s = make_scores("ties", 4, 50, torch.float32, seed=2)
    assert torch.equal(reference.select_topk(s[1], 7), oracle_topk(s[1:2], 7)[0])
    mask = torch.rand(4, 50, generator=torch.Generator().manual_seed(3)) > 0.4
    assert torch.equal(reference.select_topk(s, 9, mask), oracle_topk(s, 9, mask))
    ks = torch.tensor([0, 1, 9, 20])
    got = reference.select_topk(s, ks, mask)
    assert got.shape == (4, 20) and torch.equal(got, oracle_topk(s, ks, mask))
    wide = torch.randn(50, 8).t()  # (8, 50) with stride (1, 8)
    assert not wide.is_contiguous()
    assert torch.equal(reference.select_topk(wide, 11), oracle_topk(wide, 11))


def test_reference_topk_errors_and_unchecked_padding():
    s = torch.randn(2, 10)
    with pytest.raises(ValueError, match="larger than"):
        reference.select_topk(s, 11)
    with pytest.raises(ValueError, match="k must be >= 0"):
        reference.select_topk(s, -1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 3:] = False
    with pytest.raises(ValueError, match="row 1 has 3 selectable"):
        reference.select_topk(s, 4, mask)
    with pytest.raises(ValueError, match="row 0"):
        reference.select_topk(s, torch.tensor([11, 1]))
    got = reference.select_topk(s, 4, mask, check=False)
    assert got[1].tolist() == [0, 1, 2, -1]
    assert torch.equal(got[0], oracle_topk(s[:1], 4)[0])
    with pytest.raises(TypeError):
        reference.select_topk(s, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="max_k"):
        reference.select_topk(s, torch.tensor([3, 1]), max_k=2)
    assert reference.select_topk(s, torch.tensor([1, 1]), max_k=3).tolist()[0][1:] == [-1, -1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_gather(dtype):
    x = torch.randn(2, 9, 12).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous (2, 9, 12)
    assert not x.is_contiguous()
    idx = torch.tensor([[0, 4, 8, -1], [-1, -1, 3, 3]])
    out = reference.gather_tokens(x, idx)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, oracle_gather(x, idx))
    assert torch.equal(reference.gather_tokens(x[0], idx[0]), oracle_gather(x, idx)[0])
    with pytest.raises(IndexError):
        reference.gather_tokens(x, torch.tensor([[9], [0]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_merge_matches_oracle(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 20, 6, generator=g).to(dtype)
    assign = torch.randint(-1, 4, (2, 20), generator=g)
    assign[0, assign[0] == 3] = 2  # target 3 receives nothing in row 0
    assign[0, assign[0] == 4] = -1  # target 4 receives nothing in row 0 (and has base weight 0 below)
    w = torch.rand(2, 20, generator=g)
    base = torch.randn(2, 5, 6, generator=g).to(dtype)
    bw = torch.rand(2, 5, generator=g)
    bw[0, 4] = 0.0
    tol = rel_tol(dtype)
    cases = [
        dict(num_targets=5),
        dict(num_targets=5, weights=w),
        dict(base=base),
        dict(base=base, base_weight=2.5, weights=w),
        dict(base=base, base_weight=bw, weights=w),
    ]
    for kw in cases:
        got = reference.merge_tokens(x, assign, **kw)
        want = oracle_merge(x, assign, 5, kw.get("weights"), kw.get("base"), kw.get("base_weight"))
        assert got.dtype == dtype and got.shape == (2, 5, 6)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    empty = reference.merge_tokens(x, assign, num_targets=5)
    assert torch.all(empty[0, 3] == 0)  # receives nothing -> zeros
    with_base = reference.merge_tokens(x, assign, base=base, base_weight=bw)
    assert torch.equal(with_base[0, 4], base[0, 4])  # denominator 0 -> base


def test_reference_merge_defaults_and_errors():
    x = torch.arange(12.0).view(1, 4, 3)
    assign = torch.tensor([[1, 1, -1, 0]])
    out = reference.merge_tokens(x, assign)  # num_targets inferred = 2
    assert out.tolist() == [[[9.0, 10.0, 11.0], [1.5, 2.5, 3.5]]]
    with pytest.raises(IndexError):
        reference.merge_tokens(x, torch.tensor([[0, 5, 0, 0]]), num_targets=2)
    with pytest.raises(ValueError, match="base_weight given without base"):
        reference.merge_tokens(x, assign, base_weight=1.0)
    with pytest.raises(ValueError, match="num_targets"):
        reference.merge_tokens(x, assign, num_targets=3, base=torch.zeros(1, 2, 3))


def oracle_nearest(keys, idx, mask):
    b, n, _ = keys.shape
    out = torch.full((b, n), -1, dtype=torch.int64)
    for bb in range(b):
        kept = [i for i in idx[bb].tolist() if i >= 0]
        for i in range(n):
            if mask is not None and not bool(mask[bb, i]):
                continue
            if i in kept:
                out[bb, i] = kept.index(i)
                continue
            sims = [torch.nn.functional.cosine_similarity(keys[bb, i], keys[bb, j], dim=0, eps=1e-12).item()
                    for j in kept]
            if sims:
                out[bb, i] = max(range(len(sims)), key=lambda j: (sims[j], -j))
    return out


def test_reference_prune_nearest(torch_backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, 8, generator=g)
    keys = torch.randn(2, 30, 4, generator=g)
    s = torch.randn(2, 30, generator=g)
    mask = torch.rand(2, 30, generator=g) > 0.2
    res = kernels.prune(x, s, torch.tensor([6, 3]), mask, merge="nearest", keys=keys)
    assert torch.equal(res.indices, oracle_topk(s, torch.tensor([6, 3]), mask))
    assert torch.equal(res.tokens, oracle_gather(x, res.indices))
    assert torch.equal(res.assign, oracle_nearest(keys, res.indices, mask))
    want = oracle_merge(x, res.assign, 6)
    torch.testing.assert_close(res.merged.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.all(res.merged[1, 3:] == 0)  # padded slots of the short row stay zero
    plain = kernels.prune(x, s, 4)
    assert plain.merged is None and plain.assign is None and plain.indices.shape == (2, 4)
    with pytest.raises(ValueError, match="merge"):
        kernels.prune(x, s, 4, merge="mean")


# ------------------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------------------


def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv("TOKPRUNE_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dispatch.resolve_backend(cpu) == "torch"
    monkeypatch.setenv("TOKPRUNE_KERNELS", "torch")
    assert dispatch.resolve_backend(cuda) == "torch"
    monkeypatch.setenv("TOKPRUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match="TOKPRUNE_KERNELS"):
        kernels.select_topk(torch.randn(3), 1)
    monkeypatch.setenv("TOKPRUNE_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "_triton_checked", True)
    monkeypatch.setattr(dispatch, "_triton_import_error", None)  # pretend triton imports
    assert dispatch.resolve_backend(cuda) == "triton"
    assert dispatch.resolve_backend(cpu) == "torch"
    monkeypatch.setenv("TOKPRUNE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.select_topk(torch.randn(2, 5), 2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_backend(cpu) == "triton"
    monkeypatch.setattr(dispatch, "_triton_import_error", "ImportError: No module named 'triton'")
    with pytest.raises(RuntimeError, match="pip install"):
        dispatch.resolve_backend(cuda)
    monkeypatch.setenv("TOKPRUNE_KERNELS", "auto")
    assert dispatch.resolve_backend(cuda) == "torch"


def test_import_and_cpu_use_without_triton():
    """`import tokprune.kernels` and the torch path must work when triton is not installed."""
    code = textwrap.dedent(
        """
        import sys, types
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        pkg = types.ModuleType("tokprune")  # load only the kernels package, not tokprune/__init__ (transformers)
        pkg.__path__ = [sys.argv[1]]
        sys.modules["tokprune"] = pkg
        import torch
        import tokprune.kernels as K
        assert not K.triton_available()
        print(K.select_topk(torch.tensor([[3.0, 1.0, 2.0]]), 2).tolist())
        """
    )
    env = {"PYTHONPATH": str(REPO), "TOKPRUNE_KERNELS": "auto", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-c", code, str(REPO / "tokprune")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[[0, 2]]"


# ------------------------------------------------------------------------------------------------------------------
# Triton kernels under the CPU interpreter, compared with the reference (indices exactly, values to dtype tolerance)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def interp(monkeypatch):
    """Run the public API on the Triton backend through the interpreter, with guard padding around outputs.

    The kernels are wrapped with triton.jit at call time for the current TRITON_INTERPRET value, so setting the
    env var here is enough even if tokprune.kernels.triton_kernels was imported earlier.
    """
    pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
    pytest.importorskip("triton", reason="triton is not installed (optional extra)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TOKPRUNE_KERNELS", "triton")
    monkeypatch.setenv("TOKPRUNE_KERNELS_GUARD", "1")
    from tokprune.kernels import triton_kernels

    return triton_kernels


def test_interpreter_mode_is_chosen_at_call_time(monkeypatch):
    pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
    pytest.importorskip("triton", reason="triton is not installed (optional extra)")
    from triton.runtime.interpreter import InterpretedFunction

    from tokprune.kernels import triton_kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not isinstance(triton_kernels._kernels()["topk"], InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(triton_kernels._kernels()["topk"], InterpretedFunction)
    # triton (and its jitted helpers such as tl.sum) was imported above without the interpreter: still works.
    monkeypatch.setenv("TOKPRUNE_KERNELS", "triton")
    assert kernels.select_topk(torch.tensor([[1.0, 3.0, 2.0, 3.0]]), 2).tolist() == [[1, 3]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_topk_matches_reference(interp, dtype):
    for i, (kind, b, n) in enumerate([("random", 2, 576), ("ties", 3, 100), ("special", 2, 64), ("const", 1, 17),
                                       ("random", 2, 1)]):
        s = make_scores(kind, b, n, dtype, seed=10 + i)
        for k in (1, n // 3, n):
            want = reference.select_topk(s, k)
            assert torch.equal(kernels.select_topk(s, k), want), (kind, n, k)
        mask = torch.rand(b, n, generator=torch.Generator().manual_seed(i)) > 0.3
        mask[:, :2] = True
        k2 = min(2, n)  # the first two tokens are always selectable
        ks = torch.randint(0, k2 + 1, (b,), generator=torch.Generator().manual_seed(i))
        assert torch.equal(kernels.select_topk(s, ks, mask), reference.select_topk(s, ks, mask)), kind
        assert torch.equal(kernels.select_topk(s, k2, mask), reference.select_topk(s, k2, mask)), kind
    assert kernels.select_topk(s, 0).shape == (s.shape[0], 0)


def test_triton_topk_shapes_noncontiguous_and_errors(interp):
    base = make_scores("ties", 40, 6, torch.float32, seed=20)
    s = base.t()  # (6, 40), strides (1, 6)
    assert torch.equal(kernels.select_topk(s, 9), reference.select_topk(s, 9))
    assert torch.equal(kernels.select_topk(s[2], 9), reference.select_topk(s[2], 9))
    mask = torch.ones(40, 6, dtype=torch.bool).t()  # non-contiguous mask too
    mask[4, 5:] = False
    assert torch.equal(kernels.select_topk(s, 5, mask), reference.select_topk(s, 5, mask))
    with pytest.raises(ValueError, match="row 4"):
        kernels.select_topk(s, 6, mask)
    unchecked = kernels.select_topk(s, 6, mask, check=False)
    assert torch.equal(unchecked, reference.select_topk(s, 6, mask, check=False))
    assert unchecked[4, 5].item() == -1
    ks = torch.tensor([1, 40, 0, 3, 5, 2])
    assert torch.equal(kernels.select_topk(s, ks, max_k=40), reference.select_topk(s, ks))
    with pytest.raises(ValueError, match="max_k"):
        kernels.select_topk(s, ks, max_k=10)
    with pytest.raises(ValueError, match="larger than"):
        kernels.select_topk(s, 41)
    padded = kernels.select_topk(s, 3, max_k=5)
    assert torch.equal(padded, reference.select_topk(s, 3, max_k=5))
    assert torch.equal(padded[:, :3], reference.select_topk(s, 3)) and bool((padded[:, 3:] == -1).all())
    with pytest.raises(ValueError, match="smaller than k"):
        kernels.select_topk(s, 3, max_k=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gather_matches_reference(interp, dtype):
    x = torch.randn(2, 70, 96).to(dtype)[:, ::2, 3:83]  # (2, 35, 80), non-contiguous in N and offset in D
    idx = torch.tensor([[0, 5, 34, -1, 7, 7], [-1, -1, 1, 2, 33, 34]])
    out = kernels.gather_tokens(x, idx)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, reference.gather_tokens(x, idx))
    xt = torch.randn(2, 80, 35).to(dtype).transpose(1, 2)  # feature stride != 1
    assert torch.equal(kernels.gather_tokens(xt, idx), reference.gather_tokens(xt, idx))
    assert torch.equal(kernels.gather_tokens(x[1], idx[1]), reference.gather_tokens(x[1], idx[1]))
    with pytest.raises(IndexError):
        kernels.gather_tokens(x, torch.tensor([[35], [0]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_merge_matches_reference(interp, dtype):
    g = torch.Generator().manual_seed(30)
    x = torch.randn(2, 150, 40, generator=g).to(dtype)[:, :, ::2]  # (2, 150, 20), stride_d = 2
    assign = torch.randint(-1, 12, (2, 150), generator=g)
    assign[0, assign[0] == 5] = -1  # an empty target
    assign[1, :90] = 3  # a heavy target spanning several source blocks
    w = torch.rand(2, 150, generator=g)
    base = torch.randn(2, 12, 20, generator=g).to(dtype)
    bw = torch.rand(2, 12, generator=g)
    bw[0, 5] = 0.0
    tol = rel_tol(dtype)
    for kw in (dict(num_targets=12), dict(num_targets=12, weights=w), dict(base=base, base_weight=bw, weights=w),
               dict(base=base, base_weight=0.5)):
        got = kernels.merge_tokens(x, assign, **kw)
        want = reference.merge_tokens(x, assign, **kw)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    got = kernels.merge_tokens(x, assign, base=base, base_weight=bw)
    assert torch.equal(got[0, 5], base[0, 5])  # nothing assigned and zero base weight -> base
    assert torch.all(kernels.merge_tokens(x, assign, num_targets=12)[0, 5] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_prune_matches_reference(interp, monkeypatch, dtype):
    g = torch.Generator().manual_seed(40)
    x = torch.randn(2, 96, 24, generator=g).to(dtype)
    s = make_scores("ties", 2, 96, dtype, seed=41)
    mask = torch.rand(2, 96, generator=g) > 0.1
    ks = torch.tensor([16, 5])
    got = kernels.prune(x, s, ks, mask, merge="nearest")
    plain = kernels.prune(x, s, 8)
    monkeypatch.setenv("TOKPRUNE_KERNELS", "torch")
    want = kernels.prune(x, s, ks, mask, merge="nearest")
    want_plain = kernels.prune(x, s, 8)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.assign, want.assign)
    tol = rel_tol(dtype)
    torch.testing.assert_close(got.merged.float(), want.merged.float(), rtol=tol, atol=tol)
    assert torch.equal(plain.indices, want_plain.indices) and torch.equal(plain.tokens, want_plain.tokens)


def test_triton_long_rows_fall_back_to_reference(interp, monkeypatch):
    monkeypatch.setattr(interp, "_MAX_TOPK_BLOCK", 64)  # pretend 100 tokens do not fit one program
    s = make_scores("ties", 2, 100, torch.float32, seed=50)
    x = torch.randn(2, 100, 8)
    assert torch.equal(kernels.select_topk(s, 30), reference.select_topk(s, 30))
    got = kernels.prune(x, s, 30, merge="nearest")
    assert torch.equal(got.assign, reference.nearest_assign(x, got.indices))


def test_guard_detects_out_of_bounds_store(interp):
    out = interp._empty((3, 4), torch.float32, torch.device("cpu"))
    out.fill_(1.0)
    interp._check_guards(out)
    torch.as_strided(out, (1,), (1,), out.storage_offset() + out.numel()).fill_(2.0)  # one element past the end
    with pytest.raises(RuntimeError, match="out of bounds"):
        interp._check_guards(out)


# ------------------------------------------------------------------------------------------------------------------
# The GPU code path compiles (TTIR -> PTX -> cubin for sm_90) without a GPU
# ------------------------------------------------------------------------------------------------------------------


def _compile_for_h100(name: str, signature: dict, constexprs: dict, num_warps: int = 4):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from tokprune.kernels import triton_kernels

    kernel = triton_kernels._kernels()[name]
    sig = dict(signature, **{c: "constexpr" for c in constexprs})
    target = GPUTarget("cuda", 90, 32)
    return compile(ASTSource(kernel, sig, constexprs), target=target, options={"num_warps": num_warps})


def test_kernels_compile_for_sm90(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed (optional extra)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    i32 = "i32"
    topk_sig = {"MASK": "*u8", "KVEC": "*i64", "OUT": "*i64", "SLOT": "*i64", "FLAG": "*i32",
                "N": i32, "K": i32, "KMAX": i32, "stride_sb": i32, "stride_sn": i32, "stride_mb": i32,
                "stride_mn": i32, "stride_ob": i32, "stride_lb": i32}
    names = ("HAS_MASK", "HAS_KVEC", "WRITE_SLOT", "SCORES_BF16")
    for score_ty, flags, block, warps in (("*i16", (True, True, True, True), 1024, 4),
                                          ("*fp16", (False, False, False, False), 8192, 8)):
        meta = dict(zip(names, flags), BLOCK_N=block, BLOCK_T=1024)
        assert _compile_for_h100("topk", {"S": score_ty, **topk_sig}, meta, warps).asm["cubin"]
    strides = "stride_xb stride_xn stride_xd stride_ib stride_ik stride_ob stride_ok".split()
    gather_sig = {"X": "*fp16", "IDX": "*i64", "OUT": "*fp16", "N": i32, "K": i32, "D": i32,
                  **dict.fromkeys(strides, i32)}
    assert _compile_for_h100("gather", gather_sig, {"BLOCK_K": 16, "BLOCK_D": 256}).asm["cubin"]
    strides = ("stride_xb stride_xn stride_xd stride_pb stride_sb stride_wb stride_wn stride_bb stride_bm stride_bd "
               "stride_vb stride_vm stride_ob stride_om").split()
    merge_sig = {"X": "*bf16", "PERM": "*i64", "START": "*i64", "END": "*i64", "W": "*fp32", "BASE": "*bf16",
                 "BW": "*fp32", "OUT": "*bf16", "M": i32, "D": i32, **dict.fromkeys(strides, i32)}
    meta = {"HAS_W": True, "HAS_BASE": True, "BLOCK_S": 16, "BLOCK_D": 256}
    assert _compile_for_h100("merge", merge_sig, meta).asm["cubin"]
