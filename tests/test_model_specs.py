"""Model SPECs beyond the zoo: hf:DIR, timm:NAME[:WEIGHTS], python:MODULE:FACTORY, FILE.pt2.

Each builds a tiny model with random weights, saves it in tmp_path, loads it through its SPEC
and compares the logits with the in-memory model. Nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from flipback.errors import FlipbackError, ModelError
from flipback.targets.loading import dataset_for_model, load_model, model_input

CLASSES = ["cat", "dog", "bird"]


def _timm_works() -> bool:
    try:
        import timm  # noqa: F401  (imports torchvision at start-up)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny ViT image classifier saved as Hugging Face does, with its image processor."""
    import transformers as tf  # the test extra: required, never skipped
    d = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3, id2label=dict(enumerate(CLASSES)),
                       label2id={c: i for i, c in enumerate(CLASSES)})
    model = tf.ViTForImageClassification(cfg).eval()
    model.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    return d, model


def test_hf_folder_loads_with_its_preprocessing_and_labels(vit_dir):
    d, ref = vit_dir
    loaded = load_model(f"hf:{d}", 3)
    assert loaded.class_names == CLASSES and loaded.input_shape == (3, 32, 32)
    assert loaded.preprocess.resize == (32, 32) and loaded.preprocess.interpolation == "bicubic"
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref(pixel_values=(x - mean) / std).logits
        got = loaded.module(x)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Gradients flow to the pixels: the white-box methods need them.
    x.requires_grad_(True)
    loaded.module(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hf_folder_errors(vit_dir, tmp_path):
    d, _ = vit_dir
    with pytest.raises(ModelError, match="3 classes, the data set 5"):
        load_model(f"hf:{d}", 5)
    with pytest.raises(ModelError, match="no config.json"):
        load_model(f"hf:{tmp_path}", 3)


def test_hf_subset_folder_of_any_size_runs_end_to_end(vit_dir, tmp_path):
    """A folder with two of the model's three classes, images of other sizes and aspect ratios:
    decoded at the model's size, labels on the model's indices, explained by the CLI."""
    from typer.testing import CliRunner

    from flipback.cli import app

    d, _ = vit_dir
    rng = np.random.default_rng(0)
    for cls, sizes in (("dog", [(40, 60), (33, 33)]), ("Bird", [(100, 50), (20, 24)])):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    ds = dataset_for_model(f"hf:{d}", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert len(ds) == 4 and ds.shape == (32, 32, 3) and not ds.skipped
    assert ds.classes == CLASSES and sorted(ds.labels.tolist()) == [1, 1, 2, 2]  # Bird -> bird, case aside
    res = CliRunner().invoke(app, ["--json", "explain", "--model", f"hf:{d}", "--data", str(tmp_path / "data"),
                                   "--out", str(tmp_path / "run"), "--method", "fast", "--no-figures",
                                   "--device", "cpu"], env={"FLIPBACK_CACHE": str(tmp_path / "cache")})
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_images"] == 4 and summary["model"] == f"hf:{d}"


def test_python_factory_is_a_white_box_model(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(3)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))\n"
        "def not_a_module():\n"
        "    return 'nope'\n")
    loaded = load_model(f"python:{tmp_path / 'mymodels.py'}:make", 4, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x = torch.rand(5, 3, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), ref((x - 0.5) / 0.25))
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        load_model(f"python:{tmp_path / 'mymodels.py'}:not_a_module", 4)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_torch_export_archive(tmp_path):
    torch.manual_seed(0)
    net = _Net().eval()
    example = torch.rand(2, 3, 20, 24)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "net.pt2")
    loaded = load_model(str(tmp_path / "net.pt2"), 3)
    assert loaded.input_shape == (3, 20, 24) and loaded.arch == "torch.export"
    assert (loaded.preprocess.height, loaded.preprocess.width) == (20, 24)
    assert model_input(str(tmp_path / "net.pt2")).preprocess == loaded.preprocess
    x = torch.rand(5, 3, 20, 24, requires_grad=True)
    got = loaded.module(x)
    torch.testing.assert_close(got, net(x))
    got.sum().backward()
    assert x.grad is not None
    fixed = torch.export.export(net, (example,))
    torch.export.save(fixed, tmp_path / "fixed.pt2")
    with pytest.raises(ModelError, match="fixed batch"):
        load_model(str(tmp_path / "fixed.pt2"), 3)


def test_bench_paper_with_a_classes_file(tmp_path):
    """`bench paper --classes`: a .pt2 model of 3 classes and a folder holding 2 of them, in
    another order and at another size; the labels are the model's indices."""
    from typer.testing import CliRunner

    from flipback.cli import app

    torch.manual_seed(0)
    net = _Net().eval()
    program = torch.export.export(net, (torch.rand(2, 3, 20, 24),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "net.pt2")
    (tmp_path / "names.txt").write_text("ant\nbee\ncow\n")
    rng = np.random.default_rng(1)
    for cls in ("cow", "ant"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    res = CliRunner().invoke(app, ["--json", "bench", "paper", "--model", str(tmp_path / "net.pt2"),
                                   "--data", str(tmp_path / "data"), "--out", str(tmp_path / "bench"),
                                   "--methods", "fast", "--classes", str(tmp_path / "names.txt"), "--device", "cpu"],
                             env={"FLIPBACK_CACHE": str(tmp_path / "cache")})
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "bench" / "fast" / "summary.json").read_text())
    assert summary["n_images"] == 8
    ds = dataset_for_model(str(tmp_path / "net.pt2"), tmp_path / "data", classes=str(tmp_path / "names.txt"),
                           cache_dir=tmp_path / "cache")
    assert ds.classes == ["ant", "bee", "cow"] and sorted(ds.labels.tolist()) == [0] * 4 + [2] * 4
    x = torch.from_numpy(np.array(ds.images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        wrong = int((net(x).argmax(1) != torch.from_numpy(ds.labels)).sum())
    assert summary["n_misclassified"] == wrong  # the labels were the model's indices, not the folders' 0 and 1


@pytest.mark.skipif(_timm_works(), reason="timm imports here: the success path runs instead")
def test_timm_without_a_working_torchvision_is_one_clear_error():
    with pytest.raises(ModelError) as info:
        load_model("timm:resnet18", 3)
    assert "timm" in info.value.message and "torchvision" in info.value.hint
    with pytest.raises(FlipbackError):
        model_input("timm:resnet18")


# The timm success path (architecture, weights, eval transform, explain): tests/test_timm.py, in
# `make test-timm`'s venv.


def test_api_takes_an_hf_models_own_class_count_when_labels_use_fewer(vit_dir):
    """Labels 0 and 1 only, of a 3-class model: the API must not build a 2-class target."""
    from flipback import api
    d, ref = vit_dir
    torch.manual_seed(1)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        pred = ref(pixel_values=(x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
                   / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)).logits.argmax(1)
    labels = (pred + 1) % 2  # every image wrong or right by design; only classes 0 and 1 named
    out = api.explain(f"hf:{d}", x, labels.numpy(), method="fast", device="cpu")
    wrong = int((pred != labels).sum())
    assert len(out) == wrong
    assert all(0 <= c.predicted < 3 for c in out)
