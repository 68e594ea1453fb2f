"""Training and evaluation loops of the COCO detectors, on the engine's run-directory machinery.

``fit(cfg)`` trains ``cfg`` in ``cfg.output_dir``: it takes the run directory's lock (:mod:`engine.runlock`),
resumes from the newest usable checkpoint (:mod:`engine.checkpoint`: atomic ``last.pth`` / ``last.prev.pth``,
every rank's RNG state, refusing one whose weights mean something else), trains with SGD and MMDetection's step
schedule under bf16/fp16 autocast, checkpoints at epoch ends (and every ``train.checkpoint_every_steps``),
evaluates exactly (:mod:`engine.detection.evaluation`), and writes ``metrics.jsonl``, TensorBoard events and
``summary.json``. A SIGTERM/SIGUSR1 checkpoints and exits 0 (:mod:`engine.preemption`). Losses are summed on the
device and read only at sync points (every ``train.log_every_steps``), where non-finite losses stop the run.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint as ckpt_lib
from engine import distributed as dist_lib
from engine import fileio
from engine.config import ConfigError, diff_configs, dump_config
from engine.data.datasets import ExactEvalBatchSampler
from engine.data.errors import DataError
from engine.detection.config import STRUCTURAL_KEYS, DetConfig, detector_options
from engine.detection.data import CocoDetectionSet, GroupedTrainBatchSampler, make_loader
from engine.detection.evaluation import AMP_DTYPES, gather_and_evaluate, predict
from engine.preemption import Preemption
from engine.progress import Progress, log_line
# The ImageNet trainer's run-directory ownership (lock + removal of partial files), errors and provenance.
from engine.errors import NonFiniteLossError, SimulatedKill
from engine.rundir import RunDir, write_config
from engine.summary import git_commit

LOSS_KEYS = {"faster_rcnn": ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"),
             "mask_rcnn": ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")}
SUMMARY_FORMAT = "fcanet-detection-summary-v1"


def step_lr(step: int, peak: float, warmup_iters: int, warmup_ratio: float, milestones: list[int],
            gamma: float) -> float:
    """MMDetection's ``step`` policy with linear warmup, for optimizer step ``step`` (0-based):
    ``peak * gamma^(milestones passed)``, times ``ratio + (1 - ratio) * step / warmup_iters`` during warmup."""
    factor = gamma ** sum(step >= m for m in milestones)
    if step < warmup_iters:
        factor *= warmup_ratio + (1.0 - warmup_ratio) * step / warmup_iters
    return peak * factor


@dataclass
class DetState:
    """A run's progress (restored from checkpoints, besides weights, optimizer and RNG)."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_bbox_AP: float = -1.0
    best_epoch: int = 0
    last_val: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    train_images: int = 0
    train_time_s: float = 0.0
    epoch_time_s: float = 0.0
    epoch_images: int = 0


def build_model(cfg: DetConfig, device: torch.device, init: bool, log=lambda msg: None) -> torch.nn.Module:
    """The detector of ``cfg`` on ``device`` (seeded); with ``init``, its backbone from
    ``model.backbone_checkpoint`` and then the whole detector from ``model.init_checkpoint``."""
    from models.detection import build_detector
    from models.mmdet_convert import load_detector_weights

    torch.manual_seed(cfg.seed)
    options = detector_options(cfg)
    try:
        model = build_detector(options, cfg.model.backbone_checkpoint if init else None, log)
    except (ValueError, TypeError) as e:
        key = "model.backbone_checkpoint" if str(e).startswith("backbone checkpoint") else "model.backbone"
        raise ConfigError(f"config key '{key}': {str(e).splitlines()[0]}") from None
    if init and cfg.model.init_checkpoint:
        try:
            report = load_detector_weights(model, cfg.model.init_checkpoint)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config key 'model.init_checkpoint': {str(e).splitlines()[0]}") from None
        log(f"init: {cfg.model.init_checkpoint} ({report['format']} layout, {report['loaded']} tensors)")
    return model.to(device)


