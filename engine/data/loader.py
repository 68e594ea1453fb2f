"""DataLoader construction for the training and evaluation loops.

* :func:`default_workers`: worker processes per training process, from the CPUs this process may run on
  (``os.sched_getaffinity``) shared among the processes of one node.
* :func:`build_dataloader`: a ``DataLoader`` with the settings that keep the input pipeline off the critical
  path: ``pin_memory`` only when the target device is CUDA, persistent workers, a deeper prefetch queue,
  one intra-op thread per worker (PyTorch's default in workers). The trainer's entry point,
  :func:`engine.data.make_loader`, adds its batch samplers and collate function. Its workers survive a
  preemption's SIGTERM but end on their parent's (:func:`_worker_init`).
* :func:`shutdown_workers`: stop a loader's persistent workers (every way out of the trainer and evaluator).
* :class:`DevicePrefetcher`: batches as model-ready device tensors, the next ones prepared while the current
  one trains (a side CUDA stream; for the ``gpu`` pipeline a decode thread).
"""
from __future__ import annotations

import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.data import gpu_decode
from engine.data.transforms import to_model_input

DEFAULT_PREFETCH_FACTOR = 4
STOP_WAIT_S = 60.0  # how long leaving a DevicePrefetcher loop early waits for its decode thread


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


