"""Run configurations. Each field's docstring (the string literal under it) is its CLI help.

`build(cls, kwargs)` turns CLI/API keyword arguments into a validated config; unknown flags and bad values
raise ValueError with a one-line message naming the flag.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field


def _default_device() -> str:
    """cuda if available, else cpu"""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class GenerateConfig:
    model: str = "smollm2-135m"
    """Model: "smollm2-135m" (embedded, offline), a local HF model folder, or a hub name such as EleutherAI/pythia-70m-deduped."""
    dataset: str = "shakespeare"
    """Text: "shakespeare" (embedded, offline), a local .txt/.jsonl/.parquet file or folder, or a hub dataset name."""
    dataset_split: str = "train"
    """Split of a hub dataset."""
    text_column: str = "text"
    """Column holding the text (jsonl, parquet, hub datasets)."""
    locations: list[str] = field(default_factory=lambda: ["residual"])
    """Hook points: TransformerLens hook names (blocks.2.hook_resid_post) or aliases expanded over --layers:
    residual, mlp, mlpin (the MLP's input, mlp.hook_in), mlpout, attn_concat, attn (= hook_attn_out)."""
    layers: list[int] = field(default_factory=lambda: [2])
    """Layers for the location aliases."""
    dataset_folder: str = "activation_data"
    """The Zarr store to write (created, or resumed if it holds a partial run with the same settings)."""
    n_chunks: int | None = None
    """Chunks to produce (the budget: n_chunks x chunk_size tokens); None = as many as the text fills. The text is
    streamed and read only as far as the budget; a corpus that ends first is stored whole, with a warning."""
    chunk_size: int = 16384
    """Rows (tokens) per chunk; a multiple of --context_size. A chunk is the unit of compression, commit and shuffling."""
    context_size: int = 128
    """Tokens per context, BOS included."""
    batch_size: int = 8
    """Contexts per model forward."""
    prepend_bos: bool = True
    """Start every context with BOS (its row is stored but masked out of training)."""
    concat: bool = True
    """Concatenate documents (separated by EOS) into full contexts; False = one document per context group, padded."""
    seed: int = 0
    """Seed of the context shuffle buffer; the store's rows depend only on the text, the settings and this seed."""
    shuffle_buffer: int = 8192
    """Contexts in the seeded shuffle buffer that mixes the streamed contexts (memory: 5 bytes x context_size each,
    5.2 MB at 8192 x 128); with --n_chunks x chunk_size / context_size <= this, the stored contexts are fully permuted."""
    dtype: str = "float16"
    """Stored activation dtype: float16 (overflow-checked), bfloat16 or float32."""
    compression: str = "blosc-zstd"
    """Codec: blosc-zstd (byte shuffle), zstd or none."""
    keepbits: int | None = None
    """Lossy: round stored values to this many mantissa bits (nearest, ties to even, as numcodecs BitRound) before
    compressing; None = lossless. Full precision: float16 10, bfloat16 7, float32 23."""
    device: str = field(default_factory=_default_device)
    """Torch device of the model."""
    model_dtype: str = "float32"
    """dtype the model runs in: float32, bfloat16 or float16."""

    def validate(self) -> None:
        check_device(self.device)
        _check(self.context_size >= 2, "context_size", "must be >= 2")
        _check(self.chunk_size >= self.context_size and self.chunk_size % self.context_size == 0, "chunk_size",
               f"must be a positive multiple of context_size={self.context_size}")
        _check(self.n_chunks is None or self.n_chunks >= 1, "n_chunks", "must be >= 1 (or None for all the text)")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        _check(self.dtype in ("float16", "bfloat16", "float32"), "dtype", "must be float16, bfloat16 or float32")
        _check(self.compression in ("blosc-zstd", "zstd", "none"), "compression", "must be blosc-zstd, zstd or none")
        _check(len(self.locations) > 0, "locations", "needs at least one hook point")
        bits = {"float16": 10, "bfloat16": 7, "float32": 23}[self.dtype]
        _check(self.keepbits is None or 0 <= self.keepbits <= bits, "keepbits",
               f"must be in 0..{bits} for --dtype {self.dtype} (or None for lossless)")


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
    (1/d_out for a transcoder) for every architecture but topk (SAELens clips at 1 a loss d_in times ours; README
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
    device: str = field(default_factory=_default_device)
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
    DDP); 0 = auto (all on CUDA, 4 on CPU; see the benchmark)."""
    compile: bool | None = None
    """torch.compile the step; None = auto: on CUDA, and on CPU for fused-kernel runs of >= 100 steps (compiling
    costs tens of seconds once; see the README's benchmark)."""
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
        _check(self.ratio > 0, "ratio", "must be > 0")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.adam_lr > 0, "adam_lr", "must be > 0")
        _check(self.n_repetitions >= 1, "n_repetitions", "must be >= 1")
        _check(self.l1_value_n >= 1, "l1_value_n", "must be >= 1")
        _check(self.eval_tokens >= 0, "eval_tokens", "must be >= 0")
        _check(self.b_dec_init in ("mean", "geometric_median", "zeros"), "b_dec_init",
               "must be mean, geometric_median or zeros")
        _check(self.lr_decay_steps >= 0, "lr_decay_steps", "must be >= 0")
        _check(self.grad_clip_norm is None or 0 <= self.grad_clip_norm < float("inf"), "grad_clip_norm",
               "must be a finite number >= 0, or auto")
        _check(self.dead_window >= 1, "dead_window", "must be >= 1")
        _check(self.auxk_coefficient >= 0, "auxk_coefficient", "must be >= 0")
        _check(self.k_aux >= 0, "k_aux", "must be >= 0")
        _check(self.resample_every >= 0, "resample_every", "must be >= 0")
        _check(0 < self.threshold_lr <= 1, "threshold_lr", "must be in (0, 1]")
        _check(not (self.k_aux and not self.auxk_coefficient), "k_aux", "needs --auxk_coefficient > 0")
        from saetool.saes import ARCHITECTURES

        _check(self.architecture in ARCHITECTURES, "architecture", f"must be one of {', '.join(ARCHITECTURES)}")
        if self.ensembles is None:  # with ensembles, saetool.sweep.driver.ensemble_configs checks each one
            self._refuse_flags_that_cannot_act()
            from saetool.saes import check_sweep_flags

            check_sweep_flags(self)
        _check(self.normalize_activations in ("none", "expected_average_only_in"), "normalize_activations",
               "must be none or expected_average_only_in")
        _check(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
        _check(self.l1_warmup_steps >= 0, "l1_warmup_steps", "must be >= 0")
        _check(self.jumprelu_init_threshold > 0, "jumprelu_init_threshold", "must be > 0")
        _check(self.jumprelu_bandwidth > 0, "jumprelu_bandwidth", "must be > 0")
        if self.l0_values is not None:
            _check(len(self.l0_values) > 0 and all(v >= 0 for v in self.l0_values), "l0_values",
                   "must be a non-empty list of values >= 0")
        if self.ensembles is not None:
            _check(isinstance(self.ensembles, list) and len(self.ensembles) > 0
                   and all(isinstance(e, dict) for e in self.ensembles), "ensembles", "must be a list of flag dicts")
        _check(self.parallel in ("data", "members"), "parallel", "must be data or members")
        _check(self.autocast in ("none", "bf16"), "autocast", "must be none or bf16")
        _check(self.precision in ("fp32", "bf16", "auto"), "precision", "must be fp32, bf16 or auto")
        _check(self.autocast == "none" or self.precision in ("fp32", "bf16"), "autocast",
               "is a deprecated alias of --precision bf16; pass only --precision")
        _check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        _check(self.kernel in ("auto", "fused", "autograd"), "kernel", "must be auto, fused or autograd")
        _check(self.member_group >= 0, "member_group", "must be >= 0")
        _check(self.report_contexts >= 0, "report_contexts", "must be >= 0")
        if self.l1_values is not None:
            _check(len(self.l1_values) > 0 and all(v >= 0 for v in self.l1_values), "l1_values",
                   "must be a non-empty list of values >= 0")
        if self.k_values is not None:
            _check(len(self.k_values) > 0 and all(int(k) >= 1 for k in self.k_values), "k_values",
                   "must be a non-empty list of integers >= 1")
        for name in ("l1_values", "k_values", "l0_values"):
            values = getattr(self, name) or []
            repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
            _check(repeated is None, name, f"has the value {repeated} twice (each member needs its own)")
        _check(self.l1_values is not None or self.l1_value_n == 1 or self.l1_value_min != self.l1_value_max,
               "l1_value_max", f"must differ from --l1_value_min for --l1_value_n {self.l1_value_n} distinct values")


    def _refuse_flags_that_cannot_act(self) -> None:
        """A flag set away from its default on an architecture it does not act on is refused (ARCHITECTURE_FLAGS),
        and so is --kernel fused where the fused kernel cannot run."""
        defaults = SweepConfig()
        for name, architectures in ARCHITECTURE_FLAGS.items():
            _check(getattr(self, name) == getattr(defaults, name) or self.architecture in architectures, name,
                   f"applies to {_names(architectures)} only, not --architecture {self.architecture}")
        from saetool.ensemble import FUSED_ARCHITECTURES

        _check(self.kernel != "fused" or self.architecture in FUSED_ARCHITECTURES, "kernel",
               f"fused has no architecture {self.architecture}; it has {_names(FUSED_ARCHITECTURES)} "
               "(use --kernel autograd or auto)")
        _check(self.kernel != "fused" or not self.auxk_coefficient, "kernel",
               "fused has no --auxk_coefficient; use --kernel autograd (or auto)")


_L1 = ("standard", "gated")
# --grad_clip_norm None clips these at 1 / d_out: SAELens's clipping at 1, in our loss's units (our MSE is a mean
# over d_out where SAELens sums it). At equal L0 on the demo store it lowers FVU by 57% (standard), 15% (BatchTopK)
# and 43% (JumpReLU); TopK is mixed (better at k 16/64/128 here, 28% worse at k 16 on a 3x longer run), so it stays
# off there (README "Gradient clipping by default", benchmarks/bench_quality.py).
AUTO_CLIP_ARCHITECTURES = ("standard", "gated", "batchtopk", "matryoshka_batchtopk", "jumprelu")
_TOPK = ("topk", "batchtopk", "matryoshka_batchtopk")
# Flags that act on some architectures only: {flag: the architectures it acts on}. SweepConfig.validate refuses
# one set away from its default on any other architecture (e.g. --k_values with standard).
ARCHITECTURE_FLAGS = {
    "l1_values": _L1, "l1_value_min": _L1, "l1_value_max": _L1, "l1_value_n": _L1,
    "l1_warmup_steps": (*_L1, "jumprelu"),
    "k_values": _TOPK, "auxk_coefficient": _TOPK,
    "threshold_lr": ("batchtopk", "matryoshka_batchtopk"),
    "matryoshka_widths": ("matryoshka_batchtopk",),
    "l0_values": ("jumprelu",), "jumprelu_bandwidth": ("jumprelu",), "jumprelu_init_threshold": ("jumprelu",),
    "decoder_norm_l1": ("standard",), "tied": ("standard",),
    "resample_every": ("standard", *_TOPK),
    "target_hook": ("standard", *_TOPK, "jumprelu"),  # --skip_connection needs it (saetool.saes.transcoder)
}


def _names(items) -> str:
    """("a",) -> "a"; ("a", "b", "c") -> "a, b and c"."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def check_device(device: str, name: str = "device") -> None:
    """ValueError naming --device for a string torch cannot parse, or a device this machine does not have
    (cuda without CUDA, cuda:N beyond the visible GPUs, mps without MPS)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--{name} {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        _check(torch.cuda.is_available(), name, f"{device}: CUDA is not available here (torch {torch.__version__}"
               f"{'' if torch.version.cuda else ', built without CUDA'}); use --{name} cpu")
        _check(dev.index is None or dev.index < torch.cuda.device_count(), name,
               f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        _check(torch.backends.mps.is_available(), name, f"{device}: MPS is not available here; use --{name} cpu")
    else:
        _check(dev.type == "cpu", name, f"{device}: saetool runs on cpu, cuda or mps")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"--{name} {message}")


def _integer(value):
    """int(value) for ints, integral floats and their strings; ValueError for anything else (3.5, "3.5", True)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    f = float(value)
    if not f.is_integer():
        raise ValueError(value)
    return int(f)


def _as_list(value, item_type, name: str):
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(" ", ",").split(",") if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    try:
        return [(_integer if item_type is int else item_type)(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"--{name} expects a list of {item_type.__name__}, got {value!r}") from None


def build(cls, kwargs: dict):
    """Build and validate a config dataclass from keyword arguments (CLI flags); ValueError on unknown flags."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"unknown flag --{unknown[0]}; valid flags: {', '.join('--' + n for n in fields)}")
    values = {}
    for name, value in kwargs.items():
        hint = str(fields[name].type)
        if hint.startswith("list[str]"):
            value = _as_list(value, str, name)
        elif hint.startswith("list[int]"):
            value = _as_list(value, int, name)
        elif hint.startswith("list[float]"):
            value = _as_list(value, float, name)
        elif hint.startswith("bool") and value is not None:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                value = value.lower() in ("true", "1")
            if not isinstance(value, bool):
                raise ValueError(f"--{name} expects True or False, got {value!r}")
        elif hint.startswith("int") and value is not None:
            try:
                value = _integer(value)
            except (TypeError, ValueError):
                raise ValueError(f"--{name} expects an integer, got {value!r}") from None
        elif hint.startswith("float") and hint.endswith("None") and str(value).lower() in ("auto", "none"):
            value = None  # an optional number's automatic setting (--grad_clip_norm auto)
        elif hint.startswith("float") and value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"--{name} expects a number, got {value!r}") from None
        elif hint.startswith("str") and value is not None:
            value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        values[name] = value
    cfg = cls(**values)
    cfg.validate()
    return cfg
