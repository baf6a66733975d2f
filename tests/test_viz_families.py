"""Kept tokens drawn where they belong: pixel checks on synthetic images whose kept indices are known, per family.

Each synthetic image has a distinct flat colour per token cell, so a cell drawn at the wrong place or left
undimmed shows up as a wrong pixel value. Panels are rendered at the image's own size (no scaling).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokprune.record import Merged, PruneRecord, Stage
from tokprune.testing import tiny_model
from tokprune.viz import PALETTE, clip_layout, layout_of, next_layout, picture, qwen_layout, render_view, stages_picture
from tokprune.viz.draw import MERGE_TINT, OUTLINE
from tokprune.viz.layout import unpadded_shape

DIM = 0.25


def checker(w: int, h: int, cell: int) -> Image.Image:
    """A (w, h) image whose ``cell`` x ``cell`` blocks each have their own flat colour."""
    ys, xs = np.mgrid[0:h, 0:w]
    r, c = ys // cell, xs // cell
    px = np.stack([40 + 9 * r % 200, 60 + 13 * c % 180, 100 + 5 * (r + c) % 150], -1)
    return Image.fromarray(px.astype(np.uint8))


def kept_mask(n: int, kept: list[int]) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[kept] = True
    return m


def interior(a: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Pixels of a cell minus its 1-pixel border (where the kept outline goes)."""
    return a[y0 + 1:y1 - 1, x0 + 1:x1 - 1]


def test_clip_grid_kept_cell_unchanged_and_pruned_dimmed() -> None:
    img = checker(64, 64, 16)
    src = np.asarray(img).astype(float)
    layout = clip_layout(img.size, 4, n_visual=16)
    out = np.asarray(render_view(img, layout.views[0], kept_mask(16, [1, 6]), size=64, dim=DIM)).astype(float)
    assert out.shape == (64, 64, 3)
    for t in (1, 6):  # kept: untouched inside, outlined on the border
        r, c = divmod(t, 4)
        x0, y0 = 16 * c, 16 * r
        assert (interior(out, x0, y0, x0 + 16, y0 + 16) == interior(src, x0, y0, x0 + 16, y0 + 16)).all()
        assert (out[y0, x0 + 3] == OUTLINE).all()
    for t in (0, 5, 15):  # pruned: every pixel at DIM of its brightness
        r, c = divmod(t, 4)
        block = (slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16))
        assert np.allclose(out[block], np.floor(src[block] * DIM), atol=1)


def test_clip_grid_covers_the_centre_crop_of_a_wide_image() -> None:
    img = checker(96, 64, 16)  # the CLIP processor sees the centre 64 x 64 square: x in [16, 80)
    src = np.asarray(img).astype(float)
    layout = clip_layout(img.size, 4)
    assert layout.views[0].box == (16.0, 0.0, 80.0, 64.0)
    out = np.asarray(render_view(img, layout.views[0], kept_mask(16, list(range(16))), size=96, dim=DIM))
    assert (interior(out, 16, 0, 32, 16) == interior(src, 16, 0, 32, 16)).all()  # token 0 starts at x = 16
    assert np.allclose(out[:, :16], np.floor(src[:, :16] * DIM), atol=1)  # never seen by the model: dimmed


def test_clip_cls_token_and_count_mismatch() -> None:
    assert clip_layout((64, 64), 4, cls=True).views[0].tokens[0, 0] == 1
    with pytest.raises(ValueError, match="has 16 visual tokens but the record has 17"):
        clip_layout((64, 64), 4, n_visual=17)


# ------------------------------------------------------------------------------------------------ LLaVA-NeXT
@pytest.fixture(scope="module")
def next_model():
    return tiny_model("llava_next")[0]