def prepare_data(cfg: DetConfig, info: dist_lib.DistInfo) -> None:
    """Write the built-in data set (``data.prepare``) once: rank 0 writes, the others wait."""
    if cfg.data.prepare == "shapes":
        if info.is_main:
            from engine.detection.shapes import write_shapes_coco
            write_shapes_coco(cfg.data.root)
        dist_lib.barrier()


def val_loader(cfg: DetConfig, info: dist_lib.DistInfo, val_set: CocoDetectionSet):
    return make_loader(val_set, ExactEvalBatchSampler(len(val_set), cfg.data.val_batch_size, info.world_size,
                                                      info.rank), cfg.data.workers)


def evaluate_model(model: torch.nn.Module, cfg: DetConfig, info: dist_lib.DistInfo, val_set: CocoDetectionSet,
                   loader=None) -> dict:
    """Exact COCO metrics of ``model`` on ``val_set`` (every rank returns the same dict)."""
    loader = loader or val_loader(cfg, info, val_set)
    show = info.is_main and cfg.train.progress
    local = predict(model, loader, info.device, val_set.cat_ids, cfg.train.amp, desc="eval" if show else None)
    iou_types = ("bbox", "segm") if cfg.model.arch == "mask_rcnn" else ("bbox",)
    return gather_and_evaluate(local, val_set.coco.dataset, val_set.ids, iou_types, cfg.data.evaluator)


def check_device(cfg: DetConfig, info: dist_lib.DistInfo) -> None:
    if cfg.train.amp == "fp16" and info.device.type != "cuda":
        raise ConfigError("config key 'train.amp': fp16 (with GradScaler) needs a CUDA device; use bf16 or off on CPU")


