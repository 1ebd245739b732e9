"""Several processes training one run: torch.distributed set-up, and how batches reach the ranks.

A run is distributed when torchrun (or `--slurm`, through submitit's TorchDistributedEnvironment)
starts it: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are in the environment. The
backend follows the device, nccl on GPUs and gloo on the CPU, and each rank takes the GPU of its
local rank. A single process (no WORLD_SIZE, or 1) opens no process group, and every collective
of `Ranks` is then a local no-op, so the trainer has one code path.

Every rank must train on the same batches in the same order. Two ways give them that: rank 0
reads each batch and broadcasts it (`broadcast`: one read, one copy over the interconnect per
rank), or each rank reads the same deterministic stream of the shuffled loader (`each`: no
communication, but the reading and gathering is repeated on every rank). docs/scaling.md has
the measured figures; `auto` picks broadcast for nccl and each for gloo.
"""

import contextlib
import dataclasses
import datetime
import inspect
import itertools
import os
import typing

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from saev.helpers import resolve_device
from saev.shards.shuffled import ShuffledLoader

# Ranks wait for each other at checkpoints and at the end of a pass; a slower rank (a less even
# split, a busier GPU) can keep the others waiting for minutes, which is not a hang.
TIMEOUT = datetime.timedelta(hours=2)

Read = typing.Literal["broadcast", "each"]


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run, and the collectives the trainer needs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    """nccl or gloo; None for a single process (no process group)."""
    device: torch.device = torch.device("cpu")
    """This rank's device (collectives of nccl need their tensors on it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def read_mode(self, requested: str) -> Read:
        """How batches reach the ranks: the requested mode, or for auto the backend's."""
        if requested != "auto":
            return typing.cast(Read, requested)
        return "broadcast" if self.backend == "nccl" else "each"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather(self, obj: typing.Any) -> list[typing.Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[typing.Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` copied into `t` on every rank (in place); returns `t`."""
        if self.distributed:
            dist.broadcast(t, src=0)
        return t

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`t` reduced over the ranks (sum, min or max), in place; returns `t`."""
        if self.distributed:
            ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
            dist.all_reduce(t, op=ops[op])
        return t


@contextlib.contextmanager
def start(device_flag: str) -> typing.Iterator[Ranks]:
    """The process group of this launch (if any) for the duration of the block."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_flag)
    if world <= 1:
        yield Ranks(device=device)
        return
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        # One GPU per rank. Slurm may show each task all GPUs of its node or only its own.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield Ranks(rank, world, local_rank, backend, device)
    finally:
        if owned:
            dist.destroy_process_group()


def init_sample(
    loader: ShuffledLoader, n: int, seed: int, ranks: Ranks, mode: Read
) -> torch.Tensor:
    """The seeded init sample on this rank's device: read by each rank, or by rank 0 and sent."""
    if mode == "each" or not ranks.distributed:
        return loader.sample(n, seed=seed).to(ranks.device)
    x = loader.sample(n, seed=seed).to(ranks.device) if ranks.is_main else None
    shape = [list(x.shape) if x is not None else None]
    dist.broadcast_object_list(shape, src=0)
    if x is None:
        x = torch.empty(shape[0], device=ranks.device)
    return ranks.broadcast_(x)


def batches(
    loader: ShuffledLoader, start: int, ranks: Ranks, mode: Read, *, needed: bool = True
) -> typing.Iterator[torch.Tensor | None]:
    """The pass's batches from token `start` on, [batch, d_vit] on this rank's device.

    The stream is endless (epochs repeat); the caller stops it. With mode `each`, a rank that
    trains no member of the pass (`needed=False`) reads nothing and gets None per step.
    """
    if mode == "each" or not ranks.distributed:
        if not needed:
            yield from itertools.repeat(None)
            return
        it = loader.batches(start=start)
        try:
            for x in it:
                yield x.to(ranks.device, non_blocking=True)
        finally:
            it.close()
        return
    shape = (loader.batch_size, loader.shards.md.d_vit)
    it = loader.batches(start=start) if ranks.is_main else None
    try:
        while True:
            if it is not None:
                x = next(it).to(ranks.device, non_blocking=True)
            else:
                x = torch.empty(shape, device=ranks.device)
            yield ranks.broadcast_(x)
    finally:
        if it is not None:
            it.close()


def data_parallel(stack: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """`stack` under DDP: its gradients averaged over the ranks during the backward pass.

    Buffers are not broadcast by DDP (that would keep rank 0's dead-latent counters only);
    `sync_buffers` combines them after each step instead."""
    ids = [ranks.device] if ranks.device.type == "cuda" else None
    # torch 2.14 renamed broadcast_buffers (now deprecated) to forward_sync_buffers.
    params = inspect.signature(DistributedDataParallel).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(stack, device_ids=ids, **{key: False})


@torch.no_grad()
def sync_buffers(stack: torch.nn.Module, ranks: Ranks, slice_tokens: int) -> None:
    """Make the state a training forward updates equal on every rank, as if each rank had seen
    the whole batch: a latent fired if it fired on any slice (else its counter grew by the whole
    batch), and BatchTopK's threshold is the mean of the ranks' EMA updates."""
    counts = stack.tokens_since_fired
    ranks.all_reduce_(counts, "min")  # 0 where any rank saw the latent fire
    counts.add_((counts > 0).long() * (ranks.world - 1) * slice_tokens)
    if hasattr(stack, "threshold"):
        ranks.all_reduce_(stack.threshold, "sum").div_(ranks.world)
        ranks.all_reduce_(stack.threshold_updates, "max")
