"""Surrogate models of black-box targets, trained only from the target's answers.

The target is queried on the user's own images (labels are not needed), up to a query
budget. A surrogate starts from random weights and learns the target's soft answers
(probabilities) when the target returns scores, or its top-1 labels otherwise. Random
crops and flips reuse the answer of the image they came from, so they cost no query.
A held-out part of the queried images measures how often surrogate and target agree.
Training reads each batch from the data set's (memory-mapped uint8) images, so the queried
images never sit in memory as one float tensor (10,000 at 224 px would be 6 GB).

Members trained from scratch are CIFAR-size networks; on images larger than SCRATCH_SIZE they
first average-pool the image down (224 px: by 4, to 56 px), so their cost suits the input size.

With `init` (`--init SPEC`), one member starts from a pretrained model that the user supplies
(any white-box SPEC that `load_model` reads), at no query cost: see `build_init`. Several
SPECs (`--init A --init B`) make that member their outputs side by side under one new head.

A surrogate is an ensemble: several members, trained on the same answers, whose logits are
averaged. Changes that fool several differently built models transfer to the target far
more often than changes that fool one (Liu et al., ICLR 2017), and training more members
costs only CPU time, never queries. On the CIFAR-10 benchmark, the `fast` method corrected
89.5% of the target's errors at 2.37 queries each with one width-16 CNN, 98.8% at 1.48 with
one width-32 CNN, and 99.95% at 1.15 with the default three members (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Dataset
from ..errors import FlipbackError, ModelError
from .guide import channels_last_pays, to_channels_last
from .zoo import CifarResNet, Normalized, SurrogateCNN

SURROGATE_MEAN, SURROGATE_STD = 0.5, 0.25
# A CIFAR ResNet and two VGG-style CNNs (different seeds): about 12 minutes of training on
# 10,000 CIFAR-10 answers on 2 CPU cores.
DEFAULT_MEMBERS = ("resnet20", "cnn32", "cnn32")
MEMBER_HELP = "cnnW (VGG-style CNN, first-layer width W) or resnetD (CIFAR ResNet of depth D = 6n+2)"
MEMBER_NAME = re.compile(r"(cnn|resnet)(\d+)")
INIT_MEMBER = "init"  # the member started from --init SPEC
# An --init member (its pretrained part, and a new head once fitted alone) fine-tunes at this
# share of the learning rate.
INIT_LR_SCALE = 0.1


@dataclass
class Surrogate:
    module: torch.nn.Module  # takes [0,1] NCHW pixels, returns logits
    meta: dict  # members, num_classes, input_shape, queries, agreement, target, output, split, ...
    # Sorted indices into the training data set of every image it was fitted on or held out
    # with: the images asked about (random and --active ones) and those it labelled for itself.
    # Validation on that data set must skip them. None for files saved before it was kept.
    trained_on: np.ndarray | None = None


def as_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Targets return probabilities or logits; the surrogate learns probabilities."""
    s = scores.float()
    looks_like_probs = bool((s >= 0).all() and torch.allclose(s.sum(1), torch.ones(len(s), device=s.device), atol=1e-3))
    return s if looks_like_probs else torch.softmax(s, 1)


class SurrogateEnsemble(torch.nn.Module):
    """Averages its members' logits (each member takes [0,1] pixels)."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def parse_members(text, init: str | list[str] | None = None) -> tuple[str, ...]:
    """"resnet20,cnn32" (or a sequence of names) -> ("resnet20", "cnn32"), checked.

    With `init` (a pretrained model's SPEC), the member `init` is that model: None gives it
    alone, and it is put first when the names leave it out. None without `init`: the default
    members."""
    if text is None:
        text = (INIT_MEMBER,) if init else DEFAULT_MEMBERS
    names = tuple(n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip())
    if init and INIT_MEMBER not in names:
        names = (INIT_MEMBER,) + names
    if not names:
        raise FlipbackError("a surrogate needs at least one member", hint=f"members: {MEMBER_HELP}")
    for name in names:
        if name == INIT_MEMBER:
            if not init:
                raise FlipbackError("the surrogate member 'init' needs a pretrained model",
                                    hint="give it with --init SPEC")
            if names.count(INIT_MEMBER) > 1:
                raise FlipbackError("the surrogate member 'init' can be named only once")
            continue
        m = MEMBER_NAME.fullmatch(name)
        size = int(m[2]) if m else 0
        if not m or not (size >= 4 if m[1] == "cnn" else size >= 8 and (size - 2) % 6 == 0):
            raise FlipbackError(f"unknown surrogate member '{name}'", hint=f"members: {MEMBER_HELP}")
    return names


def init_specs(init) -> tuple[str, ...]:
    """--init's value as SPECs: None -> (), one SPEC -> (SPEC,), a sequence -> its SPECs."""
    if not init:
        return ()
    return (init,) if isinstance(init, str) else tuple(init)


def stored_init(init) -> str | list[str]:
    """--init as a surrogate file records it: one SPEC as itself (as before several were
    possible), several as a list."""
    specs = init_specs(init)
    return specs[0] if len(specs) == 1 else list(specs)


class Joined(nn.Module):
    """Several pretrained models on the same pixels, their outputs concatenated: one --init
    member whose new head reads them all, so its gradient is that of their ensemble (on
    EfficientNet-Lite0 at 224 px, Lite1 and Lite2 together agreed 73.6% where Lite1 alone
    agreed 71.4%: docs/benchmarks.md, issue 12)."""

    def __init__(self, *nets: nn.Module):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x) for net in self.nets], dim=1)


