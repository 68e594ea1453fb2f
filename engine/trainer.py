"""Training loop (one code path for CPU/GPU, 1 process or DDP).

``fit(cfg)`` runs a whole training run in ``cfg.output_dir``: it takes the run directory's lock, finds a
checkpoint to resume (refusing one whose weights mean something else), builds the parts
(:mod:`engine.builders`) and hands them to a :class:`Trainer`, which holds the run's state and loops.

Hot loop rules: metrics are accumulated in device tensors and only reduced/read every
``train.log_every_steps`` steps (and at checkpoints / epoch ends), so there is no host-device sync per
step. The non-finite-loss check and, under DDP, the stop request ride on those sync points.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from engine import checkpoint as ckpt_lib
from engine import distributed as dist_lib
from engine import fileio
from engine.builders import (DataBundle, Optimization, Wrapped, build_data, build_model, build_optimization,
                             check_model_config, init_from_checkpoint, load_optimizer_state, prepare_model,
                             wrap_model)
from engine.config import Config, ConfigError, diff_configs, dump_config
from engine.data.errors import DataError
from engine.evaluation import AMP_DTYPES, evaluate, evaluate_checkpoint
from engine.data.loader import DevicePrefetcher
from engine.meter import Meter, MeterReading
from engine.preemption import Preemption
from engine.progress import Progress, log_line
from engine.runlock import RunDirInUseError, RunDirLock
from engine.summary import FILE_NAME as SUMMARY_NAME, RunSummary, provenance, read_summary

__all__ = ["fit", "Trainer", "TrainState", "evaluate", "evaluate_checkpoint", "build_model", "init_from_checkpoint",
           "NonFiniteLossError", "SimulatedKill", "StructureChangedError"]

# Config keys that define what the checkpoint's weights mean: a resume that changes one is refused.
STRUCTURAL_KEYS = ("model.name", "model.num_classes", "model.freq", "model.kwargs", "data.image_size", "data.crop")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf."""


class StructureChangedError(ConfigError):
    """Resuming would load weights into a model they were not trained as (same message on every rank)."""


