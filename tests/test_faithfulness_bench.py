"""`flipback bench faithfulness` end to end on a small synthetic image folder."""

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from flipback.cli import app


def _folder(root, n_train=1500, n_test=60, seed=0):
    """Three classes of 28x28 grey images: a bright horizontal bar in the top, middle or
    bottom third, with noise. Easy to learn, and the checkerboard cue is easy to tell apart."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(3):
            d = root / split / f"class{k}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (28, 28), dtype=np.uint8)
                row = 3 + 9 * k + rng.integers(0, 4)
                img[row:row + 3, 4:24] = 220
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_planted_bench_writes_every_method_and_variant(tmp_path):
    data = _folder(tmp_path / "data")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["--quiet", "bench", "faithfulness", "--data", str(data), "--out", str(out),
                                 "--limit", "6", "--baselines", "saliency,grad_cam"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["kind"] == "planted" and s["n_images"] == 6
    assert s["cue_success"] > 0.5  # the cue was learned (a tiny set: not to the 90% bar)
    assert set(s["methods"]) == {"flipback-regions", "flipback-minimal", "saliency", "grad_cam"}
    regions = s["methods"]["flipback-regions"]
    assert regions["success_rate"] == 1.0 and regions["median_regions"] >= 1
    # regions, like each baseline, has two maps: its pixel ranking and its pixels' gains.
    assert set(regions["variants"]) == {"order", "importance"}
    assert regions["best"]["pointing"] == max(v["pointing"] for v in regions["variants"].values())
    for name in ("saliency", "grad_cam"):
        variants = s["methods"][name]["variants"]
        assert set(variants) == {"pred", "diff"}
        best = s["methods"][name]["best"]
        assert best["pointing"] == max(v["pointing"] for v in variants.values())
        assert best["deletion_auc"] == max(v["deletion_auc"] for v in variants.values())
        for key in ("quantus_pointing_game", "quantus_relevance_rank_accuracy", "road_auc"):
            assert best[key] == max(v[key] for v in variants.values())
    # Quantus's metrics (the test extra installs it) for every method, and the mean rank over them.
    for m in s["methods"].values():
        row = m.get("best", m)
        assert 0 <= row["quantus_relevance_mass_accuracy"] <= 1 and set(row["road"]) == {"1.0", "2.0", "5.0", "10.0"}
    assert set(s["mean_rank"]) == set(s["methods"]) and min(s["mean_rank"].values()) >= 1
    assert set(s["verdict"]) == {"pointing", "deletion_auc", "pointing_at_least_95"}
    maps = np.load(out / "maps.npz")
    assert maps["images"].shape == (6, 1, 28, 28) and maps["images"].dtype == np.uint8
    assert maps["masks"].shape == (6, 28, 28) and maps["masks"].sum((1, 2)).tolist() == [16] * 6
    assert maps["flipback-regions"].shape == (6, 28, 28) and "grad_cam-diff" in maps
    assert maps["flipback-regions-importance"].shape == (6, 28, 28)


def test_unknown_baseline_is_one_clear_error(tmp_path):
    r = CliRunner().invoke(app, ["bench", "faithfulness", "--out", str(tmp_path), "--baselines", "limey"])
    assert r.exit_code == 2 and "unknown baseline 'limey'" in r.output
    r = CliRunner().invoke(app, ["bench", "faithfulness", "--out", str(tmp_path), "--kind", "square"])
    assert r.exit_code == 2 and "unknown cue kind 'square'" in r.output


def test_and_cue_with_superpixel_baselines_matched_to_regions_queries(tmp_path):
    data = _folder(tmp_path / "data")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["--quiet", "bench", "faithfulness", "--data", str(data), "--out", str(out),
                                 "--limit", "4", "--kind", "and", "--baselines", "lime,kernel_shap,feature_ablation"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["cue"]["kind"] == "and" and set(s["part_success"]) == {"a", "b"}
    regions = s["methods"]["flipback-regions"]
    for name in ("lime", "kernel_shap", "feature_ablation"):
        best = s["methods"][name]["best"]
        assert best["evaluations_per_image"] >= regions["mean_queries"]  # compute-matched
        assert 0 <= best["both_found"] <= 1 and 0 <= best["quantus_pointing_game"] <= 1
    maps = np.load(out / "maps.npz")
    assert maps["parts"].shape[1:] == (2, 28, 28)
    assert np.array_equal(maps["masks"], maps["parts"].any(1))


def test_blend_cue_is_scored_by_correlation_with_its_pattern(tmp_path):
    data = _folder(tmp_path / "data")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["--quiet", "bench", "faithfulness", "--data", str(data), "--out", str(out),
                                 "--limit", "4", "--kind", "blend", "--baselines", "saliency"])
    if r.exit_code != 0:  # a tiny set may not learn a 10% blend: then there is nothing to explain
        assert "did not learn the cue" in r.output, r.output
        return
    s = json.loads((out / "summary.json").read_text())
    assert s["rank_metrics"] == ["pattern_correlation", "road_auc"]
    for m in s["methods"].values():
        row = m.get("best", m)
        assert -1 <= row["pattern_correlation"] <= 1 and "pointing" not in row


def test_real_errors_bench_scores_deletion_only(tmp_path):
    import torch

    from flipback.targets.zoo import SmallCNN

    data = _folder(tmp_path / "data", n_train=2, n_test=20)
    torch.manual_seed(0)
    torch.save(SmallCNN(3).state_dict(), tmp_path / "w.th")  # untrained: plenty of errors
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["--quiet", "bench", "faithfulness", "--real", "--data", str(data), "--model",
                                 f"small_cnn:{tmp_path / 'w.th'}", "--out", str(out), "--limit", "8",
                                 "--baselines", "saliency"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["kind"] == "real" and s["n_images"] == 8 and s["n_errors"] >= 8
    assert "pointing" not in s["methods"]["flipback-regions"]
    assert set(s["verdict"]) == {"deletion_auc"}
    assert "quantus_pointing_game" not in s["methods"]["flipback-regions"]  # no mask: ROAD only
    assert 0 <= s["methods"]["flipback-regions"]["road_auc"] <= 1
    assert "masks" not in np.load(out / "maps.npz")
