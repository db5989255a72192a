"""The model's eval transform at decode time, and matching a data set's classes to the model's."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flipback.data import load_dataset
from flipback.data.classes import imagenet_synsets, match_classes, read_class_file
from flipback.data.preprocess import Preprocess
from flipback.errors import DataError
from flipback.targets.loading import dataset_for_model, model_input

RNG = np.random.default_rng(0)


def _img(h, w, c=3):
    return RNG.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


def _folder(root, spec: dict[str, list[np.ndarray]]):
    for cls, images in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(images):
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


# ------------------------------------------------------------------ the transform


def test_resize_shorter_side_then_center_crop_as_torchvision_computes_it():
    pre = Preprocess.for_size(224, 224, crop_pct=0.875, interpolation="bicubic")
    assert pre.resize == 256
    src = Image.fromarray(_img(300, 500))
    # torchvision: the shorter side to 256, the longer to int(256 * 500 / 300) = 426, then
    # CenterCrop: top = round((256 - 224) / 2), left = round((426 - 224) / 2).
    want = src.resize((426, 256), Image.BICUBIC).crop((101, 16, 101 + 224, 16 + 224))
    assert np.array_equal(np.asarray(pre(src)), np.asarray(want))
    # Already the model's size, nothing to crop: the very same pixels.
    same = Image.fromarray(_img(32, 32))
    assert Preprocess.for_size(32, 32)(same) is same


def test_matches_hugging_face_processors_on_pillow():
    """The recipes of the Hugging Face processors (exact size; shortest edge then crop; ConvNeXt's
    crop_pct) give the pixels of transformers' own Pillow-backend processors."""
    import transformers as tf  # the test extra: required, never skipped
    from flipback.targets.hub import _hf_preprocess

    img = Image.fromarray(_img(90, 130))
    procs = [("ViTImageProcessorPil", dict(size={"height": 40, "width": 48}, resample=3)),
             ("BitImageProcessorPil", dict(size={"shortest_edge": 56}, crop_size={"height": 48, "width": 48})),
             ("ConvNextImageProcessorPil", dict(size={"shortest_edge": 48}, crop_pct=0.875, resample=2)),
             ("ConvNextImageProcessorPil", dict(size={"shortest_edge": 384}, crop_pct=0.875, resample=3))]
    for name, kwargs in procs:
        if not hasattr(tf, name):
            pytest.skip(f"this transformers has no {name}")
        proc = getattr(tf, name)(**kwargs)
        pre, _, _ = _hf_preprocess(proc.to_dict(), 3, "x")
        out = proc(img, do_normalize=False, do_rescale=False, return_tensors="np")["pixel_values"][0]
        ours = np.asarray(pre(img)).transpose(2, 0, 1)
        assert out.shape == ours.shape, (name, out.shape, ours.shape)
        assert np.abs(out.astype(np.float64) - ours).max() <= 1, name


def test_folder_of_any_size_and_aspect_ratio_decodes_at_the_model_size(tmp_path):
    root = _folder(tmp_path / "data", {"a": [_img(50, 80), _img(32, 32), _img(64, 20)],
                                       "b": [_img(40, 40, c=1), _img(7, 9)]})
    plain = load_dataset(root, cache_dir=tmp_path / "c")
    assert any("wrong size" in s.reason for s in plain.skipped)  # without a model: the old rule
    pre = Preprocess.for_size(32, 32, crop_pct=0.875, channels=3)
    ds = load_dataset(root, cache_dir=tmp_path / "c", transform=pre)
    assert len(ds) == 5 and ds.shape == (32, 32, 3) and not ds.skipped
    assert ds.fingerprint != plain.fingerprint  # the transform is part of the cache key
    i = ds.names.index("a/0.png")
    want = np.asarray(pre(Image.open(root / "a" / "0.png").convert("RGB")))
    assert np.array_equal(ds.images[i], want)
    g = ds.names.index("b/0.png")  # a gray image joins a colour model's set exactly
    assert (ds.images[g][..., 0] == ds.images[g][..., 1]).all()
    again = load_dataset(root, cache_dir=tmp_path / "c", transform=pre)
    assert again.fingerprint == ds.fingerprint and np.array_equal(np.asarray(again.images), np.asarray(ds.images))
    other = load_dataset(root, cache_dir=tmp_path / "c", transform=Preprocess.for_size(32, 32, channels=3))
    assert other.fingerprint != ds.fingerprint


