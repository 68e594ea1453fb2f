"""``data.pipeline: gpu``: JPEG decode with nvjpeg on whole batches, crop + resize + flip + normalize on the GPU.

DataLoader workers (:func:`gpu_loader`, :class:`GpuTransform`) read a file's bytes, parse its JPEG header
(:func:`parse_jpeg_header`) and draw the crop box and flip with the ``fast`` pipeline's own ``plan`` (same RNG
draws, so resume stays exact): a :class:`PendingJpeg`. Files nvjpeg is not used for (:func:`nvjpeg_refusal`)
are decoded there on the CPU into a :class:`CpuDecoded` (counted, never dropped). :func:`collate_samples` makes
an :class:`EncodedBatch`. In the training process, a decode thread (:class:`engine.data.loader.DevicePrefetcher`)
runs :func:`decode_batch`: one batched nvjpeg call, the integer crop, the batched antialiased resize
(:func:`resize_crops`), flips and normalization. Failures (:func:`nvjpeg_decode`) are never a silent slow path:
a device failure stops the run with one line (:class:`GpuDecodeError`), a file nvjpeg rejects is found by
halving the batch and decoded on the CPU, and most of a batch rejected stops the run. The user-facing account,
with the metrics, is in docs/data.md ("Input pipelines").
"""
from __future__ import annotations

import collections
import os
import re
import sys
import threading
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch

from engine.data.errors import DECODE_ERRORS, CorruptImageError, GpuDecodeError
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

WARN_FALLBACK_RATE = 0.05  # warn when more than this share of an epoch's images was decoded on the CPU ...
WARN_MIN_IMAGES = 512      # ... once at least this many images of the epoch went through the gpu pipeline
STOP_MIN_FILES = 4         # a batch stops the run when nvjpeg rejects more than half of it and >= this many


class _Stats:
    """Per-process tally of one epoch (the decode thread writes, the training loop reads and resets)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.fallbacks: collections.Counter = collections.Counter()
        self.images = 0        # images of gpu-pipeline batches seen this epoch
        self.warned = False    # the fallback-rate warning was printed this epoch
        self.logged: set[str] = set()  # reasons already named on stderr (once per process)


_STATS = _Stats()


def _rank_suffix() -> str:
    rank = os.environ.get("RANK", "0")
    return f" (rank {rank})" if rank != "0" else ""


def fallback_counts(reset: bool = False) -> dict[str, int]:
    """Files this process decoded on the CPU instead of with nvjpeg, by reason (:data:`FALLBACK_REASONS`),
    counted as their batches are decoded (:func:`decode_batch`). ``reset`` zeroes the tally and re-arms the
    once-per-epoch fallback-rate warning (the training loop resets it at every epoch end)."""
    with _STATS.lock:
        out = dict(_STATS.fallbacks)
        if reset:
            _STATS.fallbacks.clear()
            _STATS.images, _STATS.warned = 0, False
    return out


def _note_fallback(reason: str, path: str, n: int = 1) -> None:
    with _STATS.lock:
        _STATS.fallbacks[reason] += n
        first = reason not in _STATS.logged
        _STATS.logged.add(reason)
    if first and os.environ.get("RANK", "0") == "0":
        print(f"data: gpu pipeline: {path} is {FALLBACK_REASONS[reason]}; decoding such files on the CPU "
              "(counted, not listed again)", file=sys.stderr, flush=True)


def _note_batch(images: int) -> None:
    """Count a decoded batch; warn once per epoch when the share of CPU-decoded images passes the threshold."""
    with _STATS.lock:
        _STATS.images += images
        cpu = sum(_STATS.fallbacks.values())
        total = _STATS.images
        if _STATS.warned or total < WARN_MIN_IMAGES or cpu <= WARN_FALLBACK_RATE * total:
            return
        _STATS.warned = True
        parts = ", ".join(f"{k} {v}" for k, v in sorted(_STATS.fallbacks.items()) if v)
    print(f"warning: data: gpu pipeline: {cpu:,} of this epoch's {total:,} images so far ({100 * cpu / total:.1f}%, "
          f"more than {100 * WARN_FALLBACK_RATE:g}%) were decoded on the CPU ({parts}): a slow path; see "
          f"cpu_decoded in metrics.jsonl, or use data.pipeline=fast for such data{_rank_suffix()}",
          file=sys.stderr, flush=True)


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

    nvjpeg is used for 8-bit sequential Huffman (baseline/extended) YCbCr JPEGs with three components, the
    files its batched (hardware) path takes. Its IDCT and chroma upsampling are not libjpeg-turbo's: pixels
    differ slightly from the CPU pipelines' (the CUDA test accepts a mean absolute difference below 2 levels
    and at most 40 levels at any pixel of the cropped, resized output; no measured figure of the gap is
    recorded here). Progressive files would take nvjpeg's hybrid path, whose Huffman decoding runs on the
    training process's CPU one image at a time; the workers decode them faster. Grey and CMYK are listed as
    fallbacks by design."""
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


