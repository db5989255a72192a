"""Property-based tests of the loaders: random bytes and random shapes never crash a load.
Each input either loads (bad files skipped with a reason) or raises one clear DataError."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flipback.data import load_dataset
from flipback.errors import DataError

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(blobs=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_random_bytes_in_an_image_folder_are_skipped_or_refused(tmp_path_factory, blobs):
    root = tmp_path_factory.mktemp("folder")
    (root / "a").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "a" / "good.png")
    for i, blob in enumerate(blobs):
        (root / "a" / f"bad{i}.{('png', 'jpg')[i % 2]}").write_bytes(blob)
    ds = load_dataset(root, cache_dir=tmp_path_factory.mktemp("cache"))
    # The good image always loads; every random blob is either a valid image or skipped with a reason.
    assert len(ds) + len(ds.skipped) == len(blobs) + 1
    assert "a/good.png" in ds.names
    assert all(s.reason for s in ds.skipped)


@SETTINGS
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=5),
       n_labels=st.integers(0, 6), dtype=st.sampled_from(["uint8", "float32", "int64", "float64"]))
def test_random_npz_shapes_load_or_raise_a_data_error(tmp_path_factory, shape, n_labels, dtype):
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    rng = np.random.default_rng(0)
    images = (rng.random(shape) * (255 if dtype in ("uint8", "int64") else 1)).astype(dtype)
    np.savez(path, images=images, labels=rng.integers(0, 3, n_labels))
    try:
        ds = load_dataset(path)
    except DataError as exc:
        assert str(exc)
    else:
        assert ds.images.dtype == np.uint8 and ds.images.ndim == 4 and len(ds) == len(ds.labels) == n_labels
