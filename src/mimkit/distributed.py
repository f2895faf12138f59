"""One device or many: torchrun's environment variables switch DDP on; without them nothing changes."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"run.device={pref!r} but no CUDA device is available; use run.device=cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); NCCL on GPUs, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # a group still alive when the interpreter exits can abort the process ("terminate called
        # without an active exception"): the group we made is closed at exit, whoever calls us
        atexit.register(cleanup)
    return DistEnv(rank, world_size, local_rank, device)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_object(obj: object, env: DistEnv) -> object:
    """Rank 0's object, on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_flag(flag: bool, env: DistEnv) -> bool:
    """Rank 0's decision, on every rank (for actions all ranks must take together)."""
    return bool(broadcast_object(flag, env))


def max_over_ranks(values: torch.Tensor, env: DistEnv) -> list[int]:
    """The element-wise maximum of an integer vector over the ranks, as Python ints; one host sync."""
    if env.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [int(v) for v in values.tolist()]


def all_reduce_max(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The element-wise maximum over the ranks, left on the device: NCCL queues it on the stream, so the
    host does not wait (gloo, on the CPU, does)."""
    if env.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def gather_objects(obj: object, env: DistEnv) -> list[object]:
    if not env.enabled:
        return [obj]
    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate every rank's [n_r, ...] tensor (n_r may differ) along dim 0, rank by rank."""
    if not env.enabled:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(env.world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


EXIT_BARRIER = timedelta(seconds=10)  # how long a rank waits at exit for the others before closing anyway


def cleanup() -> None:
    """Close the process group while the interpreter is whole. Work objects that gloo's threads still hold
    (in reference cycles not yet collected) are freed first, and on the CPU the ranks meet before any of
    them closes its connections: a rank that closes while another still talks to it, or tensors freed
    during interpreter teardown, abort the process at exit. A rank that is gone is waited for at most
    ``EXIT_BARRIER``."""
    if not dist.is_initialized():
        return
    gc.collect()
    if dist.get_backend() == "gloo":
        with contextlib.suppress(RuntimeError):  # another rank failed or left: close without it
            dist.monitored_barrier(timeout=EXIT_BARRIER)
    dist.destroy_process_group()
