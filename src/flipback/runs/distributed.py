"""`--ray`: one explain run spread over a Ray cluster, with the same results, budgets and resume.

Ray's stateful-actor batch-inference pattern. Each `ExplainWorker` actor loads the data set (the
content-addressed, memory-mapped cache) and builds its engine (oracle, guide, attack) once, from
the run's plain config. The driver sends only image indices and receives, per batch, the
records and the corrected images, which it commits to its one `RunStore`; so the run folder,
the report and resume are those of a local run, and a run may be started locally and resumed
on Ray or the other way round. The per-batch work is `explain_run.explain_batch`, the function
the local loop calls, so the results are the same by construction. The driver never holds more
than the batches in flight.

Queries. Per-image budgets are enforced in the actors, by each engine's oracle ledger: a batch
goes to one actor, so an image is counted in one place. The run's total budget and the target's
request rate go through one `QueryAccountant` actor, pinned to the driver's node:
- total budget (`total_budget`): an actor leases allowances from the accountant, `lease` queries
  at a time, when its ledger would otherwise refuse a query, and gives back what its batch did not
  use when the batch ends. Granted plus already spent never exceeds the budget, so N actors never
  send more than one process would be allowed. The lease of an actor that dies is counted as
  spent (it may have been), so a fault can only make the run stop earlier, never later.
- request rate (`rate_limit`, black-box): every request, counted or not, takes a send slot from
  the accountant, which spaces slots 1/rate apart across all actors.

Faults. An actor that dies (SIGKILL, a lost node) fails its batch; the driver kills it for good,
starts a replacement, and gives the batch to a live actor. Nothing of a failed attempt reaches the
store, so no image is lost or stored twice; the retry counts its queries as a first try would
(as a killed-and-resumed local run does), so the records equal those of an uninterrupted run.
Files are written to a temporary folder and moved into place, so a zombie attempt cannot leave
half a file. A killed driver takes its actors with it (Ray's owner fate-sharing); running the
same command again resumes from the store.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.dataset import release_mapped_pages
from ..errors import DataError, FlipbackError, ModelError, RunError
from ..store import ImageRecord, RunStore
from ..targets.answers import BudgetExceeded
from ..targets.ledger import NO_LIMIT, QueryLedger, as_id_list
from ..targets.loading import dataset_for_model
from .errors import Predictions, _top1, to_tensor
from .progress import progress_bar

PREDICT_BATCH = 500  # predict_dataset's batch: the same batches give the same answers
_FORWARDED_ENV = ("FLIPBACK_CACHE", "FLIPBACK_SERVER_TOKEN", "FLIPBACK_SERVER_TOKEN_FILE")
_TOKEN_FILE = ".ray-run"  # in the run folder: an actor that reads the driver's token there shares it
_TMP_PREFIX = ".ray-tmp-"


@dataclass
class RayOptions:
    """How a run uses a Ray cluster (`flipback explain --ray ...`)."""

    address: str = "auto"  # auto (the cluster this machine is part of) | local (start one here) | HOST:PORT
    actors: int | None = None  # None: as many as the cluster's CPUs (GPUs) allow
    cpus: float = 1.0  # per actor
    gpus: float = 0.0  # per actor; an actor with a GPU runs its model there (device auto)
    total_budget: int | None = None  # most counted queries of the whole run, all actors and sessions together
    rate_limit: float | None = None  # black-box: most requests per second to the target, all actors together
    lease: int = 64  # queries an actor leases from the accountant at a time (with a total budget)
    max_attempts: int = 3  # a batch whose actor dies this many times stops the run
    wait_s: float = 600.0  # stop when no actor has been alive for this long


# ---------------------------------------------------------------------------------- accountant


class QueryAccountant:
    """The run's one total budget and request rate, shared by every actor (a Ray actor in a
    cluster; a plain object in tests). Thread-safe."""

    def __init__(self, total_budget: int | None = None, rate_limit: float | None = None, spent_before: int = 0,
                 clock=time.monotonic):
        if total_budget is not None and total_budget < 0:
            raise ValueError("total_budget must be >= 0")
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be > 0 requests per second")
        self.total_budget = total_budget
        self.rate_limit = rate_limit
        self.spent_before = int(spent_before)  # counted queries of earlier sessions (the store's)
        self.used = 0  # spent by batches that ended (settled)
        self.lost = 0  # leased to attempts whose actor died: counted as spent
        self.outstanding: dict[str, int] = {}  # attempt -> leased and not settled
        self.calls = {"lease": 0, "settle": 0, "abandon": 0, "slot": 0}
        self.slot_wait = 0.0  # seconds of waiting handed out
        self._next = 0.0
        self._clock = clock
        self._lock = threading.Lock()

    def _left(self) -> int:
        if self.total_budget is None:
            return NO_LIMIT
        return max(0, self.total_budget - self.spent_before - self.used - self.lost - sum(self.outstanding.values()))

    def lease(self, attempt: str, n: int) -> tuple[int, int]:
        """Grant up to n queries to `attempt` -> (granted, still unleased after it)."""
        with self._lock:
            self.calls["lease"] += 1
            grant = int(min(max(0, n), self._left()))
            self.outstanding[attempt] = self.outstanding.get(attempt, 0) + grant
            return grant, self._left()

    def left(self) -> int:
        with self._lock:
            return self._left()

    def settle(self, attempt: str, used: int) -> None:
        """`attempt` ended having spent `used` counted queries; what it leased beyond them returns."""
        with self._lock:
            self.calls["settle"] += 1
            self.outstanding.pop(attempt, None)
            self.used += int(used)

    def abandon(self, attempt: str) -> None:
        """`attempt`'s actor died: what it leased may have been spent, so it stays spent."""
        with self._lock:
            self.calls["abandon"] += 1
            self.lost += self.outstanding.pop(attempt, 0)

    def slot(self) -> float:
        """The wait before the caller's next request (0 without a rate limit)."""
        with self._lock:
            self.calls["slot"] += 1
            if self.rate_limit is None:
                return 0.0
            now = self._clock()
            at = max(now, self._next)
            self._next = at + 1.0 / self.rate_limit
            self.slot_wait += at - now
            return at - now

    def stats(self) -> dict:
        with self._lock:
            return {"total_budget": self.total_budget, "rate_limit": self.rate_limit,
                    "spent_before": self.spent_before, "used": self.used, "lost_to_faults": self.lost,
                    "outstanding": sum(self.outstanding.values()), "calls": dict(self.calls),
                    "slot_wait_seconds": round(self.slot_wait, 6)}


