"""Targets: the model being explained, behind query accounting."""

from .loading import LoadedModel, load_model
from .guide import ModelGuide, margin, neg_cross_entropy, smooth_margin
from .whitebox import MIN_MARGIN, WhiteBoxTarget
from .zoo import ZOO, CifarResNet, Normalized, SmallCNN

__all__ = ["MIN_MARGIN", "ZOO", "CifarResNet", "LoadedModel", "ModelGuide", "Normalized", "SmallCNN", "WhiteBoxTarget", "load_model",
           "margin", "neg_cross_entropy", "smooth_margin"]
