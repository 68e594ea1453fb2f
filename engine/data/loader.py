"""DataLoader construction for the training and evaluation loops.

* :func:`default_workers`: worker processes per training process, from the CPUs this process may run on
  (``os.sched_getaffinity``) shared among the processes of one node.
* :func:`build_dataloader`: a ``DataLoader`` with the settings that keep the input pipeline off the critical
  path: ``pin_memory`` only when the target device is CUDA, persistent workers, a deeper prefetch queue,
  one intra-op thread per worker (PyTorch's default in workers). The trainer's entry point,
  :func:`engine.data.make_loader`, adds its batch samplers and collate function.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.data.transforms import to_model_input

DEFAULT_PREFETCH_FACTOR = 4


def available_cpus() -> int:
    """CPUs this process may run on (affinity mask, e.g. a SLURM/cgroup allocation), else ``os.cpu_count``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_workers(local_world_size: int = 1) -> int:
    """Worker processes per training process: the node's CPUs split among its ``local_world_size`` processes,
    keeping one CPU per process for the main (training) process."""
    if local_world_size < 1:
        raise ValueError(f"local_world_size must be >= 1, got {local_world_size}")
    return max(1, available_cpus() // local_world_size - 1)


def _ignore_preemption_signals(worker_id: int) -> None:
    """Slurm sends SIGTERM/SIGUSR1 to every process of the job step, and a terminal's Ctrl-C sends SIGINT to
    every process of the foreground group, workers included. A worker dying of it would make the main process
    raise "DataLoader worker killed" before it can checkpoint; the trainer handles the signal, and workers
    still exit when their parent does (PyTorch's watchdog)."""
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def build_dataloader(dataset: Dataset, batch_size: Optional[int] = None, sampler: Optional[Sampler] = None,
                workers: Optional[int] = None, device: Any = "cpu", *, shuffle: bool = False,
                drop_last: bool = False, prefetch_factor: int = DEFAULT_PREFETCH_FACTOR,
                collate_fn: Optional[Callable] = None, local_world_size: int = 1,
                batch_sampler: Optional[Sampler] = None) -> DataLoader:
    """Build the DataLoader for ``dataset``: either ``batch_size`` (+ ``sampler``/``shuffle``) or a
    ``batch_sampler`` that yields whole batches (the trainer's resumable and exact-eval samplers).

    ``workers=None`` picks :func:`default_workers`. ``pin_memory`` is on only for a CUDA ``device`` (pinned
    host memory makes the non-blocking uint8 copy in :func:`to_model_input` truly asynchronous); with
    workers, they persist across epochs and each keeps ``prefetch_factor`` batches in flight (one intra-op
    thread each, PyTorch's default in workers).
    """
    if (batch_size is None) == (batch_sampler is None):
        raise ValueError("pass exactly one of batch_size and batch_sampler")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers is None:
        workers = default_workers(local_world_size)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if sampler is not None and shuffle:
        raise ValueError("pass either a sampler or shuffle=True, not both")
    if prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
    device = torch.device(device)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor,  # workers run 1 thread each
                      worker_init_fn=_ignore_preemption_signals)
    if batch_sampler is not None:
        kwargs["batch_sampler"] = batch_sampler
    else:
        kwargs.update(batch_size=batch_size, sampler=sampler, shuffle=shuffle, drop_last=drop_last)
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda" and torch.cuda.is_available(),
                      collate_fn=collate_fn, **kwargs)


class DevicePrefetcher:
    """Iterate ``(images, targets)`` batches of ``loader`` as model-ready tensors on ``device``.

    On CUDA the copy and uint8 -> normalized float conversion of the next batch run on a side stream, and
    the consumer stream waits on an event; tensors are marked with ``record_stream`` so the caching
    allocator does not reuse them early. For tensor batches (the ``fast`` and ``torchvision`` pipelines) the
    host never waits on the GPU. The ``gpu`` pipeline's batches are not asynchronous: their nvjpeg decode
    (:func:`engine.gpu_decode.nvjpeg_decode`) first drains the side stream and then decodes, blocking the
    host while the previous batch's kernels run. Elsewhere batches are converted synchronously. Extra items
    of a batch (e.g. indices) are moved to the device unchanged.
    """

    def __init__(self, loader: Any, device: Any, channels_last: bool = False):
        self.loader, self.device, self.channels_last = loader, torch.device(device), channels_last
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()

    def __len__(self) -> int:
        return len(self.loader)

    def _convert(self, batch: Any) -> Any:
        images, *rest = batch
        if images is not None:  # None: a batch whose files were all skipped as corrupt (engine.data.collate)
            images = to_model_input(images, self.device, self.channels_last)
        rest = [r.to(self.device, non_blocking=True) if torch.is_tensor(r) else r for r in rest]
        return (images, *rest)

    def __iter__(self) -> Iterator[Any]:
        if not self._cuda:
            for batch in self.loader:
                yield self._convert(batch)
            return
        stream = torch.cuda.Stream(device=self.device)
        it = iter(self.loader)

        def preload():
            try:
                batch = next(it)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                out = self._convert(batch)
            event = torch.cuda.Event()
            event.record(stream)
            return out, event

        nxt = preload()
        while nxt is not None:
            out, event = nxt
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in out:
                if torch.is_tensor(t):
                    t.record_stream(current)
            nxt = preload()
            yield out
