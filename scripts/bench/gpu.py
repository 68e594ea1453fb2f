"""``gpu``: the GPU figures side by side in one process, in at most ~8 minutes on one H100/H200.

1. **Training step** img/s (synthetic uint8 batch already on the device, SGD + label-smoothed CE, bf16 autocast,
   channels_last) of ResNet/SENet/ECANet/FcaNet/CBAM/GCNet/GSoP-Net1-50 (ours), torchvision ``resnet50`` and
   timm ``seresnet50``
   (when installed), eager at every ``--batches`` size, and ``torch.compile``-d (``--compile-models``) at the
   largest batch; all variants interleaved round by round; compile warm-up time (first compiled step).
2. **Pooling and module per ResNet-50 stage** (the ``attention`` benchmark's table): GAP vs our DCT pooling vs
   the paper's Fig. 3 ``sum(x * w)``, and FCA vs SE vs FCA-with-Fig. 3 vs CBAM/GC/GSoP modules, forward +
   backward.
3. **Whole trainer** (``engine.trainer.fit``): FcaNet-50 and ResNet-50 on synthetic data, and on real JPEGs
   (scikit-learn's two sample photos re-encoded at ``--sizes``) with ``data.pipeline`` fast vs gpu, plus the
   torchvision reference loop (ImageFolder + PIL + torchvision transforms) on the same files.

Rows that need a GPU print ``needs CUDA`` on a CPU-only machine (compiled steps too, unless
``--compile-on-cpu``: CPU compilation of a ResNet-50 takes minutes, and ``tests/test_compile.py`` checks CPU
compile correctness). ``--budget-s`` bounds the run: sections that would start after it are listed as skipped
rather than run. ``--publish`` writes ``results/benchmarks/gpu.md`` (refused unless the device is CUDA); otherwise
the report goes to ``--out``, ``runs/benchmarks/gpu.md``, or a temporary folder for ``--quick``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

import torch

from .attention import QUICK_STAGES, STAGES, bench_stage
from .common import (BenchError, device_args, interleaved_step_times, jpeg_args, machine_description,
                     make_train_step, md_table, parse_sizes, pick_device, report_args, resolve_precision,
                     setup_threads, sync, target_verdict, write_jpeg_imagefolder, write_report)
from .trainer import our_trainer_run, reference_recipe_run

NEEDS_CUDA = "needs CUDA"
OURS = ("resnet50", "senet50", "ecanet50", "fcanet50", "cbam50", "gcnet50", "gsopnet50")
CUDNN_OFF = " cudnn.benchmark off"  # label suffix of the variants timed without cuDNN autotuning


def _without_cudnn_benchmark(step: Callable) -> Callable:
    """``step`` run with ``torch.backends.cudnn.benchmark`` off (restored on after each call): interleaved with
    the other variants, which run with it on (``train.cudnn_benchmark``, the trainer's default)."""
    def run(*args):
        torch.backends.cudnn.benchmark = False
        try:
            return step(*args)
        finally:
            torch.backends.cudnn.benchmark = True
    return run


class Budget:
    """Wall-clock budget of the whole run: ``ok(need_s)`` says whether a part expected to take ``need_s`` still
    fits; parts that do not are reported as skipped."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def ok(self, what: str, need_s: float = 0.0) -> bool:
        if self.elapsed() + need_s <= self.seconds:
            return True
        self.skipped.append(f"{what} (at {self.elapsed():.0f} s of the {self.seconds:.0f} s budget)")
        print(f"  skipped: {what} (time budget)")
        return False


# ------------------------------------------------------------------------------------------ 1. steps
def _builders(args) -> dict[str, Callable[[], torch.nn.Module]]:
    """name -> model constructor; external references only where their package is installed."""
    from models import create_model, model_options
    kw = {"num_classes": args.num_classes, **({"widths": args.widths} if args.widths else {})}

    def size(n: str) -> dict:  # the DCT sizes of FcaNet follow the input size; the other models take no such option
        return {"input_size": args.image_size} if "input_size" in model_options(n) else {}
    out: dict[str, Callable[[], torch.nn.Module]] = {
        n: (lambda n=n: create_model(n, **size(n), **kw)) for n in OURS}
    if not args.widths:  # the external models have the standard widths only
        import torchvision
        out["torchvision resnet50"] = lambda: torchvision.models.resnet50(weights=None, num_classes=args.num_classes)
        try:
            import timm
            out["timm seresnet50"] = lambda: timm.create_model("seresnet50", pretrained=False,
                                                               num_classes=args.num_classes)
        except ImportError:
            pass
    return out


def _add_compiled_steps(args, builders: dict, names: list[str], device: torch.device, budget: Budget,
                        images: torch.Tensor, targets: torch.Tensor, steps: dict, notes: dict, warm: dict) -> None:
    """Compile each model of ``names`` with one step on ``images``: success adds ``steps["<name> compiled"]``
    and its compile time (s) to ``warm``; a skip (no CUDA, time budget) or a failure becomes its ``notes``."""
    cuda = device.type == "cuda"
    for n in names:
        label = f"{n} compiled"
        if not cuda and not args.compile_on_cpu:
            notes[label] = NEEDS_CUDA
            continue
        if not budget.ok(f"compiling {n}", need_s=60.0):
            notes[label] = "skipped (time budget)"
            continue
        torch.manual_seed(0)
        step = make_train_step(builders[n](), device, args.precision, args.channels_last, compile_model=True)
        sync(device)
        t0 = time.perf_counter()
        try:
            step(images, targets)  # compiles forward and backward
            sync(device)
        except Exception as e:  # a compile failure is a result to report, not a crash of the benchmark
            notes[label] = f"failed: {str(e).splitlines()[0][:200]}"
            continue
        warm[label] = time.perf_counter() - t0
        print(f"  {label}: first step (compilation) {warm[label]:.1f} s")
        steps[label] = step


def bench_steps(args, device: torch.device, budget: Budget) -> tuple[str, dict[str, float]]:
    """Section 1; returns its Markdown and {variant label: median img/s} (used by section 3's ratios)."""
    cuda = device.type == "cuda"
    builders = _builders(args)
    medians: dict[str, float] = {}
    text = []
    main_batch = max(args.batches)
    torch.backends.cudnn.benchmark = True  # as the trainer sets it (train.cudnn_benchmark, on by default)
    for batch in args.batches:
        torch.manual_seed(0)
        images = torch.randint(0, 256, (batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                               device=device)
        targets = torch.randint(0, args.num_classes, (batch,), device=device)
        steps: dict[str, Callable] = {n: make_train_step(b(), device, args.precision, args.channels_last)
                                      for n, b in builders.items()}
        compile_names = [n for n in args.compile_models if n in builders] if batch == main_batch else []
        cudnn_names = [n for n in ("resnet50", "fcanet50") if n in builders] if batch == main_batch else []
        warm: dict[str, float] = {}
        notes: dict[str, str] = {}
        for n in cudnn_names:
            if cuda:
                torch.manual_seed(0)
                steps[n + CUDNN_OFF] = _without_cudnn_benchmark(
                    make_train_step(builders[n](), device, args.precision, args.channels_last))
            else:
                notes[n + CUDNN_OFF] = NEEDS_CUDA
        _add_compiled_steps(args, builders, compile_names, device, budget, images, targets, steps, notes, warm)
        for step in steps.values():  # warm-up: allocator, cuDNN autotuning, compiled graphs' second call
            for _ in range(args.warmup):
                step(images, targets)
        sync(device)
        peak: dict[str, int] = {}
        # each closure binds this batch's inputs (it runs before the next batch size replaces them)
        bound = {n: (lambda f=f, x=images, y=targets: f(x, y)) for n, f in steps.items()}
        times = interleaved_step_times(bound, device, args.rounds, args.steps, label=f"batch {batch} round", peaks=peak)
        ips = {n: [batch / t for t in times[n]] for n in steps}
        med = {n: statistics.median(v) for n, v in ips.items()}
        for n, v in med.items():
            medians[f"{n} @{batch}"] = v
        rows = []
        for n in list(builders) + [f"{c} compiled" for c in compile_names] + [c + CUDNN_OFF for c in cudnn_names]:
            if n not in med:
                rows.append([n, notes.get(n, "-"), "", "", "", "", "", ""])
                continue
            compiled = n.endswith(" compiled")
            base = "resnet50 compiled" if compiled and "resnet50 compiled" in med else "resnet50"
            twin = n[: -len(" compiled")] if compiled else n[: -len(CUDNN_OFF)] if n.endswith(CUDNN_OFF) else None
            rows.append([n, f"{med[n]:.0f}", f"{min(ips[n]):.0f}-{max(ips[n]):.0f}", f"{med[n] / med[base]:.3f} "
                         f"(vs {base})", f"{med[n] / med['senet50']:.3f}" if n == "fcanet50" else "",
                         f"{med[n] / med[twin]:.2f}x" if twin else "",
                         f"{warm[n]:.1f}" if n in warm else "", f"{peak[n] / 2**20:.0f}" if n in peak else ""])
        table = md_table(["model", "img/s (median)", "min-max", "vs ResNet-50", "FcaNet / SENet-50 (eager)",
                          "vs its twin (compiled / eager; cudnn off / on)", "compile warm-up s", "peak MiB"], rows)
        checks = []
        if "fcanet50" in med and "senet50" in med:
            ratio = med["fcanet50"] / med["senet50"]
            checks.append(f"FcaNet-50 / SENet-50 eager: **{ratio:.3f}** "
                          f"({target_verdict(args, ratio >= 1, 'the target >= 1')})")
        if "fcanet50 compiled" in med and "resnet50 compiled" in med:
            ratio = med["fcanet50 compiled"] / med["resnet50 compiled"]
            checks.append(f"FcaNet-50 / ResNet-50 compiled: **{ratio:.3f}** "
                          f"({target_verdict(args, ratio >= 0.90, 'the target >= 0.90')})")
        if "fcanet50" + CUDNN_OFF in med:
            checks.append(f"cuDNN autotuning (train.cudnn_benchmark) on / off, FcaNet-50: "
                          f"**{med['fcanet50'] / med['fcanet50' + CUDNN_OFF]:.3f}**")
        text.append(f"### Batch {batch}\n\n" + table + ("\n\n" + "; ".join(checks) + "." if checks else ""))
        print("\n" + text[-1])
        del steps
        if cuda:
            torch.cuda.empty_cache()
    widths = f"stage widths {args.widths} (not the standard models), " if args.widths else ""
    head = (f"{widths}{args.image_size}x{args.image_size}, {args.precision}, channels_last {args.channels_last}, "
            f"{args.num_classes} classes; {args.warmup} warm-up step(s) per variant, then {args.rounds} interleaved "
            f"rounds of {args.steps} steps, median (min-max over rounds); time = "
            f"{'wall clock' if device.type == 'cuda' else 'process CPU time'}. Compiled variants: "
            f"`torch.compile(model)` (inductor, default mode) at batch {main_batch}; warm-up = wall time of the "
            "first step (forward + backward compilation). Every variant runs with `torch.backends.cudnn.benchmark` "
            f"on (the trainer's default) except the '{CUDNN_OFF.strip()}' ones (CUDA only).\n\n")
    return "## 1. Training step\n\n" + head + "\n\n".join(text), medians


# ----------------------------------------------------------------------------------------- 2. stages
def bench_stages(args, device: torch.device) -> str:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    ns = argparse.Namespace(batch=args.stage_batch, freq="top16", channels_last=args.channels_last,
                            seconds=args.stage_seconds)
    rows = []
    for c, h, w in (QUICK_STAGES if args.quick else STAGES):
        rows += bench_stage(c, h, w, ns, device, dtype)
    table = md_table(["stage (C,H,W)", "what", "implementation", "fwd+bwd ms (median)", "speed vs Fig. 3",
                      "fwd peak MiB", "fwd peak vs Fig. 3", "fwd+bwd peak MiB", "fwd+bwd peak vs Fig. 3"], rows)
    print("\n" + table)
    return ("## 2. Pooling and attention module per ResNet-50 stage (eager)\n\n"
            f"Batch {args.stage_batch}, {args.precision}, channels_last {args.channels_last}, frequencies top16; "
            "forward + backward w.r.t. the input, cases of a stage interleaved (~50 ms slices), "
            f"~{args.stage_seconds:g} s each. 'speed vs Fig. 3' > 1: faster than the paper's formulation "
            "(pooling rows) or than FCA with it (module rows: SE, FCA ours).\n\n" + table)


# ---------------------------------------------------------------------------------------- 3. trainer
def bench_trainer(args, device: torch.device, step_ips: dict[str, float], budget: Budget) -> str:
    cuda = device.type == "cuda"
    epochs = 2  # the first (worker start-up, allocator, cuDNN autotuning) is not counted
    tmp = Path(tempfile.mkdtemp(prefix="fcanet_bench_gpu_"))
    rows = []

    steps_per_epoch = args.trainer_images // args.trainer_batch

    def input_path(run_dir: Path | None) -> list[str]:
        """The timed epoch's input-path host time per batch from the run's metrics.jsonl: the loop waiting for
        batches, and (gpu pipeline) the decode thread's time."""
        try:
            row = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()][-1]
        except (TypeError, OSError, ValueError, IndexError):
            return ["", ""]
        per = 1e3 / steps_per_epoch
        return [f"{row['input_wait_s'] * per:.1f}" if "input_wait_s" in row else "",
                f"{row['decode_s'] * per:.1f}" if "decode_s" in row else "-"]

    def record(label: str, model: str, fn: Callable[[], list[tuple[int, float]]], need_s: float,
               needs_cuda: bool = False, run_dir: Path | None = None) -> None:
        step = step_ips.get(f"{model} @{args.trainer_batch}")
        step_ms = f"{1e3 * args.trainer_batch / step:.1f}" if step else ""
        if needs_cuda and not cuda:
            rows.append([label, model, NEEDS_CUDA, "", "", step_ms, "", ""])
            return
        if not budget.ok(f"trainer: {label}, {model}", need_s):
            rows.append([label, model, "skipped (time budget)", "", "", step_ms, "", ""])
            return
        try:
            per_epoch = fn()
        except (Exception, SystemExit) as e:  # e.g. a pipeline this checkout does not have: report, go on
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            rows.append([label, model, f"failed: {msg}", "", "", step_ms, "", ""])
            print(f"  {label} {model}: failed: {msg}")
            return
        n, t = sum(e[0] for e in per_epoch[1:]), sum(e[1] for e in per_epoch[1:])
        ips = n / max(t, 1e-9)
        rows.append([label, model, f"{ips:.0f}", f"{ips / step:.2f}" if step else "",
                     ", ".join(f"{a / max(b, 1e-9):.0f}" for a, b in per_epoch), step_ms, *input_path(run_dir)])
        print(f"  {label} {model}: {ips:.0f} img/s")

    def ns(model: str, workers: int) -> argparse.Namespace:
        return argparse.Namespace(model=model, batch=args.trainer_batch, image_size=args.image_size,
                                  workers=workers, channels_last=args.channels_last, widths=args.widths)

    try:
        n_img = args.trainer_images
        synth = ["data.source=synthetic", f"data.synthetic_train_size={n_img}",
                 f"data.synthetic_val_size={args.trainer_batch}"]
        for model in args.trainer_models:
            record("synthetic data", model, lambda m=model: our_trainer_run(
                tmp, ns(m, args.workers), device, epochs, "fast", tmp / f"synth_{m}", synth), need_s=30,
                run_dir=tmp / f"synth_{model}")
        root = tmp / "jpeg"
        write_jpeg_imagefolder(root / "train", args.sizes_list, n_img // 2)
        write_jpeg_imagefolder(root / "val", args.sizes_list, max(1, args.trainer_batch // 2))
        for model in args.trainer_models:
            record("JPEGs, pipeline fast", model, lambda m=model: our_trainer_run(
                root, ns(m, args.workers), device, epochs, "fast", tmp / f"fast_{m}"), need_s=30,
                run_dir=tmp / f"fast_{model}")
            record(f"JPEGs, pipeline gpu ({args.gpu_workers} workers)", model, lambda m=model: our_trainer_run(
                root, ns(m, args.gpu_workers), device, epochs, "gpu", tmp / f"gpu_{m}"), need_s=30, needs_cuda=True,
                run_dir=tmp / f"gpu_{model}")
        ref_model = args.trainer_models[0]
        record("JPEGs, torchvision reference loop", ref_model,
               lambda: reference_recipe_run(root, ns(ref_model, args.workers), device, epochs), need_s=30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = md_table(["run", "model", "train img/s (2nd epoch)", "vs its training step", "img/s per epoch",
                      "step ms/batch (section 1)", "input wait ms/batch", "decode thread ms/batch"], rows)
    print("\n" + table)
    return ("## 3. Whole trainer\n\n"
            f"`engine.trainer.fit` with configs/base/imagenet.yaml, batch {args.trainer_batch}, {n_img} images, "
            f"{'bf16' if cuda else 'fp32'}, channels_last {args.channels_last}, {args.workers} DataLoader workers "
            f"(gpu pipeline: {args.gpu_workers}); 1 warm-up + 1 timed epoch, evaluation excluded. JPEGs: the two "
            f"scikit-learn sample photos at {args.sizes}, quality 90. 'vs its training step': the timed epoch's "
            "img/s over section 1's eager step img/s of the same model and batch (1.00 = the trainer adds nothing; "
            "well below on JPEGs = data-bound; on CPU the step is timed in process CPU time, the trainer in wall "
            "time, so this ratio is only meaningful on CUDA). Reference loop: ImageFolder + PIL + torchvision "
            "transforms + DataLoader(pin_memory) + the same model, optimizer and loss, `loss.item()` every "
            "step. Input path, host time per batch of the timed epoch (metrics.jsonl): 'input wait' = the training "
            "loop blocked waiting for its next batch (0 = the input path keeps up), 'decode thread' = the gpu "
            "pipeline's decode + crop + resize on its own thread and CUDA stream, beside the step time of "
            "section 1.\n\n" + table)


# ------------------------------------------------------------------------------------------------ run
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    if args.publish and device.type != "cuda":
        raise BenchError(f"--publish: results/benchmarks/gpu.md holds GPU figures and this run's device is {device}; "
                         "run on a CUDA GPU, or give --out")
    setup_threads(args.threads)
    args.precision = resolve_precision(args.precision, device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    try:
        args.batches = sorted({int(b) for b in _csv(args.batches)}) if isinstance(args.batches, str) else args.batches
    except ValueError:
        raise BenchError(f"--batches: {args.batches!r} is not a comma-separated list of integers") from None
    args.compile_models = _csv(args.compile_models) if isinstance(args.compile_models, str) else args.compile_models
    args.trainer_models = _csv(args.trainer_models) if isinstance(args.trainer_models, str) else args.trainer_models
    unknown = sorted(set(args.compile_models + args.trainer_models) - set(OURS))
    if unknown:
        raise BenchError(f"--compile-models/--trainer-models: unknown {', '.join(unknown)}; expected {', '.join(OURS)}")
    if not args.batches or min(args.batches) < 1 or min(args.steps, args.rounds, args.warmup + 1) < 1:
        raise BenchError("--batches, --steps, --rounds must be >= 1 and --warmup >= 0")
    if args.trainer_images < 2 * args.trainer_batch or args.trainer_batch < 1 or not args.trainer_models:
        raise BenchError("--trainer-images must be >= 2 x --trainer-batch >= 2 and --trainer-models non-empty")
    args.sizes_list = parse_sizes(args.sizes)
    if args.workers is None:
        from engine.data.loader import default_workers
        args.workers = default_workers()
    if min(args.workers, args.gpu_workers) < 0:
        raise BenchError("--workers and --gpu-workers must be >= 0")
    budget = Budget(args.budget_s)
    machine = machine_description(device)
    print("\n".join(machine))
    sections = []
    step_text, step_ips = bench_steps(args, device, budget)
    sections.append(step_text)
    if budget.ok("stage table", need_s=20):
        sections.append(bench_stages(args, device))
    sections.append(bench_trainer(args, device, step_ips, budget))
    total = budget.elapsed()
    tail = f"Total wall time {total:.0f} s (budget {args.budget_s:.0f} s)."
    if budget.skipped:
        tail += " Skipped for time: " + "; ".join(budget.skipped) + "."
    print("\n" + tail)
    write_report(args, "gpu.md", "GPU throughput: steps, compile, pooling, whole trainer", machine,
                 "\n\n".join(sections) + "\n\n" + tail)


def add_parser(sub) -> None:
    p = sub.add_parser("gpu", parents=[report_args(), device_args(), jpeg_args()], description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="all GPU figures side by side in one process (steps eager/compiled, stages, trainer)")
    p.set_defaults(run=run, quick_overrides=apply_quick, sizes="500x375,375x500,800x600")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on CUDA only")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batches", default="64,256", help="training-step batch sizes (compiled: the largest only)")
    p.add_argument("--compile-models", default="resnet50,fcanet50",
                   help="our models also timed under torch.compile (comma-separated; empty: none)")
    p.add_argument("--compile-on-cpu", action="store_true",
                   help="time the compiled variants on CPU too (inductor's C++ compilation of a ResNet-50 takes "
                        "minutes)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stage-batch", type=int, default=32)
    p.add_argument("--stage-seconds", type=float, default=0.5, help="measuring time per case and stage")
    p.add_argument("--trainer-models", default="resnet50,fcanet50")
    p.add_argument("--trainer-batch", type=int, default=256)
    p.add_argument("--trainer-images", type=int, default=5120, help="images per trainer epoch")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the fast pipeline and the reference (default: CPUs - 1)")
    p.add_argument("--gpu-workers", type=int, default=4, help="DataLoader workers of data.pipeline=gpu")
    p.add_argument("--widths", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="stage widths of our models (default: the standard ResNet; set: no external models)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="parts that would start after this many seconds are skipped (default leaves margin "
                        "within 8 minutes)")


def apply_quick(args: argparse.Namespace) -> None:
    args.image_size, args.num_classes, args.batches = 32, 10, "2"
    args.warmup, args.steps, args.rounds = 1, 1, 1
    args.stage_batch, args.stage_seconds = 2, 0.01
    args.trainer_batch, args.trainer_images, args.sizes = 2, 8, "120x90,90x120"
    args.trainer_models = "resnet50"
    args.widths = args.widths or [8, 8, 16, 16]
    args.workers = 0 if args.workers is None else args.workers
    args.gpu_workers = 0
