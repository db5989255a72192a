"""flipback: explain image misclassifications with the smallest verified change that makes
the model right. See README.md; the command line is `flipback --help`."""

from .api import Correction, explain

__all__ = ["Correction", "explain"]