class _ActorClient:
    """The accountant behind a Ray actor handle, with the plain object's methods."""

    def __init__(self, handle):
        import ray

        self._ray, self._h = ray, handle

    def __getattr__(self, name):
        method = getattr(self._h, name)
        return lambda *a: self._ray.get(method.remote(*a))


class LeasedLedger(QueryLedger):
    """A QueryLedger whose total budget is the allowance leased from the run's accountant.

    `budget` here is this actor's local ceiling: what it spent (earlier sessions' counts
    included) plus what it holds leased. A check that would pass the ceiling leases more
    first; only when the accountant has nothing left does it raise BudgetExceeded(total)."""

    def __init__(self, accountant, *, per_image_budget: int | None, lease: int = 64):
        super().__init__(budget=0, per_image_budget=per_image_budget)
        self.accountant = accountant
        self.lease_size = max(1, int(lease))
        self.attempt: str | None = None
        self._mark = 0
        self._unleased = NO_LIMIT

    @classmethod
    def attach(cls, oracle, accountant, lease: int = 64) -> "LeasedLedger":
        """Replace the oracle's ledger (with its counts) by a leased one."""
        old: QueryLedger = oracle.ledger
        new = cls(accountant, per_image_budget=old.per_image_budget, lease=lease)
        new.queries, new.uncounted, new._per_id = old.queries, old.uncounted, dict(old._per_id)
        new.budget = new.queries
        oracle.ledger = new
        return new

    def begin(self, attempt: str) -> None:
        with self._lock:
            self.attempt, self._mark = attempt, self.queries
        self._unleased = self.accountant.left()

    def end(self) -> int:
        """Settle this attempt with the accountant -> queries it spent."""
        with self._lock:
            used, attempt = self.queries - self._mark, self.attempt
            self.budget, self.attempt = self.queries, None
        if attempt is not None:
            self.accountant.settle(attempt, used)
        return used

    def check(self, ids, n: int) -> None:
        with self._lock:
            short = self.queries + n - self.budget
        if short > 0 and self.attempt is not None:
            granted, self._unleased = self.accountant.lease(self.attempt, max(short, self.lease_size))
            with self._lock:
                self.budget += granted
                short = self.queries + n - self.budget
        if short > 0:
            raise BudgetExceeded("the run's total query budget is spent (all actors together)", kind="total",
                                 hint="raise --total-budget")
        super().check(ids, n)

    def remaining(self, ids):
        # What the attack may plan for: held plus still unleased (as of the last reply), so an
        # attack sees the run's budget, not this actor's allowance of the moment.
        import torch

        with self._lock:
            total_left = min(NO_LIMIT, self.budget - self.queries + self._unleased)
            out = []
            for i in as_id_list(ids):
                left = NO_LIMIT if self.per_image_budget is None else self.per_image_budget - self._per_id.get(i, 0)
                out.append(max(0, min(left, total_left)))
            return torch.tensor(out, dtype=torch.int64)

    def add_spent(self, ids, counts) -> None:
        before = self.queries
        super().add_spent(ids, counts)
        with self._lock:  # earlier sessions' queries are the store's, not this allowance's
            self.budget += self.queries - before
            self._mark += self.queries - before


