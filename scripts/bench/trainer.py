"""``trainer``: our whole trainer (``engine.trainer.fit``, data.pipeline=fast) vs a reference loop (ImageFolder +
PIL + standard transforms + the same model, batch and optimizer) on the same generated JPEG ImageFolder, equal
epochs; img/s ratio."""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from collections.abc import Sequence

import torch

from .common import (ROOT, BenchError, device_args, jpeg_args, machine_description, md_table, parse_sizes,
                     pick_device, report_args, setup_threads, sync, write_jpeg_imagefolder, write_report)


# --------------------------------------------------------------------------------------------- trainer
def model_kwargs(args) -> dict:
    """Model options shared by both sides (``--widths``: a small network, so the input pipeline, not the
    model, bounds the step on CPU, as on a GPU node; ``input_size`` for the models that take it)."""
    from models import model_options
    size = {"input_size": args.image_size} if "input_size" in model_options(args.model) else {}
    return {**size, **({"widths": list(args.widths)} if args.widths else {})}


def reference_recipe_run(root: Path, args, device: torch.device, epochs: int) -> list[tuple[int, float]]:
    """The torchvision reference recipe's loop: ImageFolder + PIL + standard transforms, DataLoader with the
    same workers, the same model/batch/optimizer/loss; ``loss.item()`` logged every step as torchvision's
    ``references/classification/train.py`` does. Returns (images, seconds) per epoch."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from engine.data.transforms import CROP_RECIPES, IMAGENET_MEAN, IMAGENET_STD
    from models import create_model
    tf = T.Compose([T.RandomResizedCrop(args.image_size, **CROP_RECIPES["fcanet"]), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = ImageFolder(str(root / "train"), transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                     pin_memory=device.type == "cuda", drop_last=True)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000, **model_kwargs(args)).to(device)
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


def our_trainer_run(root: Path, args, device: torch.device, epochs: int, pipeline: str, out_dir: Path,
                     extra: Sequence[str] = ()) -> list[tuple[int, float]]:
    """Our trainer (``engine.trainer.fit``, the ImageNet base config) on the same data; per-epoch (images,
    seconds) from its ``metrics.jsonl`` (training time only, evaluation excluded). ``extra``: more config
    overrides (e.g. ``data.source=synthetic``)."""
    import json

    from engine.config import load_config
    from engine.trainer import fit
    kwargs = json.dumps(model_kwargs(args))
    overrides = [f"model.name={args.model}", "model.num_classes=1000", f"model.kwargs={kwargs}",
                 f"train.epochs={epochs}",
                 "train.warmup_epochs=0", f"train.batch_size={args.batch}",
                 f"train.amp={'bf16' if device.type == 'cuda' else repr('off')}",
                 f"train.channels_last={str(args.channels_last).lower()}", "train.checkpoint_every_steps=0",
                 "train.progress=false", "train.tensorboard=false", f"train.eval_every_epochs={epochs}",
                 f"data.root={root}", f"data.workers={args.workers}", f"data.pipeline={pipeline}",
                 f"data.image_size={args.image_size}",
                 f"data.val_resize={max(args.image_size, args.image_size * 8 // 7)}",
                 f"output_dir={out_dir}", *extra]
    cfg = load_config(ROOT / "configs" / "base" / "imagenet.yaml", overrides)
    fit(cfg)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # img_per_s leaves out the session's warm-up step (warmup_s), which epoch_time_s includes
    timed = [(r["img_per_s"], r["epoch_time_s"] - r.get("warmup_s", 0.0)) for r in rows]
    return [(round(ips * t), t) for ips, t in timed]


def run(args) -> None:
    device = pick_device(args.device)
    if min(args.images, args.batch, args.epochs, args.rounds) < 1 or args.images < 2 * args.batch:
        raise BenchError("--images must be >= 2 x --batch and --batch, --epochs, --rounds >= 1")
    if args.workers is None:
        from engine.data.loader import default_workers
        args.workers = default_workers()
    if args.workers < 0:
        raise BenchError(f"--workers must be >= 0, got {args.workers}")
    setup_threads(args.threads)
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
                    per_epoch = reference_recipe_run(root, args, device, epochs)
                else:
                    pipeline = "fast" if "fast" in v else "torchvision"
                    per_epoch = our_trainer_run(root, args, device, epochs, pipeline, tmp / f"run_{r}_{pipeline}")
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
        ratio = statistics.median(a / b for a, b in zip(res[v], res[ref], strict=True))
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
    write_report(args, "trainer.md", "Whole trainer vs the torchvision reference recipe", machine, body)


def parse_widths(text: str) -> list[int]:
    try:
        widths = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 4 comma-separated integers") from None
    if len(widths) != 4 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need 4 positive stage widths")
    return widths


def add_parser(sub) -> None:
    r = sub.add_parser("trainer", parents=[report_args(), device_args(), jpeg_args()],
                       help="whole trainer vs a torchvision reference loop, same data and model", description=__doc__)
    r.set_defaults(run=run, quick_overrides=apply_quick)
    r.add_argument("--model", default="resnet50")
    r.add_argument("--images", type=int, default=256, help="training images in the generated ImageFolder")
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--image-size", type=int, default=224)
    r.add_argument("--epochs", type=int, default=2, help="timed epochs for each side (after one warm-up epoch)")
    r.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers, both sides (default: engine.data.loader.default_workers())")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="both sides (default: on CUDA only)")
    r.add_argument("--widths", type=parse_widths, default=None,
                   help="stage widths of the model on both sides, e.g. 16,32,64,128 (default: the standard ResNet)")
    r.add_argument("--ours-torchvision", action="store_true",
                   help="also run our trainer with data.pipeline=torchvision (separates trainer and pipeline)")
    r.add_argument("--rounds", type=int, default=1)


def apply_quick(args: argparse.Namespace) -> None:
    args.images, args.batch, args.image_size, args.epochs, args.sizes = 8, 4, 32, 1, "120x90"
    args.workers = 0 if args.workers is None else args.workers
    args.model = "resnet18" if args.model == "resnet50" else args.model
