"""flipback: explain image misclassifications with the smallest verified change that makes
the model right. See README.md; the command line is `flipback --help`.

    flipback.explain(model, images, labels)            -> [Correction], one per error
    flipback.audit(module, train_images, train_labels, classes, originals=..., ...)
                                                       -> AuditResult: ranked suspect training images
    flipback.repair(train, test, RepairPlan(drop=...), model=SPEC) -> RepairResult: before/after
"""

from .api import Correction, explain
from .audit import AuditResult, Suspect, audit
from .runs.repair import RepairPlan, RepairResult, repair

__all__ = ["AuditResult", "Correction", "RepairPlan", "RepairResult", "Suspect", "audit", "explain", "repair"]
