"""The training step and its choice: fused kernel or autograd, fp32 or bf16, compiled or eager.

- kernel: `fused` (saetool.ensemble.fused: hand-derived backward, members in groups; standard and topk) or `autograd`
  (saetool.ensemble.stack.train_step; every architecture, AuxK). `auto` takes the fused kernel where the architecture
  has one and AuxK is off.
- precision: `fp32`, or `bf16`: the fused kernel's matmuls run on bf16 operands with fp32 accumulation
  (saetool.ensemble.fused, compute_dtype), the autograd path under `torch.autocast(bf16)`; master weights, gradients and
  Adam stay fp32 either way. `auto` picks bf16 where bf16 matmuls are faster: CUDA devices that support bf16,
  and CPUs whose measured bf16 `torch.mm` beats fp32 by 1.2x (AVX512-BF16/AMX); every rank must agree, so
  data-parallel ranks pick bf16 only if all of them would.
- compile: `torch.compile` the step; auto = on CUDA, and on CPU for fused runs of >= CPU_COMPILE_MIN_STEPS.
- member_group: members per batched matmul (0 = all on CUDA, 4 on CPU; see docs/benchmarks.md).

With data-parallel ranks the fused kernel sums its gradients over ranks in one flat all-reduce; the autograd path
wraps the ensemble in DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch

from saetool.config import RuntimeSection
from saetool.ensemble import (
    FUSED_ARCHITECTURES,
    SAEEnsemble,
    clip_grad_norm_per_member,
    fused_loss_and_grads,
    loss_and_stats,
    train_step,
)
from saetool.saes import global_batch
from saetool.util import Dist

# --compile auto on CPU: compile the fused step for runs of at least this many steps. benchmarks/bench_sweep.py
# (16 members, ratio 8, d_in 576, batch 4096, 2 cores): the compiled step is 1.19x the eager one (10.6 s vs 12.6 s),
# compiling costs ~6 s with a warm inductor cache and tens of seconds cold, so it pays after 3 to ~20 steps;
# 100 leaves a margin for smaller shapes, where the saving per step is smaller.
CPU_COMPILE_MIN_STEPS = 100
# --precision auto on CPU: bf16 when its measured matmul throughput is at least this many times fp32's.
CPU_BF16_MIN_SPEEDUP = 1.2


@functools.cache
def cpu_bf16_speedup(n: int = 1024, repeats: int = 3) -> float:
    """Measured torch.mm throughput of bf16 over fp32 on this CPU ([n, n] @ [n, n], best of `repeats`): > 1 on
    CPUs with bf16 matmul units (AVX512-BF16, AMX), often < 1 without them (bf16 is then emulated)."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def resolve_precision(precision: str, device: str, dist: Dist) -> str:
    """"fp32" or "bf16" for --precision fp32/bf16/auto on `device` (see the module docstring)."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    else:
        bf16 = cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP
    agree = dist.all_reduce_sum(torch.tensor([int(bf16)], device=device if dist.active else "cpu"))
    return "bf16" if int(agree.item()) == dist.world_size else "fp32"


def train_batch_fused(ensemble: SAEEnsemble, optimizer: torch.optim.Optimizer, x: torch.Tensor, n_total: int,
                      group: int, fused_fn=fused_loss_and_grads, dist: Dist | None = None, grad_clip_norm: float = 0.0,
                      target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One fused step: gradients of this rank's rows (normalised by the global batch n_total), summed over
    data-parallel ranks in one flat all-reduce (the exact global gradient), per-member clipping (grad_clip_norm > 0),
    Adam, decoder renormalisation. target: a transcoder's x_out rows (x is then x_in)."""
    stats = fused_fn(ensemble, x, n_total, group, target=target)
    if dist is not None and dist.active:
        grads = [p.grad for p in ensemble.parameters()]
        flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))
    if grad_clip_norm > 0:
        clip_grad_norm_per_member(ensemble.parameters(), grad_clip_norm)
    optimizer.step()
    ensemble.normalize_decoder()
    return stats


def autograd_step_fn(use_compile: bool, precision: str, device_type: str):
    """loss_and_stats, compiled or not, under bf16 autocast for precision "bf16"."""
    fn = torch.compile(loss_and_stats) if use_compile else loss_and_stats
    if precision == "fp32":
        return fn

    def step_fn(*args):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return fn(*args)

    return step_fn


