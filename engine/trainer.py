"""Training loop (one code path for CPU/GPU, 1 process or DDP).

``fit(cfg)`` runs a whole training run in ``cfg.output_dir``: it owns the run directory
(:class:`engine.rundir.RunDir`, which also holds every file the run writes), finds a checkpoint to resume
(refusing one whose weights mean something else), builds the parts (:mod:`engine.builders`) and hands them to
a :class:`Trainer`, which holds the run's state and loops.

Hot loop rules: metrics are accumulated in device tensors and only reduced/read every
``train.log_every_steps`` steps (and at checkpoints / epoch ends), so there is no host-device sync per
step. The non-finite-loss check and, under DDP, the stop request ride on those sync points.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch

from engine import checkpoint as ckpt_lib
from engine import distributed as dist_lib
from engine.builders import (DataBundle, Optimization, Wrapped, build_data, build_optimization, check_device,
                             load_optimizer_state, model_arguments, new_model, prepare_model, wrap_model)
from engine.checkpoint import TrainState, check_structure
from engine.config import Config, diff_configs, dump_config
from engine.data.errors import DataError
from engine.data.loader import DevicePrefetcher, shutdown_workers
from engine.errors import NonFiniteLossError, NonFiniteOutputError, SimulatedKill
from engine.evaluation import AMP_DTYPES, evaluate
from engine.meter import Meter, MeterReading
from engine.preemption import Preemption
from engine.progress import Progress, log_line
from engine.rundir import RunDir
from engine.summary import RunSummary, git_commit, provenance

__all__ = ["fit", "Trainer", "build_trainer", "check_config"]


# ----------------------------------------------------------------------------------------------------------------

class Trainer:
    """Holds a run's state and runs its loops; receives the built parts (see :func:`build_trainer`).

    Args:
        cfg: the resolved config.
        info: this process's place in the job (rank, world size, device).
        run_dir: the run directory's files (owned: :meth:`engine.rundir.RunDir.own`).
        data: loaders and the train sampler (:func:`engine.builders.build_data`).
        model: the bare model on its device (its ``state_dict`` is what checkpoints hold).
        optim: optimizer, scaler, loss and the lr function (:func:`engine.builders.build_optimization`).
        wrapped: the DDP / compiled modules the loops call (:func:`engine.builders.wrap_model`).
    """

    def __init__(self, cfg: Config, info: dist_lib.DistInfo, run_dir: RunDir, data: DataBundle,
                 model: torch.nn.Module, optim: Optimization, wrapped: Wrapped):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.run_dir = run_dir
        self.data, self.model, self.optim, self.wrapped = data, model, optim, wrapped
        self.steps_per_epoch = data.steps_per_epoch
        self.state = TrainState()
        self.meter = Meter(self.device)
        self.stop_requested_any_rank = False  # the all-reduced stop request of the last sync point
        self.session_start = time.time()
        self.resumed_config: dict | None = None  # the resolved config the resumed checkpoint was trained with
        self.stopped: dict | None = None  # how a stop request ended the session (preemption_exit)
        self._resumed_from: Path | None = None  # another run's checkpoint (--resume) this run continues
        self._t0, self._images = time.time(), 0  # training time / images since the last accounting
        self._warm = False  # this session's first step (its warm-up) is done
        self._input = {"wait_s": 0.0, "decode_s": 0.0}  # this session's share of the epoch's input-path time
        # A batch shortened by a skipped file must not recompile the compiled model mid-epoch (on one rank only,
        # the others waiting): its batch dimension is marked dynamic from the first step.
        self._dynamic_batch = cfg.train.compile and cfg.data.skip_corrupt
        self.writer = None

    # -- helpers ----------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.info.is_main:
            log_line(msg)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.info.world_size

    # -- resume -----------------------------------------------------------------------------------------------
    def resume_from(self, ckpt: dict, path: Path) -> None:
        """Check a training checkpoint against this launch (its config against ours by
        :func:`engine.checkpoint.check_structure` already), then load it."""
        ckpt_lib.check_fits(ckpt, path, self.model, self.optim.optimizer, self.steps_per_epoch)
        ckpt_lib.check_classes(ckpt["classes"], self.data.classes, path)
        changed = diff_configs(ckpt["config"], self.cfg.to_dict())
        if changed:
            self.log(f"note: resuming with changed config keys: {', '.join(changed)}")
        self.model.load_state_dict(ckpt["model"])
        # its lr is set again before every step; its fused/foreach flags stay this machine's
        load_optimizer_state(self.optim.optimizer, ckpt["optimizer"])
        if self.optim.scaler.is_enabled() and ckpt["scaler"]:  # a bf16/off checkpoint has no scaler state
            self.optim.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        meters, world = ckpt["meter"], self.info.world_size
        if len(meters) == world:
            self.meter.load(meters[self.info.rank])  # this rank's running sums of the interrupted epoch
        elif self.info.is_main:
            # Another world size: rank 0 takes every saved rank's running sums (the others start from zero), so
            # the epoch's all-reduced train metrics still count each step before the interruption exactly once.
            self.meter.load(ckpt_lib.merge_meters(meters))
        if len(meters) != world and self.state.step_in_epoch:
            self.log(f"note: resuming epoch {self.state.epoch + 1} mid-way at world size {world} (checkpoint: "
                     f"{len(meters)}): the global batches are the same, and its train metrics count every step once")
        rng = ckpt["rng"]
        if len(rng) == world:
            ckpt_lib.set_rng_state(rng[self.info.rank])
        else:
            self.log(f"warning: checkpoint has RNG states of {len(rng)} ranks, this run has {world}")
        self.resumed_config = ckpt["config"]
        if not self.run_dir.is_own(path):
            self._resumed_from = Path(path)
        if self.state.epoch >= self.cfg.train.epochs:
            return  # a finished run: fit() says so
        self.log(f"resumed from {path}: epoch {self.state.epoch + 1}, step {self.state.step_in_epoch}/"
                 f"{self.steps_per_epoch} (global step {self.state.global_step})")

    def _adopt_best(self) -> None:
        """Resumed from another run's checkpoint (``--resume``): this directory's best.pth must hold the best
        epoch the state names. Copy that run's best.pth when it is that epoch's; otherwise the best is tracked
        again from here on (the next evaluation here writes best.pth). Rank 0 decides; every rank follows."""
        st, source = self.state, self._resumed_from
        if source is None or st.best_epoch == 0:
            return
        decision = None
        if self.info.is_main:
            decision = ("kept" if self.run_dir.best.exists() else
                        "copied" if self.run_dir.adopt_best(source, st.best_epoch) else "tracked again")
        decision = dist_lib.broadcast_object(decision)
        theirs = f"{source.parent / 'best.pth'} (epoch {st.best_epoch}, top1 {st.best_top1:.2f})"
        if decision == "copied":
            self.log(f"best.pth: copied {theirs}, the best epoch of the run resumed from")
        elif decision == "tracked again":
            self.log(f"note: best.pth: {theirs} cannot be copied (missing, or of another epoch): the best epoch is "
                     f"tracked again from epoch {st.epoch + 1} on, and the next evaluation writes best.pth")
            st.best_top1, st.best_epoch = -1.0, 0

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _checkpoint(self) -> dict:
        s = self.state
        return {
            "format": ckpt_lib.FORMAT, "model": self.model.state_dict(), "optimizer": self.optim.optimizer.state_dict(),
            "scaler": self.optim.scaler.state_dict(),
            "epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step,
            "steps_per_epoch": self.steps_per_epoch, "world_size": self.info.world_size,
            "config": self.cfg.to_dict(), "state": asdict(s),
            "meter": dist_lib.all_gather_object(self.meter.state()),  # every rank's running sums, like its RNG
            "rng": dist_lib.all_gather_object(ckpt_lib.get_rng_state()),
            "arch": model_arguments(self.cfg), "classes": self.data.classes,
        }

    def save(self) -> None:
        """Write ``last.pth`` (collective: every rank contributes its RNG state; rank 0 writes)."""
        self.state.elapsed_s += time.time() - self.session_start
        self.session_start = time.time()
        self.run_dir.save_last(self._checkpoint())
        dist_lib.barrier()

    def _save_best(self) -> None:
        if self.info.is_main:
            self.run_dir.save_best({"format": ckpt_lib.MODEL_FORMAT, "model": self.model.state_dict(),
                                    "config": self.cfg.to_dict(), "epoch": self.state.epoch,
                                    "val": self.state.last_val, "arch": model_arguments(self.cfg),
                                    "classes": self.data.classes})

    def _nonfinite(self, step: int) -> NonFiniteLossError:
        last = self.run_dir.last
        kept = f"; the last good checkpoint {last} is left intact" if last.exists() else ""
        return NonFiniteLossError(f"non-finite training loss at global step {step} (epoch {self.state.epoch + 1})"
                                  f"{kept}; lower optim.base_lr or check the data")

    def _last_lr(self) -> float:
        """The lr of the last optimizer step taken (step ``global_step - 1``; the schedule's value at
        ``global_step`` is the next step's, 0 after the last step of the run)."""
        return self.optim.schedule.lr(max(self.state.global_step - 1, 0))

    # -- the step, the sync point, the preemption exit --------------------------------------------------------
    def train_step(self, x: torch.Tensor | None, y: torch.Tensor, skipped: int) -> None:
        """One optimizer step on this rank's batch (no host sync): lr from the schedule, forward, backward.

        ``x``: (N, 3, H, W) model-ready images on the device (None: every file of the batch was unreadable),
        ``y``: (N,) labels on the device, ``skipped``: unreadable images left out of the batch."""
        st, cfg, dev = self.state, self.cfg, self.device
        if x is None:
            raise DataError(f"every image of a training batch (global step {st.global_step + 1}) is unreadable")
        self.optim.schedule.apply(self.optim.optimizer, st.global_step)
        if self._dynamic_batch:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        with torch.autocast(dev.type, dtype=AMP_DTYPES.get(cfg.train.amp, torch.bfloat16),
                            enabled=cfg.train.amp != "off"):
            logits = self.wrapped.train_model(x)                   # (N, classes)
            loss = self.optim.criterion(logits, y)
        self.optim.optimizer.zero_grad(set_to_none=True)
        self.optim.scaler.scale(loss).backward()
        self.optim.scaler.step(self.optim.optimizer)
        self.optim.scaler.update()
        st.global_step += 1
        st.step_in_epoch += 1
        self._images += y.numel() * self.info.world_size
        self.meter.add(loss, logits.float(), y, skipped, step=st.global_step)

    def sync_point(self, preempt: Preemption, progress: Progress) -> MeterReading:
        """Reduce the metrics over ranks (the only host sync of the loop), agree on a stop request, stop on a
        non-finite loss, report progress."""
        st = self.state
        reading = self.meter.reduce(stop_requested=preempt.requested)
        self.stop_requested_any_rank = reading.stop_requested
        if reading.first_bad_step is not None:
            raise self._nonfinite(reading.first_bad_step)
        lr = self._last_lr()
        progress.report(images_per_step=self.global_batch, loss=reading.loss, top1=reading.top1, lr=lr)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", reading.loss, st.global_step)
            self.writer.add_scalar("train/lr", lr, st.global_step)
        return reading

    def preemption_exit(self, preempt: Preemption) -> dict:
        """Checkpoint where we are and report it: ``{"status": "preempted"}`` (SIGTERM/SIGUSR1: the process exits
        0, a requeued job resumes here) or ``{"status": "interrupted"}`` (Ctrl-C: exit status 130)."""
        st = self.state
        self._account()
        self.save()
        where = (f"checkpointed at epoch {st.epoch + 1} step {st.step_in_epoch}/{self.steps_per_epoch} (global step "
                 f"{st.global_step})")
        if preempt.interrupted:
            self.log(f"interrupted (Ctrl-C): {where}; run the same command again to resume from there")
            self.stopped = {"status": "interrupted"}
        else:
            self.log(f"{preempt.name} received: {where}; exiting for requeue")
            self.stopped = {"status": "preempted"}
        return self.stopped

    def _debug_hooks(self) -> None:
        dbg, st = self.cfg.debug, self.state
        if dbg.kill_after_steps is not None and st.global_step >= dbg.kill_after_steps:
            raise SimulatedKill(f"debug.kill_after_steps: killed after global step {st.global_step}")
        if dbg.signal_after_steps is not None and st.global_step == dbg.signal_after_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    def _account(self, warmup: bool = False) -> None:
        """Add the training time / images since the last call to the state (throughput figures); ``warmup``:
        they were the session's first step, also counted apart."""
        dt = time.time() - self._t0
        st = self.state
        st.epoch_time_s += dt
        st.train_time_s += dt
        st.epoch_images += self._images
        st.train_images += self._images
        if warmup:
            st.epoch_warmup_s += dt
            st.warmup_s += dt
            st.epoch_warmup_images += self._images
            st.warmup_images += self._images
        self._t0, self._images = time.time(), 0

    def _end_warmup(self) -> None:
        """After the session's first step: wait for it (one host sync per session) and account it as warm-up."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._account(warmup=True)
        self._warm = True

    @staticmethod
    def _rate(images: int, seconds: float, warm_images: int, warm_s: float) -> float:
        """Images per second without the warm-up (with it when nothing else was timed)."""
        if images > warm_images and seconds > warm_s:
            return (images - warm_images) / (seconds - warm_s)
        return images / max(seconds, 1e-9)

    # -- loops ------------------------------------------------------------------------------------------------
    def train_one_epoch(self, preempt: Preemption) -> MeterReading | None:
        """Run the rest of the current epoch. Returns its (all-reduced) train metrics, or None when a stop was
        requested (after checkpointing)."""
        cfg, st = self.cfg, self.state
        self.data.train_sampler.set_epoch(st.epoch, st.step_in_epoch)
        self.wrapped.train_model.train()
        every_ckpt = cfg.train.checkpoint_every_steps
        progress = Progress(total=self.steps_per_epoch, initial=st.step_in_epoch,
                            desc=f"epoch {st.epoch + 1}/{cfg.train.epochs}",
                            enabled=self.info.is_main and cfg.train.progress)
        self._t0, self._images = time.time(), 0
        reading = None
        # The next batch is copied and normalised on a side CUDA stream (gpu pipeline: decoded on its own thread)
        # while this one trains.
        batches = DevicePrefetcher(self.data.train_loader, self.device, cfg.train.channels_last)
        try:
            for x, y, skipped in batches:
                self.train_step(x, y, skipped)
                if not self._warm:
                    self._end_warmup()
                progress.update()
                self._debug_hooks()
                end = st.step_in_epoch >= self.steps_per_epoch
                want_ckpt = every_ckpt > 0 and st.step_in_epoch % every_ckpt == 0 and not end
                # Single process: the stop request is a Python bool, free to check every step. Under DDP the ranks
                # must agree, which needs a collective, so it is checked at the sync points.
                local_stop = preempt.requested and not self.info.distributed
                if not (end or want_ckpt or local_stop or st.step_in_epoch % cfg.train.log_every_steps == 0):
                    continue
                reading = self.sync_point(preempt, progress)
                if reading.stop_requested and not end:
                    self.preemption_exit(preempt)
                    return None
                if want_ckpt:
                    self._account()
                    self.save()
            if reading is None:  # resumed from the checkpoint saved after the epoch's last step, before evaluating
                reading = self.sync_point(preempt, progress)
        finally:
            progress.close()
            self._input["wait_s"] += batches.stats["wait_s"]
            self._input["decode_s"] += batches.stats["decode_s"]
        self._account()
        return reading

    def _evaluate(self) -> dict:
        dist_lib.broadcast_buffers(self.model)  # every rank evaluates rank 0's BN statistics
        show = self.info.is_main and self.cfg.train.progress
        try:
            return evaluate(self.wrapped.eval_model, self.data.val_loader, self.device, self.cfg.train.amp,
                            self.cfg.train.channels_last, desc="eval" if show else None)
        except NonFiniteOutputError as e:
            raise NonFiniteOutputError(f"evaluation of epoch {self.state.epoch + 1}: {e}") from None

    def _end_epoch(self, train: MeterReading) -> None:
        """Evaluate (when due), log and record the epoch, move the state to the next epoch, checkpoint."""
        cfg, st = self.cfg, self.state
        last_epoch = st.epoch + 1 == cfg.train.epochs
        # img_per_s leaves out the session's warm-up step (warmup_s; epoch_time_s includes it). input_wait_s:
        # time the loop waited for batches; decode_s (gpu pipeline): the decode thread's time (this session's
        # part of the epoch).
        row = {"epoch": st.epoch + 1, "global_step": st.global_step, "train_loss": train.loss,
               "train_top1": train.top1, "lr": self._last_lr(),
               "img_per_s": self._rate(st.epoch_images, st.epoch_time_s, st.epoch_warmup_images, st.epoch_warmup_s),
               "epoch_time_s": st.epoch_time_s, "warmup_s": st.epoch_warmup_s,
               "input_wait_s": self._input["wait_s"], "train_skipped": train.skipped}
        if cfg.data.pipeline == "gpu":
            row["decode_s"] = self._input["decode_s"]
        self._input = {"wait_s": 0.0, "decode_s": 0.0}
        improved = False
        if (st.epoch + 1) % cfg.train.eval_every_epochs == 0 or last_epoch:
            # The epoch's training is saved first: an evaluation that fails (an unreadable val image, out of
            # memory) must not cost it. A rerun resumes at this point and evaluates.
            self.save()
            val = self._evaluate()
            st.last_val = {**val, "epoch": st.epoch + 1}
            row.update({"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                        "val_count": val["count"], "val_skipped": val["skipped"]})
            improved = val["top1"] > st.best_top1
            if improved:
                st.best_top1, st.best_epoch = val["top1"], st.epoch + 1
        if cfg.data.pipeline == "gpu":
            # Files of this epoch (train and val) that nvjpeg could not take and the CPU decoded, all ranks.
            from engine.data.gpu_decode import fallback_counts
            counts = fallback_counts(reset=True)
            n = torch.tensor([float(sum(counts.values())), float(counts.get("nvjpeg_error", 0))], device=self.device)
            row["cpu_decoded"], row["nvjpeg_failed"] = (int(v) for v in dist_lib.all_reduce_sum(n).tolist())
        val_text = (f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f} top5 {row['val_top5']:.2f} "
                    f"({row['val_count']} images) | " if "val_top1" in row else "")
        warm = f" (warm-up {row['warmup_s']:.1f} s excluded)" if row["warmup_s"] > 0 else ""
        self.log(f"epoch {st.epoch + 1}/{cfg.train.epochs}: train loss {row['train_loss']:.4f} top1 "
                 f"{row['train_top1']:.2f} | {val_text}lr {row['lr']:.4g} | {row['img_per_s']:.1f} img/s{warm} | "
                 f"{row['epoch_time_s']:.1f} s")
        self.run_dir.append_metrics(row)
        if self.info.is_main and self.writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "global_step"):
                    self.writer.add_scalar(f"epoch/{k}", v, st.epoch + 1)
            self.writer.flush()
        st.epoch += 1
        st.step_in_epoch, st.epoch_time_s, st.epoch_images = 0, 0.0, 0
        st.epoch_warmup_s, st.epoch_warmup_images = 0.0, 0
        self.meter.reset()
        if improved:
            self._save_best()
        self.save()

    def fit(self, preempt: Preemption) -> dict:
        """Train to ``train.epochs``; returns the summary, or the stop's status (:meth:`preemption_exit`)."""
        cfg, st = self.cfg, self.state
        if st.epoch >= cfg.train.epochs:
            return self.already_complete()
        self.run_dir.sync_config(dump_config(cfg), cfg.to_dict(), self.resumed_config)
        self.run_dir.trim_metrics(st.epoch)
        self._adopt_best()
        if self.info.is_main and cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a crashed session logged after the checkpoint we resume from.
            self.writer = SummaryWriter(str(self.run_dir.tensorboard), purge_step=st.global_step or None)
        self.log("start training")
        preempt.training = True  # from here a Ctrl-C checkpoints first (a second one exits at once)
        while st.epoch < cfg.train.epochs:
            # Under DDP only the all-reduced request is used, so that every rank stops at the same point.
            if preempt.requested if not self.info.distributed else self.stop_requested_any_rank:
                return self.preemption_exit(preempt)
            train = self.train_one_epoch(preempt)
            if train is None:
                return self.stopped
            self._end_epoch(train)
        summary = self.summary()
        path = self.run_dir.write_summary(summary)
        self.log(f"done: best top1 {summary.best_top1:.2f} (epoch {summary.best_epoch}), final top1 "
                 f"{summary.final_top1:.2f} top5 {summary.final_top5:.2f}; summary in {path}")
        return summary.to_dict()

    def already_complete(self) -> dict:
        """A rerun of a finished run trains nothing: say so, and how to train again. A missing or unreadable
        summary.json is written again from the checkpoint."""
        st, cfg = self.state, self.cfg
        saved = self.run_dir.read_summary()
        if saved is None:
            summary = self.summary(include_session=False)
            path = self.run_dir.write_summary(summary)
            self.log(f"warning: {path} was missing or unreadable: written again from the last checkpoint")
            saved = summary.to_dict()
        final = st.last_val.get("top1")
        self.log(f"already complete: {self.run_dir.path} has trained {st.epoch}/{cfg.train.epochs} epochs (best top1 "
                 f"{st.best_top1:.2f} at epoch {st.best_epoch}" + (f", final top1 {final:.2f}" if final is not None
                                                                     else "") + "); nothing to do. To train again, "
                 "choose a new output_dir, or raise train.epochs to continue this run")
        return saved

    def summary(self, include_session: bool = True) -> RunSummary:
        st = self.state
        wall = st.elapsed_s + ((time.time() - self.session_start) if include_session else 0.0)
        gpus = self.info.world_size if self.device.type == "cuda" else 0
        v = st.last_val
        return RunSummary(
            status="complete", model=self.cfg.model.name, epochs=st.epoch, best_top1=st.best_top1,
            best_epoch=st.best_epoch, final_top1=v.get("top1"), final_top5=v.get("top5"), final_loss=v.get("loss"),
            val_count=v.get("count"), global_steps=st.global_step,
            train_img_per_s=self._rate(st.train_images, st.train_time_s, st.warmup_images, st.warmup_s),
            wall_time_s=wall,
            gpu_hours=wall * gpus / 3600.0, world_size=self.info.world_size,
            device=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            global_batch=self.global_batch, peak_lr=self.optim.schedule.peak_lr, git_commit=git_commit(),
            output_dir=str(self.run_dir.path), **provenance())

    def close(self) -> None:
        """Stop the loaders' worker processes (on every way out, errors included) and close the writer."""
        for loader in (self.data.train_loader, self.data.val_loader):
            shutdown_workers(loader)
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ----------------------------------------------------------------------------------------------------------------

def check_config(cfg: Config, info: dist_lib.DistInfo) -> None:
    """What can refuse ``cfg`` on this machine (the config layer checked everything else): the device, and
    for ``data.pipeline: gpu`` a working nvjpeg (one-line ConfigError each)."""
    check_device(cfg, info.device, info.distributed)
    if cfg.data.pipeline == "gpu":
        from engine.data.gpu_decode import check_available
        check_available()


def config_warnings(cfg: Config, info: dist_lib.DistInfo) -> list[str]:
    """Settings that work but cost more than they seem to (one line each, logged by rank 0)."""
    out = []
    if cfg.train.sync_bn and cfg.train.compile and info.distributed:
        out.append("warning: train.sync_bn with train.compile: SyncBatchNorm synchronises the host at every BN layer "
                   "(53 per ResNet-50 forward) and breaks the compiled graph at each; expect little gain from "
                   "compile (set train.sync_bn=false unless the per-GPU batch is small)")
    return out


def set_backend_flags(cfg: Config, device: torch.device) -> None:
    """cuDNN autotuning (``train.cudnn_benchmark``, CUDA only): each convolution shape is timed once over cuDNN's
    algorithms and the fastest kept (the input shapes are fixed, except a last partial eval batch)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)


def build_trainer(cfg: Config, info: dist_lib.DistInfo, run_dir: RunDir, model: torch.nn.Module,
                  resume: str | None = None) -> Trainer:
    """Find the checkpoint to resume, build data / optimization / wrapping around ``model`` (from
    :func:`engine.builders.new_model`), and restore the checkpoint into a :class:`Trainer` (``cfg`` already
    checked by :func:`check_config`, ``run_dir`` owned). Nothing in the run directory is written here (an
    unusable ``last.pth`` is moved aside)."""
    log = log_line if info.is_main else (lambda msg: None)
    if info.device.type == "cpu" and cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    log(f"run directory: {run_dir.path.resolve()}")
    for line in config_warnings(cfg, info):
        log(line)
    set_backend_flags(cfg, info.device)
    found = run_dir.find_checkpoint(resume)
    if found is not None:
        check_structure(found[0]["config"], cfg, found[1])

    data = build_data(cfg, info)
    log(f"data: {cfg.data.source} train {data.train_size} images, val {data.val_size} images; "
        f"{data.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs")
    model = prepare_model(cfg, info, model, init_checkpoint=found is None, log=log)
    optim = build_optimization(cfg, model, info, data.steps_per_epoch)
    log(f"lr = base_lr {cfg.optim.base_lr:g} x global batch {cfg.train.batch_size * info.world_size} / 256 = "
        f"{optim.schedule.peak_lr:g} (warmup {cfg.train.warmup_epochs:g} epochs, then cosine to 0)")
    wrapped = wrap_model(cfg, model, info)
    trainer = Trainer(cfg, info, run_dir, data, model, optim, wrapped)
    if found is not None:
        trainer.resume_from(*found)
    return trainer


def fit(cfg: Config, resume: str | None = None) -> dict:
    """Train ``cfg`` in ``cfg.output_dir`` (auto-resuming from its checkpoints); returns the summary, or
    ``{"status": "preempted"}`` (SIGTERM/SIGUSR1) / ``{"status": "interrupted"}`` (Ctrl-C) when a stop request
    ended it after checkpointing."""
    info = dist_lib.init_distributed()
    trainer, run_dir = None, None
    # The handlers stay installed through the clean-up too: a SIGTERM then (torchrun stopping the workers after
    # one failed) must not kill this process before it has printed its one line.
    with Preemption() as preempt:
        try:
            # A refused config (or a model option its constructor refuses) leaves no run directory behind.
            check_config(cfg, info)
            model = new_model(cfg)
            run_dir = RunDir(cfg.output_dir, is_main=info.is_main, log=log_line)
            run_dir.own()
            trainer = build_trainer(cfg, info, run_dir, model, resume)
            return trainer.fit(preempt)
        finally:
            if trainer is not None:
                trainer.close()
            if run_dir is not None:
                run_dir.release()
            dist_lib.cleanup()
