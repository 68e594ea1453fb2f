"""``data``: img/s per core of our ``fast`` train/val transforms vs the torchvision reference transforms (PIL
decode + RandomResizedCrop/Resize+CenterCrop + ToTensor + Normalize) on JPEGs made from scikit-learn's two
sample photos at ImageNet-typical sizes, in-process (one thread) and through the DataLoader with 1 and N
workers."""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .common import (BenchError, available_cpus, interleaved_rates, jpeg_args, machine_description, md_table,
                     parse_sizes, report_args, sample_jpeg, write_jpeg_imagefolder, write_report)


def _identity(x: Any) -> Any:
    return x


def _transform_variants(image_size: int, resize: int, crop: str) -> dict[str, dict[str, tuple]]:
    from torchvision.transforms import v2

    from engine.data import pipeline as pl
    from engine.data import transforms as tr
    recipe = tr.CROP_RECIPES[crop]
    # the middle ground between the two: libjpeg-turbo decode + torchvision v2 transforms on uint8
    v2_train = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True, **recipe), v2.RandomHorizontalFlip()])
    v2_val = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])
    return {
        "train": {"reference": pl.build_train_transform(image_size, crop, "torchvision"),
                  "decode_jpeg+v2 uint8": (tr.uint8_loader, v2_train),
                  "fast (ours)": pl.build_train_transform(image_size, crop, "fast"),
                  # the floor: a full-resolution decode alone (no augmentation, no conversion)
                  "decode only: PIL": (tr.pil_loader, _identity),
                  "decode only: decode_jpeg": (tr.uint8_loader, _identity)},
        "val": {"reference": pl.build_val_transform(image_size, resize, "torchvision"),
                "decode_jpeg+v2 uint8": (tr.uint8_loader, v2_val),
                "fast (ours)": pl.build_val_transform(image_size, resize, "fast")},
    }


def _dataloader_rate(pipeline: str, kind: str, root: Path, args, workers: int) -> tuple[float, float]:
    """(img/s wall, worker CPU-seconds per image) iterating an ImageFolder through ``build_dataloader``.

    Worker CPU time comes from ``getrusage(RUSAGE_CHILDREN)`` after the workers exit (all epochs, the
    warm-up one included, so it is divided by every image they produced)."""
    import gc
    import resource

    from torchvision.datasets import ImageFolder

    from engine.data import pipeline as pl
    from engine.data.loader import build_dataloader
    if kind == "train":
        loader, tf = pl.build_train_transform(args.image_size, args.crop, pipeline)
    else:
        loader, tf = pl.build_val_transform(args.image_size, args.resize, pipeline)
    ds = ImageFolder(str(root), transform=tf, loader=loader)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    dl = build_dataloader(ds, args.batch, workers=workers, device="cpu", shuffle=kind == "train")
    total = 0
    for images, _ in dl:  # warm-up epoch: worker start-up, page cache
        total += images.shape[0]
    n, t0 = 0, time.perf_counter()
    while True:
        for images, _ in dl:
            n += images.shape[0]
        dt = time.perf_counter() - t0
        if dt >= args.seconds:
            break
    total += n
    del dl, images
    gc.collect()  # shuts the persistent workers down (joined), so their CPU time is accounted
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return n / dt, worker_cpu / max(total, 1)


def _check_args(args) -> None:
    from engine.data import transforms as tr
    if args.image_size < 1 or args.resize < args.image_size:
        raise BenchError(f"--resize ({args.resize}) must be >= --image-size ({args.image_size}) >= 1")
    if args.crop not in tr.CROP_RECIPES:
        raise BenchError(f"--crop: unknown recipe {args.crop!r}; expected one of {', '.join(tr.CROP_RECIPES)}")


