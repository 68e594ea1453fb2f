"""Image files in every PIL mode a data set may hold, with the 8-bit RGB each must decode to (shared by
test_transforms.py, test_gpu_pipeline.py and test_faults_data.py)."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

H, W = 12, 16


@dataclass
class ModeCase:
    name: str               # file stem
    ext: str                # file extension (ImageFolder picks files by extension)
    data: bytes
    mode: str               # the PIL mode the file opens as
    expected: np.ndarray | None  # uint8 (H, W, 3); None: the file must be refused
    tol: int = 0            # max abs error (lossy JPEG, or 16-bit PNG truncated vs rounded)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2).astype(np.uint8)


def mode_cases() -> list[ModeCase]:
    rng = np.random.default_rng(0)
    cases = []
    bits = (np.indices((H, W)).sum(0) % 2).astype(bool)  # checkerboard
    cases.append(ModeCase("bilevel", ".png", _save(Image.fromarray(bits), "PNG"), "1", _grey(bits * 255)))
    grey = rng.integers(0, 256, (H, W)).astype(np.uint8)
    cases.append(ModeCase("grey", ".png", _save(Image.fromarray(grey), "PNG"), "L", _grey(grey)))
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(rng.integers(0, 256, (H, W)).astype(np.uint8))])
    cases.append(ModeCase("grey_alpha", ".png", _save(la, "PNG"), "LA", _grey(grey)))
    # palette with per-entry transparency (tRNS bytes): pixels keep their palette colour
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 200, 10]], dtype=np.uint8)
    idx = rng.integers(0, 4, (H, W)).astype(np.uint8)
    p = Image.frombytes("P", (W, H), idx.tobytes())
    p.putpalette(palette.flatten().tolist() + [0] * (768 - 12))
    cases.append(ModeCase("palette_transparent", ".png", _save(p, "PNG", transparency=bytes([0, 128, 255, 255])), "P",
                          palette[idx]))
    # 16-bit grey gradient 0..65535 (PIL's convert('RGB') would clip it to all 255)
    g16 = np.round(np.linspace(0, 65535, H * W)).astype(np.uint16).reshape(H, W)
    g8 = ((g16.astype(np.uint32) + 128) // 257).astype(np.uint8)
    cases.append(ModeCase("grey16", ".png", _save(Image.fromarray(g16), "PNG"), "I;16", _grey(g8)))
    cases.append(ModeCase("grey16_tiff", ".tif", _save(Image.fromarray(g16), "TIFF"), "I;16", _grey(g8)))
    pgm = b"P5\n%d %d\n65535\n" % (W, H) + g16.astype(">u2").tobytes()
    cases.append(ModeCase("grey16_pgm", ".pgm", pgm, "I", _grey(g8)))
    rgb16 = rng.integers(0, 65536, (H, W, 3)).astype(np.uint16)
    png48 = _png_rgb16(rgb16)
    cases.append(ModeCase("rgb16", ".png", png48, "RGB", ((rgb16.astype(np.uint32) + 128) // 257).astype(np.uint8),
                          tol=1))
    cmyk = Image.new("CMYK", (W, H), (0, 128, 255, 64))
    rgb_of_cmyk = np.broadcast_to(np.array([191, 95, 0], dtype=np.uint8), (H, W, 3)).copy()
    cases.append(ModeCase("cmyk", ".tif", _save(cmyk, "TIFF"), "CMYK", rgb_of_cmyk))
    cases.append(ModeCase("cmyk_jpeg", ".jpg", _save(cmyk, "JPEG", quality=100), "CMYK", rgb_of_cmyk, tol=3))
    rgba = rng.integers(0, 256, (H, W, 4)).astype(np.uint8)
    cases.append(ModeCase("rgba", ".png", _save(Image.fromarray(rgba), "PNG"), "RGBA", rgba[..., :3]))
    flat_grey = np.full((H, W), 90, dtype=np.uint8)
    cases.append(ModeCase("grey_jpeg", ".jpg", _save(Image.fromarray(flat_grey), "JPEG", quality=95), "L",
                          _grey(flat_grey), tol=2))
    # no defined 8-bit range: refused
    i32 = (np.arange(H * W, dtype=np.int32).reshape(H, W) * 1000)
    cases.append(ModeCase("int32", ".tif", _save(Image.fromarray(i32), "TIFF"), "I", None))
    f32 = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    cases.append(ModeCase("float32", ".tif", _save(Image.fromarray(f32), "TIFF"), "F", None))
    return cases


def _png_rgb16(a: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), built with zlib."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
