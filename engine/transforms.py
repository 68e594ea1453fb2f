"""Image loading and augmentation for ImageNet-style ImageFolder data.

Two pipelines behind one interface (``data.pipeline`` in the config), each a ``(loader, transform)`` pair
for ``torchvision.datasets.ImageFolder(root, transform=transform, loader=loader)``:

* ``torchvision``: the reference recipe (``torchvision.transforms``): PIL decode, crop/resize on the PIL
  image, ``ToTensor`` + ``Normalize`` on the CPU; the transform returns a normalized float (3, S, S) tensor.
* ``fast``: the loader reads the file bytes and parses only the image header (:class:`EncodedImage`); the
  transform picks the crop box *before* decoding, so a JPEG whose crop is shrunk by >= 2x is decoded at
  1/2, 1/4 or 1/8 scale in the DCT domain (PIL draft mode), otherwise by libjpeg-turbo through
  ``torchvision.io.decode_image``; it then crops and resizes on uint8 (antialiased bilinear, like
  ``RandomResizedCrop``) and flips, returning uint8 (3, S, S). The batch travels to the device as uint8
  (4x fewer bytes) and :func:`to_model_input` converts and normalizes it there.

Both pipelines sample crops from the same distribution for a given ``crop`` recipe:
``fcanet`` (the authors' code: area scale in [0.1, 1], aspect ratio in [0.8, 1.25]) or ``torchvision``
(area scale in [0.08, 1], aspect ratio in [3/4, 4/3]), with the ``RandomResizedCrop`` sampling rule
(:func:`sample_crop_box`), and flip with probability 1/2.
"""
from __future__ import annotations

import io
import math
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

try:  # libjpeg-turbo / libpng decoders (deprecated in torchvision 0.29 in favour of TorchCodec; PIL is the fallback)
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - a torchvision without image decoders
    ImageReadMode = decode_image = None
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RECIPES = {
    "fcanet": {"scale": (0.1, 1.0), "ratio": (0.8, 1.25)},
    "torchvision": {"scale": (0.08, 1.0), "ratio": (3.0 / 4.0, 4.0 / 3.0)},
}
PIPELINES = ("fast", "torchvision")
DRAFT_SCALES = (8, 4, 2)  # the DCT-domain downscales libjpeg offers through PIL's draft mode


# ----------------------------------------------------------------------------------------------- loaders
def pil_loader(path: str) -> Image.Image:
    """Decode an image file to an RGB PIL image (the reference path)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def uint8_loader(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor of shape (3, H, W) (JPEG via libjpeg-turbo, PNG, ...)."""
    with open(path, "rb") as f:
        data = f.read()
    return _decode_full(EncodedImage.from_bytes(data), writable=True)


