"""FlowCut rules: known entropy prune counts, schedules, scores and the reference encoder loop."""

from __future__ import annotations

import math

import pytest
import torch

from tokprune.rules.flowcut import (
    FlowCutState,
    entropy_ratio,
    flowcut_layer_score,
    flowcut_llm_scores,
    flowcut_plan,
    flowcut_prune_count,
    flowcut_schedule,
    flowcut_step,
    flowcut_vit_target,
    global_query_attention,
    semantic_attention,
)


def _four_of_sixteen():
    a = torch.full((1, 16), 1e-30)
    a[0, [2, 5, 7, 11]] = 0.25
    return a


def test_entropy_gives_known_prune_count():
    a = _four_of_sixteen()  # entropy log 4 over N = 16: r_H = 1/2, 1 - r_H^2 = 3/4
    assert entropy_ratio(a).item() == pytest.approx(0.5, abs=1e-6)
    assert flowcut_prune_count(a, rpl=9, keep=4) == 3  # 12 / 3 * 0.75
    assert flowcut_prune_count(a, rpl=1, keep=4) == 9  # 12 * 0.75
    assert flowcut_prune_count(a, rpl=0, keep=4) == 12  # forced: all above keep
    uniform = torch.full((1, 16), 1 / 16)
    assert flowcut_prune_count(uniform, rpl=4, keep=4) == 0  # maximal entropy prunes nothing
    # batch: the maximum over the batch (the peaked row) wins
    assert flowcut_prune_count(torch.cat([uniform, a]), rpl=9, keep=4) == 3


def test_plan_clip_24_layers():
    plan = flowcut_plan(24)
    assert [i for i, _, p in plan if p] == list(range(1, 22, 2))
    assert plan[21][1] == 0 and plan[0][1] == 21 and not plan[22][2] and not plan[23][2]
    qwen = flowcut_plan(32, select_layer=32)  # Qwen2-VL: rpl = 31 - i
    assert [i for i, _, p in qwen if p] == list(range(1, 32, 2))


def test_schedule_known_counts_and_half_even_rounding():
    # r_H = 1 everywhere: nothing pruned until the forced cut at layer 21 (the layer before the feature layer)
    s = flowcut_schedule(576, 64, entropy_ratios={i: 1.0 for i in range(24)})
    assert s[:21] == [576] * 21 and s[21:] == [64, 64, 64]
    # 6 layers, select_layer 4: layer 1 (rpl 2) drops round(90 / sqrt 2) = 64, layer 3 (rpl 0) cuts to keep
    assert flowcut_schedule(100, 10, entropy_ratios={1: 0.0}, num_layers=6, select_layer=4) == [
        100, 36, 36, 10, 10, 10,
    ]
    # rpl 4, r_H 0.5: 12 / 2 * 0.75 = 4.5 rounds to 4 (half to even, as torch.round in the reference)
    assert flowcut_schedule(16, 4, entropy_ratios={0: 0.5, 2: 1.0}, num_layers=7, select_layer=5) == [
        12, 12, 12, 12, 4, 4, 4,
    ]
    assert flowcut_schedule(16, 4, prune_counts={0: 20}, num_layers=7, select_layer=5)[0] == 4  # never below keep


def test_vit_targets():
    assert flowcut_vit_target(64) == 64
    assert flowcut_vit_target(160, "anyres") == 80
    assert flowcut_vit_target(64, "qwen2") == 512


def test_layer_score_and_step_known_indices():
    a = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2]])
    s = torch.full((1, 5), 0.2)
    v = torch.zeros(1, 5, 2)
    v[0, :, 0] = torch.tensor([1.0, 1.0, -1.0, 5.0, 0.1])  # L1 norm uses |v|
    score = flowcut_layer_score(a, v, s)
    torch.testing.assert_close(score, torch.tensor([[0.3, 0.4, 0.5, 2.0, 0.04]]))
    st = FlowCutState(None, torch.arange(5)[None])
    # layer 2 with select_layer 4: rpl 1 (odd): EMA starts, nothing dropped
    st, idx = flowcut_step(st, 2, 4, keep=2, cls_attention=a, value_mean=v, semantic=s)
    assert idx is None
    torch.testing.assert_close(st.cumulative, score)
    # layer 3: rpl 0: cut to keep by the EMA 0.5 * old + 0.5 * new
    new_a = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]])
    st, idx = flowcut_step(st, 3, 4, keep=2, cls_attention=new_a, value_mean=torch.ones(1, 5, 1), semantic=s)
    cur = torch.tensor([[0.8, 0.3, 0.3, 0.3, 0.3]])
    assert idx.tolist() == [[0, 3]]  # EMA: [.55, .35, .4, 1.15, .17]
    torch.testing.assert_close(st.cumulative, (0.5 * score + 0.5 * cur)[:, [0, 3]])
    assert st.index.tolist() == [[0, 3]]
    st2, idx2 = flowcut_step(st, 4, 4, 2, a[:, :2], v[:, :2], s[:, :2])
    assert st2 is st and idx2 is None  # at keep: untouched


