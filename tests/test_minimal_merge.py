"""benchmarks/whitebox_minimal.py --merge: runs over disjoint slices of the errors join into the
table the whole set would give (success and median from the per-image L2s, speed from the summed
seconds), and overlapping slices are refused."""

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("foolbox")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from whitebox_minimal import merge, paired_median  # noqa: E402


def _part(offset, own, anchor, seconds):
    def row(name, l2, pixels="uint8", **extra):
        ok = [v for v in l2 if v is not None]
        return {"attack": name, "pixels": pixels, "l2": l2, "success": len(ok) / len(l2),
                "median_l2": sorted(ok)[len(ok) // 2], "mean_queries": 10.0, "seconds": seconds,
                "images_per_second": len(l2) / seconds, **extra}
    return {"offset": offset, "n_images": len(own),
            "rows": [row("flipback minimal (uint8)", own),
                     row("adv-lib fmn, scale-then-round", anchor, anchor="adv-lib fmn")]}


def test_merge_equals_the_whole_set():
    a = _part(0, [0.1, 0.3, 0.2], [0.15, None, 0.25], seconds=3.0)
    b = _part(3, [0.5, 0.4], [0.35, 0.45], seconds=1.0)
    out = merge([b, a])  # order of the files does not matter
    own, anchor = out["rows"]
    assert out["n_images"] == 5 and out["offset"] == 0 and out["gaps"] == []
    assert own["median_l2"] == pytest.approx(0.3) and own["success"] == 1.0
    # torch's median of an even count is the lower middle: 0.25 of [0.15, 0.25, 0.35, 0.45]
    assert anchor["success"] == pytest.approx(0.8) and anchor["median_l2"] == pytest.approx(0.25)
    assert own["images_per_second"] == pytest.approx(5 / 4.0)
    assert own["l2"] == [0.1, 0.3, 0.2, 0.5, 0.4]  # in the errors' order
    # the anchor misses one image, so it does not count for the speed bar (100% success only)
    assert out["speed_bar"] is None
    # flipback on the four images the anchor corrected: 0.1, 0.2, 0.5, 0.4 -> lower middle 0.2
    assert paired_median(out["rows"], anchor) == pytest.approx(0.2)
    assert paired_median(out["rows"], own) is None


def test_rows_missing_from_a_part_are_dropped_and_gaps_reported(capsys):
    a = _part(0, [0.1, 0.2], [0.1, 0.2], seconds=1.0)
    b = _part(5, [0.3], [0.3], seconds=1.0)
    b["rows"] = b["rows"][:1]
    out = merge([a, b])
    assert [r["attack"] for r in out["rows"]] == ["flipback minimal (uint8)"]
    assert out["gaps"] == ["2-5"]
    assert "dropped 'adv-lib fmn, scale-then-round': the runs starting at errors [5] lack it" in capsys.readouterr().err
    assert math.isclose(out["rows"][0]["median_l2"], 0.2)


def test_overlapping_runs_are_refused():
    with pytest.raises(SystemExit, match="overlap"):
        merge([_part(0, [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], 1.0), _part(2, [0.1], [0.1], 1.0)])
