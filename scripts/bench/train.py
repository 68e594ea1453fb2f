"""``train``: img/s of full training steps (data already on the device) of ResNet-50, SENet-50, ECANet-50 and
FcaNet-50; ratios to the first model and FcaNet-50 / SENet-50."""
from __future__ import annotations

import argparse
import statistics

import torch

from .common import (BenchError, device_args, interleaved_step_times, machine_description, make_train_step,
                     md_table, pick_device, report_args, resolve_precision, setup_threads, spread, step_args, sync,
                     target_verdict, write_report)


def run(args) -> None:
    from models import create_model
    device = pick_device(args.device)
    args.precision = resolve_precision(args.precision, device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if args.batch < 1 or args.image_size < 32 or args.steps < 1 or args.rounds < 1:
        raise BenchError("--batch, --steps, --rounds must be >= 1 and --image-size >= 32")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    setup_threads(args.threads)
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
    peak: dict[str, int] = {}
    for name in names:  # warm-up (allocator, cudnn autotune, compile)
        for _ in range(args.warmup):
            steps[name](images, targets)
        sync(device)
    times = interleaved_step_times({n: (lambda n=n: steps[n](images, targets)) for n in names}, device,
                                   args.rounds, args.steps, peaks=peak)
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
        verdict = target_verdict(args, ratio >= 0.97, "the 3% target")
        per_round = zip(ips["fcanet50"], ips["senet50"], strict=True)
        body += (f"\n\nFcaNet-50 / SENet-50 training throughput: **{ratio:.3f}** ({verdict}; "
                 f"per-round ratios: " + ", ".join(f"{a / b:.3f}" for a, b in per_round) + ").")
    print("\n" + body)
    write_report(args, "train.md", "Training-step throughput", machine, body)


def add_parser(sub) -> None:
    t = sub.add_parser("train", parents=[report_args(), device_args(), step_args()],
                       help="training-step img/s of ResNet/SENet/ECANet/FcaNet-50", description=__doc__)
    t.set_defaults(run=run, quick_overrides=apply_quick)
    t.add_argument("--models", default="resnet50,senet50,ecanet50,fcanet50")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--compile", action="store_true", help="torch.compile the models")


def apply_quick(args: argparse.Namespace) -> None:
    args.batch, args.image_size, args.steps, args.rounds, args.warmup = 2, 32, 1, 1, 1
    args.num_classes = 10