class EncodedImage:
    """An image file's bytes plus its header (size, mode, format), not yet decoded.

    Built by :func:`encoded_loader`; parsing the header there makes unreadable or non-image files fail in
    the loader (where the trainer catches corrupt files), while the pixel decode is left to the transform.
    """

    __slots__ = ("data", "width", "height", "mode", "format")

    def __init__(self, data: bytes, width: int, height: int, mode: str, format: Optional[str]):
        self.data, self.width, self.height, self.mode, self.format = data, width, height, mode, format

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncodedImage":
        with Image.open(io.BytesIO(data)) as img:  # header only; raises UnidentifiedImageError on junk
            w, h = img.size
            if w < 1 or h < 1:
                raise OSError(f"image has an empty size {w}x{h}")
            return cls(data, w, h, img.mode, img.format)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), like ``PIL.Image.size``."""
        return self.width, self.height

    def __repr__(self) -> str:
        return f"EncodedImage({self.format} {self.mode} {self.width}x{self.height}, {len(self.data)} bytes)"


def encoded_loader(path: str) -> EncodedImage:
    """Read an image file and parse its header (the ``fast`` pipeline's loader)."""
    with open(path, "rb") as f:
        data = f.read()
    return EncodedImage.from_bytes(data)


# ------------------------------------------------------------------------------------------ crop sampling
def sample_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                    generator: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """Sample a random-resized-crop box ``(top, left, h, w)`` for an image of ``height`` x ``width``.

    The ``RandomResizedCrop`` rule: up to 10 tries of an area fraction uniform in ``scale`` and an aspect
    ratio (w/h) log-uniform in ``ratio``; the first box that fits is placed uniformly at random. If none
    fits, the whole image is cropped to the nearest allowed aspect ratio, centered. All random numbers of
    one call are drawn at once from torch's RNG (``generator`` or the global one, which the DataLoader seeds
    per worker).
    """
    area = height * width
    u = torch.rand(10, 4, generator=generator, dtype=torch.float64).tolist()
    lo_s, hi_s = scale
    lo_r, hi_r = math.log(ratio[0]), math.log(ratio[1])
    for a, r, y, x in u:
        target = area * (lo_s + (hi_s - lo_s) * a)
        aspect = math.exp(lo_r + (hi_r - lo_r) * r)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            # uniform integer offsets in [0, height - h] and [0, width - w]
            return int(y * (height - h + 1)), int(x * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, size: int, resize: int) -> tuple[float, float, float, float]:
    """The region ``(top, left, h, w)`` of the original image that ``Resize(resize)`` + ``CenterCrop(size)``
    keeps, in original (fractional) pixel coordinates."""
    if height <= width:
        rh, rw = resize, int(resize * width / height)
    else:
        rh, rw = int(resize * height / width), resize
    sy, sx = height / rh, width / rw
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    return top * sy, left * sx, size * sy, size * sx


# ----------------------------------------------------------------------------------- decode + crop + resize
def _decode_full(enc: EncodedImage, writable: bool = False) -> torch.Tensor:
    """Full-resolution uint8 (3, H, W) decode: libjpeg-turbo / libpng via torchvision, else PIL.

    The result may be a channels-last view (the decoders' interleaved RGB); with ``writable=False`` it may
    also share PIL's read-only pixel buffer."""
    if decode_image is not None and enc.format in ("JPEG", "PNG") and enc.mode in ("RGB", "L", "CMYK", "RGBA", "LA", "P"):
        try:
            x = decode_image(torch.frombuffer(bytearray(enc.data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if x.dtype == torch.uint8:  # (a 16-bit PNG decodes to uint16: let PIL map it to 8 bits)
                return x
        except RuntimeError:
            pass  # an encoding torchvision's decoders reject (e.g. arithmetic-coded JPEG): let PIL try
    with Image.open(io.BytesIO(enc.data)) as img:
        x = _pil_to_tensor(img.convert("RGB"))
    return x.clone(memory_format=torch.preserve_format) if writable else x


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A (3, H, W) uint8 view of an RGB PIL image's pixels (HWC memory). The buffer is read-only: callers
    only read it (every output of this module is a fresh tensor), so the copy numpy would make is skipped."""
    return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


def draft_scale(enc: EncodedImage, box_h: float, box_w: float, out_h: int, out_w: int) -> int:
    """The largest DCT-domain downscale (8, 4, 2 or 1) that keeps the crop box at least ``out_h`` x ``out_w``
    pixels, i.e. the decode loses nothing the final (down)resize would keep. JPEG only."""
    if enc.format != "JPEG" or enc.mode not in ("RGB", "L"):
        return 1
    for s in DRAFT_SCALES:
        if box_h / s >= out_h and box_w / s >= out_w:
            return s
    return 1


def decode_resized_crop(enc: EncodedImage, box: tuple[float, float, float, float], size: tuple[int, int],
                        flip: bool = False) -> torch.Tensor:
    """Decode the region ``box = (top, left, h, w)`` of ``enc`` resized to ``size = (H, W)``, as uint8 (3, H, W).

    Equivalent to ``resized_crop(decode(enc), *box, size, antialias=True)`` (then a horizontal flip), except
    that a JPEG is decoded at the coarsest DCT scale that still covers the box at the output resolution.
    """
    out_h, out_w = size
    top, left, h, w = box
    s = draft_scale(enc, h, w, out_h, out_w)
    if s > 1:
        with Image.open(io.BytesIO(enc.data)) as img:
            img.draft("RGB", (enc.width // s, enc.height // s))
            s_x, s_y = enc.width / img.size[0], enc.height / img.size[1]  # the scale the decoder applied
            img = img.convert("RGB")
            x = _pil_to_tensor(img)
        top, left, h, w = top / s_y, left / s_x, h / s_y, w / s_x
    else:
        x = _decode_full(enc)
    H, W = x.shape[-2:]
    # integer pixel box (the sampled boxes are integral at full resolution; a draft-scaled one moves < 1/2 px)
    t, l = min(max(int(round(top)), 0), H - 1), min(max(int(round(left)), 0), W - 1)
    b, r = min(max(int(round(top + h)), t + 1), H), min(max(int(round(left + w)), l + 1), W)
    crop = x[:, t:b, l:r]
    if crop.shape[-2:] != (out_h, out_w):
        crop = F.interpolate(crop.unsqueeze(0), size=(out_h, out_w), mode="bilinear", align_corners=False,
                             antialias=True).squeeze(0)
    if flip:
        crop = crop.flip(-1)
    crop = crop.contiguous()
    if crop.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        crop = crop.clone()  # never hand out the (read-only) decode buffer itself
    return crop


class FastTrainTransform:
    """``fast`` train transform: ``EncodedImage`` -> random resized crop + flip, uint8 (3, S, S)."""

    def __init__(self, image_size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 flip_p: float = 0.5):
        self.size = (image_size, image_size)
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), flip_p

    def __call__(self, enc: Any) -> torch.Tensor:
        if not isinstance(enc, EncodedImage):
            raise TypeError(f"the fast train transform takes an EncodedImage (from encoded_loader), "
                            f"got {type(enc).__name__}")
        box = sample_crop_box(enc.height, enc.width, self.scale, self.ratio)
        flip = bool(torch.rand(()) < self.flip_p)
        return decode_resized_crop(enc, box, self.size, flip)

    def __repr__(self) -> str:
        return f"FastTrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p})"


class FastValTransform:
    """``fast`` val transform: ``EncodedImage`` -> the ``Resize(resize)`` + ``CenterCrop(S)`` region, uint8."""

    def __init__(self, image_size: int, resize: int):
        self.image_size, self.resize = image_size, resize

    def __call__(self, enc: Any) -> torch.Tensor:
        if not isinstance(enc, EncodedImage):
            raise TypeError(f"the fast val transform takes an EncodedImage (from encoded_loader), "
                            f"got {type(enc).__name__}")
        box = center_crop_box(enc.height, enc.width, self.image_size, self.resize)
        return decode_resized_crop(enc, box, (self.image_size, self.image_size))

    def __repr__(self) -> str:
        return f"FastValTransform(image_size={self.image_size}, resize={self.resize})"


# ------------------------------------------------------------------------------------------------- builders
def _check(image_size: int, pipeline: str, crop: Optional[str] = None, resize: Optional[int] = None) -> None:
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown data pipeline {pipeline!r}; expected one of {', '.join(PIPELINES)}")
    if crop is not None and crop not in CROP_RECIPES:
        raise ValueError(f"unknown crop recipe {crop!r}; expected one of {', '.join(CROP_RECIPES)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if resize is not None and (not isinstance(resize, int) or resize < image_size):
        raise ValueError(f"resize must be an int >= image_size={image_size}, got {resize!r}")


def build_train_transform(image_size: int, crop: str = "fcanet", pipeline: str = "fast"
                          ) -> tuple[Callable[[str], Any], Callable[[Any], torch.Tensor]]:
    """Return ``(loader, transform)`` for training: random-resized crop to ``image_size`` + horizontal flip.

    The ``fast`` transform returns uint8 (3, S, S); the ``torchvision`` one a normalized float tensor.
    """
    _check(image_size, pipeline, crop)
    recipe = CROP_RECIPES[crop]
    if pipeline == "fast":
        return encoded_loader, FastTrainTransform(image_size, **recipe)
    return pil_loader, T.Compose([
        T.RandomResizedCrop(image_size, **recipe), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_val_transform(image_size: int, resize: int, pipeline: str = "fast"
                        ) -> tuple[Callable[[str], Any], Callable[[Any], torch.Tensor]]:
    """Return ``(loader, transform)`` for evaluation: resize the shorter side to ``resize``, center-crop."""
    _check(image_size, pipeline, resize=resize)
    if pipeline == "fast":
        return encoded_loader, FastValTransform(image_size, resize)
    return pil_loader, T.Compose([
        T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ------------------------------------------------------------------------------------------ device side
_NORM_CACHE: dict[tuple[str, Optional[int]], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device.type, device.index)
    if key not in _NORM_CACHE:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        _NORM_CACHE[key] = (mean.to(device), inv_std.to(device))
    return _NORM_CACHE[key]


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Move a batch to ``device`` and make it model-ready (N, 3, H, W) float32.

    uint8 batches (the ``fast`` pipeline) are copied as uint8 (non-blocking from pinned memory), then
    converted to float and normalized on the device; the channels_last permute happens on the uint8 data,
    which is 4x cheaper. Float batches (the ``torchvision`` pipeline) are already normalized. No host sync.
    """
    device = torch.device(device)
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if images.dtype == torch.uint8:
        mean, inv_std = _norm_constants(device)
        images = images.float().sub_(mean).mul_(inv_std)  # elementwise ops keep the memory format
    return images
