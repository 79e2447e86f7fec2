"""The few collective operations saetool needs, over an already initialised torch.distributed process group
(Accelerate or torchrun create it; gloo on CPU, NCCL on GPUs). With one process every call is a no-op.

The launchers (launch/generate.py, launch/sweep.py) create the group through `accelerator`, with the collective
timeout of --dist_timeout. No rank waits in a collective on unbounded work of another (docs/distributed.md,
"Collective timeouts"): such waits poll the file system instead, so the timeout only bounds real hangs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

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


def partition_by_cost(costs: list[int], world_size: int) -> list[range]:
    """Contiguous shares of items [0, len(costs)), one per rank in rank order, every share non-empty, that
    minimise the largest share's total cost (the members of several ensembles, in order, split across
    member-parallel ranks: a rank's members stay contiguous, so it holds few, wide ensembles).

    The smallest feasible maximum T is found by bisection over integers (a greedy count of the fewest parts of
    cost <= T decides feasibility); then each rank in turn ends its share at the item boundary nearest to its ideal
    cumulative cost (rank r: (r + 1) * total / world_size; ties: the earlier boundary) among those that keep its
    share <= T and leave a feasible rest. Equal costs give shares whose sizes differ by at most one ([1] * 5 on 2
    ranks: range(0, 2), range(2, 5)). ValueError if there are fewer items than ranks or a cost is not a positive
    integer."""
    n = len(costs)
    if n < world_size:
        raise ValueError(f"{n} items cannot give each of {world_size} ranks one")
    if any(int(c) != c or c < 1 for c in costs):
        raise ValueError(f"costs must be positive integers, got {costs}")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + int(c))

    def fewest_parts(limit: int) -> list[int]:
        """need[j]: the fewest parts of cost <= limit covering items [j, n) (greedy from the right)."""
        need, end = [0] * (n + 1), n
        for j in range(n - 1, -1, -1):
            while prefix[end] - prefix[j] > limit:
                end -= 1
            need[j] = 1 + need[end]
        return need

    low, high = max(int(c) for c in costs), prefix[-1]
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fewest_parts(mid)[0] <= world_size else (mid + 1, high)
    need, shares, i = fewest_parts(low), [], 0
    for rank in range(world_size):
        later = world_size - rank - 1
        ideal = (rank + 1) * prefix[-1] / world_size
        ends = [j for j in range(i + 1, n - later + 1) if prefix[j] - prefix[i] <= low and need[j] <= later]
        j = n if later == 0 else min(ends, key=lambda j: (abs(prefix[j] - ideal), j))
        shares.append(range(i, j))
        i = j
    return shares


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


def accelerator(cpu: bool, dist_timeout: float):
    """The launchers' `accelerate.Accelerator`: its process group (several processes) is created with a collective
    timeout of `dist_timeout` seconds (`InitProcessGroupKwargs(timeout=...)`, for NCCL and gloo alike), which
    rank 0 prints as read back from the group."""
    from accelerate import Accelerator  # the launchers' dependency: not imported by the rest of saetool
    from accelerate.utils import InitProcessGroupKwargs

    handler = InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))
    # accelerate passes on only the values that differ from its defaults (600 s: NCCL's, not gloo's 1800 s)
    handler.to_kwargs = lambda: {"timeout": handler.timeout}
    acc = Accelerator(cpu=cpu, kwargs_handlers=[handler])
    if acc.num_processes > 1:
        seconds = group_timeout()
        acc.print(f"process group: {tdist.get_backend()}, {acc.num_processes} processes, collective timeout "
                  f"{'unknown' if seconds is None else f'{seconds:g} s'} (--dist_timeout {dist_timeout:g})")
    return acc


def group_timeout() -> float | None:
    """The collective timeout (seconds) of the default process group, read back from its backend; None without a
    group or where torch does not expose it."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    try:
        group = tdist.distributed_c10d._get_default_group()
        device = torch.device("cuda") if tdist.get_backend() == "nccl" else torch.device("cpu")
        return group._get_backend(device).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return None
