"""Training and evaluation loops (one code path for CPU/GPU, 1 process or DDP).

``fit(cfg)`` runs a whole training run in ``cfg.output_dir``; ``evaluate`` returns exact top-1/top-5
over every validation image once; ``train_one_epoch`` runs (the rest of) one epoch.

Hot loop rules: metrics are accumulated in device tensors and only reduced/read every
``train.log_every_steps`` steps (and at checkpoints / epoch ends), so there is no host-device sync per
step. The non-finite-loss check and, under DDP, the preemption flag ride on those sync points.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from engine import checkpoint as ckpt_lib
from engine import distributed as dist_lib
from engine.config import Config, ConfigError, diff_configs, save_config
from engine.data import (DataError, ExactEvalBatchSampler, TrainBatchSampler, build_datasets, make_loader,
                         write_digits_imagefolder)
from engine.schedule import build_scheduler, reshape_schedule, scaled_lr
from engine.transforms import to_model_input

BIG = 2 ** 62  # "no bad step yet" sentinel for the on-device first-non-finite-step tracker


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf."""


class SimulatedKill(BaseException):
    """Raised by ``debug.kill_after_steps``: leave immediately, saving nothing (like SIGKILL).

    A BaseException so that no ``except Exception`` on the way out can swallow it."""


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------
# Building blocks

def build_model(cfg: Config) -> nn.Module:
    """``models.create_model`` with the config's model section (``input_size`` defaults to the image size)."""
    import models

    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("input_size", cfg.data.image_size)
    if cfg.model.freq is not None:
        kwargs["freq"] = cfg.model.freq
    try:
        return models.create_model(cfg.model.name, num_classes=cfg.model.num_classes, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        msg = str(e).strip("'\"").splitlines()[0]
        raise ConfigError(f"config key 'model': cannot build {cfg.model.name!r}: {msg}") from None


def init_from_checkpoint(model: nn.Module, path: str, log: Callable = print) -> Any:
    """Fine-tune initialisation: copy matching weights from ``path`` (ours, torchvision's, the authors', or a
    plain ResNet for an attention model; attention stays fresh). The classifier is skipped when its
    shape differs (a different number of classes)."""
    import models

    try:
        state = models.read_state_dict(path)
        target = model.state_dict()
        ignore = ()
        if "fc.weight" in state and "fc.weight" in target and state["fc.weight"].shape != target["fc.weight"].shape:
            ignore = ("fc.",)
            log(f"init: classifier shape differs ({tuple(state['fc.weight'].shape)} vs "
                f"{tuple(target['fc.weight'].shape)}): fc is re-initialised")
        report = models.load_weights(model, state, ignore=ignore)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"config key 'model.init_checkpoint': {path}: {str(e).splitlines()[0]}") from None
    log(f"init: {path}: {report.summary()}")
    return report


@dataclass
class Meter:
    """Running sums kept on the device; ``reduce`` is the only place that syncs (and all-reduces)."""
    device: torch.device
    sums: torch.Tensor = None  # loss_sum, correct1, correct5, count, skipped
    first_bad: torch.Tensor = None

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        self.first_bad = torch.full((), BIG, dtype=torch.int64, device=self.device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, skipped: int = 0,
            step: int | None = None) -> None:
        # Only device-side ops with Python scalars here: creating a tensor from host data would sync.
        n = target.numel()
        k = min(5, logits.shape[1])
        top = logits.detach().topk(k, dim=1).indices
        hit = top.eq(target.view(-1, 1))
        self.sums[0] += loss.detach().double() * n
        self.sums[1] += hit[:, 0].sum()
        self.sums[2] += hit.any(1).sum()
        self.sums[3] += n
        if skipped:
            self.sums[4] += skipped
        if step is not None:
            bad = ~torch.isfinite(loss.detach())
            self.first_bad = torch.where(bad & (self.first_bad == BIG), self.first_bad.new_full((), step),
                                         self.first_bad)

    def state(self) -> dict:
        return {"sums": self.sums.cpu(), "first_bad": self.first_bad.cpu()}

    def load(self, state: dict) -> None:
        self.sums = state["sums"].to(self.device)
        self.first_bad = state["first_bad"].to(self.device)

    def reduce(self, extra_flag: bool = False) -> dict:
        """All-reduce and read the sums (a sync point). ``extra_flag`` is OR-ed over ranks (preemption)."""
        sums = torch.cat([self.sums, torch.tensor([float(extra_flag)], dtype=torch.float64, device=self.device)])
        dist_lib.all_reduce_sum(sums)
        bad = -self.first_bad.clone()  # MIN over ranks as a SUM-free MAX of the negation
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        loss_sum, c1, c5, count, skipped, flag = sums.tolist()
        first_bad = -int(bad.item())
        count_i = int(round(count))
        return {"loss": loss_sum / max(count, 1.0), "top1": 100.0 * c1 / max(count, 1.0),
                "top5": 100.0 * c5 / max(count, 1.0), "count": count_i, "correct1": int(round(c1)),
                "correct5": int(round(c5)), "skipped": int(round(skipped)), "flag": flag > 0,
                "first_bad_step": None if first_bad >= BIG else first_bad}


