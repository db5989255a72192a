"""Black-box targets against a real Open Inference Protocol server (KServe's model server) on
loopback, directly and through a fault-injecting proxy; and a server killed and restarted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

# Plain imports: the test extra installs kserve, and onnxruntime and tritonclient are core
# dependencies, so a missing one fails the suite instead of silently skipping these tests.
import kserve  # noqa: F401
import onnxruntime  # noqa: F401
import tritonclient.http  # noqa: F401

from servers.kserve_process import ServerProcess  # noqa: E402

from flipback.errors import ModelError  # noqa: E402
from flipback.targets.blackbox import BudgetExceeded, TargetError, load_blackbox  # noqa: E402
from flipback.targets.export import export_onnx  # noqa: E402
from flipback.targets.zoo import Normalized, SmallCNN  # noqa: E402

K = 10
FAST = dict(backoff=0.05, max_backoff=0.2, timeout=5.0)  # quick retries for tests


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    torch.manual_seed(0)
    module = Normalized(SmallCNN(K), (0.5,), (0.5,)).eval()
    return export_onnx(module, tmp_path_factory.mktemp("model") / "small.onnx", (1, 28, 28))


@pytest.fixture(scope="module")
def server(onnx_model, tmp_path_factory):
    spec = str(onnx_model)
    srv = ServerProcess(["--model", f"cnn={spec}", "--model", f"cnn_u8={spec}", "--uint8", "cnn_u8",
                         "--model", f"cnn_labels={spec}", "--labels", "cnn_labels", "--num-classes", str(K),
                         "--model", f"nan=python:{Path(__file__).parent / 'servers' / 'nan_model.py'}:predict",
                         "--input-shape", "1,28,28"],
                        tmp_path_factory.mktemp("server") / "server.log")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def local(onnx_model):
    """The same model in process: the reference answers."""
    return load_blackbox(str(onnx_model), K, max_batch=4)


def images(n, seed=0, grid=False):
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return torch.round(x * 255) / 255 if grid else x


def test_answers_match_in_process_model_exactly(server, local):
    x = images(10)
    target = load_blackbox(server.url("cnn"), K, max_batch=4)
    ids = torch.arange(100, 110)
    got = target.query(x, ids)
    ref = local.query(x)
    assert torch.equal(got.scores, ref.scores)
    assert torch.equal(got.labels, ref.labels)
    assert target.queries == 10 and target.requests == 3
    assert target.queries_for(ids).tolist() == [1] * 10
    assert target.input_shape == (1, 28, 28)
    target.close()
    as_json = load_blackbox(server.url("cnn") + "?encoding=json", K, max_batch=4)  # JSON tensors: exact too
    assert torch.equal(as_json.query(x).scores, ref.scores)


def test_hard_label_and_uint8_models(server, local):
    x = images(6, grid=True)
    ref = local.query(x)
    labels_only = load_blackbox(server.url("cnn_labels"), K, output="label")
    ans = labels_only.query(x)
    assert ans.scores is None and torch.equal(ans.labels, ref.labels)
    with pytest.raises(ModelError, match="only top-1 labels"):
        load_blackbox(server.url("cnn_labels"), K, output="scores")
    # hard-label mode on a scores model hides the scores
    assert load_blackbox(server.url("cnn"), K, output="label").query(x).scores is None

    u8 = load_blackbox(server.url("cnn_u8"), K, max_batch=4)
    assert torch.equal(u8.query(x).scores, ref.scores)  # 8-bit images reach the model unchanged
    with pytest.raises(TargetError, match="8-bit"):
        u8.query(images(2))  # off-grid candidates cannot be sent as UINT8
    assert u8.queries == 6  # the refused call was not sent, so not counted


def test_load_time_checks(server):
    with pytest.raises(ModelError, match="11 classes"):
        load_blackbox(server.url("cnn"), 11)
    with pytest.raises(ModelError, match="the data set's are"):
        load_blackbox(server.url("cnn"), K, input_shape=(3, 32, 32))
    with pytest.raises(ModelError, match="no such model"):
        load_blackbox(server.url("nope"), K)
    dead = ServerProcess([], server.log)  # a free port where nothing listens
    with pytest.raises(ModelError, match="cannot be reached"):
        load_blackbox(dead.url("cnn"), K, retries=1, backoff=0.01)
    with pytest.raises(ModelError, match="/v2/models/NAME"):
        load_blackbox(f"{server.base}/v1/models/cnn", K)


def test_not_ready_server_is_refused_at_load(proxy):
    proxy.ready = False
    with pytest.raises(ModelError, match="not ready"):
        load_blackbox(proxy.url("cnn"), K, retries=1, backoff=0.01)


@pytest.mark.parametrize("schedule, attempts_counted, waits", [
    (["500", "500"], 3, False),  # the server evaluated the failed attempts: they count
    (["429:0.3", "429:0.3"], 1, True),  # 429: not evaluated, Retry-After honoured
    (["503:0.2"], 2, True),  # 5xx may have been evaluated: counts (its Retry-After is honoured)
    (["hang:6"], 2, False),  # a timeout may have been evaluated: counts
    (["drop"], 2, False),
])
def test_faults_end_in_correct_answers_after_retries(proxy, local, schedule, attempts_counted, waits):
    x = images(5, seed=1)
    timeout = 1.5 if schedule[0].startswith("hang") else 10.0
    target = load_blackbox(proxy.url("cnn"), K, retries=3, max_batch=8, **{**FAST, "timeout": timeout})
    proxy.set_schedule(schedule)
    t0 = time.monotonic()
    ans = target.query(x, torch.arange(5))
    assert torch.equal(ans.scores, local.query(x).scores)
    assert target.queries == attempts_counted * 5
    assert target.queries_for(torch.arange(5)).tolist() == [attempts_counted] * 5
    assert target.queries >= proxy.evaluated  # counts never miss a real evaluation
    if schedule[0].startswith("hang"):
        assert proxy.evaluated == 5
    if waits:
        assert target.wait_seconds >= 0.2 * len(schedule) - 1e-6
        assert time.monotonic() - t0 >= 0.2 * len(schedule)


def test_garbage_answer_is_a_clear_error_and_counted(proxy):
    target = load_blackbox(proxy.url("cnn"), K, max_batch=2, **FAST)
    proxy.set_schedule(["ok", "garbage"])
    with pytest.raises(TargetError, match="malformed answer") as err:
        target.query(images(4), torch.arange(4))
    assert err.value.answered.tolist() == [True, True, False, False]
    assert (err.value.partial.labels[:2] >= 0).all() and (err.value.partial.labels[2:] == -1).all()
    assert target.queries == 4  # the garbage answer came from an evaluation


def test_nan_scores_from_the_server_are_a_per_call_error(server):
    target = load_blackbox(server.url("nan"), K, retries=3, **FAST)
    x = torch.zeros(3, 1, 28, 28)
    assert target.query(x).labels.tolist() == [0, 0, 0]
    x[1, 0, 0, 0] = 1.0
    with pytest.raises(TargetError, match="NaN or infinite scores for 1 of 3"):
        target.query(x)
    assert target.queries == 6 and target.requests == 2  # evaluated, so counted; not retried


def test_retries_exhausted_and_budgets_never_exceeded(proxy):
    target = load_blackbox(proxy.url("cnn"), K, retries=2, **FAST)
    proxy.set_schedule(["500"] * 10)
    with pytest.raises(TargetError, match="failed 3 times"):
        target.query(images(3))
    assert target.queries == 9 and proxy.evaluated == 9

    # total budget: two failed attempts spend it; the third is not sent
    budgeted = load_blackbox(proxy.url("cnn"), K, retries=5, budget=8, **FAST)
    proxy.set_schedule(["500"] * 10)
    with pytest.raises(BudgetExceeded) as err:
        budgeted.query(images(4))
    assert err.value.kind == "total"
    assert budgeted.queries == 8 and proxy.evaluated == 8 and len(proxy.requests) == 2

    # per-image budget, with retries
    per_image = load_blackbox(proxy.url("cnn"), K, retries=5, per_image_budget=3, **FAST)
    ids = torch.tensor([7, 8])
    proxy.set_schedule(["500", "500"])
    per_image.query(images(2), ids)  # 3 attempts: exactly the budget
    assert per_image.queries_for(ids).tolist() == [3, 3]
    proxy.set_schedule([])
    with pytest.raises(BudgetExceeded) as err:
        per_image.query(images(1), ids[:1])
    assert err.value.kind == "per_image" and err.value.ids.tolist() == [7]
    assert per_image.queries == 6 and proxy.requests == []  # nothing was sent


def test_long_retry_after_is_an_error(proxy):
    target = load_blackbox(proxy.url("cnn"), K, max_retry_after=1.0, **FAST)
    proxy.set_schedule(["429:120"])
    with pytest.raises(TargetError, match="wait 120 s"):
        target.query(images(1))
    assert target.queries == 0


def test_batches_split_to_max_batch_and_413(proxy, local):
    x = images(7, seed=2)
    target = load_blackbox(proxy.url("cnn"), K, max_batch=3, **FAST)
    proxy.set_schedule([])
    assert torch.equal(target.query(x).labels, local.query(x).labels)
    assert [n for _, n in proxy.requests] == [3, 3, 1]
    # a server that refuses a batch as too large gets halves, and nothing is counted for the refusal
    proxy.set_schedule(["413"])
    assert torch.equal(target.query(x[:2]).labels, local.query(x[:2]).labels)
    assert [n for _, n in proxy.requests] == [2, 1, 1]
    assert target.queries == 9


def test_rate_limit(proxy):
    target = load_blackbox(proxy.url("cnn"), K, max_batch=1, rate_limit=25.0, **FAST)
    proxy.set_schedule([])
    t0 = time.monotonic()
    target.query(images(6))
    assert time.monotonic() - t0 >= 5 / 25.0 - 0.01
    assert target.requests == 6


def test_bearer_token_from_env_and_file_never_shown(proxy, monkeypatch, tmp_path):
    secret = "s3cr3t-token-value"
    proxy.token = secret
    monkeypatch.delenv("FLIPBACK_SERVER_TOKEN", raising=False)
    monkeypatch.delenv("FLIPBACK_SERVER_TOKEN_FILE", raising=False)
    with pytest.raises(ModelError, match="refused the credentials") as err:
        load_blackbox(proxy.url("cnn"), K, **FAST)
    assert secret not in str(err.value)

    monkeypatch.setenv("FLIPBACK_SERVER_TOKEN", "wrong")
    with pytest.raises(ModelError, match="refused the credentials") as err:
        load_blackbox(proxy.url("cnn"), K, **FAST)
    assert "wrong" not in str(err.value)

    monkeypatch.delenv("FLIPBACK_SERVER_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    monkeypatch.setenv("FLIPBACK_SERVER_TOKEN_FILE", str(token_file))
    target = load_blackbox(proxy.url("cnn"), K, retries=0, **FAST)
    assert target.query(images(2)).labels.shape == (2,)
    assert proxy.auth_seen[-1] == f"Bearer {secret}"
    proxy.set_schedule(["500"])
    with pytest.raises(TargetError) as err:
        target.query(images(1))
    assert secret not in str(err.value) and secret not in repr(target)

    monkeypatch.setenv("FLIPBACK_SERVER_TOKEN", secret)  # the variable wins over the file
    monkeypatch.setenv("FLIPBACK_SERVER_TOKEN_FILE", str(tmp_path / "missing"))
    assert load_blackbox(proxy.url("cnn"), K, **FAST).query(images(1)).labels.shape == (1,)


def test_server_killed_and_restarted_mid_sequence(onnx_model, local, tmp_path):
    spec = str(onnx_model)
    srv = ServerProcess(["--model", f"cnn={spec}", "--num-classes", str(K)], tmp_path / "server.log")
    try:
        srv.start()
        patient = load_blackbox(srv.url("cnn"), K, retries=60, backoff=0.1, max_backoff=0.5, timeout=5.0)
        impatient = load_blackbox(srv.url("cnn"), K, retries=1, backoff=0.05, timeout=2.0)
        x = images(4, seed=3)
        ids = torch.arange(4)
        assert torch.equal(patient.query(x[:2], ids[:2]).scores, local.query(x[:2]).scores)

        srv.kill()
        with pytest.raises(TargetError, match="cannot connect"):
            impatient.query(x)  # a dead server: a clear error, and nothing counted
        assert impatient.queries == 0

        srv.launch()  # restart on the same port; the patient target rides out the start-up
        ans = patient.query(x[2:], ids[2:])
        assert torch.equal(ans.scores, local.query(x[2:]).scores)
        assert patient.queries == 4  # refused connections are not counted
        assert patient.queries_for(ids).tolist() == [1, 1, 1, 1]
        assert patient.failed_attempts >= 1
    finally:
        srv.stop()
