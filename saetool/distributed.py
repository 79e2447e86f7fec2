"""The few collective operations saetool needs, over an already initialised torch.distributed process group
(Accelerate or torchrun create it; gloo on CPU, NCCL on GPUs). With one process every call is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist


def split_evenly(n_items: int, world_size: int, rank: int) -> range:
    """The contiguous share of items [0, n_items) owned by `rank`: the first n_items % world_size ranks get one
    item more (case D2: 17 items on 8 ranks -> sizes 3,2,2,2,2,2,2,2; 3 items on 4 ranks -> the last rank gets
    nothing). Every item belongs to exactly one rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    base, extra = divmod(n_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Dist:
        if tdist.is_available() and tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (and return it)."""
        if self.active:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world_size, *t.shape]: every rank's `t` (same shape and dtype on every rank), stacked in rank order."""
        if not self.active:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        tdist.all_gather(out, t.contiguous())
        return torch.stack(out)

    def all_gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, e.g. CPU tensors)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """`obj` of rank `src` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]
