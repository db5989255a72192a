"""The durable per-image result store of a run: SQLite in WAL mode, one row per image,
committed as each batch finishes, so a killed run resumes where it stopped.

The run's configuration is stored with it; opening the folder with another
configuration is refused, so results of different runs are never mixed.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from ..errors import RunError, SettingsChanged
from .record import ImageRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    idx INTEGER PRIMARY KEY,      -- index of the image in the data set
    record TEXT NOT NULL,         -- JSON: labels, queries, norms, regions, ...
    corrected BLOB,               -- the corrected image, uint8 or float32 bytes (H, W, C)
    dtype TEXT,
    original BLOB                 -- the unmodified image, uint8 bytes (H, W, C)
);
CREATE TABLE IF NOT EXISTS timing (id INTEGER PRIMARY KEY AUTOINCREMENT, seconds REAL NOT NULL, n INTEGER NOT NULL);
-- queries spent on images of a batch that a stopped run could not finish (their budgets hold on resume)
CREATE TABLE IF NOT EXISTS unfinished (idx INTEGER PRIMARY KEY, queries INTEGER NOT NULL);
"""


class RunStore:
    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    @classmethod
    def open(cls, run_dir: Path, config: dict, *, resume: bool = True) -> "RunStore":
        """Open or create the store; refuse a folder that holds a run with another config."""
        run_dir.mkdir(parents=True, exist_ok=True)
        store = cls(run_dir / "results.sqlite")
        stored = store.config()
        wanted = json.loads(json.dumps(config))  # normalise tuples, paths
        if stored and stored != wanted:
            diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            store.close()
            raise SettingsChanged(
                f"{run_dir} holds a run with other settings ({', '.join(diff)} differ)",
                hint="use another --out folder, or delete that one to start over",
            )
        if stored and not resume:
            store.close()
            raise RunError(f"{run_dir} already holds this run", hint="drop --no-resume to resume it")
        if not stored:
            with store.db:
                store.db.executemany("INSERT INTO config VALUES (?, ?)",
                                     [(k, json.dumps(v)) for k, v in wanted.items()])
        return store

    def config(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM config")}

    def done(self) -> set[int]:
        """Images with a final result. One recorded with `retry` (the target was unavailable when
        it was explained) is not final: a resumed run explains it again."""
        return {row[0] for row in self.db.execute(
            "SELECT idx FROM results WHERE COALESCE(json_extract(record, '$.retry'), 0) != 1")}

    def to_retry(self) -> dict[int, int]:
        """{image index: queries it has spent} of the images to explain again."""
        return {int(i): int(q or 0) for i, q in self.db.execute(
            "SELECT idx, json_extract(record, '$.queries') FROM results WHERE json_extract(record, '$.retry') = 1")}

    def add(self, records: list[ImageRecord], corrected: np.ndarray, originals: np.ndarray, seconds: float) -> None:
        """Store one finished batch atomically: its rows, images, and the time it took.
        `corrected` is uint8 or float32 (N, H, W, C); `originals` is uint8 (N, H, W, C)."""
        rows = []
        for i, rec in enumerate(records):
            img = np.ascontiguousarray(corrected[i])
            rows.append((int(rec.index), json.dumps(rec.to_dict()), img.tobytes(),
                         f"{img.dtype.str}:{','.join(map(str, img.shape))}",
                         np.ascontiguousarray(originals[i], dtype=np.uint8).tobytes()))
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", rows)
            self.db.executemany("DELETE FROM unfinished WHERE idx = ?", [(r[0],) for r in rows])
            self.db.execute("INSERT INTO timing (seconds, n) VALUES (?, ?)", (seconds, len(records)))

    def set_unfinished(self, spent: dict[int, int]) -> None:
        """Record the queries spent so far on images left without a result (a clean stop)."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO unfinished VALUES (?, ?)",
                                [(int(i), int(q)) for i, q in spent.items()])

    def unfinished(self) -> dict[int, int]:
        return {int(i): int(q) for i, q in self.db.execute("SELECT idx, queries FROM unfinished")}

    def records(self) -> list[ImageRecord]:
        """Every stored record, migrated to the current schema."""
        return [ImageRecord.from_dict(json.loads(r)) for (r,) in self.db.execute("SELECT record FROM results ORDER BY idx")]

    def images(self, idx: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(original uint8, corrected uint8-or-float32), each (H, W, C), or None if not stored."""
        row = self.db.execute("SELECT original, corrected, dtype FROM results WHERE idx = ?", (idx,)).fetchone()
        if row is None:
            return None
        dtype, shape = row[2].split(":")
        shape = tuple(int(s) for s in shape.split(","))
        return (np.frombuffer(row[0], dtype=np.uint8).reshape(shape),
                np.frombuffer(row[1], dtype=np.dtype(dtype)).reshape(shape))

    def seconds(self) -> float:
        return float(self.db.execute("SELECT COALESCE(SUM(seconds), 0) FROM timing").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