def _ref_layer(attn, values, target, rpl, cum, keep_idx):
    """The reference CLIPEncoderLayer_forward FlowCut block on full-length tokens ([CLS] at 0)."""
    t, h = attn.shape[-1], attn.shape[1]
    if t > target:
        cls_attention = attn[:, :, 0, 1:].mean(dim=1)
        per_head = [torch.softmax(torch.einsum("bd,bnd->bn", values[:, j, 0], values[:, j]), -1) for j in range(h)]
        sem = torch.stack(per_head, dim=1).mean(1)[:, 1:]
        vm = values.mean(1)[:, 1:]
        rel = cls_attention / cls_attention.sum(-1, keepdim=True)
        ss = sem / sem.sum(-1, keepdim=True)
        scores = (rel + ss) * torch.norm(vm, p=1, dim=-1)
        cum = scores.clone() if cum is None else 0.5 * cum + 0.5 * scores
        if not rpl % 2:
            if rpl:
                n = cls_attention.shape[-1]
                prob = cls_attention / cls_attention.sum(-1, keepdim=True)
                ent = -torch.sum(prob * torch.log(prob), dim=-1) / torch.log(torch.tensor(n))
                r = (n - (target - 1)) / rpl**0.5 * (1 - ent**2)
                if r.shape[0] > 1:
                    r = r.max(0).values
                prune = int(r.round())
            else:
                prune = t
            tn = max(t - prune, target)
            ki = torch.topk(cum, tn - 1, dim=1).indices.sort(dim=1).values
            cum = torch.gather(cum, 1, ki)
            keep_idx = torch.gather(keep_idx, 1, ki)
    return cum, keep_idx


@pytest.mark.parametrize("keep", [5, 17, 40])
def test_encoder_loop_equals_reference_code(keep):
    g = torch.Generator().manual_seed(keep)
    b, h, n, d, layers = 2, 3, 64, 4, 12
    select_layer = layers - 2
    ref_cum, ref_idx = None, torch.arange(n)[None].expand(b, -1)
    st = FlowCutState(None, torch.arange(n)[None].expand(b, -1))
    counts = []
    for i in range(layers):
        t = 1 + st.index.shape[1]
        attn = (3 * torch.randn(b, h, t, t, generator=g)).softmax(-1)
        values = torch.randn(b, h, t, d, generator=g)
        ref_cum, ref_idx = _ref_layer(attn, values, keep + 1, select_layer - i - 1, ref_cum, ref_idx)
        st, _ = flowcut_step(
            st, i, select_layer, keep, attn[:, :, 0, 1:].mean(1), values.mean(1)[:, 1:], semantic_attention(values)
        )
        assert torch.equal(st.index, ref_idx)
        counts.append(st.index.shape[1])
    assert counts[select_layer - 1] == keep and counts[0] == n  # layer 0 (rpl odd) never prunes
    assert len(set(counts)) > 2  # the adaptive layers did prune something


def test_global_query_and_llm_scores_against_loops():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)
    ref = torch.stack([torch.softmax(q[0, hh].mean(0) @ k[0, hh].T / 2.0, -1) for hh in range(2)]).mean(0)
    torch.testing.assert_close(global_query_attention(q, k)[0], ref)
    ql, vl = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    kv, vv = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    out = flowcut_llm_scores(ql, kv, vl, vv)
    for bb in range(2):
        rel = torch.softmax(ql[bb][:, None] @ kv[bb].transpose(1, 2) / math.sqrt(4), -1).mean(0)[0]
        sem = torch.softmax(vl[bb][:, None] @ vv[bb].transpose(1, 2) / math.sqrt(4), -1).mean(0)[0]
        want = (rel / rel.sum() + sem / sem.sum()) * vv[bb].mean(0).abs().sum(-1)
        torch.testing.assert_close(out[bb], want)


def test_semantic_cosine_option():
    v = torch.tensor([[[[1.0, 0.0], [10.0, 0.0], [0.0, 1.0]]]])
    dot = semantic_attention(v)
    cos = semantic_attention(v, "cosine")
    assert dot[0, 0] > 0.99  # unscaled dot: the long aligned value takes (nearly) all the mass
    torch.testing.assert_close(cos[0], torch.tensor([math.e, 1.0]) / (2 * math.e + 1))
    with pytest.raises(ValueError, match="cosine"):
        semantic_attention(v, "l2")


def test_qwen_form_equals_reference_vision_loop():
    """FlowCut_Qwen's vision loop: global-query relevance, no semantic term, rpl = 32 - i - 1, log(a + 1e-7)."""
    g = torch.Generator().manual_seed(5)
    blocks, n, keep, h, d = 8, 48, 6, 2, 4
    st = FlowCutState(None, torch.arange(n)[None])
    ref_cum, ref_alive = None, torch.arange(n)
    for i in range(blocks):
        t = st.index.shape[1]
        q, k, v = (torch.randn(h, t, d, generator=g) for _ in range(3))
        attn = torch.softmax(torch.bmm(q.mean(1, keepdim=True), k.transpose(1, 2)) / math.sqrt(d), -1).mean(0)
        score = attn * torch.norm(v.mean(0), p=1, dim=-1)
        if t > keep:
            rl = blocks - i - 1
            ref_cum = score.squeeze(0) if ref_cum is None else 0.5 * ref_cum + 0.5 * score.squeeze(0)
            if not rl % 2:
                if rl:
                    ent = -torch.sum(attn * torch.log(attn + 1e-7), dim=-1) / torch.log(torch.tensor(t))
                    prune = int(((t - keep) / rl**0.5 * (1 - ent**2)).round())
                else:
                    prune = t
                ki = torch.topk(ref_cum, max(t - prune, keep), dim=0).indices.sort().values
                ref_cum, ref_alive = ref_cum[ki], ref_alive[ki]
        st, _ = flowcut_step(
            st, i, blocks, keep, global_query_attention(q[None], k[None]), v.mean(0)[None], None, eps=1e-7
        )
        assert st.index[0].tolist() == ref_alive.tolist()
    assert st.index.shape[1] == keep
