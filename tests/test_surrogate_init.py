"""Surrogates at larger sizes: training streams from the data set, `--init SPEC` starts a member
from a pretrained model (no target queries), and the data is decoded with the target's eval
transform, as explain decodes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from flipback.cli import app
from flipback.errors import FlipbackError, ModelError
from flipback.runs.errors import to_tensor
from flipback.runs.surrogate_run import run_surrogate
from flipback.targets.blackbox import load_blackbox
from flipback.targets.surrogate import (DEFAULT_MEMBERS, Headed, QueriedImages, _fit_member, build_member,
                                        load_surrogate, parse_members, rows_per_batch, save_surrogate,
                                        train_surrogate)

runner = CliRunner()
SIZE = 16

# Three classes: the brightest colour channel. Scores are logits.
TARGET = '''
import numpy as np

def predict(x):
    return (x.mean((2, 3)) * 20).astype(np.float32)
'''

# A tiny CNN "pretrained" by the test (weights in a file beside the module).
NET = '''
from pathlib import Path
import torch
import torch.nn as nn

OUTPUTS = {outputs}

def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, OUTPUTS))

def pretrained():
    m = net()
    m.load_state_dict(torch.load(Path(__file__).with_suffix(".th"), weights_only=True))
    return m
'''


def _images(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    x = rng.integers(0, 150, (n, size, size, 3))
    x[np.arange(n), :, :, cls] += 100
    return x.astype(np.uint8), cls


@pytest.fixture
def world(tmp_path):
    """(target spec, training .npz)"""
    (tmp_path / "target.py").write_text(TARGET)
    x, y = _images(400, 0)
    np.savez(tmp_path / "train_set.npz", images=x, labels=y)
    return f"python:{tmp_path / 'target.py'}:predict", tmp_path / "train_set.npz"


def _pretrain(folder: Path, outputs: int, steps: int = 150) -> str:
    """A python: factory spec of a net trained on the target's rule (images the surrogate never sees)."""
    path = folder / f"net{outputs}.py"
    path.write_text(NET.format(outputs=outputs))
    ns: dict = {}
    exec(NET.format(outputs=outputs), ns)
    torch.manual_seed(0)
    m = ns["net"]()
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    x, _ = _images(512, 7)
    xt = to_tensor(x)
    y = xt.mean((2, 3)).argmax(1)  # the target's answers
    for _ in range(steps):
        loss = F.cross_entropy(m(xt), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(m.state_dict(), path.with_suffix(".th"))
    return f"python:{path}:pretrained"


def _train(target, data, out: Path, *, init=None, members=None, budget=200, epochs=3, lr=0.05,
           batch_size=128):
    from flipback.data import load_dataset

    ds = load_dataset(data, split="train")
    with load_blackbox(target, ds.num_classes, budget=budget, input_shape=(3, SIZE, SIZE)) as bb:
        s = train_surrogate(bb, ds, budget, members=members, epochs=epochs, init=init, seed=1, lr=lr,
                            batch_size=batch_size)
    save_surrogate(s, out)
    return s, ds


def test_streamed_batches_train_the_same_member_as_one_tensor():
    """QueriedImages (read a batch at a time) gives exactly the weights of the old in-memory tensor."""
    x, _ = _images(90, 3)
    chosen = np.sort(np.random.default_rng(0).permutation(90)[:70])
    train_idx = np.arange(0, 70, 1)[5:]
    targets = torch.softmax(torch.randn(70, 3, generator=torch.Generator().manual_seed(0)), 1)
    fitted = []
    for images in (to_tensor(x[chosen]), QueriedImages(x, chosen)):
        torch.manual_seed(4)
        fitted.append(_fit_member(build_member("cnn4", 3, 3), images, train_idx, targets, True, epochs=2,
                                  lr=0.05, batch_size=16, flip=True, seed=4))
    a, b = (m.state_dict() for m in fitted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(QueriedImages(x, chosen)[torch.tensor([3, 1])], to_tensor(x[chosen][[3, 1]]))


def test_query_and_check_batches_shrink_only_for_large_images():
    """500 images at a time as before up to ~100 px; under 64 MiB of floats above (111 at 224 px)."""
    assert rows_per_batch((32, 32, 3)) == rows_per_batch((28, 28, 1)) == rows_per_batch((100, 100, 3)) == 500
    assert rows_per_batch((224, 224, 3)) == 111 and rows_per_batch((4000, 4000, 3)) == 1


def test_member_names_with_and_without_init():
    assert parse_members(None) == DEFAULT_MEMBERS
    assert parse_members(None, "x.pt2") == ("init",)
    assert parse_members("cnn8", "x.pt2") == ("init", "cnn8")
    assert parse_members("cnn8,init", "x.pt2") == ("cnn8", "init")
    with pytest.raises(FlipbackError, match="--init"):
        parse_members("init,cnn8")


def test_init_beats_scratch_and_reloads_with_identical_logits(world, tmp_path):
    target, data = world
    spec = _pretrain(tmp_path, 3)
    scratch, _ = _train(target, data, tmp_path / "scratch.th", members="cnn8")
    init, ds = _train(target, data, tmp_path / "init.th", init=spec)
    assert init.meta["members"] == ["init"] and init.meta["init_head"] is False
    assert init.meta["init"] == spec and init.meta["queries"] == 200  # the init cost no queries
    assert init.meta["agreement"] >= 0.9 > scratch.meta["agreement"], (init.meta, scratch.meta)

    with pytest.raises(ModelError, match="trust-model"):  # the file names code to import: opt-in
        load_surrogate(tmp_path / "init.th")
    back = load_surrogate(tmp_path / "init.th", trust_model=True)
    x = to_tensor(ds.images[:50])
    with torch.no_grad():
        assert torch.equal(back.module(x), init.module(x))


def test_init_with_other_output_count_gets_a_new_head(world, tmp_path):
    target, data = world
    spec = _pretrain(tmp_path, 5)  # 5 outputs, the target has 3 classes
    s, ds = _train(target, data, tmp_path / "s.th", init=spec, members="init,cnn4", epochs=2)
    assert s.meta["members"] == ["init", "cnn4"] and s.meta["init_head"] is True
    head = s.module.members[0]
    assert isinstance(head, Headed) and (head.head.in_features, head.head.out_features) == (5, 3)
    back = load_surrogate(tmp_path / "s.th", trust_model=True)
    x = to_tensor(ds.images[:50])
    with torch.no_grad():
        assert torch.equal(back.module(x), s.module(x))


def test_init_from_torchscript_and_export_files_trains_saves_reloads(world, tmp_path):
    target, data = world
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval()
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    ex = torch.export.export(net, (torch.zeros(2, 3, SIZE, SIZE),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ex, str(tmp_path / "net.pt2"))
    for name in ("net.pt", "net.pt2"):
        s, ds = _train(target, data, tmp_path / f"{name}.th", init=str(tmp_path / name), budget=300, epochs=3,
                       lr=5.0, batch_size=32)  # a flat random net: pretrained members learn at 0.5
        back = load_surrogate(tmp_path / f"{name}.th")  # no code to import: no opt-in needed
        x = to_tensor(ds.images[:20])
        with torch.no_grad():
            assert torch.equal(back.module(x), s.module(x)), name
        # The random net agrees with the target by chance; fine-tuning it (through the archive's
        # module) does better on the validation answers, so tuned weights are kept.
        assert s.meta["init_kept_epoch"] > 0, s.meta
        assert not torch.equal(back.module(x), net(x)), name


def test_cli_init_and_a_bad_init(world, tmp_path):
    target, data = world
    spec = _pretrain(tmp_path, 3, steps=20)
    res = runner.invoke(app, ["--json", "surrogate", "--target", target, "--data", str(data), "--budget", "40",
                              "--epochs", "1", "--init", spec, "--out", str(tmp_path / "s.th")])
    assert res.exit_code == 0, res.output
    meta = load_surrogate(tmp_path / "s.th", trust_model=True).meta
    assert meta["members"] == ["init"] and meta["init"] == spec and meta["queries"] == 40
    res = runner.invoke(app, ["surrogate", "--target", target, "--data", str(data), "--budget", "40",
                              "--init", str(tmp_path / "missing.pt2"), "--out", str(tmp_path / "t.th")])
    assert res.exit_code != 0 and "Traceback" not in res.output and "missing.pt2" in res.output


def test_several_inits_share_one_new_head_and_reload(world, tmp_path):
    """`--init A --init B`: one member, both models' outputs side by side (3 + 5) under a new
    head fitted by the probe; the file records both SPECs and reloads to the same logits."""
    from flipback.targets.surrogate import Joined

    target, data = world
    specs = [_pretrain(tmp_path, 3, steps=40), _pretrain(tmp_path, 5, steps=40)]
    res = runner.invoke(app, ["--json", "surrogate", "--target", target, "--data", str(data), "--budget", "200",
                              "--epochs", "0", "--init", specs[0], "--init", specs[1], "--out", str(tmp_path / "s.th")])
    assert res.exit_code == 0, res.output
    with pytest.raises(ModelError, match="trust-model"):
        load_surrogate(tmp_path / "s.th")
    back = load_surrogate(tmp_path / "s.th", trust_model=True)
    meta = back.meta
    assert meta["init"] == specs and meta["members"] == ["init"] and meta["queries"] == 200
    assert meta["init_head"] is True and meta["init_kept_epoch"] == 0  # the probe alone
    assert isinstance(back.module, Headed) and isinstance(back.module.body, Joined)
    assert (back.module.head.in_features, back.module.head.out_features) == (8, 3)
    assert meta["agreement"] >= 0.9, meta  # two nets that learnt the target's rule

    # The joined body is exactly the two pretrained models, outputs concatenated.
    one, two = (pretrained_net(spec) for spec in specs)
    x = to_tensor(_images(20, 5)[0])
    with torch.no_grad():
        assert torch.allclose(back.module.body(x), torch.cat([one(x), two(x)], 1))

    # Retrained in the same way through the API, the same logits: the list is a plain value.
    from flipback.data import load_dataset

    ds = load_dataset(data, split="train")
    with load_blackbox(target, ds.num_classes, budget=200, input_shape=(3, SIZE, SIZE)) as bb:
        again = train_surrogate(bb, ds, 200, epochs=0, init=tuple(specs))
    with torch.no_grad():
        assert torch.allclose(again.module(x), back.module(x), atol=1e-5)


def pretrained_net(spec: str) -> nn.Module:
    """The pretrained net of a test's python: SPEC, loaded as the test wrote it."""
    path, factory = spec[len("python:"):].rsplit(":", 1)
    ns: dict = {"__file__": path}
    exec(Path(path).read_text(), ns)
    return ns[factory]().eval()


def test_surrogate_data_gets_the_targets_eval_transform(tmp_path):
    """A .pt2 target at 16 px, data at 24 px: decoded as explain decodes it (resized), then trained."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval()
    ex = torch.export.export(net, (torch.zeros(2, 3, SIZE, SIZE),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ex, str(tmp_path / "target.pt2"))
    x, y = _images(60, 0, size=24)
    np.savez(tmp_path / "train_set.npz", images=x, labels=y)
    meta = run_surrogate(target=str(tmp_path / "target.pt2"), data=str(tmp_path / "train_set.npz"), budget=40,
                         out=tmp_path / "s.th", epochs=1, members="cnn4", device="cpu", show_progress=False,
                         log=lambda m: None)
    assert meta["input_shape"] == [3, SIZE, SIZE]


def test_init_from_a_zoo_checkpoint_of_another_class_count(world, tmp_path):
    """cifar_resnet20:FILE with 10 classes for a 3-class target: built with its own 10 (read from
    the checkpoint), a new 10 -> 3 head on top; the relative path is stored absolute."""
    from flipback.targets.zoo import ZOO

    torch.save(ZOO["cifar_resnet20"].build(10).state_dict(), tmp_path / "r20.th")
    target, data = world
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        s, ds = _train(target, data, tmp_path / "s.th", init="cifar_resnet20:r20.th", budget=40, epochs=1)
    finally:
        os.chdir(cwd)
    assert s.meta["init"] == f"cifar_resnet20:{tmp_path / 'r20.th'}" and s.meta["init_head"] is True
    back = load_surrogate(tmp_path / "s.th")
    x = to_tensor(ds.images[:20])
    with torch.no_grad():
        assert torch.equal(back.module(x), s.module(x))


def test_cli_batch_size_reaches_the_training_and_the_file(world, tmp_path, monkeypatch):
    import flipback.targets.surrogate as surrogate_module

    seen = []
    fit = surrogate_module._fit_member

    def spy(*args, **kwargs):
        seen.append(kwargs["batch_size"])
        return fit(*args, **kwargs)

    monkeypatch.setattr(surrogate_module, "_fit_member", spy)
    target, data = world
    res = runner.invoke(app, ["--quiet", "surrogate", "--target", target, "--data", str(data), "--budget", "40",
                              "--members", "cnn4,cnn4", "--epochs", "1", "--batch-size", "7", "--device", "cpu",
                              "--out", str(tmp_path / "s.th")])
    assert res.exit_code == 0, res.output
    assert seen == [7, 7] and load_surrogate(tmp_path / "s.th").meta["batch_size"] == 7


def test_a_memory_cap_lowers_the_training_batch_or_stops_before_any_query(world, tmp_path, monkeypatch):
    """Under --max-memory, a member trains on as many images as fit (recorded in the file), and a
    cap that cannot hold one image is one clear error before the target is asked anything."""
    import flipback.targets.surrogate as surrogate_module
    from flipback.runs import memory

    monkeypatch.setattr(memory, "in_use", lambda device: 0)  # the cap's arithmetic, not this process's RSS
    per_image, fixed = memory.training_bytes(build_member("cnn4", 3, 3), (3, SIZE, SIZE), torch.device("cpu"))
    cap = memory.RESERVE + fixed + 6 * per_image + 10
    seen = []
    fit = surrogate_module._fit_member
    monkeypatch.setattr(surrogate_module, "_fit_member",
                        lambda *a, **k: (seen.append(k["batch_size"]), fit(*a, **k))[1])
    target, data = world
    res = runner.invoke(app, ["--quiet", "surrogate", "--target", target, "--data", str(data), "--budget", "40",
                              "--members", "cnn4", "--epochs", "1", "--device", "cpu", "--max-memory", str(cap),
                              "--out", str(tmp_path / "s.th")])
    assert res.exit_code == 0, res.output
    meta = load_surrogate(tmp_path / "s.th").meta
    assert seen == [6] and meta["member_batch_size"] == [6] and meta["batch_size"] == 128

    from flipback.data import load_dataset

    ds = load_dataset(data, split="train")
    with load_blackbox(target, ds.num_classes, budget=40, input_shape=(3, SIZE, SIZE)) as bb:
        with pytest.raises(memory.MemoryLimitError, match="cannot train the surrogate member 'cnn4' on one 3x16x16"):
            train_surrogate(bb, ds, 40, members="cnn4", epochs=1, max_memory=cap - 6 * per_image)
        assert bb.queries == 0
    res = runner.invoke(app, ["surrogate", "--target", target, "--data", str(data), "--budget", "40",
                              "--members", "cnn4", "--device", "cpu", "--max-memory", "1M",
                              "--out", str(tmp_path / "t.th")])
    assert res.exit_code != 0 and "cannot train" in res.output and not (tmp_path / "t.th").exists()


def test_bench_refuses_a_python_init_before_any_work(world, tmp_path):
    """Loading it would need --trust-model, which bench does not have."""
    from flipback.runs.bench import run_bench

    target, data = world
    with pytest.raises(FlipbackError, match="python:"):
        run_bench(model=target, data=str(data), out_dir=tmp_path / "b", mode="black-box", surrogate_data=str(data),
                  surrogate_init=_pretrain(tmp_path, 3, steps=1), show_progress=False, log=lambda m: None)
    assert not (tmp_path / "b").exists()


def test_scratch_members_pool_large_images_and_reload_the_same(tmp_path):
    """Scratch members see at most SCRATCH_SIZE px: a 224-px image is average-pooled by 4 (exactly
    the 56-px mean of each 4x4 block), 64 px and below are untouched, and the saved surrogate
    rebuilds the same pooling from its file."""
    from flipback.targets.surrogate import SCRATCH_SIZE, Pooled, Surrogate, member_pool

    assert SCRATCH_SIZE == 64
    assert member_pool((3, 28, 28)) == member_pool((3, 64, 64)) == member_pool(None) == 1
    assert member_pool((3, 65, 40)) == 2 and member_pool((3, 224, 224)) == 4 and member_pool((3, 240, 320)) == 5
    torch.manual_seed(0)
    m = build_member("cnn4", 3, 3, pool=member_pool((3, 224, 224))).eval()
    assert isinstance(m.model, Pooled)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        blocks = x.view(2, 3, 56, 4, 56, 4).mean((3, 5))
        inner = m.model.net
        torch.testing.assert_close(m(x), inner((blocks - m.mean) / m.std))
    assert not isinstance(build_member("cnn4", 3, 3).model, Pooled)
    meta = {"members": ["cnn4"], "num_classes": 3, "input_shape": [3, 224, 224], "member_pool": 4}
    save_surrogate(Surrogate(m, meta), tmp_path / "s.th")
    back = load_surrogate(tmp_path / "s.th")
    with torch.no_grad():
        assert torch.equal(back.module(x), m(x))


def test_a_new_head_is_fitted_on_the_frozen_body_before_fine_tuning(world, tmp_path):
    """LP-FT: with one short epoch (3 steps), a random new head on a body that already separates
    the classes would agree with the target by chance; fitted first on the body's outputs, the
    surrogate agrees on >= 90% of the held-out answers."""
    target, data = world
    spec = _pretrain(tmp_path, 5)  # 5 outputs, the target has 3 classes
    s, _ = _train(target, data, tmp_path / "s.th", init=spec, epochs=1)
    assert s.meta["init_head"] is True and s.meta["linear_probe"] is True
    assert s.meta["agreement"] >= 0.9, s.meta


def test_fine_tuning_that_wrecks_the_probed_model_is_not_kept(world, tmp_path):
    """A pretrained member keeps the weights that agree best on a validation share of its
    training answers: at a learning rate that wrecks the body it keeps the probe's (epoch 0);
    with a weak body that fine-tuning improves, a fine-tuned epoch."""
    from flipback.data import load_dataset

    target, data = world
    ds = load_dataset(data, split="train")
    runs = {}
    for name, spec, lr in (("wrecked", _pretrain(tmp_path, 5), 1e4), ("helped", _pretrain(_sub(tmp_path, "w"), 5,
                                                                                           steps=0), 0.5)):
        with load_blackbox(target, ds.num_classes, budget=300, input_shape=(3, SIZE, SIZE)) as bb:
            runs[name] = train_surrogate(bb, ds, 300, epochs=3, init=spec, seed=1, lr=lr, batch_size=32).meta
    wrecked, helped = runs["wrecked"], runs["helped"]
    for meta in (wrecked, helped):
        scores = meta["init_val_agreement"]  # 27 of the 270 training answers, before and after each epoch
        assert len(scores) == 4 and meta["init_kept_epoch"] == int(np.argmax(scores))
    assert wrecked["init_kept_epoch"] == 0 and min(wrecked["init_val_agreement"][1:]) < 0.7
    assert wrecked["agreement"] >= 0.9, wrecked
    assert helped["init_kept_epoch"] > 0 and max(helped["init_val_agreement"]) > helped["init_val_agreement"][0]


def _sub(folder: Path, name: str) -> Path:
    (folder / name).mkdir(exist_ok=True)
    return folder / name


def test_zero_epochs_keep_the_probed_pretrained_model_and_refuse_scratch_members(world, tmp_path):
    target, data = world
    spec = _pretrain(tmp_path, 5)  # 5 outputs, the target has 3 classes: a probed head, nothing fine-tuned
    s, ds = _train(target, data, tmp_path / "s.th", init=spec, epochs=0)
    assert s.meta["init_kept_epoch"] == 0 and len(s.meta["init_val_agreement"]) == 1
    assert s.meta["agreement"] >= 0.9, s.meta
    body = s.module.body
    ns: dict = {}
    exec(NET.format(outputs=5), ns)
    given = ns["net"]()
    given.load_state_dict(torch.load(tmp_path / "net5.th", weights_only=True))
    x = to_tensor(ds.images[:20])
    with torch.no_grad():
        assert torch.equal(body(x), given(x))  # the pretrained part as it came
    with pytest.raises(FlipbackError, match="at least one epoch"):
        _train(target, data, tmp_path / "t.th", init=spec, members="init,cnn4", epochs=0)
    res = runner.invoke(app, ["--quiet", "surrogate", "--target", target, "--data", str(data), "--budget", "40",
                              "--epochs", "0", "--device", "cpu", "--out", str(tmp_path / "u.th")])
    assert res.exit_code != 0 and "at least one epoch" in res.output


def _agreement_on_all(s, ds):
    x = to_tensor(ds.images[:])
    with torch.no_grad():
        return float((s.module(x).argmax(1) == x.mean((2, 3)).argmax(1)).float().mean())


def test_self_training_labels_the_unasked_images_without_a_query(world, tmp_path):
    from flipback.data import load_dataset

    target, data = world
    ds = load_dataset(data, split="train")
    out = {}
    for n in (0, 1000):
        with load_blackbox(target, ds.num_classes, budget=40, input_shape=(3, SIZE, SIZE)) as bb:
            out[n] = train_surrogate(bb, ds, 40, members="cnn8", epochs=6, seed=1, self_train=n)
            assert bb.queries == 40  # the pseudo-labelled images cost nothing
    student, teacher = out[1000], out[0]
    assert student.meta["self_train"] == 360  # every image not asked about (400 - 40), and no more
    assert student.meta["queries"] == 40 and "self_train" not in teacher.meta
    assert student.meta["teacher_agreement"] == teacher.meta["agreement"]  # the same first surrogate
    # 36 answers and 6 epochs leave the teacher's top-1 at one class (30%), but its soft labels
    # on nine times the images teach the student most of the rule (68% when written).
    assert _agreement_on_all(student, ds) > _agreement_on_all(teacher, ds)


def test_self_training_does_not_combine_with_init(world, tmp_path):
    target, data = world
    with pytest.raises(FlipbackError, match="self-train"):
        run_surrogate(target=target, data=str(data), budget=50, out=tmp_path / "x.th", init=_pretrain(tmp_path, 3),
                      self_train=10, show_progress=False, device="cpu", log=lambda *a: None)


def test_active_choice_asks_about_the_images_the_surrogate_is_least_sure_of(world, tmp_path):
    from flipback.data import load_dataset

    target, _ = world
    # The world's images, but each class's channel raised by a random amount: some are easy,
    # some nearly ties.
    rng = np.random.default_rng(3)
    cls = rng.integers(0, 3, 400)
    x = rng.integers(0, 150, (400, SIZE, SIZE, 3))
    x[np.arange(400), :, :, cls] += rng.integers(0, 100, 400)[:, None, None]
    np.savez(tmp_path / "graded.npz", images=x.astype(np.uint8), labels=cls)
    ds = load_dataset(tmp_path / "graded.npz", split="train")
    with load_blackbox(target, ds.num_classes, budget=100, input_shape=(3, SIZE, SIZE)) as bb:
        asked = []
        ask = bb.query
        bb.query = lambda x, ids=None, **kw: (asked.append(ids.clone()), ask(x, ids, **kw))[1]
        s = train_surrogate(bb, ds, 100, members="cnn8", epochs=10, seed=1, active=0.5)
        assert bb.queries == 100 and s.meta["queries"] == 100 and s.meta["active"] == 50
    first, chosen = asked[0].numpy(), torch.cat(asked[1:]).numpy()
    assert len(first) == 50 and len(chosen) == 50 and not set(first) & set(chosen)
    # The target's rule is the brightest channel: the hard images are those whose two brightest
    # channels are close. The chosen ones are closer than the random first half (0.119 against
    # 0.181 when written: a surrogate from 50 answers is a rough judge).
    means = np.sort(to_tensor(ds.images[:]).mean((2, 3)).numpy(), 1)
    gap = means[:, -1] - means[:, -2]
    assert gap[chosen].mean() < 0.75 * gap[first].mean(), (gap[chosen].mean(), gap[first].mean())
    # The surrogate keeps which images it asked about, the chosen ones included (validation skips them).
    assert np.array_equal(s.trained_on, np.union1d(first, chosen))


def test_cli_active_and_self_training_reach_the_file(world, tmp_path):
    target, data = world
    res = runner.invoke(app, ["--json", "surrogate", "--target", target, "--data", str(data), "--budget", "40",
                              "--epochs", "1", "--members", "cnn8", "--active", "0.25", "--self-train", "100",
                              "--out", str(tmp_path / "s.th")])
    assert res.exit_code == 0, res.output
    saved = load_surrogate(tmp_path / "s.th")
    meta = saved.meta
    assert meta["queries"] == 40 and meta["active"] == 10 and meta["self_train"] == 100
    # The file records the 40 images asked about and the 100 labelled by the surrogate itself.
    assert len(saved.trained_on) == 140 and np.all(np.diff(saved.trained_on) > 0)
    res = runner.invoke(app, ["surrogate", "--target", target, "--data", str(data), "--budget", "40",
                              "--active", "0.5", "--init", _pretrain(tmp_path, 3, steps=5), "--out",
                              str(tmp_path / "t.th")])
    assert res.exit_code != 0 and "Traceback" not in res.output and "--init" in res.output


def test_self_training_images_are_the_unasked_ones_and_reproducible(world, monkeypatch, tmp_path):
    """`self_train_images` is what self-training labels (so validation can skip it): drawn from
    the images never asked about, sorted, the same for the same seed."""
    from flipback.data import load_dataset
    from flipback.targets import surrogate as surrogate_module
    from flipback.targets.surrogate import self_train_images

    asked = np.array([3, 1, 7])
    picked = self_train_images(10, asked, 4, seed=0)
    assert len(picked) == 4 and list(picked) == sorted(picked) and not set(picked.tolist()) & {1, 3, 7}
    assert np.array_equal(picked, self_train_images(10, asked, 4, seed=0))
    assert self_train_images(10, asked, 100, seed=0).tolist() == [0, 2, 4, 5, 6, 8, 9]
    # The images a real self-training run labels are exactly these.
    target, data = world
    ds = load_dataset(data, split="train")
    labelled = []
    real_outputs = surrogate_module._outputs
    monkeypatch.setattr(surrogate_module, "_outputs",
                        lambda model, d, rows, device="cpu": labelled.append(rows) or real_outputs(model, d, rows, device))
    with load_blackbox(target, ds.num_classes, budget=40, input_shape=(3, SIZE, SIZE)) as bb:
        s = train_surrogate(bb, ds, 40, members="cnn8", epochs=1, seed=1, self_train=50)
    asked = np.sort(np.random.default_rng(1).permutation(len(ds))[:40])
    assert len(labelled) == 1 and np.array_equal(labelled[0], self_train_images(len(ds), asked, 50, seed=1))
    # ... and the surrogate keeps both sets, which survive saving.
    assert np.array_equal(s.trained_on, np.union1d(asked, labelled[0]))
    save_surrogate(s, tmp_path / "s.th")
    assert np.array_equal(load_surrogate(tmp_path / "s.th").trained_on, s.trained_on)
