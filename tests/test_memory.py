"""Memory at 224 px: `regions` never builds (pixels x regions) tensors, and runs are sized
under a memory cap (--max-memory), with one clear error when not even one image fits."""

import json
import subprocess
import sys
import textwrap

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flipback.attacks import RegionsAttack
from flipback.targets.whitebox import WhiteBoxTarget

SIZE = 224


def small_net() -> torch.nn.Module:
    """A small random-weight conv net for 3x224x224 images, 10 classes."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(16, 10))


def smooth_images(n: int, size: int = SIZE) -> torch.Tensor:
    """Smooth 8-bit images (random 8x8 colours, upscaled), so that SLIC finds real regions."""
    torch.manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8), size=size, mode="bilinear").clamp(0, 1)
    return torch.round(x * 255) / 255


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_regions_at_224_px_makes_no_tensor_larger_than_a_float64_copy_of_the_batch():
    n = 2
    net = small_net()
    x = smooth_images(n)
    y = (net(x).argmax(1) + 1) % 10  # every image an error
    target = WhiteBoxTarget(net, 10)
    with LargestTensor() as mode:
        # A small budget keeps the test short: the region steps, pruning and pixel bisections
        # all run; the region measurement (its helpers are the same) is covered below.
        r = RegionsAttack(max_queries=40).run(target, target, x, y, torch.arange(n))
    assert r.regions.shape == (n, SIZE, SIZE)
    batch_f64 = n * 3 * SIZE * SIZE * 8
    dense_onehot = n * SIZE * SIZE * 196 * 4  # what the (pixels x regions) one-hot took at 196 regions
    assert mode.largest <= batch_f64 < dense_onehot / 30


PEAK = textwrap.dedent("""
    import json, resource, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_memory import small_net, smooth_images
    from flipback.attacks import RegionsAttack
    from flipback.targets.whitebox import WhiteBoxTarget

    torch.set_num_threads(1)
    n = 4
    net, x = small_net(), smooth_images(n)
    y = (net(x).argmax(1) + 1) % 10
    target = WhiteBoxTarget(net, 10)
    import skimage.segmentation, scipy.ndimage  # their import is not the attack's memory
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r = RegionsAttack().run(target, target, x, y, torch.arange(n))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base": base, "peak": peak, "queries": r.queries.tolist()}))
""")


def test_regions_peak_memory_at_224_px_is_bounded(tmp_path):
    """4 images of 224 px, default settings (196 SLIC regions, each measured with one query):
    the process's peak resident memory grows by well under what the dense one-hot alone took
    (4 x 50,176 pixels x 5,017 regions x 4 bytes = 4 GB under the old one-per-10-pixels rule)."""
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", PEAK, str(Path(__file__).parent)], capture_output=True, text=True,
                         timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(m["queries"]) > 196  # the removal measurement ran: one query per region
    growth = m["peak"] - m["base"]
    assert growth < 300 * 2**20, f"regions on 4 images of 224 px grew the process by {growth / 2**20:.0f} MiB"


# ---------------------------------------------------------------- --max-memory

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from flipback.cli import app  # noqa: E402
from flipback.runs import memory  # noqa: E402
from flipback.targets.zoo import SmallCNN  # noqa: E402


def test_memory_sizes_parse():
    assert memory.parse_memory("8G") == 8 * 2**30 == memory.parse_memory("8GiB")
    assert memory.parse_memory("500MB") == 500 * 10**6 and memory.parse_memory("1.5k") == 1536
    assert memory.parse_memory(None) is None and memory.parse_memory("auto") is None
    for bad in ("lots", "-1G", "0", "3 parsecs"):
        with pytest.raises(memory.FlipbackError):
            memory.parse_memory(bad)


def test_the_estimate_follows_the_model_and_the_image_size():
    net = small_net()
    model224, total224 = memory.estimate_per_image(net, "regions", (3, 224, 224), torch.device("cpu"))
    model112, _ = memory.estimate_per_image(net, "regions", (3, 112, 112), torch.device("cpu"))
    assert 3.5 < model224 / model112 < 4.5  # activations grow with the area
    assert total224 - model224 == RegionsAttack.state_copies * 3 * 224 * 224 * 4


def test_a_cap_that_cannot_hold_one_image_is_one_clear_error():
    with pytest.raises(memory.MemoryLimitError, match="cannot hold one image: regions on a 3x224x224"):
        memory.plan(small_net(), "regions", (3, 224, 224), torch.device("cpu"), max_memory="1M", batch_size=8)


def test_training_bytes_of_a_linear_model_are_its_input_and_weights(monkeypatch):
    """A bias-free linear model saves its (flattened) input for the weight's gradient: 768
    floats (3,072 bytes) an image at 3x16x16, times TRAIN_AUTOGRAD_FACTOR, plus TRAIN_COPIES
    image copies; its weights' gradient and momentum are fixed."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 10, bias=False))
    per_image, fixed = memory.training_bytes(net, (3, 16, 16), torch.device("cpu"))
    assert per_image == (memory.TRAIN_AUTOGRAD_FACTOR + memory.TRAIN_COPIES) * 768 * 4
    assert fixed == 2 * 7680 * 4
    monkeypatch.setattr(memory, "in_use", lambda device: 0)
    cap = memory.RESERVE + fixed + 5 * per_image + 100
    assert memory.training_batch(net, (3, 16, 16), torch.device("cpu"), max_memory=cap, batch_size=128) == 5
    assert memory.training_batch(net, (3, 16, 16), torch.device("cpu"), max_memory=cap, batch_size=3) == 3
    with pytest.raises(memory.MemoryLimitError, match="cannot train the surrogate on one 3x16x16 image"):
        memory.training_batch(net, (3, 16, 16), torch.device("cpu"), max_memory=cap - 5 * per_image, batch_size=8)