class Headed(nn.Module):
    """A pretrained model whose output count is not the target's class count, with a new
    linear layer from its outputs (its logits) to the target's classes."""

    def __init__(self, body: nn.Module, outputs: int, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(outputs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def absolute_spec(spec: str) -> str:
    """SPEC with its file or folder made absolute, so that a saved surrogate loads from anywhere."""
    from .loading import EXPORT_SUFFIXES, TORCHSCRIPT_SUFFIXES
    from .zoo import ZOO

    def resolved(p: str) -> str:
        return str(Path(p).expanduser().resolve())

    if spec.startswith("hf:"):
        return "hf:" + resolved(spec[3:])
    if spec.startswith("timm:"):
        name, sep, weights = spec[5:].partition(":")
        return f"timm:{name}:{resolved(weights)}" if sep and weights else spec
    if spec.startswith("python:"):
        module, sep, factory = spec[7:].rpartition(":")
        return f"python:{resolved(module)}:{factory}" if sep and module.endswith(".py") else spec
    if spec.endswith(EXPORT_SUFFIXES):
        return resolved(spec)
    arch, sep, weights = spec.partition(":")
    if sep and arch in ZOO and weights:
        return f"{arch}:{resolved(weights)}"
    if spec.endswith(TORCHSCRIPT_SUFFIXES):
        return resolved(spec)
    return spec


def _init_class_count(spec: str, num_classes: int) -> int:
    """The class count to build the pretrained model with: its own where its loader checks it
    (hf: id2label; timm: its classifier's rows in the weights file; a zoo ARCH:WEIGHTS
    checkpoint's last weight matrix), else the data set's."""
    from .loading import _state_dict, load_checkpoint
    from .zoo import ZOO

    if spec.startswith("hf:"):
        from .hub import hf_input

        return hf_input(spec[3:]).num_classes or num_classes
    if spec.startswith("timm:"):  # timm's pretrained config names the classifier (untested here: no timm)
        from .hub import _timm_model
        from .loading import _timm_spec

        name, weights = _timm_spec(spec)
        if weights is None or not weights.is_file():
            return num_classes
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(weights))
        else:
            sd = _state_dict(load_checkpoint(weights))
        key = (getattr(_timm_model(name), "pretrained_cfg", None) or {}).get("classifier")
        w = sd.get(f"{key}.weight") if isinstance(key, str) else None
        return int(w.shape[0]) if w is not None and w.ndim == 2 else num_classes
    arch, sep, weights = spec.partition(":")
    if sep and arch in ZOO and weights and not spec.endswith(".pt2"):
        mats = [v for v in _state_dict(load_checkpoint(Path(weights))).values() if v.ndim == 2]
        if mats:
            return int(mats[-1].shape[0])
    return num_classes


def build_init(init, num_classes: int, input_shape, *, trust_code: bool = True) -> nn.Module:
    """The pretrained model of SPEC (or of several SPECs) as a surrogate member: it takes [0,1]
    pixels (each model's own normalization inside, as load_model gives it) and returns
    `num_classes` logits. When one model's output count differs, a new
    `nn.Linear(outputs, num_classes)` goes on top of its outputs (`Headed`); its own classifier
    is kept. Several models always get a new head, on their outputs side by side (`Joined`).
    `trust_code=False` refuses `python:` specs (a surrogate file naming code to import)."""
    from .loading import load_model

    specs = init_specs(init)
    for spec in specs:  # refused before any model loads
        if spec.startswith("python:") and not trust_code:
            raise ModelError(f"the surrogate starts from {spec}, which imports and runs that Python code",
                             hint="pass --trust-model (trust_model=True) if you trust the surrogate file")
    c, h, w = input_shape
    nets, outputs = [], 0
    for spec in specs:
        net = load_model(spec, _init_class_count(spec, num_classes)).module
        net.eval()
        try:
            with torch.no_grad():
                out = net(torch.zeros(1, c, h, w))
        except Exception as exc:
            raise ModelError(f"the --init model {spec} fails on a {c}x{h}x{w} image: {type(exc).__name__}: {exc}",
                             hint="it must take the data set's images (after the target's eval transform)") from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise ModelError(f"the --init model {spec} returns {getattr(out, 'shape', type(out).__name__)}, "
                             "not (batch, outputs) logits")
        nets.append(net)
        outputs += int(out.shape[1])
    if len(nets) > 1:
        return Headed(Joined(*nets), outputs, num_classes)
    return nets[0] if outputs == num_classes else Headed(nets[0], outputs, num_classes)


# Members trained from scratch see images of at most this size: larger ones are average-pooled
# down first (member_pool). A CNN made for 32 px would cost more than the 224-px ImageNet model
# it imitates (cnn32 at 224 px: 1.4 GMACs a forward pass; EfficientNet-Lite0: 0.4), and a few
# thousand answers cannot teach it 224-px detail anyway.
SCRATCH_SIZE = 64


def member_pool(input_shape) -> int:
    """The average-pooling factor for scratch members on images of `input_shape` (C, H, W)."""
    if input_shape is None:
        return 1
    return max(1, math.ceil(max(int(input_shape[1]), int(input_shape[2])) / SCRATCH_SIZE))


class Pooled(nn.Module):
    """Average-pools the image by `k` (an exact linear map, so gradients reach every pixel),
    then the network."""

    def __init__(self, net: nn.Module, k: int):
        super().__init__()
        self.net = net
        self.pool = nn.AvgPool2d(k, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pool(x))


def build_member(name: str, num_classes: int, in_channels: int, *, init: str | list[str] | None = None,
                 input_shape=None, trust_code: bool = True, pool: int = 1) -> nn.Module:
    if name == INIT_MEMBER:
        return build_init(init, num_classes, input_shape, trust_code=trust_code)
    kind, size = MEMBER_NAME.fullmatch(name).groups()
    net = (SurrogateCNN(num_classes, in_channels, int(size)) if kind == "cnn"
           else CifarResNet(int(size), num_classes, in_channels))
    c = in_channels
    return Normalized(Pooled(net, pool) if pool > 1 else net, (SURROGATE_MEAN,) * c, (SURROGATE_STD,) * c)


def build_surrogate(num_classes: int, in_channels: int, members=DEFAULT_MEMBERS, *, init: str | list[str] | None = None,
                    input_shape=None, trust_code: bool = True, pool: int = 1) -> torch.nn.Module:
    """One member alone, or the ensemble of several."""
    built = [build_member(name, num_classes, in_channels, init=init, input_shape=input_shape, trust_code=trust_code,
                          pool=pool)
             for name in parse_members(members, init)]
    return built[0] if len(built) == 1 else SurrogateEnsemble(built)


def _members_of(meta: dict) -> tuple[str, ...]:
    """Files from before ensembles name one `surrogate_cnn` and its width."""
    return tuple(meta["members"]) if "members" in meta else (f"cnn{meta['width']}",)


def _augment(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random 4-pixel-padded crops (and horizontal flips): batched, no Python loop per image."""
    n, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, x.shape[1], h, w + 8)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        out[mask] = out[mask].flip(3)
    return out


def rows_per_batch(shape, most: int = 500, cap_bytes: int = 64 << 20) -> int:
    """Images per batch for queries and held-out checks: `most`, fewer where their float32
    tensor would pass `cap_bytes` (500 up to 100x100 px; 111 at 224x224x3)."""
    return max(1, min(most, cap_bytes // (4 * int(np.prod(shape)))))


def query_answers(target, ds: Dataset, indices: np.ndarray, *, batch_size: int | None = None, progress=None):
    """Ask the target about `indices` (counted queries), `batch_size` images at a time (None:
    rows_per_batch). Returns (probabilities or None, labels)."""
    from ..runs.errors import to_tensor

    batch_size = batch_size or rows_per_batch(ds.shape)
    probs, labels = [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        answer = target.query(to_tensor(ds.images[idx]), torch.from_numpy(idx))
        labels.append(answer.labels.long())
        if answer.scores is not None:
            probs.append(as_probabilities(answer.scores))
        if progress:
            progress(len(idx))
    return (torch.cat(probs) if probs and len(probs) == len(labels) else None), torch.cat(labels)


class QueriedImages:
    """The queried images, read from the data set's (memory-mapped uint8) images and made
    [0,1] float tensors one batch at a time: x[i] for positions i in `rows`."""

    def __init__(self, images: np.ndarray, rows: np.ndarray):
        self.images, self.rows = images, np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> torch.Tensor:
        from ..runs.errors import to_tensor

        if isinstance(i, torch.Tensor):
            i = i.numpy()
        return to_tensor(self.images[self.rows[i]])


def _fit_member(model: torch.nn.Module, x_all, train_idx: np.ndarray, targets: torch.Tensor,
                soft: bool, *, epochs: int, lr: float, batch_size: int, flip: bool, seed: int, progress=None,
                device: torch.device | str = "cpu", pretrained: bool = False, record: dict | None = None):
    """SGD with a one-cycle learning rate on the target's answers (soft: cross-entropy against
    its probabilities), on random crops (and flips) of the queried images. `x_all[b]` gives
    the images at positions `b` (a QueriedImages, or a tensor). A `pretrained` model learns at
    INIT_LR_SCALE times `lr`, after its new head (Headed) is fitted alone, and keeps the
    weights (after the probe, or after an epoch) that agree best with the target on a
    validation share of `train_idx` (see _validation_split); `record`, if given, gets
    "val_agreement" (per epoch, 0 = before fine-tuning) and "kept_epoch"."""
    gen = torch.Generator().manual_seed(seed)
    model = model.to(device)
    val_idx = np.empty(0, dtype=np.int64)
    if pretrained:
        train_idx, val_idx = _validation_split(train_idx, seed)
        # A new head is fitted first (_linear_probe), so it fine-tunes at the body's rate too, as
        # LP-FT does: at the full rate, two steps took Lite1's held-out agreement with Lite0
        # from 0.74 (after the probe) to 0.39 with the body frozen.
        max_lr = lr * INIT_LR_SCALE
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        max_lr = lr
        params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=max_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=epochs * steps_per_epoch)
             if epochs else None)  # 0 epochs: an --init member's probe alone
    # Large images train in channels-last layout on the CPU (targets/guide.py: about 2x at 224 px).
    probe = x_all[torch.from_numpy(train_idx[:1])].to(device)  # one image, for its size and device
    layout = torch.channels_last if channels_last_pays(probe) and to_channels_last(model) else torch.contiguous_format
    if pretrained and isinstance(model, Headed):
        _linear_probe(model, x_all, train_idx, targets, soft, device, layout, tuple(probe.shape[1:]))
    best = _Best(model, x_all, val_idx, targets, soft, device, layout)
    for epoch in range(epochs):
        _train_mode(model, frozen_bn=pretrained)
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=gen)]
        for start in range(0, len(order), batch_size):
            b = order[start:start + batch_size]
            # Augmented on the CPU (the same random draws on every device), trained on `device`.
            logits = model(_augment(x_all[b], gen, flip).to(device).contiguous(memory_format=layout))
            if soft:
                loss = -(targets[b].to(device) * F.log_softmax(logits, 1)).sum(1).mean()
            else:
                loss = F.cross_entropy(logits, targets[b].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        best.check(epoch + 1)
        if progress:
            progress("train", 1)
    best.restore(record)
    return model.cpu().eval()  # saved and measured on the CPU


def _train_mode(model: nn.Module, frozen_bn: bool) -> None:
    model.train()
    if frozen_bn:
        # Frozen batch-norm statistics: a few hundred images of another domain (upscaled CIFAR-10
        # for an ImageNet model) in batches would pull the running statistics, and with them
        # every pretrained feature, away from what the weights were trained with.
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# A pretrained member keeps this share of its training answers (at least VALIDATION_MIN, and
# only when VALIDATION_MIN are left to train on) to choose between its probed and fine-tuned weights.
VALIDATION_SHARE, VALIDATION_MIN = 0.1, 10


def _validation_split(train_idx: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions, drawn at random from `train_idx` (sorted, each part)."""
    n_val = max(VALIDATION_MIN, int(round(len(train_idx) * VALIDATION_SHARE)))
    if len(train_idx) < 2 * n_val:
        return train_idx, np.empty(0, dtype=train_idx.dtype)
    perm = np.random.default_rng(seed).permutation(len(train_idx))
    return np.sort(train_idx[perm[n_val:]]), np.sort(train_idx[perm[:n_val]])


class _Best:
    """Early stopping by checkpoint: the weights that agree best with the target's answers on
    the validation positions, checked after the probe (epoch 0) and after every epoch. Fine-
    tuning can wreck a pretrained model: on 1,000 of EfficientNet-Lite0's answers, two epochs
    took EfficientNet-Lite1's held-out agreement from 0.74 after the linear probe to 0.16 (see
    docs/benchmarks.md), so the probe alone must be able to win. No validation positions: the
    last weights, as for members trained from scratch."""

    def __init__(self, model, x_all, val_idx, targets, soft: bool, device, layout):
        self.model, self.val, self.state, self.scores, self.epoch = model, None, None, [], 0
        if len(val_idx):
            rows = torch.from_numpy(val_idx)
            images = (QueriedImages(x_all.images, x_all.rows[val_idx]) if isinstance(x_all, QueriedImages)
                      else x_all[rows])
            labels = targets[rows].argmax(1) if soft else targets[rows]
            self.val = (images, labels, device, layout)
            self.check(0)

    def check(self, epoch: int) -> None:
        if self.val is None:
            return
        images, labels, device, layout = self.val
        was_training = self.model.training
        score = agreement(self.model.eval(), images, labels, device=device, layout=layout)
        self.scores.append(score)
        if self.state is None or score > max(self.scores[:-1]):  # ties keep the earlier, less tuned weights
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.epoch = epoch
        self.model.train(was_training)

    def restore(self, record: dict | None) -> None:
        if self.state is not None:
            self.model.load_state_dict(self.state)
            if record is not None:
                record.update(val_agreement=self.scores, kept_epoch=self.epoch)


def _linear_probe(model: Headed, x_all, train_idx: np.ndarray, targets: torch.Tensor, soft: bool, device,
                  layout, chw, steps: int = 200) -> None:
    """Fit a new head alone on the frozen body's outputs, before fine-tuning (LP-FT: Kumar et
    al., ICLR 2022). A random head would take most of a short fine-tuning to learn, while its
    gradients push the pretrained features around; fitted first, it costs one forward pass per
    answer and a few hundred L-BFGS steps on a (answers x outputs) matrix. Un-augmented images."""
    model.eval()
    c, h, w = chw
    rows = rows_per_batch((h, w, c))
    with torch.no_grad():
        feats = torch.cat([model.body(x_all[torch.from_numpy(train_idx[i:i + rows])].to(device)
                                      .contiguous(memory_format=layout)).float()
                           for i in range(0, len(train_idx), rows)])
    want = targets[torch.from_numpy(train_idx)].to(device)
    # From zero, with an L2 penalty of 0.01 on the weights: on 900 of EfficientNet-Lite0's
    # answers (CIFAR-10 train images at 224 px) over EfficientNet-Lite1's 1,000 logits, the
    # held-out agreement was 0.55 at 1e-4, 0.64 at 1e-3, 0.74 at 1e-2 and 3e-2, 0.73 at 0.1.
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    opt = torch.optim.LBFGS(model.head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = model.head(feats)
        loss = (-(want * F.log_softmax(logits, 1)).sum(1).mean() if soft else F.cross_entropy(logits, want))
        loss = loss + 1e-2 * model.head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)


def batched_logits(model: torch.nn.Module, x, *, device: torch.device | str = "cpu",
                   layout=torch.contiguous_format) -> torch.Tensor:
    """`model`'s float logits (on the CPU) for images `x` (a tensor, or a QueriedImages; read
    rows_per_batch at a time), computed by `model` where it is, on `device`, taking `layout`."""
    k = rows_per_batch(tuple(x[0:1].shape[1:])) if len(x) else 1
    with torch.no_grad():
        return torch.cat([model(x[i:i + k].to(device).contiguous(memory_format=layout)).float().cpu()
                          for i in range(0, len(x), k)])


def agreement(model: torch.nn.Module, x, labels: torch.Tensor, *, device: torch.device | str = "cpu",
              layout=torch.contiguous_format) -> float:
    """The share of images `x` on which `model`'s top-1 is `labels` (the target's answers);
    see batched_logits for `x`, `device` and `layout`."""
    pred = batched_logits(model, x, device=device, layout=layout).argmax(1)
    return float((pred == labels.cpu()).float().mean())


def train_surrogate(target, ds: Dataset, budget: int, *, members=None, epochs: int = 30,
                    holdout: float = 0.1, batch_size: int = 128, lr: float = 0.05, flip: bool = True,
                    seed: int = 0, target_spec: str = "", progress=None, device: torch.device | str = "cpu",
                    init: str | list[str] | None = None, max_memory: str | int | None = None, self_train: int = 0,
                    active: float = 0.0) -> Surrogate:
    """Query the target on `budget` images of `ds` and fit a surrogate to its answers: each
    member in turn (member i with seed `seed + i`), on the same answers. `members` None: the
    default ones, or with `init` (a pretrained model's SPEC, see build_init) that model alone.

    `progress(stage, advance)` is called as work proceeds, if given (one "train" step per
    member and epoch). `max_memory`: the cap training batches are sized under (runs/memory.py;
    None: 80% of what is free); a member whose `batch_size` images do not fit trains on fewer
    (recorded as "member_batch_size"), one that cannot fit one image stops with MemoryLimitError.

    `self_train` N > 0: self-training at no query cost. The surrogate fitted on the answers
    labels N images of `ds` it never asked about (its probabilities, or its top-1 for a
    label-only target), and fresh members (the same seeds) are fitted on the answers and those
    labels together; the held-out answers stay out of both. Recorded as "self_train", with the
    first surrogate's held-out agreement as "teacher_agreement".

    `active` a > 0: active choice of what to ask. The first (1 - a) of the budget goes to random
    images, as without it; members fitted to those answers pick the rest, the images they are
    least sure about (`_least_sure`); then the surrogate is fitted on all answers as usual.
    Recorded as "active" (images so chosen). Its held-out tenth is drawn from all answers, the
    chosen hard ones included, so its agreement reads lower than on random images: measure
    on other images to compare."""
    from ..runs.memory import training_batch  # the planner explain sizes its batches with

    members = parse_members(members, init)
    if epochs < 1 and any(name != INIT_MEMBER for name in members):
        raise FlipbackError(f"surrogate members trained from scratch need at least one epoch, got {epochs}",
                            hint="0 epochs only suit --init members alone (probe, no fine-tuning)")
    if (self_train or active) and init:
        raise FlipbackError("--self-train and --active fit members from scratch; they do not combine with --init",
                            hint="drop --init, or drop --self-train and --active")
    if self_train < 0:
        raise FlipbackError(f"--self-train takes a number of images, got {self_train}")
    if not 0 <= active < 1:
        raise FlipbackError(f"--active is the share of the budget chosen by the surrogate, in [0, 1), got {active}")
    h, w, c = ds.shape
    init = stored_init([absolute_spec(spec) for spec in init_specs(init)]) or None
    # The pretrained model loads (and is checked on the data's size) before any query.
    pretrained = build_init(init, ds.num_classes, (c, h, w)) if init else None
    if budget < 10:
        raise FlipbackError(f"a surrogate needs a budget of at least 10 queries, got {budget}")
    pool = member_pool((c, h, w))
    to_fit = _new_members(members, ds, pool, seed, pretrained)
    # Each member's training batch under the memory cap, before any query is spent: one that
    # cannot train on a single image stops the run here (MemoryLimitError), not the kernel later.
    dev = torch.device(device)
    batches = [training_batch(m.to(dev), (c, h, w), dev, max_memory=max_memory, batch_size=batch_size,
                              what=f"the surrogate member '{name}'", frozen_bn=name == INIT_MEMBER)
               for m, name in zip(to_fit, members)]
    rng = np.random.default_rng(seed)
    n = min(budget, len(ds))
    ask = (lambda k: progress("query", k)) if progress else None
    n_first = n - int(round(n * active)) if active else n
    chosen = np.sort(rng.permutation(len(ds))[:n_first])
    probs, labels = query_answers(target, ds, chosen, progress=ask)
    if labels.min() < 0 or labels.max() >= ds.num_classes:
        raise ModelError(f"the target answered labels outside 0..{ds.num_classes - 1}")
    soft = probs is not None
    extra = {}
    if n_first < n:
        scout = _fit_scratch(members, ds, QueriedImages(ds.images, chosen), np.arange(n_first),
                             probs if soft else labels, soft, epochs=epochs, lr=lr, batches=batches,
                             flip=flip and c == 3, seed=seed, progress=None, device=device, pool=pool)
        picked = _least_sure(scout, ds, chosen, n - n_first, device)
        p2, l2 = query_answers(target, ds, picked, progress=ask)
        order = np.argsort(np.concatenate([chosen, picked]), kind="stable")  # sorted reads, as before
        chosen = np.concatenate([chosen, picked])[order]
        labels = torch.cat([labels, l2])[torch.from_numpy(order)]
        probs = torch.cat([probs, p2])[torch.from_numpy(order)] if soft else None
        extra["active"] = int(len(picked))
    n_hold = max(1, int(round(n * holdout)))
    # `chosen` is sorted (cheap reads from the data cache), so the held-out part must be drawn
    # at random: a tail slice of an image folder would be one class.
    split = rng.permutation(n)
    train_idx, hold_idx = np.sort(split[n_hold:]), np.sort(split[:n_hold])
    x_all = QueriedImages(ds.images, chosen)  # read a batch at a time

    chosen_epochs = {}
    built = _fit_members(members, to_fit, x_all, train_idx, probs if soft else labels, soft, epochs=epochs, lr=lr,
                         batches=batches, flip=flip and c == 3, seed=seed, progress=progress, device=device,
                         record=chosen_epochs)
    model = built[0] if len(built) == 1 else SurrogateEnsemble(built).eval()
    held_x, held_labels = QueriedImages(ds.images, chosen[hold_idx]), labels[hold_idx]
    if self_train > 0:
        extra["teacher_agreement"] = agreement(model, held_x, held_labels)
        built, labelled = _self_train(model, ds, chosen, train_idx, probs if soft else labels, soft, self_train,
                                      members=members, epochs=epochs, lr=lr, batches=batches, flip=flip and c == 3,
                                      seed=seed, progress=progress, device=device, pool=pool)
        model = built[0] if len(built) == 1 else SurrogateEnsemble(built).eval()
        extra["self_train"] = len(labelled)
    else:
        labelled = np.zeros(0, dtype=np.int64)
    meta = {"members": list(members), "num_classes": ds.num_classes, "input_shape": [c, h, w],
            "classes": list(ds.classes), "queries": int(n), "held_out": int(n_hold),
            "agreement": agreement(model, held_x, held_labels),
            "member_agreement": [agreement(m, held_x, held_labels) for m in built],
            "output": "scores" if soft else "label", "epochs": epochs, "target": target_spec, "seed": seed,
            "batch_size": batch_size, "member_batch_size": batches,
            "member_pool": pool, **extra}
    if init:
        meta["init"] = init  # rebuilt from this SPEC or list of SPECs (their files must be there) when it loads
        meta["init_head"] = isinstance(pretrained, Headed)
        meta["init_lr_scale"] = INIT_LR_SCALE
        meta["linear_probe"] = isinstance(pretrained, Headed)  # its new head fitted first (_linear_probe)
        # Which weights the init member kept (0: the probe's, no fine-tuning) and why.
        meta["init_val_agreement"] = chosen_epochs.get("val_agreement")
        meta["init_kept_epoch"] = chosen_epochs.get("kept_epoch")
    return Surrogate(model, meta, trained_on=np.union1d(chosen, labelled).astype(np.int64))


def _new_members(members, ds: Dataset, pool: int, seed: int, pretrained=None) -> list[nn.Module]:
    """Untrained members, member i built from seed + i; the --init member is `pretrained`
    (its new head, if any, starts from its seed, as the other members do)."""
    built = []
    for i, name in enumerate(members):
        torch.manual_seed(seed + i)
        if name == INIT_MEMBER:
            built.append(Headed(pretrained.body, pretrained.head.in_features, ds.num_classes)
                         if isinstance(pretrained, Headed) else pretrained)
        else:
            built.append(build_member(name, ds.num_classes, ds.shape[2], pool=pool))
    return built


def _fit_members(members, models, x_all, fit_idx: np.ndarray, targets: torch.Tensor, soft: bool, *,
                 epochs, lr, batches, flip, seed, progress, device, record: dict | None = None) -> list[nn.Module]:
    """Each of `models` (member i with seed + i) fitted on `x_all[fit_idx]`; the --init member
    as a pretrained one, its kept epoch written to `record`. Fitting draws only from its own
    seeded generator, so building every member first gives the same weights as building each
    just before it trains."""
    return [_fit_member(model, x_all, fit_idx, targets, soft, epochs=epochs, lr=lr, batch_size=batches[i],
                        flip=flip, seed=seed + i, progress=progress, device=device, pretrained=name == INIT_MEMBER,
                        record=record if name == INIT_MEMBER else None)
            for i, (name, model) in enumerate(zip(members, models))]


def _fit_scratch(members, ds: Dataset, x_all, fit_idx: np.ndarray, targets: torch.Tensor, soft: bool, *,
                 epochs, lr, batches, flip, seed, progress, device, pool) -> list[nn.Module]:
    """Fresh members (as train_surrogate builds them) fitted on `x_all[fit_idx]`."""
    return _fit_members(members, _new_members(members, ds, pool, seed), x_all, fit_idx, targets, soft,
                        epochs=epochs, lr=lr, batches=batches, flip=flip, seed=seed, progress=progress,
                        device=device)


def _outputs(model: nn.Module, ds: Dataset, rows: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """`model`'s logits on the images of `ds` at `rows`, a batch at a time, computed on
    `device` (the training device: tens of thousands of images) and returned on the CPU.
    Members come back from fitting on the CPU; they go back there afterwards."""
    model.to(device)
    try:
        return batched_logits(model, QueriedImages(ds.images, rows), device=device)
    finally:
        model.cpu()


def _least_sure(members: list[nn.Module], ds: Dataset, asked: np.ndarray, n: int,
                device: torch.device | str = "cpu") -> np.ndarray:
    """Active choice: the `n` images of `ds` not yet asked about on which the surrogate fitted
    to the first answers is least sure (the smallest gap between its two most likely classes,
    averaged over members), sorted. The target's answers where the surrogate is unsure teach
    it the most about where the target's boundaries are (uncertainty sampling)."""
    unasked = np.setdiff1d(np.arange(len(ds)), asked)
    model = members[0] if len(members) == 1 else SurrogateEnsemble(members).eval()
    top2 = torch.softmax(_outputs(model, ds, unasked, device), 1).topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]).numpy()
    return np.sort(unasked[np.argsort(gap, kind="stable")[:n]])


