#!/usr/bin/env python
"""Throughput benchmarks of the input pipeline, the training step and the whole trainer.

Every figure is measured side by side in one run (variants interleaved round by round, median over
rounds reported with the min-max spread) and printed as a ratio to its reference:

  data     img/s per core of our ``fast`` train/val transforms vs the torchvision reference transforms
           (PIL decode + RandomResizedCrop/Resize+CenterCrop + ToTensor + Normalize) on JPEGs made from
           scikit-learn's two sample photos at ImageNet-typical sizes, in-process (one thread) and through
           the DataLoader with 1 and N workers.
  train    img/s of full training steps (data already in memory) of ResNet-50, SENet-50, ECANet-50 and
           FcaNet-50 on the available device; ratios to ResNet-50 and FcaNet-50 / SENet-50.
  trainer  our whole trainer (``train_imagenet.py``, data.pipeline=fast) vs a reference loop (ImageFolder +
           PIL + standard transforms + the same model, batch and optimizer) on the same generated JPEG
           ImageFolder, equal epochs; img/s ratio.

Results are written to ``results/benchmarks/<subcommand>.md`` (with the machine description) unless
``--out`` says otherwise. ``--quick`` runs tiny sizes (a smoke test, figures meaningless).

Examples::

    python scripts/benchmark.py data
    python scripts/benchmark.py train --batch 32 --precision fp32
    python scripts/benchmark.py trainer --images 256 --batch 32
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

RESULTS = ROOT / "results" / "benchmarks"


class BenchError(ValueError):
    """A bad argument or unusable environment (printed as one line)."""


# --------------------------------------------------------------------------------------------- helpers
def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_description(device: Optional[torch.device] = None) -> list[str]:
    """Lines describing the hardware and software the figures were measured on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    lines = [f"CPU: {cpu}; {available_cpus()} cores usable by this process (of {os.cpu_count()}){mem}",
             f"OS: {platform.platform()}; Python {platform.python_version()}"]
    try:
        import PIL
        import torchvision
        from PIL import features
        turbo = features.check_feature("libjpeg_turbo")
        lines.append(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__} "
                     f"(libjpeg-turbo: {turbo}), torch intra-op threads: {torch.get_num_threads()}")
    except ImportError:
        lines.append(f"torch {torch.__version__}")
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    elif device is not None:
        lines.append(f"device: {device} (no GPU used)")
    return lines


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: CUDA is not available on this machine")
    return dev


