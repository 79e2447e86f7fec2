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
- member_group: members per batched matmul (0 = auto: on CUDA from the free memory, saetool.train.plan; 4 on CPU; see
  docs/benchmarks.md).

With data-parallel ranks the fused kernel sums its gradients over ranks in one flat all-reduce, in place (every
`.grad` a view of one buffer, `flat_gradients`); the autograd path wraps the ensemble in DistributedDataParallel with
its gradients as views of DDP's buckets. Adam is torch's fused variant on CUDA (`make_optimizer`).
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
    flat = flat_gradients(ensemble) if dist is not None and dist.active else None
    stats = fused_fn(ensemble, x, n_total, group, target=target)
    if flat is not None:
        dist.all_reduce_sum(flat)  # in place: every .grad is a view of it
    if grad_clip_norm > 0:
        clip_grad_norm_per_member(ensemble.parameters(), grad_clip_norm)
    optimizer.step()
    ensemble.normalize_decoder()
    return stats


def flat_gradients(ensemble: SAEEnsemble) -> torch.Tensor:
    """One flat buffer [n] holding every parameter's gradient, each `.grad` a view of it (in parameter order), so the
    data-parallel all-reduce sums the gradients in place (no concatenated copy, no copy back). Made on the first call
    (zeros; the fused kernel overwrites every gradient it owns each step); later calls find the views and return the
    same buffer."""
    params = list(ensemble.parameters())
    sizes = [p.numel() for p in params]
    grads = [p.grad for p in params]
    if all(g is not None for g in grads):
        storage = grads[0].untyped_storage()
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        if all(g.untyped_storage().data_ptr() == storage.data_ptr() and g.is_contiguous() and g.storage_offset() == o
               for g, o in zip(grads, offsets)) and storage.nbytes() == sum(sizes) * grads[0].element_size():
            return grads[0].new_empty(0).set_(storage, 0, (sum(sizes),), (1,))
    flat = torch.zeros(sum(sizes), dtype=params[0].dtype, device=params[0].device)
    for p, part in zip(params, flat.split(sizes)):
        p.grad = part.view_as(p)
    return flat


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam (betas 0.9, 0.999, eps 1e-8) over the stacked parameters. On CUDA torch's fused variant: one kernel per
    step and no temporaries, where the foreach variant (torch's default there) makes a full sqrt(v) copy of the
    parameters. On the CPU the per-tensor loop (torch's default there): its temporaries are those of one tensor at a
    time, and its results are today's bit for bit (the fused CPU kernel rounds differently in the last bit, which
    flips a resampling draw of the distributed tests). The same update elementwise: exactly per-member Adam."""
    params = list(params)
    if params and params[0].device.type == "cuda":
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr, foreach=False)


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

    @property
    def members_per_pass(self) -> int:
        """Members whose [members, rows, d_sae] intermediates are alive at once: the group, or all under DDP."""
        ddp = self.data_parallel and not self.fused
        return self.ensemble.n_members if ddp else min(self.group, self.ensemble.n_members)

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


def uses_fused(runtime: RuntimeSection, architecture: str, auxk_coefficient: float) -> bool:
    """Whether --kernel (fused, or auto where the architecture has the fused kernel and AuxK is off) takes it."""
    return runtime.kernel == "fused" or (runtime.kernel == "auto" and architecture in FUSED_ARCHITECTURES
                                         and not auxk_coefficient)


def choose_step(runtime: RuntimeSection, ensemble: SAEEnsemble, optimizer: torch.optim.Optimizer, dist: Dist,
                data_parallel: bool, total_steps: int, grad_clip_norm: float, precision: str | None = None,
                group: int | None = None) -> Step:
    """The step the runtime flags ask for (see the module docstring) for `ensemble` (its architecture and AuxK decide
    whether the fused kernel can run). `precision` overrides --precision with an already resolved "fp32"/"bf16" (a
    resumed run keeps the one its checkpoint was trained with). `group` overrides the member group (the sweep's memory
    plan, saetool.train.plan: on CUDA --member_group 0 picks it from the free memory); without it, --member_group or
    its default (all members on CUDA, 4 on CPU). (SweepConfig.validate refuses --kernel fused where it cannot run.)"""
    fused = uses_fused(runtime, ensemble.architecture, ensemble.auxk_coefficient)
    device_type = torch.device(runtime.device).type
    precision = precision or resolve_precision(runtime.step_precision, runtime.device, dist)
    use_compile = runtime.compile
    if use_compile is None:
        use_compile = device_type == "cuda" or (fused and total_steps >= CPU_COMPILE_MIN_STEPS)
    group = group or runtime.member_group or (ensemble.n_members if device_type == "cuda" else 4)
    model = ensemble
    if data_parallel and not fused:  # the fused kernel sums its gradients over ranks itself
        # gradients as views of DDP's buckets: no second copy of them for the all-reduce
        model = torch.nn.parallel.DistributedDataParallel(ensemble, broadcast_buffers=False,
                                                          gradient_as_bucket_view=True)
    fn = fused_step_fn(use_compile, precision) if fused else autograd_step_fn(use_compile, precision, device_type)
    return Step(ensemble, optimizer, dist, data_parallel, fused, precision, use_compile, group,
                grad_clip_norm, fn, model)