def test_measuring_a_training_step_moves_no_batch_norm_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2))
    net(torch.rand(2, 3, 8, 8))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    memory.training_bytes(net, (3, 8, 8), torch.device("cpu"))
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.fixture
def tiny(tmp_path):
    """A random small_cnn checkpoint and 40 random 28x28 images."""
    torch.manual_seed(0)
    net = SmallCNN(10)
    ckpt = tmp_path / "net.th"
    torch.save({"state_dict": net.state_dict()}, ckpt)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 40))
    return ckpt, data


def test_cli_stops_with_one_message_when_the_cap_cannot_hold_one_image(tiny, tmp_path):
    ckpt, data = tiny
    for cmd in (["explain"], ["bench", "paper", "--methods", "fast"]):
        res = CliRunner().invoke(app, [*cmd, "--model", f"small_cnn:{ckpt}", "--data", str(data), "--out",
                                       str(tmp_path / "-".join(cmd)), "--max-memory", "1M"])
        assert res.exit_code == 2, res.output
        assert "error: the memory cap of 1.0 MiB cannot hold one image" in res.output
        assert "Traceback" not in res.output and "--max-memory" in res.output  # the hint


def test_a_moderate_cap_gives_smaller_batches_and_the_same_records(tiny, tmp_path, monkeypatch):
    import sqlite3

    from flipback.runs.explain_run import ExplainConfig, run_explain

    ckpt, data = tiny
    kw = dict(model=f"small_cnn:{ckpt}", data=str(data), method="minimal", limit=10, figures=False, device="cpu")
    run_explain(ExplainConfig(**kw), tmp_path / "whole", show_progress=False, log=lambda m: None)
    # Memory in use is pinned, so the cap leaves room for exactly 3 images of this run.
    monkeypatch.setattr(memory, "in_use", lambda device: 100 * 2**20)
    _, per_image = memory.estimate_per_image(SmallCNN(10), "minimal", (1, 28, 28), torch.device("cpu"))
    logs = []
    cap = 100 * 2**20 + memory.RESERVE + int(3.5 * per_image)
    run_explain(ExplainConfig(**kw, max_memory=str(cap)), tmp_path / "capped",
                show_progress=False, log=logs.append)
    assert any(m.startswith("memory: batches of 3 images") for m in logs), logs
    rows = [sqlite3.connect(tmp_path / run / "results.sqlite").execute(
        "SELECT idx, record, corrected FROM results ORDER BY idx").fetchall() for run in ("whole", "capped")]
    assert len(rows[0]) == len(rows[1]) == 10
    for (i, rec_a, img_a), (j, rec_b, img_b) in zip(*rows):
        a, b = json.loads(rec_a), json.loads(rec_b)
        assert i == j and img_a == img_b  # the same corrected 8-bit images
        for key in a:  # the same records; the rounded probabilities within float noise
            if key.startswith("scores_") and a[key] is not None:
                assert np.allclose(a[key], b[key], atol=1e-5), key
            else:
                assert a[key] == b[key], key


