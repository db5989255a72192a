import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's ~/.cache/flipback."""
    monkeypatch.setenv("FLIPBACK_CACHE", str(tmp_path_factory.getbasetemp() / "flipback-cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests use tiny models: extra threads only contend for the two shared cores
    (one attack test ran 100x slower with two threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def proxy(server):
    """A fault-injecting proxy (tests/servers/fault_proxy.py) in front of the module's
    `server` fixture, a real model server process."""
    from servers.fault_proxy import FaultProxy

    p = FaultProxy(server.port)
    try:
        yield p
    finally:
        p.close()
