"""The test extra's packages are required, not optional: without kserve or playwright the
suite must fail, not pass with the real-server and browser tests silently skipped.

Each check collects the test modules in a fresh pytest process in which the package cannot
be imported (a meta-path blocker), and reads how collection ended.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
BLOCKED_RUN = r"""
import importlib.abc, sys

BLOCKED = set(sys.argv[1].split(","))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-rs", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


def _collect(blocked: str, modules: list[str], chromium: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLIPBACK_CHROMIUM": chromium, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, blocked, *modules], cwd=TESTS.parent, env=env,
                          capture_output=True, text=True, timeout=300)


def test_missing_kserve_or_playwright_fails_collection_instead_of_skipping():
    # A Chromium that "exists", so that only the package decides.
    modules = ["tests/test_server.py", "tests/test_reliability_server.py", "tests/test_report_browser.py"]
    res = _collect("kserve,playwright", modules, chromium=sys.executable)
    out = res.stdout + res.stderr
    assert res.returncode == pytest.ExitCode.INTERRUPTED, out  # collection errors, not "nothing collected"
    for module in modules:
        assert f"ERROR collecting {module}" in out, out
    assert "No module named 'kserve'" in out and "No module named 'playwright'" in out, out


def test_missing_chromium_still_skips_the_browser_tests_and_says_why(tmp_path):
    res = _collect("", ["tests/test_report_browser.py"], chromium=str(tmp_path / "no-chromium"))
    out = res.stdout + res.stderr
    assert res.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, out
    assert "no-chromium is missing: install Debian's chromium" in out, out
