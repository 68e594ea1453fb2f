"""Behaviour of the input pipelines (engine/data/transforms.py, engine/data/loader.py): shapes, dtypes, values and
the crop distribution, on JPEG/PNG files made from scikit-learn's sample photos."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from engine.data import pipeline as pl
from engine.data import transforms as tr
from engine.data.errors import UnsupportedImageError
from engine.data.loader import build_dataloader, default_workers
from image_modes import H as MODE_H, W as MODE_W, mode_cases  # tests/image_modes.py


@pytest.fixture(scope="module")
def photos():
    from sklearn.datasets import load_sample_images
    return load_sample_images().images  # two 427x640 RGB photos


def _jpeg(arr: np.ndarray, size: tuple[int, int], quality: int = 90, mode: str = "RGB") -> bytes:
    img = Image.fromarray(arr).resize(size, Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(arr: np.ndarray, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).resize(size, Image.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ------------------------------------------------------------------------------------------ crop sampling
@pytest.mark.parametrize("crop", ["fcanet", "torchvision"])
@pytest.mark.parametrize("hw", [(375, 500), (750, 1000), (300, 120)])
def test_crop_box_distribution_matches_random_resized_crop(crop, hw):
    """Area fraction, log aspect ratio and normalized placement of our boxes vs torchvision's get_params."""
    H, W = hw
    recipe = tr.CROP_RECIPES[crop]
    n = 3000
    g = torch.Generator().manual_seed(0)
    ours = np.array([tr.sample_crop_box(H, W, recipe["scale"], recipe["ratio"], generator=g) for _ in range(n)],
                    dtype=float)
    torch.manual_seed(1)
    img = torch.empty(1, H, W)
    ref = np.array([T.RandomResizedCrop.get_params(img, list(recipe["scale"]), list(recipe["ratio"]))
                    for _ in range(n)], dtype=float)

    def stats(b):
        i, j, h, w = b.T
        return {"area": h * w / (H * W), "log_aspect": np.log(w / h),
                "top": (i + 0.5) / np.maximum(H - h + 1, 1), "left": (j + 0.5) / np.maximum(W - w + 1, 1)}

    so, sr = stats(ours), stats(ref)
    for key in so:
        p = ks_2samp(so[key], sr[key]).pvalue
        assert p > 1e-3, f"{key}: KS p={p:.2g} (ours mean {so[key].mean():.4f}, torchvision {sr[key].mean():.4f})"
    # boxes are valid
    i, j, h, w = ours.T
    assert (i >= 0).all() and (j >= 0).all() and (i + h <= H).all() and (j + w <= W).all() and (h >= 1).all()
    # within the sampled ranges (up to rounding of w and h), except fallback boxes
    area = h * w / (H * W)
    assert area.min() >= recipe["scale"][0] * 0.95 and area.max() <= 1.0


def test_crop_box_fallback_matches_torchvision():
    """When no try fits (a 20x1000 strip with scale ~1), both center-crop to the closest allowed ratio."""
    for H, W in [(20, 1000), (1000, 20)]:
        ours = tr.sample_crop_box(H, W, (0.99, 1.0), (0.8, 1.25), generator=torch.Generator().manual_seed(0))
        ref = T.RandomResizedCrop.get_params(torch.empty(1, H, W), [0.99, 1.0], [0.8, 1.25])
        assert ours == tuple(ref)


def test_crop_box_is_seeded():
    a = tr.sample_crop_box(375, 500, (0.1, 1), (0.8, 1.25), generator=torch.Generator().manual_seed(5))
    b = tr.sample_crop_box(375, 500, (0.1, 1), (0.8, 1.25), generator=torch.Generator().manual_seed(5))
    assert a == b


