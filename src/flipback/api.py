"""The Python API, as small as the CLI:

    import flipback
    fixes = flipback.explain(model, images, labels, class_names=names)   # one per error
    fixes[0].regions, fixes[0].l2, fixes[0].figure("fix.png")

In a notebook, a `Correction` displays itself as its figure.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .attacks import make_attack
from .explain import Explanation, explain_changes, save_figure
from .runs.memory import plan
from .targets import WhiteBoxTarget, load_model
from .targets.device import resolve_device


@dataclass
class Correction:
    """One misclassified image, its verified correction and the explanation of the change."""

    index: int  # position in the images given to `explain`
    original: np.ndarray  # (H, W, C) in [0, 1]
    corrected: np.ndarray  # (H, W, C) in [0, 1]
    true_label: int
    predicted: int  # the model's answer on the original
    predicted_after: int  # the model's answer on the corrected image
    success: bool
    queries: int
    explanation: Explanation
    class_names: Sequence[str] | None = None

    @property
    def regions(self):
        return self.explanation.regions

    @property
    def l2(self) -> float:
        return self.explanation.l2

    def figure(self, path: str | Path | None = None):
        """Save the 4-panel figure to `path` and return the path; without a path, return PNG bytes."""
        if path is not None:
            return self._save(Path(path))
        with tempfile.TemporaryDirectory() as tmp:
            return self._save(Path(tmp) / "figure.png").read_bytes()

    def _save(self, path: Path) -> Path:
        return save_figure(path, self.original, self.corrected, self.explanation, class_names=self.class_names,
                           true_label=self.true_label, pred_before=self.predicted, pred_after=self.predicted_after)

    def _repr_png_(self) -> bytes:  # Jupyter shows the figure
        return self.figure()


def _as_nchw(images) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # a writable copy
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N,C,H,W) or (N,H,W,C), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("float images must be in [0, 1]")
    return x.contiguous()


def explain(model, images, labels, *, method: str = "minimal", pixels: str = "uint8",
            class_names: Sequence[str] | None = None, num_classes: int | None = None,
            batch_size: int = 256, device: str = "auto", max_memory: str | int | None = None,
            **options) -> list[Correction]:
    """Correct and explain every image that `model` gets wrong.

    model: a torch module taking [0,1] NCHW pixels (normalization inside), or a SPEC string
    such as "cifar_resnet20:weights.th". images: (N,C,H,W) or (N,H,W,C), uint8 or floats in
    [0,1]. Returns one `Correction` per misclassified image, in order.

    device: "auto" (CUDA when there is one), "cpu", "cuda", "cuda:N" or "mps"; the model runs
    there and the 8-bit candidates are verified there, in float32. max_memory: a cap such as
    "8G" that sizes the batches (at most `batch_size`; default 80% of the free memory); a cap
    that cannot hold one image raises `flipback.runs.memory.MemoryLimitError`.
    """
    dev = resolve_device(device)
    x = _as_nchw(images)
    y = torch.as_tensor(np.asarray(labels)).long()
    k = num_classes or (len(class_names) if class_names else None)
    if isinstance(model, str):
        if not k and model.startswith("hf:"):  # the model knows its classes: labels are its indices
            from .targets.hub import hf_input
            k = hf_input(model[len("hf:"):]).num_classes
        model = load_model(model, k or int(y.max()) + 1).module
    if not k:
        with torch.no_grad():
            k = int(model.to(dev)(x[:1].to(dev)).shape[1])
    target = WhiteBoxTarget(model, k, dev)  # the model runs on `dev`, and the attack's tensors live there
    attack = make_attack(method, pixels=pixels, **options)
    batch_size = plan(target.module, method, tuple(x.shape[1:]), dev, max_memory=max_memory,
                      batch_size=batch_size, options=options).batch_size
    out: list[Correction] = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        before = target.predict(xb, counted=False).argmax(1).cpu()
        wrong = (before != yb).nonzero().squeeze(1)
        if len(wrong) == 0:
            continue
        r = attack.run(target, target, xb[wrong], yb[wrong], start + wrong)
        after = r.answered().cpu()
        originals = xb[wrong].permute(0, 2, 3, 1).numpy()
        corrected = r.corrected.cpu().permute(0, 2, 3, 1).numpy()
        for j, e in enumerate(explain_changes(originals, corrected)):
            out.append(Correction(start + int(wrong[j]), originals[j], corrected[j], int(yb[wrong[j]]),
                                  int(before[wrong[j]]), int(after[j]), bool(r.success[j]), int(r.queries[j]), e,
                                  class_names))
    return out
