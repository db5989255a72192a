"""From explanations to a better data set: find the training images behind the errors.

The stage after the explanation: corrections of validation errors -> recurring causes and
label doubts -> ranked suspect training images (`audit`) -> a repaired model (`runs.repair`).
`fiftyone_export` (imported on use: FiftyOne is an extra) writes an audit as a FiftyOne dataset.
"""

from .causes import Cause, find_causes
from .labels import LabelEvidence, label_evidence
from .suspects import AuditResult, Suspect, audit

__all__ = ["AuditResult", "Cause", "LabelEvidence", "Suspect", "audit", "find_causes", "label_evidence"]
