"""Baseline attribution maps through Captum, for side-by-side comparison with flipback.

``attribute(method, model, images, true, pred, variant)`` returns one (H, W) map per image,
higher = more responsible for the wrong answer. What is explained:

- ``variant="pred"``: the logit of the predicted (wrong) class;
- ``variant="diff"``: logit[pred] - logit[true], what pushes toward the wrong class rather
  than the true one. Both are a one-output wrapper (``_Contrast``), so every Captum method
  runs the same way with ``target=0``.

Channel reduction, per method:

- ``saliency``: |d output / d x| summed over channels (the gradient's sign says which way to
  move a pixel, not whether the pixel supports the answer).
- ``integrated_gradients``, ``gradient_shap``, ``deeplift``, ``occlusion``: these give signed
  contributions that add up to the output change (completeness). A location's contribution
  is the sum over its channels; its *positive part* is the evidence for the wrong answer,
  which is what these maps must rank (negative evidence is not a cause of the error, and
  neutralising it would make the error worse). ``reduce="abs"`` keeps |sum| instead.
- ``grad_cam``: LayerGradCam on the last ``nn.Conv2d`` of the model (or ``layer=``), ReLU,
  upsampled bilinearly to (H, W) with ``LayerAttribution.interpolate``.

Baselines (references), ``baseline=`` option:

- ``"blur"`` (default) for integrated gradients, DeepLIFT and occlusion: the image's own
  local blur, ``metrics.neutral_images`` -- the same neutral value that deletion-to-correct
  puts in, so "contribution relative to the baseline" and "what deleting it does" agree, and
  a dark cue on a bright object is not invisible as it would be against black.
  ``"black"``: all zeros.
- GradientSHAP draws references from a distribution shared by all images (Captum's design),
  so it cannot use a per-image blur: four grey levels 0, 1/3, 2/3, 1 with Gaussian noise
  (sd 0.1, clipped to [0, 1]), 16 samples per image.
- Occlusion: a square window of about H/8 (4x4 on 32x32 and 28x28), stride half of it,
  over all channels, filled with the baseline.

Everything random (GradientSHAP's noise and draws) is seeded with ``seed`` (default 0) and the
global torch and NumPy RNG states are restored afterwards. Maps are CPU float32.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import (
    DeepLift,
    GradientShap,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Occlusion,
    Saliency,
)

from .metrics import neutral_images

BASELINES: tuple[str, ...] = ("saliency", "integrated_gradients", "gradient_shap", "deeplift", "grad_cam", "occlusion")
VARIANTS = ("pred", "diff")

_SIGNED = ("integrated_gradients", "gradient_shap", "deeplift", "occlusion")
_SHAP_LEVELS = (0.0, 1 / 3, 2 / 3, 1.0)
_SHAP_NOISE = 0.1


class _Contrast(nn.Module):
    """One output per image: logit[pos] (- logit[neg]). Indices travel as forward args, so
    Captum expands them with the inputs (IG steps, SHAP samples, DeepLIFT's baseline half)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(x)
        out = logits.gather(1, pos[:, None])
        if neg is not None:
            out = out - logits.gather(1, neg[:, None])
        return out


# Functional nonlinearities DeepLIFT's rescale rule needs to see as modules.
_FUNCTIONAL = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, F.elu: nn.ELU, F.leaky_relu: nn.LeakyReLU,
    torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, torch.tanh: nn.Tanh, F.tanh: nn.Tanh,
    F.softplus: nn.Softplus,
}
_METHODS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
_NONLINEAR = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)


