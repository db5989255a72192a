"""--device on every command that runs a model, and in the API: a device that is not there
is one clear error (exit code 2, no traceback) before any data is read or any query spent."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import flipback
from flipback.cli import app
from flipback.errors import FlipbackError

MISSING = "/nonexistent/data"  # the device is checked first: this path is never read

COMMANDS = {
    "explain": ["explain", "--model", "small_cnn:/nonexistent.th", "--data", MISSING, "--out", "{out}"],
    "bench paper": ["bench", "paper", "--model", "small_cnn:/nonexistent.th", "--data", MISSING, "--out", "{out}"],
    "bench faithfulness": ["bench", "faithfulness", "--data", MISSING, "--out", "{out}"],
    "surrogate": ["surrogate", "--target", "python:nonexistent:f", "--data", MISSING, "--budget", "100",
                  "--out", "{out}/s.th"],
    "demo": ["demo", "--data", MISSING, "--out", "{out}"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("device,message", [("cuda:7", "device 'cuda:7'"), ("nonsense", "unknown device 'nonsense'")])
def test_a_device_that_is_not_there_is_one_clear_error(command, device, message, tmp_path):
    args = [a.replace("{out}", str(tmp_path / "out")) for a in COMMANDS[command]]
    res = CliRunner().invoke(app, [*args, "--device", device])
    assert res.exit_code == 2, res.output
    assert f"error: {message}" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()  # nothing was written


def test_every_command_that_runs_a_model_has_the_device_option():
    for command in COMMANDS.values():
        res = CliRunner().invoke(app, [*command[:2 if command[0] == "bench" else 1], "--help"])
        assert "--device" in res.output, command


def test_the_api_takes_a_device():
    class Linear2(torch.nn.Module):
        def forward(self, x):
            s = 255 * x.flatten(1).sum(1) - 255 * 16 * 0.5
            return torch.stack([torch.zeros_like(s), s], 1)

    images = np.full((2, 4, 4, 1), 127, dtype=np.uint8)
    labels = np.array([1, 0])
    with pytest.raises(FlipbackError, match="device 'cuda:7'"):
        flipback.explain(Linear2(), images, labels, device="cuda:7")
    # Ample: the cap counts the whole process, and a full test session already holds about 1 GiB.
    fixes = flipback.explain(Linear2(), images, labels, device="cpu", max_memory="64G")
    assert [f.index for f in fixes] == [0] and fixes[0].success
    with pytest.raises(FlipbackError, match="cannot hold one image"):
        flipback.explain(Linear2(), images, labels, device="cpu", max_memory="1k")
