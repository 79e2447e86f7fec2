"""`saetool sweep`'s settings: `SweepConfig`. Each field's docstring (the string under it) is its CLI help.

Which flags act on which architecture, and which architectures the fused kernel trains, is declared by each
architecture (saetool.saes: FLAGS, FUSED); a flag that cannot act on the chosen setting is refused in one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from saetool.config.parse import check, check_device, default_device, join_names
from saetool.saes import ARCHITECTURES, FUSED_ARCHITECTURES, architecture_flags, check_sweep_flags


@dataclass
class SweepConfig:
    dataset_dir: str = "activation_data"
    """The activation store written by `saetool generate`."""
    hook_name: str | None = None
    """Hook array of the store to train on (needed only when the store holds several); a transcoder's input. "all" (every
    hook) or a comma list trains one ensemble per hook on the same row batches, read once (saetool.sweep.multihook)."""
    target_hook: str | None = None
    """Train transcoders: encode --hook_name (e.g. blocks.2.mlp.hook_in, the MLP input), predict this hook of the same rows
    (e.g. blocks.2.hook_mlp_out); metrics are about the target. standard, topk, batchtopk, matryoshka_batchtopk,
    jumprelu (saetool.saes.transcoder). With a --hook_name list: one target per input hook, in order."""
    skip_connection: bool = False
    """With --target_hook: add a linear skip term x_in W_skip^T (W_skip [d_out, d_in], zero at init)."""
    output_dir: str = "sweep_outputs"
    """Where the sweep (sweep.json, saes/<member>/, metrics.md) is written."""
    architecture: str = "standard"
    """standard (ReLU + L1), topk, batchtopk, jumprelu, gated or matryoshka_batchtopk (saetool.saes)."""
    tied: bool = False
    """Tie W_enc to W_dec^T (standard only; the original tool's tied SAE)."""
    ratio: float = 4.0
    """Dictionary size over input size: d_sae = int(d_in * ratio)."""
    l1_value_min: float = -4.0
    """log10 of the smallest L1 coefficient."""
    l1_value_max: float = -2.0
    """log10 of the largest L1 coefficient."""
    l1_value_n: int = 16
    """Number of L1 coefficients, log-spaced between min and max."""
    l1_values: list[float] | None = None
    """Explicit L1 coefficients (overrides min/max/n)."""
    k_values: list[int] | None = None
    """k of each member (architectures topk, batchtopk, matryoshka_batchtopk); default 16,32,64,128."""
    l0_values: list[float] | None = None
    """L0 coefficient of each JumpReLU member; default 1e-3,3e-3,1e-2,3e-2."""
    jumprelu_bandwidth: float = 0.05
    """JumpReLU straight-through kernel width eps (every member), in units of the batch's per-element RMS of the
    centred inputs x - b_dec (SAELens' default 0.05 on unit-scale inputs)."""
    jumprelu_init_threshold: float = 0.001
    """Initial JumpReLU threshold of every latent, in units of the training sample's per-element RMS of the
    centred inputs (Gemma Scope: 0.001 on normalised inputs)."""
    matryoshka_widths: list[int] | None = None
    """Nested prefix sizes of matryoshka_batchtopk, the last = d_sae; default d_sae/8, /4, /2, 1."""
    threshold_lr: float = 0.01
    """batchtopk, matryoshka_batchtopk: EMA rate of the learned inference threshold (SAELens 0.01;
    dictionary_learning 0.001)."""
    normalize_activations: str = "none"
    """none, or expected_average_only_in: scale inputs so their mean norm is sqrt(d_in) (estimated on up to 65536
    training rows), folded into the saved weights (saved SAEs read raw activations)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up over this many steps."""
    l1_warmup_steps: int = 0
    """Linear warm-up of the sparsity coefficient (l1_coefficient / l0_coefficient) over this many steps."""
    lr_decay_steps: int = 0
    """Linear learning-rate decay to 0 over the last this many steps of the run (SAELens lr_decay_steps)."""
    decoder_norm_l1: bool = False
    """standard only: L1 weighted by decoder norms, no unit-norm decoder projection (the April 2024 recipe;
    SAELens' standard training loss with l1_coefficient x d_in, as SAELens sums the MSE over d_in)."""
    grad_clip_norm: float | None = None
    """Clip each member's gradient to this L2 norm (over all its tensors) before Adam; 0 = off; None (or auto) = 1/d_in
    (1/d_out for a transcoder) for every architecture but topk (SAELens clips at 1 a loss d_in times ours; docs/architectures.md,
    "Gradient clipping by default"), off for topk."""
    dead_window: int = 10_000_000
    """A latent is dead when it has not fired in this many training tokens (AuxK and resampling use it)."""
    auxk_coefficient: float = 0.0
    """AuxK weight for topk, batchtopk and matryoshka_batchtopk (Gao et al. 2024 use 1/32); 0 = off."""
    k_aux: int = 0
    """Dead latents AuxK reconstructs with per token; 0 = d_in // 2."""
    resample_every: int = 0
    """Resample dead latents every this many steps (Bricken et al. 2023; standard, topk, batchtopk,
    matryoshka_batchtopk), resetting their Adam state and restarting the LR warm-up; 0 = never."""
    config: str | None = None
    """A sweep YAML (configs/sweeps/): its top-level keys are flags (explicit flags win), and its `ensembles`
    list trains one ensemble per entry in the same run."""
    ensembles: list[dict] | None = None
    """One dict of flags per ensemble (usually from --config); each is trained into OUTPUT_DIR/<name>/ and
    OUTPUT_DIR/sweep.json indexes every member."""
    batch_size: int = 4096
    """Rows per training step (all members see the same batch)."""
    device: str = field(default_factory=default_device)
    """Torch device to train on."""
    adam_lr: float = 1e-3
    """Adam learning rate (betas 0.9, 0.999, eps 1e-8)."""
    n_repetitions: int = 1
    """Epochs over the training rows."""
    save_after_every: bool = False
    """Also snapshot the sweep after every chunk pool (default: after every repetition)."""
    seed: int = 0
    """Seed of member i's init is seed + i; the batch order uses seed."""
    eval_tokens: int = 8192
    """Rows held out from the end of the store for the final evaluation (never trained on)."""
    b_dec_init: str = "mean"
    """Initial b_dec: "mean" or "geometric_median" (Bricken et al. 2023; Weiszfeld) of up to 65536 training rows,
    or "zeros"."""
    shuffle_chunks: int = 4
    """Store chunks pooled and shuffled together while reading."""
    array: str | None = None
    """Train on this 2-D array of a Zarr group written by another tool (float16/bfloat16/float32 rows)."""
    parallel: str = "data"
    """With several processes: data (each batch split across ranks, gradients averaged by DDP) or members
    (members partitioned across ranks, every rank reads the same batches; with several hooks, the members of all
    hooks in contiguous shares balanced by cost)."""
    kernel: str = "auto"
    """Training step: fused (hand-derived backward, members in groups; standard and topk), autograd, or auto
    (fused where the architecture has it)."""
    member_group: int = 0
    """Members per batched matmul in the fused kernel, and per forward/backward on the autograd path (not under
    DDP); 0 = auto (on CUDA the most whose step intermediates fit in half the free memory, docs/distributed.md#memory;
    4 on CPU, docs/benchmarks.md)."""
    compile: bool | None = None
    """torch.compile the step; None = auto: on CUDA, and on CPU for fused-kernel runs of >= 100 steps (compiling
    costs tens of seconds once; see docs/benchmarks.md)."""
    precision: str = "fp32"
    """Matmul precision of the step: fp32; bf16 (bf16 operands, fp32 accumulation; master weights, gradients and
    Adam stay fp32; the fused kernel or autograd under autocast); auto (bf16 on CUDA with bf16 support and on CPUs
    whose measured bf16 matmul is >= 1.2x fp32, else fp32; the log says which)."""
    autocast: str = "none"
    """Deprecated alias: `--autocast bf16` is `--precision bf16`."""
    report: bool = True
    """After training, write OUTPUT_DIR/report/index.html (plots, member table; `saetool report` has more options)."""
    report_contexts: int = 8
    """Held-out contexts for the report's spliced CE/KL evaluation with the store's model (0 = skip it)."""
    wandb_project: str | None = None
    """Also log training statistics and the held-out metrics of every member to this Weights & Biases project
    (rank 0; needs `pip install wandb`; WANDB_MODE=offline keeps the run on disk)."""
    checkpoint_every: int = 0
    """Save weights, Adam state and data position every N steps (0 = never) to OUTPUT_DIR/checkpoint/."""
    resume: bool = False
    """Continue from OUTPUT_DIR/checkpoint/ (same settings) to exactly the uninterrupted result."""
    plan: bool = False
    """Print the memory estimate per rank (parameters, Adam state, gradients, the step's intermediates, the loader) and
    the member group, whether it fits on CUDA, then exit: nothing is trained or written (docs/distributed.md#memory)."""
    dist_timeout: float = 1800.0
    """Seconds a collective (barrier, all-reduce, gather) may wait under several processes before the process group
    fails it, for gloo (CPU) and NCCL (GPU, whose own default is 600 s) alike; the launchers (launch/*.py) create the
    group with it. No rank waits in a collective on unbounded work of another (docs/distributed.md)."""

    @property
    def data(self) -> DataSection:
        """The flags of what is read: store, hooks, held-out rows, batches."""
        return _section(DataSection, self)

    @property
    def arch(self) -> ArchitectureSection:
        """The flags of the ensemble's architecture, sweep values and initialisation."""
        return _section(ArchitectureSection, self)

    @property
    def training(self) -> TrainingSection:
        """The flags of the optimisation: learning rate, schedules, clipping, dead latents."""
        return _section(TrainingSection, self)

    @property
    def runtime(self) -> RuntimeSection:
        """The flags of where and how the step runs: device, processes, kernel, precision, checkpoints."""
        return _section(RuntimeSection, self)

    @property
    def output(self) -> OutputSection:
        """The flags of what is written: folders, snapshots, report, logging, --config ensembles."""
        return _section(OutputSection, self)

    @property
    def step_precision(self) -> str:
        """--precision, with the deprecated --autocast bf16 read as --precision bf16."""
        return "bf16" if self.autocast == "bf16" else self.precision

    def clip_norm(self, d_out: int) -> float:
        """--grad_clip_norm with None resolved: AUTO_CLIP_ARCHITECTURES 1 / d_out (the reconstructed width, d_in for
        an SAE: our MSE is a mean over it where SAELens sums it), others 0 = off."""
        if self.grad_clip_norm is not None:
            return self.grad_clip_norm
        return 1.0 / d_out if self.architecture in AUTO_CLIP_ARCHITECTURES else 0.0

    def validate(self) -> None:
        check_device(self.device)
        check(self.ratio > 0, "ratio", "must be > 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.adam_lr > 0, "adam_lr", "must be > 0")
        check(self.n_repetitions >= 1, "n_repetitions", "must be >= 1")
        check(self.l1_value_n >= 1, "l1_value_n", "must be >= 1")
        check(self.eval_tokens >= 0, "eval_tokens", "must be >= 0")
        check(self.b_dec_init in ("mean", "geometric_median", "zeros"), "b_dec_init",
               "must be mean, geometric_median or zeros")
        check(self.lr_decay_steps >= 0, "lr_decay_steps", "must be >= 0")
        check(self.grad_clip_norm is None or 0 <= self.grad_clip_norm < float("inf"), "grad_clip_norm",
               "must be a finite number >= 0, or auto")
        check(self.dead_window >= 1, "dead_window", "must be >= 1")
        check(self.auxk_coefficient >= 0, "auxk_coefficient", "must be >= 0")
        check(self.k_aux >= 0, "k_aux", "must be >= 0")
        check(self.resample_every >= 0, "resample_every", "must be >= 0")
        check(0 < self.threshold_lr <= 1, "threshold_lr", "must be in (0, 1]")
        check(not (self.k_aux and not self.auxk_coefficient), "k_aux", "needs --auxk_coefficient > 0")
        check(self.architecture in ARCHITECTURES, "architecture", f"must be one of {', '.join(ARCHITECTURES)}")
        if self.ensembles is None:  # with ensembles, saetool.sweep.driver.ensemble_configs checks each one
            self._refuse_flags_that_cannot_act()
            check_sweep_flags(self)
        check(self.normalize_activations in ("none", "expected_average_only_in"), "normalize_activations",
               "must be none or expected_average_only_in")
        check(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
        check(self.l1_warmup_steps >= 0, "l1_warmup_steps", "must be >= 0")
        check(self.jumprelu_init_threshold > 0, "jumprelu_init_threshold", "must be > 0")
        check(self.jumprelu_bandwidth > 0, "jumprelu_bandwidth", "must be > 0")
        if self.l0_values is not None:
            check(len(self.l0_values) > 0 and all(v >= 0 for v in self.l0_values), "l0_values",
                   "must be a non-empty list of values >= 0")
        if self.ensembles is not None:
            check(isinstance(self.ensembles, list) and len(self.ensembles) > 0
                   and all(isinstance(e, dict) for e in self.ensembles), "ensembles", "must be a list of flag dicts")
        check(self.parallel in ("data", "members"), "parallel", "must be data or members")
        check(self.autocast in ("none", "bf16"), "autocast", "must be none or bf16")
        check(self.precision in ("fp32", "bf16", "auto"), "precision", "must be fp32, bf16 or auto")
        check(self.autocast == "none" or self.precision in ("fp32", "bf16"), "autocast",
               "is a deprecated alias of --precision bf16; pass only --precision")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        check(self.dist_timeout > 0, "dist_timeout", "must be > 0 seconds")
        check(self.kernel in ("auto", "fused", "autograd"), "kernel", "must be auto, fused or autograd")
        check(self.member_group >= 0, "member_group", "must be >= 0")
        check(self.report_contexts >= 0, "report_contexts", "must be >= 0")
        if self.l1_values is not None:
            check(len(self.l1_values) > 0 and all(v >= 0 for v in self.l1_values), "l1_values",
                   "must be a non-empty list of values >= 0")
        if self.k_values is not None:
            check(len(self.k_values) > 0 and all(int(k) >= 1 for k in self.k_values), "k_values",
                   "must be a non-empty list of integers >= 1")
        for name in ("l1_values", "k_values", "l0_values"):
            values = getattr(self, name) or []
            repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
            check(repeated is None, name, f"has the value {repeated} twice (each member needs its own)")
        check(self.l1_values is not None or self.l1_value_n == 1 or self.l1_value_min != self.l1_value_max,
               "l1_value_max", f"must differ from --l1_value_min for --l1_value_n {self.l1_value_n} distinct values")


    def _refuse_flags_that_cannot_act(self) -> None:
        """A flag set away from its default on an architecture it does not act on is refused (ARCHITECTURE_FLAGS),
        and so is --kernel fused where the fused kernel cannot run."""
        defaults = SweepConfig()
        for name, architectures in ARCHITECTURE_FLAGS.items():
            check(getattr(self, name) == getattr(defaults, name) or self.architecture in architectures, name,
                   f"applies to {join_names(architectures)} only, not --architecture {self.architecture}")
        check(self.kernel != "fused" or self.architecture in FUSED_ARCHITECTURES, "kernel",
               f"fused has no architecture {self.architecture}; it has {join_names(FUSED_ARCHITECTURES)} "
               "(use --kernel autograd or auto)")
        check(self.kernel != "fused" or not self.auxk_coefficient, "kernel",
               "fused has no --auxk_coefficient; use --kernel autograd (or auto)")


# --grad_clip_norm None clips these at 1 / d_out: SAELens's clipping at 1, in our loss's units (our MSE is a mean
# over d_out where SAELens sums it). At equal L0 on the demo store it lowers FVU by 57% (standard), 15% (BatchTopK)
# and 43% (JumpReLU); TopK is mixed (better at k 16/64/128 here, 28% worse at k 16 on a 3x longer run), so it stays
# off there (docs/architectures.md "Gradient clipping by default", benchmarks/bench_quality.py).
AUTO_CLIP_ARCHITECTURES = ("standard", "gated", "batchtopk", "matryoshka_batchtopk", "jumprelu")
# Flags that act on some architectures only: {flag: the architectures it acts on}, from each architecture's FLAGS.
# SweepConfig.validate refuses one set away from its default on any other architecture (e.g. --k_values with standard).
ARCHITECTURE_FLAGS = architecture_flags()


# The sections of a sweep's flags. The flags stay flat on the command line and in YAML; each layer receives the section
# it needs (cfg.data, cfg.arch, cfg.training, cfg.runtime, cfg.output: frozen copies). Every field of SweepConfig is in
# exactly one section (tests/config/test_sections.py).
SECTIONS = {
    "data": ("dataset_dir", "hook_name", "target_hook", "array", "eval_tokens", "batch_size", "shuffle_chunks",
             "seed"),
    "arch": ("architecture", "ratio", "tied", "skip_connection", "l1_value_min", "l1_value_max", "l1_value_n",
             "l1_values", "k_values", "l0_values", "jumprelu_bandwidth", "jumprelu_init_threshold",
             "matryoshka_widths", "threshold_lr", "normalize_activations", "decoder_norm_l1", "auxk_coefficient",
             "k_aux", "b_dec_init"),
    "training": ("adam_lr", "n_repetitions", "lr_warmup_steps", "l1_warmup_steps", "lr_decay_steps",
                 "grad_clip_norm", "dead_window", "resample_every"),
    "runtime": ("device", "parallel", "kernel", "member_group", "compile", "precision", "autocast",
                "checkpoint_every", "resume", "plan", "dist_timeout"),
    "output": ("output_dir", "save_after_every", "report", "report_contexts", "wandb_project", "config", "ensembles"),
}


def _section_class(name: str, doc: str, **namespace):
    fields = {f.name: f for f in dataclasses.fields(SweepConfig)}
    cls = dataclasses.make_dataclass(name, [(n, fields[n].type) for n in SECTIONS[_KEYS[name]]], frozen=True,
                                     namespace=namespace)
    cls.__doc__ = doc + " Fields: the SweepConfig flags of the same names."
    cls.__module__ = __name__
    return cls


_KEYS = {"DataSection": "data", "ArchitectureSection": "arch", "TrainingSection": "training",
         "RuntimeSection": "runtime", "OutputSection": "output"}
DataSection = _section_class("DataSection", "What a sweep reads: the store, its hooks, the held-out rows, the batches.")
ArchitectureSection = _section_class("ArchitectureSection", "The ensemble: architecture, width, swept values, init.")
TrainingSection = _section_class("TrainingSection", "The optimisation: Adam, schedules, clipping, dead latents.")
RuntimeSection = _section_class("RuntimeSection", "Where and how the step runs: device, processes, kernel, "
                                "precision, checkpoints.", step_precision=SweepConfig.step_precision)
OutputSection = _section_class("OutputSection", "What a sweep writes: folders, snapshots, report, logging.")


def _section(cls, cfg: SweepConfig):
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})