class DetTrainer:
    """Holds a detection run's parts and state, and runs its loops (see the module docstring)."""

    def __init__(self, cfg: DetConfig, info: dist_lib.DistInfo, found: tuple[dict, Path] | None):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = DetState()
        self.session_start = time.time()
        self.writer = None
        log = self.log
        prepare_data(cfg, info)
        d = cfg.data
        self.train_set = CocoDetectionSet(d.root, d.train_split, train=True, with_masks=cfg.model.arch == "mask_rcnn",
                                          flip=d.flip)
        self.val_set = CocoDetectionSet(d.root, d.val_split, train=False, max_images=d.max_val_images)
        if self.train_set.num_classes != cfg.model.num_classes:
            raise DataError(f"model.num_classes={cfg.model.num_classes} but {d.root} has "
                            f"{self.train_set.num_classes - 1} categories (+ background = "
                            f"{self.train_set.num_classes})")
        if self.val_set.cat_ids != self.train_set.cat_ids:
            raise DataError(f"data.root: {d.train_split} and {d.val_split} have different categories")
        self.sampler = GroupedTrainBatchSampler(self.train_set.landscape(), cfg.train.batch_size, info.world_size,
                                                info.rank, cfg.seed, d.group_aspect_ratio,
                                                cfg.train.max_steps_per_epoch)
        self.steps_per_epoch = self.sampler.steps
        self.train_loader = make_loader(self.train_set, self.sampler, d.workers)
        self.val_loader = val_loader(cfg, info, self.val_set)
        log(f"data: {d.root}: train {len(self.train_set)} images, val {len(self.val_set)} images; "
            f"{self.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs")
        self.model = build_model(cfg, self.device, init=found is None, log=log)
        self.global_batch = cfg.train.batch_size * info.world_size
        self.peak_lr = cfg.optim.base_lr * self.global_batch / 16
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=self.lr(0), momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16")
        self.train_model = self.model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.loss_keys = LOSS_KEYS[cfg.model.arch]
        self.sums = torch.zeros(len(self.loss_keys) + 2, dtype=torch.float64, device=self.device)  # losses, n, bad
        log(f"lr = base_lr {cfg.optim.base_lr:g} x global batch {self.global_batch} / 16 = {self.peak_lr:g} "
            f"(warmup {cfg.optim.warmup_iters} iterations, x{cfg.optim.lr_gamma:g} after epochs {cfg.optim.lr_steps})")
        if found is not None:
            self.resume_from(*found)

    # -- helpers ----------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.info.is_main:
            log_line(msg)

    def lr(self, step: int) -> float:
        o = self.cfg.optim
        return step_lr(step, self.cfg.optim.base_lr * self.cfg.train.batch_size * self.info.world_size / 16,
                       o.warmup_iters, o.warmup_ratio, [e * self.steps_per_epoch for e in o.lr_steps], o.lr_gamma)

    def resume_from(self, ckpt: dict, path: Path) -> None:
        if ckpt["steps_per_epoch"] != self.steps_per_epoch:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {path} was written with {ckpt['steps_per_epoch']} steps/epoch (world size "
                f"{ckpt['world_size']}); this launch has {self.steps_per_epoch}: resume with the same world size, "
                "train.batch_size and data")
        changed = diff_configs(ckpt["config"], self.cfg.to_dict())
        if changed:
            self.log(f"note: resuming with changed config keys: {', '.join(changed)}")
        from engine.builders import load_optimizer_state
        self.model.load_state_dict(ckpt["model"])
        load_optimizer_state(self.optimizer, ckpt["optimizer"])
        if self.scaler.is_enabled() and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = DetState(**ckpt["state"])
        sums = ckpt.get("meter")
        if isinstance(sums, list) and len(sums) == self.info.world_size:
            self.sums = sums[self.info.rank].to(self.device)
        if len(ckpt["rng"]) == self.info.world_size:
            ckpt_lib.set_rng_state(ckpt["rng"][self.info.rank])
        else:
            self.log(f"warning: checkpoint has RNG states of {len(ckpt['rng'])} ranks, this run has "
                     f"{self.info.world_size}")
        if self.state.epoch < self.cfg.train.epochs:
            self.log(f"resumed from {path}: epoch {self.state.epoch + 1}, step {self.state.step_in_epoch}/"
                     f"{self.steps_per_epoch} (global step {self.state.global_step})")

    def save(self) -> None:
        """Write ``last.pth`` (collective: every rank's RNG state and loss sums; rank 0 writes)."""
        s = self.state
        s.elapsed_s += time.time() - self.session_start
        self.session_start = time.time()
        obj = {"format": ckpt_lib.FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
               "scaler": self.scaler.state_dict(), "epoch": s.epoch, "step_in_epoch": s.step_in_epoch,
               "global_step": s.global_step, "steps_per_epoch": self.steps_per_epoch,
               "world_size": self.info.world_size, "config": self.cfg.to_dict(), "state": asdict(s),
               "meter": dist_lib.all_gather_object(self.sums.cpu()),
               "rng": dist_lib.all_gather_object(ckpt_lib.get_rng_state())}
        if self.info.is_main:
            ckpt_lib.save_last(obj, self.ckpt_dir)
        dist_lib.barrier()

    # -- the step and the sync point --------------------------------------------------------------------------
    def train_step(self, batch: list) -> None:
        cfg, st = self.cfg, self.state
        images = [img.to(self.device, non_blocking=True).float().div_(255) for img, _ in batch]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items() if isinstance(v, torch.Tensor)}
                   for _, t in batch]
        lr = self.lr(st.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        amp = cfg.train.amp
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "off"):
            losses = self.train_model(images, targets)
        loss = sum(losses[k] for k in self.loss_keys)
        self.scaler.scale(loss).backward()
        if cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        values = torch.stack([losses[k].detach().double() for k in self.loss_keys])
        self.sums[:-2] += values
        self.sums[-2] += 1
        self.sums[-1] += (~torch.isfinite(loss.detach())).double()
        st.step_in_epoch += 1
        st.global_step += 1
        st.train_images += len(images) * self.info.world_size
        st.epoch_images += len(images) * self.info.world_size

    def sync(self, stop: bool) -> tuple[dict, bool]:
        """All-reduce the loss sums and the stop request; raise on a non-finite loss (a sync point)."""
        sums = torch.cat([self.sums, torch.tensor([float(stop)], dtype=torch.float64, device=self.device)])
        dist_lib.all_reduce_sum(sums)
        values = sums.tolist()
        if values[-2] > 0:
            last = self.ckpt_dir / "last.pth"
            kept = f"; the last good checkpoint {last} is left intact" if last.exists() else ""
            raise NonFiniteLossError(f"non-finite training loss by global step {self.state.global_step} (epoch "
                                     f"{self.state.epoch + 1}){kept}; lower optim.base_lr or check the data")
        n = max(values[-3], 1.0)
        means = {k: v / n for k, v in zip(self.loss_keys, values[:-3], strict=True)}  # [losses..., n, bad, stop]
        means["loss"] = sum(means[k] for k in self.loss_keys)
        return means, values[-1] > 0

    def _hooks(self) -> None:
        dbg, st = self.cfg.debug, self.state
        if dbg.kill_after_steps is not None and st.global_step >= dbg.kill_after_steps:
            raise SimulatedKill(f"debug.kill_after_steps: killed after global step {st.global_step}")
        if dbg.signal_after_steps is not None and st.global_step == dbg.signal_after_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    # -- loops ------------------------------------------------------------------------------------------------
    def train_epoch(self, preempt: Preemption) -> dict | None:
        """The rest of the current epoch; its mean losses, or None after a stop request (checkpointed)."""
        cfg, st = self.cfg, self.state
        self.sampler.set_epoch(st.epoch, st.step_in_epoch)
        self.train_model.train()
        progress = Progress(self.steps_per_epoch, st.step_in_epoch, f"epoch {st.epoch + 1}/{cfg.train.epochs}",
                            enabled=self.info.is_main and cfg.train.progress)
        t0 = time.time()
        means: dict = {}
        try:
            for batch in self.train_loader:
                self.train_step(batch)
                progress.update()
                self._hooks()
                end = st.step_in_epoch >= self.steps_per_epoch
                every = cfg.train.checkpoint_every_steps
                want_ckpt = every > 0 and st.step_in_epoch % every == 0 and not end
                local_stop = preempt.requested and not self.info.distributed
                if not (end or want_ckpt or local_stop or st.step_in_epoch % cfg.train.log_every_steps == 0):
                    continue
                means, stop = self.sync(preempt.requested)
                progress.report(self.global_batch, loss=means["loss"], lr=self.lr(st.global_step - 1))
                if self.writer is not None:
                    for k, v in means.items():
                        self.writer.add_scalar(f"train/{k}", v, st.global_step)
                if stop and not end:
                    st.epoch_time_s += time.time() - t0
                    st.train_time_s += time.time() - t0
                    self.save()
                    self.log(f"{preempt.name} received: checkpointed at epoch {st.epoch + 1} step "
                             f"{st.step_in_epoch}/{self.steps_per_epoch}; exiting for requeue")
                    return None
                if want_ckpt:
                    st.epoch_time_s += time.time() - t0
                    st.train_time_s += time.time() - t0
                    t0 = time.time()
                    self.save()
        finally:
            progress.close()
        st.epoch_time_s += time.time() - t0
        st.train_time_s += time.time() - t0
        return means

    def end_epoch(self, means: dict) -> None:
        cfg, st = self.cfg, self.state
        row = {"epoch": st.epoch + 1, "global_step": st.global_step, **{f"train_{k}": v for k, v in means.items()},
               "lr": self.lr(st.global_step - 1), "img_per_s": st.epoch_images / max(st.epoch_time_s, 1e-9),
               "epoch_time_s": st.epoch_time_s}
        improved = False
        if (st.epoch + 1) % cfg.train.eval_every_epochs == 0 or st.epoch + 1 == cfg.train.epochs:
            dist_lib.broadcast_buffers(self.model)  # every rank evaluates rank 0's weights and statistics
            t0 = time.time()
            val = evaluate_model(self.model, cfg, self.info, self.val_set, self.val_loader)
            val["eval_time_s"] = time.time() - t0
            st.last_val = {**val, "epoch": st.epoch + 1}
            row.update({f"val_{k}": v for k, v in val.items()})
            improved = val["bbox_AP"] > st.best_bbox_AP
            if improved:
                st.best_bbox_AP, st.best_epoch = val["bbox_AP"], st.epoch + 1
        val_text = "".join(f" {k} {row[f'val_{k}']:.2f}" for k in ("bbox_AP", "segm_AP") if f"val_{k}" in row)
        self.log(f"epoch {st.epoch + 1}/{cfg.train.epochs}: train loss {means.get('loss', float('nan')):.4f} |"
                 f"{val_text} | lr {row['lr']:.4g} | {row['img_per_s']:.2f} img/s | {st.epoch_time_s:.1f} s")
        if self.info.is_main:
            fileio.append_line(self.run_dir / "metrics.jsonl", json.dumps(row))
            if self.writer is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k not in ("epoch", "global_step"):
                        self.writer.add_scalar(f"epoch/{k}", v, st.epoch + 1)
                self.writer.flush()
        st.epoch += 1
        st.step_in_epoch, st.epoch_time_s, st.epoch_images = 0, 0.0, 0
        self.sums.zero_()
        if improved and self.info.is_main:
            fileio.atomic_save({"format": "fcanet-detector-v1", "model": self.model.state_dict(),
                                  "config": self.cfg.to_dict(), "epoch": st.epoch, "val": st.last_val},
                                 self.ckpt_dir / "best.pth")
        self.save()

    def summary(self) -> dict:
        st, v = self.state, self.state.last_val
        wall = st.elapsed_s + time.time() - self.session_start
        gpus = self.info.world_size if self.device.type == "cuda" else 0
        return {"format": SUMMARY_FORMAT, "status": "complete", "arch": self.cfg.model.arch,
                "backbone": self.cfg.model.backbone, "epochs": st.epoch, "global_steps": st.global_step,
                "best_bbox_AP": st.best_bbox_AP, "best_epoch": st.best_epoch,
                "final": {k: val for k, val in v.items() if k.startswith(("bbox_", "segm_"))},
                "val_images": v.get("images"), "train_img_per_s": st.train_images / max(st.train_time_s, 1e-9),
                "wall_time_s": wall, "gpu_hours": wall * gpus / 3600.0, "world_size": self.info.world_size,
                "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "global_batch": self.global_batch, "peak_lr": self.peak_lr, "git_commit": git_commit(),
                "output_dir": str(self.run_dir)}

    def fit(self, preempt: Preemption) -> dict:
        cfg, st = self.cfg, self.state
        summary_path = self.run_dir / "summary.json"
        if st.epoch >= cfg.train.epochs:
            self.log(f"already complete: {self.run_dir} has trained {st.epoch}/{cfg.train.epochs} epochs (best box AP "
                     f"{st.best_bbox_AP:.2f} at epoch {st.best_epoch}); nothing to do. To train again, choose a new "
                     "output_dir, or raise train.epochs to continue this run")
            if self.info.is_main and not summary_path.exists():
                fileio.atomic_write_text(summary_path, json.dumps(self.summary(), indent=2) + "\n")
            return json.loads(summary_path.read_text()) if summary_path.exists() else self.summary()
        if self.info.is_main:
            text = dump_config(cfg)
            current = self.run_dir / "config.yaml"
            if not current.exists() or current.read_text() != text:
                write_config(self.run_dir, text, self.log)
            if cfg.train.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=st.global_step or None)
        self.log("start training")
        while st.epoch < cfg.train.epochs:
            if preempt.requested and not self.info.distributed:
                self.save()
                return {"status": "preempted"}
            means = self.train_epoch(preempt)
            if means is None:
                return {"status": "preempted"}
            self.end_epoch(means)
        summary = self.summary()
        if self.info.is_main:
            fileio.atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
            f = summary["final"]
            seg = f" segm AP {f['segm_AP']:.2f}" if "segm_AP" in f else ""
            self.log(f"done: box AP {f.get('bbox_AP', float('nan')):.2f}{seg}; summary in {summary_path}")
        return summary

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