def step_clock(device: torch.device) -> Callable[[], float]:
    """The clock of the step benchmarks: wall time on CUDA; on CPU this process's CPU time, which is the
    compute cost itself and is not inflated by other processes competing for the cores (run CPU benchmarks
    with ``--threads 1`` so that no intra-op thread spins waiting for a descheduled sibling)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}" if len(values) > 1 else "-"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_report(path: Optional[str], default_name: str, title: str, machine: list[str], body: str,
                 argv: Sequence[str], script: str = "scripts/benchmark.py") -> Path:
    out = Path(path) if path else RESULTS / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python", script, *argv])
    text = (f"# {title}\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with\n\n"
            f"```\n{cmd}\n```\n\nMachine:\n\n" + "".join(f"- {m}\n" for m in machine) + "\n" + body + "\n")
    out.write_text(text)
    print(f"\nwrote {out}")
    return out


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise BenchError(f"--sizes: {part!r} is not WIDTHxHEIGHT (e.g. 500x375)") from None
        if w < 1 or h < 1:
            raise BenchError(f"--sizes: {part!r} must be positive")
        sizes.append((w, h))
    return sizes


def sample_jpeg(photo: int, size: tuple[int, int], quality: int = 90) -> bytes:
    """scikit-learn sample photo ``photo`` (0: china, 1: flower) resized to ``size`` and JPEG-encoded."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    arr = load_sample_images().images[photo]
    buf = io.BytesIO()
    Image.fromarray(arr).resize(size, Image.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg_imagefolder(root: Path, sizes: Sequence[tuple[int, int]], per_class: int, classes: int = 2,
                           quality: int = 90) -> Path:
    """An ImageFolder of ``classes`` x ``per_class`` JPEGs cycling over the two photos and ``sizes``."""
    cache = {}
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            key = ((i + c) % 2, sizes[i % len(sizes)])
            if key not in cache:
                cache[key] = sample_jpeg(key[0], key[1], quality)
            (folder / f"{i:05d}.jpg").write_bytes(cache[key])
    return root


# ------------------------------------------------------------------------------------------------ data
def interleaved_rates(fns: dict[Any, Callable[[], Any]], seconds: float, slice_s: float = 0.05,
                      device: Optional[torch.device] = None) -> dict[Any, tuple[float, float]]:
    """``{key: (calls per CPU-second, calls per wall-second)}`` of each function, measured interleaved: the
    functions take turns in slices of about ``slice_s`` (the order rotating every pass) until each has run
    about ``seconds``, so that a change of machine load hits all of them alike. CPU time is this process's
    (``time.process_time``): with one thread it is the per-core cost, insensitive to other processes
    competing for the cores, which only inflate wall time. With a CUDA ``device`` every slice ends with a
    synchronization and the first number is wall-clock too."""
    cuda = device is not None and device.type == "cuda"
    cpu_clock = time.perf_counter if cuda else time.process_time
    keys = list(fns)
    per_slice = {}
    for k in keys:  # warm-up and calibration
        fns[k]()
        if cuda:
            sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            fns[k]()
        if cuda:
            sync(device)
        per_slice[k] = max(1, int(slice_s / max((time.perf_counter() - t0) / 3, 1e-6)))
    calls = {k: 0 for k in keys}
    cpu = {k: 0.0 for k in keys}
    wall = {k: 0.0 for k in keys}
    passes = 0
    while min(cpu.values()) < seconds or passes < 3:
        order = keys[passes % len(keys):] + keys[:passes % len(keys)]
        for k in order:
            fn, n = fns[k], per_slice[k]
            c0, w0 = cpu_clock(), time.perf_counter()
            for _ in range(n):
                fn()
            if cuda:
                sync(device)
            cpu[k] += cpu_clock() - c0
            wall[k] += time.perf_counter() - w0
            calls[k] += n
        passes += 1
    return {k: (calls[k] / max(cpu[k], 1e-9), calls[k] / max(wall[k], 1e-9)) for k in keys}


def _identity(x: Any) -> Any:
    return x


def _transform_variants(image_size: int, resize: int, crop: str) -> dict[str, dict[str, tuple]]:
    from torchvision.transforms import v2

    from engine import transforms as tr
    recipe = tr.CROP_RECIPES[crop]
    # the middle ground the issue mentions: libjpeg-turbo decode + torchvision v2 transforms on uint8
    v2_train = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True, **recipe), v2.RandomHorizontalFlip()])
    v2_val = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])
    return {
        "train": {"reference": tr.build_train_transform(image_size, crop, "torchvision"),
                  "decode_jpeg+v2 uint8": (tr.uint8_loader, v2_train),
                  "fast (ours)": tr.build_train_transform(image_size, crop, "fast"),
                  # the floor: a full-resolution decode alone (no augmentation, no conversion)
                  "decode only: PIL": (tr.pil_loader, _identity),
                  "decode only: decode_jpeg": (tr.uint8_loader, _identity)},
        "val": {"reference": tr.build_val_transform(image_size, resize, "torchvision"),
                "decode_jpeg+v2 uint8": (tr.uint8_loader, v2_val),
                "fast (ours)": tr.build_val_transform(image_size, resize, "fast")},
    }


def _dataloader_rate(pipeline: str, kind: str, root: Path, args, workers: int) -> tuple[float, float]:
    """(img/s wall, worker CPU-seconds per image) iterating an ImageFolder through ``build_dataloader``.

    Worker CPU time comes from ``getrusage(RUSAGE_CHILDREN)`` after the workers exit (all epochs, the
    warm-up one included, so it is divided by every image they produced)."""
    import gc
    import resource

    from torchvision.datasets import ImageFolder

    from engine import transforms as tr
    from engine.loader import build_dataloader
    if kind == "train":
        loader, tf = tr.build_train_transform(args.image_size, args.crop, pipeline)
    else:
        loader, tf = tr.build_val_transform(args.image_size, args.resize, pipeline)
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


