"""Image loading and augmentation for ImageNet-style ImageFolder data.

Three pipelines behind one interface (``data.pipeline``; :mod:`engine.data.pipeline` builds them), each a
``(loader, transform)`` pair for ``torchvision.datasets.ImageFolder(root, transform=transform, loader=loader)``:

* ``torchvision``: PIL decode, crop/resize on the PIL image, ``ToTensor`` + ``Normalize``; returns a
  normalized float (3, S, S) tensor.
* ``fast``: the loader reads the bytes and parses the header (:class:`EncodedImage`); the crop box is chosen
  *before* decoding, so a JPEG shrunk by >= 2x is decoded at reduced scale in the DCT domain; returns uint8
  (3, S, S), converted and normalized on the device by :func:`to_model_input`.
* ``gpu`` (:mod:`engine.data.gpu_decode`): the workers only read bytes; nvjpeg decodes whole batches on the GPU.

Every pipeline renders every PIL mode as 8-bit RGB the same way (:func:`to_rgb8`) and refuses modes without a
defined 8-bit range with :class:`UnsupportedImageError`. All sample crops from the same distribution for a
``crop`` recipe (``fcanet``: area [0.1, 1], ratio [0.8, 1.25]; ``torchvision``: [0.08, 1], [3/4, 4/3]) with
the ``RandomResizedCrop`` rule (:func:`sample_crop_box`), and flip with probability 1/2. Rationale and
measurements: docs/data.md#input-pipelines-datapipeline; the mode conversions: docs/data.md#image-files-and-folders.
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

from engine.data.errors import UnsupportedImageError

try:  # libjpeg-turbo / libpng decoders (deprecated in torchvision 0.29 in favour of TorchCodec; PIL is the fallback)
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - a torchvision without image decoders
    ImageReadMode = decode_image = None
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RECIPES = {
    "fcanet": {"scale": (0.1, 1.0), "ratio": (0.8, 1.25)},
    "torchvision": {"scale": (0.08, 1.0), "ratio": (3.0 / 4.0, 4.0 / 3.0)},
}
PIPELINES = ("fast", "torchvision", "gpu")
DRAFT_SCALES = (8, 4, 2)  # the DCT-domain downscales libjpeg offers through PIL's draft mode


# ------------------------------------------------------------------------------------------- image modes


# 16-bit grey modes (PNG, TIFF, PGM): 0..65535, scaled to 0..255.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Formats whose mode 'I' (32-bit int) images hold 16-bit samples: PIL reads 16-bit PGM/PPM (rescaled to
# 0..65535 from any maxval) and, in older Pillow versions, 16-bit PNG as 'I'.
I16_FORMATS = ("PNG", "PPM")
_MODE_NAMES = {"I": "32-bit integer", "F": "32-bit floating point"}


def check_mode(mode: str, format: Optional[str]) -> None:
    """Raise :class:`UnsupportedImageError` for modes :func:`to_rgb8` cannot render (header-only check)."""
    if mode == "F" or (mode == "I" and format not in I16_FORMATS):
        raise UnsupportedImageError(
            f"image mode {mode!r} ({_MODE_NAMES[mode]}, {format or 'unknown'} file) has no defined 8-bit range; "
            "convert the file to 8-bit RGB")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Render ``img`` (any PIL mode) as an 8-bit RGB image.

    * 8-bit modes (``1``, ``L``, ``P``, ``RGB(A/X/a)``, ``LA``, ``PA``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``):
      PIL's conversion; alpha is dropped (pixels keep their stored colour). A palette with transparency goes
      through RGBA (PIL warns on a direct conversion).
    * 16-bit modes (``I;16*``, and ``I`` from PNG/PGM): ``round(v / 257)``, so 0..65535 maps onto 0..255
      (PIL's own conversion clips at 255, turning almost every pixel white).
    * ``I`` from other formats and ``F``: :class:`UnsupportedImageError` (no defined range).
    """
    mode = img.mode
    if mode == "RGB":
        img.load()  # decode now: the caller may close the file
        return img
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and img.format in I16_FORMATS):
        a = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)  # (H, W)
        return Image.fromarray(((a + 128) // 257).astype(np.uint8)).convert("RGB")  # round(v / 257)
    check_mode(mode, img.format)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    try:
        return img.convert("RGB")
    except ValueError as e:  # a mode PIL cannot convert (e.g. 'La')
        raise UnsupportedImageError(f"image mode {mode!r} cannot be converted to RGB: {e}") from None


def _u16_to_u8(x: torch.Tensor) -> torch.Tensor:
    """uint16 -> uint8 with ``round(v / 257)`` (what :func:`to_rgb8` does), for torchvision's 16-bit PNG decode."""
    return ((x.to(torch.int32) + 128) // 257).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- loaders
def pil_loader(path: str) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image (the reference path; modes as in :func:`to_rgb8`)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        check_mode(img.mode, img.format)  # before decoding the pixels
        return to_rgb8(img)


def uint8_loader(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor of shape (3, H, W) (JPEG via libjpeg-turbo, PNG, ...)."""
    with open(path, "rb") as f:
        data = f.read()
    return _decode_full(EncodedImage.from_bytes(data))


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
            check_mode(img.mode, img.format)  # refuse e.g. float images before any pixel is decoded
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
def _decode_full(enc: EncodedImage) -> torch.Tensor:
    """Full-resolution uint8 (3, H, W) decode: libjpeg-turbo / libpng via torchvision, else PIL + :func:`to_rgb8`.

    The result may be a channels-last view (the decoders' interleaved RGB)."""
    if decode_image is not None and enc.format in ("JPEG", "PNG"):
        try:
            x = decode_image(torch.frombuffer(bytearray(enc.data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            x = None  # an encoding torchvision's decoders reject (e.g. arithmetic-coded JPEG): let PIL try
        if x is not None:
            # libpng's RGB conversion keeps 16 bits (uint16): scale like to_rgb8; alpha is dropped, palettes
            # (with or without transparency), grey and CMYK are converted as PIL does.
            return _u16_to_u8(x) if x.dtype == torch.uint16 else x
    with Image.open(io.BytesIO(enc.data)) as img:
        return _pil_to_tensor(to_rgb8(img))


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A (3, H, W) uint8 view of a writable copy of an RGB PIL image's pixels (HWC memory).

    ``np.asarray`` would share PIL's read-only export buffer, which torch warns about; the copy costs a few
    percent of the decode."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


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
            x = _pil_to_tensor(to_rgb8(img))
        top, left, h, w = top / s_y, left / s_x, h / s_y, w / s_x
    else:
        x = _decode_full(enc)
    y0, y1, x0, x1 = pixel_box((top, left, h, w), *x.shape[-2:])
    crop = x[:, y0:y1, x0:x1]
    if crop.shape[-2:] != (out_h, out_w):
        crop = F.interpolate(crop.unsqueeze(0), size=(out_h, out_w), mode="bilinear", align_corners=False,
                             antialias=True).squeeze(0)
    if flip:
        crop = crop.flip(-1)
    return crop.contiguous()


def pixel_box(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    """The integer rows ``y0:y1`` and columns ``x0:x1`` (returned as ``(y0, y1, x0, x1)``) of
    ``box = (top, left, h, w)`` in an image of ``height`` x ``width``, clamped to at least one pixel. The
    sampled boxes are integral at full resolution; a draft-scaled one moves < 1/2 px. Shared by the CPU and
    GPU pipelines."""
    top, left, h, w = box
    y0, x0 = min(max(int(round(top)), 0), height - 1), min(max(int(round(left)), 0), width - 1)
    y1, x1 = min(max(int(round(top + h)), y0 + 1), height), min(max(int(round(left + w)), x0 + 1), width)
    return y0, y1, x0, x1


class FastTrainTransform:
    """``fast`` train transform: ``EncodedImage`` -> random resized crop + flip, uint8 (3, S, S)."""

    def __init__(self, image_size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 flip_p: float = 0.5):
        self.size = (image_size, image_size)
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), flip_p

    def plan(self, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box and flip of one sample, from torch's RNG (which the data set seeds per sample).

        The ``gpu`` pipeline calls this too, so both draw the same boxes for the same (seed, epoch, index)."""
        box = sample_crop_box(height, width, self.scale, self.ratio)
        return box, bool(torch.rand(()) < self.flip_p)

    def __call__(self, enc: Any) -> torch.Tensor:
        if not isinstance(enc, EncodedImage):
            raise TypeError(f"the fast train transform takes an EncodedImage (from encoded_loader), "
                            f"got {type(enc).__name__}")
        box, flip = self.plan(enc.height, enc.width)
        return decode_resized_crop(enc, box, self.size, flip)

    def __repr__(self) -> str:
        return f"FastTrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p})"


class FastValTransform:
    """``fast`` val transform: ``EncodedImage`` -> the ``Resize(resize)`` + ``CenterCrop(S)`` region, uint8."""

    def __init__(self, image_size: int, resize: int):
        self.image_size, self.resize = image_size, resize
        self.size = (image_size, image_size)

    def plan(self, height: int, width: int) -> tuple[tuple[float, float, float, float], bool]:
        """The (deterministic) center-crop region and no flip."""
        return center_crop_box(height, width, self.image_size, self.resize), False

    def __call__(self, enc: Any) -> torch.Tensor:
        if not isinstance(enc, EncodedImage):
            raise TypeError(f"the fast val transform takes an EncodedImage (from encoded_loader), "
                            f"got {type(enc).__name__}")
        box, _ = self.plan(enc.height, enc.width)
        return decode_resized_crop(enc, box, self.size)

    def __repr__(self) -> str:
        return f"FastValTransform(image_size={self.image_size}, resize={self.resize})"


# ------------------------------------------------------------------------------------------ device side
_NORM_CACHE: dict[tuple[str, Optional[int]], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device.type, device.index)
    if key not in _NORM_CACHE:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        _NORM_CACHE[key] = (mean.to(device), inv_std.to(device))
    return _NORM_CACHE[key]


def to_model_input(images: Any, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Move a batch to ``device`` and make it model-ready (N, 3, H, W) float32.

    uint8 batches (the ``fast`` pipeline) are copied as uint8 (non-blocking from pinned memory), then
    converted to float and normalized on the device; the channels_last permute happens on the uint8 data,
    which is 4x cheaper. Float batches (the ``torchvision`` pipeline) are already normalized. No host sync.
    A ``gpu`` pipeline batch (:class:`engine.data.gpu_decode.EncodedBatch`, not a tensor) is decoded, cropped,
    resized, flipped and normalized on ``device`` by its own ``to_model_input``.
    """
    device = torch.device(device)
    if not torch.is_tensor(images):
        return images.to_model_input(device, channels_last)
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if images.dtype == torch.uint8:
        mean, inv_std = _norm_constants(device)
        images = images.float().sub_(mean).mul_(inv_std)  # elementwise ops keep the memory format
    return images
