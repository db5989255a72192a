"""Do two explain runs give the same per-image results? (in process against over HTTP)

    python benchmarks/same_results.py RUN_A RUN_B

Compares each image's record (success, queries, answers, L2, ...) and its original and
corrected images, as the run store reads them, in the two run folders. Prints the count of
identical images and exits 1 if any differ.
"""

import sys
from pathlib import Path

import numpy as np

from flipback.store import RunStore


def results(run_dir: str) -> dict:
    store = RunStore(Path(run_dir) / "results.sqlite")
    try:
        return {r["index"]: (r, store.images(r["index"])) for r in store.records()}
    finally:
        store.close()


def same(a, b) -> bool:
    return b is not None and a[0] == b[0] and all(np.array_equal(x, y) and x.dtype == y.dtype
                                                  for x, y in zip(a[1], b[1]))


if __name__ == "__main__":
    a, b = results(sys.argv[1]), results(sys.argv[2])
    n_same = sum(1 for k in a if same(a[k], b.get(k)))
    print(f"{n_same} of {len(a)} images identical ({len(b)} in the second run)")
    sys.exit(0 if n_same == len(a) == len(b) else 1)