# SIGINT too: a terminal's Ctrl-C reaches every process of the foreground group, workers included.
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, n))


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
    """Iterate ``(images, targets, skipped)`` batches of ``loader`` as model-ready tensors on ``device``.

    Tensor batches (the ``fast`` and ``torchvision`` pipelines): on CUDA the copy and uint8 -> normalized float
    conversion of the next batch run on a side stream, and the consumer stream waits on an event; tensors are
    marked with ``record_stream`` so the caching allocator does not reuse them early. The host never waits on
    the GPU. Elsewhere batches are converted synchronously.

    ``gpu`` pipeline batches (:class:`engine.data.gpu_decode.EncodedBatch`) are decoded off the critical path:
    a dedicated thread takes them from the loader in order, decodes, crops and normalizes each on its own
    CUDA stream (:func:`engine.data.gpu_decode.decode_batch`; nvjpeg and the other torch ops release the GIL
    while they run), records an event and queues the result, up to ``depth`` batches ahead; the consumer
    stream waits on the batch's event. So the training step is enqueued while the next batches decode. An
    error in the thread (a corrupt file, a failing GPU) is raised in the consumer at that batch's turn; leaving
    the loop early (an error, a preemption) stops the thread and waits for it. Files dropped by
    ``data.skip_corrupt`` during the decode (the loader's dataset's ``skip_corrupt``) leave the batch with their
    labels and are added to ``skipped``. ``decode`` replaces nvjpeg's batched call (tests: a CPU decoder).

    Extra items of a batch (e.g. indices) are moved to the device unchanged. :attr:`stats` accumulates the
    seconds the consumer waited for batches (``wait_s``) and, for ``gpu`` batches, the decode thread's host
    time (``decode_s``) over ``batches``.
    """

    def __init__(self, loader: Any, device: Any, channels_last: bool = False, depth: int = 2,
                 decode: Optional[Callable] = None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader, self.device, self.channels_last = loader, torch.device(device), channels_last
        self.depth, self.decode = depth, decode
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.skip_corrupt = bool(getattr(getattr(loader, "dataset", None), "skip_corrupt", False))
        self.stats = {"batches": 0, "wait_s": 0.0, "decode_s": 0.0}

    def __len__(self) -> int:
        return len(self.loader)

    def _convert(self, batch: Any) -> Any:
        images, *rest = batch
        if images is not None:  # None: a batch whose files were all skipped as corrupt (engine.data.collate)
            images = to_model_input(images, self.device, self.channels_last)
        rest = [r.to(self.device, non_blocking=True) if torch.is_tensor(r) else r for r in rest]
        return (images, *rest)

    def _decode(self, batch: Any) -> Any:
        """A ``gpu`` pipeline batch ``(EncodedBatch, targets, skipped, ...)`` -> model-ready tensors."""
        images, targets, skipped, *more = batch
        if images is None:  # every file of the batch was skipped in the workers (data.skip_corrupt)
            return batch
        result = gpu_decode.decode_batch(images, self.device, self.channels_last, decode=self.decode,
                                         skip_corrupt=self.skip_corrupt)
        targets = targets.to(self.device, non_blocking=True)
        if result.images is None:
            targets = None
        elif result.kept is not None:
            targets = targets.index_select(0, result.kept)
        more = [r.to(self.device, non_blocking=True) if torch.is_tensor(r) else r for r in more]
        return (result.images, targets, skipped + result.dropped, *more)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        t0 = time.perf_counter()
        try:
            first = next(it)
        except StopIteration:
            return
        self.stats["wait_s"] += time.perf_counter() - t0
        dataset = getattr(self.loader, "dataset", None)
        if isinstance(first[0], gpu_decode.EncodedBatch) or isinstance(getattr(dataset, "transform", None),
                                                                        gpu_decode.GpuTransform):
            yield from self._threaded(first, it)
        elif self._cuda:
            yield from self._side_stream(first, it)
        else:
            batch = first
            while True:
                self.stats["batches"] += 1
                yield self._convert(batch)
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                finally:
                    self.stats["wait_s"] += time.perf_counter() - t0

    def _side_stream(self, first: Any, it: Iterator) -> Iterator[Any]:
        stream = torch.cuda.Stream(device=self.device)

        def preload(batch):
            with torch.cuda.stream(stream):
                out = self._convert(batch)
            event = torch.cuda.Event()
            event.record(stream)
            return out, event

        nxt = preload(first)
        while nxt is not None:
            out, event = nxt
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in out:
                if torch.is_tensor(t):
                    t.record_stream(current)
            t0 = time.perf_counter()
            try:
                nxt = preload(next(it))
            except StopIteration:
                nxt = None
            self.stats["wait_s"] += time.perf_counter() - t0
            self.stats["batches"] += 1
            yield out

    def _threaded(self, first: Any, it: Iterator) -> Iterator[Any]:
        """The decode thread and its queue (see the class docstring)."""
        results: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        cuda = self._cuda
        stream = torch.cuda.Stream(device=self.device) if cuda else None

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                if cuda:
                    torch.cuda.set_device(self.device)  # the current device is per thread
                batch = first
                while not stop.is_set():
                    t0 = time.perf_counter()
                    if cuda:
                        with torch.cuda.stream(stream):
                            # torchvision's decode writes its outputs (allocated on this stream) on its own
                            # stream without waiting on this one: blocks the previous batch freed may still be
                            # read by kernels queued here. Draining this stream first makes the reuse safe; it
                            # blocks only this thread.
                            stream.synchronize()
                            out = self._decode(batch)
                            event = torch.cuda.Event()
                            event.record(stream)
                    else:
                        out, event = self._decode(batch), None
                    self.stats["decode_s"] += time.perf_counter() - t0
                    if not put(("batch", out, event)):
                        return
                    try:
                        batch = next(it)
                    except StopIteration:
                        put(("end", None, None))
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                put(("error", e, None))

        def run() -> None:
            with torch.no_grad():  # grad mode is per thread; nothing here needs autograd
                produce()

        thread = threading.Thread(target=run, name="gpu-decode", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                kind, out, event = results.get()
                self.stats["wait_s"] += time.perf_counter() - t0
                if kind == "end":
                    return
                if kind == "error":
                    raise out
                if cuda:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in out:
                        if torch.is_tensor(t):
                            t.record_stream(current)
                self.stats["batches"] += 1
                yield out
        finally:
            stop.set()
            # Unblock a pending put and let the thread see the stop. It may be waiting for the loader's next
            # batch (the DataLoader detects dead workers itself); past STOP_WAIT_S it is left to finish alone
            # (a daemon thread: it never holds the process).
            deadline = time.monotonic() + STOP_WAIT_S
            while thread.is_alive() and time.monotonic() < deadline:
                try:
                    results.get(timeout=0.05)
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)