def test_center_crop_box_matches_resize_then_center_crop():
    # 500x375 -> Resize(256) gives 341x256; CenterCrop(224) starts at (16, 58) in resized pixels
    top, left, h, w = tr.center_crop_box(375, 500, 224, 256)
    assert h == pytest.approx(224 * 375 / 256) and w == pytest.approx(224 * 500 / 341)
    assert top == pytest.approx(16 * 375 / 256) and left == pytest.approx(58 * 500 / 341)


# --------------------------------------------------------------------------------------------- decoding
def test_draft_scale_choice(photos):
    enc = tr.EncodedImage.from_bytes(_jpeg(photos[0], (1000, 750)))
    assert tr.draft_scale(enc, 700, 700, 224, 224) == 2
    assert tr.draft_scale(enc, 750, 900, 180, 180) == 4
    assert tr.draft_scale(enc, 447, 900, 224, 224) == 1
    png = tr.EncodedImage.from_bytes(_png(photos[0], (1000, 750)))
    assert tr.draft_scale(png, 750, 1000, 32, 32) == 1  # DCT scaling is a JPEG feature


def test_full_resolution_crop_equals_torchvision_resized_crop(photos):
    """Without DCT scaling the fast path is exactly resized_crop(decode) with antialiasing."""
    data = _jpeg(photos[1], (500, 375))
    enc = tr.EncodedImage.from_bytes(data)
    full = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    for box in [(10, 20, 300, 280), (0, 0, 375, 500), (100, 200, 120, 150)]:
        out = tr.decode_resized_crop(enc, box, (224, 224))
        ref = TF.resized_crop(full, *box, size=[224, 224], antialias=True)
        assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
        assert torch.equal(out, ref)
        assert torch.equal(tr.decode_resized_crop(enc, box, (224, 224), flip=True), ref.flip(-1))


@pytest.mark.parametrize("size", [(1000, 750), (2000, 1500)])
def test_dct_scaled_decode_is_close_to_full_decode(photos, size):
    data = _jpeg(photos[0], size)
    enc = tr.EncodedImage.from_bytes(data)
    full = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    box = (40, 60, size[1] - 100, size[1] - 80)  # a large crop: scale >= 2
    assert tr.draft_scale(enc, box[2], box[3], 224, 224) >= 2
    out = tr.decode_resized_crop(enc, box, (224, 224)).float()
    ref = TF.resized_crop(full, *box, size=[224, 224], antialias=True).float()
    assert (out - ref).abs().mean() < 4.0  # levels of 255: a slightly different low-pass, same content
    assert abs(out.mean() - ref.mean()) < 1.0


def test_fast_transforms_on_various_inputs(tmp_path, photos):
    loader, train = pl.build_train_transform(224, "fcanet", "fast")
    vloader, val = pl.build_val_transform(224, 256, "fast")
    files = {
        "rgb.jpg": _jpeg(photos[0], (500, 375)),
        "big.jpg": _jpeg(photos[1], (1000, 750)),
        "gray.jpg": _jpeg(photos[0], (320, 240), mode="L"),
        "cmyk.jpg": _jpeg(photos[1], (200, 300), mode="CMYK"),
        "tiny.png": _png(photos[0], (8, 8)),
    }
    torch.manual_seed(0)
    for name, data in files.items():
        p = _write(tmp_path / name, data)
        for _ in range(3):
            x = train(loader(p))
            assert x.dtype == torch.uint8 and x.shape == (3, 224, 224), name
        y = val(vloader(p))
        assert y.dtype == torch.uint8 and y.shape == (3, 224, 224), name
    # grayscale input gives three equal channels
    g = val(vloader(str(tmp_path / "gray.jpg")))
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])


