"""Black-box targets in process: accounting, budgets, retries, hard labels, ONNX export, checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flipback.errors import ModelError
from flipback.targets.blackbox import (Answer, BlackBoxTarget, BudgetExceeded, TargetError, from_callable,
                                       from_module, load_blackbox)
from flipback.targets.zoo import Normalized, SmallCNN

K = 10


class Recorder:
    """A scripted callable: scores are a fixed linear function of the pixels; it records every
    batch it sees, and can be told to fail on given calls."""

    def __init__(self, k=K, fail=None):
        self.w = np.random.default_rng(0).standard_normal((16, k)).astype(np.float64)
        self.calls: list[int] = []
        self.fail = list(fail or [])

    def __call__(self, x):
        self.calls.append(len(x))
        if self.fail:
            exc = self.fail.pop(0)
            if exc is not None:
                raise exc
        assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous
        return (x.reshape(len(x), -1).astype(np.float64) @ self.w).astype(np.float32)


def imgs(n, seed=0):
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def no_sleep(_):
    pass


def test_callable_exact_counts_per_image_and_total():
    fn = Recorder()
    t = from_callable(fn, K, max_batch=3)
    x = imgs(7)
    ids = torch.tensor([5, 5, 6, 7, 8, 9, 9])
    a = t.query(x, ids)
    ref = torch.from_numpy(fn.w.T @ x.reshape(7, -1).double().numpy().T).T.float()
    assert isinstance(a, Answer) and a.labels.dtype == torch.int64 and a.scores.dtype == torch.float32
    assert torch.allclose(a.scores, ref, atol=1e-5) and torch.equal(a.labels, a.scores.argmax(1))
    assert fn.calls == [3, 3, 1]
    assert t.queries == 7 and t.requests == 3
    assert t.queries_for(torch.tensor([5, 6, 9, 42])).tolist() == [2, 1, 2, 0]
    t.query(x[:2], torch.tensor([6, 42]))
    assert t.queries == 9 and t.queries_for([6, 42]).tolist() == [2, 1]
    t.query(x, counted=False)  # unmodified images: tallied apart
    assert t.queries == 9 and t.uncounted == 7
    t.query(x[:1])  # no ids: total only
    assert t.queries == 10 and t.stats()["queries"] == 10


def test_budgets_are_checked_before_sending():
    fn = Recorder()
    t = from_callable(fn, K, budget=5)
    t.query(imgs(4))
    with pytest.raises(BudgetExceeded) as err:
        t.query(imgs(2))
    assert err.value.kind == "total" and "budget of 5" in str(err.value)
    assert fn.calls == [4] and t.queries == 4 and t.remaining == 1
    t.query(imgs(1))
    assert t.queries == 5

    fn = Recorder()
    t = from_callable(fn, K, per_image_budget=2)
    t.query(imgs(3), torch.tensor([1, 1, 2]))
    with pytest.raises(BudgetExceeded) as err:
        t.query(imgs(2), torch.tensor([1, 2]))  # id 1 has spent its 2
    assert err.value.kind == "per_image" and err.value.ids.tolist() == [1]
    assert fn.calls == [3] and t.queries_for([1, 2]).tolist() == [2, 1]
    assert t.remaining_for([1, 2, 3]).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="ids"):
        t.query(imgs(1))
    t.add_spent([3], [2])  # a resumed run's earlier spending counts
    with pytest.raises(BudgetExceeded):
        t.query(imgs(1), [3])
    assert t.queries == 5


def test_retries_count_and_never_exceed_budget():
    fn = Recorder(fail=[TimeoutError("slow"), ConnectionRefusedError("down"), None])
    t = from_callable(fn, K, retries=3, backoff=0.0, sleep=no_sleep)
    t.query(imgs(2), [0, 1])
    # the timed-out attempt may have been evaluated (counted); the refused one was not
    assert fn.calls == [2, 2, 2] and t.queries == 4 and t.queries_for([0, 1]).tolist() == [2, 2]
    assert t.retried == 2 and t.failed_attempts == 2

    fn = Recorder(fail=[TimeoutError("slow")] * 10)
    t = from_callable(fn, K, retries=2, backoff=0.0, sleep=no_sleep)
    with pytest.raises(TargetError, match="failed 3 times"):
        t.query(imgs(2))
    assert t.queries == 6

    fn = Recorder(fail=[TimeoutError("slow")] * 10)
    t = from_callable(fn, K, retries=10, backoff=0.0, sleep=no_sleep, budget=5, max_batch=2)
    with pytest.raises(BudgetExceeded):
        t.query(imgs(2))
    assert t.queries == 4 and fn.calls == [2, 2]  # the third attempt would pass 5: not sent

    waits = []
    fn = Recorder(fail=[TimeoutError()] * 3)
    t = from_callable(fn, K, retries=3, backoff=0.5, max_backoff=1.5, sleep=waits.append)
    t.query(imgs(1))
    assert waits == [0.5, 1.0, 1.5]  # exponential backoff, capped

    fn = Recorder(fail=[ValueError("bad input")])
    t = from_callable(fn, K, retries=3, sleep=no_sleep)
    with pytest.raises(TargetError, match="raised ValueError: bad input"):
        t.query(imgs(1))
    assert fn.calls == [1] and t.queries == 1  # not retried


def test_budget_spent_by_retries_mid_call_keeps_the_answered_part():
    fn = Recorder(fail=[None, TimeoutError(), TimeoutError()])
    t = from_callable(fn, K, retries=5, backoff=0.0, sleep=no_sleep, budget=7, max_batch=2)
    with pytest.raises(BudgetExceeded) as err:
        t.query(imgs(4))
    assert err.value.answered.tolist() == [True, True, False, False]
    assert (err.value.partial.labels[2:] == -1).all() and torch.isnan(err.value.partial.scores[2:]).all()
    assert t.queries == 6


def test_hard_label_mode_returns_no_scores():
    t = from_callable(Recorder(), K, output="label")
    a = t.query(imgs(3))
    assert a.scores is None and a.labels.shape == (3,)
    labels_only = from_callable(lambda x: np.arange(len(x)) % K, K, output="label")
    assert labels_only.query(imgs(3)).labels.tolist() == [0, 1, 2]
    with pytest.raises(ModelError, match="only top-1 labels"):
        from_callable(lambda x: np.zeros(len(x), np.int64), K).query(imgs(1))


def test_rate_limit_spaces_requests():
    now = [0.0]
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    t = from_callable(Recorder(), K, max_batch=1, rate_limit=4.0, sleep=sleep, clock=lambda: now[0])
    t.query(imgs(3))
    assert sleeps == [0.25, 0.25] and t.wait_seconds == 0.5


def test_nan_and_malformed_answers_are_per_call_errors():
    def nan_for_second(x):
        out = np.zeros((len(x), K), np.float32)
        out[1:, 3] = np.nan
        return out

    t = from_callable(nan_for_second, K)
    with pytest.raises(TargetError, match="NaN or infinite scores for 1 of 2"):
        t.query(imgs(2))
    assert t.queries == 2  # it was evaluated
    assert t.query(imgs(1)).labels.tolist() == [0]  # the next call works
    inf = from_callable(lambda x: np.full((len(x), K), np.inf, np.float32), K)
    with pytest.raises(TargetError, match="NaN or infinite"):
        inf.query(imgs(1))
    with pytest.raises(TargetError, match="answered 1 rows for 2"):
        from_callable(lambda x: np.zeros((1, K)), K).query(imgs(2))
    with pytest.raises(TargetError, match="label 12"):
        from_callable(lambda x: np.full(len(x), 12), K, output="label").query(imgs(2))
    with pytest.raises(TargetError, match="non-numeric"):
        from_callable(lambda x: [["a"] * K] * len(x), K).query(imgs(1))


def test_wrong_output_size_is_a_model_error_at_load(tmp_path, monkeypatch):
    (tmp_path / "user_model.py").write_text(
        "import numpy as np\n"
        "def eleven(x):\n    return np.zeros((len(x), 11), np.float32)\n"
        "def ten(x):\n    return np.ones((len(x), 10), np.float32) * np.arange(10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="11 scores per image but the data set has 10"):
        load_blackbox("python:user_model:eleven", K, input_shape=(1, 4, 4))
    t = load_blackbox("python:user_model:ten", K, input_shape=(1, 4, 4))
    assert t.uncounted == 1 and t.queries == 0  # the load-time probe is not a query
    assert t.query(imgs(2)).labels.tolist() == [9, 9]
    t = load_blackbox(f"python:{tmp_path / 'user_model.py'}:ten", K)  # a file path works too
    assert t.query(imgs(1)).labels.tolist() == [9]
    with pytest.raises(ModelError, match="11 scores"):  # no input shape: caught at the first call
        load_blackbox("python:user_model:eleven", K).query(imgs(1))
    with pytest.raises(ModelError, match="has no 'nope'"):
        load_blackbox("python:user_model:nope", K)
    with pytest.raises(ModelError, match="cannot import"):
        load_blackbox("python:no_such_module_xyz:f", K)
    with pytest.raises(ModelError, match="takes images of shape"):
        load_blackbox("python:user_model:ten", K, input_shape=(3, 4, 4)).query(imgs(1))
    with pytest.raises(ValueError, match="within"):
        from_callable(Recorder(), K).query(imgs(1) + 1)


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return Normalized(SmallCNN(K), (0.5,), (0.5,)).eval()


def test_whitebox_spec_as_black_box(small_cnn, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(small_cnn.model.state_dict(), path)
    t = load_blackbox(f"small_cnn:{path}", K, max_batch=4)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        ref = small_cnn(x)
    a = t.query(x, torch.arange(5))
    assert torch.allclose(a.scores, ref, atol=1e-6) and t.queries == 5 and t.uncounted == 1
    with pytest.raises(ModelError):
        load_blackbox(f"small_cnn:{path}", 7)  # the checkpoint has 10 classes
    m = from_module(small_cnn, K, output="label")
    assert m.query(x).scores is None and torch.equal(m.query(x).labels, ref.argmax(1))


def test_onnx_export_round_trip(small_cnn, tmp_path):
    pytest.importorskip("onnxruntime")
    from flipback.targets.export import export_onnx
    path = export_onnx(small_cnn, tmp_path / "m.onnx", (1, 28, 28))
    t = load_blackbox(str(path), K)
    assert t.input_shape == (1, 28, 28)
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        ref = small_cnn(x)
    a = t.query(x)
    assert (a.scores - ref).abs().max() <= 1e-4 and torch.equal(a.labels, ref.argmax(1))
    assert t.queries == 6
    assert load_blackbox(str(path), K, output="label").query(x).scores is None
    with pytest.raises(ModelError, match="10 scores per image but the data set has 12"):
        load_blackbox(str(path), 12)
    with pytest.raises(ModelError, match="takes images of shape"):
        t.query(torch.rand(1, 3, 28, 28))
    with pytest.raises(ModelError, match="the data set's are"):  # checked at load against the data's shape
        load_blackbox(str(path), K, input_shape=(3, 32, 32))

    weights = tmp_path / "w.pt"  # a zoo SPEC exports too, fixed batch of one here
    torch.save(small_cnn.model.state_dict(), weights)
    fixed = export_onnx(f"small_cnn:{weights}", tmp_path / "fixed.onnx", dynamic_batch=False, num_classes=K)
    tf = load_blackbox(str(fixed), K)
    assert tf.batch_size == 1
    assert torch.allclose(tf.query(x[:3]).scores, ref[:3], atol=1e-4) and tf.requests == 3
    with pytest.raises(ModelError, match="number of classes"):
        export_onnx(f"small_cnn:{weights}", tmp_path / "x.onnx")


def test_unknown_specs_and_options():
    with pytest.raises(ModelError, match="cannot understand model spec"):
        load_blackbox("what/is/this", K)
    with pytest.raises(ModelError, match="ONNX file not found"):
        load_blackbox("missing.onnx", K)
    with pytest.raises(ModelError, match="unknown output mode"):
        from_callable(Recorder(), K, output="probs")
    with pytest.raises(ModelError, match="no credentials in the server URL"):
        load_blackbox("http://user:pw@127.0.0.1:1/v2/models/m", K)
    assert isinstance(from_callable(Recorder(), K), BlackBoxTarget)