class Preemption:
    """SIGTERM/SIGUSR1 (Slurm preemption, ``scancel``): remember it; the loop checkpoints and exits 0."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}

    def _handler(self, signum, frame):
        self.requested, self.signum = True, signum

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread (e.g. embedded use): no preemption handling
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "off", channels_last: bool = False,
             desc: str | None = None) -> dict:
    """Exact top-1/top-5/loss over the loader's samples, summed over all ranks.

    With :class:`ExactEvalBatchSampler` every image is counted exactly once for any world size. The
    loss is plain cross-entropy (no label smoothing), averaged over images.
    """
    was_training = model.training
    model.eval()
    meter = Meter(device)
    crit = nn.CrossEntropyLoss(reduction="mean")
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=desc is None)
    for images, targets, skipped in bar:
        if images is None:
            meter.sums[4] += skipped
            continue
        x = to_model_input(images, device, channels_last)
        y = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "off"):
            logits = model(x)
        loss = crit(logits.float(), y)
        meter.add(loss, logits.float(), y, skipped)
    model.train(was_training)
    out = meter.reduce()
    if out["count"] == 0:
        raise DataError(f"no validation image could be evaluated ({out['skipped']} unreadable and skipped)")
    return {k: out[k] for k in ("top1", "top5", "loss", "count", "correct1", "correct5", "skipped")}


# ----------------------------------------------------------------------------------------------------
# Training

@dataclass
class State:
    epoch: int = 0            # current epoch (0-based); == epochs when training is done
    step_in_epoch: int = 0    # optimizer steps done in the current epoch
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    last_val: dict = field(default_factory=dict)
    elapsed_s: float = 0.0    # training wall time over all sessions (resumes add up)
    train_images: int = 0     # images trained on (all ranks), for throughput
    train_time_s: float = 0.0  # time spent in training steps (all sessions)
    epoch_time_s: float = 0.0  # time spent in the current epoch so far
    epoch_images: int = 0


class Trainer:
    def __init__(self, cfg: Config, info: dist_lib.DistInfo, resume: str | None = None):
        self.cfg, self.info = cfg, info
        self.device = info.device
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.state = State()
        self.session_start = time.time()
        self._check_device()
        if self.device.type == "cpu" and cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        self.log(f"run directory: {self.out.resolve()}")

        # Data set preparation (rank 0 writes, the others wait).
        if cfg.data.prepare == "digits":
            if info.is_main:
                write_digits_imagefolder(cfg.data.root, seed=0)
            dist_lib.barrier()
        train_set, val_set = build_datasets(cfg, cfg.model.num_classes)
        self.train_sampler = TrainBatchSampler(len(train_set), cfg.train.batch_size, info.world_size, info.rank,
                                               seed=cfg.seed, max_steps=cfg.train.max_steps_per_epoch)
        val_bs = cfg.data.val_batch_size or cfg.train.batch_size
        self.train_loader = make_loader(train_set, self.train_sampler, cfg.data.workers, self.device)
        self.val_loader = make_loader(val_set, ExactEvalBatchSampler(len(val_set), val_bs, info.world_size, info.rank),
                                      cfg.data.workers, self.device)
        self.steps_per_epoch = self.train_sampler.steps
        self.log(f"data: {cfg.data.source} train {len(train_set)} images, val {len(val_set)} images; "
                 f"{self.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs")

        # Model, optimizer, schedule. Same seed on every rank (DDP also broadcasts rank 0's weights).
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        import random
        random.seed(cfg.seed)
        self.model = build_model(cfg)
        if cfg.model.init_checkpoint and resume is None and not self._has_checkpoint():
            init_from_checkpoint(self.model, cfg.model.init_checkpoint, self.log)
        if cfg.train.sync_bn and info.distributed:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        global_batch = cfg.train.batch_size * info.world_size
        self.peak_lr = scaled_lr(cfg.optim.base_lr, global_batch)
        self.log(f"lr = base_lr {cfg.optim.base_lr:g} x global batch {global_batch} / 256 = {self.peak_lr:g} "
                 f"(warmup {cfg.train.warmup_epochs:g} epochs, then cosine to 0)")
        # fused on CUDA: one kernel, and with the fp16 GradScaler no per-step host sync on found_inf.
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.peak_lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov,
                                         fused=self.device.type == "cuda" or None)
        self.scheduler = build_scheduler(self.optimizer, self.steps_per_epoch, cfg.train.epochs, cfg.train.warmup_epochs)
        # fp16 needs loss scaling; bf16/off run the same code with the scaler disabled (a no-op).
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

        self.train_model: nn.Module = self.model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The fixed DCT filters are identical on every rank: don't broadcast them at every forward.
            fixed = [n for n, _ in self.model.named_buffers() if n.endswith("dct_layer.weight")]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, fixed)
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.eval_model: nn.Module = self.model
        if cfg.train.compile:
            self.train_model = torch.compile(self.train_model)
            self.eval_model = torch.compile(self.model)

        self.train_meter = Meter(self.device)
        self.stop_agreed = False
        self._load_resume(resume)
        self.writer = None
        if info.is_main and cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a crashed session logged after the checkpoint we resume from.
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.state.global_step or None)

    # -- helpers -------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.info.is_main:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def _check_device(self) -> None:
        t = self.cfg.train
        if t.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("config key 'train.amp': fp16 (with GradScaler) needs a CUDA device; use bf16 or off on CPU")
        if t.sync_bn and self.info.distributed and self.device.type != "cuda":
            raise ConfigError("config key 'train.sync_bn': SyncBatchNorm needs CUDA devices; set train.sync_bn=false on CPU")

    def _has_checkpoint(self) -> bool:
        return any((self.ckpt_dir / n).exists() for n in ("last.pth", "last.prev.pth"))

    def _load_resume(self, resume: str | None) -> None:
        if resume is not None:
            ckpt, path = ckpt_lib.load_checkpoint(resume), Path(resume)
        else:
            found = ckpt_lib.find_resumable(self.ckpt_dir, log=self.log, quarantine=self.info.is_main)
            if found is None:
                return
            ckpt, path = found
        if ckpt["steps_per_epoch"] != self.steps_per_epoch:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {path} was written with {ckpt['steps_per_epoch']} steps/epoch (world size "
                f"{ckpt['world_size']}); this launch has {self.steps_per_epoch}: resume with the same world size, "
                "train.batch_size and data")
        changed = diff_configs(ckpt["config"], self.cfg.to_dict())
        if changed:
            self.log(f"warning: resuming with changed config keys: {', '.join(changed)}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        reshape_schedule(self.scheduler, self.peak_lr, self.steps_per_epoch, self.cfg.train.epochs,
                         self.cfg.train.warmup_epochs)
        if self.scaler.is_enabled() and ckpt["scaler"]:  # a bf16/off checkpoint has no scaler state
            self.scaler.load_state_dict(ckpt["scaler"])
        s = ckpt["state"]
        self.state = State(**s)
        if "meter" in ckpt:
            self.train_meter.load(ckpt["meter"])
        rng = ckpt["rng"]
        if len(rng) == self.info.world_size:
            ckpt_lib.set_rng_state(rng[self.info.rank])
        else:
            self.log(f"warning: checkpoint has RNG states of {len(rng)} ranks, this run has {self.info.world_size}")
        self.log(f"resumed from {path}: epoch {self.state.epoch + 1}, step {self.state.step_in_epoch}/"
                 f"{self.steps_per_epoch} (global step {self.state.global_step})")

    def _checkpoint(self) -> dict:
        s = self.state
        return {
            "format": ckpt_lib.FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step,
            "steps_per_epoch": self.steps_per_epoch, "world_size": self.info.world_size,
            "config": self.cfg.to_dict(), "state": s.__dict__.copy(), "meter": self.train_meter.state(),
            "rng": dist_lib.all_gather_object(ckpt_lib.get_rng_state()),
        }

    def save(self) -> None:
        """Write ``last.pth`` (collective: every rank contributes its RNG state; rank 0 writes)."""
        self.state.elapsed_s += time.time() - self.session_start
        self.session_start = time.time()
        obj = self._checkpoint()
        if self.info.is_main:
            ckpt_lib.save_last(obj, self.ckpt_dir)
        dist_lib.barrier()

    def _save_best(self) -> None:
        if self.info.is_main:
            ckpt_lib.atomic_save({"format": "fcanet-model-v1", "model": self.model.state_dict(),
                                  "config": self.cfg.to_dict(), "epoch": self.state.epoch,
                                  "val": self.state.last_val}, self.ckpt_dir / "best.pth")

    def _nonfinite(self, step: int) -> NonFiniteLossError:
        last = self.ckpt_dir / "last.pth"
        kept = f"; the last good checkpoint {last} is left intact" if last.exists() else ""
        return NonFiniteLossError(f"non-finite training loss at global step {step} (epoch {self.state.epoch + 1})"
                                  f"{kept}; lower optim.base_lr or check the data")

    # -- loops ---------------------------------------------------------------------------------------
    def train_one_epoch(self, preempt: Preemption) -> dict | None:
        """Run the rest of the current epoch. Returns its (all-reduced) train metrics, or None when
        preempted (after checkpointing)."""
        cfg, st, dev = self.cfg, self.state, self.device
        self.train_sampler.set_epoch(st.epoch, st.step_in_epoch)
        self.train_model.train()
        amp_on = cfg.train.amp != "off"
        amp_dtype = AMP_DTYPES.get(cfg.train.amp, torch.bfloat16)
        every_ckpt = cfg.train.checkpoint_every_steps
        bar = tqdm(total=self.steps_per_epoch, initial=st.step_in_epoch, desc=f"epoch {st.epoch + 1}/{cfg.train.epochs}",
                   dynamic_ncols=True, leave=False, disable=not (self.info.is_main and cfg.train.progress))
        t0, images_done = time.time(), 0
        stats = None
        for images, targets, skipped in self.train_loader:
            if images is None:
                raise DataError(f"every image of a training batch (global step {st.global_step + 1}) is unreadable")
            x = to_model_input(images, dev, cfg.train.channels_last)
            y = targets.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_on):
                logits = self.train_model(x)
                loss = self.criterion(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            st.global_step += 1
            st.step_in_epoch += 1
            images_done += y.numel() * self.info.world_size
            self.train_meter.add(loss, logits.float(), y, skipped, step=st.global_step)
            bar.update(1)

            dbg = cfg.debug
            if dbg.kill_after_steps is not None and st.global_step >= dbg.kill_after_steps:
                raise SimulatedKill(f"debug.kill_after_steps: killed after global step {st.global_step}")
            if dbg.signal_after_steps is not None and st.global_step == dbg.signal_after_steps:
                os.kill(os.getpid(), signal.SIGTERM)

            end = st.step_in_epoch >= self.steps_per_epoch
            want_ckpt = every_ckpt > 0 and st.step_in_epoch % every_ckpt == 0 and not end
            # Single process: the preemption flag is a Python bool, free to check every step. Under DDP
            # the ranks must agree, which needs a collective, so it is checked at the sync points.
            local_stop = preempt.requested and not self.info.distributed
            sync = end or want_ckpt or local_stop or st.step_in_epoch % cfg.train.log_every_steps == 0
            if not sync:
                continue
            stats = self.train_meter.reduce(extra_flag=preempt.requested)
            self.stop_agreed = stats["flag"]
            if stats["first_bad_step"] is not None:
                raise self._nonfinite(stats["first_bad_step"])
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{stats['loss']:.4f}", top1=f"{stats['top1']:.2f}", lr=f"{lr:.4g}")
            if self.writer is not None:
                self.writer.add_scalar("train/loss", stats["loss"], st.global_step)
                self.writer.add_scalar("train/lr", lr, st.global_step)
            if stats["flag"] and not end:
                self._account(t0, images_done)
                self.save()
                bar.close()
                name = signal.Signals(preempt.signum).name if preempt.signum else "signal"
                self.log(f"{name} received: checkpointed at epoch {st.epoch + 1} step {st.step_in_epoch}/"
                         f"{self.steps_per_epoch} (global step {st.global_step}); exiting for requeue")
                return None
            if want_ckpt:
                self._account(t0, images_done)
                t0, images_done = time.time(), 0
                self.save()
        bar.close()
        self._account(t0, images_done)
        return stats

    def _account(self, t0: float, images: int) -> None:
        dt = time.time() - t0
        self.state.epoch_time_s += dt
        self.state.train_time_s += dt
        self.state.epoch_images += images
        self.state.train_images += images

    def _append_metrics(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _trim_metrics(self) -> None:
        """On resume, drop epoch rows a crashed session wrote after the checkpoint it left."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        rows = [r for r in path.read_text().splitlines() if r.strip()]
        keep = [r for r in rows if json.loads(r).get("epoch", 0) <= self.state.epoch]
        if len(keep) != len(rows):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(r + "\n" for r in keep))
            tmp.replace(path)

    def fit(self, preempt: Preemption) -> dict:
        cfg, st = self.cfg, self.state
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            self._trim_metrics()
        self.log("start training")
        while st.epoch < cfg.train.epochs:
            # Under DDP only the all-reduced flag is used, so that every rank stops at the same point.
            if preempt.requested if not self.info.distributed else self.stop_agreed:
                self.save()
                self.log(f"signal received: checkpointed at the start of epoch {st.epoch + 1} "
                         f"(global step {st.global_step}); exiting for requeue")
                return {"status": "preempted"}
            train_stats = self.train_one_epoch(preempt)
            if train_stats is None:
                return {"status": "preempted"}
            last_epoch = st.epoch + 1 == cfg.train.epochs
            row = {"epoch": st.epoch + 1, "global_step": st.global_step, "train_loss": train_stats["loss"],
                   "train_top1": train_stats["top1"], "lr": self.optimizer.param_groups[0]["lr"],
                   "img_per_s": st.epoch_images / max(st.epoch_time_s, 1e-9), "epoch_time_s": st.epoch_time_s,
                   "train_skipped": train_stats["skipped"]}
            if (st.epoch + 1) % cfg.train.eval_every_epochs == 0 or last_epoch:
                dist_lib.broadcast_buffers(self.model)  # every rank evaluates rank 0's BN statistics
                val = evaluate(self.eval_model, self.val_loader, self.device, cfg.train.amp, cfg.train.channels_last,
                               desc="eval" if (self.info.is_main and cfg.train.progress) else None)
                st.last_val = {**val, "epoch": st.epoch + 1}
                row.update({"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                            "val_count": val["count"], "val_skipped": val["skipped"]})
                improved = val["top1"] > st.best_top1
                if improved:
                    st.best_top1, st.best_epoch = val["top1"], st.epoch + 1
            else:
                improved = False
            self.log(f"epoch {st.epoch + 1}/{cfg.train.epochs}: train loss {row['train_loss']:.4f} top1 "
                     f"{row['train_top1']:.2f} | " + (f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f} "
                                                      f"top5 {row['val_top5']:.2f} ({row['val_count']} images) | "
                                                      if "val_top1" in row else "")
                     + f"lr {row['lr']:.4g} | {row['img_per_s']:.1f} img/s | {row['epoch_time_s']:.1f} s")
            if self.info.is_main:
                self._append_metrics(row)
                if self.writer is not None:
                    for k, v in row.items():
                        if k not in ("epoch", "global_step"):
                            self.writer.add_scalar(f"epoch/{k}", v, st.epoch + 1)
                    self.writer.flush()
            # Epoch done: move the state to the next epoch's start, then checkpoint.
            st.epoch += 1
            st.step_in_epoch, st.epoch_time_s, st.epoch_images = 0, 0.0, 0
            self.train_meter.reset()
            if improved:
                self._save_best()
            self.save()
        summary = self.summary()
        if self.info.is_main:
            ckpt_lib.atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            self.log(f"done: best top1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), final top1 "
                     f"{summary['final_top1']:.2f} top5 {summary['final_top5']:.2f}; summary in {self.out / 'summary.json'}")
        return summary

    def summary(self) -> dict:
        st = self.state
        wall = st.elapsed_s + (time.time() - self.session_start)
        gpus = self.info.world_size if self.device.type == "cuda" else 0
        v = st.last_val
        return {
            "status": "complete", "model": self.cfg.model.name, "epochs": st.epoch,
            "best_top1": st.best_top1, "best_epoch": st.best_epoch,
            "final_top1": v.get("top1"), "final_top5": v.get("top5"), "final_loss": v.get("loss"),
            "val_count": v.get("count"), "global_steps": st.global_step,
            "train_img_per_s": st.train_images / max(st.train_time_s, 1e-9),
            "wall_time_s": wall, "gpu_hours": wall * gpus / 3600.0, "world_size": self.info.world_size,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "global_batch": self.cfg.train.batch_size * self.info.world_size, "peak_lr": self.peak_lr,
            "git_commit": git_commit(), "output_dir": str(self.out),
        }

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def fit(cfg: Config, resume: str | None = None) -> dict:
    """Train ``cfg`` in ``cfg.output_dir`` (auto-resuming from its checkpoints); returns the summary
    (``{"status": "preempted"}`` if a SIGTERM/SIGUSR1 stopped it after checkpointing)."""
    info = dist_lib.init_distributed()
    trainer = None
    try:
        with Preemption() as preempt:
            trainer = Trainer(cfg, info, resume=resume)
            return trainer.fit(preempt)
    finally:
        if trainer is not None:
            trainer.close()
        dist_lib.cleanup()


def evaluate_checkpoint(cfg: Config, checkpoint: str, allow_new: bool = False) -> dict:
    """Exact (distributed) evaluation of ``checkpoint`` (ours, the authors' ``.pth``, torchvision's) on
    ``cfg.data``'s val set."""
    import models

    info = dist_lib.init_distributed()
    try:
        if cfg.train.amp == "fp16" and info.device.type != "cuda":
            raise ConfigError("config key 'train.amp': fp16 needs a CUDA device; use bf16 or off on CPU")
        model = build_model(cfg)
        try:
            report = models.load_weights(model, checkpoint)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"--checkpoint {checkpoint}: {str(e).splitlines()[0]}") from None
        if report.new and not allow_new:
            raise ConfigError(f"--checkpoint {checkpoint}: lacks {len(report.new)} attention weight(s) of "
                              f"{cfg.model.name} (e.g. {report.new[0]}): evaluating fresh attention is meaningless; "
                              "check model.name")
        model.to(info.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        _, val_set = build_datasets(cfg, cfg.model.num_classes, need_train=False)
        bs = cfg.data.val_batch_size or cfg.train.batch_size
        loader = make_loader(val_set, ExactEvalBatchSampler(len(val_set), bs, info.world_size, info.rank),
                             cfg.data.workers, info.device)
        t0 = time.time()
        out = evaluate(model, loader, info.device, cfg.train.amp, cfg.train.channels_last,
                       desc="eval" if (info.is_main and cfg.train.progress) else None)
        out.update({"checkpoint": str(checkpoint), "model": cfg.model.name, "world_size": info.world_size,
                    "time_s": time.time() - t0, "is_main": info.is_main})
        return out
    finally:
        dist_lib.cleanup()
