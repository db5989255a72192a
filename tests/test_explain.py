import json
import math

import numpy as np
import pytest
from PIL import Image

from flipback.explain import Explanation, Region, explain_changes, save_figure, save_figures


def _zeros(n=1, h=32, w=32, c=3):
    return np.zeros((n, h, w, c), dtype=np.float32)


def test_single_block_one_region_and_norms():
    x = _zeros()
    xc = x.copy()
    xc[0, 10:13, 20:23, :] += 0.1
    (e,) = explain_changes(x, xc)
    assert isinstance(e, Explanation)
    assert e.delta.shape == (32, 32, 3) and e.delta.dtype == np.float32
    assert e.heatmap.shape == (32, 32) and e.heatmap.dtype == np.float32
    assert e.region_map.shape == (32, 32) and e.region_map.dtype == np.int32
    assert e.heatmap.sum() == pytest.approx(1.0, abs=1e-5)
    assert len(e.regions) == 1
    r = e.regions[0]
    assert isinstance(r, Region) and r.id == 1
    y0, x0, y1, x1 = r.bbox
    assert y0 <= 10 and x0 <= 20 and y1 >= 13 and x1 >= 23
    # tight: the region stays near the block
    assert y1 - y0 <= 7 and x1 - x0 <= 7
    assert r.share == pytest.approx(1.0, abs=1e-6)
    assert r.centroid == pytest.approx((11.0, 21.0), abs=1e-6)
    assert r.area == int((e.region_map == 1).sum())
    assert (e.region_map[10:13, 20:23] == 1).all()
    assert e.l2 == pytest.approx(math.sqrt(9 * 3 * 0.01), rel=1e-5)
    assert e.linf == pytest.approx(0.1, rel=1e-5)
    assert e.l0 == 27
    assert e.frac_changed == pytest.approx(9 / 1024)
    for v in (e.l2, e.linf, e.l0, e.frac_changed):
        assert type(v) is float


def test_two_blocks_ranked_by_magnitude():
    x = _zeros()
    xc = x.copy()
    xc[0, 25:28, 25:28, :] += 0.1  # weaker, listed first in the image
    xc[0, 2:5, 2:5, :] += 0.3  # stronger
    (e,) = explain_changes(x, xc)
    assert len(e.regions) == 2
    strong, weak = e.regions
    assert [strong.id, weak.id] == [1, 2]
    assert strong.bbox[0] <= 2 and strong.bbox[2] >= 5 and strong.bbox[1] <= 2 and strong.bbox[3] >= 5
    assert weak.bbox[0] <= 25 and weak.bbox[2] >= 28 and weak.bbox[1] <= 25 and weak.bbox[3] >= 28
    assert strong.share == pytest.approx(0.75, abs=1e-6)
    assert weak.share == pytest.approx(0.25, abs=1e-6)
    assert (e.region_map[2:5, 2:5] == 1).all() and (e.region_map[25:28, 25:28] == 2).all()


def test_max_regions_truncates():
    x = _zeros()
    xc = x.copy()
    for k, (y, xx) in enumerate([(2, 2), (2, 20), (20, 2), (20, 20)]):
        xc[0, y : y + 3, xx : xx + 3, :] += 0.1 * (k + 1)
    (e,) = explain_changes(x, xc, max_regions=2)
    assert [r.id for r in e.regions] == [1, 2]
    assert e.regions[0].share > e.regions[1].share
    assert set(np.unique(e.region_map)) == {0, 1, 2}
    assert (e.region_map[20:23, 20:23] == 1).all()


def test_no_change():
    x = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
    exps = explain_changes(x, x.copy())
    for e in exps:
        assert e.regions == []
        assert not e.heatmap.any()
        assert not e.region_map.any()
        assert e.l2 == 0.0 and e.linf == 0.0 and e.l0 == 0.0 and e.frac_changed == 0.0
        assert e.to_dict()["regions"] == []


