"""Property-based tests (hypothesis) of the IDX loader and of label checks: random headers,
random payloads and random labels either load, with every bad row skipped with its reason, or
raise one clear DataError. (Image folders and .npz shapes: tests/test_data_properties.py.)"""

from __future__ import annotations

import gzip
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flipback.data import load_dataset
from flipback.errors import DataError

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(magic=st.sampled_from([2051, 2049, 0x0803, 0x0903, 0x0D03, 0]),
       dims=st.lists(st.integers(0, 6), min_size=3, max_size=3),
       extra=st.integers(-8, 8), labels=st.lists(st.integers(0, 255), max_size=8),
       gz=st.booleans(), raw_tail=st.binary(max_size=16))
def test_random_idx_files_load_or_raise_a_data_error(tmp_path_factory, magic, dims, extra, labels, gz, raw_tail):
    folder = tmp_path_factory.mktemp("idx")
    n, h, w = dims
    payload = np.random.default_rng(0).integers(0, 256, max(0, n * h * w + extra), dtype=np.uint8).tobytes()
    images = struct.pack(">IIII", magic, n, h, w) + payload + (raw_tail if extra > 0 else b"")
    label_bytes = struct.pack(">II", 2049, len(labels)) + bytes(labels)
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(folder / f"t10k-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(images)
    with opener(folder / f"t10k-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(label_bytes)
    try:
        ds = load_dataset(folder)
    except DataError as exc:
        assert exc.message
        return
    # It loaded: the header was right, and only rows with a label outside 0..9 were left out.
    assert len(ds) + len(ds.skipped) == n == len(labels)
    assert all(s.reason.startswith("label outside the class list") for s in ds.skipped)
    assert ds.labels.tolist() == [y for y in labels if y < 10]
    assert ds.images.shape == (len(ds), h, w, 1)


@SETTINGS
@given(labels=st.lists(st.one_of(st.integers(-3, 12), st.just(float("nan")), st.floats(-2, 12, width=32)),
                       min_size=1, max_size=10),
       n_classes=st.one_of(st.none(), st.integers(1, 10)))
def test_random_npz_labels_skip_rows_one_by_one_or_raise(tmp_path_factory, labels, n_classes):
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    arrays = {"images": np.zeros((len(labels), 3, 3), np.uint8), "labels": np.array(labels)}
    if n_classes is not None:
        arrays["classes"] = np.array([f"c{i}" for i in range(n_classes)])
    np.savez(path, **arrays)
    try:
        ds = load_dataset(path)
    except DataError as exc:
        assert exc.message
        return
    kept = [int(y) for y in labels if y == y and y >= 0 and (n_classes is None or y < n_classes)]
    assert ds.labels.tolist() == kept
    assert len(ds.skipped) == len(labels) - len(kept)
    assert all(s.reason.startswith(("missing label", "label outside the class list")) for s in ds.skipped)
