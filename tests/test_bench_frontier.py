"""benchmarks/frontier.py's --merge: an earlier run's rows join the table only if they came
from the same images."""

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from frontier import diagnostic_guide, errors_id, margin_gradients, merged_rows, row  # noqa: E402


def write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def a_run(x):
    # One row as a run on images x writes it: every image corrected by a change of L2 0.1.
    corrected = x.clone()
    corrected[:, 0, 0, 0] += 0.1
    return row("binary search", "budget 5", x, corrected, torch.ones(len(x)), torch.full((len(x),), 5), 1.0)


def test_rows_from_the_same_images_are_taken(tmp_path):
    x = torch.rand(6, 3, 4, 4)
    write(tmp_path / "earlier.csv", [a_run(x)])
    (r,) = merged_rows(str(tmp_path / "earlier.csv"), x)
    assert r["images"] == 6 and r["success"] == 1.0 and r["mean_queries"] == 5.0
    assert abs(r["median_l2"] - 0.1) < 1e-6 and r["errors_id"] == errors_id(x)


def test_rows_from_as_many_other_images_are_refused(tmp_path):
    x = torch.rand(6, 3, 4, 4)
    other = x.flip(0)  # the same images in another order: another run's errors
    write(tmp_path / "earlier.csv", [a_run(other)])
    with pytest.raises(SystemExit, match="other errors than these"):
        merged_rows(str(tmp_path / "earlier.csv"), x)
    write(tmp_path / "fewer.csv", [a_run(x[:5])])
    with pytest.raises(SystemExit, match="a run on 5 errors, not these 6"):
        merged_rows(str(tmp_path / "fewer.csv"), x)


def test_an_older_file_without_the_fingerprint_is_checked_by_count(tmp_path, capsys):
    x = torch.rand(6, 3, 4, 4)
    old = {k: v for k, v in a_run(x).items() if k != "errors_id"}
    write(tmp_path / "old.csv", [old])
    (r,) = merged_rows(str(tmp_path / "old.csv"), x)
    assert r["images"] == 6 and "only their count (6) was checked" in capsys.readouterr().out


def test_the_guides_cosine_of_linear_models_is_that_of_their_weight_differences():
    # A linear model's margin gradient is W[true] - W[answer], the same at every image.
    torch.manual_seed(0)
    target = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    guide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.rand(40, 3, 2, 2)
    with torch.no_grad():
        answer = target(x).argmax(1)
    y = (answer + 1) % 3  # every image an error
    w, v = target[1].weight, guide[1].weight
    expected = torch.nn.functional.cosine_similarity(w[y] - w[answer], v[y] - v[answer], dim=1)
    assert torch.allclose(margin_gradients(target, target, x, y, batch=16), w[y] - w[answer], atol=1e-5)
    module, cos = diagnostic_guide(guide, target, x, y, 0.0)
    assert module is guide and torch.allclose(cos, expected, atol=1e-5)
    assert torch.allclose(diagnostic_guide(guide, target, x, y, 1.0)[1], torch.ones(40), atol=1e-5)
    # Halfway, the blend's gradient is a positive mix of both: between the two cosines.
    half = diagnostic_guide(guide, target, x, y, 0.5)[1]
    assert (half >= expected - 1e-5).all() and (half <= 1 + 1e-5).all()