def test_arrays_get_the_transform_and_stay_unchanged_when_it_is_a_no_op(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.stack([_img(28, 28, c=1)] * 4), labels=np.arange(4) % 2)
    ds = load_dataset(tmp_path / "d.npz")
    same = load_dataset(tmp_path / "d.npz", transform=Preprocess.for_size(28, 28, channels=1))
    assert same.fingerprint == ds.fingerprint
    pre = Preprocess.for_size(40, 40, channels=3)
    big = load_dataset(tmp_path / "d.npz", transform=pre, cache_dir=tmp_path / "c")
    assert big.shape == (40, 40, 3) and big.fingerprint != ds.fingerprint
    assert isinstance(big.images, np.memmap)  # written to the cache, never all in memory
    want = np.asarray(pre(Image.fromarray(ds.images[0][..., 0])).convert("RGB"))
    assert np.array_equal(big.images[0], want)
    again = load_dataset(tmp_path / "d.npz", transform=pre, cache_dir=tmp_path / "c")
    assert again.fingerprint == big.fingerprint and np.array_equal(np.asarray(again.images), np.asarray(big.images))


def test_zoo_models_give_their_input_size(tmp_path):
    pre = model_input("cifar_resnet20:whatever.th").preprocess
    assert (pre.height, pre.width, pre.channels) == (32, 32, 3)
    assert model_input("model.onnx").preprocess is None and model_input("http://h:1/v2/models/m").preprocess is None


# ------------------------------------------------------------------ class names


def test_imagenet_synset_folders_take_the_standard_order(tmp_path):
    synsets, names = imagenet_synsets()
    assert len(synsets) == 1000 and synsets[0] == "n01440764" and synsets[-1] == "n15075141"
    assert list(synsets) == sorted(synsets) and names[1].startswith("goldfish")
    root = _folder(tmp_path / "data", {"n01443537": [_img(8, 8)], "n01440764": [_img(8, 8)] * 2})
    ds = match_classes(load_dataset(root, cache_dir=tmp_path / "c"), None)
    assert ds.num_classes == 1000 and ds.classes[0].startswith("tench")
    assert sorted(ds.labels.tolist()) == [0, 0, 1]
    bad = _folder(tmp_path / "bad", {"n01440764": [_img(8, 8)], "n99999999": [_img(8, 8)]})
    with pytest.raises(DataError, match="n99999999"):
        match_classes(load_dataset(bad, cache_dir=tmp_path / "c"), None)


def test_model_labels_map_a_subset_folder_and_unknown_names_are_listed(tmp_path):
    model = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    root = _folder(tmp_path / "data", {"goldfish": [_img(8, 8)], "Great White Shark": [_img(8, 8)]})
    ds = match_classes(load_dataset(root, cache_dir=tmp_path / "c"), model)
    assert ds.classes == model and ds.num_classes == 3
    assert dict(zip(ds.names, ds.labels.tolist())) == {"goldfish/0.png": 1, "Great White Shark/0.png": 2}
    bad = _folder(tmp_path / "bad", {"goldfish": [_img(8, 8)], "zebra": [_img(8, 8)], "yak": [_img(8, 8)]})
    with pytest.raises(DataError) as info:
        match_classes(load_dataset(bad, cache_dir=tmp_path / "c"), model)
    assert "'yak', 'zebra'" in info.value.message and "2 of the data set's 3 classes" in info.value.message
    assert "--classes" in info.value.hint


def test_classes_file(tmp_path):
    (tmp_path / "names.txt").write_text("zero\none\n\ntwo\nthree\n")
    assert read_class_file(tmp_path / "names.txt") == ["zero", "one", "two", "three"]
    root = _folder(tmp_path / "data", {"three": [_img(8, 8)], "one": [_img(8, 8)]})
    ds = dataset_for_model("model.onnx", root, classes=str(tmp_path / "names.txt"), cache_dir=tmp_path / "c")
    assert ds.num_classes == 4 and dict(zip(ds.names, ds.labels.tolist())) == {"one/0.png": 1, "three/0.png": 3}
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(DataError, match="twice"):
        read_class_file(tmp_path / "dup.txt")
    with pytest.raises(DataError, match="match none"):
        dataset_for_model("model.onnx", _folder(tmp_path / "x", {"four": [_img(8, 8)]}),
                          classes=str(tmp_path / "names.txt"), cache_dir=tmp_path / "c")


def test_numbered_classes_are_the_model_indices(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.stack([_img(8, 8)] * 3), labels=np.array([0, 2, 1]))
    ds = match_classes(load_dataset(tmp_path / "d.npz"), ["cat", "dog", "bird", "fish"])
    assert ds.classes == ["cat", "dog", "bird", "fish"] and ds.labels.tolist() == [0, 2, 1]