class SimulatedKill(BaseException):
    """Raised by ``debug.kill_after_steps``: leave immediately, saving nothing (like SIGKILL).

    A BaseException so that no ``except Exception`` on the way out can swallow it."""


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


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_structure(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse resuming ``path`` (whose resolved config is ``saved``) under a config that changes what its weights
    mean (:data:`STRUCTURAL_KEYS`)."""
    now = cfg.to_dict()

    def get(d: dict, key: str) -> Any:
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    def same(key: str) -> bool:
        a, b = get(saved, key), get(now, key)
        if key == "model.freq" and a != b:  # null, 'top16' and its explicit (u, v) list are one selection
            from models.dct import parse_frequencies
            try:
                return [tuple(f) for f in parse_frequencies(a)] == [tuple(f) for f in parse_frequencies(b)]
            except (ValueError, TypeError):
                return False
        return a == b

    changed = [k for k in STRUCTURAL_KEYS if not same(k)]
    if changed:
        what = ", ".join(f"{k}={_short(get(saved, k))} (now {_short(get(now, k))})" for k in changed)
        raise StructureChangedError(
            f"cannot resume {path}: its weights were trained with {what}; to train these settings start a new run "
            "(another output_dir), or set them back to continue this one")


def write_config(run_dir: Path, text: str, log: Callable[[str], None] = print) -> None:
    """Write ``run_dir/config.yaml``, keeping a different earlier one as ``config.<n>.yaml`` (n = 1, 2, ...).

    The copy is written (atomically) before config.yaml is replaced (atomically), so at every moment
    config.yaml exists, and a failure (disk full, ...) is a one-line :class:`engine.fileio.WriteError`
    that leaves config.yaml as it was."""
    path = Path(run_dir) / "config.yaml"
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = None
    except OSError as e:
        raise fileio.WriteError(e.errno, f"cannot keep the previous {path}: [Errno {e.errno}] "
                                f"{os.strerror(e.errno) if e.errno else e}") from None
    if old is not None:
        n = 1 + max([int(p.name.split(".")[1]) for p in Path(run_dir).glob("config.*.yaml")
                     if p.name.split(".")[1].isdigit()], default=0)
        with fileio.atomic_open(Path(run_dir) / f"config.{n}.yaml", "wb") as f:
            f.write(old)
        log(f"config changed: the previous config.yaml is kept as config.{n}.yaml")
    fileio.atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything about the run's progress that a checkpoint must restore (besides weights, optimizer, RNG)."""
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
    """Holds a run's state and runs its loops; receives the built parts (see :func:`build_trainer`).

    Args:
        cfg: the resolved config.
        info: this process's place in the job (rank, world size, device).
        run_dir: the run directory (``cfg.output_dir``; checkpoints under ``run_dir/checkpoints``).
        data: loaders and the train sampler (:func:`engine.builders.build_data`).
        model: the bare model on its device (its ``state_dict`` is what checkpoints hold).
        optim: optimizer, scaler, loss and the lr function (:func:`engine.builders.build_optimization`).
        wrapped: the DDP / compiled modules the loops call (:func:`engine.builders.wrap_model`).
    """

    def __init__(self, cfg: Config, info: dist_lib.DistInfo, run_dir: Path, data: DataBundle, model: torch.nn.Module,
                 optim: Optimization, wrapped: Wrapped):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.data, self.model, self.optim, self.wrapped = data, model, optim, wrapped
        self.steps_per_epoch = data.steps_per_epoch
        self.state = TrainState()
        self.meter = Meter(self.device)
        self.stop_requested_any_rank = False  # the all-reduced stop request of the last sync point
        self.session_start = time.time()
        self.resumed_config: dict | None = None  # the resolved config the resumed checkpoint was trained with
        self._config_pending: str | None = None  # config.yaml text to write with this session's first checkpoint
        self._t0, self._images = time.time(), 0  # training time / images since the last accounting
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
        """Load a training checkpoint (already checked by :func:`check_structure`)."""
        if ckpt["steps_per_epoch"] != self.steps_per_epoch:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {path} was written with {ckpt['steps_per_epoch']} steps/epoch (world size "
                f"{ckpt['world_size']}); this launch has {self.steps_per_epoch}: resume with the same world size, "
                "train.batch_size and data")
        changed = diff_configs(ckpt["config"], self.cfg.to_dict())
        if changed:
            self.log(f"note: resuming with changed config keys: {', '.join(changed)}")
        self.model.load_state_dict(ckpt["model"])
        # its lr is set again before every step; its fused/foreach flags stay this machine's
        load_optimizer_state(self.optim.optimizer, ckpt["optimizer"])
        if self.optim.scaler.is_enabled() and ckpt["scaler"]:  # a bf16/off checkpoint has no scaler state
            self.optim.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        meters = ckpt.get("meter")
        if isinstance(meters, dict):  # older checkpoints kept rank 0's running sums only
            meters = [meters]
        if meters is not None and len(meters) == self.info.world_size:
            self.meter.load(meters[self.info.rank])  # this rank's running sums of the interrupted epoch
        rng = ckpt["rng"]
        if len(rng) == self.info.world_size:
            ckpt_lib.set_rng_state(rng[self.info.rank])
        else:
            self.log(f"warning: checkpoint has RNG states of {len(rng)} ranks, this run has {self.info.world_size}")
        self.resumed_config = ckpt["config"]
        if self.state.epoch >= self.cfg.train.epochs:
            return  # a finished run: fit() says so
        self.log(f"resumed from {path}: epoch {self.state.epoch + 1}, step {self.state.step_in_epoch}/"
                 f"{self.steps_per_epoch} (global step {self.state.global_step})")

    # -- run-directory files ----------------------------------------------------------------------------------
    def _write_config(self, text: str) -> None:
        write_config(self.run_dir, text, log=self.log)

    def _sync_config_file(self) -> None:
        """config.yaml must describe the weights beside it: a fresh run (or an unchanged config) writes it now;
        a resume with a changed config writes it with this session's first checkpoint, i.e. once training
        really continued under it (a relaunch that fails first leaves the old one in place)."""
        text = dump_config(self.cfg)
        try:
            current = (self.run_dir / "config.yaml").read_text()
        except (OSError, UnicodeDecodeError):
            current = None
        if current == text:
            return
        if self.resumed_config is None or not diff_configs(self.resumed_config, self.cfg.to_dict()):
            self._write_config(text)
        else:
            self._config_pending = text

    def _trim_metrics(self) -> None:
        """On resume, drop epoch rows a crashed session wrote after the checkpoint it left, and a torn last
        line (a crash or a full disk during the append)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        try:
            rows, torn = fileio.read_jsonl(path, warn=self.log)
        except ValueError as e:
            raise DataError(f"{e}; move the file aside to continue") from None
        keep = [r for r in rows if r.get("epoch", 0) <= self.state.epoch]
        if torn or len(keep) != len(rows):
            fileio.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

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
        }

    def save(self) -> None:
        """Write ``last.pth`` (collective: every rank contributes its RNG state; rank 0 writes)."""
        self.state.elapsed_s += time.time() - self.session_start
        self.session_start = time.time()
        obj = self._checkpoint()
        if self.info.is_main:
            ckpt_lib.save_last(obj, self.ckpt_dir)
            if self._config_pending is not None:
                self._write_config(self._config_pending)
                self._config_pending = None
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
        """Checkpoint where we are and report it; the process then exits 0 (a requeued job resumes here)."""
        st = self.state
        self._account()
        self.save()
        self.log(f"{preempt.name} received: checkpointed at epoch {st.epoch + 1} step {st.step_in_epoch}/"
                 f"{self.steps_per_epoch} (global step {st.global_step}); exiting for requeue")
        return {"status": "preempted"}

    def _debug_hooks(self) -> None:
        dbg, st = self.cfg.debug, self.state
        if dbg.kill_after_steps is not None and st.global_step >= dbg.kill_after_steps:
            raise SimulatedKill(f"debug.kill_after_steps: killed after global step {st.global_step}")
        if dbg.signal_after_steps is not None and st.global_step == dbg.signal_after_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    def _account(self) -> None:
        """Add the training time / images since the last call to the state (throughput figures)."""
        dt = time.time() - self._t0
        st = self.state
        st.epoch_time_s += dt
        st.train_time_s += dt
        st.epoch_images += self._images
        st.train_images += self._images
        self._t0, self._images = time.time(), 0

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
        try:
            # The next batch is copied and normalised on a side CUDA stream while this one trains.
            for x, y, skipped in DevicePrefetcher(self.data.train_loader, self.device, cfg.train.channels_last):
                self.train_step(x, y, skipped)
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
        finally:
            progress.close()
        self._account()
        return reading

    def _evaluate(self) -> dict:
        dist_lib.broadcast_buffers(self.model)  # every rank evaluates rank 0's BN statistics
        show = self.info.is_main and self.cfg.train.progress
        return evaluate(self.wrapped.eval_model, self.data.val_loader, self.device, self.cfg.train.amp,
                        self.cfg.train.channels_last, desc="eval" if show else None)

    def _end_epoch(self, train: MeterReading) -> None:
        """Evaluate (when due), log and record the epoch, move the state to the next epoch, checkpoint."""
        cfg, st = self.cfg, self.state
        last_epoch = st.epoch + 1 == cfg.train.epochs
        row = {"epoch": st.epoch + 1, "global_step": st.global_step, "train_loss": train.loss,
               "train_top1": train.top1, "lr": self._last_lr(),
               "img_per_s": st.epoch_images / max(st.epoch_time_s, 1e-9), "epoch_time_s": st.epoch_time_s,
               "train_skipped": train.skipped}
        improved = False
        if (st.epoch + 1) % cfg.train.eval_every_epochs == 0 or last_epoch:
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
            n = torch.tensor([float(sum(fallback_counts(reset=True).values()))], device=self.device)
            row["cpu_decoded"] = int(dist_lib.all_reduce_sum(n).item())
        val_text = (f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f} top5 {row['val_top5']:.2f} "
                    f"({row['val_count']} images) | " if "val_top1" in row else "")
        self.log(f"epoch {st.epoch + 1}/{cfg.train.epochs}: train loss {row['train_loss']:.4f} top1 "
                 f"{row['train_top1']:.2f} | {val_text}lr {row['lr']:.4g} | {row['img_per_s']:.1f} img/s | "
                 f"{row['epoch_time_s']:.1f} s")
        if self.info.is_main:
            fileio.append_line(self.run_dir / "metrics.jsonl", json.dumps(row))
            if self.writer is not None:
                for k, v in row.items():
                    if k not in ("epoch", "global_step"):
                        self.writer.add_scalar(f"epoch/{k}", v, st.epoch + 1)
                self.writer.flush()
        st.epoch += 1
        st.step_in_epoch, st.epoch_time_s, st.epoch_images = 0, 0.0, 0
        self.meter.reset()
        if improved:
            self._save_best()
        self.save()

    def fit(self, preempt: Preemption) -> dict:
        """Train to ``train.epochs``; returns the summary, or ``{"status": "preempted"}``."""
        cfg, st = self.cfg, self.state
        if st.epoch >= cfg.train.epochs:
            return self.already_complete()
        if self.info.is_main:
            self._sync_config_file()
            self._trim_metrics()
            if cfg.train.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step drops events a crashed session logged after the checkpoint we resume from.
                self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=st.global_step or None)
        self.log("start training")
        while st.epoch < cfg.train.epochs:
            # Under DDP only the all-reduced request is used, so that every rank stops at the same point.
            if preempt.requested if not self.info.distributed else self.stop_requested_any_rank:
                return self.preemption_exit(preempt)
            train = self.train_one_epoch(preempt)
            if train is None:
                return {"status": "preempted"}
            self._end_epoch(train)
        summary = self.summary()
        if self.info.is_main:
            fileio.atomic_write_text(self.run_dir / SUMMARY_NAME, summary.to_json())
            self.log(f"done: best top1 {summary.best_top1:.2f} (epoch {summary.best_epoch}), final top1 "
                     f"{summary.final_top1:.2f} top5 {summary.final_top5:.2f}; summary in "
                     f"{self.run_dir / SUMMARY_NAME}")
        return summary.to_dict()

    def already_complete(self) -> dict:
        """A rerun of a finished run trains nothing: say so, and how to train again. A missing or unreadable
        summary.json is written again from the checkpoint."""
        st, cfg = self.state, self.cfg
        saved = read_summary(self.run_dir)
        if saved is None:
            summary = self.summary(include_session=False)
            if self.info.is_main:
                fileio.atomic_write_text(self.run_dir / SUMMARY_NAME, summary.to_json())
                self.log(f"warning: {self.run_dir / SUMMARY_NAME} was missing or unreadable: written again from "
                         "the last checkpoint")
            saved = summary.to_dict()
        final = st.last_val.get("top1")
        self.log(f"already complete: {self.run_dir} has trained {st.epoch}/{cfg.train.epochs} epochs (best top1 "
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
            train_img_per_s=st.train_images / max(st.train_time_s, 1e-9), wall_time_s=wall,
            gpu_hours=wall * gpus / 3600.0, world_size=self.info.world_size,
            device=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            global_batch=self.global_batch, peak_lr=self.optim.schedule.peak_lr, git_commit=git_commit(),
            output_dir=str(self.run_dir), **provenance())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ----------------------------------------------------------------------------------------------------------------

def check_config(cfg: Config, info: dist_lib.DistInfo) -> None:
    """Everything that can refuse ``cfg`` on this machine before the run directory is touched: the model
    options, the device, and for ``data.pipeline: gpu`` a working nvjpeg (one-line ConfigError each)."""
    check_model_config(cfg)
    check_device(cfg, info)
    if cfg.data.pipeline == "gpu":
        from engine.data.gpu_decode import check_available
        check_available()


def check_device(cfg: Config, info: dist_lib.DistInfo) -> None:
    t = cfg.train
    if t.amp == "fp16" and info.device.type != "cuda":
        raise ConfigError("config key 'train.amp': fp16 (with GradScaler) needs a CUDA device; use bf16 or off on CPU")
    if t.sync_bn and info.distributed and info.device.type != "cuda":
        raise ConfigError("config key 'train.sync_bn': SyncBatchNorm needs CUDA devices; "
                          "set train.sync_bn=false on CPU")


def find_checkpoint(run_dir: Path, resume: str | None, info: dist_lib.DistInfo,
                    log: Callable[[str], None]) -> tuple[dict, Path] | None:
    """The checkpoint to resume: ``--resume``'s, else the run directory's newest usable one, else None."""
    if resume is not None:
        return ckpt_lib.load_checkpoint(resume), Path(resume)
    return ckpt_lib.find_resumable(run_dir / "checkpoints", log=log, quarantine=info.is_main)


def build_trainer(cfg: Config, info: dist_lib.DistInfo, resume: str | None = None) -> Trainer:
    """Find the checkpoint to resume, build data / model / optimization / wrapping, and restore the
    checkpoint into a :class:`Trainer` (``cfg`` already checked by :func:`check_config`). Nothing in the run
    directory is written here."""
    log = log_line if info.is_main else (lambda msg: None)
    if info.device.type == "cpu" and cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    run_dir = Path(cfg.output_dir)
    log(f"run directory: {run_dir.resolve()}")
    found = find_checkpoint(run_dir, resume, info, log)
    if found is not None:
        check_structure(found[0]["config"], cfg, found[1])

    data = build_data(cfg, info)
    log(f"data: {cfg.data.source} train {data.train_size} images, val {data.val_size} images; "
        f"{data.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs")
    model = prepare_model(cfg, info, init_checkpoint=found is None, log=log)
    optim = build_optimization(cfg, model, info, data.steps_per_epoch)
    log(f"lr = base_lr {cfg.optim.base_lr:g} x global batch {cfg.train.batch_size * info.world_size} / 256 = "
        f"{optim.schedule.peak_lr:g} (warmup {cfg.train.warmup_epochs:g} epochs, then cosine to 0)")
    wrapped = wrap_model(cfg, model, info)
    trainer = Trainer(cfg, info, run_dir, data, model, optim, wrapped)
    if found is not None:
        trainer.resume_from(*found)
    return trainer


def _own_run_dir(cfg: Config, info: dist_lib.DistInfo) -> RunDirLock | None:
    """Rank 0 takes the run directory's lock and removes partial files an interrupted write left; every rank
    learns whether that worked (and fails with the same message if not)."""
    lock, error = None, None
    if info.is_main:
        lock = RunDirLock(cfg.output_dir, log=log_line)
        try:
            lock.acquire()
            for folder in (Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"):
                fileio.remove_temp_files(folder, log=log_line)
        except ConfigError as e:
            lock, error = None, str(e)
    error = dist_lib.broadcast_object(error)
    if error is not None:
        raise RunDirInUseError(error)
    return lock


def fit(cfg: Config, resume: str | None = None) -> dict:
    """Train ``cfg`` in ``cfg.output_dir`` (auto-resuming from its checkpoints); returns the summary
    (``{"status": "preempted"}`` if a SIGTERM/SIGUSR1 stopped it after checkpointing)."""
    info = dist_lib.init_distributed()
    trainer, lock = None, None
    # The handlers stay installed through the clean-up too: a SIGTERM then (torchrun stopping the workers after
    # one failed) must not kill this process before it has printed its one line.
    with Preemption() as preempt:
        try:
            check_config(cfg, info)  # a refused config leaves no run directory behind
            lock = _own_run_dir(cfg, info)
            trainer = build_trainer(cfg, info, resume)
            return trainer.fit(preempt)
        finally:
            if trainer is not None:
                trainer.close()
            if lock is not None:
                lock.release()
            dist_lib.cleanup()
