"""The memory plan of the runs trained together, before anything is built: `plan_runs(cfgs, shares, dist) -> Plan`.

From the configs and the store's shapes (saetool.train.memory.MemoryShape: this rank's members and rows, the step
the runtime flags choose, the loader's pools) it estimates the memory per rank, picks the member group of
`--member_group 0` on CUDA from the device's free memory (`torch.cuda.mem_get_info`, plus what this process's
allocator already holds) and says why, and finds whether the runs fit. The sweep driver prints its lines before
training and refuses a run that cannot fit on a CUDA device; on the CPU it only prints. `saetool sweep --plan True`
prints the same without training. It reads the store's metadata only, and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saetool.config import SweepConfig
from saetool.saes import get_architecture
from saetool.store import ActivationStore, StoreError
from saetool.train.memory import (
    MemoryEstimate,
    MemoryShape,
    auto_member_group,
    combine,
    estimate_memory,
    refusal,
)
from saetool.train.setup import member_hyperparams, target_hook
from saetool.train.step import resolve_precision, uses_fused
from saetool.util import Dist, split_evenly

CPU_MEMBER_GROUP = 4  # --member_group 0 on the CPU (docs/benchmarks.md)


@dataclass
class Plan:
    """The plan of runs trained together: the shapes of the runs with members on this rank, each run's member group
    (None: an idle run, or the runtime's default), their combined estimate, the lines to print, and the refusal (one
    line; None when the runs fit or the device is not CUDA)."""

    shapes: list[MemoryShape]
    groups: list[int | None]
    estimate: MemoryEstimate
    lines: list[str]
    refusal: str | None = None


def run_shape(cfg: SweepConfig, store: ActivationStore, dist: Dist, local: range | None, precision: str,
              device_type: str) -> MemoryShape:
    """The MemoryShape of the run `cfg` describes on this rank (its members: `local`, or the default split)."""
    hook = store.resolve_hook(cfg.array or cfg.hook_name)
    target = target_hook(store, hook, cfg.target_hook)
    d_in = store.width(hook)
    hyper = member_hyperparams(cfg)
    n_all = len(next(iter(hyper.values())))
    by_members = cfg.parallel == "members" and dist.active
    if local is None:
        local = split_evenly(n_all, dist.world_size, dist.rank) if by_members else range(n_all)
    data_parallel = cfg.parallel == "data" and dist.active
    rows = -(-cfg.batch_size // dist.world_size) if data_parallel else cfg.batch_size
    fused = uses_fused(cfg.runtime, cfg.architecture, cfg.auxk_coefficient)
    return MemoryShape(
        d_in=d_in, d_sae=int(d_in * cfg.ratio), n_members=max(1, len(local)), rows=rows,
        d_out=None if target is None else store.width(target), architecture=cfg.architecture,
        kernel="fused" if fused else "autograd", precision=precision,
        member_group=cfg.member_group or CPU_MEMBER_GROUP, device_type=device_type, tied=cfg.tied,
        skip_connection=cfg.skip_connection, decoder_norm_l1=cfg.decoder_norm_l1, auxk=cfg.auxk_coefficient > 0,
        k=max(hyper["k"]) if get_architecture(cfg.architecture).SWEEP_PARAM == "k" else 0,
        ddp=data_parallel and not fused, global_rows=cfg.batch_size, resample=cfg.resample_every > 0,
        all_members=n_all, store_itemsize=4 if store.spec.dtype == "float32" else 2,
        chunk_size=store.spec.chunk_size, shuffle_chunks=cfg.shuffle_chunks)


def device_free(device: str) -> int:
    """Bytes this process can use on a CUDA `device`: what the device has free, plus what this process's caching
    allocator already holds (its tensors are part of the estimate; its cached blocks are reusable)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) + int(torch.cuda.memory_reserved(device))


def plan_runs(cfgs: list[SweepConfig], shares: list[range | None], dist: Dist, cuda_free: int | None = None,
              store: ActivationStore | None = None) -> Plan:
    """The plan of the runs `cfgs` (this rank's members: `shares`, None = the default split) trained together on
    this rank's device. cuda_free: the free bytes of a CUDA device (None: measured where the device is CUDA; given,
    the device is taken to be CUDA with that much free, as tests simulate one)."""
    cfg = cfgs[0]
    store = store or ActivationStore.open(cfg.dataset_dir, array=cfg.array)
    cuda = cuda_free is not None or torch.device(cfg.device).type == "cuda"
    if cuda_free is None:
        precision = resolve_precision(cfg.step_precision, cfg.device, dist)
    else:  # a simulated CUDA device with bf16
        precision = "bf16" if cfg.step_precision == "auto" else cfg.step_precision
    device_type = "cuda" if cuda else torch.device(cfg.device).type
    held = [i for i, share in enumerate(shares) if share is None or len(share)]  # an idle run holds nothing
    shapes = [run_shape(cfgs[i], store, dist, shares[i], precision, device_type) for i in held]
    lines, groups, free = [], [s.group for s in shapes], None
    if cuda:
        free = cuda_free if cuda_free is not None else device_free(cfg.device)
        if cfg.member_group == 0:
            group, why = auto_member_group(shapes, free)
            groups = [min(group, s.n_members) for s in shapes]
            lines.append(f"member group: auto chose {group} of {max(s.n_members for s in shapes)} members: {why}")
    if not shapes:
        return Plan([], [None] * len(cfgs), MemoryEstimate(), ["memory per rank: no member on this rank"])
    estimate = combine([estimate_memory(s, g) for s, g in zip(shapes, groups, strict=True)])
    device = cfg.device if cuda_free is None else "a CUDA device"
    lines.insert(0, estimate.line(device))
    by_run = [None] * len(cfgs)
    for i, g in zip(held, groups, strict=True):
        by_run[i] = g
    return Plan(shapes, by_run, estimate, lines, refusal(estimate, free, device, shapes) if cuda else None)


def check_runs(cfgs: list[SweepConfig], shares: list[range | None], dist: Dist, log=print,
               cuda_free: int | None = None) -> list[int | None]:
    """Before training: print the plan's lines and return each run's member group on CUDA (None elsewhere: the
    runtime's default); ValueError (one line, on every rank alike) when the runs cannot fit on a CUDA device."""
    try:
        plan = plan_runs(cfgs, shares, dist, cuda_free)
    except (StoreError, ValueError):  # a run setup_run refuses: it says why, in its own order of checks
        return [None] * len(cfgs)
    for line in plan.lines:
        log(line)
    cuda = cuda_free is not None or torch.device(cfgs[0].device).type == "cuda"
    refused = plan.refusal
    if cuda and dist.active:  # every rank refuses if one must
        refused = next((r for r in dist.all_gather_objects(refused) if r is not None), None)
    if refused is not None:
        raise ValueError(refused)
    return plan.groups if cuda else [None] * len(cfgs)
