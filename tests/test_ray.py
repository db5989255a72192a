"""`flipback explain --ray` against a real Ray cluster of two nodes on loopback (a head and a
worker, each started by `ray start` in this module, one CPU each, stopped after).

- Results identical to the single-process run, records, corrected images and figures byte for
  byte, on a CIFAR-10 subset with the public ResNet-20, white-box and black-box against a real
  KServe server (skipped with the reason when ../shared is absent).
- Faults: an actor SIGKILLed mid-run, the driver SIGKILLed mid-run (the same command resumes),
  the worker node killed mid-run: each run finishes with the uninterrupted run's results, no
  image lost and none stored twice.
- One total budget and one request rate for all actors (the accountant actor).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ray  # noqa: F401 - the test extra installs it: a missing one fails instead of skipping

from random_models import save_random_surrogate
from run_folders import committed_rows
from servers.kserve_process import ServerProcess
from flipback.targets.surrogate import Surrogate, build_surrogate, save_surrogate
from flipback.targets.zoo import SmallCNN

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR = SHARED / "data" / "cifar10-jpeg" / "test"
RESNET20 = SHARED / "models" / "cifar10_resnet20.th"
RAY = Path(sys.executable).with_name("ray")
LIMIT = 24  # errors per small run: 8 batches of 3


# ---------------------------------------------------------------------------------- the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A head and a worker node on loopback, each `ray start --block` in its own process group."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head = self.worker = None
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def _start(self, args: list[str], log: Path) -> subprocess.Popen:
        cmd = [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
               "--object-store-memory=100000000", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}", *args]
        with open(log, "ab") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True)

    @staticmethod
    def _wait(proc: subprocess.Popen, log: Path, deadline_s: float = 300) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if "will now block forever" in log.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"ray start did not come up:\n{log.read_text(errors='replace')[-3000:]}")

    def start(self) -> "Cluster":
        head_log = self.tmp / "head.log"
        self.head = self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                                 f"--ray-client-server-port={_free_port()}", f"--temp-dir={self.tmp / 'r'}"],
                                head_log)
        self._wait(self.head, head_log)
        self.start_worker()
        return self

    def start_worker(self) -> None:
        log = self.tmp / "worker.log"
        self.worker = self._start([f"--address={self.address}"], log)
        self._wait(self.worker, log)

    def kill_worker(self) -> None:
        """SIGKILL every process of the worker node: its raylet, its agents and its actors."""
        _kill_session(self.worker)

    def stop(self) -> None:
        for proc in (self.worker, self.head):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in (self.worker, self.head):
            if proc is not None:
                try:
                    proc.wait(5)  # a throwaway cluster: no need to wait for a graceful end
                except subprocess.TimeoutExpired:
                    pass
                _kill_session(proc)


def _session_pids(sid: int) -> list[int]:
    """Processes of the session `sid` (its `ray start` and all it started: Ray puts each worker
    process in a process group of its own, so killing the node's process group misses them)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] not in "ZX":  # zombies aside: they are dead already
            pids.append(int(d.name))
    return pids


def _kill_session(proc) -> None:
    """SIGKILL `proc`'s session (it was started in a new one), until none of it is left."""
    if proc is None:
        return
    end = time.monotonic() + 20
    while time.monotonic() < end:
        pids = _session_pids(proc.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="module", autouse=True)
def _module_env(tmp_path_factory):
    """For every process of this module (nodes, drivers, module-scoped fixtures' runs): one
    decode cache, one thread, and Ray's token authentication on, with a token of the module's own (Ray turns
    it on or off by whether ~/.ray/auth_token exists, and not alike for head and worker nodes)."""
    wanted = {"FLIPBACK_CACHE": str(tmp_path_factory.mktemp("cache")), "RAY_AUTH_MODE": "token",
              "OMP_NUM_THREADS": "1",  # as the actors (1 CPU each); tiny models crawl with 2 threads on 2 busy cores
              "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    old = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="fbray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    c = Cluster(tmp)
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A random small_cnn, a random surrogate and 200 random 28x28 images (.npz)."""
    d = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    torch.save(SmallCNN(10).state_dict(), d / "net.th")
    save_random_surrogate(d / "sur.th")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", images=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 10, 200))
    return d


def _small_command(mode: str, d: Path, out: Path, *extra: str) -> list[str]:
    common = ["--model", f"small_cnn:{d / 'net.th'}", "--data", str(d / "data.npz"), "--out", str(out),
              "--batch-size", "3", "--limit", str(LIMIT), *extra]
    if mode == "white-box":  # minimal, with figures
        return [sys.executable, "-m", "flipback", "--quiet", "explain", *common]
    return [sys.executable, "-m", "flipback", "--quiet", "explain", "--mode", "black-box", "--method", "paper",
            "--budget", "4", "--surrogate", str(d / "sur.th"), "--no-figures", *common]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _state(out: Path) -> dict:
    """Every stored record, original and corrected image (bytes), and the PNG files they name."""
    con = sqlite3.connect(out / "results.sqlite")
    rows = con.execute("SELECT idx, record, corrected, dtype, original FROM results ORDER BY idx").fetchall()
    con.close()
    state = {}
    for idx, record, corrected, dtype, original in rows:
        rec = json.loads(record)
        files = {k: (out / rec[k]).read_bytes() for k in ("figure", "corrected_image") if rec.get(k)}
        state[idx] = (rec, corrected, dtype, original, files)
    return state


def _assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for idx in expected:
        assert got[idx][0] == expected[idx][0], f"image {idx}: the record differs"
        assert got[idx][1:4] == expected[idx][1:4], f"image {idx}: the stored images differ"
        assert got[idx][4] == expected[idx][4], f"image {idx}: the PNG files differ"


def _config(out: Path) -> dict:
    """What a run folder holds a run of: a folder resumes only a run whose config equals it."""
    con = sqlite3.connect(out / "results.sqlite")
    try:
        return dict(con.execute("SELECT key, value FROM config").fetchall())
    finally:
        con.close()


def _files(out: Path) -> list[str]:
    """The run folder's files, the database's WAL and shared-memory files aside."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and not p.name.startswith("results.sqlite-"))


def _actor_pids(busy: bool = False) -> list[int]:
    """Processes of ExplainWorker actors (Ray names them ray::ExplainWorker[.method])."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::ExplainWorker") and (not busy or cmd.startswith(b"ray::ExplainWorker.explain")):
            pids.append(int(d.name))
    return pids


def _kill_a_busy_actor(proc: subprocess.Popen, deadline_s: float = 120) -> None:
    """SIGKILL an actor while it runs a batch. Not any actor: one still loading its model (or idle
    between batches) dies without a batch to retry, and the retry is what the test is about."""
    end = time.monotonic() + deadline_s
    while proc.poll() is None and time.monotonic() < end:
        busy = _actor_pids(busy=True)
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            return
        time.sleep(0.002)
    pytest.fail(f"no actor was seen running a batch (run ended: {proc.poll() is not None})")


def _wait_rows(proc: subprocess.Popen, out: Path, n: int, deadline_s: float = 240) -> None:
    end = time.monotonic() + deadline_s
    while proc.poll() is None and committed_rows(out) < n and time.monotonic() < end:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before {n} results were committed:\n{proc.stderr.read()}"
    assert committed_rows(out) >= n


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory):
    """Single-process runs of the small model, white-box and black-box."""
    refs = {}
    for mode in ("white-box", "black-box"):
        out = tmp_path_factory.mktemp("ref") / mode
        r = _run(_small_command(mode, small, out))
        assert r.returncode == 0, r.stderr
        refs[mode] = (out, _state(out))
        assert len(refs[mode][1]) == LIMIT
    return refs


# ---------------------------------------------------------------------------------- faults


def test_actor_sigkilled_mid_run_loses_no_image_and_counts_none_twice(cluster, small, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_small_command("white-box", small, out, "--ray", cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_rows(proc, out, 6)
        _kill_a_busy_actor(proc)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    ref_out, expected = reference["white-box"]
    _assert_same(_state(out), expected)
    assert _files(out) == _files(ref_out)
    assert _config(out) == _config(ref_out)  # a local run resumes this one, and the other way round
    ray_summary = json.loads((out / "summary.json").read_text())["ray"]  # (--quiet: no "was lost" line)
    assert ray_summary["actors_lost"] >= 1 and ray_summary["batches_retried"] >= 1
    ref_summary = json.loads((ref_out / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    for key in ("n_images", "n_misclassified", "n_explained", "n_corrected", "mean_queries", "median_l2",
                "method", "budget", "pixels", "options"):
        assert summary[key] == ref_summary[key], key


def test_driver_sigkilled_mid_run_and_the_same_command_resumes(cluster, small, reference, tmp_path):
    out = tmp_path / "run"
    cmd = _small_command("black-box", small, out, "--ray", cluster.address)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_rows(proc, out, 6)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = committed_rows(out)
    assert 0 < at_kill < LIMIT
    end = time.monotonic() + 60  # Ray ends a dead driver's actors, which frees their CPUs
    while _actor_pids() and time.monotonic() < end:
        time.sleep(0.2)
    assert not _actor_pids(), "the killed driver's actors outlived it"
    done = _run(cmd)
    assert done.returncode == 0, done.stderr
    _assert_same(_state(out), reference["black-box"][1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_explained"] == LIMIT
    assert summary["ray"]["batches"] < LIMIT // 3  # only what the killed session had not committed


def test_one_total_budget_and_one_request_rate_for_all_actors(cluster, small, tmp_path):
    """Two actors against one black-box target that logs when each request arrives."""
    log = tmp_path / "requests.log"
    target = tmp_path / "logged_target.py"
    target.write_text(
        "import os, time\nimport numpy as np, torch\nfrom flipback.targets.zoo import SmallCNN\n"
        f"_net = SmallCNN(10); _net.load_state_dict(torch.load({str(small / 'net.th')!r}, weights_only=True))\n"
        "_net.eval()\n"
        "def predict(x):\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(f'{time.time()} {len(x)}\\n')\n"
        "    with torch.no_grad():\n"
        "        return _net(torch.from_numpy(x)).numpy()\n")
    out = tmp_path / "run"
    base = [sys.executable, "-m", "flipback", "--quiet", "explain", "--mode", "black-box", "--method", "paper",
            "--budget", "4", "--surrogate", str(small / "sur.th"), "--no-figures", "--model",
            f"python:{target}:predict", "--data", str(small / "data.npz"), "--out", str(out), "--batch-size", "1",
            "--limit", str(LIMIT), "--ray", cluster.address, "--ray-actors", "2"]
    # One image a request, so the budget of 80 buys dozens of requests: the mean rate is then
    # measured over seconds, where one late wake-up is noise. (With batches of 3, nine requests
    # once read 17.7/s against 15: the two actors' load probes went out unspaced, since mended.)
    rate = 10.0
    total = 80
    stopped = _run(base + ["--total-budget", str(total), "--rate-limit", str(rate)])
    assert stopped.returncode != 0 and "budget" in stopped.stderr, stopped.stderr
    con = sqlite3.connect(out / "results.sqlite")
    stored = con.execute("SELECT COALESCE(SUM(json_extract(record, '$.queries')), 0) FROM results").fetchone()[0]
    unfinished = con.execute("SELECT COALESCE(SUM(queries), 0) FROM unfinished").fetchone()[0]
    con.close()
    assert 0 < stored + unfinished <= total  # both actors together, within the one budget

    sent = sorted(float(line.split()[0]) for line in log.read_text().split("\n") if line)
    assert len(sent) >= 20, len(sent)
    for t in sent:  # the actors together keep to the rate (one late wake-up aside)
        assert sum(t <= u < t + 1.0 for u in sent) <= rate + 2
    assert (len(sent) - 1) / (sent[-1] - sent[0]) <= rate * 1.05

    done = _run(base + ["--total-budget", "1000"])  # a larger budget: the same run resumes and finishes
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_explained"] == LIMIT
    acct = summary["ray"]["accountant"]
    assert acct["spent_before"] == stored + unfinished
    assert sum(r["queries"] for r in map(json.loads, _records_json(out))) <= 1000


def _records_json(out: Path) -> list[str]:
    con = sqlite3.connect(out / "results.sqlite")
    try:
        return [r for (r,) in con.execute("SELECT record FROM results")]
    finally:
        con.close()


# ---------------------------------------------------------------------------------- CIFAR-10


needs_shared = pytest.mark.skipif(not (CIFAR.is_dir() and RESNET20.is_file()),
                                  reason=f"CIFAR-10 and the ResNet-20 checkpoint are not in {SHARED} "
                                         "(../shared/data/cifar10-jpeg/test, ../shared/models/cifar10_resnet20.th)")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A CIFAR-10 test subset (the first 12 images of each class) as an image folder, and a
    random surrogate for 3x32x32 images."""
    d = tmp_path_factory.mktemp("cifar")
    for cls in sorted(p for p in CIFAR.iterdir() if p.is_dir()):
        (d / "data" / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:12]:
            shutil.copy(f, d / "data" / cls.name / f.name)
    torch.manual_seed(3)
    meta = {"members": ["cnn8"], "num_classes": 10, "input_shape": [3, 32, 32], "queries": 0, "held_out": 0,
            "agreement": 0.0, "output": "scores", "epochs": 0, "target": "", "seed": 3,
            "classes": sorted(p.name for p in CIFAR.iterdir() if p.is_dir())}
    save_surrogate(Surrogate(build_surrogate(10, 3, ["cnn8"]).eval(), meta), d / "sur.th")
    return d


@pytest.fixture(scope="module")
def kserve(tmp_path_factory):
    srv = ServerProcess(["--model", f"r20=cifar_resnet20:{RESNET20}", "--num-classes", "10"],
                        tmp_path_factory.mktemp("kserve") / "server.log")
    try:
        yield srv.start()
    finally:
        srv.stop()


@needs_shared
@pytest.mark.parametrize("mode", ["white-box", "black-box"])
def test_cifar10_subset_ray_run_is_identical_to_the_local_run(mode, cluster, cifar, tmp_path, request):
    if mode == "white-box":
        args = ["--model", f"cifar_resnet20:{RESNET20}", "--method", "minimal"]
    else:  # against a real KServe model server
        server = request.getfixturevalue("kserve")
        args = ["--mode", "black-box", "--model", server.url("r20"), "--method", "paper", "--budget", "6",
                "--surrogate", str(cifar / "sur.th")]
    base = [sys.executable, "-m", "flipback", "--quiet", "explain", "--data", str(cifar / "data"),
            "--batch-size", "8", *args]
    local = _run(base + ["--out", str(tmp_path / "local")])
    assert local.returncode == 0, local.stderr
    on_ray = _run(base + ["--out", str(tmp_path / "ray"), "--ray", cluster.address])
    assert on_ray.returncode == 0, on_ray.stderr
    expected = _state(tmp_path / "local")
    assert len(expected) >= 10
    _assert_same(_state(tmp_path / "ray"), expected)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert _config(tmp_path / "ray") == _config(tmp_path / "local")  # either resumes the other
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    # Both actors were asked for; on a busy machine one may finish every batch before the other
    # has loaded its model (the kill tests below are the ones that need work on both nodes).
    assert summary["ray"]["actors"] == 2 and summary["ray"]["nodes"] in (1, 2) and summary["ray"]["batch_size"] == 8
    assert summary["ray"]["actors_write_run_folder"]
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    for key in ("n_images", "accuracy", "n_misclassified", "n_corrected", "mean_queries", "median_l2", "confusion",
                "method", "budget", "pixels", "options"):
        assert summary[key] == local_summary[key], key


def test_bench_runs_on_ray_too(cluster, small, tmp_path):
    out = tmp_path / "bench"
    r = _run([sys.executable, "-m", "flipback", "--quiet", "bench", "paper", "--mode", "white-box", "--methods",
              "fast", "--model", f"small_cnn:{small / 'net.th'}", "--data", str(small / "data.npz"),
              "--limit", "6", "--batch-size", "3", "--out", str(out), "--ray", cluster.address])
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["fast"]["n_explained"] == 6
    assert summary["methods"]["fast"]["ray"]["actors"] == 2


def test_the_actors_keep_to_the_memory_cap(cluster, small, tmp_path):
    """--max-memory holds in each actor as in a local run: here not one image fits, one clear error."""
    r = _run(_small_command("white-box", small, tmp_path / "run", "--ray", cluster.address, "--max-memory", "1K"))
    assert r.returncode != 0 and "cannot hold one image" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------- last: a node dies


def test_worker_node_killed_mid_run_loses_no_image_and_counts_none_twice(cluster, small, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_small_command("white-box", small, out, "--ray", cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_rows(proc, out, 6)
        cluster.kill_worker()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    ref_out, expected = reference["white-box"]
    _assert_same(_state(out), expected)
    assert _files(out) == _files(ref_out)
    ray_summary = json.loads((out / "summary.json").read_text())["ray"]
    assert ray_summary["actors_lost"] >= 1 and ray_summary["nodes"] == 1
