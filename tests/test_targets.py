"""Known-answer tests for loading white-box targets: zoo checkpoints in the public format,
TorchScript files, refusal of pickled code, and the target's output check."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from flipback.errors import ModelError
from flipback.targets import ZOO, CifarResNet, Normalized, SmallCNN, WhiteBoxTarget, load_model
from flipback.targets.zoo import IMAGENET_MEAN, IMAGENET_STD

# ../shared sits beside the checkout (and beside CI's clone).
SHARED_CKPT = Path(__file__).resolve().parents[2] / "shared" / "models" / "cifar10_resnet20.th"


def _randomized_resnet(depth: int, seed: int = 0) -> CifarResNet:
    """A CIFAR ResNet with random BatchNorm statistics too, so every tensor matters."""
    torch.manual_seed(seed)
    net = CifarResNet(depth, 10)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def _save_public(net: nn.Module, path: Path, *, keep_batches_tracked: bool = False) -> Path:
    """The format of the public akamaster checkpoints: {'state_dict': {'module.' + k: v}}, saved
    by nn.DataParallel, without BatchNorm's num_batches_tracked (older PyTorch)."""
    sd = {"module." + k: v for k, v in net.state_dict().items()
          if keep_batches_tracked or not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd, "best_prec1": 91.0}, path)
    return path


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_load_public_format_each_depth(tmp_path, depth):
    src = _randomized_resnet(depth, seed=depth)
    path = _save_public(src, tmp_path / f"resnet{depth}.th")
    loaded = load_model(f"cifar_resnet{depth}:{path}", 10)
    assert loaded.arch == f"cifar_resnet{depth}" and loaded.num_classes == 10
    assert loaded.input_shape == (3, 32, 32)
    assert not loaded.module.training
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = Normalized(src, IMAGENET_MEAN, IMAGENET_STD).eval()(x)
        out = loaded.module(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_load_state_dict_with_batches_tracked_and_bare_dict(tmp_path):
    src = _randomized_resnet(20)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = Normalized(src, IMAGENET_MEAN, IMAGENET_STD).eval()(x)
    p1 = _save_public(src, tmp_path / "a.th", keep_batches_tracked=True)
    p2 = tmp_path / "b.pth"
    torch.save(src.state_dict(), p2)  # a bare state_dict, no 'module.' prefix
    for p in (p1, p2):
        with torch.no_grad():
            out = load_model(f"cifar_resnet20:{p}", 10).module(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_wrong_depth_is_refused(tmp_path):
    path = _save_public(_randomized_resnet(20), tmp_path / "r20.th")
    with pytest.raises(ModelError, match="does not match"):
        load_model(f"cifar_resnet32:{path}", 10)


def test_wrong_num_classes_is_refused(tmp_path):
    path = _save_public(_randomized_resnet(20), tmp_path / "r20.th")
    with pytest.raises(ModelError):
        load_model(f"cifar_resnet20:{path}", 100)


def test_pickled_module_refused_unless_trusted(tmp_path):
    src = _randomized_resnet(20)
    path = tmp_path / "full.th"
    torch.save(src, path)
    with pytest.raises(ModelError, match="refusing to unpickle"):
        load_model(f"cifar_resnet20:{path}", 10)
    with pytest.warns(UserWarning, match="trust-model"):
        loaded = load_model(f"cifar_resnet20:{path}", 10, trust_model=True)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = Normalized(src, IMAGENET_MEAN, IMAGENET_STD).eval()(x)
        torch.testing.assert_close(loaded.module(x), expected, rtol=0, atol=0)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("wrapped", [False, True])
def test_malicious_pickle_is_not_executed(tmp_path, wrapped):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.th"
    payload = {"state_dict": _Evil(str(marker))} if wrapped else _Evil(str(marker))
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(ModelError):
        load_model(f"cifar_resnet20:{path}", 10)
    assert not marker.exists()


def test_torchscript_file_loads(tmp_path):
    torch.manual_seed(0)
    src = SmallCNN(10).eval()
    path = tmp_path / "small.pt"
    torch.jit.script(src).save(str(path))
    loaded = load_model(str(path), 10)
    assert loaded.arch == "torchscript"
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), src(x), rtol=1e-6, atol=1e-6)
    # with mean/std the normalization is put inside the model
    norm = load_model(str(path), 10, mean=(0.5,), std=(0.25,))
    with torch.no_grad():
        torch.testing.assert_close(norm.module(x), src((x - 0.5) / 0.25), rtol=1e-6, atol=1e-6)
    target = WhiteBoxTarget(loaded.module, 10)
    assert target.predict(x).shape == (3, 10) and target.queries == 3


