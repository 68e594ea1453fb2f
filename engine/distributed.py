"""Process-group setup for ``python`` (1 process) and ``torchrun`` (DDP) launches."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from collections.abc import Callable

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_min: float = 30.0) -> DistInfo:
    """Read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and join the group.

    nccl on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU. A plain ``python`` launch is
    world size 1 without a process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min), **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj):
    """List of ``obj`` from every rank (``[obj]`` without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BN running statistics) to every rank, so that evaluation and the saved
    checkpoint (rank 0's) agree (DDP only syncs buffers at the start of a training forward)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src)


# ---------------------------------------------------------------------------------------------------------------
# Which rank failed: when one rank stops on an error, the others only see a broken collective. The failing rank
# records its rank in the job's key-value store (torchrun's agent hosts it at MASTER_ADDR:MASTER_PORT and
# outlives every worker), so that the others can say "stopped: rank R failed" instead of a gloo/NCCL traceback.

def _failure_key() -> str:
    return (f"fcanet/failed_rank/{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")


def _job_store(timeout_s: float) -> dist.TCPStore | None:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except (RuntimeError, ValueError, OSError):  # the store is gone (its host process ended)
        return None


def announce_failure(rank: int) -> None:
    """Record that ``rank`` stopped on an error (best effort; the first failing rank wins)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    store = _job_store(timeout_s=5.0)
    if store is None:
        return
    with contextlib.suppress(RuntimeError, ValueError, OSError):
        store.compare_set(_failure_key(), "", str(rank))


def failed_rank(wait_s: float = 3.0) -> int | None:
    """The rank recorded by :func:`announce_failure` in this job, or None (none recorded, or no store)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    store = _job_store(timeout_s=5.0)
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([_failure_key()]):
                return int(store.get(_failure_key()).decode())
        except (RuntimeError, ValueError, OSError):
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


class FailureWatch:
    """A daemon thread that ends this rank as soon as another rank announced a failure.

    The main thread may be blocked inside a collective (NCCL waits in a CUDA kernel, where no Python signal
    handler runs) until the process-group timeout; this thread is not. ``on_failure(rank)`` is called once
    (it prints the line and ends the process).

    Args:
        rank: this process's rank (its own announcement is ignored).
        on_failure: called with the failed rank.
        interval_s: polling period of the job's store.
    """

    def __init__(self, rank: int, on_failure: Callable[[int], None], interval_s: float = 1.0):
        self.rank, self.on_failure, self.interval_s = rank, on_failure, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fcanet-failure-watch", daemon=True)

    def start(self) -> FailureWatch:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("MASTER_ADDR"):
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        store = None
        while not self._stop.wait(self.interval_s):
            if store is None:
                store = _job_store(timeout_s=2.0)  # None until the store is up (rank 0 may host it)
                continue
            try:
                if not store.check([_failure_key()]):
                    continue
                failed = int(store.get(_failure_key()).decode())
            except (RuntimeError, ValueError, OSError):
                store = None  # the store went away (the job is ending): try again, quietly
                continue
            if failed != self.rank:
                self.on_failure(failed)
                return
