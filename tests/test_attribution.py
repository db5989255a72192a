"""Captum baselines: known answers on hand-set models, then every method on the zoo models."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flipback.explain.attribution import BASELINES, VARIANTS, attribute, deeplift_ready, last_conv, occlusion_window
from flipback.explain.metrics import neutral_images, pointing_game, topk_precision
from flipback.targets import WhiteBoxTarget
from flipback.targets.zoo import ZOO, Normalized

H = W = 16
R = (slice(4, 8), slice(8, 12))  # the 4x4 region the decision depends on, aligned to the stride-2 grid
Q = (slice(10, 14), slice(2, 6))  # a second region, seen by both logits in `TwoRegionModel`
FAST = {"n_steps": 8, "n_samples": 8}  # few IG steps / SHAP samples: known answers do not need more


def region_mask(region, n=1):
    m = torch.zeros(n, H, W, dtype=torch.bool)
    m[(slice(None), *region)] = True
    return m


class PatchModel(nn.Module):
    """Class 1 ("cue") when the region R is bright, class 0 otherwise; nothing outside R counts.

    Input masked to R, a 2x2 stride-2 conv averaging the channels (so Grad-CAM's map is 8x8 and
    must be upsampled), functional ReLU above 0.5 brightness (DeepLIFT must see it), mean over R.
    logit1 = 4 * z, logit0 = 1: a fully bright R gives z = 0.5, so class 1 wins.
    """

    def __init__(self, c=3):
        super().__init__()
        self.register_buffer("mask", region_mask(R).float().unsqueeze(1))
        self.conv = nn.Conv2d(c, 1, 2, stride=2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / (4 * c))
            self.conv.bias.fill_(-0.5)

    def forward(self, x):
        z = F.relu(self.conv(x * self.mask)).sum((1, 2, 3)) / 4.0  # 4 active cells in R
        return torch.stack([torch.ones_like(z), 4.0 * z], 1)


def cued_images(n=3, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, H, W, generator=g)  # bright and dark pixels everywhere: brightness is no shortcut
    x[(slice(None), slice(None), *R)] = 1.0
    return torch.round(x * 255) / 255


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", BASELINES)
def test_every_method_points_at_the_only_region_that_matters(method, variant):
    # Both variants are tested: here logit0 is constant, so pred and diff have the same gradients.
    model = PatchModel().eval()
    x = cued_images()
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert pred.tolist() == [1, 1, 1]
    true = torch.zeros(3, dtype=torch.long)
    maps = attribute(method, model, x, true, pred, variant, **FAST)
    masks = region_mask(R, 3)
    assert pointing_game(maps, masks).all()
    # Occlusion windows and Grad-CAM's upsampling leak onto a one-pixel halo, but weaker than R.
    assert topk_precision(maps, masks).min() == 1.0


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "deeplift", "gradient_shap"])
def test_diff_variant_ignores_what_both_classes_share(method):
    # logit_pred = z_R + z_Q, logit_true = z_Q: the difference depends on R only, the predicted
    # logit on both. Gradient methods of the diff variant are exactly zero on Q.
    class TwoRegionModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("r", region_mask(R).float())
            self.register_buffer("q", region_mask(Q).float())

        def forward(self, x):
            s = x.mean(1)
            zr, zq = (s * self.r).sum((1, 2)), (s * self.q).sum((1, 2))
            return torch.stack([zq, zr + zq], 1)

    x = cued_images()
    x[(slice(None), slice(None), *Q)] = 1.0
    model = TwoRegionModel()
    pred, true = torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    opts = {**FAST, "baseline": "black"}
    diff = attribute(method, model, x, true, pred, "diff", **opts)
    whole = attribute(method, model, x, true, pred, "pred", **opts)
    on_q = region_mask(Q, 3)
    assert torch.all(diff[on_q] == 0)
    if method != "gradient_shap":  # its references are noisy, so (x - ref) * w can be negative
        assert torch.all(whole[on_q] > 0)
    assert topk_precision(diff, region_mask(R, 3)).min() == 1.0
    assert topk_precision(whole, region_mask(R, 3) | on_q).min() == 1.0


def test_integrated_gradients_of_a_linear_model_is_exact():
    # For a linear logit IG is (x - baseline) * weight; against black that is x * w.
    w = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(w.flatten(1))
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    pred, true = torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1, 1])
    got = attribute("integrated_gradients", model, x, true, pred, "diff", baseline="black", n_steps=4)
    signed = (x * (w[pred] - w[true])).sum(1)
    torch.testing.assert_close(got, signed.clamp(min=0), atol=1e-5, rtol=1e-5)
    got_abs = attribute("integrated_gradients", model, x, true, pred, "diff", baseline="black", n_steps=4,
                        reduce="abs")
    torch.testing.assert_close(got_abs, signed.abs(), atol=1e-5, rtol=1e-5)


def zoo_model(name, frozen=True):
    torch.manual_seed(0)
    e = ZOO[name]
    model = Normalized(e.build(10), e.mean, e.std)
    if frozen:
        WhiteBoxTarget(model, 10)  # eval mode and frozen parameters, as flipback leaves them
    return model, e.input_shape


def test_saliency_diff_is_the_gradient_of_the_logit_difference():
    model, shape = zoo_model("small_cnn")
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(3))
    pred, true = torch.tensor([1, 5, 9]), torch.tensor([0, 2, 3])
    xr = x.clone().requires_grad_(True)
    logits = model(xr)
    (logits.gather(1, pred[:, None]) - logits.gather(1, true[:, None])).sum().backward()
    expected = xr.grad.abs().sum(1)
    torch.testing.assert_close(attribute("saliency", model, x, true, pred, "diff", batch_size=2), expected)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Captum's notes about hooks and input grads
def test_deeplift_sees_the_resnets_functional_relus():
    # DeepLIFT's summation-to-delta holds exactly only when every ReLU uses its rescale rule.
    from captum.attr import DeepLift

    from flipback.explain.attribution import _Contrast

    model, shape = zoo_model("cifar_resnet20")
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(4))
    ready = deeplift_ready(model)
    assert sum(isinstance(m, nn.ReLU) for m in ready.modules()) == 19  # stem + 2 per block x 9
    torch.testing.assert_close(ready(x), model(x))
    _, delta = DeepLift(_Contrast(ready)).attribute(x, neutral_images(x), target=0,
                                                    additional_forward_args=(torch.tensor([1, 2]),),
                                                    return_convergence_delta=True)
    assert delta.abs().max() < 1e-5
    assert all(not p.requires_grad for p in model.parameters())


def test_helpers():
    model, _ = zoo_model("cifar_resnet20")
    assert last_conv(model) is model.model.layer3[-1].conv2
    assert occlusion_window(32, 32) == (4, 2)
    assert occlusion_window(28, 28) == (4, 2)
    assert occlusion_window(224, 224) == (28, 14)
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribute("lime", model, torch.rand(1, 3, 32, 32), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="unknown variant"):
        attribute("saliency", model, torch.rand(1, 3, 32, 32), torch.tensor([0]), torch.tensor([1]), "true")
    with pytest.raises(TypeError, match="unknown options"):
        attribute("saliency", model, torch.rand(1, 3, 32, 32), torch.tensor([0]), torch.tensor([1]), steps=3)


@pytest.mark.parametrize("name", ["cifar_resnet20", "small_cnn"])
def test_zoo_models_every_method_and_variant(name):
    model, shape = zoo_model(name)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(5))
    true, pred = torch.tensor([3, 7]), torch.tensor([4, 1])
    for method in BASELINES:
        for variant in VARIANTS:
            maps = attribute(method, model, x, true, pred, variant, batch_size=32, **FAST)
            assert maps.shape == (2, *shape[1:]) and maps.dtype == torch.float32 and maps.device.type == "cpu"
            assert torch.isfinite(maps).all() and (maps >= 0).all() and maps.sum() > 0, (method, variant)
    assert all(not p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("method", BASELINES)
def test_deterministic_batch_independent_and_leaves_no_trace(method):
    model, shape = zoo_model("small_cnn", frozen=False)
    model.train()  # attribute must use eval mode and then restore training mode
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(6))
    true, pred = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = attribute(method, model, x, true, pred, "diff", **FAST)
    assert torch.equal(torch.rand(1), expected_next)  # the global RNG is untouched
    assert model.training
    b = attribute(method, model, x, true, pred, "diff", **FAST)
    assert torch.equal(a, b)
    if method != "gradient_shap":  # its random draws depend on the chunking, by design
        c = attribute(method, model, x, true, pred, "diff", batch_size=1, **FAST)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters())  # not frozen here, and not changed