def test_one_level_changes_count_in_l0_not_frac_changed():
    x = np.full((1, 8, 8, 1), 100 / 255, dtype=np.float32)
    xc = x.copy()
    xc[0, 0, 0, 0] = 101 / 255  # one 8-bit level
    xc[0, 1, 1, 0] = 103 / 255  # three levels
    (e,) = explain_changes(x, xc)
    assert e.l0 == 2
    assert e.frac_changed == pytest.approx(1 / 64)


def test_batch_equals_per_image():
    rng = np.random.default_rng(1)
    x = rng.random((4, 32, 32, 3), dtype=np.float32)
    noise = np.zeros_like(x)
    noise[0, 5:9, 5:9] = 0.05
    noise[1] = rng.normal(0, 0.01, size=x.shape[1:])
    noise[2, 20:, :10, 0] = -0.2
    xc = np.clip(x + noise, 0, 1).astype(np.float32)
    batch = explain_changes(x, xc, sigma=1.5, max_regions=3)
    for i in range(4):
        (single,) = explain_changes(x[i : i + 1], xc[i : i + 1], sigma=1.5, max_regions=3)
        b = batch[i]
        np.testing.assert_array_equal(b.delta, single.delta)
        np.testing.assert_allclose(b.heatmap, single.heatmap, atol=1e-7)
        np.testing.assert_array_equal(b.region_map, single.region_map)
        assert b.to_dict() == single.to_dict()
    assert batch[3].regions == []


def test_to_dict_is_json_safe():
    x = _zeros()
    xc = x.copy()
    xc[0, 10:13, 20:23, :] += 0.1
    (e,) = explain_changes(x, xc)
    d = json.loads(json.dumps(e.to_dict()))
    assert set(d) == {"l2", "linf", "l0", "frac_changed", "regions"}
    r = d["regions"][0]
    assert set(r) == {"id", "bbox", "area", "share", "centroid"}
    assert len(r["bbox"]) == 4 and len(r["centroid"]) == 2


def test_bad_inputs():
    with pytest.raises(ValueError):
        explain_changes(np.zeros((32, 32, 3)), np.zeros((32, 32, 3)))
    with pytest.raises(ValueError):
        explain_changes(np.zeros((1, 8, 8, 2)), np.zeros((1, 8, 8, 2)))
    with pytest.raises(ValueError):
        explain_changes(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 9, 3)))
    assert explain_changes(np.zeros((0, 8, 8, 3)), np.zeros((0, 8, 8, 3))) == []


@pytest.mark.parametrize("c", [1, 3])
def test_save_figure_png(tmp_path, c):
    x = np.random.default_rng(2).random((1, 28, 28, c), dtype=np.float32)
    xc = x.copy()
    xc[0, 3:6, 3:6] = np.clip(xc[0, 3:6, 3:6] + 0.2, 0, 1)
    (e,) = explain_changes(x, xc)
    names = ["a $x^2$ cat", "<dog> & $", "plain"]
    out = save_figure(
        tmp_path / "sub" / f"fig{c}.png", x[0], xc[0], e,
        class_names=names, true_label=1, pred_before=0, pred_after=1,
        scores_before=[0.6, 0.3, 0.1], scores_after=[0.2, 0.7, 0.1], dpi=50,
    )
    assert out.exists() and out.stat().st_size > 0
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (500, 145)


def test_save_figure_no_change_and_batch(tmp_path):
    x = np.zeros((2, 32, 32, 3), dtype=np.float32)
    xc = x.copy()
    xc[1, 0:2, 0:2] = 0.5
    exps = explain_changes(x, xc)
    paths = save_figures(
        [tmp_path / "a.png", tmp_path / "b.png"], x, xc, exps,
        class_names=["$", "<"], true_labels=[1, 0], preds_before=[0, 1], preds_after=[0, 0],
        scores_before=[0.9, 0.8], dpi=40,
    )
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (400, 116)
