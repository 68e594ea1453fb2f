"""Shared pieces of the benchmarks: machine description, clocks, interleaved timing, Markdown reports,
generated JPEGs, the training step, and the argument groups every sub-command shares (parent parsers)."""
from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "benchmarks"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class BenchError(ValueError):
    """A bad argument or unusable environment (printed as one line)."""


# --------------------------------------------------------------------------------------------- helpers
def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_description(device: torch.device | None = None) -> list[str]:
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


def command_line(argv: Sequence[str]) -> str:
    """The command that reproduces a run, as written into its report."""
    return " ".join(["python -m scripts.bench", *(shlex.quote(a) for a in argv)])


def report_path(args: argparse.Namespace, default_name: str) -> Path:
    """Where a run's report goes: ``--out`` if given; ``results/benchmarks/<default_name>`` (the committed
    reference figures) only with ``--publish``; else a scratch place that nothing reads: a fresh temporary
    folder for ``--quick`` smoke runs, ``runs/benchmarks/<default_name>`` (git-ignored) for full runs."""
    if getattr(args, "out", None):
        return Path(args.out)
    if getattr(args, "publish", False):
        return RESULTS / default_name
    if getattr(args, "quick", False):
        return Path(tempfile.mkdtemp(prefix="fcanet_bench_quick_")) / default_name
    return ROOT / "runs" / "benchmarks" / default_name


def check_report_args(args: argparse.Namespace) -> None:
    """Refuse option combinations that would put meaningless or misplaced figures under ``results/``."""
    if getattr(args, "publish", False):
        if getattr(args, "quick", False):
            raise BenchError("--publish with --quick: smoke-run figures mean nothing and are never published to "
                             "results/benchmarks/")
        if getattr(args, "out", None):
            raise BenchError("--publish writes results/benchmarks/<command>.md; give either --publish or --out")


def target_verdict(args: argparse.Namespace, ok: bool, target: str) -> str:
    """``within``/``NOT within`` ``target`` for a measured ratio; no verdict on ``--quick`` figures."""
    if getattr(args, "quick", False):
        return "no verdict on a --quick smoke run"
    return f"{'within' if ok else 'NOT within'} {target}"


def write_report(args: argparse.Namespace, default_name: str, title: str, machine: list[str], body: str) -> Path:
    """Write the report (title, date, command, machine, body) atomically to :func:`report_path`."""
    from engine.fileio import atomic_write_text
    out = report_path(args, default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    smoke = ("**Smoke run (`--quick`): tiny sizes and models; the figures mean nothing.**\n\n"
             if getattr(args, "quick", False) else "")
    text = (f"# {title}\n\n{smoke}Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with\n\n"
            f"```\n{command_line(args.argv)}\n```\n\nMachine:\n\n" + "".join(f"- {m}\n" for m in machine) + "\n"
            + body + "\n")
    atomic_write_text(out, text)
    where = "" if getattr(args, "publish", False) or getattr(args, "out", None) else (
        " (results/benchmarks/ changes only with --publish or --out)")
    print(f"\nwrote {out}{where}")
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


def interleaved_rates(fns: dict[Any, Callable[[], Any]], seconds: float, slice_s: float = 0.05,
                      device: torch.device | None = None) -> dict[Any, tuple[float, float]]:
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


# ----------------------------------------------------------------------------------------------- train
def make_train_step(model: torch.nn.Module, device: torch.device, precision: str, channels_last: bool,
                    compile_model: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One SGD training step (the trainer's optimizer, scaler and loss: :func:`engine.builders.make_sgd`,
    :func:`engine.builders.make_scaler`) on a uint8 batch; returns the loss tensor without synchronizing the
    host."""
    from engine.builders import make_scaler, make_sgd
    from engine.data.transforms import to_model_input
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # The trainer's optimizer and scaler (fused SGD on CUDA; under fp16 the for-each SGD would make the scaler
    # sync the host every step): the benchmark times the step the trainer runs.
    opt = make_sgd(model, 0.1, device)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    dtype = PRECISIONS[precision]
    scaler = make_scaler("fp16" if precision == "fp16" else "off")
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


def interleaved_step_times(steps: dict[str, Callable[[], Any]], device: torch.device, rounds: int, n_steps: int,
                           label: str = "round", peaks: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each step function (:func:`step_clock`), over ``rounds`` rounds in which every
    function runs ``n_steps`` times in turn (interleaved, so that a change of machine load hits them alike);
    one list per name, each round printed as ``label``. With ``peaks`` on CUDA, each name's peak allocated
    memory over its steps is recorded there."""
    cuda = device.type == "cuda"
    clock = step_clock(device)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(rounds):
        for name, step in steps.items():
            if cuda and peaks is not None:
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = clock()
            for _ in range(n_steps):
                step()
            sync(device)
            times[name].append((clock() - t0) / n_steps)
            if cuda and peaks is not None:
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
        print(f"  {label} {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in steps))
    return times


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``None`` -> bf16 on CUDA, fp32 elsewhere; fp16 needs CUDA (GradScaler)."""
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision == "fp16" and device.type != "cuda":
        raise BenchError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def setup_threads(threads: int) -> None:
    if threads < 0:
        raise BenchError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- shared argument groups
def report_args() -> argparse.ArgumentParser:
    """``--out``, ``--publish`` and ``--quick`` (every sub-command)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default=None, help="report path (default: runs/benchmarks/<command>.md, or a temporary "
                   "folder with --quick)")
    p.add_argument("--publish", action="store_true",
                   help="write the committed reference report results/benchmarks/<command>.md (not with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (figures meaningless, no verdicts)")
    return p


def device_args() -> argparse.ArgumentParser:
    """``--device`` and ``--threads`` (the model benchmarks)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p


def step_args() -> argparse.ArgumentParser:
    """Options of a timed model step: precision, layout, input size, classes, warm-up/steps/rounds."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on CUDA only)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    return p


def jpeg_args() -> argparse.ArgumentParser:
    """``--sizes`` of the generated JPEGs."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--sizes", default="500x375", help="JPEG sizes WIDTHxHEIGHT, comma-separated")
    return p