def test_torchscript_missing_or_broken(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "missing.pt"), 10)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(ModelError):
        load_model(str(bad), 10)


def test_zoo_weights_with_pt_extension_in_a_directory(tmp_path):
    src = _randomized_resnet(20)
    path = _save_public(src, tmp_path / "weights.pt")
    loaded = load_model(f"cifar_resnet20:{path}", 10)
    assert loaded.arch == "cifar_resnet20"


def test_wrong_number_of_outputs_raises_on_predict_and_gradient():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    target = WhiteBoxTarget(module, 10)
    x = torch.rand(2, 3, 2, 2)
    with pytest.raises(ModelError, match="5"):
        target.predict(x)
    with pytest.raises(ModelError):
        target.gradient(x, torch.zeros(2, dtype=torch.long))


def test_unknown_arch_lists_known_names(tmp_path):
    with pytest.raises(ModelError) as info:
        load_model(f"resnet999:{tmp_path / 'x.th'}", 10)
    err = info.value
    assert "resnet999" in err.message
    for name in ZOO:
        assert name in (err.hint or "")


def test_arch_without_weights_and_garbage_spec():
    with pytest.raises(ModelError, match="no weights"):
        load_model("cifar_resnet20", 10)
    with pytest.raises(ModelError):
        load_model("not-a-spec", 10)


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(f"cifar_resnet20:{tmp_path / 'nope.th'}", 10)


def test_whitebox_counts_and_freezes():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    target = WhiteBoxTarget(module, 3)
    assert all(not p.requires_grad for p in module.parameters())
    x = torch.rand(4, 3, 2, 2)
    target.predict(x)
    target.predict(x, counted=False)
    logits, grad = target.gradient(x, torch.zeros(4, dtype=torch.long))
    target.gradient(x, torch.zeros(4, dtype=torch.long), counted=False)
    assert target.queries == 8
    assert logits.shape == (4, 3) and grad.shape == x.shape
    # margin of a linear model: gradient is w_label - w_strongest_other, per image
    W = module[1].weight
    others = logits.clone()
    others[:, 0] = float("-inf")
    j = others.argmax(1)
    expected = (W[0][None] - W[j]).view(4, 3, 2, 2)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not SHARED_CKPT.is_file(), reason="needs ../shared (the pretrained CIFAR ResNet-20 checkpoint), absent here")
def test_public_resnet20_checkpoint_loads():
    loaded = load_model(f"cifar_resnet20:{SHARED_CKPT}", 10)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = loaded.module(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert WhiteBoxTarget(loaded.module, 10).predict(x).shape == (2, 10)


def test_large_cpu_images_run_channels_last_with_the_same_answers_and_plain_gradients():
    """At >= CHANNELS_LAST_MIN px the guide converts the model's conv weights to channels-last
    once and feeds images in that layout (twice as fast at 224 px on the CPU); logits and
    gradients match a plain-layout copy of the model up to float rounding, and the gradient
    comes back in the caller's (contiguous) layout. Small images are left alone."""
    import copy

    from flipback.targets.guide import CHANNELS_LAST_MIN

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    plain = copy.deepcopy(net)
    small = WhiteBoxTarget(copy.deepcopy(net), 4)
    xs = torch.rand(3, 3, 32, 32)
    small.predict(xs, counted=False)
    assert small._channels_last is None and small.module[0].weight.is_contiguous()

    target = WhiteBoxTarget(net, 4)
    x = torch.rand(3, 3, CHANNELS_LAST_MIN, CHANNELS_LAST_MIN + 8)
    labels = torch.tensor([0, 1, 2])
    logits, grad = target.gradient(x, labels, counted=False)
    assert target._channels_last is True
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert grad.is_contiguous() and grad.shape == x.shape
    xr = x.clone().requires_grad_(True)
    ref = plain(xr)
    true = ref.gather(1, labels[:, None]).squeeze(1)
    others = ref.scatter(1, labels[:, None], float("-inf")).max(1).values
    (ref_grad,) = torch.autograd.grad((true - others).sum(), xr)
    torch.testing.assert_close(logits, ref.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
