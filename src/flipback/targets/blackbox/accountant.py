"""BlackBoxTarget: the one query-accounting layer that every black-box call goes through.

Queries (docs/mission): one evaluation of the target on one modified image is one query; a
batch of k images is k queries. Calls with `counted=False` (the unmodified images, and load-time
probes) are tallied apart in `uncounted` and never touch budgets.

Counting rule for failures and retries. Every attempt is counted, image by image, as soon as
the target *may* have evaluated it, whether or not an answer came back: a retry of such an
attempt counts again. An attempt is not counted only when the target provably did not evaluate
it: the connection could not be opened (refused, connect timeout, name not found), or the server
refused the request before running the model (HTTP 429, 413, 401, 403, 404 and other 4xx except
400). So the counts are an upper bound on the true evaluations, equal to them when nothing fails.

Budgets (total and per image id) are checked *before* each attempt is sent, assuming it will be
counted, so they are never exceeded, retries included. A call that does not fit raises
BudgetExceeded and sends nothing (a retry that no longer fits raises it with the part already
answered attached).

Retries: on 5xx, 429, timeouts and connection errors, up to `retries` times per batch, waiting
backoff * 2**i seconds (at most max_backoff), or what the server's Retry-After says (up to
max_retry_after; a longer wait is an error). Anything else fails the call at once with
TargetError (per call) or ModelError (the target cannot be used at all).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from ...errors import ModelError
from ..ledger import QueryLedger, as_id_list
from .base import OUTPUTS, Answer, Backend, BackendFailure, BudgetExceeded, TargetError, check_output


def _as_ids(ids, n: int) -> list[int] | None:
    return None if ids is None else as_id_list(ids, n)


class BlackBoxTarget:
    """A model seen only through its answers, with exact query accounting.

    query(images, ids) -> Answer; images (N,C,H,W) float in [0,1] are sent exactly as given.
    Not thread-safe: use one target per thread.
    """

    def __init__(self, backend: Backend, num_classes: int, *, output: str = "scores",
                 budget: int | None = None, per_image_budget: int | None = None,
                 retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0,
                 max_retry_after: float = 60.0, rate_limit: float | None = None,
                 max_batch: int | None = None, spec: str | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        if output not in OUTPUTS:
            raise ModelError(f"unknown output mode '{output}'", hint="use 'scores' or 'label'")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be > 0 requests per second")
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.backend = backend
        self.num_classes = int(num_classes)
        self.output = output
        self.spec = spec or backend.description
        self.ledger = QueryLedger(budget=budget, per_image_budget=per_image_budget)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.rate_limit = rate_limit
        limits = [b for b in (max_batch, backend.max_batch) if b]
        self.batch_size = min(limits) if limits else backend.default_batch  # images per request
        self._sleep = sleep
        self._clock = clock
        self._next_send = 0.0
        self.requests = 0  # attempts sent to the backend (batches)
        self.retried = 0  # attempts that were retries
        self.failed_attempts = 0
        self.backend_seconds = 0.0  # time inside the backend (model + network)
        self.wait_seconds = 0.0  # time spent in backoff and rate limiting
        if backend.num_classes is not None and backend.num_classes != self.num_classes:
            raise ModelError(f"{backend.description} returns {backend.num_classes} scores per image but the data "
                             f"set has {self.num_classes} classes",
                             hint="check that the model was trained on these classes")
        self._check_output_mode(backend.returns_scores)

    # ------------------------------------------------------------------ accounting API

    @property
    def input_shape(self):
        """(C, H, W) the target takes, None where unknown or free."""
        return self.backend.input_shape

    # The Oracle protocol (targets/oracle.py): counted answers on candidates, free ones on originals.
    device = torch.device("cpu")
    min_margin = 0.0  # an answer is correct when the true label is the top-1

    def ask(self, images: torch.Tensor, ids) -> Answer:
        return self.query(images, ids)

    def answer(self, images: torch.Tensor) -> Answer:
        return self.query(images, counted=False)

    @property
    def queries(self) -> int:
        return self.ledger.queries

    @property
    def uncounted(self) -> int:
        return self.ledger.uncounted

    @property
    def budget(self) -> int | None:
        return self.ledger.budget

    @property
    def per_image_budget(self) -> int | None:
        return self.ledger.per_image_budget

    def queries_for(self, ids) -> torch.Tensor:
        """Counted queries so far for each id (int64, same order)."""
        return self.ledger.spent(ids)

    spent = queries_for

    def remaining_for(self, ids) -> torch.Tensor:
        """Queries each id may still spend (per-image and total budgets together); int64, with
        2**62 standing for 'no limit'."""
        return self.ledger.remaining(ids)

    @property
    def remaining(self) -> int | None:
        """Queries left in the total budget (None: no total budget)."""
        return None if self.budget is None else self.budget - self.queries

    def add_spent(self, ids, counts) -> None:
        """Record queries spent earlier (a resumed run), so budgets and counts include them."""
        self.ledger.add_spent(ids, counts)

    def stats(self) -> dict:
        return {"queries": self.queries, "uncounted": self.uncounted, "requests": self.requests,
                "retries": self.retried, "failed_attempts": self.failed_attempts,
                "backend_seconds": round(self.backend_seconds, 6), "wait_seconds": round(self.wait_seconds, 6),
                "batch_size": self.batch_size}

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"BlackBoxTarget({self.backend.description}, classes={self.num_classes}, output={self.output}, "
                f"queries={self.queries})")

    # ------------------------------------------------------------------ query

    def predict_labels(self, images: torch.Tensor, ids=None, *, counted: bool = True) -> torch.Tensor:
        return self.query(images, ids, counted=counted).labels

    def query(self, images, ids=None, *, counted: bool = True) -> Answer:
        """Evaluate images (N,C,H,W) in [0,1]; each image is one query (unless counted=False).

        Raises BudgetExceeded before sending when a budget would be exceeded, TargetError when
        this call failed after its retries, ModelError when the target cannot be used at all."""
        x = self._prepare(images)
        n = x.shape[0]
        ids_l = _as_ids(ids, n)
        if counted and self.per_image_budget is not None and ids_l is None:
            raise ValueError("a per-image budget needs ids for every query")
        if n == 0:
            return Answer(torch.zeros(0, dtype=torch.int64),
                          None if self.output == "label" else torch.zeros(0, self.num_classes))
        if counted:
            self._check_budget(ids_l, n)
        labels = torch.full((n,), -1, dtype=torch.int64)
        scores = torch.full((n, self.num_classes), float("nan")) if self.output == "scores" else None
        answered = torch.zeros(n, dtype=torch.bool)
        start = 0
        size = self.batch_size
        while start < n:
            stop = min(n, start + size)
            try:
                lab, sc = self._one_batch(x[start:stop], None if ids_l is None else ids_l[start:stop], counted)
            except BackendFailure as exc:  # only too_large gets here
                if size == 1:
                    raise self._attach(TargetError(f"{self.backend.description} refuses even a single image "
                                                   f"({exc.message})", exc.hint), labels, scores, answered) from None
                size = max(1, (stop - start) // 2)
                self.batch_size = size
                continue
            except (TargetError, BudgetExceeded) as exc:
                raise self._attach(exc, labels, scores, answered) from None
            labels[start:stop] = lab
            if scores is not None:
                scores[start:stop] = sc
            answered[start:stop] = True
            start = stop
        return Answer(labels, scores)

    # ------------------------------------------------------------------ internals

    def _check_output_mode(self, returns_scores: bool | None) -> None:
        if self.output == "scores" and returns_scores is False:
            raise ModelError(f"{self.backend.description} returns only top-1 labels, not scores",
                             hint="use hard-label mode (output='label')")

    def _prepare(self, images) -> np.ndarray:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise ValueError("images must be a float tensor in [0,1]")
        if images.ndim != 4:
            raise ValueError(f"images must be (N,C,H,W), got shape {tuple(images.shape)}")
        x = images.detach().to("cpu", torch.float32).contiguous()
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise ValueError("images must be finite and within [0,1]")
        want = self.backend.input_shape
        if want is not None and any(w is not None and w != g for w, g in zip(want, x.shape[1:])):
            shown = tuple("any" if w is None else w for w in want)
            raise ModelError(f"{self.backend.description} takes images of shape {shown} (C,H,W) but got "
                             f"{tuple(x.shape[1:])}", hint="check that the data set fits the model")
        return x.numpy()

    def _check_budget(self, ids_l: list[int] | None, n: int) -> None:
        self.ledger.check(ids_l, n)

    def _charge(self, ids_l: list[int] | None, n: int, counted: bool) -> None:
        self.ledger.charge(ids_l, n, counted)

    def _wait_turn(self) -> None:
        if self.rate_limit is None:
            return
        now = self._clock()
        if now < self._next_send:
            self._pause(self._next_send - now)
            now = self._next_send
        self._next_send = now + 1.0 / self.rate_limit

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self.wait_seconds += seconds
            self._sleep(seconds)

    def _one_batch(self, x: np.ndarray, ids_l: list[int] | None, counted: bool):
        n = x.shape[0]
        attempt = 0
        last = ""
        while True:
            if counted:
                self._check_budget(ids_l, n)
            self._wait_turn()
            self.requests += 1
            if attempt:
                self.retried += 1
            t0 = time.perf_counter()
            try:
                raw = self.backend.infer(x)
            except BackendFailure as exc:
                self.backend_seconds += time.perf_counter() - t0
                self.failed_attempts += 1
                if exc.evaluated:
                    self._charge(ids_l, n, counted)
                if exc.too_large and not exc.evaluated and n > 1:
                    raise
                if not exc.retryable:
                    raise TargetError(exc.message, exc.hint) from None
                last = exc.message
                attempt += 1
                if attempt > self.retries:
                    raise TargetError(f"{self.backend.description} failed {attempt} times in a row; last: {last}",
                                      hint=exc.hint or "check that the target is up; --retries and --timeout "
                                      "set how hard flipback tries", transient=True) from None
                if exc.retry_after is not None:
                    if exc.retry_after > self.max_retry_after:
                        raise TargetError(f"{self.backend.description} asks to wait {exc.retry_after:.0f} s "
                                          f"before retrying ({last})",
                                          hint="lower the request rate (rate_limit) or try later",
                                          transient=True) from None
                    wait = exc.retry_after
                else:
                    wait = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                self._pause(wait)
                continue
            self.backend_seconds += time.perf_counter() - t0
            self._charge(ids_l, n, counted)
            try:
                labels, scores = check_output(raw, n, self.num_classes, description=self.backend.description)
            except BackendFailure as exc:
                raise TargetError(exc.message, exc.hint) from None
            if scores is None:
                self._check_output_mode(False)
            elif self.output == "label":
                scores = None
            return labels, scores

    def _attach(self, exc, labels, scores, answered):
        if answered.any():
            exc.partial = Answer(labels.clone(), None if scores is None else scores.clone())
            exc.answered = answered.clone()
        return exc

