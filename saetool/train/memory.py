"""The memory of a sweep per rank, known before it runs: `estimate_memory(MemoryShape) -> MemoryEstimate`, the member
group `--member_group 0` picks on CUDA (`auto_member_group`), and the refusal of a run that cannot fit (`refusal`).

Bytes throughout. Notation for one rank: N members held here, I = d_in, D = d_out (I for an SAE), S = d_sae, B the rows
of this rank's share of a batch (--batch_size; ceil(batch_size / W) under --parallel data over W processes), G the
member group, e the bytes of the step's compute dtype (4 fp32, 2 bf16), k the largest k of a top-k architecture.

On the training device, for the whole run (the sources: saetool.ensemble.stack.SAEEnsemble, torch.optim.Adam,
saetool.train.step):
- parameters P = 4 N (S D + I S [not tied] + S [b_enc] + D [b_dec] + D I [W_skip] + the architecture's extra
  parameters, `init_extra`: JumpReLU's theta S, Gated's b_gate, b_mag, r_mag 3 S and no b_enc);
- Adam: exp_avg and exp_avg_sq, 2 P, and a 4-byte step per tensor. Its update's temporaries (transient, apart from
  the step's): none for the fused variant (`make_optimizer`, CUDA), P for foreach (its sqrt(v) copy), twice the
  largest parameter tensor for the CPU loop (sqrt(v) and its quotient) plus the previous tensor's quotient;
- gradients: P. The fused kernel writes them in place; its data-parallel all-reduce sums them in place, every
  `.grad` a view of one flat buffer (`flat_gradients`), and DDP keeps them as views of its buckets: no second copy;
- the batch: DeviceFeed's 2 batches ahead and the current one, B x width in the store dtype, and its float32 copy
  and scaled copy, 2 x 4 B width (width = I, or I + D for a transcoder's two hooks).

The step's intermediates, one member group at a time (each group's are freed before the next), the largest of the
phases of the fused kernel (saetool.ensemble.fused; read from its code, checked against torch.profiler's allocation
timeline on CPU in tests/train/test_memory.py):
    encode      pre and f                                    2 e G B S   (+ top-k G B k (3 e + 8))
    statistics  f, the mask (1 byte), residual, its square   (e + 1) G B S + 8 G B D   (+ 4 G B D skip term)
    decoder     f, mask, g_xhat, dW_dec                      (e + 1) G B S + 4 G B D   (+ 4 G S D decoder_norm_l1)
    encoder     g_pre, g_xhat; then the b_dec correction     e G B S + 4 G B D; 4 G B D + 4 G I S
                (tied: dW_enc is a copy, + 4 G I S in both; W_skip's gradient + 4 G D I)
bf16 adds the group's bf16 weight copies 2 G S (I + D), the bf16 g_xhat 2 G B D and the bf16 results of the two
weight-gradient matmuls before their upcast; on CPU also one float32 [G, B, S] copy (CPU reductions and scatter cast
a bf16 input whole; CUDA casts on the fly). The autograd path (saetool.ensemble.stack, every architecture, AuxK) holds
AUTOGRAD_BYTES[architecture] bytes per G B S at its peak (the saved activations and gradient buffers, counted on the
step's allocation timeline with torch.profiler, CPU) plus 3 x 4 G B D, plus P when G < N (autograd's slice backward
makes a full-size gradient of each sliced parameter); under DDP (--parallel data with the autograd path) G = N: DDP
runs all members at once.
Resampling (--resample_every) encodes the whole global batch B_g for RESAMPLE group members at a time (a group of
max(1, G B / B_g), so that G_r B_g <= G B): 8 G_r B_g S + 4 G_r B_g (I + D).
After training, the held-out evaluation on rank 0 holds every member's saved weights (P of all the run's members)
and one member's latents of 2048 rows at a time.

On the host (saetool.store.BatchLoader): pools of shuffle_chunks x chunk_size rows x width x the store's itemsize,
up to prefetch + 4 of them at once: `prefetch` pools read ahead, the pool's decoded chunks, their concatenation,
the permuted pool, and the previous pool (its carried rows and last batch still reference it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from saetool.saes import get_architecture, is_generic

GiB = 2**30
# --member_group 0 on CUDA: the step's intermediates may take this fraction of the device memory left free after
# the parameters, Adam state, gradients and batches; the rest is headroom for the allocator's fragmentation, cuBLAS
# and NCCL workspaces and torch.compile's buffers.
AUTO_FRACTION = 0.5
# The autograd step's bytes per G B S at its peak (the saved activations and gradient buffers), fp32 and bf16 autocast,
# per architecture: counted on the allocation timeline of saetool.ensemble.stack.train_step with torch.profiler on
# CPU at two shapes, rounded up. AuxK adds AUXK_BYTES.
AUTOGRAD_BYTES = {"standard": (12.5, 7.0), "topk": (9.25, 8.25), "batchtopk": (21.0, 21.25),
                  "matryoshka_batchtopk": (21.0, 21.25), "jumprelu": (26.0, 25.75), "gated": (24.5, 24.5)}
AUXK_BYTES = 16.0
PREFETCH, DEVICE_FEED_DEPTH, EVAL_ROWS = 2, 2, 2048


@dataclass(frozen=True)
class MemoryShape:
    """What the memory of one run on one rank depends on (see the module docstring for the symbols)."""

    d_in: int
    d_sae: int
    n_members: int
    rows: int
    """This rank's rows of a batch (B)."""
    d_out: int | None = None
    """A transcoder's output width; None for an SAE."""
    architecture: str = "standard"
    kernel: str = "fused"
    precision: str = "fp32"
    member_group: int = 4
    device_type: str = "cuda"
    tied: bool = False
    skip_connection: bool = False
    decoder_norm_l1: bool = False
    auxk: bool = False
    k: int = 0
    ddp: bool = False
    """Data-parallel autograd: DDP, whose step runs all members at once."""
    global_rows: int = 0
    """The global batch (resampling reads all of it); 0 = rows."""
    resample: bool = False
    all_members: int = 0
    """The run's members on all ranks (rank 0 evaluates them all); 0 = n_members."""
    store_itemsize: int = 2
    chunk_size: int = 16384
    shuffle_chunks: int = 4
    adam: str = ""
    """torch.optim.Adam's variant: fused, foreach or loop; "" = saetool.train.step.make_optimizer's (fused on CUDA,
    the loop elsewhere)."""

    @property
    def out(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    @property
    def width(self) -> int:
        """The loader's columns for this run: the input hook, and a transcoder's target."""
        return self.d_in + (0 if self.d_out is None else self.d_out)

    @property
    def group(self) -> int:
        """The member group the step runs (DDP: all members)."""
        return self.n_members if self.ddp else max(1, min(self.member_group, self.n_members))


@dataclass
class MemoryEstimate:
    """An estimate in bytes: `device` (persistent parts, summed), `transient` (the step's intermediates and
    resampling, which never overlap: their largest counts), `evaluation` (after training, alone) and `host`."""

    device: dict[str, int] = field(default_factory=dict)
    transient: dict[str, int] = field(default_factory=dict)
    evaluation: int = 0
    host: dict[str, int] = field(default_factory=dict)
    group: int = 0

    @property
    def training(self) -> int:
        """The device's peak during training."""
        return sum(self.device.values()) + max(self.transient.values(), default=0)

    @property
    def total(self) -> int:
        """The device's peak: training, or the evaluation after it."""
        return max(self.training, self.evaluation)

    @property
    def fixed(self) -> int:
        """What the member group does not change: parameters, Adam, gradients, batches."""
        return sum(self.device.values())

    def parts(self) -> dict[str, int]:
        """Every device part by name, the largest transient one included."""
        worst = max(self.transient, key=self.transient.get) if self.transient else None
        return {**self.device, **({worst: self.transient[worst]} if worst else {})}

    def line(self, device: str) -> str:
        """One line: the total per rank and its biggest parts."""
        parts = sorted(self.parts().items(), key=lambda kv: -kv[1])
        big = ", ".join(f"{name} {gib(size)}" for name, size in parts[:4] if size >= 0.005 * GiB)
        host = sum(self.host.values())
        after = f"; after training, evaluation {gib(self.evaluation)}" if self.evaluation > self.training else ""
        return (f"memory per rank (estimate): {gib(self.total)} on {device} ({big}; member group {self.group}{after})"
                f", host {gib(host)} (loader)")


def gib(n: float) -> str:
    """A size in GiB, or in MiB below 1 GiB."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


def parameter_tensors(s: MemoryShape) -> list[int]:
    """The bytes of each trained tensor of the run's N members (float32), in SAEEnsemble's registration order: W_dec,
    W_enc (not tied), b_enc (its architecture has one), b_dec, W_skip, the architecture's extra parameters."""
    arch = get_architecture(s.architecture)
    S, I, D = s.d_sae, s.d_in, s.out
    sizes = [S * D] + ([] if s.tied else [I * S]) + ([S] if "b_enc" in getattr(arch, "WEIGHTS", {"b_enc": ()}) else [])
    sizes += [D] + ([D * I] if s.skip_connection else [])
    if is_generic(arch):
        extra, _ = arch.init_extra(1, I, S, torch.float32)
        sizes += [t.numel() for t in extra.values()]
    return [4 * s.n_members * n for n in sizes]


def parameter_bytes(s: MemoryShape) -> tuple[int, int]:
    """(bytes of the trained parameters, number of parameter tensors) of the run's N members."""
    sizes = parameter_tensors(s)
    return sum(sizes), len(sizes)


def fused_intermediates(s: MemoryShape, G: int) -> int:
    """The fused kernel's peak for member group G (the module docstring's phases)."""
    B, S, I, D, e = s.rows, s.d_sae, s.d_in, s.out, 4 if s.precision == "fp32" else 2
    low = s.precision != "fp32"
    gbs, gbd, gis = G * B * S, G * B * D, G * I * S
    topk = G * B * s.k * (3 * e + 8) if s.k else 0  # values, indices, their ReLU and its masked copy
    skip = 4 * gbd if s.skip_connection else 0
    weights_lo = 2 * G * S * (I + D) + (2 * G * D * I if s.skip_connection else 0) if low else 0
    g_lo = 2 * gbd if low else 0
    dec_lo = 2 * G * S * D if low else 0
    enc_copy = 4 * gis if (s.tied or low) else 0
    phases = [
        2 * e * gbs + topk,
        (e + 1) * gbs + 8 * gbd + skip,
        (e + 1) * gbs + 4 * gbd + g_lo + dec_lo + (4 * G * S * D if s.decoder_norm_l1 else 0),
        e * gbs + 4 * gbd + enc_copy + (2 * gis if low else 0),
        4 * gbd + 4 * gis + enc_copy + (4 * G * D * I if s.skip_connection else 0),
    ]
    cpu_cast = 4 * gbs if low and s.device_type == "cpu" else 0
    return max(phases) + weights_lo + cpu_cast + (2 * B * I if low else 0)


def autograd_intermediates(s: MemoryShape, G: int) -> int:
    """The autograd step's peak for member group G (AUTOGRAD_BYTES); a group smaller than N also materialises a
    full-size gradient of each parameter it slices (autograd's slice backward), P."""
    per = AUTOGRAD_BYTES.get(s.architecture, (26.0, 26.0))[s.precision != "fp32"] + (AUXK_BYTES if s.auxk else 0)
    sliced = parameter_bytes(s)[0] if G < s.n_members else 0
    return int(per * G * s.rows * s.d_sae) + 3 * 4 * G * s.rows * s.out + sliced


def step_intermediates(s: MemoryShape, G: int) -> int:
    return fused_intermediates(s, G) if s.kernel == "fused" else autograd_intermediates(s, G)


def adam_temporaries(s: MemoryShape) -> int:
    """The optimizer step's temporaries: none for the fused variant, a copy of every parameter for foreach (sqrt(v)),
    for the loop (one tensor at a time) sqrt(v) and its quotient of one tensor while the previous tensor's quotient
    is still referenced."""
    variant = s.adam or ("fused" if s.device_type == "cuda" else "loop")
    if variant == "fused":
        return 0
    sizes = parameter_tensors(s)
    if variant == "foreach":
        return sum(sizes)
    return max(2 * size + (sizes[i - 1] if i else 0) for i, size in enumerate(sizes))


def resample_group(group: int, rows: int, global_rows: int, n_members: int) -> int:
    """Members per resampling forward on the global batch: at most the step's group x its rows."""
    return max(1, min(n_members, group * rows // max(1, global_rows)))


def estimate_memory(s: MemoryShape, group: int | None = None) -> MemoryEstimate:
    """The estimate of one run on one rank (member group `group`, default s.group)."""
    G = s.group if group is None else group
    P, tensors = parameter_bytes(s)
    device = {"parameters": P, "Adam": 2 * P + 4 * tensors, "gradients": P}
    device["batch"] = (DEVICE_FEED_DEPTH + 1) * s.rows * s.width * s.store_itemsize + 2 * 4 * s.rows * s.width
    transient = {"step intermediates": step_intermediates(s, G), "Adam update": adam_temporaries(s)}
    if s.resample:
        Bg = s.global_rows or s.rows
        Gr = resample_group(G, s.rows, Bg, s.n_members)
        transient["resampling"] = 8 * Gr * Bg * s.d_sae + 4 * Gr * Bg * (s.d_in + s.out)
    everyone = s.all_members or s.n_members
    evaluation = P * everyone // s.n_members + 3 * 4 * EVAL_ROWS * s.d_sae + 4 * 4 * EVAL_ROWS * s.width
    pool = s.shuffle_chunks * s.chunk_size * s.width * s.store_itemsize
    host = {"loader": (PREFETCH + 4) * pool}
    return MemoryEstimate(device, transient, evaluation, host, G)


def combine(estimates: list[MemoryEstimate]) -> MemoryEstimate:
    """Runs trained together on one device (a multi-hook sweep): persistent parts and the loader add up; the steps
    run one after another, so the largest intermediates count; each run is evaluated alone."""
    out = MemoryEstimate(group=max(e.group for e in estimates))
    for e in estimates:
        for name, size in e.device.items():
            out.device[name] = out.device.get(name, 0) + size
        for name, size in e.transient.items():
            out.transient[name] = max(out.transient.get(name, 0), size)
        for name, size in e.host.items():
            out.host[name] = out.host.get(name, 0) + size
        out.evaluation = max(out.evaluation, e.evaluation)
    return out


def auto_member_group(shapes: list[MemoryShape], free: int, fraction: float = AUTO_FRACTION) -> tuple[int, str]:
    """(the member group, why) for runs trained together on a CUDA device with `free` bytes free before training:
    the largest G <= the members of a run whose step intermediates stay within `fraction` of what is left after
    every run's parameters, Adam state, gradients and batches; at least 1."""
    fixed = combine([estimate_memory(s, 1) for s in shapes]).fixed
    budget = fraction * (free - fixed)
    most = max(s.n_members for s in shapes)
    group = 1
    for G in range(1, most + 1):
        if max(step_intermediates(s, min(G, s.n_members)) for s in shapes) <= budget:
            group = G
    used = max(step_intermediates(s, min(group, s.n_members)) for s in shapes)
    why = (f"step intermediates {gib(used)} within {fraction:.0%} of the {gib(max(0, free - fixed))} free after "
           f"parameters, Adam, gradients and batches ({gib(free)} free)")
    if used > budget:
        why = f"even 1 member's step intermediates ({gib(used)}) exceed {fraction:.0%} of {gib(max(0, free - fixed))}"
    return group, why


def refusal(estimate: MemoryEstimate, free: int, device: str, shapes: list[MemoryShape]) -> str | None:
    """The one-line reason a run cannot fit in `free` bytes of `device` (None if it fits), naming the flags to
    change."""
    if estimate.total <= free:
        return None
    parts = ", ".join(f"{k} {gib(v)}" for k, v in sorted(estimate.parts().items(), key=lambda kv: -kv[1])[:4])
    one = combine([estimate_memory(s, 1) for s in shapes])
    if one.total <= free:
        fix = (f"lower --member_group (now {estimate.group}; 1 needs {gib(one.total)}) or leave it 0 (auto), or split "
               "the members across processes with --parallel members")
    elif one.fixed <= free:
        fix = (f"even --member_group 1 needs {gib(one.total)}: lower --batch_size, or use more processes (fewer rows "
               "each with --parallel data, fewer members each with --parallel members)")
    else:
        fix = (f"parameters, Adam and gradients alone need {gib(one.fixed)}: split the members across processes "
               "with --parallel members, and use more processes")
    return (f"this run needs about {gib(estimate.total)} per rank on {device} ({parts}; member group "
            f"{estimate.group}) but {gib(free)} is free: {fix}")