DET_REQUIRED = ("model", "optimizer", "scaler", "epoch", "step_in_epoch", "global_step", "steps_per_epoch",
                "world_size", "config", "state", "meter", "rng")


def check_detector_checkpoint(ckpt: dict, path: Path) -> None:
    """A detection training checkpoint has every entry it is resumed from (one-line error otherwise)."""
    missing = [k for k in DET_REQUIRED if k not in ckpt]
    if missing:
        raise ckpt_lib.CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if not isinstance(ckpt["state"], dict) or not isinstance(ckpt["rng"], list) or not isinstance(ckpt["config"], dict):
        raise ckpt_lib.CheckpointError(f"checkpoint {path} is malformed: state, rng or config of the wrong type")


def _check_structure(saved: dict, cfg: DetConfig, path: Path) -> None:
    now = cfg.to_dict()

    def get(d: dict, key: str) -> Any:
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    changed = [k for k in STRUCTURAL_KEYS if get(saved, k) != get(now, k)]
    if changed:
        what = ", ".join(f"{k}={get(saved, k)!r} (now {get(now, k)!r})" for k in changed)
        raise ConfigError(f"cannot resume {path}: its weights were trained with {what}; start a new run (another "
                          "output_dir), or set them back to continue this one")



def fit(cfg: DetConfig, resume: str | None = None) -> dict:
    """Train ``cfg`` in ``cfg.output_dir`` (auto-resuming); the summary, or ``{"status": "preempted"}``."""
    info = dist_lib.init_distributed()
    trainer, lock = None, None
    with Preemption() as preempt:
        try:
            check_device(cfg, info)
            detector_options(cfg)
            if info.device.type == "cpu" and cfg.train.cpu_threads:
                torch.set_num_threads(cfg.train.cpu_threads)
            lock = RunDir(cfg.output_dir, is_main=info.is_main, log=log_line)
            lock.own()
            log = log_line if info.is_main else (lambda msg: None)
            log(f"run directory: {Path(cfg.output_dir).resolve()}")
            if resume is not None:
                found = ckpt_lib.load_checkpoint(resume, check_detector_checkpoint), Path(resume)
            else:
                found = ckpt_lib.find_resumable(Path(cfg.output_dir) / "checkpoints", log=log, quarantine=info.is_main,
                                                validate=check_detector_checkpoint)
            if found is not None:
                _check_structure(found[0]["config"], cfg, found[1])
            trainer = DetTrainer(cfg, info, found)
            return trainer.fit(preempt)
        finally:
            if trainer is not None:
                trainer.close()
            if lock is not None:
                lock.release()
            dist_lib.cleanup()


def evaluate_checkpoint(cfg: DetConfig, checkpoint: str) -> dict:
    """Exact COCO metrics of ``checkpoint`` (ours, or an MMDetection 2 checkpoint) on ``cfg``'s val set."""
    from models.mmdet_convert import load_detector_weights

    info = dist_lib.init_distributed()
    try:
        check_device(cfg, info)
        if info.device.type == "cpu" and cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        prepare_data(cfg, info)
        d = cfg.data
        val_set = CocoDetectionSet(d.root, d.val_split, train=False, max_images=d.max_val_images)
        model = build_model(cfg, info.device, init=False)
        try:
            report = load_detector_weights(model, checkpoint)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"--checkpoint {checkpoint}: {str(e).splitlines()[0]}") from None
        t0 = time.time()
        out = evaluate_model(model, cfg, info, val_set)
        out.update({"checkpoint": str(checkpoint), "checkpoint_format": report["format"],
                    "arch": cfg.model.arch, "backbone": cfg.model.backbone, "world_size": info.world_size,
                    "time_s": time.time() - t0, "is_main": info.is_main})
        return out
    finally:
        dist_lib.cleanup()
