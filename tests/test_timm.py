"""`timm:NAME[:WEIGHTS]` models end to end: timm builds the architecture, the weights come from a
local file, and input size, interpolation, crop and normalization come from timm's pretrained
config. Tiny timm test models with random weights; nothing is downloaded.

timm imports torchvision at start-up, and PyPI's torchvision does not load beside the CPU torch
2.13.0 of the main test venv, so these run in `make test-timm`'s venv (torch 2.14.1 with its
torchvision 0.29.1; `make test` runs both). In a venv without a working timm they skip.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image


def _timm_works() -> bool:
    try:
        import timm  # noqa: F401  (imports torchvision at start-up)
        import timm.data  # noqa: F401
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _timm_works(), reason="timm cannot be imported here (it needs the torchvision "
                                                          "built for this torch): `make test-timm` runs these")
NAME = "test_efficientnet"  # timm's own tiny test model: 160 px, bicubic, crop_pct 0.95


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    ref = timm.create_model(NAME, pretrained=False, num_classes=3).eval()
    save_file(ref.state_dict(), str(d / "w.safetensors"))
    return d / "w.safetensors", ref


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_architecture_with_local_weights(tmp_path, fmt):
    import timm
    import timm.data

    from flipback.targets.loading import load_model

    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(ref.state_dict(), str(path))
    else:
        torch.save(ref.state_dict(), path)
    loaded = load_model(f"timm:resnet18:{path}", 3)
    cfg = timm.data.resolve_data_config({}, model=ref)
    assert loaded.input_shape == tuple(cfg["input_size"])
    assert loaded.preprocess.interpolation == cfg["interpolation"]
    x = torch.rand(2, *cfg["input_size"])
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), ref((x - mean) / std))


def test_cached_pixels_are_timms_own_eval_transform(tiny, tmp_path):
    """Known answer: the 8-bit image flipback decodes into its cache is, pixel for pixel, what
    timm's eval transform (resize by crop_pct, bicubic, center crop) makes of the same file."""
    import timm.data

    from flipback.targets.loading import dataset_for_model

    weights, ref = tiny
    rng = np.random.default_rng(0)
    files = []
    for k, (cls, size) in enumerate([("a", (211, 157)), ("b", (120, 300)), ("c", (160, 160))]):
        (tmp_path / "data" / cls).mkdir(parents=True)
        f = tmp_path / "data" / cls / "0.png"
        # smooth content, so that resampling differences would show
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize(size, Image.BILINEAR).save(f)
        files.append(f)
    ds = dataset_for_model(f"timm:{NAME}:{weights}", tmp_path / "data", cache_dir=tmp_path / "cache")
    cfg = timm.data.resolve_data_config({}, model=ref)
    tf = timm.data.create_transform(**cfg)  # Resize, CenterCrop, ToTensor, Normalize
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    assert ds.images.shape[1:] == (160, 160, 3)
    for i, f in enumerate(files):
        want = ((tf(Image.open(f).convert("RGB")) * std + mean) * 255).round().to(torch.uint8).permute(1, 2, 0)
        assert np.array_equal(ds.images[i], want.numpy()), f


def test_explain_cli_corrects_and_verifies_at_the_models_size(tiny, tmp_path):
    """Images of other sizes and aspect ratios go through timm's eval transform once; every
    method's corrections are model-size 8-bit images that the timm model itself then labels right."""
    from typer.testing import CliRunner

    from flipback.cli import app

    weights, ref = tiny
    rng = np.random.default_rng(2)
    for k, cls in enumerate(("a", "b", "c")):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            h, w = rng.integers(90, 260, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    mean = torch.tensor(ref.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ref.pretrained_cfg["std"]).view(1, 3, 1, 1)
    for method in ("minimal", "regions"):
        out = tmp_path / method
        res = CliRunner().invoke(app, ["--json", "explain", "--model", f"timm:{NAME}:{weights}", "--data",
                                       str(tmp_path / "data"), "--out", str(out), "--method", method,
                                       "--no-figures", "--device", "cpu"],
                                 env={"FLIPBACK_CACHE": str(tmp_path / "cache")})
        assert res.exit_code == 0, res.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n_images"] == 9 and summary["n_skipped"] == 0
        assert summary["n_explained"] == summary["n_misclassified"] > 0
        assert summary["success_rate"] == 1.0, summary
        con = sqlite3.connect(out / "results.sqlite")
        rows = con.execute("SELECT record, corrected, dtype FROM results").fetchall()
        con.close()
        assert len(rows) == summary["n_explained"]
        for record, corrected, dtype in rows:
            rec = json.loads(record)
            kind, shape = dtype.split(":")
            assert np.dtype(kind) == np.uint8 and shape == "160,160,3"
            x = torch.from_numpy(np.frombuffer(corrected, np.uint8).reshape(160, 160, 3).copy())
            x = x.permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                assert int(ref((x - mean) / std).argmax(1)) == rec["true"], rec


def test_surrogate_init_reads_the_timm_classifiers_rows(tmp_path):
    """`--init timm:NAME:WEIGHTS` builds the model with as many classes as its weights hold
    (timm's pretrained config names the classifier) and puts a new head on top when the target
    has another count."""
    import timm
    from safetensors.torch import save_file

    from flipback.targets.surrogate import Headed, _init_class_count, build_init

    torch.manual_seed(0)
    five = timm.create_model(NAME, pretrained=False, num_classes=5).eval()
    save_file(five.state_dict(), str(tmp_path / "five.safetensors"))
    spec = f"timm:{NAME}:{tmp_path / 'five.safetensors'}"
    assert _init_class_count(spec, 3) == 5
    member = build_init(spec, 3, (3, 160, 160))
    assert isinstance(member, Headed)
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        assert member(x).shape == (2, 3)
        mean = torch.tensor(five.pretrained_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(five.pretrained_cfg["std"]).view(1, 3, 1, 1)
        torch.testing.assert_close(member.body(x), five((x - mean) / std))
