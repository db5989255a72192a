"""`flipback demo`: Fashion-MNIST from Debian's package, a small CNN trained once and
cached, and a report of its test-set errors."""

from __future__ import annotations

from pathlib import Path

from ..data import fashion_mnist_dir, load_dataset
from ..errors import DataError
from .explain_run import ExplainConfig, run_explain
from .train import model_cache_dir, train_small_cnn


def run_demo(*, data: str | None, out_dir: Path, method: str = "minimal", limit: int | None = None,
             show_progress: bool = True, log=print) -> dict:
    root = Path(data) if data else fashion_mnist_dir()
    if root is None or not root.exists():
        raise DataError(
            "Fashion-MNIST was not found" + (f" at {root}" if root else ""),
            hint="install it with `apt-get install dataset-fashion-mnist` (or `make demo`), or pass --data FOLDER",
        )
    train = load_dataset(root, split="train", progress=show_progress)
    weights = model_cache_dir() / f"small_cnn-{train.fingerprint}.th"
    if weights.is_file():
        log(f"using the cached model {weights}")
    else:
        log(f"training small_cnn on {len(train)} images (once; cached at {weights})")
        train_small_cnn(train, weights, show_progress=show_progress)
    cfg = ExplainConfig(model=f"small_cnn:{weights}", data=str(root), split="test", method=method, limit=limit)
    return run_explain(cfg, out_dir, show_progress=show_progress, log=log)
