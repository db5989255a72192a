"""Explanations of corrective changes: norms, heatmaps, ranked regions and figures."""

from .figure import amplified_change, save_figure, save_figures
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
    "DEFAULT_MASS",
    "FRAC_CHANGED_THRESHOLD",
    "L0_EPS",
    "Explanation",
    "Region",
    "amplified_change",
    "change_magnitude",
    "explain_changes",
    "save_figure",
    "save_figures",
    "smooth_heatmaps",
]
