"""Do two explain runs give the same per-image results? (in process against over HTTP)

    python benchmarks/same_results.py RUN_A RUN_B

Compares each image's record (success, queries, answers, L2, ...) and the bytes of its
original and corrected images in the two run folders' results.sqlite. Prints the count of
identical images and exits 1 if any differ.
"""

import json
import sqlite3
import sys


def results(run_dir: str) -> dict:
    db = sqlite3.connect(f"file:{run_dir}/results.sqlite?mode=ro", uri=True)
    out = {}
    for idx, record, corrected, dtype, original in db.execute("SELECT idx, record, corrected, dtype, original "
                                                             "FROM results"):
        out[idx] = (json.loads(record), corrected, dtype, original)
    return out


if __name__ == "__main__":
    a, b = results(sys.argv[1]), results(sys.argv[2])
    same = sum(1 for k in a if b.get(k) == a[k])
    print(f"{same} of {len(a)} images identical ({len(b)} in the second run)")
    sys.exit(0 if same == len(a) == len(b) else 1)
