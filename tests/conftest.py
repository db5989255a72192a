import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's ~/.cache/flipback."""
    monkeypatch.setenv("FLIPBACK_CACHE", str(tmp_path_factory.getbasetemp() / "flipback-cache"))
