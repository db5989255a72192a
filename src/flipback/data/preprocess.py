"""A model's eval transform (resize, center crop, channels), applied once, when decoding into the cache.

Corrections are then made and verified on these model-size 8-bit images: what the model sees
is exactly what is stored, so no resampling stands between a verified correction and the model.

Resize and crop follow torchvision's eval transform on PIL images (`Resize(int)` then
`CenterCrop`, the pipeline timm builds from a model's pretrained config), done with Pillow
itself, so the pixels match what timm or torchvision would give without needing either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from PIL import Image

# Pillow filters by the names timm and torchvision use.
FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
# Hugging Face processors store PIL's resample numbers.
FILTER_NAMES = {int(v): k for k, v in FILTERS.items()}


@dataclass(frozen=True)
class Preprocess:
    """Resize (the shorter side to `resize`, keeping the aspect ratio; or to exactly
    (height, width) when `resize` is a pair), then center-crop to height x width."""

    height: int
    width: int
    resize: int | tuple[int, int]
    interpolation: str = "bilinear"
    channels: int | None = None  # 3: gray images become RGB; 1: gray; None: the data's majority

    def __post_init__(self):
        if self.interpolation not in FILTERS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; known: {', '.join(FILTERS)}")
        if isinstance(self.resize, list):
            object.__setattr__(self, "resize", tuple(self.resize))

    @classmethod
    def for_size(cls, height: int, width: int, *, crop_pct: float = 1.0, interpolation: str = "bilinear",
                 squash: bool = False, channels: int | None = None) -> "Preprocess":
        """timm's eval recipe: scale to floor(size / crop_pct), center-crop to size. A square
        input resizes the shorter side; a non-square one (or squash) resizes both sides."""
        if squash or height != width:
            resize: int | tuple[int, int] = (int(height / crop_pct), int(width / crop_pct))
        else:
            resize = int(height / crop_pct)
        return cls(int(height), int(width), resize, interpolation, channels)

    def key(self) -> dict:
        """What the cache key holds: every field, so another transform is another entry."""
        d = asdict(self)
        d["resize"] = list(self.resize) if isinstance(self.resize, tuple) else self.resize
        return d

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(W, H) after the resize step, as torchvision computes it."""
        if isinstance(self.resize, tuple):
            return self.resize[1], self.resize[0]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def is_identity(self, w: int, h: int) -> bool:
        """True when an image of w x h comes out unchanged (size already right, nothing to crop)."""
        return self.resized_size(w, h) == (w, h) == (self.width, self.height)

    def __call__(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        if self.is_identity(w, h):
            return im
        rw, rh = self.resized_size(w, h)
        if (rw, rh) != (w, h):
            im = im.resize((rw, rh), FILTERS[self.interpolation])
        if (rw, rh) != (self.width, self.height):
            if rw < self.width or rh < self.height:  # torchvision pads; a model-size crop of a smaller image
                im = im.resize((max(rw, self.width), max(rh, self.height)), FILTERS[self.interpolation])
                rw, rh = im.size
            top = int(round((rh - self.height) / 2.0))
            left = int(round((rw - self.width) / 2.0))
            im = im.crop((left, top, left + self.width, top + self.height))
        return im

    def describe(self) -> str:
        r = f"{self.resize[1]}x{self.resize[0]}" if isinstance(self.resize, tuple) else f"shorter side {self.resize}"
        return f"resize ({r}, {self.interpolation}), center crop {self.width}x{self.height}"