def run(args) -> None:
    _check_args(args)
    sizes = parse_sizes(args.sizes)
    n_workers = args.workers or available_cpus()
    machine = machine_description()
    print("\n".join(machine))
    tmp = Path(tempfile.mkdtemp(prefix="fcanet_bench_data_"))
    sections = []
    try:
        files = {}
        for w, h in sizes:
            for photo in (0, 1):
                p = tmp / f"photo{photo}_{w}x{h}.jpg"
                p.write_bytes(sample_jpeg(photo, (w, h), args.quality))
                files[(w, h, photo)] = str(p)
        variants = _transform_variants(args.image_size, args.resize, args.crop)

        # ---- in-process, one thread: img/s per core
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        torch.manual_seed(0)
        rows, summary = [], []
        for kind, vs in variants.items():
            for (w, h) in sizes:
                fns = {(name, photo): (lambda L=loader, f=tf, p=files[(w, h, photo)]: f(L(p)))
                       for name, (loader, tf) in vs.items() for photo in (0, 1)}
                rates = interleaved_rates(fns, args.seconds)
                print(f"  in-process {kind} {w}x{h} done")
                # both photos: images per second over the pair (harmonic mean of the per-photo rates)
                pair = {name: [2.0 / (1.0 / rates[(name, 0)][i] + 1.0 / rates[(name, 1)][i]) for i in (0, 1)]
                        for name in vs}
                for name in vs:
                    cpu_ratio = pair[name][0] / pair["reference"][0]
                    wall_ratio = pair[name][1] / pair["reference"][1]
                    rows.append([kind, f"{w}x{h}", name, f"{pair[name][0]:.0f}",
                                 f"{rates[(name, 0)][0]:.0f} / {rates[(name, 1)][0]:.0f}",
                                 f"**{cpu_ratio:.2f}x**" if name == "fast (ours)" else f"{cpu_ratio:.2f}x",
                                 f"{pair[name][1]:.0f}", f"{wall_ratio:.2f}x"])
                    if name == "fast (ours)":
                        summary.append((kind, f"{w}x{h}", cpu_ratio, wall_ratio))
        torch.set_num_threads(threads)
        table1 = md_table(["transform", "JPEG size", "pipeline", "img per CPU-s", "photo 0 / photo 1",
                           "vs reference (CPU)", "img per wall-s", "vs reference (wall)"], rows)
        print("\n" + table1)
        sections.append(
            "## Per core, in-process (one thread, loader + transform from a cached file)\n\n"
            f"Image size {args.image_size}, val resize {args.resize}, crop recipe `{args.crop}`, JPEG quality "
            f"{args.quality}; every variant and photo runs ~{args.seconds:g} CPU-s, interleaved in ~50 ms slices; rate "
            "over the two sample photos (china, flower) = harmonic mean of the per-photo rates. `img per CPU-s` "
            "(process CPU time, one thread) is the per-core throughput and is insensitive to other load on the "
            "machine; wall-clock rates are shown too.\n"
            "`reference` = the `torchvision` pipeline (PIL decode, `torchvision.transforms` RandomResizedCrop + "
            "flip / Resize + CenterCrop, ToTensor, Normalize); `decode_jpeg+v2 uint8` = libjpeg-turbo decode + "
            "`transforms.v2` on uint8; `fast (ours)` = `data.pipeline=fast`; `decode only` = reading and decoding "
            "the whole JPEG at full resolution and nothing else (PIL / `torchvision.io.decode_jpeg`): its ratio is "
            "the ceiling of any pipeline that decodes the full image.\n\n" + table1)

        # ---- through the DataLoader
        rows = []
        worker_counts = sorted({1, n_workers})
        for (w, h) in sizes:
            root = write_jpeg_imagefolder(tmp / f"folder_{w}x{h}", [(w, h)], args.dl_images // 2)
            res: dict[tuple, list[tuple[float, float]]] = {}
            for r in range(args.rounds):
                for workers in worker_counts:
                    for kind in ("train", "val"):
                        for pipeline in ("torchvision", "fast"):
                            res.setdefault((workers, kind, pipeline), []).append(
                                _dataloader_rate(pipeline, kind, root, args, workers))
                print(f"  DataLoader {w}x{h} round {r + 1}/{args.rounds} done")
            for workers in worker_counts:
                for kind in ("train", "val"):
                    ref, fast = res[(workers, kind, "torchvision")], res[(workers, kind, "fast")]
                    ratio = statistics.median(a[0] / b[0] for a, b in zip(fast, ref, strict=True))
                    ref_cpu = statistics.median(x[1] for x in ref)
                    fast_cpu = statistics.median(x[1] for x in fast)
                    rows.append([kind, f"{w}x{h}", workers, f"{statistics.median(x[0] for x in ref):.0f}",
                                 f"{statistics.median(x[0] for x in fast):.0f}", f"**{ratio:.2f}x**",
                                 f"{ref_cpu * 1e3:.2f}", f"{fast_cpu * 1e3:.2f}", f"**{ref_cpu / fast_cpu:.2f}x**"])
        table2 = md_table(["transform", "JPEG size", "workers", "reference img/s", "fast img/s", "vs reference (wall)",
                           "reference worker CPU-ms/img", "fast worker CPU-ms/img", "vs reference (per core)"], rows)
        print("\n" + table2)
        sections.append(
            f"## Through the DataLoader (`engine.data.loader.build_dataloader`, batch {args.batch}, "
            f"{args.dl_images} files per size)\n\n"
            f"The main process only iterates the batches; {available_cpus()} cores are shared by the workers and "
            f"the main process. img/s: wall clock over >= {args.seconds:g}s after a warm-up epoch, median of "
            f"{args.rounds} interleaved rounds (ratio = median of per-round ratios). Worker CPU-ms/img: the "
            "workers' CPU time (getrusage of the exited workers) per image they produced; its ratio is the "
            "per-core speed-up through the DataLoader (collation and IPC included).\n\n" + table2)
        sections.insert(0, "## Summary: fast vs reference, per core (in-process)\n\n" + md_table(
            ["transform", "JPEG size", "speed-up (CPU time)", "speed-up (wall)"],
            [[k, s, f"{x:.2f}x", f"{y:.2f}x"] for k, s, x, y in summary]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_report(args, "data.md", "Input pipeline throughput", machine, "\n\n".join(sections))


def add_parser(sub) -> None:
    d = sub.add_parser("data", parents=[report_args(), jpeg_args()], help="input pipeline img/s per core: fast vs "
                       "torchvision reference", description=__doc__)
    d.set_defaults(sizes="500x375,1000x750", run=run, quick_overrides=apply_quick)
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--resize", type=int, default=256, help="val: shorter side before the center crop")
    d.add_argument("--crop", default="fcanet", help="crop recipe: fcanet or torchvision")
    d.add_argument("--quality", type=int, default=90)
    d.add_argument("--seconds", type=float, default=2.0, help="measuring time per variant and round")
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--workers", type=int, default=0, help="N for the N-worker DataLoader run (0: all usable CPUs)")
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--dl-images", type=int, default=128, help="files in the DataLoader ImageFolder (per size)")


def apply_quick(args: argparse.Namespace) -> None:
    args.sizes, args.image_size, args.resize = "120x90", 32, 36
    args.seconds, args.rounds, args.dl_images, args.batch = 0.05, 1, 8, 4
    args.workers = args.workers or 1
