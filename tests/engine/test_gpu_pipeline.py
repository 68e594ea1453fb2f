"""The ``gpu`` data pipeline (engine/data/gpu_decode.py) on the CPU: JPEG header parsing, which files fall back
to the CPU decode (and that they are counted), crop boxes equal to the CPU pipelines', batching, and the
device-side crop/resize/flip/normalize with nvjpeg replaced by torchvision's CPU JPEG decoder. The one
test that calls nvjpeg runs only where CUDA is available."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from engine.data import gpu_decode as gd
from engine.data import pipeline as pl
from engine.data import transforms as tr
from engine.config import ConfigError
from engine.data.errors import CorruptImageError
from engine.data.datasets import RobustImageFolder, _seeded, collate
from engine.data.loader import build_dataloader
from image_modes import mode_cases


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (JPEG-friendly, so CPU and GPU decodes of it stay close)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 3.0, 3)
    img = np.stack([np.sin(a[0] * 6 * x + a[1] * 3 * y), np.cos(a[1] * 5 * y), np.sin(a[2] * 4 * (x + y))], -1)
    return np.clip(127.5 + 120 * img, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=kw.pop("quality", 92), **kw)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def cpu_decode(data: list, device) -> list:
    """Stands in for nvjpeg: libjpeg-turbo through torchvision (the fast pipeline's full-resolution decode)."""
    return [decode_jpeg(d, mode=ImageReadMode.RGB).to(device) for d in data]


def _sof_offset(data: bytes) -> int:
    """Offset of the SOFn marker's second byte."""
    i = 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return i + 1
        i += 2 + length


# ------------------------------------------------------------------------------------------- headers
@pytest.mark.parametrize("hw", [(75, 100), (1, 1), (300, 17)])
def test_header_gives_the_size_without_decoding(hw):
    data = _jpeg(_photo(*hw))
    h = gd.parse_jpeg_header(data)
    with Image.open(io.BytesIO(data)) as img:
        assert (h.width, h.height) == img.size == (hw[1], hw[0])
    assert (h.sof, h.precision, h.components, h.has_eoi) == (0xC0, 8, 3, True)
    assert gd.nvjpeg_refusal(h) is None


def test_fallback_classification():
    photo = _photo(48, 64)
    base = _jpeg(photo)
    cases = {
        "progressive": _jpeg(photo, progressive=True),
        "grayscale": _jpeg(photo, mode="L"),
        "cmyk": _jpeg(photo, mode="CMYK"),
        "truncated": base[: len(base) * 2 // 3],
    }
    arith = bytearray(base)
    arith[_sof_offset(base)] = 0xC9  # arithmetic-coded sequential frame
    twelve = bytearray(base)
    twelve[_sof_offset(base) + 3] = 12  # 12-bit samples
    rgb_coded = bytearray(base)
    o = _sof_offset(base) + 3 + 6  # component ids 1, 2, 3 -> 'R', 'G', 'B'
    rgb_coded[o], rgb_coded[o + 3], rgb_coded[o + 6] = ord("R"), ord("G"), ord("B")
    for name, data in cases.items():
        assert gd.nvjpeg_refusal(gd.parse_jpeg_header(data)) == name, name
    for data in (arith, twelve, rgb_coded):
        assert gd.nvjpeg_refusal(gd.parse_jpeg_header(bytes(data))) == "other_jpeg"
    assert gd.parse_jpeg_header(base + b"\x00" * 10).has_eoi  # zero padding after EOI is fine
    for junk in (_png(photo), b"", b"\xff\xd8", b"not a jpeg at all", base[:30]):
        assert gd.parse_jpeg_header(junk) is None
        assert gd.nvjpeg_refusal(gd.parse_jpeg_header(junk)) == "not_jpeg"


# ------------------------------------------------------------------------------- worker side, boxes
def _tree(tmp_path, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return str(tmp_path)


@pytest.mark.parametrize("crop", ["fcanet", "torchvision"])
def test_crop_boxes_and_flips_equal_the_fast_pipeline(tmp_path, crop):
    """Same (seed, epoch, index) -> same box and flip, for nvjpeg files and CPU fallbacks alike."""
    photo = _photo(90, 120)
    path = _tree(tmp_path, {"a/x.jpg": _jpeg(photo), "a/y.png": _png(photo)})
    _, fast = pl.build_train_transform(64, crop, "fast")
    loader, gpu = pl.build_train_transform(64, crop, "gpu")
    assert loader is gd.gpu_loader and isinstance(gpu, gd.GpuTransform)
    for name in ("a/x.jpg", "a/y.png"):
        f = loader(os.path.join(path, name))
        for seed in range(40):
            box, flip = _seeded(lambda: fast.plan(90, 120), seed)
            s = _seeded(lambda f=f: gpu(f), seed)
            if name.endswith(".jpg"):
                assert isinstance(s, gd.PendingJpeg) and (s.box, s.flip) == (tuple(box), flip)
            else:
                assert isinstance(s, gd.CpuDecoded) and s.reason == "not_jpeg"
                expect = _seeded(lambda name=name: fast(tr.encoded_loader(os.path.join(path, name))), seed)
                assert torch.equal(s.image, expect)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(tr.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(tr.IMAGENET_STD).view(1, 3, 1, 1) * 255
    return x * std + mean


@pytest.mark.parametrize("train", [True, False])
def test_batch_matches_the_fast_pipeline(tmp_path, train):
    """Whole batches through RobustImageFolder + collate + to_model_input: the gpu pipeline (nvjpeg replaced
    by the CPU decoder) gives the fast pipeline's images within the resize's rounding."""
    files = {f"c{k % 2}/{k}.jpg": _jpeg(_photo(72 + 8 * k, 96 - 4 * k, seed=k), quality=95) for k in range(6)}
    files["c0/p.png"] = _png(_photo(80, 80, seed=9))
    files["c1/g.jpg"] = _jpeg(_photo(70, 90), mode="L")
    root = _tree(tmp_path, files)
    build = pl.build_train_transform if train else (lambda s, crop, p: pl.build_val_transform(s, 72, p))
    sets = {p: RobustImageFolder(root, *reversed(build(64, "fcanet", p))) for p in ("fast", "gpu")}
    items = [(i, 1000 + i) for i in range(len(sets["fast"]))]
    ref_x, ref_y, _ = collate([sets["fast"][it] for it in items])
    batch, y, skipped = collate([sets["gpu"][it] for it in items])
    assert isinstance(batch, gd.EncodedBatch) and torch.equal(y, ref_y) and skipped == 0
    assert len(batch) == 8 and sorted(batch.cpu_reasons) == ["grayscale", "not_jpeg"]
    for channels_last in (False, True):
        x = batch.to_model_input("cpu", channels_last, decode=cpu_decode)
        assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        diff = (_unnormalize(x) - ref_x.float()).abs()
        assert diff.max() <= 2.0 and diff.mean() < 0.3, (diff.max(), diff.mean())
    ref = tr.to_model_input(ref_x, "cpu")
    assert torch.allclose(batch.to_model_input("cpu", decode=cpu_decode), ref, atol=2.0 / 255 / 0.224)


def test_fallbacks_are_counted_and_named_once(tmp_path, capsys):
    photo = _photo(60, 80)
    files = {"a/base.jpg": _jpeg(photo), "a/prog.jpg": _jpeg(photo, progressive=True),
             "a/grey.jpg": _jpeg(photo, mode="L"), "a/cmyk.jpg": _jpeg(photo, mode="CMYK"),
             "a/png.png": _png(photo), "a/png2.png": _png(photo[::-1].copy())}
    root = _tree(tmp_path, files)
    loader, tf = pl.build_val_transform(32, 40, "gpu")
    ds = RobustImageFolder(root, transform=tf, loader=loader)
    gd.fallback_counts(reset=True)
    batch, _, _ = collate([ds[i] for i in range(len(ds))])
    assert len(batch.gpu_pos) == 1 and len(batch.cpu_pos) == 5
    batch.to_model_input("cpu", decode=cpu_decode)
    assert gd.fallback_counts() == {"progressive": 1, "grayscale": 1, "cmyk": 1, "not_jpeg": 2}
    assert batch.cpu_index.dtype == torch.int64 and batch.cpu_index.tolist() == batch.cpu_pos
    err = capsys.readouterr().err
    assert err.count("png.png") + err.count("png2.png") <= 1  # named once per reason, then only counted
    batch.to_model_input("cpu", decode=cpu_decode)
    assert gd.fallback_counts(reset=True)["not_jpeg"] == 4 and gd.fallback_counts() == {}


def rejecting(*bad_sizes: int):
    """A batched decode (:data:`gd.DecodeFn`) like nvjpeg's that rejects the files of the given byte sizes with
    torchvision's message for a bitstream nvjpeg cannot decode (nvjpeg status 3, bad JPEG)."""
    def decode(data, dev):
        if any(d.numel() in bad_sizes for d in data):
            raise RuntimeError("Error while decoding JPEG images: Failed to decode batch: 3")
        return cpu_decode(data, dev)
    return decode


def test_a_file_nvjpeg_rejects_is_decoded_on_the_cpu_and_counted(tmp_path):
    root = _tree(tmp_path, {"a/0.jpg": _jpeg(_photo(60, 80)), "a/1.jpg": _jpeg(_photo(64, 64, seed=1))})
    loader, tf = pl.build_val_transform(32, 40, "gpu")
    ds = RobustImageFolder(root, transform=tf, loader=loader)
    batch, _, _ = collate([ds[0], ds[1]])
    gd.fallback_counts(reset=True)
    expect = batch.to_model_input("cpu", decode=cpu_decode)
    assert gd.fallback_counts() == {}
    got = batch.to_model_input("cpu", decode=rejecting(batch.jpeg_sizes[0]))
    assert gd.fallback_counts(reset=True) == {"nvjpeg_error": 1}
    assert (_unnormalize(got) - _unnormalize(expect)).abs().max() <= 2.0


def test_a_file_no_decoder_can_read_names_the_file(tmp_path):
    good = _jpeg(_photo(60, 80))
    sos = good.index(b"\xff\xda")
    broken = good[:sos] + b"\xff\xd9"  # headers and an end marker, no image data
    root = _tree(tmp_path, {"a/ok.jpg": good, "a/broken.jpg": broken})
    loader, tf = pl.build_val_transform(32, 40, "gpu")
    ds = RobustImageFolder(root, transform=tf, loader=loader)
    batch, _, _ = collate([ds[0], ds[1]])
    assert len(batch.gpu_pos) == 2  # the header looks fine: found out only when decoding
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        batch.to_model_input("cpu", decode=rejecting(len(broken)))


def test_unreadable_files_are_caught_in_the_worker_like_the_other_pipelines(tmp_path):
    root = _tree(tmp_path, {"a/ok.jpg": _jpeg(_photo(40, 40)), "a/junk.jpg": b"not an image",
                            "a/float.tif": next(c for c in mode_cases() if c.mode == "F").data})
    loader, tf = pl.build_val_transform(32, 40, "gpu")
    ds = RobustImageFolder(root, transform=tf, loader=loader)
    paths = [os.path.basename(p) for p, _ in ds.samples]
    with pytest.raises(CorruptImageError, match="junk.jpg"):
        ds[paths.index("junk.jpg")]
    with pytest.raises(CorruptImageError, match="mode 'F'"):
        ds[paths.index("float.tif")]
    ds.skip_corrupt = True
    images, targets, skipped = collate([ds[i] for i in range(3)])
    assert skipped == 2 and len(images) == 1 and targets.tolist() == [0]


@pytest.mark.parametrize("case", [c for c in mode_cases() if c.expected is not None], ids=lambda c: c.name)
def test_every_image_mode_through_the_gpu_pipeline(tmp_path, case):
    """Non-JPEG and non-YCbCr files take the CPU fallback, which decodes every mode to correct 8-bit RGB."""
    root = _tree(tmp_path, {"a/" + case.name + case.ext: case.data})
    h, w = case.expected.shape[:2]

    class FullImage:  # plan = the whole image, unflipped, at its own size: compare pixel for pixel
        size = (h, w)

        def plan(self, height, width):
            return (0, 0, height, width), False

    ds = RobustImageFolder(root, transform=gd.GpuTransform(FullImage()), loader=gd.gpu_loader)
    batch, _, _ = collate([ds[0]])
    x = _unnormalize(batch.to_model_input("cpu", decode=cpu_decode))[0].round().permute(1, 2, 0)
    assert (x - torch.from_numpy(case.expected).float()).abs().max() <= case.tol + 0.01


def test_dataloader_workers_hand_over_encoded_batches(tmp_path):
    files = {f"c{k % 3}/{k}.jpg": _jpeg(_photo(50, 70, seed=k)) for k in range(7)}
    root = _tree(tmp_path, files)
    loader, tf = pl.build_train_transform(32, "fcanet", "gpu")
    ds = RobustImageFolder(root, transform=tf, loader=loader)
    from engine.data.datasets import TrainBatchSampler
    sampler = TrainBatchSampler(len(ds), 3, seed=5)
    in_process = [collate([ds[it] for it in b]) for b in sampler]
    dl = build_dataloader(ds, batch_sampler=sampler, workers=1, device="cpu", collate_fn=collate)
    got = list(dl)
    assert len(got) == len(in_process) == 2
    for (b, y, s), (rb, ry, rs) in zip(got, in_process, strict=True):
        assert isinstance(b, gd.EncodedBatch) and torch.equal(y, ry) and s == rs == 0
        assert b.boxes == rb.boxes and b.flips == rb.flips and torch.equal(b.jpeg_data, rb.jpeg_data)
        assert torch.equal(b.to_model_input("cpu", decode=cpu_decode), rb.to_model_input("cpu", decode=cpu_decode))


def test_to_model_input_hook_dispatches_and_needs_cuda_for_nvjpeg(tmp_path):
    root = _tree(tmp_path, {"a/0.jpg": _jpeg(_photo(40, 40))})
    loader, tf = pl.build_val_transform(32, 40, "gpu")
    batch, _, _ = collate([RobustImageFolder(root, transform=tf, loader=loader)[0]])
    with pytest.raises(RuntimeError, match="CUDA"):
        tr.to_model_input(batch, "cpu")  # the trainer's hook, on a CPU device, without a decoder


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_pipeline_is_refused_without_cuda():
    with pytest.raises(ConfigError, match="data.pipeline.*no(ne)?"):
        gd.check_available()


@pytest.mark.parametrize("error", [RuntimeError("nvjpeg status 6"), OSError("libnvjpeg.so.12: cannot open"),
                                   AssertionError("Torch not compiled with CUDA enabled")])
def test_any_probe_failure_is_one_config_error(monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gd, "decode_jpeg", fail)
    with pytest.raises(ConfigError, match=r"^config key 'data.pipeline': 'gpu' cannot decode with nvjpeg here \("
                       + str(error).split(":")[0]):
        gd.check_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_nvjpeg_matches_the_cpu_decode_on_cuda(tmp_path):  # pragma: no cover - runs on GPU machines
    gd.check_available()
    files = {f"a/{k}.jpg": _jpeg(_photo(90 + 10 * k, 120, seed=k), quality=95) for k in range(4)}
    files["a/p.png"] = _png(_photo(64, 64))
    root = _tree(tmp_path, files)
    loader, tf = pl.build_train_transform(64, "fcanet", "gpu")
    ds = RobustImageFolder(root, transform=tf, loader=loader)
    batch, _, _ = collate([ds[(i, 7 + i)] for i in range(len(ds))])
    batch.pin_memory()
    assert batch.jpeg_data.is_pinned() and batch.cpu_index.is_pinned()  # copied to the GPU without blocking
    x = batch.to_model_input(torch.device("cuda"), channels_last=True)
    ref = batch.to_model_input(torch.device("cuda"), channels_last=True, decode=cpu_decode)
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    diff = (_unnormalize(x.cpu()) - _unnormalize(ref.cpu())).abs()
    assert diff.mean() < 2.0 and diff.max() < 40  # IDCT / chroma upsampling differ slightly from libjpeg-turbo


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_prefetched_nvjpeg_batches_match_the_cpu_decode_with_a_busy_default_stream(tmp_path):  # pragma: no cover
    """DevicePrefetcher decodes the next batch on its side stream while the default stream is kept busy, so the
    previous batch's crop/resize kernels are still queued when the next decode reuses the blocks they read
    (torchvision's decode_jpeg writes on its own stream). Every batch must still equal the CPU decode."""
    from engine.data.loader import DevicePrefetcher
    gd.check_available()
    dev = torch.device("cuda", torch.cuda.current_device())
    files = {f"c{k % 3}/{k}.jpg": _jpeg(_photo(240 + 16 * k, 320 - 4 * k, seed=k), quality=95) for k in range(24)}
    root = _tree(tmp_path, files)
    loader, tf = pl.build_val_transform(64, 72, "gpu")  # deterministic: a second pass gives the same batches
    ds = RobustImageFolder(root, transform=tf, loader=loader)
    batches = [[(4 * b + i) % len(ds) for i in range(4)] for b in range(20)]
    refs = [collate([ds[i] for i in b])[0].to_model_input("cpu", decode=cpu_decode) for b in batches]
    dl = build_dataloader(ds, batch_sampler=batches, workers=0, device=dev, collate_fn=collate)
    busy = torch.randn(4096, 4096, device=dev) / 64  # (4096, 4096): ~3 ms per matmul on the default stream
    got = []
    for x, _, _ in DevicePrefetcher(dl, dev):
        for _ in range(8):
            busy = busy @ busy
            busy = busy / busy.norm()  # keep it finite
        got.append(x)  # compared at the end: reading it now would drain the default stream
    torch.cuda.synchronize(dev)
    assert len(got) == len(refs) == 20
    for k, (x, ref) in enumerate(zip(got, refs, strict=True)):
        diff = (_unnormalize(x.cpu()) - _unnormalize(ref)).abs()  # (4, 3, 64, 64)
        per_image = diff.flatten(1).mean(1)
        assert per_image.max() < 2.0 and diff.max() < 40, (k, per_image.tolist(), diff.max().item())