def cmd_data(args) -> None:
    from engine import transforms as tr
    if args.image_size < 1 or args.resize < args.image_size:
        raise BenchError(f"--resize ({args.resize}) must be >= --image-size ({args.image_size}) >= 1")
    if args.crop not in tr.CROP_RECIPES:
        raise BenchError(f"--crop: unknown recipe {args.crop!r}; expected one of {', '.join(tr.CROP_RECIPES)}")
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
                    ratio = statistics.median(a[0] / b[0] for a, b in zip(fast, ref))
                    ref_cpu = statistics.median(x[1] for x in ref)
                    fast_cpu = statistics.median(x[1] for x in fast)
                    rows.append([kind, f"{w}x{h}", workers, f"{statistics.median(x[0] for x in ref):.0f}",
                                 f"{statistics.median(x[0] for x in fast):.0f}", f"**{ratio:.2f}x**",
                                 f"{ref_cpu * 1e3:.2f}", f"{fast_cpu * 1e3:.2f}", f"**{ref_cpu / fast_cpu:.2f}x**"])
        table2 = md_table(["transform", "JPEG size", "workers", "reference img/s", "fast img/s", "vs reference (wall)",
                           "reference worker CPU-ms/img", "fast worker CPU-ms/img", "vs reference (per core)"], rows)
        print("\n" + table2)
        sections.append(
            f"## Through the DataLoader (`engine.loader.build_dataloader`, batch {args.batch}, "
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
    write_report(args.out, "data.md", "Input pipeline throughput", machine, "\n\n".join(sections), args.argv)


# ----------------------------------------------------------------------------------------------- train
def make_train_step(model: torch.nn.Module, device: torch.device, precision: str, channels_last: bool,
                    compile_model: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One SGD training step (the recipe's optimizer and loss) on a uint8 batch; returns the loss tensor
    without synchronizing the host."""
    from engine.transforms import to_model_input
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    fwd = torch.compile(model) if compile_model else model

    def step(images_u8: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = to_model_input(images_u8, device, channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = crit(fwd(x), targets)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    return step


def cmd_train(args) -> None:
    from models import create_model
    device = pick_device(args.device)
    if args.precision == "fp16" and device.type != "cuda":
        raise BenchError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    if args.batch < 1 or args.image_size < 32 or args.steps < 1 or args.rounds < 1:
        raise BenchError("--batch, --steps, --rounds must be >= 1 and --image-size >= 32")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description(device)
    print("\n".join(machine))
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           device=device)
    targets = torch.randint(0, args.num_classes, (args.batch,), device=device)
    steps = {}
    for name in names:
        try:
            model = create_model(name, num_classes=args.num_classes)
        except (ValueError, KeyError) as e:
            raise BenchError(f"--models: {e}") from None
        steps[name] = make_train_step(model, device, args.precision, args.channels_last, args.compile)
    times: dict[str, list[float]] = {n: [] for n in names}
    peak: dict[str, int] = {}
    clock = step_clock(device)
    for name in names:  # warm-up (allocator, cudnn autotune, compile)
        for _ in range(args.warmup):
            steps[name](images, targets)
        sync(device)
    for r in range(args.rounds):
        for name in names:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = clock()
            for _ in range(args.steps):
                steps[name](images, targets)
            sync(device)
            times[name].append((clock() - t0) / args.steps)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names))
    ips = {n: [args.batch / t for t in times[n]] for n in names}
    med = {n: statistics.median(ips[n]) for n in names}
    base = names[0]
    rows = []
    for n in names:
        row = [n, f"{args.batch / med[n] * 1e3:.1f}", f"{med[n]:.1f}", spread(ips[n]) if med[n] > 100 else
               f"{min(ips[n]):.1f}-{max(ips[n]):.1f}", f"{med[n] / med[base]:.3f}"]
        if device.type == "cuda":
            row.append(f"{peak[n] / 2**20:.0f}")
        rows.append(row)
    header = ["model", "ms/step", "img/s (median)", "min-max", f"vs {base}"] + (
        ["peak MiB"] if device.type == "cuda" else [])
    table = md_table(header, rows)
    body = (f"Batch {args.batch}, {args.image_size}x{args.image_size}, precision {args.precision}, "
            f"channels_last {args.channels_last}, compile {args.compile}, device {device}; SGD momentum 0.9 + "
            f"label-smoothed CE; uint8 batch already on the device (normalized inside the step). "
            f"{args.warmup} warm-up steps per model, then {args.rounds} interleaved rounds of {args.steps} steps; "
            f"median. Time: {'wall clock' if device.type == 'cuda' else 'process CPU time'} "
            f"(torch threads {torch.get_num_threads()}).\n\n" + table)
    if "fcanet50" in med and "senet50" in med:
        ratio = med["fcanet50"] / med["senet50"]
        verdict = "within" if ratio >= 0.97 else "NOT within"
        body += (f"\n\nFcaNet-50 / SENet-50 training throughput: **{ratio:.3f}** ({verdict} the 3% target; "
                 f"per-round ratios: " + ", ".join(f"{a / b:.3f}" for a, b in zip(ips['fcanet50'], ips['senet50']))
                 + ").")
    print("\n" + body)
    write_report(args.out, "train.md", "Training-step throughput", machine, body, args.argv)


# --------------------------------------------------------------------------------------------- trainer
def _model_kwargs(args) -> dict:
    """Model options shared by both sides (``--widths``: a small network, so the input pipeline, not the
    model, bounds the step on CPU, as on a GPU node)."""
    return {"input_size": args.image_size, **({"widths": list(args.widths)} if args.widths else {})}


def _reference_recipe_run(root: Path, args, device: torch.device, epochs: int) -> list[tuple[int, float]]:
    """The torchvision reference recipe's loop: ImageFolder + PIL + standard transforms, DataLoader with the
    same workers, the same model/batch/optimizer/loss; ``loss.item()`` logged every step as torchvision's
    ``references/classification/train.py`` does. Returns (images, seconds) per epoch."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from engine.transforms import CROP_RECIPES, IMAGENET_MEAN, IMAGENET_STD
    from models import create_model
    tf = T.Compose([T.RandomResizedCrop(args.image_size, **CROP_RECIPES["fcanet"]), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = ImageFolder(str(root / "train"), transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                     pin_memory=device.type == "cuda", drop_last=True)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000, **_model_kwargs(args)).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * args.batch / 256, momentum=0.9, weight_decay=1e-4)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    amp = device.type == "cuda"
    out = []
    model.train()
    for _ in range(epochs):
        n, t0 = 0, time.perf_counter()
        for images, targets in dl:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = crit(model(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()  # the reference logs the loss every step (a host sync on CUDA)
            n += images.shape[0]
        sync(device)
        out.append((n, time.perf_counter() - t0))
    return out


def _our_trainer_run(root: Path, args, device: torch.device, epochs: int, pipeline: str, out_dir: Path
                     ) -> list[tuple[int, float]]:
    """Our trainer (``engine.trainer.fit``, the ImageNet base config) on the same data; per-epoch (images,
    seconds) from its ``metrics.jsonl`` (training time only, evaluation excluded)."""
    import json

    from engine.config import load_config
    from engine.trainer import fit
    kwargs = json.dumps(_model_kwargs(args))
    overrides = [f"model.name={args.model}", "model.num_classes=1000", f"model.kwargs={kwargs}", f"train.epochs={epochs}",
                 "train.warmup_epochs=0", f"train.batch_size={args.batch}",
                 f"train.amp={'bf16' if device.type == 'cuda' else repr('off')}",
                 f"train.channels_last={str(args.channels_last).lower()}", "train.checkpoint_every_steps=0",
                 "train.progress=false", "train.tensorboard=false", f"train.eval_every_epochs={epochs}",
                 f"data.root={root}", f"data.workers={args.workers}", f"data.pipeline={pipeline}",
                 f"data.image_size={args.image_size}", f"data.val_resize={max(args.image_size, args.image_size * 8 // 7)}",
                 f"output_dir={out_dir}"]
    cfg = load_config(ROOT / "configs" / "base" / "imagenet.yaml", overrides)
    fit(cfg)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(round(r["img_per_s"] * r["epoch_time_s"]), r["epoch_time_s"]) for r in rows]


def cmd_trainer(args) -> None:
    device = pick_device(args.device)
    if min(args.images, args.batch, args.epochs, args.rounds) < 1 or args.images < 2 * args.batch:
        raise BenchError("--images must be >= 2 x --batch and --batch, --epochs, --rounds >= 1")
    if args.workers is None:
        from engine.loader import default_workers
        args.workers = default_workers()
    if args.workers < 0:
        raise BenchError(f"--workers must be >= 0, got {args.workers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    sizes = parse_sizes(args.sizes)
    machine = machine_description(device)
    print("\n".join(machine))
    tmp = Path(tempfile.mkdtemp(prefix="fcanet_bench_trainer_"))
    epochs = 1 + args.epochs  # the first epoch (worker start-up, allocator, caches) is not counted
    variants = ["ours (fast pipeline)"] + (["ours (torchvision pipeline)"] if args.ours_torchvision else []) + [
        "reference recipe"]
    res: dict[str, list[float]] = {v: [] for v in variants}
    detail: dict[str, list[str]] = {v: [] for v in variants}
    try:
        root = tmp / "data"
        write_jpeg_imagefolder(root / "train", sizes, args.images // 2)
        write_jpeg_imagefolder(root / "val", sizes, max(1, args.batch // 2))
        for r in range(args.rounds):
            for v in variants:
                if v == "reference recipe":
                    per_epoch = _reference_recipe_run(root, args, device, epochs)
                else:
                    pipeline = "fast" if "fast" in v else "torchvision"
                    per_epoch = _our_trainer_run(root, args, device, epochs, pipeline, tmp / f"run_{r}_{pipeline}")
                timed = per_epoch[1:]
                n, t = sum(e[0] for e in timed), sum(e[1] for e in timed)
                res[v].append(n / t)
                detail[v].append(", ".join(f"{e[0] / e[1]:.1f}" for e in per_epoch))
                print(f"  round {r + 1}/{args.rounds} {v}: {n / t:.2f} img/s over {len(timed)} epoch(s) "
                      f"(per epoch incl. warm-up: {detail[v][-1]})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = "reference recipe"
    rows = []
    for v in variants:
        ratio = statistics.median(a / b for a, b in zip(res[v], res[ref]))
        rows.append([v, f"{statistics.median(res[v]):.2f}", f"**{ratio:.2f}x**" if v != ref else "1.00x",
                     "; ".join(detail[v])])
    table = md_table(["trainer", "train img/s (median)", "vs reference", "img/s per epoch (first = warm-up)"], rows)
    widths = f" with stage widths {args.widths}" if args.widths else ""
    body = (f"Model {args.model}{widths} (1000 classes), batch {args.batch}, image size {args.image_size}, "
            f"{args.images} training JPEGs ({args.sizes}, quality 90, the two scikit-learn sample photos), "
            f"{args.workers} DataLoader workers on both sides, torch threads {torch.get_num_threads()}, "
            f"device {device}, precision {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, channels_last "
            f"{args.channels_last}; 1 warm-up + {args.epochs} timed epoch(s) per side, {args.rounds} round(s). "
            "Ours: `engine.trainer.fit` with configs/base/imagenet.yaml (evaluation time excluded, as in its "
            "`img_per_s`); reference: ImageFolder + PIL + torchvision.transforms (RandomResizedCrop, flip, ToTensor, "
            "Normalize) + DataLoader(shuffle, pin_memory on CUDA) + the same model, SGD and loss, `loss.item()` "
            "every step.\n\n" + table)
    print("\n" + body)
    write_report(args.out, "trainer.md", "Whole trainer vs the torchvision reference recipe", machine, body, args.argv)


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{data,train,trainer}")

    d = sub.add_parser("data", help="input pipeline img/s per core: fast vs torchvision reference")
    d.add_argument("--sizes", default="500x375,1000x750", help="JPEG sizes WIDTHxHEIGHT, comma-separated")
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--resize", type=int, default=256, help="val: shorter side before the center crop")
    d.add_argument("--crop", default="fcanet", help="crop recipe: fcanet or torchvision")
    d.add_argument("--quality", type=int, default=90)
    d.add_argument("--seconds", type=float, default=2.0, help="measuring time per variant and round")
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--workers", type=int, default=0, help="N for the N-worker DataLoader run (0: all usable CPUs)")
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--dl-images", type=int, default=128, help="files in the DataLoader ImageFolder (per size)")
    d.add_argument("--out", default=None, help="report path (default results/benchmarks/data.md)")
    d.add_argument("--quick", action="store_true", help="tiny smoke run (figures meaningless)")

    t = sub.add_parser("train", help="training-step img/s of ResNet/SENet/ECANet/FcaNet-50")
    t.add_argument("--models", default="resnet50,senet50,ecanet50,fcanet50")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--image-size", type=int, default=224)
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    t.add_argument("--compile", action="store_true", help="torch.compile the models")
    t.add_argument("--num-classes", type=int, default=1000)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--steps", type=int, default=3, help="timed steps per model and round")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--out", default=None, help="report path (default results/benchmarks/train.md)")
    t.add_argument("--quick", action="store_true", help="tiny smoke run (figures meaningless)")

    r = sub.add_parser("trainer", help="whole trainer vs a torchvision reference loop, same data and model")
    r.add_argument("--model", default="resnet50")
    r.add_argument("--images", type=int, default=256, help="training images in the generated ImageFolder")
    r.add_argument("--sizes", default="500x375", help="JPEG sizes WIDTHxHEIGHT, comma-separated")
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--image-size", type=int, default=224)
    r.add_argument("--epochs", type=int, default=2, help="timed epochs for each side (after one warm-up epoch)")
    r.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers, both sides (default: engine.loader.default_workers())")
    r.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    r.add_argument("--device", default="auto")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="both sides (default: on CUDA only)")
    r.add_argument("--widths", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="stage widths of the model on both sides, e.g. 16,32,64,128 (default: the standard ResNet)")
    r.add_argument("--ours-torchvision", action="store_true",
                   help="also run our trainer with data.pipeline=torchvision (separates trainer and pipeline)")
    r.add_argument("--rounds", type=int, default=1)
    r.add_argument("--out", default=None, help="report path (default results/benchmarks/trainer.md)")
    r.add_argument("--quick", action="store_true", help="tiny smoke run (figures meaningless)")
    return p


def apply_quick(args) -> None:
    if not getattr(args, "quick", False):
        return
    if args.command == "data":
        args.sizes, args.image_size, args.resize = "120x90", 32, 36
        args.seconds, args.rounds, args.dl_images, args.batch = 0.05, 1, 8, 4
        args.workers = args.workers or 1
    elif args.command == "train":
        args.batch, args.image_size, args.steps, args.rounds, args.warmup = 2, 32, 1, 1, 1
        args.num_classes = 10
    elif args.command == "trainer":
        args.images, args.batch, args.image_size, args.epochs, args.sizes = 8, 4, 32, 1, "120x90"
        args.workers = 0 if args.workers is None else args.workers
        args.model = "resnet18" if args.model == "resnet50" else args.model


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    apply_quick(args)
    try:
        if args.command == "train" and args.precision is None:
            args.precision = "bf16" if pick_device(args.device).type == "cuda" else "fp32"
        {"data": cmd_data, "train": cmd_train, "trainer": cmd_trainer}[args.command](args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
