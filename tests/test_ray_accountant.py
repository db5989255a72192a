"""The run's one query accountant (runs/distributed.py) without a cluster: a total budget leased
by many oracles in threads is never exceeded, a dead attempt's lease stays spent, the request
rate is shared, attacks still plan with the run's budget, and flipback works without Ray."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from flipback.runs.distributed import LeasedLedger, QueryAccountant, share_rate_limit
from flipback.targets.blackbox import BudgetExceeded, from_callable


def _linear(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)[:, :10].astype(np.float32)


def _oracle(per_image_budget=None, **kw):
    return from_callable(_linear, 10, input_shape=(1, 4, 4), per_image_budget=per_image_budget, **kw)


def test_leases_never_exceed_the_total_budget_across_threads():
    acct = QueryAccountant(total_budget=500, spent_before=37)
    spent = []

    def worker(k: int):
        oracle = _oracle()
        ledger = LeasedLedger.attach(oracle, acct, lease=16)
        x = torch.rand(3, 1, 4, 4)
        n = 0
        for batch in range(1000):
            ledger.begin(f"{k}-{batch}")
            try:
                for _ in range(5):
                    oracle.ask(x, torch.tensor([k * 10_000 + batch] * 3))
                    n += 3
            except BudgetExceeded as exc:
                assert exc.kind == "total"
                ledger.end()
                break
            ledger.end()
        spent.append((n, oracle.queries))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(n == q for n, q in spent)
    total = sum(q for _, q in spent)
    assert total <= 500 - 37
    assert total >= 500 - 37 - 6 * 2  # what is left is less than one call (3 queries) per thread
    s = acct.stats()
    assert s["used"] == total and s["outstanding"] == 0 and s["lost_to_faults"] == 0


def test_a_dead_attempts_lease_stays_spent_and_resumed_counts_do_not_use_the_allowance():
    acct = QueryAccountant(total_budget=100)
    assert acct.lease("a", 40) == (40, 60)
    acct.abandon("a")  # its actor died: it may have spent all 40
    assert acct.left() == 60 and acct.stats()["lost_to_faults"] == 40

    oracle = _oracle(per_image_budget=20)
    ledger = LeasedLedger.attach(oracle, acct, lease=8)
    oracle.add_spent(torch.tensor([1, 2]), torch.tensor([5, 7]))  # an earlier session's, already in the store
    ledger.begin("b")
    oracle.ask(torch.rand(2, 1, 4, 4), torch.tensor([1, 2]))
    assert ledger.end() == 2
    assert acct.stats()["used"] == 2 and acct.left() == 58
    assert oracle.spent(torch.tensor([1, 2])).tolist() == [6, 8]


def test_attacks_plan_with_the_runs_budget_not_the_allowance_of_the_moment():
    acct = QueryAccountant(total_budget=1000)
    oracle = _oracle(per_image_budget=20)
    ledger = LeasedLedger.attach(oracle, acct, lease=4)
    ledger.begin("a")
    assert oracle.remaining_for(torch.tensor([0, 1])).tolist() == [20, 20]  # nothing leased yet
    small = QueryAccountant(total_budget=3)
    oracle2 = _oracle(per_image_budget=20)
    LeasedLedger.attach(oracle2, small).begin("b")
    assert oracle2.remaining_for(torch.tensor([0])).tolist() == [3]


def test_no_total_budget_means_no_limit_and_no_calls_per_query():
    acct = QueryAccountant()
    assert acct.lease("a", 10**9)[0] == 10**9
    assert acct.slot() == 0.0


def test_the_request_rate_is_shared_by_every_oracle():
    rate = 40.0
    acct = QueryAccountant(rate_limit=rate)
    sent: list[float] = []
    lock = threading.Lock()

    def logged(x):
        with lock:
            sent.append(time.monotonic())
        return _linear(x)

    def worker():
        oracle = from_callable(logged, 10, input_shape=(1, 4, 4))
        share_rate_limit(oracle, acct)
        for _ in range(8):
            oracle.query(torch.rand(1, 1, 4, 4), counted=False)  # free answers count as requests too

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent.sort()
    assert len(sent) == 24
    # Slots are exactly 1/rate apart; a thread that wakes late can send closer to the next one
    # (as one process's own rate limiting can), but never more than one extra in any window.
    assert sent[-1] - sent[0] >= 23 / rate - 0.01
    for t in sent:
        assert sum(t <= u < t + 0.25 for u in sent) <= rate * 0.25 + 2


def test_slots_are_spaced_one_over_the_rate_apart():
    now = [100.0]
    acct = QueryAccountant(rate_limit=10.0, clock=lambda: now[0])
    assert [acct.slot() for _ in range(3)] == pytest.approx([0.0, 0.1, 0.2])
    now[0] += 1.0  # idle for a second: no credit is saved up
    assert [acct.slot() for _ in range(2)] == pytest.approx([0.0, 0.1])


def test_flipback_works_without_ray_and_says_how_to_get_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "import flipback.cli, flipback.runs.distributed\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(flipback.cli.app, ['explain', '--model', 'x:y', '--data', sys.argv[1], "
            "'--out', sys.argv[2], '--ray', 'auto'])\n"
            "print(r.output)\n")
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d.npz"), str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert "--ray needs Ray" in out.stdout and "flipback[ray]" in out.stdout, out.stdout + out.stderr


def test_total_budget_and_rate_limit_need_ray(tmp_path):
    from typer.testing import CliRunner

    import flipback.cli

    r = CliRunner().invoke(flipback.cli.app, ["explain", "--model", "x:y", "--data", str(tmp_path), "--out",
                                              str(tmp_path / "run"), "--total-budget", "10"])
    assert r.exit_code != 0 and "apply to --ray runs" in r.output


@pytest.mark.parametrize("command", [["explain"], ["bench", "paper"]])
def test_the_ray_help_names_the_extra(command):
    """Rich renders option help as markup: `[ray]` must be escaped, or it vanishes."""
    import re

    from typer.testing import CliRunner

    import flipback.cli

    r = CliRunner().invoke(flipback.cli.app, [*command, "--help"], env={"COLUMNS": "100"})
    assert r.exit_code == 0, r.output
    text = re.sub(r"[\s\u2502]+", "", r.output)  # the help box's lines and borders joined
    assert "pipinstall'flipback[ray]'" in text, r.output


def test_a_refused_connection_to_an_address_names_token_authentication(monkeypatch):
    """Ray 2.60 sends its token to an explicit HOST:PORT only with RAY_AUTH_MODE=token, and a
    cluster with token authentication then refuses with a bare 'Failed to connect'."""
    from flipback.errors import RunError
    from flipback.runs import distributed

    class RefusingRay:
        def is_initialized(self):
            return False

        def init(self, **kw):
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1")

    monkeypatch.setattr(distributed, "_probe", lambda address: None)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(RunError) as exc:
        distributed.connect(RefusingRay(), "127.0.0.1:1")
    assert "cannot connect" in exc.value.message and "RAY_AUTH_MODE=token" in exc.value.hint
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(RunError) as exc:
        distributed.connect(RefusingRay(), "127.0.0.1:1")
    assert "RAY_AUTH_MODE" not in exc.value.hint


@pytest.mark.parametrize("bad", [dict(total_budget=-1), dict(rate_limit=0)])
def test_bad_limits_are_refused(bad):
    with pytest.raises(ValueError):
        QueryAccountant(**bad)
