"""Match a data set's class names to a model's labels, so a folder may hold a subset of them.

The model's labels come from the model (a Hugging Face `id2label`), from `--classes FILE` (one
name a line, in the model's output order), or, for folders named by ImageNet synsets
(`n01440764`, ...), from the standard 1,000-class order shipped in `imagenet_synsets.txt`.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from flipback.data.dataset import Dataset
from flipback.data.fingerprint import of_json
from flipback.errors import DataError

_SYNSET = re.compile(r"n\d{8}")


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(synsets, names): the ImageNet-1k classes in the standard order, and their WordNet lemmas."""
    text = resources.files("flipback.data").joinpath("imagenet_synsets.txt").read_text()
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


def read_class_file(path: str | os.PathLike) -> list[str]:
    """Class names, one a line, in the model's output order (blank lines are skipped)."""
    p = Path(path).expanduser()
    try:
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the class file {path}: {e}",
                        hint="give a UTF-8 text file with one class name a line, in the model's order") from None
    names = [n for n in names if n]
    if not names:
        raise DataError(f"the class file {path} names no classes", hint="one class name a line, in the model's order")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"the class file {path} names a class twice: {', '.join(dupes[:5])}")
    return names


def is_placeholder(names) -> bool:
    """Hugging Face's default labels (LABEL_0, LABEL_1, ...) name nothing."""
    return all(re.fullmatch(r"LABEL_\d+", str(n)) for n in names)


def _index(model_classes: list[str]) -> dict[str, int]:
    """Each label, and each of its comma-separated synonyms ("tench, Tinca tinca"), lower-cased,
    to its index; a synonym shared by two labels points at neither."""
    out: dict[str, int] = {}
    shared: set[str] = set()
    for i, name in enumerate(model_classes):
        keys = {name.strip().lower()} | {part.strip().lower() for part in name.split(",") if part.strip()}
        for k in keys:
            if k in out and out[k] != i:
                shared.add(k)
            out.setdefault(k, i)
    for k in shared:
        out.pop(k, None)
    for i, name in enumerate(model_classes):  # a whole label always names its own class
        out[name.strip().lower()] = i
    return out


def match_classes(ds: Dataset, model_classes: list[str] | None, *, source: str = "the model") -> Dataset:
    """The data set with its labels renumbered to the model's classes.

    Folders named by ImageNet synsets take the standard 1,000-class order (when the model has
    1,000 classes or names none). Classes named 0, 1, ... are the model's indices. Otherwise, with
    `model_classes`, each data class must name one
    of them (exactly, or case-insensitively, or one of a label's comma-separated synonyms);
    names that match nothing raise one DataError that lists them. Without `model_classes`,
    the data set is returned as it is (its classes in sorted folder order)."""
    names = list(ds.classes)
    synsets, lemmas = imagenet_synsets()
    if names and all(_SYNSET.fullmatch(n) for n in names) and \
            (model_classes is None or len(model_classes) == len(synsets)):
        where = {s: i for i, s in enumerate(synsets)}
        unknown = [n for n in names if n not in where]
        if unknown:
            raise DataError(f"{len(unknown)} folder name(s) look like ImageNet synsets but are not among the "
                            f"1,000 classes of ImageNet-1k: {', '.join(unknown[:20])}",
                            hint="give the model's class names with --classes FILE (one a line, in its order)")
        return _renumber(ds, [where[n] for n in names], list(model_classes or lemmas), "imagenet-synsets")
    if model_classes is None or names == list(model_classes):
        return ds
    if names == [str(i) for i in range(len(names))] and len(names) <= len(model_classes):
        # Numbered classes (a .npz without `classes`, digits) are the model's indices already.
        return _renumber(ds, list(range(len(names))), list(model_classes), source)
    index = _index(list(model_classes))
    mapping = [index.get(n.strip().lower()) for n in names]
    unknown = [n for n, m in zip(names, mapping) if m is None]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        some = ", ".join(repr(n) for n in list(model_classes)[:5])
        raise DataError(f"{len(unknown)} of the data set's {len(names)} classes match none of the "
                        f"{len(model_classes)} classes of {source}: {shown}",
                        hint=f"rename the folders to the model's labels (e.g. {some}, ...), or give the model's "
                             "class names with --classes FILE (one a line, in its order)")
    taken: dict[int, str] = {}
    for n, m in zip(names, mapping):
        if m in taken:
            raise DataError(f"the data set's classes {taken[m]!r} and {n!r} both match the model's class "
                            f"{model_classes[m]!r}", hint="merge the two folders, or rename one")
        taken[m] = n
    return _renumber(ds, mapping, list(model_classes), source)


def _renumber(ds: Dataset, mapping: list[int], classes: list[str], source: str) -> Dataset:
    labels = np.asarray(mapping, dtype=np.int64)[ds.labels]
    fp = of_json({"parent": ds.fingerprint, "classes": classes, "mapping": mapping})
    return Dataset(ds.images, labels, classes, ds.names, skipped=ds.skipped, source=ds.source, fingerprint=fp)
