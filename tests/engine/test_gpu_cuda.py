"""The ``gpu`` pipeline on a real CUDA device (skipped elsewhere; run by ``python -m scripts.gpu_check``):

* clean baseline JPEGs all go through nvjpeg (no CPU fallback);
* the batched crop/resize on the GPU equals ``F.interpolate`` per image;
* nvjpeg's batched decode releases the GIL (the decode thread does not stall the training thread);
* with the GPU's memory filled, nvjpeg's allocation fails and the decode stops with one line after one call,
  instead of decoding every file on the CPU; once memory is freed it decodes again;
* the decode thread's batches equal the same batches decoded in the calling thread.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.data import gpu_decode as gd
from engine.data import pipeline as pl
from engine.data.datasets import RobustImageFolder, collate
from engine.data.errors import GpuDecodeError
from engine.data.loader import DevicePrefetcher, build_dataloader
from test_gpu_decode_faults import _main_thread_share
from test_gpu_pipeline import _jpeg, _photo, _tree

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")


def _device() -> torch.device:
    gd.check_available()
    return torch.device("cuda", torch.cuda.current_device())


def _batch(tmp_path, n: int = 16, size: int = 64, train: bool = True):
    files = {f"c{k % 2}/{k}.jpg": _jpeg(_photo(200 + 8 * k, 300 - 4 * k, seed=k), quality=90) for k in range(n)}
    root = _tree(tmp_path, files)
    loader, tf = pl.build_train_transform(size, "fcanet", "gpu") if train else pl.build_val_transform(size, 72, "gpu")
    ds = RobustImageFolder(root, transform=tf, loader=loader)
    return ds, collate([ds[(i, 100 + i)] for i in range(n)])[0]


def test_clean_jpegs_are_all_decoded_by_nvjpeg(tmp_path):  # pragma: no cover - CUDA only
    dev = _device()
    _, batch = _batch(tmp_path)
    gd.fallback_counts(reset=True)
    x = gd.decode_batch(batch, dev).images
    torch.cuda.synchronize(dev)
    assert x.is_cuda and x.shape == (16, 3, 64, 64) and torch.isfinite(x).all()
    assert gd.fallback_counts(reset=True) == {}  # cpu_decoded == 0


def test_batched_resize_on_the_gpu_equals_interpolate(tmp_path):  # pragma: no cover - CUDA only
    dev = _device()
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(dev)
              for h, w in ((300, 400), (64, 64), (50, 30), (700, 500))]
    boxes = [(10, 290, 20, 380), (0, 64, 0, 64), (5, 45, 2, 28), (0, 700, 100, 500)]
    flips = [False, True, False, True]
    got = gd.resize_crops(images, boxes, flips, (64, 64))
    for k, (img, (y0, y1, x0, x1), flip) in enumerate(zip(images, boxes, flips, strict=True)):
        ref = F.interpolate(img[:, y0:y1, x0:x1][None].float(), size=(64, 64), mode="bilinear", antialias=True)[0]
        ref = ref.flip(-1) if flip else ref
        # TF32 matmuls (if enabled) and .5 boundaries: at most one level apart, rarely
        assert (got[k] - ref.round()).abs().max() <= 1 and (got[k] != ref.round()).float().mean() < 0.02


def test_nvjpeg_decode_releases_the_gil(tmp_path):  # pragma: no cover - CUDA only
    dev = _device()
    _, batch = _batch(tmp_path, n=64, size=64)
    data = batch.jpegs
    gd.nvjpeg_decode(data, dev)  # creates the decoder
    reps = 20
    share = _main_thread_share(lambda: [gd.nvjpeg_decode(data, dev) for _ in range(reps)])
    assert share > 0.3, share


def _fill_gpu_memory(dev: torch.device) -> list[torch.Tensor]:
    """Allocate until CUDA runs out of memory (torch keeps the blocks), leaving nvjpeg no room."""
    hog, chunk = [], 1 << 30
    while chunk >= 1 << 20:
        try:
            hog.append(torch.empty(chunk, dtype=torch.uint8, device=dev))
        except torch.OutOfMemoryError:
            chunk //= 2
    return hog


def test_nvjpeg_out_of_memory_stops_with_one_line_after_one_call(tmp_path):  # pragma: no cover - CUDA only
    dev = _device()
    _, batch = _batch(tmp_path, n=32, size=64)
    data = batch.jpegs
    calls = []

    def counted(items, device):
        calls.append(len(items))
        return list(gd.decode_jpeg(items, mode=gd.ImageReadMode.RGB, device=device))

    torch.cuda.synchronize(dev)
    hog = _fill_gpu_memory(dev)
    try:
        with pytest.raises(GpuDecodeError) as e:
            gd.nvjpeg_decode(data, dev, counted)
    finally:
        del hog
        torch.cuda.empty_cache()
    msg = str(e.value)
    assert calls == [32] and len(msg.splitlines()) == 1, (calls, msg)  # no halving, no CPU fallback
    assert "nvjpeg status 5" in msg or "OutOfMemoryError" in msg or "out of memory" in msg.lower(), msg
    out = gd.nvjpeg_decode(data, dev)  # memory back: decodes again (an OOM is not sticky)
    assert out.calls == 1 and not out.errors


def test_threaded_batches_equal_direct_decode(tmp_path):  # pragma: no cover - CUDA only
    dev = _device()
    ds, _ = _batch(tmp_path, n=24, size=64, train=False)
    batches = [[(4 * b + i) % len(ds) for i in range(4)] for b in range(12)]
    refs = [gd.decode_batch(collate([ds[i] for i in b])[0], dev).images for b in batches]
    dl = build_dataloader(ds, batch_sampler=batches, workers=2, device=dev, collate_fn=collate)
    busy = torch.randn(2048, 2048, device=dev) / 32
    got = []
    for x, _, _ in DevicePrefetcher(dl, dev):
        for _ in range(4):
            busy = busy @ busy
            busy = busy / busy.norm()
        got.append(x)
    torch.cuda.synchronize(dev)
    assert len(got) == 12 and all(torch.equal(a, b) for a, b in zip(got, refs, strict=True))
