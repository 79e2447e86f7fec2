"""The run a sweep config describes, built once before training: `setup_run(cfg) -> SweepRun`.

It checks the output folder, opens the store, splits its rows (the last `eval_tokens` rows, rounded up to whole
contexts, are never trained on), chooses this rank's members (all of them, or a contiguous share with
`--parallel members`), builds and initialises the ensemble (b_dec from the data, JumpReLU threshold, input
normalisation), and makes the optimizer and the training batch loader. Every check raises one line before
anything is written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saetool.config import (
    ArchitectureSection,
    DataSection,
    OutputSection,
    RuntimeSection,
    SweepConfig,
    TrainingSection,
)
from saetool.ensemble import SAEEnsemble, geometric_median, normalization_factor
from saetool.evaluate import heldout_rows
from saetool.saes import get_architecture
from saetool.saved import INDEX_FILE
from saetool.store import ActivationStore, BatchLoader, StoreError
from saetool.train.checkpoint import Checkpointer
from saetool.train.step import make_optimizer
from saetool.util import Dist, split_evenly


@dataclass
class SweepRun:
    """Everything the loop, the evaluation and the saving share. `local` are this rank's member indices (empty: an
    idle run, whose ensemble and optimizer are None: a member-parallel rank of a multi-hook sweep holding none of
    this hook's members, which still takes part in the run's collectives); `scale` multiplies every input row
    (normalize_activations; folded into the saved weights); `target` is a transcoder's output hook (None for SAEs):
    the loader's batches then hold [x_in | x_out] side by side; `member_group` the group the memory plan chose
    (saetool.train.plan; None: the runtime's default)."""

    cfg: SweepConfig
    dist: Dist
    out: Path
    store: ActivationStore
    hook: str
    hyper: dict[str, list]
    local: range
    by_members: bool
    data_parallel: bool
    train_rows: tuple[int, int]
    eval_rows: tuple[int, int] | None
    ensemble: SAEEnsemble | None
    optimizer: torch.optim.Optimizer | None
    loader: BatchLoader
    checkpointer: Checkpointer
    scale: float = 1.0
    target: str | None = None
    member_group: int | None = None

    @functools.cached_property
    def data(self) -> DataSection:
        return self.cfg.data

    @functools.cached_property
    def arch(self) -> ArchitectureSection:
        return self.cfg.arch

    @functools.cached_property
    def training(self) -> TrainingSection:
        return self.cfg.training

    @functools.cached_property
    def runtime(self) -> RuntimeSection:
        return self.cfg.runtime

    @functools.cached_property
    def output(self) -> OutputSection:
        return self.cfg.output

    @property
    def grad_clip_norm(self) -> float:
        """--grad_clip_norm resolved for this run's reconstructed width (SweepConfig.clip_norm)."""
        return self.cfg.clip_norm(self.store.width(self.target or self.hook))

    @property
    def n_members(self) -> int:
        return len(next(iter(self.hyper.values())))

    @property
    def idle(self) -> bool:
        return len(self.local) == 0

    @property
    def total_steps(self) -> int:
        return len(self.loader) * self.training.n_repetitions


def member_hyperparams(cfg: SweepConfig) -> dict[str, list]:
    """The swept values: {"l1_coefficient": [...]} (explicit list, or 10**linspace(min, max, n) as the original)
    for standard/gated, {"k": [...]} for topk/batchtopk/matryoshka_batchtopk, {"l0_coefficient": [...],
    "bandwidth": [...]} for jumprelu."""
    if get_architecture(cfg.architecture).SWEEP_PARAM == "k":
        return {"k": [int(k) for k in (cfg.k_values or [16, 32, 64, 128])]}
    if cfg.architecture == "jumprelu":
        l0 = [float(v) for v in (cfg.l0_values or [1e-3, 3e-3, 1e-2, 3e-2])]
        return {"l0_coefficient": l0, "bandwidth": [float(cfg.jumprelu_bandwidth)] * len(l0)}
    if cfg.l1_values is not None:
        return {"l1_coefficient": [float(v) for v in cfg.l1_values]}
    return {"l1_coefficient": [float(v) for v in np.logspace(cfg.l1_value_min, cfg.l1_value_max, cfg.l1_value_n)]}


def split_rows(store: ActivationStore, eval_tokens: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(train_range, eval_range): the last `eval_tokens` rows, rounded up to whole contexts, are held out
    (saetool.evaluate.heldout_rows). StoreError (one line) if no training row is left."""
    try:
        held = heldout_rows(store.spec.n_rows, store.spec.context_size, eval_tokens)
    except ValueError as e:
        raise StoreError(str(e)) from None
    return ((0, store.spec.n_rows), None) if held is None else ((0, held[0]), held)


def data_sample(store: ActivationStore, hook: str, rows: tuple[int, int], max_rows: int = 65536) -> torch.Tensor:
    """The first (up to) max_rows unmasked training rows, float64 [n, d_in]."""
    start, stop = rows[0], min(rows[1], rows[0] + max_rows)
    return store.read_rows(hook, start, stop, torch.float64)[torch.from_numpy(store.read_mask(start, stop))]


def b_dec_init(how: str, store: ActivationStore, hook: str, rows: tuple[int, int]) -> torch.Tensor | None:
    """The initial b_dec [d_in] (float32) from up to 65536 training rows: their mean or geometric median; None
    for zeros."""
    if how == "zeros":
        return None
    sample = data_sample(store, hook, rows)
    return (sample.mean(0) if how == "mean" else geometric_median(sample)).float()


def architecture_options(cfg: SweepConfig) -> dict:
    """The ensemble-wide architecture options given by flags (the others keep their defaults)."""
    options = {}
    if cfg.matryoshka_widths:
        options["matryoshka_widths"] = cfg.matryoshka_widths
    if cfg.architecture in ("batchtopk", "matryoshka_batchtopk"):
        options["threshold_lr"] = cfg.threshold_lr
    return options


def setup_run(cfg: SweepConfig, dist: Dist, log=print, local: range | None = None,
              member_group: int | None = None) -> SweepRun:
    """Build the run `cfg` describes on this rank. `local` overrides this rank's members with --parallel members
    (saetool.sweep.multihook's cost-balanced shares; may be empty: an idle run); `member_group` the step's member
    group (the memory plan's, saetool.train.plan). Raises StoreError/ValueError (one line)
    for a missing, incomplete or foreign store, an unknown hook, a ratio giving d_sae 0, fewer members than
    processes with --parallel members, or an output_dir that holds a finished sweep (or an unfinished one without
    --resume)."""
    out = Path(cfg.output_dir)
    if (out / INDEX_FILE).exists():
        raise ValueError(f"{out} already holds a finished sweep; choose another --output_dir or delete it")
    store = ActivationStore.open(cfg.dataset_dir) if cfg.array is None else ActivationStore.open(cfg.dataset_dir,
                                                                                                  array=cfg.array)
    hook = store.resolve_hook(cfg.array or cfg.hook_name)
    target = target_hook(store, hook, cfg.target_hook)
    d_in = store.width(hook)
    d_sae = int(d_in * cfg.ratio)
    if d_sae < 1:
        raise ValueError(f"--ratio {cfg.ratio} gives d_sae = 0 for d_in = {d_in}")
    hyper = member_hyperparams(cfg)
    n_members = len(next(iter(hyper.values())))
    by_members = cfg.parallel == "members" and dist.active
    if local is None:
        local = split_evenly(n_members, dist.world_size, dist.rank) if by_members else range(n_members)
        if len(local) == 0:
            raise ValueError(f"--parallel members needs at least one member per process ({n_members} members, "
                             f"{dist.world_size} processes)")
    checkpointer = Checkpointer(out, dist, shard_by_rank=by_members)
    if checkpointer.exists() and not cfg.resume:
        raise ValueError(f"{out} holds an unfinished sweep; pass --resume True to continue it, or delete {out}")
    train_rows, eval_rows = split_rows(store, cfg.eval_tokens)
    loader = BatchLoader(store, hook if target is None else (hook, target), cfg.batch_size, train_rows, seed=cfg.seed,
                         shuffle_chunks=cfg.shuffle_chunks)
    ensemble = optimizer = None
    scale = 1.0
    if len(local):
        ensemble = SAEEnsemble(cfg.architecture, d_in, d_sae, {h: [v[i] for i in local] for h, v in hyper.items()},
                               seeds=[cfg.seed + i for i in local], tied=cfg.tied, options=architecture_options(cfg),
                               decoder_norm_l1=cfg.decoder_norm_l1, auxk_coefficient=cfg.auxk_coefficient,
                               k_aux=cfg.k_aux, d_out=None if target is None else store.width(target),
                               skip_connection=cfg.skip_connection).to(cfg.device)
        scale = _initialise(ensemble, cfg, store, hook, train_rows, log, target)
        optimizer = make_optimizer(ensemble.parameters(), cfg.adam_lr)
    run = SweepRun(cfg, dist, out, store, hook, hyper, local, by_members, cfg.parallel == "data" and dist.active,
                   train_rows, eval_rows, ensemble, optimizer, loader, checkpointer, scale, target, member_group)
    if cfg.lr_decay_steps > run.total_steps:
        raise ValueError(f"--lr_decay_steps {cfg.lr_decay_steps} is more than this run's {run.total_steps} steps "
                         f"({loader.n_rows} rows / batch {cfg.batch_size} x {cfg.n_repetitions} repetitions)")
    return run


def target_hook(store: ActivationStore, hook: str, target: str | None) -> str | None:
    """The transcoder target hook `target` of `store` (None for an SAE), checked against the input `hook`: StoreError
    (one line naming --target_hook) for a hook the store lacks, or an array whose row count differs from the
    input's (every hook of a saetool store shares one row mask, so equal rows mean equal masks)."""
    if target is None:
        return None
    try:
        target = store.resolve_hook(target)
    except StoreError as e:
        raise StoreError(f"--target_hook: {e}") from None
    rows = {h: store.group[h].shape[0] for h in (hook, target)}
    if rows[hook] != rows[target]:
        raise StoreError(f"--target_hook {target} has {rows[target]} rows but --hook_name {hook} has {rows[hook]} in "
                         f"{store.path}; a transcoder needs both hooks of the same rows (regenerate the store)")
    return target


def _initialise(ensemble: SAEEnsemble, cfg: SweepConfig, store: ActivationStore, hook: str,
                train_rows: tuple[int, int], log, target: str | None = None) -> float:
    """The input scale (returned; 1.0 without normalisation), b_dec from data (a transcoder's: from its target
    hook), and JumpReLU's threshold unit and initial threshold from the data scale of the encoder's input
    (saetool.saes.jumprelu.initialise)."""
    scale = 1.0
    if cfg.normalize_activations == "expected_average_only_in":
        scale = normalization_factor(data_sample(store, hook, train_rows))
        log(f"normalize_activations: inputs x {scale:.4g} (mean norm sqrt(d_in)), folded into the saved weights")
    b_dec = b_dec_init(cfg.b_dec_init, store, hook if target is None else target, train_rows)
    if b_dec is not None:
        ensemble.set_b_dec(b_dec * scale)
    if cfg.architecture == "jumprelu":  # threshold unit and initial threshold from the data scale
        ensemble.arch.initialise(ensemble.training_tensors(), cfg.jumprelu_init_threshold,
                                 data_sample(store, hook, train_rows) * scale)
    return scale