def self_train_images(n_images: int, asked: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The images self-training labels (sorted indices): `n` drawn at random (seed + 1) from
    those never asked about. Validation on the train split skips them too (they were trained on)."""
    unasked = np.setdiff1d(np.arange(n_images), asked)
    return np.sort(np.random.default_rng(seed + 1).permutation(unasked)[:n])


def _self_train(teacher: nn.Module, ds: Dataset, chosen: np.ndarray, train_idx: np.ndarray, targets: torch.Tensor,
                soft: bool, n: int, *, members, epochs, lr, batches, flip, seed, progress, device, pool):
    """Fresh members fitted on the answers (positions `train_idx` of `chosen`) plus `n`
    unqueried images of `ds` labelled by `teacher` -> (members, indices of the images added).
    The images are drawn at random (seeded) from those never asked about; none is a query."""
    extra = self_train_images(len(ds), chosen, n, seed)
    if len(extra) == 0:
        return list(getattr(teacher, "members", [teacher])), extra
    logits = _outputs(teacher, ds, extra, device)
    pseudo = torch.softmax(logits, 1) if soft else logits.argmax(1)
    x_all = QueriedImages(ds.images, np.concatenate([chosen, extra]))
    all_targets = torch.cat([targets, pseudo.to(targets.dtype)])
    fit_idx = np.concatenate([train_idx, len(chosen) + np.arange(len(extra))])
    return _fit_scratch(members, ds, x_all, fit_idx, all_targets, soft, epochs=epochs, lr=lr, batches=batches,
                        flip=flip, seed=seed, progress=progress, device=device, pool=pool), extra


def save_surrogate(s: Surrogate, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    obj = {"state_dict": s.module.state_dict(), "meta": s.meta}
    if s.trained_on is not None:
        obj["trained_on"] = torch.from_numpy(np.asarray(s.trained_on, dtype=np.int64))
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def load_surrogate(path: Path, *, trust_model: bool = False) -> Surrogate:
    """A saved surrogate: its members rebuilt from their names (an --init member from its SPEC,
    which must still be there; a `python:` one only with `trust_model`) and its weights loaded
    (`weights_only`: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"surrogate file not found: {path}", hint="make one with `flipback surrogate`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        meta = obj["meta"]
        c = meta["input_shape"][0]
        # Files from before member_pool: scratch members saw the full image.
        model = build_surrogate(meta["num_classes"], c, _members_of(meta), init=meta.get("init"),
                                input_shape=meta["input_shape"], trust_code=trust_model,
                                pool=int(meta.get("member_pool", 1)))
        model.load_state_dict(obj["state_dict"])
        trained_on = obj["trained_on"].numpy() if "trained_on" in obj else None
    except ModelError as exc:
        if "init" not in meta:
            raise ModelError(f"{path} is not a flipback surrogate (ModelError: {exc})") from None
        raise ModelError(f"cannot rebuild surrogate {path} from its --init model {meta['init']}: {exc.message}",
                         hint=exc.hint) from None
    except (KeyError, TypeError, RuntimeError, FlipbackError) as exc:
        raise ModelError(f"{path} is not a flipback surrogate ({type(exc).__name__}: {exc})") from None
    except Exception as exc:
        raise ModelError(f"cannot read surrogate {path}: {exc}") from None
    meta.setdefault("split", "unknown")  # files from before the split was recorded
    return Surrogate(model.eval(), meta, trained_on=trained_on)