def test_cpu_batches_of_large_images_hold_at_most_16_images_at_224_px():
    """On the CPU, large images come in small batches (faster per image there); 32-px batches
    keep --batch-size, and a CUDA plan is not capped by pixels."""
    net = small_net()
    cpu = torch.device("cpu")
    big = memory.plan(net, "minimal", (3, 224, 224), cpu, max_memory="20G", batch_size=256)
    assert big.batch_size == 16 == memory.CPU_BATCH_PIXELS // (224 * 224)
    assert memory.plan(net, "minimal", (3, 448, 448), cpu, max_memory="20G", batch_size=256).batch_size == 4
    assert memory.plan(net, "minimal", (3, 32, 32), cpu, max_memory="20G", batch_size=256).batch_size == 256
    assert memory.plan(net, "minimal", (3, 224, 224), cpu, max_memory="20G", batch_size=8).batch_size == 8
    assert big.predict_batch_size > 16  # forward-only prediction keeps its large batches


def test_unit_step_grid_is_planned_for(monkeypatch):
    """`minimal` with grid="steps" (or "both") ranks up to STEP_VALUES x STEP_LEVELS unit steps
    per image: the plan counts them, so a cap that fits 4 images of scale-then-round fits fewer."""
    from flipback.attacks.minimal import STEP_LEVELS, STEP_VALUES, UNIT_STEP_BYTES

    net, cpu, shape = small_net(), torch.device("cpu"), (3, 224, 224)
    _, scale = memory.estimate_per_image(net, "minimal", shape, cpu)
    for grid in ("steps", "both"):
        _, steps = memory.estimate_per_image(net, "minimal", shape, cpu, {"grid": grid})
        assert steps - scale == STEP_VALUES * STEP_LEVELS * UNIT_STEP_BYTES
    assert memory.estimate_per_image(net, "minimal", shape, cpu, {"grid": "scale"})[1] == scale
    assert memory.estimate_per_image(net, "fast", shape, cpu, {"grid": "steps"}) == memory.estimate_per_image(net, "fast", shape, cpu)
    # 32 px: 3,072 values, fewer than STEP_VALUES
    _, small_scale = memory.estimate_per_image(net, "minimal", (3, 32, 32), cpu)
    _, small_steps = memory.estimate_per_image(net, "minimal", (3, 32, 32), cpu, {"grid": "steps"})
    assert small_steps - small_scale == 3 * 32 * 32 * STEP_LEVELS * UNIT_STEP_BYTES
    monkeypatch.setattr(memory, "in_use", lambda device: 100 * 2**20)  # pinned: the cap is exact
    cap = 100 * 2**20 + memory.RESERVE + 4 * scale + scale // 2
    assert memory.plan(net, "minimal", shape, cpu, max_memory=cap, batch_size=8).batch_size == 4
    assert memory.plan(net, "minimal", shape, cpu, max_memory=cap, batch_size=8,
                       options={"grid": "steps"}).batch_size < 4


def test_a_method_says_what_it_keeps_and_an_unknown_one_is_planned_as_the_largest():
    """Each attack class states its per-image state; the planner asks it, and falls back on the
    base class's figure (the largest built-in one) for a method it does not know."""
    from flipback.attacks import ATTACKS, CorrectiveAttack

    net, cpu, shape = small_net(), torch.device("cpu"), (1, 28, 28)
    model, _ = memory.estimate_per_image(net, "fast", shape, cpu)
    for name, cls in ATTACKS.items():
        assert memory.estimate_per_image(net, name, shape, cpu)[1] - model == cls.state_copies * 28 * 28 * 4
    assert CorrectiveAttack.state_copies == max(cls.state_copies for cls in ATTACKS.values())
    assert memory.estimate_per_image(net, "someone-elses", shape, cpu)[1] - model == CorrectiveAttack.state_copies * 28 * 28 * 4
