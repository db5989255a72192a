"""benchmarks/memory.py's peak-RSS reading: the child's own peak, not this process's."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from memory import run  # noqa: E402

MIB = 2**20


def test_peak_is_the_childs_not_the_parents():
    # This process holds 600 MiB (touched, so resident) while a child that allocates 200 MiB runs.
    held = bytearray(600 * MIB)
    held[::4096] = b"\1" * len(held[::4096])
    code, _, small = run([sys.executable, "-c", "pass"])
    assert code == 0 and small < 100 * MIB  # a bare interpreter, not the 600 MiB parent
    _, _, grown = run([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'1' * len(b[::4096])"])
    assert 200 * MIB < grown < 400 * MIB
    assert held[0] == 1


def test_a_failing_child_stops_with_its_error(tmp_path):
    log = tmp_path / "log.txt"
    with pytest.raises(SystemExit) as stop:  # a failing child must stop the benchmark
        run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], log=log)
    assert "failed (exit code 3)" in str(stop.value) and str(log) in str(stop.value)
    assert "boom" in log.read_text()


def test_a_child_killed_by_a_signal_is_named(tmp_path):
    # The kernel's out-of-memory killer sends SIGKILL: the message must say so, not "exit code 9".
    with pytest.raises(SystemExit) as stop:
        run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], log=tmp_path / "log.txt")
    assert "killed by SIGKILL" in str(stop.value)
