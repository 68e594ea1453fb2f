"""The ``gpu`` pipeline's failure handling and decode thread, on the CPU: a fake nvjpeg raises torchvision's real
messages (torchvision 0.29 ``decode_jpegs_cuda.cpp``: "Error while decoding JPEG images: Failed to <step>:
<status>"), and the batched crop/resize is checked against ``F.interpolate``.

* a device failure (nvjpeg status 5/6/8, a failed stream synchronisation, CUDA out of memory) stops at once,
  never a file-by-file CPU fallback (the old path made 257 decode calls for 256 files);
* a file nvjpeg rejects is found by halving, and a broken CUDA context raises its own error first;
* most of a batch rejected stops with one line; an epoch's fallback rate past the threshold warns once;
* ``data.skip_corrupt`` drops a file no decoder can read, with its label;
* the decode thread keeps the loader's order, is deterministic, and ends (no hang) on errors and early exits.
"""
from __future__ import annotations

import functools
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from engine.data import gpu_decode as gd
from engine.data import pipeline as pl
from engine.data.datasets import RobustImageFolder, TrainBatchSampler, collate
from engine.data.errors import CorruptImageError, GpuDecodeError
from engine.data.loader import DevicePrefetcher, build_dataloader
from test_gpu_pipeline import _jpeg, _photo, _png, _tree, cpu_decode

ERR = "Error while decoding JPEG images: "


class FakeNvjpeg:
    """A batched decode (``gd.DecodeFn``) that decodes on the CPU, counts its calls, raises ``error`` for any call
    containing a file of a size in ``bad`` (every call if ``bad`` is None), and can be slowed down."""

    def __init__(self, error: str | BaseException | None = None, bad=None, delay: float = 0.0,
                 fail_on_call: int | None = None):
        self.error, self.bad, self.delay, self.fail_on_call = error, bad, delay, fail_on_call
        self.calls, self.devices = 0, []

    def __call__(self, data, device):
        self.calls += 1
        self.devices.append(device)
        if self.delay:
            time.sleep(self.delay)
        hit = self.bad is None or any(d.numel() in self.bad for d in data)
        if self.error is not None and hit and (self.fail_on_call is None or self.calls == self.fail_on_call):
            raise self.error if isinstance(self.error, BaseException) else RuntimeError(self.error)
        return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]


@functools.cache
def _file_pool(n: int, seed: int = 0) -> tuple:
    return tuple(_make_files(n, seed))