def share_rate_limit(oracle, accountant) -> None:
    """Every request of this black-box oracle first takes a send slot from the accountant."""
    if not hasattr(oracle, "_wait_turn"):
        return

    def wait_turn() -> None:
        oracle._pause(accountant.slot())

    oracle._wait_turn = wait_turn


# ---------------------------------------------------------------------------------- the actor


class ExplainWorker:
    """One Ray actor: the data set and the engine, loaded once; batches of indices in, results out."""

    def setup(self, cfg, data_fingerprint: str, run_dir: str, token: str, env: dict, cwd: str, accountant,
              ray_opts: RayOptions) -> dict:
        os.environ.update(env)
        if os.path.isdir(cwd):  # relative paths in the config mean the driver's folder (same machine or shared)
            os.chdir(cwd)
        import torch

        from .engine import build_engine

        torch.set_num_threads(max(1, int(ray_opts.cpus)))
        self.cfg = cfg
        self.ds = dataset_for_model(cfg.model, cfg.data, split=cfg.split, classes=cfg.classes)  # as run_explain
        if self.ds.fingerprint != data_fingerprint:
            raise DataError(f"the data set {cfg.data} differs on node {socket.gethostname()} from the driver's",
                            hint="every node must see the same data at the same path")
        self.accountant = _ActorClient(accountant) if accountant is not None and not isinstance(
            accountant, QueryAccountant) else accountant
        if ray_opts.rate_limit is not None and self.accountant is not None:
            # Loading a local black box may send one uncounted probe (load_blackbox) before the
            # shared limiter can be installed on the oracle: it takes its send slot here.
            time.sleep(self.accountant.slot())
        self.engine = build_engine(cfg, self.ds.num_classes, self.ds.shape)
        self.mem = self._memory_plan(cfg, ray_opts)
        self.ledger = None
        if ray_opts.total_budget is not None:
            self.ledger = LeasedLedger.attach(self.engine.oracle, self.accountant, ray_opts.lease)
        if ray_opts.rate_limit is not None:
            share_rate_limit(self.engine.oracle, self.accountant)
        self.run_dir = Path(run_dir)
        try:  # the run folder is shared (same machine or a shared file system): write straight into it
            self.shared = (self.run_dir / _TOKEN_FILE).read_text() == token
        except OSError:
            self.shared = False
        return self.where()

    def _memory_plan(self, cfg, ray_opts: RayOptions):
        """Batch sizes under the memory cap, as run_explain sizes them: --max-memory is each
        actor's; the default (80% of what is free) is shared by the actors the node can hold."""
        from dataclasses import replace

        import ray

        from .memory import default_cap, plan_for_engine

        if cfg.max_memory is None:
            here = ray.get_runtime_context().get_node_id()
            res = next((n.get("Resources", {}) for n in ray.nodes() if n.get("NodeID") == here), {})
            share = int(res.get("CPU", 1) // ray_opts.cpus) if ray_opts.cpus > 0 else 1
            if ray_opts.gpus > 0:
                share = min(share, max(1, int(round(1 / ray_opts.gpus))))  # actors on one GPU
            device = getattr(self.engine.guide, "device", None)
            import torch

            cap = default_cap(device if isinstance(device, torch.device) else torch.device("cpu"))
            cfg = replace(cfg, max_memory=cap // max(1, share))
        return plan_for_engine(self.engine, cfg, self.ds.shape)

    def where(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                "writes_run_folder": self.shared, "batch_size": self.mem.batch_size,
                "predict_batch_size": self.mem.predict_batch_size, "max_memory": self.mem.cap}

    def predict(self, start: int, stop: int):
        """Top-1 of images start..stop, in predict_dataset's batches -> (start, top, {index: why})."""
        from .explain_run import _stop_cleanly_when_unavailable

        tops, failed = [], {}
        with _stop_cleanly_when_unavailable():
            for idx, images in self.ds.batches(min(PREDICT_BATCH, self.mem.predict_batch_size), np.arange(start, stop)):
                top, reasons = _top1(self.engine.scores, to_tensor(images))
                tops.append(top)
                failed.update({int(i): r for i, r in zip(idx, reasons) if r is not None})
        release_mapped_pages(self.ds.images)
        return start, np.concatenate(tops), failed

    def explain(self, attempt: str, idx: np.ndarray, again: dict) -> dict:
        """Explain one batch. `again`: {image: queries} spent in earlier sessions on its images."""
        from .explain_run import explain_batch

        idx = np.asarray(idx, dtype=np.int64)
        if again:
            ids = np.array(sorted(again), dtype=np.int64)
            self.engine.add_spent(ids, np.array([again[i] for i in ids], dtype=np.int64))
        if self.ledger is not None:
            self.ledger.begin(attempt)
        base = self.run_dir if self.shared else None
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{attempt}-", dir=base))
        try:
            try:
                batch = explain_batch(self.engine, self.ds, idx, self.cfg, tmp)
            except RunError as exc:
                return self._stopped(exc, getattr(exc, "unfinished", None))
            except BudgetExceeded as exc:
                if exc.kind == "per_image":
                    raise
                return self._stopped(RunError(f"{exc.message}; the results so far are kept",
                                              hint="raise --total-budget and run the same command again"),
                                     dict(zip(idx.tolist(), self.engine.spent(idx).tolist())))
            files = {}
            for rec in batch.records:
                for rel in (rec.figure, rec.corrected_image):
                    if not rel:
                        continue
                    if self.shared:  # a rename: whole files only, the last of two identical ones wins
                        (self.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                        os.replace(tmp / rel, self.run_dir / rel)
                    else:
                        files[rel] = (tmp / rel).read_bytes()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            release_mapped_pages(self.ds.images)
            if self.ledger is not None:
                self.ledger.end()
        return {"records": [r.to_dict() for r in batch.records], "corrected": batch.corrected,
                "seconds": batch.seconds, "files": files, "stopped": None}

    def _stopped(self, exc: RunError, unfinished) -> dict:
        return {"stopped": (exc.message, exc.hint), "unfinished": unfinished}

    def stats(self) -> dict:
        return self.engine.oracle.stats()

    def summary(self) -> dict:
        return self.engine.summary


# ---------------------------------------------------------------------------------- the driver


def _import_ray():
    try:
        import ray
    except ImportError:
        raise FlipbackError("--ray needs Ray, which is not installed", hint="pip install 'flipback[ray]'") from None
    return ray


def connect(ray, address: str) -> bool:
    """Connect to the cluster (auto | local | HOST:PORT) -> whether this call started the connection."""
    if ray.is_initialized():
        return False
    kw = dict(log_to_driver=False, logging_level=logging.WARNING)
    if address != "local":
        _probe(address)
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, **kw)  # always a new one, never a stale address
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        hint = "start one with `ray start --head`, pass its HOST:PORT, or use --ray local"
        if address not in ("auto", "local") and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            # Ray 2.60 sends its token to an address given explicitly only when told to.
            hint = ("if the cluster uses token authentication (`ray start --head` turns it on when "
                    "~/.ray/auth_token exists), set RAY_AUTH_MODE=token, with its token in ~/.ray/auth_token or "
                    "RAY_AUTH_TOKEN; otherwise " + hint)
        raise RunError(f"cannot connect to the Ray cluster at '{address}' ({first})", hint=hint) from None
    return True


def _probe(address: str) -> None:
    """Fail at once, not after minutes of Ray's retries, when nothing answers at the cluster's
    address (for auto: $RAY_ADDRESS, else the one `ray start` noted in /tmp/ray)."""
    where = address
    if address == "auto":
        where = os.environ.get("RAY_ADDRESS", "")
        if not where:
            try:
                where = Path(tempfile.gettempdir(), "ray", "ray_current_cluster").read_text().strip()
            except OSError:
                raise RunError("no Ray cluster was started on this machine",
                               hint="start one with `ray start --head`, pass --ray HOST:PORT, or use --ray local") from None
    if "://" in where:  # ray://HOST:PORT (Ray Client) and the like: Ray itself tells
        return
    host, _, port = where.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError):
        raise RunError(f"no Ray cluster answers at {where}" + (" (the address `ray start` noted last)"
                                                               if address == "auto" else ""),
                       hint="check `ray status`; start one with `ray start --head`, or use --ray local") from None


def _resolved(cfg):
    """The config with the paths it names made absolute (actors do not run in the driver's folder)."""
    from dataclasses import replace

    def spec(s: str | None) -> str | None:
        if not s or "://" in s:
            return s
        return ":".join(str(Path(p).resolve()) if p and Path(p).exists() else p for p in s.split(":"))

    return replace(cfg, model=spec(cfg.model), data=str(Path(cfg.data).expanduser().resolve()),
                   surrogate=spec(cfg.surrogate))


class _Pool:
    """Ray actors that take one task at a time; an actor that dies is replaced and its task retried."""

    def __init__(self, ray, make, n: int, opts: RayOptions, log):
        self.ray, self.make, self.opts, self.log = ray, make, opts, log
        self.starting: dict = {}  # setup ref -> actor
        self.idle: list = []
        self.where: dict = {}  # actor -> where it runs
        self.failures = 0
        self.lost_attempts: list[str] = []
        self._seq = 0
        for _ in range(n):
            self._start()

    def _start(self):
        actor, ref = self.make()
        self.starting[ref] = actor

    def _lose(self, actor, why: str) -> None:
        self.failures += 1
        where = self.where.pop(actor, {})
        self.log(f"a Ray actor ({where.get('host', '?')}, pid {where.get('pid', '?')}) was lost: {why}")
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
        self._start()

    def live(self) -> int:
        return len(self.where)

    def run(self, tasks, submit, done, stop=lambda: False) -> float:
        """Run tasks [(key, payload)]: submit(actor, payload, attempt) -> ref; done(key, payload, value).
        Returns the driver's own seconds (not waiting)."""
        ray = self.ray
        pending = deque(tasks)
        tries: dict = {}
        inflight: dict = {}  # ref -> (actor, key, payload, attempt)
        busy = 0.0
        alone_since = None
        while (pending and not stop()) or inflight:
            while pending and self.idle and not stop():
                key, payload = pending.popleft()
                actor = self.idle.pop()
                self._seq += 1
                attempt = f"{os.getpid()}-{self._seq}"
                inflight[submit(actor, payload, attempt)] = (actor, key, payload, attempt)
            refs = list(inflight) + list(self.starting)
            if not refs:
                raise RunError("no Ray actor is left to run the batches", hint="check the cluster: `ray status`")
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            t0 = time.perf_counter()
            if not self.where and not ready:
                alone_since = alone_since or time.monotonic()
                if time.monotonic() - alone_since > self.opts.wait_s:
                    raise RunError(f"no Ray actor could be placed for {self.opts.wait_s:.0f} s (each needs "
                                   f"{self.opts.cpus:g} CPU, {self.opts.gpus:g} GPU)",
                                   hint="check the cluster's free resources: `ray status`")
            for ref in ready:
                if ref in self.starting:
                    actor = self.starting.pop(ref)
                    try:
                        self.where[actor] = ray.get(ref)
                        self.idle.append(actor)
                        alone_since = None
                    except ray.exceptions.RayTaskError as exc:  # the config does not work: stop
                        raise _cause(exc) from None
                    except ray.exceptions.RayActorError as exc:
                        self._lose(actor, _why(exc))
                    continue
                actor, key, payload, attempt = inflight.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise _cause(exc) from None
                except ray.exceptions.RayActorError as exc:
                    self.lost_attempts.append(attempt)
                    self._lose(actor, _why(exc))
                    tries[key] = tries.get(key, 0) + 1
                    if tries[key] >= self.opts.max_attempts:
                        raise RunError(f"the batch {key} lost its Ray actor {tries[key]} times; the results so far "
                                       "are kept", hint="check the actors' logs (out of memory?); run the same "
                                       "command again to resume") from None
                    pending.appendleft((key, payload))
                    continue
                self.idle.append(actor)
                done(key, payload, value)
            busy += time.perf_counter() - t0
        return busy

    def actors(self) -> list:
        return list(self.where)

    def close(self) -> None:
        for actor in list(self.where) + list(self.starting.values()):
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.where.clear()
        self.starting.clear()


def _cause(exc):
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _why(exc) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _default_actors(ray, opts: RayOptions) -> int:
    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // opts.cpus) if opts.cpus > 0 else 1
    if opts.gpus > 0:
        n = min(n, int(res.get("GPU", 0) // opts.gpus))
    return max(1, n)


def _spent_so_far(store: RunStore) -> int:
    """Counted queries of earlier sessions: stored records, and unfinished images without one."""
    return int(store.db.execute(
        "SELECT (SELECT COALESCE(SUM(json_extract(record, '$.queries')), 0) FROM results)"
        " + (SELECT COALESCE(SUM(queries), 0) FROM unfinished WHERE idx NOT IN (SELECT idx FROM results))"
    ).fetchone()[0])


def _clean_tmp(run_dir: Path) -> None:
    for p in run_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def run_explain_ray(cfg, run_dir: Path, opts: RayOptions, *, show_progress: bool = True, resume: bool = True,
                    log=print) -> dict:
    """`run_explain` with the work on Ray actors; the same run folder, summary and resume."""
    import json

    from ..report import write_report
    from .explain_run import _write_atomic, file_fingerprint, summarize_run

    ray = _import_ray()
    if opts.actors is not None and opts.actors < 1:
        raise FlipbackError("--ray-actors must be at least 1")
    t_start = time.perf_counter()
    # As run_explain: the model's eval transform and class matching; memory-mapped: read batch by batch.
    ds = dataset_for_model(cfg.model, cfg.data, split=cfg.split, classes=cfg.classes, progress=show_progress)
    run_dir = Path(run_dir)
    identity = cfg.identity(ds.fingerprint, file_fingerprint(cfg.model) + file_fingerprint(cfg.surrogate or ""))
    started = connect(ray, opts.address)
    pool = accountant = None
    try:
        with RunStore.open(run_dir, identity, resume=resume) as store:
            token = secrets.token_hex(16)
            _write_file(run_dir / _TOKEN_FILE, token.encode())
            _clean_tmp(run_dir)
            spent_before = _spent_so_far(store) if opts.total_budget is not None else 0
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = ray.get_runtime_context().get_node_id()
            accountant = ray.remote(QueryAccountant).options(
                num_cpus=0, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote(
                opts.total_budget, opts.rate_limit, spent_before)
            remote_cfg = _resolved(cfg)
            env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
            worker = ray.remote(ExplainWorker).options(num_cpus=opts.cpus, num_gpus=opts.gpus, max_restarts=0)

            def make():
                actor = worker.remote()
                return actor, actor.setup.remote(remote_cfg, ds.fingerprint, str(run_dir.resolve()), token, env,
                                                 os.getcwd(), accountant, opts)

            n_actors = opts.actors or _default_actors(ray, opts)
            log(f"ray: {n_actors} actor{'s' if n_actors != 1 else ''} on {len(ray.nodes())} node(s)")
            pool = _Pool(ray, make, n_actors, opts, log)

            preds, predict_busy = _predict(pool, ds, n_actors, show_progress)
            todo_all = preds.misclassified[: cfg.limit] if cfg.limit is not None else preds.misclassified
            done = store.done()
            todo = np.array([i for i in todo_all if int(i) not in done], dtype=np.int64)
            if done:
                log(f"resuming: {len(done)} of {len(todo_all)} errors already explained")
            again = {**store.unfinished(), **store.to_retry()}
            # The batch run_explain would use: --batch-size, or less where an actor's memory is short.
            size = min([cfg.batch_size] + [w["batch_size"] for w in pool.where.values()])
            if size < cfg.batch_size:
                log(f"memory: batches of {size} images (the actors' memory caps)")
            batches = [(start // size, todo[start:start + size]) for start in range(0, len(todo), size)]
            stop: list = []
            timing = {"store_seconds": 0.0, "files_seconds": 0.0}

            def submit(actor, idx, attempt):
                mine = {int(i): again[int(i)] for i in idx if int(i) in again}
                return actor.explain.remote(attempt, idx, mine)

            with progress_bar(f"explaining ({cfg.method}, ray)", total=len(todo_all), enabled=show_progress) as advance:
                advance(len(todo_all) - len(todo))

                def commit(_key, idx, out):
                    if out["stopped"] is not None:
                        if out["unfinished"] is not None:
                            store.set_unfinished(out["unfinished"])
                        stop.append(out["stopped"])
                        return
                    t0 = time.perf_counter()
                    for rel, data in out["files"].items():
                        _write_file(run_dir / rel, data)
                    t1 = time.perf_counter()
                    originals = np.asarray(ds.images[idx])
                    release_mapped_pages(ds.images)
                    store.add([ImageRecord.from_dict(r) for r in out["records"]], out["corrected"], originals,
                              out["seconds"])
                    timing["files_seconds"] += t1 - t0
                    timing["store_seconds"] += time.perf_counter() - t1
                    advance(len(idx))

                t_explain, cpu_explain = time.perf_counter(), time.process_time()
                explain_busy = pool.run(batches, submit, commit, stop=lambda: bool(stop))
                explain_wall = time.perf_counter() - t_explain
                explain_cpu = time.process_time() - cpu_explain  # the driver's, Ray's threads in it included
            for attempt in pool.lost_attempts:
                accountant.abandon.remote(attempt)
            if stop:
                message, hint = stop[0]
                raise RunError(message, hint=hint)
            actors = pool.actors()
            stats = [ray.get(a.stats.remote()) for a in actors]
            engine_summary = ray.get(actors[0].summary.remote()) if actors else {}
            if "surrogate" in engine_summary:  # the actors were given its absolute path
                engine_summary["surrogate"] = cfg.surrogate
            session = {}
            for s in stats:
                for k, v in s.items():
                    if isinstance(v, (int, float)) and k != "batch_size":
                        session[k] = session.get(k, 0) + v
                    else:
                        session.setdefault(k, v)
            summary = summarize_run(cfg, ds, preds, store, engine_summary, session)
            n_new = len(todo)
            summary["ray"] = {
                "address": opts.address, "nodes": len({w["node"] for w in pool.where.values()}),
                "actors": n_actors, "cpus_per_actor": opts.cpus, "gpus_per_actor": opts.gpus,
                "actors_lost": pool.failures, "batches": len(batches), "batch_size": size,
                "batches_retried": len(pool.lost_attempts),
                "actors_write_run_folder": all(w["writes_run_folder"] for w in pool.where.values()),
                "explain_wall_seconds": round(explain_wall, 3),
                "images_per_second_wall": round(n_new / explain_wall, 3) if explain_wall > 0 and n_new else None,
                "driver_seconds_per_image": round(explain_busy / n_new, 6) if n_new else None,
                "driver_cpu_seconds_per_image": round(explain_cpu / n_new, 6) if n_new else None,
                "store_seconds_per_image": round(timing["store_seconds"] / n_new, 6) if n_new else None,
                "predict_driver_seconds": round(predict_busy, 3),
                "seconds": round(time.perf_counter() - t_start, 3),
                "accountant": ray.get(accountant.stats.remote()),
            }
    finally:
        if pool is not None:
            pool.close()
        if accountant is not None:
            try:
                ray.kill(accountant)
            except Exception:
                pass
        if started:
            ray.shutdown()
        _clean_tmp(run_dir)
        (run_dir / _TOKEN_FILE).unlink(missing_ok=True)
    _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    write_report(run_dir)
    return summary


def _predict(pool: _Pool, ds, n_actors: int, show_progress: bool) -> tuple[Predictions, float]:
    """The target's top-1 on every image, in chunks of whole predict batches spread over the actors."""
    n = len(ds)
    per = max(1, min(10, -(-n // (PREDICT_BATCH * 4 * n_actors))))  # 4 chunks per actor, 500..5,000 images
    chunk = per * PREDICT_BATCH
    predicted = np.empty(n, dtype=np.int64)
    failed: dict[int, str] = {}
    tasks = [(start, (start, min(n, start + chunk))) for start in range(0, n, chunk)]
    with progress_bar("predicting (ray)", total=n, enabled=show_progress) as advance:
        def done(_key, span, value):
            start, top, why = value
            predicted[start:start + len(top)] = top
            failed.update(why)
            first = min(n, PREDICT_BATCH)
            if start == 0 and all(i in why for i in range(first)):
                raise ModelError(f"the model gave no usable answer for any of the first {first} images "
                                 f"({next(iter(why.values()))})",
                                 hint="check the model: it must return finite class scores")
            advance(span[1] - span[0])

        busy = pool.run(tasks, lambda actor, span, _a: actor.predict.remote(*span), done)
    return Predictions(ds.labels.copy(), predicted, dict(sorted(failed.items()))), busy