def test_fast_val_is_close_to_reference_val(tmp_path, photos):
    """Same pixels as Resize(256) + CenterCrop(224) of the reference, up to resampling differences."""
    for k, size in [(0, (500, 375)), (1, (1000, 750)), (0, (375, 500))]:
        p = _write(tmp_path / f"{k}_{size[0]}.jpg", _jpeg(photos[k], size))
        floader, fast = pl.build_val_transform(224, 256, "fast")
        rloader, ref = pl.build_val_transform(224, 256, "torchvision")
        x = tr.to_model_input(fast(floader(p)).unsqueeze(0), "cpu")[0]
        y = ref(rloader(p))
        assert x.shape == y.shape == (3, 224, 224)
        diff = (x - y).abs() * 0.226 * 255  # back to levels of 255
        assert diff.mean() < 5.0, (size, diff.mean())


def test_fast_train_flip_rate_and_crop_use(tmp_path, photos):
    """A left-right mirrored image under the same seed gives the mirrored crop iff no flip was drawn."""
    p = _write(tmp_path / "a.jpg", _jpeg(photos[0], (500, 375)))
    loader, train = pl.build_train_transform(64, "fcanet", "fast")
    enc = loader(p)
    torch.manual_seed(3)
    outs = [train(enc) for _ in range(400)]
    # flips: compare each output with the deterministic crop of the same box, re-drawn with the same seed
    torch.manual_seed(3)
    flips = 0
    for o in outs:
        box = tr.sample_crop_box(enc.height, enc.width, (0.1, 1.0), (0.8, 1.25))
        flip = bool(torch.rand(()) < 0.5)
        assert torch.equal(o, tr.decode_resized_crop(enc, box, (64, 64), flip))
        flips += flip
    assert 160 <= flips <= 240  # Binomial(400, 1/2): +-4 sigma


def test_reference_pipeline_output(tmp_path, photos):
    p = _write(tmp_path / "a.jpg", _jpeg(photos[0], (500, 375)))
    loader, train = pl.build_train_transform(224, "torchvision", "torchvision")
    x = train(loader(p))
    assert x.dtype == torch.float32 and x.shape == (3, 224, 224)
    assert -3 < x.min() < 0 < x.max() < 3


def test_to_model_input_matches_reference_normalization():
    torch.manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    ref = T.Normalize(tr.IMAGENET_MEAN, tr.IMAGENET_STD)(u8.float() / 255.0)
    out = tr.to_model_input(u8, torch.device("cpu"))
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    cl = tr.to_model_input(u8, "cpu", channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, ref, atol=1e-5)
    f = torch.randn(2, 3, 4, 4)
    assert torch.equal(tr.to_model_input(f, "cpu"), f)  # already normalized: untouched


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data pipeline 'dali'"):
        pl.build_train_transform(224, "fcanet", "dali")
    with pytest.raises(ValueError, match="unknown crop recipe 'inception'"):
        pl.build_train_transform(224, "inception", "fast")
    with pytest.raises(ValueError, match="image_size"):
        pl.build_val_transform(0, 256, "fast")
    with pytest.raises(ValueError, match="resize must be"):
        pl.build_val_transform(224, 200, "fast")
    with pytest.raises(TypeError, match="EncodedImage"):
        pl.build_train_transform(224)[1](torch.zeros(3, 8, 8, dtype=torch.uint8))
    junk = _write(tmp_path / "junk.jpg", b"not an image at all")
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError is an OSError: caught as a corrupt file
        tr.encoded_loader(junk)
    with pytest.raises(ValueError, match="workers"):
        build_dataloader([], 4, workers=-1)
    with pytest.raises(ValueError, match="batch_size"):
        build_dataloader([], 0)


