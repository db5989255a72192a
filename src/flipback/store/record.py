"""ImageRecord: the one typed per-image result, used by the runner, the store and the report.

Stored as JSON with its schema version. Adding a field is one edit here (a field with a
default) plus, where old rows need a value other than the default, one step in `_migrate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

SCHEMA_VERSION = 2


@dataclass
class ImageRecord:
    index: int  # the image's position in the data set
    name: str  # its file or row name (a user string: escaped wherever shown)
    true: int
    pred_before: int  # the target's top-1 on the unmodified image
    pred_after: int  # the target's top-1 on the returned image; -1 where it never answered
    true_name: str
    pred_before_name: str
    pred_after_name: str | None  # None where pred_after is -1
    success: bool
    queries: int  # counted per the mission's definition, retries and earlier sessions included
    l2: float = 0.0
    linf: float = 0.0
    l0: int = 0
    frac_changed: float = 0.0
    regions: list = field(default_factory=list)  # [{share, area, bbox, centroid, ...}], most important first
    n_regions: int = 0
    region_fraction: float = 0.0
    scores_before: list | None = None  # probabilities
    scores_after: list | None = None  # probabilities; None for a hard-label target
    figure: str | None = None  # path inside the run folder
    corrected_image: str | None = None  # path inside the run folder (8-bit runs)
    error: str | None = None  # why the explanation failed, if it raised
    retry: bool = False  # the target was unavailable: a resumed run explains the image again
    # [[queries, L2 or None], ...]: the answer kept after each query count at which it changed
    # (None: not yet a verified correction); the run's frontier. None in runs made before it.
    trace: list | None = None
    # Region-level methods: the kind of change that corrected the image ("remove", toward a
    # local blur; "free", within +-eps: the fallback where a removal could not correct).
    change: str | None = None
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageRecord":
        d = _migrate(dict(d))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _migrate(d: dict) -> dict:
    version = int(d.get("schema", 1))
    if version < 2:
        # Version 1 was an untyped dict without "schema"; "retry" was present only when true,
        # and label-only black-box rows stored class 0 for an unanswered candidate (not knowable now).
        d.setdefault("retry", False)
        d["schema"] = 2
    return d
