"""Process-group helpers for runs launched by `torchrun` (one process per GPU, or per CPU slot).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process it starts;
a plain `ghindex ...` has none of them and everything here degrades to a single process (rank 0 of
1, barriers and gathers do nothing). `setup()` joins the group (NCCL for CUDA devices, gloo for the
CPU); CPU-side collectives (small counters, Python objects, cached CPU features) always run over a
gloo group, so they work the same whichever backend carries the gradients.

Failure model: when one process dies, torchrun's agent stops the others (they may be waiting in a
collective that will never complete), so nothing here needs timeouts of its own beyond the group's.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from typing import Any, Iterator

import torch

_cpu_group = None  # gloo group for CPU collectives when the default group is NCCL (else None = default)
_created = False   # whether setup() created the default group (and so teardown() may destroy it)


def world_size() -> int:
    """Processes in the run: the process group's size once set up, else WORLD_SIZE (1 without torchrun)."""
    if _initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    if _initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """Rank on this machine: the index of this process's GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    """Launched as one of several processes (torchrun with WORLD_SIZE > 1)?"""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the one process that writes logs, checkpoints and outputs."""
    return rank() == 0


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def device_for_rank(device: torch.device) -> torch.device:
    """Under torchrun a CUDA device means this process's own GPU, cuda:LOCAL_RANK."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def setup(device: torch.device | None = None, backend: str | None = None,
          timeout: datetime.timedelta | None = None) -> bool:
    """Join the process group if launched by torchrun with WORLD_SIZE > 1 (no-op otherwise or when
    already joined). Backend: NCCL when `device` is CUDA, else gloo. Returns whether a group is up.

    The group is destroyed at exit (only if this call created it)."""
    global _cpu_group, _created
    if not is_distributed():
        return False
    if _initialized():
        return True
    if backend is None:
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    kwargs = {"timeout": timeout} if timeout is not None else {}
    torch.distributed.init_process_group(backend=backend, **kwargs)
    _created = True
    _cpu_group = torch.distributed.new_group(backend="gloo", **kwargs) if backend != "gloo" else None
    atexit.register(teardown)
    return True


def teardown() -> None:
    """Leave the process group (if `setup` created it)."""
    global _cpu_group, _created
    if _created and _initialized():
        # leave together: a rank that destroyed the group while rank 0 was still saving aborted ("terminate
        # called without an active exception") in some two-rank CPU runs; a rank that died is waited for 60 s
        with contextlib.suppress(Exception):
            torch.distributed.monitored_barrier(group=_cpu_group, timeout=datetime.timedelta(seconds=60))
        torch.distributed.destroy_process_group()
    _cpu_group, _created = None, False


def barrier() -> None:
    """Wait until every process gets here (CPU group; nothing to wait for in a single process)."""
    if _initialized() and world_size() > 1:
        torch.distributed.barrier(group=_cpu_group)


@contextlib.contextmanager
def rank0_first() -> Iterator[bool]:
    """Rank 0 runs the block first (e.g. writes a file), the others wait and then run it (e.g. read
    it). Yields whether this process is rank 0."""
    if not is_main():
        barrier()
    yield is_main()
    if is_main():
        barrier()


def shard_range(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """Contiguous slice [start, stop) of n items for process `index` of `count` (default: this one);
    sizes differ by at most one, earlier ranks take the extra items."""
    index = rank() if index is None else index
    count = world_size() if count is None else count
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes of a CPU tensor (returned; the input is not changed)."""
    t = t.detach().cpu().clone()
    if _initialized() and world_size() > 1:
        torch.distributed.all_reduce(t, group=_cpu_group)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a CPU tensor's rows from every process in rank order (row counts may differ)."""
    if not (_initialized() and world_size() > 1):
        return t
    t = t.detach().cpu().contiguous()
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size())]
    torch.distributed.all_gather(counts, torch.tensor([t.shape[0]], dtype=torch.int64), group=_cpu_group)
    counts = [int(c) for c in counts]
    longest = max(counts)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded, group=_cpu_group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, in rank order ([obj] in a single process)."""
    if not (_initialized() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj, group=_cpu_group)
    return out
