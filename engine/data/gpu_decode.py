"""``data.pipeline: gpu``: JPEG decode with nvjpeg on whole batches, crop + resize + flip + normalize on the GPU.

Where each step runs:

* **DataLoader workers (CPU)** (:func:`gpu_loader`, :class:`GpuTransform`): read the file's bytes and parse
  its JPEG header (:func:`parse_jpeg_header`: the SOF marker gives size, precision, component count and
  coding process; APP14 "Adobe" the colour transform), no pixel is decoded. The crop box and flip are
  drawn by the ``fast`` pipeline's own ``plan`` (same function, same RNG draws under the per-sample seed),
  so for a given (seed, epoch, index) the boxes equal the CPU pipelines' and resume stays exact. A sample
  is a :class:`PendingJpeg` (bytes + box + flip).
* **Fallback, per file**: what nvjpeg cannot decode correctly (:func:`nvjpeg_refusal`: not a JPEG, e.g.
  PNG; grayscale; CMYK/YCCK; progressive, arithmetic, lossless or 12-bit JPEGs; RGB-coded JPEGs; a missing
  end-of-image marker) is decoded right there by the ``fast`` pipeline (:func:`decode_resized_crop`) into
  a :class:`CpuDecoded` uint8 (3, S, S), with the reason. Never dropped; counted.
* **Collate** (:func:`collate_samples`): an :class:`EncodedBatch` of byte tensors, boxes and flips, plus
  the stacked CPU-decoded images.
* **Training process, on the device** (:meth:`EncodedBatch.to_model_input`, reached through the trainer's
  :func:`engine.transforms.to_model_input`): one batched ``torchvision.io.decode_jpeg(list, device="cuda")``
  call (nvjpeg; the hardware decoder where the GPU has one), then per image the integer crop
  (:func:`engine.transforms.pixel_box`, as on the CPU), an antialiased bilinear resize in float32 rounded to
  the 8-bit grid (the ``fast`` pipeline resizes uint8), the flip, and the normalization of the whole
  (N, 3, S, S) batch. A file nvjpeg still rejects is decoded on the CPU here (counted as ``nvjpeg_error``).

Fallbacks are counted per process by reason (:func:`fallback_counts`, read and reset by the training loop at
each epoch end for its ``cpu_decoded`` metric); the first file of each reason is named once on stderr (rank 0).

The nvjpeg decode blocks the training process's host thread (see :func:`nvjpeg_decode`): the batch's bytes
are staged and decoded synchronously, and the side stream is drained before each batch's decode.
"""
from __future__ import annotations

import collections
import os
import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from engine.data.errors import DECODE_ERRORS, CorruptImageError
from engine.data.transforms import (EncodedImage, FastTrainTransform, FastValTransform, _norm_constants,
                                    decode_resized_crop, pixel_box)

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without image decoders
    ImageReadMode = decode_jpeg = None

# Why a file is decoded on the CPU (the keys of fallback_counts()), with a phrase for the log line.
FALLBACK_REASONS = {
    "not_jpeg": "not a JPEG (e.g. PNG)",
    "grayscale": "a grayscale JPEG",
    "cmyk": "a CMYK/YCCK JPEG",
    "progressive": "a progressive JPEG",
    "other_jpeg": "a JPEG coding nvjpeg is not used for (arithmetic, lossless, 12-bit or RGB-coded)",
    "truncated": "a JPEG without its end-of-image marker",
    "nvjpeg_error": "a JPEG nvjpeg failed to decode",
}

_FALLBACKS: collections.Counter = collections.Counter()
_LOGGED: set[str] = set()


def fallback_counts(reset: bool = False) -> dict[str, int]:
    """Files this process decoded on the CPU instead of with nvjpeg, by reason (:data:`FALLBACK_REASONS`),
    counted as their batches reach :meth:`EncodedBatch.to_model_input`. ``reset`` zeroes the tally."""
    out = dict(_FALLBACKS)
    if reset:
        _FALLBACKS.clear()
    return out


