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
import threading
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


_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))


def _await_parent_stop(parent: int) -> None:
    """A worker's signal thread: take the blocked stop signals; exit at once on a SIGTERM from the parent
    process (``Process.terminate``: multiprocessing's exit hook or the DataLoader's shut-down), ignore the rest
    (Slurm, ``scancel``, ``kill`` of the job's processes)."""
    while True:
        info = signal.sigwaitinfo(set(_STOP_SIGNALS))
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


def _worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader built here: the stop signals of a preemption must not kill the
    workers, yet the parent must always be able to stop them.

    Slurm sends SIGTERM/SIGUSR1 to every process of the job step, workers included. A worker dying of it would
    make the main process raise "DataLoader worker killed" before it can checkpoint; the trainer handles the
    signal. But multiprocessing stops its daemon children with SIGTERM at interpreter exit and then joins them
    without a timeout: a worker that ignored every SIGTERM hung the process forever after an error. So on Linux
    the stop signals are blocked and a thread takes them (``sigwaitinfo`` tells the sender): SIGTERM from the
    parent ends the worker, any other is ignored. Elsewhere they are ignored; a worker then still exits when
    its parent has gone (PyTorch's watchdog) or its shut-down is asked for (:func:`shutdown_workers`)."""
    if hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
        # Blocked before any other thread starts: threads created later inherit the mask, so only the signal
        # thread ever receives these signals.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        threading.Thread(target=_await_parent_stop, args=(os.getppid(),), name="worker-stop-signals",
                         daemon=True).start()
    else:  # pragma: no cover - not Linux
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def shutdown_workers(loader: Any) -> None:
    """Stop ``loader``'s persistent worker processes now (no-op without workers). For the error paths: a
    persistent iterator is otherwise only shut down when the DataLoader is garbage-collected, which at
    interpreter exit PyTorch skips, leaving the workers to multiprocessing's exit hook."""
    it = getattr(loader, "_iterator", None)
    if it is not None:
        loader._iterator = None
        stop = getattr(it, "_shutdown_workers", None)
        if stop is not None:
            stop()


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
                      worker_init_fn=_worker_init)
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
