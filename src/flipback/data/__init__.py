"""Data set loading: image folders, MNIST/Fashion-MNIST IDX files and .npz arrays.

    ds = load_dataset(path, split="test", cache_dir=None, workers=None, progress=False, size=None,
                      transform=None)

Image folders are decoded once into a memory-mapped cache keyed by `ds.fingerprint`; `transform`
(preprocess.Preprocess, the model's eval transform) is applied then, and is part of the key.
classes.match_classes renumbers a data set's labels to a model's classes.
"""

from flipback.data.dataset import Dataset, SkippedItem
from flipback.data.idx import FASHION_MNIST_CLASSES, fashion_mnist_dir
from flipback.data.load import load_dataset, split_of

__all__ = ["load_dataset", "split_of", "Dataset", "SkippedItem", "fashion_mnist_dir", "FASHION_MNIST_CLASSES"]
