"""The audit: training images suspected of causing errors, ranked, each with a reason.

Two kinds of evidence, both from flipback's verified corrections:

- **cause**: the image is labelled p and carries a pattern that the corrections of
  validation errors sent to p keep removing (`causes.find_causes`). It is *verified* when
  covering the pattern moves the model's answer away from p; the new answer is the image's
  other likely class.
- **label**: the model disagrees with the image's label and the smallest change toward the
  label is at least the median one over all disagreements, or fails (`labels.label_evidence`).

One score per training image orders them all: verified causes (2 to 3, by match), then
disagreements (1 to 2, by the L2 of the change toward the label), then the rest (0 to 1: an unverified
match, or how little margin the model has for the label).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .causes import MATCH, Cause, best_match, cover, find_causes
from .labels import LabelEvidence, label_evidence

LABEL_RATIO = 1.0  # a disagreement whose correction is at least the median one


@dataclass
class Suspect:
    index: int  # position in the training data
    name: str
    label: int
    label_name: str
    reason: str  # "cause" or "label"
    score: float
    other: int  # the other likely class: the answer once the cause is covered, or the model's answer
    other_name: str
    verified: bool  # cause: covering it changed the answer; label: the model disagrees with the label
    box: tuple | None  # (y0, x0, y1, x1) of the cause in the image
    detail: str


@dataclass
class AuditResult:
    suspects: list[Suspect]  # highest score first
    causes: list[Cause]
    scores: np.ndarray  # (N,) one score per training image, as in the module's docstring
    labels: LabelEvidence | None = None
    stats: dict = field(default_factory=dict)

    def flagged(self, reason: str | None = None) -> np.ndarray:
        """Indices of the verified suspects (of one reason, or both)."""
        return np.array(sorted(s.index for s in self.suspects if s.verified and reason in (None, s.reason)),
                        dtype=np.int64)

    def to_csv(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["rank", "index", "name", "label", "reason", "score", "verified", "other", "box",
                             "detail"])
            for rank, s in enumerate(self.suspects, 1):
                writer.writerow([rank, s.index, s.name, s.label_name, s.reason, f"{s.score:.4f}", int(s.verified),
                                 s.other_name, " ".join(map(str, s.box)) if s.box else "", s.detail])
        return path


def _nchw(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.ascontiguousarray(images)).float() / 255).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def _answers(module, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    return torch.cat([module(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).numpy() if len(x) else \
        np.zeros(0, np.int64)


def _cause_suspects(module, images, labels, causes: Sequence[Cause], batch: int = 1024):
    """(ncc, other, boxes, verified) arrays for every training image, over all causes: the
    best match of a cause's pattern in images labelled with its class, the answer once the
    match is covered, the match's box, and whether that answer left the class."""
    n = len(labels)
    ncc = np.zeros(n)
    other = np.full(n, -1)
    verified = np.zeros(n, bool)
    boxes = np.zeros((n, 4), np.int64)
    for c in causes:
        template = torch.from_numpy(c.template)
        core = None if c.core is None else torch.from_numpy(c.core)
        for part in np.array_split(np.flatnonzero(labels == c.pred), max(1, -(-(labels == c.pred).sum() // batch))):
            if not len(part):
                continue
            x = _nchw(images[part])  # one chunk at a time: memory stays flat at any image size
            score, corner = best_match(x, template, core=core)
            better = score > ncc[part]
            hit = better & (score >= MATCH)
            answers = _answers(module, cover(x[hit], corner[hit], c.size))
            rows = part[better]
            ncc[rows] = score[better]
            boxes[rows] = np.concatenate([corner[better], corner[better] + c.size], 1)
            other[rows], verified[rows] = -1, False
            other[part[hit]] = answers
            verified[part[hit]] = answers != c.pred
    return ncc, other, boxes, verified


def audit(module: torch.nn.Module, train_images: np.ndarray, train_labels: np.ndarray, classes: Sequence[str], *,
          originals: np.ndarray, corrected: np.ndarray, true: np.ndarray, pred: np.ndarray,
          validation_images: np.ndarray, validation_pred: np.ndarray, names: Sequence[str] | None = None,
          labels: LabelEvidence | None = None, check_labels: bool = True, label_ratio: float = LABEL_RATIO,
          device: str = "cpu", advance=lambda n: None) -> AuditResult:
    """Audit the training data of `module` (which takes [0,1] pixels).

    originals/corrected/true/pred: the *corrected* validation errors (uint8 (N,H,W,C)) with
    their labels and the model's answers; validation_images/validation_pred: the whole
    validation split and the model's answers (how common a pattern is elsewhere).
    labels: label evidence computed elsewhere (out of fold); else, with `check_labels`,
    it is computed here with `module` itself."""
    module = module.to(device).eval()
    train_labels = np.asarray(train_labels, np.int64)
    n = len(train_labels)
    names = list(names) if names is not None else [str(i) for i in range(n)]
    causes = find_causes(originals, corrected, true, pred, validation_images, validation_pred)
    ncc, other, boxes, verified = _cause_suspects(module.cpu(), train_images, train_labels, causes)
    module.to(device)
    if labels is None and check_labels:
        labels = label_evidence(module, train_images, train_labels, len(classes), device=device, advance=advance)
    scores = np.where(ncc >= MATCH, ncc, 0.0)
    flagged_label = np.zeros(n, bool)
    if labels is not None:
        wrong = labels.predicted != train_labels
        flagged_label = wrong & (labels.relative >= label_ratio)
        ratio = np.clip(labels.score, 0, 1e6)
        scores = np.where(wrong, 1 + ratio / (1 + ratio), np.maximum(scores, 1 / (1 + np.exp(np.clip(-labels.score, -50, 50)))))
    scores = np.where(verified, 2 + ncc, scores)
    suspects: list[Suspect] = []
    for i in np.flatnonzero(verified | (ncc >= MATCH)):
        c = int(other[i])
        suspects.append(Suspect(int(i), names[i], int(train_labels[i]), str(classes[train_labels[i]]), "cause",
                                float(scores[i]), c, str(classes[c]) if c >= 0 else "", bool(verified[i]),
                                tuple(int(v) for v in boxes[i]),
                                f"carries the pattern removed by corrections of errors sent to "
                                f"'{classes[train_labels[i]]}' (match {ncc[i]:.2f}); covering it "
                                + (f"moves the answer to '{classes[c]}'" if verified[i] else "keeps the answer")))
    if labels is not None:
        for i in np.flatnonzero(flagged_label & ~verified):
            c = int(labels.predicted[i])
            how = ("no verified change reaches it" if not np.isfinite(labels.l2[i]) else
                   f"the change toward it is {labels.relative[i]:.1f}x the median one (L2 {labels.l2[i]:.3f})")
            suspects.append(Suspect(int(i), names[i], int(train_labels[i]), str(classes[train_labels[i]]), "label",
                                    float(scores[i]), c, str(classes[c]), True, None,
                                    f"the model answers '{classes[c]}' and {how}"))
    suspects.sort(key=lambda s: (-s.score, s.index))
    stats = {"n_train": n, "n_causes": len(causes), "cause_matches": int((ncc >= MATCH).sum()),
             "cause_verified": int(verified.sum()), "label_flagged": int(flagged_label.sum())}
    return AuditResult(suspects, causes, scores, labels, stats)


def suspect_dicts(result: AuditResult) -> list[dict]:
    return [asdict(s) for s in result.suspects]
