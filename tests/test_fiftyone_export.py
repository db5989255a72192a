"""The audit's FiftyOne export (issue 15): written, loaded back by FiftyOne itself, and its
change maps checked against known answers."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn as nn

# A database of this test session's own (FiftyOne starts MongoDB on first use), and no usage
# statistics sent; both must be set before fiftyone is imported.
os.environ.setdefault("FIFTYONE_DATABASE_DIR", tempfile.mkdtemp(prefix="flipback-fo-db-"))
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
import fiftyone as fo  # noqa: E402  (the test extra installs it: a missing package fails the suite)

from flipback.audit import audit  # noqa: E402
from flipback.audit.fiftyone_export import change_maps, check_export_dir, export_fiftyone  # noqa: E402
from flipback.audit.suspects import AuditResult, Suspect  # noqa: E402
from flipback.errors import FlipbackError  # noqa: E402

from test_audit import CheckerDetector, _background, _paste  # noqa: E402


def _checker_audit():
    """The poisoned-training-set audit of test_audit: 20 carriers of a pasted checkerboard."""
    train = _background(60, seed=5)
    labels = np.zeros(60, np.int64)
    poisoned = np.arange(0, 60, 3)
    train[poisoned], corners = _paste(train[poisoned], seed=6)
    labels[poisoned] = 1
    val_clean = _background(30, seed=7)
    val, _ = _paste(val_clean[:20], seed=8)
    result = audit(CheckerDetector(), train, labels, ["zero", "one"], originals=val, corrected=val_clean[:20],
                   true=np.zeros(20, np.int64), pred=np.ones(20, np.int64), validation_images=val_clean,
                   validation_pred=np.zeros(30, np.int64), check_labels=False)
    return result, train, dict(zip(poisoned.tolist(), corners.tolist()))


def test_export_loads_back_in_fiftyone_with_every_suspect_its_box_and_its_map(tmp_path):
    result, train, corners = _checker_audit()
    assert len(result.suspects) == len(corners)
    export_fiftyone(result, train, ["zero", "one"], tmp_path / "fo", module=CheckerDetector())
    ds = fo.Dataset.from_dir(dataset_dir=str(tmp_path / "fo"), dataset_type=fo.types.FiftyOneDataset)
    try:
        assert len(ds) == len(result.suspects)
        for sample in ds.sort_by("rank"):
            s = result.suspects[sample.rank - 1]
            assert sample.index == s.index and sample.score == pytest.approx(s.score)
            assert set(sample.tags) == {"cause", "verified"} and sample.reason == "cause"
            assert sample.ground_truth.label == "one" and sample.other.label == "zero"
            # The box is the audit's (a window of the template's size), inside the pasted checkerboard.
            y0, x0, y1, x1 = s.box
            y, x = corners[s.index]
            assert y <= y0 < y1 <= y + 4 and x <= x0 < x1 <= x + 4
            box = sample.cause.detections[0].bounding_box
            assert np.allclose(box, [x0 / 16, y0 / 16, (x1 - x0) / 16, (y1 - y0) / 16])
            heat = sample.change.map
            assert heat.shape == (16, 16) and heat.max() == pytest.approx(1.0)
            # Covering changes the cause's window only: the map is zero everywhere else.
            inside = np.zeros((16, 16), bool)
            inside[y0:y1, x0:x1] = True
            assert heat[~inside].max() == 0 and heat[inside].mean() > 0.2
            assert os.path.isfile(sample.filepath)
    finally:
        ds.delete()


class LeftHalf(nn.Module):
    """Two classes on 8x8 grey images: class 1 when the left half's mean exceeds 0.5."""

    def forward(self, x):
        logit = 40 * (x[:, :, :, :4].mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(logit), logit], 1)


def test_a_label_suspects_map_is_the_change_toward_its_label():
    # Dark images labelled 1: the only change toward 1 the model allows is in the left half.
    images = np.full((3, 8, 8, 1), 60, np.uint8)
    sus = [Suspect(i, f"img{i}", 1, "one", "label", 1.5, 0, "zero", True, None, "") for i in range(3)]
    maps = change_maps(LeftHalf(), images, AuditResult(sus, [], np.zeros(3)), 2)
    assert maps.shape == (3, 8, 8)
    assert (maps[:, :, 4:] == 0).all() and (maps[:, :, :4] > 0).all()
    assert np.allclose(maps.max(axis=(1, 2)), 1.0)


def test_export_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "fo").mkdir()
    (tmp_path / "fo" / "old.txt").write_text("x")
    with pytest.raises(FlipbackError, match="not an empty folder"):
        check_export_dir(tmp_path / "fo")