# ---------------------------------------------------------------------------------------------- loader
def test_imagefolder_dataloader_fast_pipeline(tmp_path, photos):
    for c in range(2):
        d = tmp_path / f"class{c}"
        d.mkdir()
        for k in range(3):
            _write(d / f"{k}.jpg", _jpeg(photos[c], (160 + 40 * k, 120 + 30 * k)))
    loader, transform = pl.build_train_transform(64, "fcanet", "fast")
    ds = ImageFolder(str(tmp_path), transform=transform, loader=loader)
    dl = build_dataloader(ds, batch_size=4, workers=1, device="cpu", shuffle=True, drop_last=True)
    assert dl.num_workers == 1 and dl.persistent_workers and dl.prefetch_factor == 4 and not dl.pin_memory
    batches = list(dl)
    assert len(batches) == 1
    x, y = tr.to_model_input(batches[0][0], "cpu", channels_last=True), batches[0][1]
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
    raw = next(iter(build_dataloader(ds, batch_size=6, workers=0)))[0]
    assert raw.dtype == torch.uint8 and raw.shape == (6, 3, 64, 64)


def test_default_workers_from_affinity():
    cpus = len(os.sched_getaffinity(0))
    assert default_workers() == max(1, cpus - 1)
    assert default_workers(local_world_size=cpus * 4) == 1
    with pytest.raises(ValueError):
        default_workers(0)


# ----------------------------------------------------------------------------------------- image modes
MODE_CASES = mode_cases()


def _decode_every_pipeline(path: str) -> dict[str, np.ndarray]:
    """Full-resolution (H, W, 3) uint8 of ``path`` from each pipeline's decode: the torchvision pipeline's
    PIL loader, the fast pipeline (libjpeg-turbo/libpng or PIL) and its full-image loader."""
    box, size = (0, 0, MODE_H, MODE_W), (MODE_H, MODE_W)
    return {
        "torchvision": np.array(tr.pil_loader(path)),
        "fast": tr.decode_resized_crop(tr.encoded_loader(path), box, size).permute(1, 2, 0).numpy(),
        "uint8_loader": tr.uint8_loader(path).permute(1, 2, 0).numpy(),
    }


@pytest.mark.parametrize("case", [c for c in MODE_CASES if c.expected is not None], ids=lambda c: c.name)
def test_every_image_mode_decodes_to_correct_8bit_rgb(tmp_path, case):
    path = _write(tmp_path / (case.name + case.ext), case.data)
    with Image.open(path) as img:
        assert img.mode == case.mode
    for name, out in _decode_every_pipeline(path).items():
        assert out.shape == (MODE_H, MODE_W, 3) and out.dtype == np.uint8, name
        err = np.abs(out.astype(int) - case.expected.astype(int)).max()
        assert err <= case.tol, f"{case.name} via {name}: max error {err}"


def test_16bit_gradient_spans_0_to_255_not_white(tmp_path):
    """A 0..65535 gradient must map onto 0..255 (PIL's convert('RGB') clips it to almost all 255)."""
    case = next(c for c in MODE_CASES if c.name == "grey16")
    path = _write(tmp_path / "g.png", case.data)
    for name, out in _decode_every_pipeline(path).items():
        flat = out[..., 0].ravel()
        assert flat.min() == 0 and flat.max() == 255, name
        assert (np.diff(flat.astype(int)) >= 0).all() and len(np.unique(flat)) > 150, name


@pytest.mark.parametrize("case", [c for c in MODE_CASES if c.expected is None], ids=lambda c: c.name)
def test_modes_without_an_8bit_range_are_refused_naming_the_mode(tmp_path, case):
    path = _write(tmp_path / (case.name + case.ext), case.data)
    for loader in (tr.pil_loader, tr.encoded_loader, tr.uint8_loader):
        with pytest.raises(UnsupportedImageError, match=f"image mode '{case.mode}'"):
            loader(path)


def test_draft_decode_of_a_grey_jpeg_is_grey(photos):
    """The DCT-domain (draft) path converts through to_rgb8 too: a greyscale JPEG stays grey."""
    data = _jpeg(photos[0], (640, 427), mode="L")
    enc = tr.EncodedImage.from_bytes(data)
    assert enc.mode == "L" and tr.draft_scale(enc, 427, 640, 100, 100) == 4
    out = tr.decode_resized_crop(enc, (0, 0, 427, 640), (100, 150)).int()
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]) and out.float().std() > 10
