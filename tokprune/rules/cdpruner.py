"""CDPruner rules: instruction-conditioned DPP kernel and its greedy MAP inference (Theia-4869/CDPruner).

The reference (``llava/model/llava_arch.py: encode_images``, commit 9541616) builds, per image (on LLaVA-NeXT per
crop, the crops of one image in one batch):

* ``S = X_n X_n^T``: cosine similarity of the *projected* visual tokens (the LLM inputs), in float32;
* relevance ``r_i = mean_m(-cos(e_i, t_m))`` of each token's image embedding ``e_i`` against the text embeddings
  ``t_m`` (note the minus sign), min-max normalised over the whole call as ``(r - min + 1e-6) / (max - min)``
  (the 1e-6 sits in the numerator only);
* optionally (a comment in the code, off in every script) ``r <- exp(alpha r)`` with
  ``alpha = theta / (2 (1 - theta))``;
* the conditional kernel ``L = diag(r) S diag(r)``;
* the fast greedy MAP inference of a DPP (incremental Cholesky, Chen et al. 2018): ``d_i^2 = L_ii``; each pick
  ``j = argmax d^2``, ``e = (L_j - sum_t c_tj c_t) / sqrt(d_j^2)``, ``d^2 -= e^2``, ``d_j^2 = -inf``; the picks are
  returned sorted.

:func:`dpp_greedy` runs that loop batched over images of one size: one loop over the k picks with tensor work
inside, the same operations in the same order as the reference, so on the same device the picks agree. Past the
kernel's rank the gains turn 0 / NaN and ``torch.argmax`` (which treats NaN as the largest value) then picks the
lowest-index token whose gain is NaN; the reference behaves the same, and we keep it (tiny test models hit it).
One deviation: once the gains are NaN, a token already picked can carry a NaN gain too (``-inf - NaN``), and the
reference then picks it again (a duplicate, so fewer distinct tokens than its budget); :func:`dpp_greedy` masks the
picked tokens, so it takes the lowest-index token not yet picked instead.
"""

from __future__ import annotations

import torch

__all__ = ["conditional_kernel", "dpp_greedy", "relevance", "similarity", "theta_transform"]


def similarity(x: torch.Tensor) -> torch.Tensor:
    """(..., N, N) cosine similarity of the rows of ``x`` (..., N, D), computed in float32 after normalising in
    the input dtype, as the reference does."""
    xn = x / x.norm(dim=-1, keepdim=True)
    xn = xn.float()
    return xn @ xn.transpose(-1, -2)


def relevance(image: torch.Tensor, text: torch.Tensor, negate: bool = True) -> torch.Tensor:
    """(N,) relevance of ``image`` (N, C) tokens to ``text`` (M, C) embeddings: the mean over the text rows of the
    (negated, as in the reference) cosine, min-max normalised over all N as ``(r - min + 1e-6) / (max - min)``
    (the reference normalises over one call: all crops of one LLaVA-NeXT image together, so pass them together)."""
    a = image.float() / image.float().norm(dim=-1, keepdim=True)
    t = text.float() / text.float().norm(dim=-1, keepdim=True)
    r = (a @ t.T).mean(-1)
    if negate:
        r = -r
    lo, hi = r.min(), r.max()
    return (r - lo + 1e-6) / (hi - lo)


def theta_transform(r: torch.Tensor, theta: float | None) -> torch.Tensor:
    """The reference's optional relevance weighting: ``exp(alpha r)`` with ``alpha = theta / (2 (1 - theta))``;
    None leaves ``r`` as it is (the reference's default)."""
    if theta is None:
        return r
    return torch.exp(theta / (2 * (1 - theta)) * r)


def conditional_kernel(sim: torch.Tensor, rel: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``L = diag(rel) sim diag(rel)`` (batched over leading axes). ``inplace``: written into ``sim`` (a caller
    that no longer needs the similarity saves two N x N buffers and passes; the same values either way)."""
    if inplace:
        return sim.mul_(rel.unsqueeze(-1)).mul_(rel.unsqueeze(-2))
    return rel.unsqueeze(-1) * sim * rel.unsqueeze(-2)


def dpp_greedy(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of the DPP with kernel ``kernel`` (B, N, N): (B, k) picks in the order chosen (not
    sorted). One loop over the picks; each step is batched tensor work over B and N. One kernel on the CPU takes
    :func:`_dpp_greedy_one` (the same operations on views, fewer small ops per pick)."""
    b, n, _ = kernel.shape
    dev = kernel.device
    if b == 1 and dev.type == "cpu":
        return _dpp_greedy_one(kernel[0], k)[None]
    rows = torch.arange(b, device=dev)
    gain = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # d_i^2
    basis = torch.zeros(b, k, n, device=dev, dtype=kernel.dtype)  # c_t, one row per pick (contiguous for bmm)
    picks = torch.empty(b, k, dtype=torch.long, device=dev)
    taken = torch.zeros(b, n, dtype=torch.bool, device=dev)
    for step in range(k):
        # a picked token's gain is -inf, or NaN once the kernel is exhausted: never pick it again
        j = gain.masked_fill(taken, -float("inf")).argmax(-1)
        taken[rows, j] = True
        picks[:, step] = j
        coeff = basis[rows, :step, j]  # (B, step): c_t[j] of the earlier picks
        proj = torch.bmm(coeff.unsqueeze(1), basis[:, :step]).squeeze(1)  # sum_t c_t[j] c_t
        e = (kernel[rows, j] - proj) / gain[rows, j].sqrt().unsqueeze(-1)
        basis[:, step] = e
        gain -= e.square()
        gain[rows, j] = -float("inf")
    return picks


def _dpp_greedy_one(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`dpp_greedy` for one (N, N) kernel on the CPU, where reading a pick's index is free (no device to
    wait for): each pick indexes rows and columns by a Python int (views) instead of gathering by a tensor, the
    inner product runs as the same ``bmm`` on the same contiguous operands, and ``e`` is written straight into its
    row of ``basis`` (the same subtraction and division, in place), so the picks are identical.

    The picked tokens are masked only when ``argmax`` lands on one (its gain is NaN once the kernel is exhausted):
    otherwise the plain ``argmax`` is the masked one (ties and NaN go to the first index either way), and a set
    replaces the per-pick mask update."""
    n = kernel.shape[0]
    gain = torch.diagonal(kernel).clone()  # d_i^2
    basis = torch.zeros(k, n, dtype=kernel.dtype)  # c_t, one row per pick
    picks: list[int] = []
    taken: set[int] = set()
    for step in range(k):
        # sync: per pick, on the CPU only (no device to wait for; dpp_greedy keeps CUDA kernels on the batched path)
        j = int(gain.argmax())
        if j in taken:  # a picked token's gain went NaN (the kernel is exhausted): never pick it again
            mask = torch.zeros(n, dtype=torch.bool)
            mask[picks] = True
            j = int(gain.masked_fill(mask, -float("inf")).argmax())
        taken.add(j)
        picks.append(j)
        coeff = basis[:step, j].contiguous()  # c_t[j] of the earlier picks
        proj = torch.bmm(coeff.view(1, 1, step), basis[None, :step]).view(n)  # sum_t c_t[j] c_t
        e = basis[step]
        torch.sub(kernel[j], proj, out=e).div_(gain[j].sqrt())  # e = (L_j - proj) / d_j, into its row
        gain -= e.square()
        gain[j] = -float("inf")
    return torch.tensor(picks, dtype=torch.long)
