"""LLaVA-NeXT ``tile_budget="per_tile_reference"``: FasterVLM's count, ``keep`` patches in every tile (base too)."""

from __future__ import annotations

import pytest
import torch
from test_families import TOL, ZOO, inputs, kept_tokens_reference, next_tile_scores, topk_sorted

import tokprune


@pytest.mark.parametrize("budget", [dict(keep=3), dict(keep_ratio=0.75)])
def test_cls_keeps_the_top_t_of_every_tile_and_the_newlines(budget):
    fam = ZOO["llava_next"]
    x = inputs(fam, sizes=[(112, 84), (84, 112)])  # 5 tiles of 2 x 2 per image, none unpadded away
    t = 3  # keep=3, or round(0.75 * 4)
    with torch.no_grad():
        tokprune.apply(fam.model, "cls", tile_budget="per_tile_reference", **budget)
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        ref = kept_tokens_reference(fam, x, rec.kept[0])
    for j, (tile, score) in enumerate(next_tile_scores(fam, x, [1])):
        expected = [(tile < 0).nonzero()[:, 0]]
        for k in range(int(tile.max()) + 1):
            idx = (tile == k).nonzero()[:, 0]
            expected.append(idx[topk_sorted(score[idx], t)])
        assert torch.equal(rec.kept[0][j], torch.cat(expected).sort().values)
        assert int((~rec.special[0][j][rec.kept[0][j]]).sum()) == 5 * t
    assert (out - ref).abs().max() <= TOL


def test_keep_all_and_llm_methods():
    fam = ZOO["llava_next"]
    x = inputs(fam)
    with torch.no_grad():
        ref = fam.model(**x).logits
        with tokprune.pruned(fam.model, "cls", keep_ratio=1.0, tile_budget="per_tile_reference"):
            assert torch.equal(fam.model(**x).logits, ref)
    with pytest.raises(ValueError, match="use tile_budget='per_tile' or 'global'"):
        tokprune.apply(fam.model, "fastv", keep=4, tile_budget="per_tile_reference")
    assert not tokprune.is_patched(fam.model)