def deeplift_ready(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s graph that DeepLIFT can handle, sharing its parameters.

    Captum's DeepLIFT applies its rescale rule only to nonlinearity *modules* used once and
    not in place. The zoo's ResNets call ``F.relu``, which DeepLIFT would silently treat as
    linear. torch.fx rewrites every functional/method call to a fresh module and gives every
    reused or in-place activation module its own fresh copy. If the model cannot be traced,
    it is returned unchanged with a warning.
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "use as is"
        warnings.warn(f"DeepLIFT: could not trace the model ({exc}); functional nonlinearities "
                      "will be treated as linear", stacklevel=3)
        return model
    seen: set[str] = set()
    count = 0
    for node in list(gm.graph.nodes):
        new: nn.Module | None = None
        if node.op == "call_function" and node.target in _FUNCTIONAL:
            cls = _FUNCTIONAL[node.target]
            new = cls()
        elif node.op == "call_method" and node.target in _METHODS:
            new = _METHODS[node.target]()
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, _NONLINEAR) and (node.target in seen or getattr(mod, "inplace", False)):
                new = copy.deepcopy(mod)
                if hasattr(new, "inplace"):
                    new.inplace = False
            seen.add(node.target)
        if new is None:
            continue
        name = f"_deeplift_act{count}"
        count += 1
        gm.add_submodule(name, new)
        with gm.graph.inserting_after(node):
            repl = gm.graph.call_module(name, args=(node.args[0],))
        node.replace_all_uses_with(repl)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The last ``nn.Conv2d`` in module registration order (the deepest one in the zoo)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("grad_cam needs a model with an nn.Conv2d layer (or pass layer=...)")
    return convs[-1]