def _files(n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` small JPEGs of distinct byte sizes, as uint8 tensors (made once per test session)."""
    return list(_file_pool(n, seed))


def _make_files(n: int, seed: int) -> list[torch.Tensor]:
    out, sizes = [], set()
    k = 0
    while len(out) < n:
        t = torch.frombuffer(bytearray(_jpeg(_photo(16 + k % 7, 16 + k // 7 % 9, seed=seed + k), quality=50 + k % 45)),
                             dtype=torch.uint8)
        k += 1
        if t.numel() not in sizes:
            sizes.add(t.numel())
            out.append(t)
    return out


# ------------------------------------------------------------------------------------------ classification
@pytest.mark.parametrize("message,device", [
    (ERR + "Failed to decode batch: 5", True),      # allocator failure: what follows an out-of-memory
    (ERR + "Failed to decode batch: 6", True),      # execution failed
    (ERR + "Failed to decode batch: 8", True),      # internal error
    (ERR + "Failed to initialize batch decoding: 5", True),
    (ERR + "Failed to synchronize CUDA stream: 700", True),
    (ERR + "Failed to decode jpeg stream: 6", True),
    ("CUDA error: an illegal memory access was encountered", True),
    (ERR + "Failed to decode batch: 3", False),     # bad JPEG: the file
    (ERR + "Failed to get image info: 3", False),
    (ERR + "Failed to parse jpeg stream: 10", False),  # incomplete bitstream
    (ERR + "Unknown chroma subsampling", False),
    (ERR + "Failed to decode jpeg stream: 4", False),  # not supported
])
def test_nvjpeg_messages_are_classified(message, device):
    why = gd.device_failure(RuntimeError(message))
    assert (why is not None) == device, why
    if device and "status" in (why or ""):
        code = int(message.rsplit(": ", 1)[1])
        assert f"nvjpeg status {code} ({gd.NVJPEG_STATUS[code]})" in why
    assert gd.device_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))


@pytest.mark.parametrize("status", [5, 6, 8])
def test_a_device_failure_stops_at_once_instead_of_decoding_256_files_on_the_cpu(status):
    files = _files(256)
    fake = FakeNvjpeg(f"{ERR}Failed to decode batch: {status}")
    with pytest.raises(GpuDecodeError) as e:
        gd.nvjpeg_decode(files, torch.device("cpu"), fake)
    assert fake.calls == 1  # no retry, no per-file fallback
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"nvjpeg status {status}" in msg and "data.pipeline=fast" in msg


def test_a_failed_stream_sync_and_a_cuda_oom_stop_too():
    for err in (f"{ERR}Failed to synchronize CUDA stream: 700",
                torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        fake = FakeNvjpeg(err)
        with pytest.raises(GpuDecodeError, match="the GPU failed"):
            gd.nvjpeg_decode(_files(8), torch.device("cpu"), fake)
        assert fake.calls == 1


def test_a_rejected_file_is_found_by_halving_not_file_by_file():
    files = _files(256)
    bad = files[137].numel()
    fake = FakeNvjpeg(f"{ERR}Failed to decode batch: 3", bad={bad})
    result = gd.nvjpeg_decode(files, torch.device("cpu"), fake)
    assert [k for k, img in enumerate(result.images) if img is None] == [137]
    assert list(result.errors) == [137] and "Failed to decode batch: 3" in result.errors[137]
    assert result.calls == fake.calls <= 2 * 8 + 1  # 17 calls for 256 files (the old path: 257)
    assert torch.equal(result.images[0], decode_jpeg(files[0], mode=ImageReadMode.RGB))
    # two bad files in different halves
    fake = FakeNvjpeg(f"{ERR}Failed to decode batch: 3", bad={files[3].numel(), files[200].numel()})
    result = gd.nvjpeg_decode(files, torch.device("cpu"), fake)
    assert sorted(result.errors) == [3, 200] and fake.calls <= 4 * 8 + 1


def test_a_broken_cuda_context_raises_its_own_error_after_a_failed_batch(monkeypatch):
    """After a batched call fails for a file's reason, the device is synchronised: if the context is broken (an
    illegal access, sticky), CUDA's own error surfaces there, before any retry."""
    synced = []

    def broken(device):
        synced.append(device)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gd, "_synchronize", broken)
    fake = FakeNvjpeg(f"{ERR}Failed to decode batch: 3", bad=None)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gd.nvjpeg_decode(_files(16), torch.device("cpu"), fake)
    assert fake.calls == 1 and len(synced) == 1


def test_the_device_index_is_added_when_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert gd.with_index("cuda") == torch.device("cuda", 3)
    assert gd.with_index("cuda:1") == torch.device("cuda", 1)
    assert gd.with_index("cpu") == torch.device("cpu")
    fake = FakeNvjpeg()
    monkeypatch.setattr(gd, "_synchronize", lambda device: None)
    gd.nvjpeg_decode(_files(2), "cuda", lambda data, dev: fake.devices.append(dev) or [None] * len(data))
    assert fake.devices == [torch.device("cuda", 3)]  # what torchvision's global decoder is keyed on


# --------------------------------------------------------------------------------------- batched resize
@pytest.mark.parametrize("budget", [48 * 2 ** 20, 3 * 40 * 40])  # one group, or many small ones
def test_batched_crop_resize_equals_per_image_interpolate(budget):
    g = torch.Generator().manual_seed(0)
    images, boxes, flips, ref = [], [], [], []
    size = (24, 20)
    shapes = [(60, 80), (24, 20), (10, 12), (90, 30), (31, 47), (24, 20), (200, 150)]
    for k, (h, w) in enumerate(shapes):
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        if k == 1:
            box = (0, h, 0, w)  # the crop is the output size: copied as is
        else:
            y0, x0 = int(torch.randint(0, h // 2, (), generator=g)), int(torch.randint(0, w // 2, (), generator=g))
            box = (y0, h - int(torch.randint(0, h // 4 + 1, (), generator=g)), x0,
                   w - int(torch.randint(0, w // 4 + 1, (), generator=g)))
        flip = k % 2 == 1
        crop = img[:, box[0]:box[1], box[2]:box[3]].unsqueeze(0).float()
        r = F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        images.append(img), boxes.append(box), flips.append(flip), ref.append(r.flip(-1) if flip else r)
    got = gd.resize_crops(images, boxes, flips, size, budget=budget)
    ref = torch.stack(ref)
    assert got.shape == (len(shapes), 3, *size)
    assert torch.equal(got, got.round())
    # equal before rounding up to float error; after rounding, a value on a .5 boundary may go either way
    assert (got - ref.round()).abs().max() <= 1 and (got - ref).abs().max() <= 0.5 + 1e-3
    assert (got != ref.round()).float().mean() < 0.01
    assert torch.equal(got[1], images[1].float().flip(-1))


# ------------------------------------------------------------------------------------ batch-level policy
def _gpu_set(tmp_path, files: dict[str, bytes], skip: bool = False, train: bool = False) -> RobustImageFolder:
    root = _tree(tmp_path, files)
    loader, tf = (pl.build_train_transform(32, "fcanet", "gpu") if train else pl.build_val_transform(32, 40, "gpu"))
    return RobustImageFolder(root, transform=tf, loader=loader, skip_corrupt=skip)


def test_most_of_a_batch_rejected_stops_with_one_line_and_a_few_fall_back(tmp_path):
    ds = _gpu_set(tmp_path, {f"a/{k}.jpg": _jpeg(_photo(40 + k, 48, seed=k)) for k in range(8)})
    batch, _, _ = collate([ds[i] for i in range(8)])
    sizes = batch.jpeg_sizes
    gd.fallback_counts(reset=True)
    with pytest.raises(GpuDecodeError) as e:
        gd.decode_batch(batch, "cpu", decode=FakeNvjpeg(f"{ERR}Failed to decode batch: 3", bad=set(sizes[:5])))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "nvjpeg rejected 5 of the 8 JPEGs" in msg and ".jpg" in msg
    out = gd.decode_batch(batch, "cpu", decode=FakeNvjpeg(f"{ERR}Failed to decode batch: 3", bad=set(sizes[:3])))
    assert out.images.shape == (8, 3, 32, 32) and out.kept is None and out.dropped == 0
    assert gd.fallback_counts(reset=True) == {"nvjpeg_error": 3}


def test_a_high_fallback_rate_warns_once_per_epoch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gd, "WARN_MIN_IMAGES", 8)
    photo = _photo(40, 48)
    files = {f"a/{k}.jpg": _jpeg(_photo(40, 48, seed=k)) for k in range(1, 4)}
    ds = _gpu_set(tmp_path, {"a/0.png": _png(photo), **files})
    batch, _, _ = collate([ds[i] for i in range(4)])  # 1 of 4 decoded on the CPU: 25% > 5%
    gd.fallback_counts(reset=True)
    capsys.readouterr()
    gd.decode_batch(batch, "cpu", decode=FakeNvjpeg())
    assert "warning:" not in capsys.readouterr().err  # 4 images: too few to judge
    for _ in range(3):
        gd.decode_batch(batch, "cpu", decode=FakeNvjpeg())
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    # warned as soon as the epoch had enough images (the second batch), once
    assert len(err) == 1 and "2 of this epoch's 8 images" in err[0] and "25.0%" in err[0] and "not_jpeg 2" in err[0]
    gd.fallback_counts(reset=True)  # a new epoch re-arms it
    for _ in range(2):
        gd.decode_batch(batch, "cpu", decode=FakeNvjpeg())
    assert len([ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]) == 1
    gd.fallback_counts(reset=True)


def test_skip_corrupt_drops_a_file_no_decoder_can_read_with_its_label(tmp_path):
    good = _jpeg(_photo(60, 80))
    broken = good[:good.index(b"\xff\xda")] + b"\xff\xd9"  # a JPEG header, no image data
    files = {"a/0.jpg": good, "a/1.jpg": broken, "b/2.jpg": _jpeg(_photo(50, 70, seed=2))}
    strict = _gpu_set(tmp_path / "s", files)
    batch, y, skipped = collate([strict[i] for i in range(3)])
    with pytest.raises(CorruptImageError, match="1.jpg"):
        gd.decode_batch(batch, "cpu", decode=FakeNvjpeg(f"{ERR}Failed to decode batch: 3", bad={len(broken)}))
    lenient = _gpu_set(tmp_path / "l", files, skip=True)
    dl = build_dataloader(lenient, batch_sampler=[[0, 1, 2]], workers=0, collate_fn=collate)
    fake = FakeNvjpeg(f"{ERR}Failed to decode batch: 3", bad={len(broken)})
    (x, y, skipped), = list(DevicePrefetcher(dl, "cpu", decode=fake))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1] and skipped == 1
    # the kept images are those of the strict batch without the broken file (decoded here on the CPU)
    lenient_batch, _, _ = collate([lenient[i] for i in (0, 2)])
    full = gd.decode_batch(lenient_batch, "cpu", decode=FakeNvjpeg()).images
    assert torch.equal(x, full)
    # every file of a batch unreadable: no images, no labels, all counted as skipped
    dl = build_dataloader(lenient, batch_sampler=[[1]], workers=0, collate_fn=collate)
    assert list(DevicePrefetcher(dl, "cpu", decode=fake)) == [(None, None, 1)]


# ---------------------------------------------------------------------------------------- decode thread
def _loader(tmp_path, workers: int, n: int = 14, batch: int = 3, seed: int = 5, epoch: int = 0):
    ds = _gpu_set(tmp_path, {f"c{k % 3}/{k}.jpg": _jpeg(_photo(40 + 3 * k, 64 - k, seed=k)) for k in range(n)},
                  train=True)
    sampler = TrainBatchSampler(len(ds), batch, seed=seed)
    sampler.set_epoch(epoch)
    return ds, sampler, build_dataloader(ds, batch_sampler=sampler, workers=workers, collate_fn=collate)


def _gpu_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gpu-decode"]


@pytest.mark.timeout(120)
def test_the_decode_thread_keeps_order_and_is_deterministic(tmp_path):
    ds, sampler, dl = _loader(tmp_path / "a", workers=0)
    # the reference: each batch collated and decoded in the calling thread, in the sampler's order
    ref = []
    for items in sampler:
        b, y, _ = collate([ds[it] for it in items])
        ref.append((b.to_model_input("cpu", decode=cpu_decode), y))
    slow = FakeNvjpeg(delay=0.02)  # the consumer is faster than the decode: the queue runs empty and refills
    for decode in (slow, FakeNvjpeg()):
        got = [(x, y) for x, y, _ in DevicePrefetcher(dl, "cpu", depth=2, decode=decode)]
        assert len(got) == len(ref) == 4
        for (x, y), (rx, ry) in zip(got, ref, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    # worker processes, a second loader, the same seed and epoch: the same crops, in the same order
    _, _, dl2 = _loader(tmp_path / "b", workers=2)
    again = [x for x, _, _ in DevicePrefetcher(dl2, "cpu", depth=3, decode=FakeNvjpeg())]
    assert all(torch.equal(a, r) for a, (r, _) in zip(again, ref, strict=True))
    # another epoch: other crops
    _, _, dl3 = _loader(tmp_path / "c", workers=0, epoch=1)
    other = [x for x, _, _ in DevicePrefetcher(dl3, "cpu", decode=FakeNvjpeg())]
    assert not all(torch.equal(a, r) for a, (r, _) in zip(other, ref, strict=True))
    assert not _gpu_threads()


@pytest.mark.timeout(120)
def test_the_decode_thread_runs_ahead_of_a_slow_consumer(tmp_path):
    _, _, dl = _loader(tmp_path, workers=0, n=24)
    fake = FakeNvjpeg()
    batches = DevicePrefetcher(dl, "cpu", depth=3, decode=fake)
    it = iter(batches)
    next(it)
    time.sleep(1.0)  # the "training step": meanwhile the thread decodes up to depth batches ahead
    assert fake.calls >= 1 + 3
    assert len(list(it)) == 7 and batches.stats["batches"] == 8 and batches.stats["decode_s"] > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_the_decode_thread_reaches_the_consumer_in_order_without_hanging(tmp_path, workers):
    _, _, dl = _loader(tmp_path, workers=workers)
    fake = FakeNvjpeg(f"{ERR}Failed to decode batch: 6", fail_on_call=3)  # the third batch
    got = []
    t0 = time.monotonic()
    with pytest.raises(GpuDecodeError, match="nvjpeg status 6"):
        for x, _, _ in DevicePrefetcher(dl, "cpu", decode=fake):
            got.append(x)
    assert len(got) == 2 and time.monotonic() - t0 < 60
    time.sleep(0.2)
    assert not _gpu_threads()
    # the persistent workers serve the next epoch normally
    assert len(list(DevicePrefetcher(dl, "cpu", decode=FakeNvjpeg()))) == 4


@pytest.mark.timeout(120)
def test_leaving_the_loop_early_stops_the_decode_thread(tmp_path):
    _, _, dl = _loader(tmp_path, workers=0, n=30)
    fake = FakeNvjpeg(delay=0.05)
    for _ in DevicePrefetcher(dl, "cpu", depth=2, decode=fake):
        break  # a preemption, an error in the training step
    t0 = time.monotonic()
    while _gpu_threads() and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not _gpu_threads()
    calls = fake.calls
    time.sleep(0.3)
    assert fake.calls == calls <= 4  # stopped: no decoding of the rest of the epoch


@pytest.mark.timeout(120)
def test_a_corrupt_file_raised_in_a_worker_reaches_the_consumer(tmp_path):
    root = _tree(tmp_path, {"a/0.jpg": _jpeg(_photo(40, 40)), "a/1.jpg": b"not an image",
                            "a/2.jpg": _jpeg(_photo(40, 40, seed=2))})
    loader, tf = pl.build_val_transform(32, 40, "gpu")
    ds = RobustImageFolder(root, transform=tf, loader=loader)
    dl = build_dataloader(ds, batch_sampler=[[0], [1], [2]], workers=1, collate_fn=collate)
    got = []
    with pytest.raises(CorruptImageError, match="1.jpg"):
        for x, _, _ in DevicePrefetcher(dl, "cpu", decode=FakeNvjpeg()):
            got.append(x)
    assert len(got) == 1
    from engine.data.loader import shutdown_workers
    shutdown_workers(dl)


# --------------------------------------------------------------------------------------------- the GIL
def _main_thread_share(work) -> float:
    """Run ``work`` in a thread; return the main thread's loop rate meanwhile, relative to its rate alone (the
    same loop: a GIL held by the thread stalls it, a released one does not)."""
    def count(stop: threading.Event, duration: float = 1e9) -> int:
        n, t0 = 0, time.perf_counter()
        while not stop.is_set() and time.perf_counter() - t0 < duration:
            n += 1
        return n

    t0 = time.perf_counter()
    alone = count(threading.Event(), 0.2) / (time.perf_counter() - t0)
    done = threading.Event()
    t = threading.Thread(target=lambda: (work(), done.set()))
    t0 = time.perf_counter()  # before the start: the thread may take the GIL at once
    t.start()
    n = count(done)
    during = n / (time.perf_counter() - t0)
    t.join()
    return during / alone


@pytest.mark.timeout(120)
def test_torchvisions_decode_op_releases_the_gil():
    """nvjpeg's batched decode is a ``torch.ops.image`` operator like the CPU decode_jpeg: the dispatcher's Python
    binding releases the GIL around the kernel, so the decode thread does not stall the training thread. Checked
    here on the CPU op (the GPU check script repeats it with device="cuda"), against a call that holds the GIL."""
    from io import BytesIO

    from PIL import Image
    from sklearn.datasets import load_sample_images

    big = Image.fromarray(load_sample_images().images[0]).resize((2400, 1600))
    buf = BytesIO()
    big.save(buf, "JPEG", quality=90)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    t0 = time.perf_counter()
    decode_jpeg(data)
    one = time.perf_counter() - t0
    reps = max(2, int(0.25 / max(one, 1e-3)))
    released = _main_thread_share(lambda: [torch.ops.image.decode_jpeg(data, ImageReadMode.RGB.value, False)
                                           for _ in range(reps)])
    t0 = time.perf_counter()
    sum(range(10 ** 6))
    per_million = time.perf_counter() - t0
    held = _main_thread_share(lambda: sum(range(int(1e6 * 0.25 / per_million))))  # a C loop holding the GIL
    assert held < 0.2, held  # the measurement sees a held GIL
    assert released > max(0.3, 2 * held), (released, held)