@pytest.mark.parametrize("hw", [(56, 84), (84, 56), (28, 28), (50, 50), (30, 100), (100, 41)])
def test_next_layout_matches_the_models_own_packing(next_model, hw) -> None:
    """Label every tile patch with its canvas (row, col), pack it with the model's pack_image_features and check
    that the layout names the same token for the same cell (base tile, unpadding offsets, newline slots)."""
    cfg = next_model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    layout = next_layout((hw[1], hw[0]), hw, cfg)
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    th, tw = get_anyres_image_grid_shape(list(hw), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    tiles = [torch.arange(g * g, dtype=torch.float32)]
    for t in range(th * tw):
        ti, tj = divmod(t, tw)
        i, j = np.divmod(np.arange(g * g), g)
        tiles.append(torch.tensor(1000 + (ti * g + i) * 100 + (tj * g + j), dtype=torch.float32))
    feats = torch.stack(tiles)[..., None]
    packed, _ = next_model.model.pack_image_features([feats], torch.tensor([hw]), "default",
                                                     image_newline=torch.tensor([-1.0]))
    codes = packed[0][:, 0].round().long().numpy()
    assert codes.size == layout.n_tokens
    base, hi = layout.views
    assert (codes[base.tokens] == np.arange(g * g).reshape(g, g)).all()
    r0, _, c0, _ = unpadded_shape(th * g, tw * g, hw)
    rows, cols = hi.shape
    want = 1000 + (r0 + np.arange(rows))[:, None] * 100 + (c0 + np.arange(cols))[None, :]
    assert (codes[hi.tokens] == want).all()
    assert (codes[hi.newlines] == -1).all()
    img = Image.new("RGB", (hw[1], hw[0]), (90, 90, 90))
    kept = np.zeros(layout.n_tokens, dtype=bool)
    kept[hi.newlines[::2]] = True
    strip = np.asarray(render_view(img, hi, kept, size=max(hw)))[:, -1]
    assert {tuple(p) for p in strip} <= {(90, 200, 90), (70, 70, 70), (255, 255, 255)}
    assert (strip == (90, 200, 90)).all(-1).any() and ((strip == (70, 70, 70)).all(-1).any() or rows == 1)


def test_next_spatial_layout_of_the_reference_tile_budget(next_model) -> None:
    """``tile_budget="per_tile_reference"`` packs the references' way (base tile, then the stitched grid of full
    crops, padding included, no newline): the layout names the token the reference's flattening
    (``view(rows, cols, g, g).permute(0, 2, 1, 3)``) puts at each canvas cell, and ``layout_of`` picks it from a
    record of such a run."""
    import tokprune
    from tokprune.testing import image_prompt, make_image

    cfg = next_model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    hw = (56, 84)  # a padded image: the canvas's top and bottom rows are padding
    layout = next_layout((hw[1], hw[0]), hw, cfg, spatial=True)
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    th, tw = get_anyres_image_grid_shape(list(hw), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    i, j = np.divmod(np.arange(g * g), g)
    crops = np.stack([1000 + (ti * g + i) * 100 + (tj * g + j) for ti in range(th) for tj in range(tw)])
    codes = np.concatenate([np.arange(g * g), crops.reshape(th, tw, g, g).transpose(0, 2, 1, 3).reshape(-1)])
    base, hi = layout.views
    assert layout.n_tokens == codes.size == g * g * (1 + th * tw) and hi.newlines is None
    assert (codes[base.tokens] == np.arange(g * g).reshape(g, g)).all()
    want = 1000 + np.arange(th * g)[:, None] * 100 + np.arange(tw * g)[None, :]
    assert (codes[hi.tokens] == want).all()
    model, proc = next_model, tiny_model("llava_next")[1]
    x = proc(images=[make_image(hw[1], hw[0])], text=image_prompt(proc), return_tensors="pt")
    with torch.no_grad(), tokprune.pruned(model, "cls", keep=2, tile_budget="per_tile_reference"):
        model(**x)
        rec = tokprune.last_record(model)
    got = layout_of(rec, (hw[1], hw[0]))
    assert got.n_tokens == rec.n_visual[0][0] == layout.n_tokens and got.views[1].newlines is None


def test_next_tiled_image_with_unpadding_pixels(next_model) -> None:
    """An 84 x 56 (w x h) image: 2x2 tiles of 28 px (a 4x4 token grid on a 56 x 56 canvas). The image is resized
    to 56 x 38 and centred, so unpadding drops the top and bottom token rows; the two rows left cover canvas rows
    [14, 42), i.e. image y in [7.4, 48.6). Kept cells stay as they are, pruned ones and the uncovered strips are
    dimmed, and the newline strip is green where the row's newline was kept."""
    hw = (56, 84)
    img = checker(84, 56, 7)
    src = np.asarray(img).astype(float)
    layout = next_layout(img.size, hw, next_model.config, n_visual=4 + 2 * 5)
    base, hi = layout.views
    assert hi.shape == (2, 4) and hi.name == "high-res 2x2 tiles"
    x0, y0, x1, y1 = hi.box
    assert (x0, x1) == (0, 84) and y0 == pytest.approx((14 - 9) * 56 / 38) and y1 == pytest.approx(33 * 56 / 38)
    kept = [int(hi.tokens[0, 1]), int(hi.newlines[0])]
    panel = np.asarray(render_view(img, hi, kept_mask(layout.n_tokens, kept), size=84, dim=DIM)).astype(float)
    assert panel.shape[1] > 84  # the newline strip
    assert (panel[9:27, 22:41] == src[9:27, 22:41]).all()  # token (0, 1): x in [21, 42), y in [7.4, 28)
    assert np.allclose(panel[:7, :84], np.floor(src[:7] * DIM), atol=1)  # above the unpadded grid: not seen
    assert np.allclose(panel[:, 43:84], np.floor(src[:, 43:] * DIM), atol=1)
    assert np.allclose(panel[30:, :84], np.floor(src[30:] * DIM), atol=1)  # second row pruned
    strip = panel[:, -1].astype(int)
    assert tuple(strip[15]) == (90, 200, 90) and tuple(strip[40]) == (70, 70, 70)
    base_panel = np.asarray(render_view(img, base, kept_mask(layout.n_tokens, kept), size=84, dim=DIM))
    assert np.allclose(base_panel, np.floor(src * DIM), atol=1)  # nothing of the base tile kept


# ------------------------------------------------------------------------------------------------ Qwen
def test_qwen_grid_of_merge_units_pixels() -> None:
    img = checker(84, 56, 28)  # (1, 4, 6) patches of 14 px -> 2 x 3 merge units of 28 px
    src = np.asarray(img).astype(float)
    layout = qwen_layout(img.size, (1, 4, 6), merge=2, n_visual=6)
    view = layout.views[0]
    assert view.shape == (2, 3) and view.unit == "2x2 merge unit"
    out = np.asarray(render_view(img, view, kept_mask(6, [1, 5]), size=84, dim=DIM)).astype(float)
    for t in (1, 5):
        r, c = divmod(t, 3)
        assert (interior(out, 28 * c, 28 * r, 28 * c + 28, 28 * r + 28)
                == interior(src, 28 * c, 28 * r, 28 * c + 28, 28 * r + 28)).all()
    for t in (0, 2, 3, 4):
        r, c = divmod(t, 3)
        block = (slice(28 * r, 28 * r + 28), slice(28 * c, 28 * c + 28))
        assert np.allclose(out[block], np.floor(src[block] * DIM), atol=1)
    with pytest.raises(NotImplementedError, match="video"):
        qwen_layout(img.size, (2, 4, 6))
    with pytest.raises(ValueError, match="merge units"):
        qwen_layout(img.size, (1, 5, 6))


# ------------------------------------------------------------------------------------------------ records
def fake_record(config, kept: list[list[int]], n: int = 16, stages: int = 1, merged=None, **kw) -> PruneRecord:
    rec = PruneRecord(method="test", n_visual=[[n] * len(kept)], seq_len=[0], config=config, merged=merged, **kw)
    for s in range(stages):
        k = [torch.tensor(list(range(4, n)) if s < stages - 1 else x) for x in kept]
        rec.stages.append(Stage("vision" if s == 0 else "llm", None if s == 0 else s + 1, [k]))
    return rec


@pytest.fixture(scope="module")
def llava_config():
    return tiny_model("llava")[0].config  # 56 px, 14 px patches: 4 x 4


def test_several_images_each_drawn_with_its_own_kept_set(llava_config) -> None:
    flat = Image.new("RGB", (56, 56), (200, 120, 40))
    rec = fake_record(llava_config, [[0], [10, 11, 15]])
    pic = np.asarray(picture([flat, flat], rec, size=56))
    same = (pic == (200, 120, 40)).all(-1)
    half = pic.shape[1] // 2
    left, right = same[:, :half], same[:, half:]
    assert left.sum() == 1 * 12 * 12 and right.sum() == 3 * 12 * 12  # 14 px cells minus the outline
    ys, xs = np.nonzero(right)
    assert xs.min() - np.nonzero((pic[:, half:] != 255).any(-1))[1].min() >= 28  # right panel: columns 2, 3 only
    with pytest.raises(ValueError, match="has 2 image"):
        picture(flat, rec)


def test_merged_tokens_colour_exactly_their_sources(llava_config) -> None:
    flat = Image.new("RGB", (56, 56), (100, 100, 100))
    merged = [[Merged(sources=[torch.tensor([0, 1, 4]), torch.tensor([10])])]]
    rec = fake_record(llava_config, [[5, 15]], merged=merged)
    from tokprune.viz.panels import image_panels, merged_sources

    sources = merged_sources(rec, 0, 0)
    assert sources == {0: [0, 1, 4], 1: [10]}
    view = layout_of(rec, flat.size).views[0]
    out = np.asarray(render_view(flat, view, kept_mask(16, [5, 15]), size=56, dim=DIM,
                                 owner=np.array([0, 0, -1, -1, 0, -1, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1])))
    tint = [np.floor(100 * (1 - MERGE_TINT) + np.array(c) * MERGE_TINT) for c in PALETTE[:2]]
    for t in range(16):
        r, c = divmod(t, 4)
        block = out[14 * r:14 * r + 14, 14 * c:14 * c + 14].astype(float)
        if t in (0, 1, 4):
            assert np.allclose(block, tint[0], atol=1), t
        elif t == 10:
            assert np.allclose(block, tint[1], atol=1)
        elif t in (5, 15):
            assert (block[1:-1, 1:-1] == 100).all()
        else:
            assert np.allclose(block, 25, atol=1)
    # the same structure as a plain {merged token: sources} mapping draws the same picture
    rec_dict = fake_record(llava_config, [[5, 15]], merged=[[{0: [0, 1, 4], 1: [10]}]])
    assert np.array_equal(np.asarray(picture(flat, rec)), np.asarray(picture(flat, rec_dict)))
    with pytest.raises(ValueError, match="source of two merged tokens"):
        image_panels(flat, layout_of(rec, flat.size), np.array([5]), merged={0: [1], 1: [1]})


def test_one_panel_per_stage(llava_config) -> None:
    flat = Image.new("RGB", (56, 56), (200, 120, 40))
    rec = fake_record(llava_config, [[0, 15]], stages=2)
    one = picture(flat, rec, size=56)
    both = stages_picture(flat, rec, size=56)
    assert both.width >= 2 * one.width
    first = (np.asarray(picture(flat, rec, stage=0, size=56)) == (200, 120, 40)).all(-1).sum()
    last = (np.asarray(one) == (200, 120, 40)).all(-1).sum()
    assert first == 12 * 12 * 12 and last == 2 * 12 * 12  # stage 0 kept 12 of 16, the last 2
    with pytest.raises(IndexError, match="2 stage"):
        picture(flat, rec, stage=2)


def test_layout_of_needs_the_records_image_metadata(llava_config) -> None:
    cfg = tiny_model("qwen2_vl")[0].config
    rec = PruneRecord(method="x", n_visual=[[6]], seq_len=[0], config=cfg)
    with pytest.raises(ValueError, match="image_grid_thw"):
        layout_of(rec, (84, 56))
    rec.image_grid_thw = [[(1, 4, 6)]]
    assert layout_of(rec, (84, 56)).views[0].shape == (2, 3)
    with pytest.raises(ValueError, match="pass config=model.config"):
        layout_of(PruneRecord(method="x", n_visual=[[6]], seq_len=[0]), (84, 56))


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_real_records_with_two_images_of_different_sizes(family) -> None:
    """A prompt with two images of different sizes: every image's layout must account for exactly the visual tokens
    the model gave it (the layout raises otherwise), and the picture has a panel group per image."""
    import tokprune
    from tokprune.testing import QWEN_IMAGE_TAG, image_prompt, make_image

    model, proc = tiny_model(family)
    imgs = [make_image(84, 56, seed=1), make_image(56, 112, seed=2)]
    text = (f"user {QWEN_IMAGE_TAG} {QWEN_IMAGE_TAG} what ? assistant :" if family.startswith("qwen")
            else image_prompt(proc, 2))
    enc = proc(images=imgs, text=[text], return_tensors="pt")
    with tokprune.pruned(model, "random", keep_ratio=0.5):
        with torch.no_grad():
            model(**enc)
        rec = tokprune.last_record(model)
    for i, img in enumerate(imgs):
        layout = layout_of(rec, img.size, 0, i)
        assert layout.n_tokens == rec.n_visual[0][i]
        cells = sorted(t for v in layout.views for t in v.tokens.reshape(-1).tolist())
        extra = sorted(t for v in layout.views if v.newlines is not None for t in v.newlines.tolist())
        assert sorted(cells + extra) == list(range(layout.n_tokens))  # every token drawn exactly once
    one = picture(imgs[0], _only(rec, 0)).width
    assert picture(imgs, rec).width > one


def _only(rec: PruneRecord, i: int) -> PruneRecord:
    """The record restricted to image ``i`` of sample 0."""
    out = PruneRecord(method=rec.method, n_visual=[[rec.n_visual[0][i]]], seq_len=rec.seq_len, config=rec.config)
    out.stages = [Stage(s.kind, s.layer, [[s.kept[0][i]]]) for s in rec.stages]
    for key in ("image_sizes", "image_grid_thw"):
        if getattr(rec, key) is not None:
            setattr(out, key, [[getattr(rec, key)[0][i]]])
    return out
