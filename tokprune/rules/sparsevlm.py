"""SparseVLM rules (methods.md §9): text raters, per-stage counts (v1.5 table, v1 matrix rank) and the recycling of
pruned tokens by density-peak clustering.

Reference code: Gumpest/SparseVLMs. The repository's default path (``main``, ``USE_VERSION`` unset = "1_0", the
same code as the ``v1.5`` tag) is **v1.5**; the first release (Oct 2024, commits 91fb6d9..b72c5d6, the paper's
arXiv v1) is **v1**. Both live in ``llava/model/language_model/modelling_sparse_llama.py`` (the decoder loop),
``score.py`` (the count rule) and ``utils.py`` (``cluster_and_merge``):

* **raters**, once per prefill on the decoder's input embeddings: ``M = softmax_text(V T^T)`` for the visual
  tokens V and every token after the image T (the question and the template tail), mean over V: one relevance per
  text token; raters = the text tokens whose relevance exceeds the mean relevance;
* **stages**: after 0-based decoder layers 2, 6, 15 (v1: 2, 6, 15, 19) have run, their output is cut: here
  *before* layers 3, 7, 16 (20) with the rows of the layer before, as it ran. Score = head-mean softmax attention
  (whole causal row, scaled) of each rater query to each current visual key, mean over raters;
* **counts**: v1.5 keeps ``min(table[s], n - 1)`` (``RETAIN_TOKN`` 192: 300/200/110, 128: 303/110/36, 96:
  238/48/26, 64: 66/30/17); v1 keeps ``min(int(rank * scale + bias), n - 1)`` with ``rank =
  torch.linalg.matrix_rank`` of the (raters x visual) attention matrix in float32 (default tolerance), and
  nothing is cut when ``rank == n``;
* **recycling**: of the dropped tokens, the ``int(0.3 d) + 1`` with the highest score (in that order) are
  clustered by DPC-kNN into ``int(m / 10) + 1`` clusters (k of the kNN density = the cluster count, distances
  ``||x_i - x_j|| / sqrt(C)``; centres = the largest ``delta * density``) and each cluster's plain mean (sum over
  ``count + 1e-6``) is inserted after the kept visual tokens; positions are re-indexed contiguously.

Choices made here: the reference adds ``rand * 1e-6`` to the densities to break ties (lost in fp16 anyway); this
module adds nothing (ties go to the lower index), so results are deterministic. The relevance softmax and the
merge run in float32 (the reference: the model dtype).
"""

from __future__ import annotations

import torch

__all__ = [
    "LAYERS_V1",
    "LAYERS_V15",
    "TABLE_V15",
    "V1_PRESETS",
    "cluster_count",
    "dpc_knn_merge",
    "rank_count",
    "raters",
    "recycle_count",
    "stage_fractions",
]

#: 0-based layers whose *output* is cut (the reference's ``pruning_loc``); tokprune cuts before layer + 1
LAYERS_V15 = (2, 6, 15)
LAYERS_V1 = (2, 6, 15, 19)
REFERENCE_DEPTH = 32
N_REFERENCE = 576
#: v1.5's ``sparse_token_dict`` (score.py): per retained-token label, the kept visual tokens after each stage
TABLE_V15 = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
#: v1's evaluation scripts (scale, bias): MME 192, POPE 128, TextVQA 64 tokens
V1_PRESETS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
#: the share of the dropped tokens that is recycled, and tokens per cluster
RECYCLE_SHARE = 0.3
PER_CLUSTER = 10


def stage_fractions(keep_ratio: float) -> tuple[float, float, float]:
    """v1.5's kept fractions of the original tokens per stage for a nominal ``keep_ratio``: the table's counts
    over 576 at its four labels (1/9, 1/6, 2/9, 1/3 of 576), linear between them, towards 0 below 1/9 and
    towards 1 above 1/3 (an interpolation of ours: the reference only has the four labels)."""
    anchors = [(0.0, (0.0, 0.0, 0.0))] + sorted(
        (k / N_REFERENCE, tuple(c / N_REFERENCE for c in t)) for k, t in TABLE_V15.items()) + [(1.0, (1.0, 1.0, 1.0))]
    r = min(max(float(keep_ratio), 0.0), 1.0)
    for (r0, f0), (r1, f1) in zip(anchors, anchors[1:]):
        if r <= r1:
            t = 0.0 if r1 == r0 else (r - r0) / (r1 - r0)
            return tuple(a + t * (b - a) for a, b in zip(f0, f1))  # type: ignore[return-value]
    return anchors[-1][1]  # type: ignore[return-value]


def recycle_count(dropped: int, share: float = RECYCLE_SHARE, per_cluster: int = PER_CLUSTER) -> tuple[int, int]:
    """(candidates, clusters) for ``dropped`` tokens: ``m = int(share * d) + 1`` (at most d) and
    ``int(m / per_cluster) + 1`` (at most m); (0, 0) when nothing is dropped."""
    if dropped <= 0:
        return 0, 0
    m = min(int(dropped * share) + 1, dropped)
    return m, min(int(m / per_cluster) + 1, m)


def cluster_count(dropped: int, share: float = RECYCLE_SHARE, per_cluster: int = PER_CLUSTER) -> int:
    """New tokens a stage adds when it drops ``dropped`` tokens."""
    return recycle_count(dropped, share, per_cluster)[1]


def rank_count(relation: torch.Tensor, scale: float, bias: float) -> tuple[int, bool]:
    """v1's count from a (raters, n) attention matrix: ``(min(int(rank * scale + bias), n - 1), True)``, or
    ``(n, False)`` when the matrix has full column rank ``n`` (no cut)."""
    n = relation.shape[-1]
    # sync: the rank decides an output shape
    rank = int(torch.linalg.matrix_rank(relation.float()))
    if rank == n:
        return n, False
    return max(0, min(int(rank * scale + bias), n - 1)), True


def raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(m,) bool: the text tokens (``text`` (m, D) input embeddings) whose relevance to the image (``visual`` (n, D))
    exceeds the mean: relevance = ``softmax over text of V T^T``, mean over the visual tokens."""
    rel = (visual.float() @ text.float().T).softmax(dim=-1).mean(dim=0)
    return rel > rel.mean()


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering (kNN density, k = ``clusters``) of ``x`` (m, C) into ``clusters`` groups; returns
    (the cluster means (clusters, C), in decreasing order of the centres' ``delta * density``; the cluster of each
    row (m,))."""
    m, c = x.shape
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / (c ** 0.5)
    near = torch.topk(dist, k=clusters, dim=-1, largest=False).values
    density = torch.exp(-(near ** 2).mean(dim=-1))
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = torch.sort(-(delta * density), stable=True).indices[:clusters]  # ties: the lower index
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(clusters, device=x.device)
    counts = torch.zeros(clusters, device=x.device).index_add_(0, assign, torch.ones(m, device=x.device))
    sums = torch.zeros(clusters, c, device=x.device).index_add_(0, assign, xf)
    return sums / (counts + 1e-6)[:, None], assign
