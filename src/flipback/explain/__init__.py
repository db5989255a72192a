"""Explanations of corrective changes: norms, heatmaps, ranked regions and figures."""

from .figure import amplified_change, save_figure, save_figures
from .metrics import (
    DeletionResult,
    change_map,
    deletion_to_correct,
    neutral_images,
    pointing_game,
    topk_precision,
)
from .regions import (
    DEFAULT_MASS,
    FRAC_CHANGED_THRESHOLD,
    L0_EPS,
    Explanation,
    Region,
    change_magnitude,
    explain_changes,
    smooth_heatmaps,
)

__all__ = [
    "BASELINES",
    "DEFAULT_MASS",
    "DeletionResult",
    "FRAC_CHANGED_THRESHOLD",
    "L0_EPS",
    "Explanation",
    "Region",
    "amplified_change",
    "attribute",
    "change_magnitude",
    "change_map",
    "deletion_to_correct",
    "explain_changes",
    "neutral_images",
    "pointing_game",
    "save_figure",
    "save_figures",
    "smooth_heatmaps",
    "topk_precision",
]


def __getattr__(name: str):
    # Captum takes about a second to import: load the baselines only when asked for.
    if name in ("attribute", "BASELINES", "VARIANTS"):
        from . import attribution

        return getattr(attribution, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