def fused_step_fn(use_compile: bool, precision: str):
    """fused_loss_and_grads, compiled or not, with bf16 matmul operands for precision "bf16"."""
    fn = torch.compile(fused_loss_and_grads) if use_compile else fused_loss_and_grads
    if precision == "fp32":
        return fn
    return functools.partial(fn, compute_dtype=torch.bfloat16)


def split_pair(x: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A transcoder batch [rows, d_in + d_out] -> (x_in [rows, d_in], x_out [rows, d_out]), both contiguous."""
    return x[:, :d_in].contiguous(), x[:, d_in:].contiguous()


@dataclass
class Step:
    """One training step of the whole ensemble on this rank's rows: `step(x_local, n_total, dead) -> stats`
    (per-member [n_members] statistics of the batch trained on, and "fired" [n_members, d_sae])."""

    ensemble: SAEEnsemble
    optimizer: torch.optim.Optimizer
    dist: Dist
    data_parallel: bool
    fused: bool
    precision: str
    compiled: bool
    group: int
    grad_clip_norm: float
    fn: object
    model: torch.nn.Module

    def describe(self) -> str:
        return (("fused kernel" if self.fused else "autograd") + f", {self.precision}"
                + (", compiled" if self.compiled else "")
                + (f", gradients clipped per SAE at {self.grad_clip_norm:.3g}" if self.grad_clip_norm else ""))

    def __call__(self, x_local: torch.Tensor, n_total: int, dead: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """x_local: this rank's rows [rows, d_in], or a transcoder's [x_in | x_out] side by side [rows, d_in + d_out]
        (split here)."""
        target = None
        if self.ensemble.transcoder:
            x_local, target = split_pair(x_local, self.ensemble.d_in)
        if self.fused:
            return train_batch_fused(self.ensemble, self.optimizer, x_local, n_total, self.group, self.fn,
                                     self.dist if self.data_parallel else None, self.grad_clip_norm, target)
        # data-parallel BatchTopK selects over the global batch (saetool.saes._common.global_batch)
        batch_ctx = global_batch(n_total, self.dist.all_gather) if self.data_parallel else contextlib.nullcontext()
        with batch_ctx:
            return train_step(self.ensemble, self.optimizer, x_local, n_total=n_total, step_fn=self.fn,
                              model=self.model, loss_scale=self.dist.world_size if self.data_parallel else 1.0,
                              dead=dead, grad_clip_norm=self.grad_clip_norm,
                              member_group=0 if self.data_parallel else self.group, target=target)


def choose_step(runtime: RuntimeSection, ensemble: SAEEnsemble, optimizer: torch.optim.Optimizer, dist: Dist,
                data_parallel: bool, total_steps: int, grad_clip_norm: float, precision: str | None = None) -> Step:
    """The step the runtime flags ask for (see the module docstring) for `ensemble` (its architecture and AuxK decide
    whether the fused kernel can run). `precision` overrides --precision with an already resolved "fp32"/"bf16" (a
    resumed run keeps the one its checkpoint was trained with). (SweepConfig.validate refuses --kernel fused where it
    cannot run.)"""
    fused = runtime.kernel == "fused" or (runtime.kernel == "auto" and ensemble.architecture in FUSED_ARCHITECTURES
                                          and not ensemble.auxk_coefficient)
    device_type = torch.device(runtime.device).type
    precision = precision or resolve_precision(runtime.step_precision, runtime.device, dist)
    use_compile = runtime.compile
    if use_compile is None:
        use_compile = device_type == "cuda" or (fused and total_steps >= CPU_COMPILE_MIN_STEPS)
    group = runtime.member_group or (ensemble.n_members if device_type == "cuda" else 4)
    model = ensemble
    if data_parallel and not fused:  # the fused kernel sums its gradients over ranks itself
        model = torch.nn.parallel.DistributedDataParallel(ensemble, broadcast_buffers=False)
    fn = fused_step_fn(use_compile, precision) if fused else autograd_step_fn(use_compile, precision, device_type)
    return Step(ensemble, optimizer, dist, data_parallel, fused, precision, use_compile, group,
                grad_clip_norm, fn, model)