def occlusion_window(h: int, w: int) -> tuple[int, int]:
    """Square window side ~ min(H, W)/8 (4 on 32x32 and 28x28) and stride half of it."""
    side = max(2, int(np.floor(min(h, w) / 8 + 0.5)))
    return side, max(1, side // 2)


def shap_references(shape: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
    """GradientSHAP's reference distribution: noisy grey levels, (4, C, H, W)."""
    levels = torch.tensor(_SHAP_LEVELS).view(-1, 1, 1, 1)
    noise = torch.randn((len(_SHAP_LEVELS), *shape), generator=gen) * _SHAP_NOISE
    return (levels + noise).clamp(0.0, 1.0)


@contextmanager
def _seeded(seed: int):
    """Seed torch and NumPy (Captum draws from both), then restore their states."""
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)


@contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def attribute(method: str, model: nn.Module, images: torch.Tensor, true: torch.Tensor, pred: torch.Tensor,
              variant: str = "pred", *, batch_size: int = 64, **options) -> torch.Tensor:
    """(N,C,H,W) images in [0,1] -> (N,H,W) float maps; higher = more responsible for the wrong answer.

    Options: ``reduce`` ("positive" or "abs", signed methods), ``baseline`` ("blur" or
    "black"), ``sigma`` (blur of the baseline), ``n_steps`` (IG, 32), ``n_samples``
    (GradientSHAP, 16), ``window``/``stride`` (occlusion), ``layer`` (Grad-CAM), ``seed``.
    ``batch_size`` bounds the images in one forward pass (IG steps, SHAP samples and
    occlusion perturbations included).
    """
    if method not in BASELINES:
        raise ValueError(f"unknown attribution method {method!r}; choose from {', '.join(BASELINES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    known = {"reduce", "baseline", "sigma", "n_steps", "n_samples", "window", "stride", "layer", "seed"}
    if set(options) - known:
        raise TypeError(f"unknown options {sorted(set(options) - known)}; known: {sorted(known)}")
    reduce = options.get("reduce", "positive")
    if reduce not in ("positive", "abs"):
        raise ValueError(f"reduce must be 'positive' or 'abs', got {reduce!r}")
    n, c, h, w = images.shape
    if n == 0:
        return torch.zeros(0, h, w)
    device = _device(model)
    x_all = images.detach().to(device, torch.float32)
    pred_all = torch.as_tensor(pred).to(device, torch.long)
    true_all = torch.as_tensor(true).to(device, torch.long)

    with _eval_mode(model), _seeded(int(options.get("seed", 0))):
        run = _runner(method, model, (c, h, w), options, batch_size, device)
        per_chunk = max(1, batch_size // run.expansion)
        maps = []
        for s in range(0, n, per_chunk):
            # Gradients w.r.t. the inputs only: the model's parameters may be frozen (WhiteBoxTarget).
            x = x_all[s:s + per_chunk].detach().clone().requires_grad_(True)
            args = (pred_all[s:s + per_chunk],) + ((true_all[s:s + per_chunk],) if variant == "diff" else ())
            with torch.enable_grad():
                attr = run(x, args)
            maps.append(_reduce(method, attr.detach(), reduce, (h, w)).cpu())
    return torch.cat(maps).float()


class _Run:
    def __init__(self, fn, expansion: int):
        self.fn = fn
        self.expansion = expansion  # model evaluations per image, to size the chunks

    def __call__(self, x, args):
        return self.fn(x, args)


def _runner(method: str, model: nn.Module, shape, options: dict, batch_size: int, device) -> _Run:
    c, h, w = shape
    baseline = options.get("baseline", "blur")
    if baseline not in ("blur", "black"):
        raise ValueError(f"baseline must be 'blur' or 'black', got {baseline!r}")

    def reference(x):
        if baseline == "black":
            return torch.zeros_like(x)
        return neutral_images(x, **({"sigma": options["sigma"]} if "sigma" in options else {}))

    wrapped = _Contrast(model)
    if method == "saliency":
        sal = Saliency(wrapped)
        return _Run(lambda x, a: sal.attribute(x, target=0, abs=True, additional_forward_args=a), 1)
    if method == "integrated_gradients":
        ig = IntegratedGradients(wrapped)
        steps = int(options.get("n_steps", 32))
        return _Run(lambda x, a: ig.attribute(x, reference(x), target=0, additional_forward_args=a,
                                              n_steps=steps, internal_batch_size=batch_size), 1)
    if method == "gradient_shap":
        gen = torch.Generator().manual_seed(int(options.get("seed", 0)))
        refs = shap_references(shape, gen).to(device)
        samples = int(options.get("n_samples", 16))
        gs = GradientShap(wrapped)
        return _Run(lambda x, a: gs.attribute(x, refs, n_samples=samples, target=0, additional_forward_args=a),
                    samples)
    if method == "deeplift":
        dl = DeepLift(_Contrast(deeplift_ready(model)))

        def run_deeplift(x, a):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Setting forward, backward hooks")
                return dl.attribute(x, reference(x), target=0, additional_forward_args=a)
        return _Run(run_deeplift, 2)
    if method == "grad_cam":
        cam = LayerGradCam(wrapped, options.get("layer") or last_conv(model))
        return _Run(lambda x, a: cam.attribute(x, target=0, additional_forward_args=a, relu_attributions=True), 1)
    # occlusion
    side, stride = occlusion_window(h, w)
    side, stride = int(options.get("window", side)), int(options.get("stride", stride))
    occ = Occlusion(wrapped)
    positions = ((h - side) // stride + 1) * ((w - side) // stride + 1)

    def run_occlusion(x, a):
        # Each forward pass holds len(x) images times perturbations_per_eval windows.
        per_eval = max(1, min(positions, batch_size // len(x)))
        return occ.attribute(x, (c, side, side), strides=(c, stride, stride), baselines=reference(x),
                             target=0, additional_forward_args=a, perturbations_per_eval=per_eval)
    return _Run(run_occlusion, 1)


def evaluations_per_image(method: str, h: int, w: int, **options) -> int:
    """Model evaluations (forward passes, with a backward pass for the gradient methods) one
    image costs `method`: what the compute-matched benchmark states beside each baseline."""
    if method == "integrated_gradients":
        return int(options.get("n_steps", 32))
    if method == "gradient_shap":
        return int(options.get("n_samples", 16))
    if method == "deeplift":
        return 2
    if method == "occlusion":
        side, stride = occlusion_window(h, w)
        side, stride = int(options.get("window", side)), int(options.get("stride", stride))
        return ((h - side) // stride + 1) * ((w - side) // stride + 1) + 1
    return 1  # saliency, grad_cam: one forward and one backward pass


def _reduce(method: str, attr: torch.Tensor, reduce: str, size: tuple[int, int]) -> torch.Tensor:
    """(n, C, H, W) attributions (or (n, 1, h, w) for Grad-CAM) -> (n, H, W) maps."""
    if method == "grad_cam":
        return LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")[:, 0]
    if method == "saliency":
        return attr.abs().sum(1)
    total = attr.sum(1)
    return total.clamp(min=0) if reduce == "positive" else total.abs()
