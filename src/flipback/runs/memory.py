"""Sizing batches under a memory cap (`--max-memory`), so a large model or image size gives
smaller batches, or one clear error, never a kernel kill.

The cap is on the memory of the device the attack runs on: the process's resident memory on
the CPU (and MPS, which shares it), the device's memory on CUDA. The default is 80% of what
the process could use when the run starts: what it already holds plus what the system (or
the CUDA device) reports free. A run's batch is then

    min(--batch-size, (cap - memory already in use - RESERVE) // bytes per image)

(on the CPU also at most CPU_BATCH_PIXELS pixels a channel: 16 images at 224 px, which run
faster than larger batches), where the bytes per image are estimated once per run, before any query:
- the model: the bytes autograd saves for one image's backward pass, measured on the model
  itself (one forward pass of 1 and one of 2 blank images, not counted as queries; the
  difference leaves out the weights), times 2 for the gradients and the forward pass's
  temporaries;
- the attack: what its method says it keeps per image (`CorrectiveAttack.state_bytes`: a
  number of float32 copies of the image, `state_copies`, and what its options add).
RESERVE (256 MiB, on the CPU and MPS only) is kept for what a run loads after the plan.
Prediction of the data set (forward passes only, no backward) uses the model's part alone.
If the cap cannot hold one image, the run stops with `MemoryLimitError` before its first batch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ..attacks import ATTACKS, CorrectiveAttack
from ..errors import FlipbackError

#: The default cap, as a fraction of the memory the process could use when the run starts.
DEFAULT_FRACTION = 0.8
#: The model's saved activations, times this: their gradients and the forward's temporaries.
AUTOGRAD_FACTOR = 2.0
#: Kept free of batches on the CPU (and MPS): what a run loads after the plan (SciPy,
#: scikit-image, Pillow, the report's matplotlib) and the allocator's slack. Measured: a
#: 224-px run with batches of 1 peaked about 180 MiB above the memory in use at its plan.
RESERVE = 256 * 2**20

#: On the CPU an explain batch holds at most this many pixels a channel: 16 images at 224 px
#: (784 at 32 px, so the default --batch-size of 256 stands there). Larger batches are slower
#: per image, not faster: `minimal` on 100 EfficientNet-Lite0 errors at 224 px ran 0.82
#: images/s in the batches the memory cap allowed and 1.49 in batches of 16 (2 cores).
CPU_BATCH_PIXELS = 16 * 224 * 224

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


class MemoryLimitError(FlipbackError):
    """The run cannot fit under its memory cap."""


def parse_memory(text: str | int | None) -> int | None:
    """'8G', '8GiB', '500MB', '1.5g', a plain number of bytes, or 'auto'/None (the default) ->
    bytes (None for the default). K/M/G/T alone are binary (GiB); kB/MB/GB/TB decimal."""
    if text is None or isinstance(text, int):
        return text
    t = str(text).strip().lower()
    if t in ("", "auto"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", t)
    if not m or m.group(2) not in _UNITS:
        raise FlipbackError(f"cannot read memory size '{text}'", hint="e.g. --max-memory 8G, 512M or 4GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise FlipbackError(f"--max-memory must be above 0, got '{text}'")
    return value


def human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_memory() -> int:
    """This process's resident memory now (Linux); its peak elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def system_available() -> int:
    avail = _meminfo("MemAvailable")
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            avail = 4 * 2**30
    return avail


def in_use(device: torch.device) -> int:
    """Memory already in use on the device the cap applies to."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return resident_memory()


def default_cap(device: torch.device) -> int:
    """80% of what the process could use: what it holds plus what is free."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(DEFAULT_FRACTION * (free + torch.cuda.memory_allocated(device)))
    return int(DEFAULT_FRACTION * (resident_memory() + system_available()))


def saved_bytes(module: torch.nn.Module, shape_chw, device: torch.device, k: int) -> int | None:
    """Bytes autograd saves for the input gradient of `module` on k blank images; None where the
    model fails on them (its first real batch then says why, in the run's own words)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    x = torch.full((k, *shape_chw), 0.5, device=device, requires_grad=True)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
    except Exception:  # noqa: BLE001 - a broken model is reported where it is first used
        return None
    return sum(seen.values())


@dataclass
class MemoryPlan:
    cap: int  # bytes
    in_use: int  # bytes in use when the plan was made
    model_per_image: int  # bytes: the model's forward + backward for one image
    per_image: int  # bytes: the model's part and the attack's state
    batch_size: int  # the explain batch
    predict_batch_size: int  # the forward-only batch that finds the errors

    def to_dict(self) -> dict:
        return {"max_memory": self.cap, "in_use": self.in_use, "bytes_per_image": self.per_image,
                "batch_size": self.batch_size}


def estimate_per_image(module: torch.nn.Module | None, method: str, shape_chw, device: torch.device,
                       options: dict | None = None) -> tuple[int, int]:
    """(model bytes, model + attack bytes) for one image; `options` are the attack's."""
    c, h, w = shape_chw
    state = ATTACKS.get(method, CorrectiveAttack).state_bytes(tuple(shape_chw), options)
    saved = saved_per_image(module, shape_chw, device) if module is not None else None
    model = int(AUTOGRAD_FACTOR * saved) + c * h * w * 4 if saved is not None else 0
    return model, model + state


def saved_per_image(module: torch.nn.Module, shape_chw, device: torch.device) -> int | None:
    """Bytes autograd saves per image: measured on 1 and on 2 images, the difference (weights
    saved for backward are not per image); None where the model fails on blank images."""
    one = saved_bytes(module, shape_chw, device, 1)
    two = saved_bytes(module, shape_chw, device, 2) if one is not None else None
    return max(two - one, 0) if two is not None else None