def _note_fallback(reason: str, path: str, n: int = 1) -> None:
    _FALLBACKS[reason] += n
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        if os.environ.get("RANK", "0") == "0":
            print(f"data: gpu pipeline: {path} is {FALLBACK_REASONS[reason]}; decoding such files on the CPU "
                  "(counted, not listed again)", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- JPEG header
class JpegHeader(NamedTuple):
    """What the frame header (SOF) and APP14 segment say about a JPEG, without decoding it."""
    width: int
    height: int
    precision: int          # bits per sample (8, or 12 for extended JPEGs)
    components: int         # 1 grey, 3 YCbCr (or RGB), 4 CMYK/YCCK
    sof: int                # the SOF marker's second byte: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    component_ids: bytes    # b"\x01\x02\x03" usually; b"RGB" for an RGB-coded file
    adobe_transform: Optional[int]  # APP14 Adobe colour transform (0: none, i.e. RGB/CMYK; 1: YCbCr; 2: YCCK)
    has_eoi: bool           # the data ends with the end-of-image marker (else truncated)


# Start-of-frame markers; 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range but are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


def parse_jpeg_header(data: Union[bytes, bytearray, memoryview]) -> Optional[JpegHeader]:
    """Parse the marker segments of a JPEG up to its frame header; ``None`` if ``data`` is not a JPEG or
    its header is malformed or cut short (such a file goes to PIL, which names the problem)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, adobe = 2, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or start of scan before any frame header
            return None
        length = (data[i + 2] << 8) | data[i + 3]
        end = i + 2 + length
        if length < 2 or end > n:
            return None
        seg = data[i + 4:end]
        if marker == 0xEE and bytes(seg[:5]) == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        elif marker in _SOF_MARKERS:
            if len(seg) < 6:
                return None
            precision, height, width, comps = seg[0], (seg[1] << 8) | seg[2], (seg[3] << 8) | seg[4], seg[5]
            if len(seg) < 6 + 3 * comps or width == 0 or height == 0 or comps == 0:
                return None
            ids = bytes(seg[6 + 3 * k] for k in range(comps))
            tail = bytes(data[-64:]).rstrip(b"\x00")  # some writers pad after EOI
            return JpegHeader(width, height, precision, comps, marker, ids, adobe, tail.endswith(b"\xff\xd9"))
        i = end
    return None


def nvjpeg_refusal(h: Optional[JpegHeader]) -> Optional[str]:
    """``None`` if nvjpeg is used for this file; else the fallback reason (a :data:`FALLBACK_REASONS` key).

    nvjpeg is kept to what it decodes exactly like libjpeg-turbo up to IDCT rounding: 8-bit sequential
    Huffman (baseline/extended) YCbCr with three components. Progressive files would take nvjpeg's hybrid
    path, whose Huffman decoding runs on the training process's CPU one image at a time; the workers decode
    them faster. Grey and CMYK are listed as fallbacks by design."""
    if h is None:
        return "not_jpeg"
    if h.components == 1:
        return "grayscale"
    if h.components == 4:
        return "cmyk"
    if h.sof == 0xC2:
        return "progressive"
    if (h.sof not in (0xC0, 0xC1) or h.precision != 8 or h.components != 3 or h.adobe_transform == 0
            or h.component_ids == b"RGB"):
        return "other_jpeg"
    if not h.has_eoi:
        return "truncated"
    return None


# ------------------------------------------------------------------------------------- worker side
class LoadedFile:
    """A file read by :func:`gpu_loader`: its bytes and size, and either no fallback reason (nvjpeg will
    decode it) or the reason plus its PIL-parsed header (the CPU decodes it)."""

    __slots__ = ("data", "width", "height", "path", "fallback", "encoded")

    def __init__(self, data: bytearray, width: int, height: int, path: str, fallback: Optional[str] = None,
                 encoded: Optional[EncodedImage] = None):
        self.data, self.width, self.height, self.path = data, width, height, path
        self.fallback, self.encoded = fallback, encoded


def gpu_loader(path: str) -> LoadedFile:
    """Read ``path`` and classify it (worker side; no decoding). Non-JPEG and malformed files get PIL's
    header parse, which raises for junk (a corrupt file, as in the other pipelines)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    header = parse_jpeg_header(data)
    reason = nvjpeg_refusal(header)
    if reason is None:
        return LoadedFile(data, header.width, header.height, path)
    enc = EncodedImage.from_bytes(bytes(data))  # raises OSError/UnsupportedImageError for unusable files
    return LoadedFile(data, enc.width, enc.height, path, reason, enc)


class PendingJpeg(NamedTuple):
    """A sample for nvjpeg: the file's bytes as a uint8 (L,) tensor, its crop box ``(top, left, h, w)`` in
    full-resolution pixels, the flip, the output size (S, S) and the path (for error messages)."""
    data: torch.Tensor
    box: tuple
    flip: bool
    size: tuple
    path: str


class CpuDecoded(NamedTuple):
    """A sample the worker decoded on the CPU: uint8 (3, S, S), the fallback reason and the path."""
    image: torch.Tensor
    reason: str
    path: str


def is_pending(sample: Any) -> bool:
    """Whether ``sample`` comes from the ``gpu`` pipeline (so the batch needs :func:`collate_samples`)."""
    return isinstance(sample, (PendingJpeg, CpuDecoded))


class GpuTransform:
    """The ``gpu`` pipeline's transform around a ``fast`` one (:class:`FastTrainTransform` for training,
    :class:`FastValTransform` for validation), whose ``plan`` draws the box and flip and whose CPU decode
    serves the fallbacks.

    Args:
        cpu: the ``fast`` transform with the same image size and crop recipe.
    """

    def __init__(self, cpu: Union[FastTrainTransform, FastValTransform]):
        self.cpu = cpu
        self.size = tuple(cpu.size)

    def __call__(self, f: Any) -> Union[PendingJpeg, CpuDecoded]:
        if not isinstance(f, LoadedFile):
            raise TypeError(f"the gpu transform takes a LoadedFile (from gpu_loader), got {type(f).__name__}")
        box, flip = self.cpu.plan(f.height, f.width)  # the same RNG draws as the fast pipeline
        if f.fallback is None:
            return PendingJpeg(torch.frombuffer(f.data, dtype=torch.uint8), tuple(box), flip, self.size, f.path)
        return CpuDecoded(decode_resized_crop(f.encoded, box, self.size, flip), f.fallback, f.path)

    def __repr__(self) -> str:
        return f"GpuTransform({self.cpu!r})"


# ------------------------------------------------------------------------------------------ batches
DecodeFn = Callable[[list, torch.device], list]


# torch.cuda.OutOfMemoryError is torch.OutOfMemoryError on torch >= 2.5; AcceleratorError (torch >= 2.8) is
# how newer builds raise CUDA errors.
_DEVICE_ERRORS = (torch.cuda.OutOfMemoryError,) + ((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError")
                                                  else ())


def _is_device_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failure of the device rather than of one file: out of memory, or a CUDA error
    (an illegal access, a lost device: sticky, every later call would fail too). Those must stop training
    with their own message, not be hidden as a "file nvjpeg rejects" and retried on the CPU."""
    if isinstance(e, _DEVICE_ERRORS):
        return True
    msg = str(e).lower()
    return any(k in msg for k in ("out of memory", "cuda error", "cuda driver error", "cudaerror",
                                  "device-side assert"))


def nvjpeg_decode(data: list, device: torch.device) -> list:
    """Decode a list of JPEG byte tensors (CPU uint8) with nvjpeg into uint8 (3, H, W) tensors on ``device``,
    in one batched call; if the batch fails, file by file, with ``None`` for a file nvjpeg rejects. Device
    failures (out of memory, CUDA errors) are raised, never turned into per-file fallbacks.

    Blocks the host until the current stream's queued work is done and the decode has finished."""
    device = torch.device(device)
    if device.type == "cuda":
        # torchvision's decode_jpeg (0.29, pytorch/vision#9606) allocates its outputs on the caller's stream
        # (the DevicePrefetcher's side stream) but writes them on its own private stream without waiting on
        # the caller's. Blocks the previous batch freed may still be read by its crop/resize kernels queued on
        # the side stream; the allocator hands them to this decode, which would overwrite them. Draining the
        # caller's stream first makes that reuse safe (the decode blocks the host anyway).
        torch.cuda.current_stream(device).synchronize()
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as e:
        if _is_device_failure(e):
            raise
    out = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as e:  # this file only (nvjpeg refused its bitstream): the CPU decodes it
            if _is_device_failure(e):
                raise
            out.append(None)
    return out


class EncodedBatch:
    """One ``gpu`` pipeline batch as the DataLoader hands it over: the files for nvjpeg at positions
    ``gpu_pos`` and the CPU-decoded images ``cpu_images`` (M, 3, S, S) uint8 at ``cpu_pos``.

    The JPEG bytes travel as one uint8 tensor (``jpeg_data``, the files back to back, ``jpeg_sizes`` long):
    a worker hands each tensor over through its own shared-memory file, and one per file would exhaust the
    open-file limit at batch 256.

    Args:
        size: output (S, S).
        jpegs: the nvjpeg files' bytes (uint8 (L,) tensors), concatenated here.
        boxes, flips, paths: their crop boxes ``(top, left, h, w)``, flips and paths.
        gpu_pos, cpu_pos: positions of the two groups in the batch (together a permutation of 0..N-1);
            ``cpu_pos`` is also kept as an int64 (M,) tensor (``cpu_index``), built here on the worker and
            pinned with the batch, so that its copy to the device does not block the training loop.
        cpu_images: uint8 (M, 3, S, S), or None when M = 0.
        cpu_reasons, cpu_paths: why and which files were decoded on the CPU.
    """

    def __init__(self, size: Sequence[int], jpegs: list, boxes: list, flips: list, paths: list, gpu_pos: list,
                 cpu_images: Optional[torch.Tensor], cpu_pos: list, cpu_reasons: list, cpu_paths: list):
        self.size = tuple(size)
        self.jpeg_sizes = [int(j.numel()) for j in jpegs]
        self.jpeg_data = torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8)
        self.boxes, self.flips, self.paths, self.gpu_pos = boxes, flips, paths, gpu_pos
        self.cpu_images, self.cpu_pos, self.cpu_reasons, self.cpu_paths = cpu_images, cpu_pos, cpu_reasons, cpu_paths
        self.cpu_index = torch.tensor(cpu_pos, dtype=torch.int64)  # (M,)

    def __len__(self) -> int:
        return len(self.gpu_pos) + len(self.cpu_pos)

    @property
    def jpegs(self) -> list:
        """The nvjpeg files' bytes: contiguous uint8 (L,) views into ``jpeg_data``."""
        return list(torch.split(self.jpeg_data, self.jpeg_sizes)) if self.jpeg_sizes else []

    def pin_memory(self, device: Any = None) -> "EncodedBatch":
        """Called by the DataLoader's pin-memory thread: pinned host memory makes the copies to the GPU
        (the CPU-decoded images and their positions, nvjpeg's staging of the bytes) asynchronous DMA."""
        self.jpeg_data = self.jpeg_data.pin_memory()
        self.cpu_index = self.cpu_index.pin_memory()
        if self.cpu_images is not None:
            self.cpu_images = self.cpu_images.pin_memory()
        return self

    def to_model_input(self, device: torch.device, channels_last: bool = False,
                       decode: Optional[DecodeFn] = None) -> torch.Tensor:
        """Decode, crop, resize, flip and normalize on ``device``: model-ready float32 (N, 3, S, S).

        ``decode`` replaces :func:`nvjpeg_decode` (tests inject a CPU decoder; it returns one uint8
        (3, H, W) tensor or ``None`` per file)."""
        device = torch.device(device)
        if decode is None:
            if device.type != "cuda":
                raise RuntimeError(f"data.pipeline=gpu decodes on a CUDA device, got {device}")
            decode = nvjpeg_decode
        n, (out_h, out_w) = len(self), self.size
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((n, 3, out_h, out_w), dtype=torch.float32, device=device, memory_format=fmt)
        for reason, path in zip(self.cpu_reasons, self.cpu_paths):
            _note_fallback(reason, path)
        if self.cpu_images is not None:
            idx = self.cpu_index.to(device, non_blocking=True)
            out.index_copy_(0, idx, self.cpu_images.to(device, non_blocking=True).float())
        jpegs = self.jpegs
        if jpegs:
            decoded = decode(jpegs, device)  # list of uint8 (3, H_i, W_i) on device, None where rejected
            for img, box, flip, pos, path, data in zip(decoded, self.boxes, self.flips, self.gpu_pos, self.paths,
                                                       jpegs):
                if img is None:  # nvjpeg rejected this file after all: the CPU decodes it
                    _note_fallback("nvjpeg_error", path)
                    out[pos].copy_(self._cpu_decode(data, box, flip, path).to(device, non_blocking=True))
                    continue
                y0, y1, x0, x1 = pixel_box(box, img.shape[-2], img.shape[-1])
                crop = img[:, y0:y1, x0:x1].unsqueeze(0).float()  # (1, 3, h, w)
                if crop.shape[-2:] != (out_h, out_w):
                    # antialiased bilinear like the fast pipeline's uint8 resize, rounded to its 8-bit grid
                    crop = F.interpolate(crop, size=(out_h, out_w), mode="bilinear", align_corners=False,
                                         antialias=True).round_()  # convex weights: stays in [0, 255]
                out[pos].copy_(crop[0].flip(-1) if flip else crop[0])
        mean, inv_std = _norm_constants(device)
        return out.sub_(mean).mul_(inv_std)  # elementwise ops keep channels_last

    def _cpu_decode(self, data: torch.Tensor, box: tuple, flip: bool, path: str) -> torch.Tensor:
        try:
            return decode_resized_crop(EncodedImage.from_bytes(data.numpy().tobytes()), box, self.size, flip)
        except DECODE_ERRORS as e:
            # Too late to skip it (data.skip_corrupt): its label is already in the batch.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptImageError(f"corrupt or unreadable image {path}: {reason}") from None


def collate_samples(samples: Sequence[Union[PendingJpeg, CpuDecoded]]) -> EncodedBatch:
    """Group a batch's samples into an :class:`EncodedBatch` (worker side)."""
    gpu = [(i, s) for i, s in enumerate(samples) if isinstance(s, PendingJpeg)]
    cpu = [(i, s) for i, s in enumerate(samples) if isinstance(s, CpuDecoded)]
    if len(gpu) + len(cpu) != len(samples):
        raise TypeError("collate_samples takes PendingJpeg and CpuDecoded samples only")
    size = gpu[0][1].size if gpu else tuple(cpu[0][1].image.shape[-2:])
    return EncodedBatch(
        size, [s.data for _, s in gpu], [s.box for _, s in gpu], [s.flip for _, s in gpu],
        [s.path for _, s in gpu], [i for i, _ in gpu],
        torch.stack([s.image for _, s in cpu]) if cpu else None, [i for i, _ in cpu],
        [s.reason for _, s in cpu], [s.path for _, s in cpu])


# ------------------------------------------------------------------------------------- availability
def check_available() -> None:
    """Raise a one-line :class:`engine.config.ConfigError` unless nvjpeg decoding works on this machine:
    a CUDA device, and a torchvision built with nvjpeg (probed by decoding a tiny JPEG)."""
    from engine.config import ConfigError
    if not torch.cuda.is_available():
        raise ConfigError("config key 'data.pipeline': 'gpu' decodes JPEGs with nvjpeg on a CUDA GPU and this "
                          "machine has none; use data.pipeline=fast")
    if decode_jpeg is None:
        raise ConfigError("config key 'data.pipeline': 'gpu' needs torchvision's image decoders, which this "
                          "torchvision lacks; use data.pipeline=fast")
    from torchvision.io import encode_jpeg
    try:
        probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
        # the current device: the trainer has set it to this process's GPU (a context on GPU 0 per rank
        # would cost every rank memory there)
        decode_jpeg([probe], mode=ImageReadMode.RGB, device=torch.device("cuda", torch.cuda.current_device()))
    except Exception as e:  # whatever the probe raises (a RuntimeError, a missing CUDA library, ...) is one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config key 'data.pipeline': 'gpu' cannot decode with nvjpeg here ({reason}); "
                          "use data.pipeline=fast") from None
