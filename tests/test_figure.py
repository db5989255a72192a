"""Per-image figures composed with Pillow: known-answer checks on the pixels of each panel."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from flipback.explain import explain_changes, save_figure
from flipback.explain.figure import panel_boxes


def _read(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def _crop(fig: np.ndarray, panel) -> np.ndarray:
    x0, y0, x1, y1 = panel.box
    return fig[y0:y1, x0:x1]


def _enlarged(u8: np.ndarray, k: int) -> np.ndarray:
    """(H, W, C) uint8 -> (H*k, W*k, 3): nearest-neighbour, grey repeated into RGB."""
    big = np.repeat(np.repeat(u8, k, axis=0), k, axis=1)
    return np.broadcast_to(big, (*big.shape[:2], 3)) if big.shape[-1] == 1 else big


def _pair(h, w, c, seed=0):
    """An 8-bit image (as floats) and a corrected copy changed in one 4x5 block, plus explanation."""
    rng = np.random.default_rng(seed)
    u8 = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    cu8 = u8.copy()
    cu8[6:10, 9:14] = 255 - cu8[6:10, 9:14]
    x, xc = u8 / np.float32(255), cu8 / np.float32(255)
    (e,) = explain_changes(x[None].astype(np.float32), xc[None].astype(np.float32))
    return u8, cu8, x.astype(np.float32), xc.astype(np.float32), e


def _layout_sane(fig, panels, size):
    assert fig.shape[:2] == (size[1], size[0])
    for a, b in zip(panels, panels[1:]):
        assert a.box[2] <= b.box[0]  # left to right, no overlap
    for p in panels:
        x0, y0, x1, y1 = p.box
        assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]


def test_rgb_panels_hold_the_original_and_corrected_pixels(tmp_path):
    u8, cu8, x, xc, e = _pair(32, 32, 3)
    out = save_figure(tmp_path / "f.png", x, xc, e, class_names=["cat", "dog"], true_label=1,
                      pred_before=0, pred_after=1, scores_before=[0.7, 0.3], scores_after=[0.4, 0.6])
    fig = _read(out)
    panels = panel_boxes((32, 32))
    _layout_sane(fig, panels, (1000, 290))
    assert all(p.scale == 7 for p in panels)  # 32 px enlarged 7x into a ~233 px panel
    np.testing.assert_array_equal(_crop(fig, panels[0]), _enlarged(u8, 7))
    np.testing.assert_array_equal(_crop(fig, panels[1]), _enlarged(cu8, 7))
    # the amplified change: grey 128 where nothing changed, and the changed block is not grey
    amp = _crop(fig, panels[2])[::7, ::7]
    changed = np.zeros((32, 32), bool)
    changed[6:10, 9:14] = (u8[6:10, 9:14] != cu8[6:10, 9:14]).any(-1)
    assert (amp[~changed] == 128).all()
    assert (amp[changed] != 128).any(-1).all()
    # the heatmap panel is the original darkened under the colour map; the region is outlined in cyan
    heat = _crop(fig, panels[3])
    assert not np.array_equal(heat, _crop(fig, panels[0]))
    y0, x0, y1, x1 = e.regions[0].bbox
    assert tuple(heat[y1 * 7 - 1, x1 * 7 - 1]) == (0, 255, 255)


def test_one_channel_image(tmp_path):
    u8, cu8, x, xc, e = _pair(28, 28, 1, seed=3)
    out = save_figure(tmp_path / "g.png", x, xc, e, class_names=["T-shirt/top", "Trouser"], true_label=0,
                      pred_before=1, pred_after=0)
    fig = _read(out)
    panels = panel_boxes((28, 28))
    _layout_sane(fig, panels, (1000, 290))
    assert all(p.scale == 8 for p in panels)
    orig, corr = _crop(fig, panels[0]), _crop(fig, panels[1])
    np.testing.assert_array_equal(orig, _enlarged(u8, 8))  # grey: R = G = B = the pixel value
    np.testing.assert_array_equal(corr, _enlarged(cu8, 8))
    # a 2-D (H, W) image draws the same figure
    out2 = save_figure(tmp_path / "g2.png", x[..., 0], xc[..., 0], e, class_names=["T-shirt/top", "Trouser"],
                       true_label=0, pred_before=1, pred_after=0)
    np.testing.assert_array_equal(_read(out2), fig)


def test_dpi_scales_the_canvas_and_panels(tmp_path):
    u8, cu8, x, xc, e = _pair(28, 28, 1)
    fig = _read(save_figure(tmp_path / "s.png", x, xc, e, class_names=None, true_label=0, pred_before=1,
                            pred_after=0, dpi=200))
    panels = panel_boxes((28, 28), dpi=200)
    _layout_sane(fig, panels, (2000, 580))
    np.testing.assert_array_equal(_crop(fig, panels[0]), _enlarged(u8, int(panels[0].scale)))


def test_large_image_shrinks_to_fit(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((300, 500, 3), dtype=np.float32)
    xc = x.copy()
    xc[:10, :10] = 0
    (e,) = explain_changes(x[None], xc[None])
    fig = _read(save_figure(tmp_path / "big.png", x, xc, e, class_names=None, true_label=0, pred_before=1,
                            pred_after=0))
    panels = panel_boxes((300, 500))
    _layout_sane(fig, panels, (1000, 290))
    assert panels[0].scale < 1


def test_long_names_stay_above_their_own_panel(tmp_path):
    u8, cu8, x, xc, e = _pair(32, 32, 3)
    names = ["W" * 60, "M" * 60 + " $x^2$ <b>"]
    fig = _read(save_figure(tmp_path / "n.png", x, xc, e, class_names=names, true_label=0, pred_before=1,
                            pred_after=0, scores_before=[0.1, 0.9], scores_after=[0.8, 0.2]))
    panels = panel_boxes((32, 32))
    top = panels[0].box[1] - 1  # the title band
    edges = [0] + [e for p in panels for e in p.column] + [fig.shape[1]]
    for left, right in zip(edges[::2], edges[1::2]):  # nothing is drawn between the panels' columns
        assert right > left and (fig[:top, left:right] == 255).all()
    for p in panels:  # but each title is drawn
        assert (fig[:top, p.column[0]:p.column[1]] != 255).any()


def test_nan_pixels_and_no_change(tmp_path):
    x = np.zeros((16, 16, 3), np.float32)
    x[0, 0] = np.nan
    (e,) = explain_changes(np.nan_to_num(x)[None], np.nan_to_num(x)[None])
    fig = _read(save_figure(tmp_path / "z.png", x, x, e, class_names=["a"], true_label=0, pred_before=0,
                            pred_after=0))
    assert (_crop(fig, panel_boxes((16, 16))[2]) == 128).all()  # no change: all grey


def test_threads_draw_the_same_figure(tmp_path):
    u8, cu8, x, xc, e = _pair(32, 32, 3)
    kw = dict(class_names=["cat", "dog"], true_label=1, pred_before=0, pred_after=1)
    ref = save_figure(tmp_path / "ref.png", x, xc, e, **kw).read_bytes()
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda i: save_figure(tmp_path / f"t{i}.png", x, xc, e, **kw), range(16)))
    assert all(p.read_bytes() == ref for p in paths)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 2)), np.zeros((4,))])
def test_bad_image_shape(tmp_path, bad):
    (e,) = explain_changes(np.zeros((1, 4, 4, 3), np.float32), np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        save_figure(tmp_path / "bad.png", bad, bad, e, class_names=None, true_label=0, pred_before=0, pred_after=0)
