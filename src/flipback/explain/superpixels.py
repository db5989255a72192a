"""Perturbation baselines on the same superpixels as flipback's `regions` (issue 14).

Captum's LIME, KernelSHAP and feature ablation, each given the `regions` method's own
segmentation (SLIC, `segments.default_segments`) as the feature mask and the same blurred
image as the "removed" value, so they differ from `regions` in how they search, not in what
they may remove. Each gets a budget of model evaluations per image (`evaluations`), set by
the benchmark to at least what `regions` spent: LIME and KernelSHAP draw that many samples;
feature ablation, deterministic, measures every superpixel once per round, with as many
rounds (blur strengths) as fit in the budget and their mean as the map.

Maps are (N, H, W): a pixel gets its superpixel's attribution, positive part (higher = more
responsible for the wrong answer, as for the other baselines).
"""

from __future__ import annotations

import math
import warnings

import torch
from captum.attr import FeatureAblation, KernelShap, Lime

from ..attacks.segments import segment
from .attribution import VARIANTS, _Contrast, _eval_mode, _seeded
from .metrics import neutral_images

SUPERPIXEL_BASELINES = ("lime", "kernel_shap", "feature_ablation")
ABLATION_SIGMAS = (4.0, 2.0, 8.0, 1.0, 16.0)  # rounds of feature ablation: the first is regions' blur


def feature_masks(images: torch.Tensor) -> torch.Tensor:
    """(N,C,H,W) -> (N,C,H,W) int64 superpixel ids, regions' segmentation on every channel."""
    seg = segment(images, "slic")
    return seg[:, None].expand(-1, images.shape[1], -1, -1).contiguous()


def ablation_rounds(n_segments: int, evaluations: int) -> int:
    """Rounds of feature ablation that spend at least `evaluations` (one per superpixel and
    one for the image itself per round)."""
    return max(1, min(len(ABLATION_SIGMAS), math.ceil(evaluations / (n_segments + 1))))


@torch.no_grad()
def superpixel_attribute(method: str, model: torch.nn.Module, images: torch.Tensor, true: torch.Tensor,
                         pred: torch.Tensor, variant: str = "pred", *, evaluations: int = 100,
                         seed: int = 0) -> tuple[torch.Tensor, float]:
    """(N,C,H,W) in [0,1] -> ((N,H,W) maps, model evaluations per image spent)."""
    if method not in SUPERPIXEL_BASELINES:
        raise ValueError(f"unknown superpixel baseline {method!r}; choose from {', '.join(SUPERPIXEL_BASELINES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    x = images.detach().float()
    masks = feature_masks(x)
    pred, true = torch.as_tensor(pred).long(), torch.as_tensor(true).long()
    args = (pred,) + ((true,) if variant == "diff" else ())
    wrapped = _Contrast(model)
    with _eval_mode(model), _seeded(seed):
        if method == "feature_ablation":
            n_seg = int(masks.amax()) + 1
            rounds = ablation_rounds(n_seg, evaluations)
            fa = FeatureAblation(wrapped)
            # All of an image's superpixels in one batch: Captum loops over features, not images.
            attr = sum(fa.attribute(x, baselines=neutral_images(x, sigma), target=0, additional_forward_args=args,
                                    feature_mask=masks, perturbations_per_eval=min(n_seg, max(1, 4096 // len(x))))
                       for sigma in ABLATION_SIGMAS[:rounds]) / rounds
            spent = rounds * (n_seg + 1)
        else:
            cls = Lime if method == "lime" else KernelShap
            explainer = cls(wrapped)
            # Captum explains one image at a time when each has its own feature mask (and says so).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"You are providing multiple inputs")
                attr = explainer.attribute(x, baselines=neutral_images(x), target=0, additional_forward_args=args,
                                           feature_mask=masks, n_samples=evaluations,
                                           perturbations_per_eval=min(evaluations, 256))
            spent = evaluations
    return attr.sum(1).clamp(min=0).float(), float(spent)