# ------------------------------------------------------------------------------------------ decoding
DecodeFn = Callable[[list, torch.device], list]
"""``(list of uint8 (L,) CPU tensors, device) -> list of uint8 (3, H, W) tensors``, raising on failure (the
signature of a batched ``torchvision.io.decode_jpeg`` call; tests inject CPU stand-ins)."""

# torch.cuda.OutOfMemoryError is torch.OutOfMemoryError on torch >= 2.5; AcceleratorError (torch >= 2.8) is
# how newer builds raise CUDA errors.
_DEVICE_ERRORS = (torch.cuda.OutOfMemoryError,) + ((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError")
                                                  else ())
# nvjpegStatus_t (nvjpeg.h). The batched decode reports them as "Failed to <step>: <status>" (torchvision
# 0.29, decode_jpegs_cuda.cpp), wrapped in "Error while decoding JPEG images: ...".
NVJPEG_STATUS = {1: "not initialized", 2: "invalid parameter", 3: "bad JPEG", 4: "JPEG not supported",
                 5: "allocator failure", 6: "execution failed", 7: "architecture mismatch", 8: "internal error",
                 9: "implementation not supported", 10: "incomplete bitstream"}
# Statuses that say nothing about the file: every later call would fail too. 5 follows a CUDA out-of-memory
# (nvjpeg allocates with cudaMalloc, outside torch's caching allocator; pytorch/vision#4378).
DEVICE_STATUS = frozenset({1, 5, 6, 7, 8})
_STATUS_RE = re.compile(r"Failed to ([A-Za-z][A-Za-z ]*?): (-?\d+)")


def device_failure(e: BaseException) -> Optional[str]:
    """A one-line description if ``e`` is a failure of the device rather than of one file (CUDA out of memory,
    a CUDA error, an nvjpeg status in :data:`DEVICE_STATUS`, a failed CUDA stream synchronisation), else
    ``None`` (the file is at fault: nvjpeg status 2, 3, 4, 9, 10 or another message)."""
    text = " ".join(str(e).split())
    if isinstance(e, _DEVICE_ERRORS):
        return f"{type(e).__name__}: {text[:160]}"
    for step, code in _STATUS_RE.findall(text):
        if step == "synchronize CUDA stream":
            return f"CUDA stream synchronisation failed (cudaError {code})"
        if int(code) in DEVICE_STATUS:
            return f"nvjpeg status {code} ({NVJPEG_STATUS[int(code)]}) in '{step}'"
    low = text.lower()
    if any(k in low for k in ("out of memory", "cuda error", "cuda driver error", "cudaerror", "device-side assert")):
        return text[:160]
    return None


def _synchronize(device: torch.device) -> None:
    """After a failed batched call: wait for the device, so that a broken CUDA context (an illegal access, a
    lost device) raises its own error here instead of passing as a file nvjpeg rejects."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_index(device: Any) -> torch.device:
    """``device`` with its index: torchvision keeps one global nvjpeg decoder and rebuilds it (leaking the
    old one) whenever the requested device differs, and ``"cuda"`` differs from ``"cuda:0"``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class DecodeResult(NamedTuple):
    """What :func:`nvjpeg_decode` made of a list of files."""
    images: list          # uint8 (3, H, W) on the device, or None where nvjpeg rejected the file
    errors: dict          # {position: one-line message} of the rejected files
    calls: int            # batched decode calls made (1 when the batch decoded at once)


def nvjpeg_decode(data: list, device: Any, decode: Optional[DecodeFn] = None) -> DecodeResult:
    """Decode a list of JPEG byte tensors (CPU uint8) into uint8 (3, H, W) tensors on ``device`` in one
    batched nvjpeg call (``decode`` replaces it in tests).

    If the call fails for a reason that is not the device's (:func:`device_failure`), the device is
    synchronised (a broken CUDA context raises there) and each half of the list is tried again, down to the
    single rejected files: ``None`` at their positions. A device failure raises :class:`GpuDecodeError`.

    Blocks the calling thread until the decode has finished (torchvision synchronises its nvjpeg stream)."""
    device = with_index(device)
    if decode is None:
        def decode(items: list, dev: torch.device) -> list:
            return list(decode_jpeg(items, mode=ImageReadMode.RGB, device=dev))
    images: list = [None] * len(data)
    errors: dict[int, str] = {}
    calls = 0

    def attempt(lo: int, hi: int) -> None:
        nonlocal calls
        calls += 1
        try:
            images[lo:hi] = list(decode(data[lo:hi], device))
            return
        except (RuntimeError, ValueError) as e:
            why = device_failure(e)
            if why is not None:
                raise GpuDecodeError(f"data.pipeline=gpu: the GPU failed while decoding a batch of {hi - lo} "
                                     f"JPEG(s) with nvjpeg: {why}; free GPU memory (lower train.batch_size) "
                                     "or use data.pipeline=fast") from None
            _synchronize(device)
            if hi - lo == 1:
                errors[lo] = " ".join(str(e).split())[:200] or type(e).__name__
                return
        mid = (lo + hi) // 2
        attempt(lo, mid)
        attempt(mid, hi)

    if data:
        attempt(0, len(data))
    return DecodeResult(images, errors, calls)


def _weights(lengths: torch.Tensor, out: int, pad: int, flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Antialiased bilinear resize weights, (n, out, pad) float32: row ``i`` of image ``k`` holds the weights
    of input positions ``0 .. lengths[k] - 1`` for output position ``i`` (zero beyond ``lengths[k]``), as
    ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` computes them: a triangle filter
    of half-width max(1, scale) around ``scale * (i + 0.5)``, normalised (scale = length / out). ``flip``
    (n,) bool reverses the output positions of the images it marks."""
    dev = lengths.device
    length = lengths.to(torch.float32)[:, None, None]                      # (n, 1, 1)
    scale = length / out
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))
    invscale = 1.0 / support
    center = scale * (torch.arange(out, device=dev, dtype=torch.float32)[None, :, None] + 0.5)  # (n, out, 1)
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length)
    pos = torch.arange(pad, device=dev, dtype=torch.float32)[None, None, :]  # (1, 1, pad)
    w = torch.clamp(1.0 - ((pos - center + 0.5) * invscale).abs(), min=0.0) * ((pos >= lo) & (pos < hi))
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    if flip is not None:
        w = torch.where(flip[:, None, None], w.flip(1), w)
    return w


def resize_crops(images: Sequence[torch.Tensor], boxes: Sequence[tuple], flips: Sequence[bool],
                 size: tuple, budget: int = 48 * 2 ** 20) -> torch.Tensor:
    """Crop, resize and flip a batch of decoded images at once: float32 (n, 3, S_h, S_w), rounded to integers.

    ``images``: uint8 (3, H_k, W_k) on one device; ``boxes``: ``(y0, y1, x0, x1)`` integer crops
    (:func:`pixel_box`); ``flips``: horizontal flips; ``size``: (S_h, S_w). Equals, per image,
    ``F.interpolate(crop.float(), size, mode="bilinear", antialias=True).round()`` (flipped) up to float
    rounding: the separable filter is applied as two batched matrix products, vertical then horizontal
    (:func:`_weights`), over crops zero-padded to the largest of a group. Images are grouped by crop size so
    that each group's padded float copy holds at most ``budget`` elements; the launches are one copy per
    image plus a fixed number per group."""
    n = len(images)
    out_h, out_w = size
    dev = images[0].device if n else torch.device("cpu")
    result = torch.empty((n, 3, out_h, out_w), dtype=torch.float32, device=dev)
    hs = [b[1] - b[0] for b in boxes]
    ws = [b[3] - b[2] for b in boxes]
    order = sorted(range(n), key=lambda k: -hs[k] * ws[k])
    start = 0
    while start < n:
        # the largest crops first: each group's padding is set by its first member
        ph, pw, stop = hs[order[start]], ws[order[start]], start + 1
        while stop < n and (stop + 1 - start) * 3 * max(ph, hs[order[stop]]) * max(pw, ws[order[stop]]) <= budget:
            ph, pw, stop = max(ph, hs[order[stop]]), max(pw, ws[order[stop]]), stop + 1
        group = order[start:stop]
        padded = torch.zeros((len(group), 3, ph, pw), dtype=torch.float32, device=dev)
        for j, k in enumerate(group):
            y0, y1, x0, x1 = boxes[k]
            padded[j, :, :y1 - y0, :x1 - x0].copy_(images[k][:, y0:y1, x0:x1])  # uint8 -> float32
        meta = torch.tensor([[hs[k], ws[k], int(bool(flips[k]))] for k in group], dtype=torch.int64).to(dev)
        wy = _weights(meta[:, 0], out_h, ph)                                  # (g, S_h, ph)
        wx = _weights(meta[:, 1], out_w, pw, meta[:, 2].bool())              # (g, S_w, pw)
        tmp = torch.matmul(wy[:, None], padded)                               # (g, 3, S_h, pw)
        res = torch.matmul(tmp, wx.transpose(1, 2)[:, None])                  # (g, 3, S_h, S_w)
        result.index_copy_(0, torch.tensor(group, dtype=torch.int64).to(dev), res.round_())
        start = stop
    return result


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
        """Decode, crop, resize, flip and normalize on ``device``: model-ready float32 (N, 3, S, S)
        (:func:`decode_batch`; a file no decoder can read raises :class:`CorruptImageError`).

        ``decode`` replaces nvjpeg's batched call (tests inject a CPU decoder, see :data:`DecodeFn`)."""
        return decode_batch(self, device, channels_last, decode=decode).images


class DecodedBatch(NamedTuple):
    """:func:`decode_batch`'s result."""
    images: Optional[torch.Tensor]  # float32 (M, 3, S, S) on the device; None when every file was dropped
    kept: Optional[torch.Tensor]    # int64 (M,) positions kept in the batch (on the device); None: all N kept
    dropped: int                    # files no decoder could read, dropped (data.skip_corrupt)


def _cpu_decode(data: torch.Tensor, box: tuple, size: tuple, flip: bool, path: str) -> torch.Tensor:
    try:
        return decode_resized_crop(EncodedImage.from_bytes(data.numpy().tobytes()), box, size, flip)
    except DECODE_ERRORS as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptImageError(f"corrupt or unreadable image {path}: {reason}") from None


def decode_batch(batch: "EncodedBatch", device: Any, channels_last: bool = False, decode: Optional[DecodeFn] = None,
                 skip_corrupt: bool = False) -> DecodedBatch:
    """Turn an :class:`EncodedBatch` into model-ready float32 (N, 3, S, S) on ``device``: the worker-decoded
    images are copied in, the others decoded by nvjpeg (:func:`nvjpeg_decode`; ``decode`` replaces its batched
    call), cropped, resized and flipped together (:func:`resize_crops`); then the batch is normalized.

    A file nvjpeg rejects is decoded on the CPU (counted as ``nvjpeg_error``). One no decoder can read raises
    :class:`CorruptImageError`, or with ``skip_corrupt`` is dropped: the result then holds the ``kept``
    positions (apply them to the labels). If nvjpeg rejects more than half of the batch's files (and at least
    :data:`STOP_MIN_FILES`), the GPU decode is failing, not the files: :class:`GpuDecodeError`."""
    device = with_index(device)
    if decode is None and device.type != "cuda":
        raise RuntimeError(f"data.pipeline=gpu decodes on a CUDA device, got {device}")
    n, size = len(batch), batch.size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, 3, *size), dtype=torch.float32, device=device, memory_format=fmt)
    for reason, path in zip(batch.cpu_reasons, batch.cpu_paths):
        _note_fallback(reason, path)
    if batch.cpu_images is not None:
        idx = batch.cpu_index.to(device, non_blocking=True)
        out.index_copy_(0, idx, batch.cpu_images.to(device, non_blocking=True).float())
    jpegs = batch.jpegs
    dropped: list[int] = []
    if jpegs:
        result = nvjpeg_decode(jpegs, device, decode)
        rejected = len(result.errors)
        if rejected * 2 > len(jpegs) and rejected >= STOP_MIN_FILES:
            k, msg = next(iter(result.errors.items()))
            raise GpuDecodeError(f"data.pipeline=gpu: nvjpeg rejected {rejected} of the {len(jpegs)} JPEGs of a "
                                 f"batch (e.g. {batch.paths[k]}: {msg}): the GPU decode is failing, not the files; "
                                 "use data.pipeline=fast")
        good = [k for k, img in enumerate(result.images) if img is not None]
        if good:
            boxes = [pixel_box(batch.boxes[k], *result.images[k].shape[-2:]) for k in good]
            resized = resize_crops([result.images[k] for k in good], boxes, [batch.flips[k] for k in good], size)
            pos = torch.tensor([batch.gpu_pos[k] for k in good], dtype=torch.int64).to(device, non_blocking=True)
            out.index_copy_(0, pos, resized)
        for k in result.errors:  # nvjpeg rejected the file: the CPU decodes it (counted)
            path = batch.paths[k]
            try:
                img = _cpu_decode(jpegs[k], batch.boxes[k], size, batch.flips[k], path)
            except CorruptImageError:
                if not skip_corrupt:
                    raise
                dropped.append(batch.gpu_pos[k])
                continue
            _note_fallback("nvjpeg_error", path)
            out[batch.gpu_pos[k]].copy_(img.to(device, non_blocking=True))
    _note_batch(n - len(dropped))
    mean, inv_std = _norm_constants(device)
    out.sub_(mean).mul_(inv_std)  # elementwise ops keep channels_last
    if not dropped:
        return DecodedBatch(out, None, 0)
    gone = set(dropped)
    keep = [k for k in range(n) if k not in gone]
    if not keep:
        return DecodedBatch(None, None, len(dropped))
    kept = torch.tensor(keep, dtype=torch.int64).to(device, non_blocking=True)
    return DecodedBatch(out.index_select(0, kept).contiguous(memory_format=fmt), kept, len(dropped))


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
