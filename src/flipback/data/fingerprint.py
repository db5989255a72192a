"""Short content ids for data sets: the cache key, and the guard against mixing run folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_CHUNK = 1 << 20


def digest(h: "hashlib._Hash") -> str:
    return h.hexdigest()[:16]


def of_json(obj) -> str:
    """Fingerprint of a JSON-able description (e.g. a folder listing with sizes and mtimes)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return digest(hashlib.sha256(blob))


def of_files(paths: list[Path], extra: str = "") -> str:
    """Fingerprint of file contents; fine for single files up to a few hundred MB."""
    h = hashlib.sha256(extra.encode())
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
    return digest(h)
