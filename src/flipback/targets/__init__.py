"""Targets: the model being explained, behind query accounting."""

from .loading import LoadedModel, load_model
from .whitebox import WhiteBoxTarget, margin, neg_cross_entropy, smooth_margin
from .zoo import ZOO, CifarResNet, Normalized, SmallCNN

__all__ = ["ZOO", "CifarResNet", "LoadedModel", "Normalized", "SmallCNN", "WhiteBoxTarget", "load_model",
           "margin", "neg_cross_entropy", "smooth_margin"]