def plan(module: torch.nn.Module | None, method: str, shape_chw, device: torch.device, *,
         max_memory: str | int | None, batch_size: int, predict_batch_size: int = 500,
         options: dict | None = None) -> MemoryPlan:
    """The batch sizes that fit under the cap, or MemoryLimitError if not one image fits.
    `options`: the attack's keyword arguments (some change what it keeps per image)."""
    cap = parse_memory(max_memory)
    cap = default_cap(device) if cap is None else cap
    model, per_image = estimate_per_image(module, method, shape_chw, device, options)
    used = in_use(device)
    reserve = 0 if device.type == "cuda" else RESERVE  # libraries live in RAM, not on the GPU
    room = cap - used - reserve
    fits = room // per_image if per_image > 0 else batch_size
    if fits < 1:
        c, h, w = shape_chw
        where = "GPU memory" if device.type == "cuda" else "memory"
        raise MemoryLimitError(
            f"the memory cap of {human(cap)} cannot hold one image: {method} on a {c}x{h}x{w} model input needs "
            f"about {human(per_image)} per image, on top of the {human(used)} of {where} already in use"
            + (f" and {human(reserve)} kept for the libraries a run loads later" if reserve else ""),
            hint="raise --max-memory (the default is 80% of the memory free when the run starts), or free memory")
    if device.type == "cpu":
        fits = min(fits, CPU_BATCH_PIXELS // (shape_chw[1] * shape_chw[2]))
    return MemoryPlan(cap, used, model, per_image, int(max(1, min(batch_size, fits))),
                      int(max(1, min(predict_batch_size, room // max(model, 1)))))


#: Image-sized float32 tensors a training step keeps per image besides the model's activations:
#: the uint8 read, its float copy, the augmented copy and its device copy.
TRAIN_COPIES = 4
#: A training step's peak over its saved activations: the backward pass frees them as it goes.
#: Measured (2 SGD steps on the CPU, peak resident memory above the start): EfficientNet-Lite1
#: at 224 px (frozen batch-norm, channels-last) 1,938 MiB at batches of 16 and 3,919 at 32, 124
#: MiB an image against 102 saved (explain's factor of 2 would have lowered the batch of 128
#: that peaked at 15.2 GiB to about 84 under the default cap on 24 GiB); the ResNet-20 member
#: pooled at 224 px: 8.3 MiB an image against an estimate of 8.6 at this factor. Small models
#: at 32 px peak up to about 300 MiB above the estimate at batches of 256: RESERVE covers that.
TRAIN_AUTOGRAD_FACTOR = 1.25


def training_bytes(module: torch.nn.Module, shape_chw, device: torch.device, *,
                   frozen_bn: bool = False) -> tuple[int, int]:
    """(bytes per image, fixed bytes) of a training step of `module`: its saved activations
    times TRAIN_AUTOGRAD_FACTOR plus TRAIN_COPIES image copies; and the gradients and SGD
    momentum of its trainable weights. Measured in training mode, as the step runs (with
    `frozen_bn`, batch-norm layers in eval mode, as such training runs them); the buffers
    (batch-norm running statistics) are put back after."""
    c, h, w = shape_chw
    modes = {m: m.training for m in module.modules()}
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.train()
    if frozen_bn:
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    try:
        saved = saved_per_image(module, shape_chw, device)
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
    per_image = (int(TRAIN_AUTOGRAD_FACTOR * saved) if saved is not None else 0) + TRAIN_COPIES * c * h * w * 4
    fixed = 2 * sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return per_image, fixed


def training_batch(module: torch.nn.Module, shape_chw, device: torch.device, *, max_memory: str | int | None,
                   batch_size: int, what: str = "the surrogate", frozen_bn: bool = False) -> int:
    """The training batch (at most `batch_size`) whose step fits under the cap, next to the
    memory in use (and RESERVE on the CPU): see training_bytes. MemoryLimitError if not one
    image fits."""
    cap = parse_memory(max_memory)
    cap = default_cap(device) if cap is None else cap
    c, h, w = shape_chw
    per_image, fixed = training_bytes(module, shape_chw, device, frozen_bn=frozen_bn)
    used = in_use(device)
    reserve = 0 if device.type == "cuda" else RESERVE
    room = cap - used - reserve - fixed
    fits = room // per_image
    if fits < 1:
        where = "GPU memory" if device.type == "cuda" else "memory"
        raise MemoryLimitError(
            f"the memory cap of {human(cap)} cannot train {what} on one {c}x{h}x{w} image: it needs about "
            f"{human(per_image)} per image and {human(fixed)} for its gradients and momentum, on top of the "
            f"{human(used)} of {where} already in use" + (f" and {human(reserve)} kept free" if reserve else ""),
            hint="raise --max-memory (the default is 80% of the memory free when training starts), free memory, "
                 "or train on a smaller input size")
    return int(max(1, min(batch_size, fits)))


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure that PyTorch raised rather than the kernel killing the process."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg.lower())


def plan_for_engine(engine, cfg, shape_hwc) -> MemoryPlan:
    """The plan for a run's engine (runs.engine.Engine) and config (its method, batch size and
    max_memory): the guide's module is measured on its device. The engine is closed if the run
    cannot fit."""
    h, w, c = shape_hwc
    guide = engine.guide
    try:
        return plan(getattr(guide, "module", None), cfg.method, (c, h, w), getattr(guide, "device", torch.device("cpu")),
                    max_memory=cfg.max_memory, batch_size=cfg.batch_size, options=cfg.options)
    except BaseException:
        engine.close()
        raise
