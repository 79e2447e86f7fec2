"""The sweep driver: store -> ensemble of SAEs -> saved members -> evaluation on held-out rows.

All members (one per L1 coefficient, or per k for TopK) train together as one `SAEEnsemble` on the same
batches. With several processes (Accelerate / torchrun) the work is split in one of two ways:

- `--parallel data`: every rank holds all members; each global batch is split across ranks
  (`split_evenly`), losses are normalised by the global batch size and DistributedDataParallel averages
  gradients, so training equals one process with the same global batch. Every rank walks the same batches,
  so uneven data never leaves a rank waiting in a collective (case D1).
- `--parallel members`: members are partitioned across ranks (equal shapes, so contiguous equal shares are
  balanced); every rank reads the same batches; no gradient traffic. Each member equals single-process training.

The last `eval_tokens` rows (rounded up to whole contexts) are never trained on; every member is evaluated
there (MSE, FVU, explained variance, L0, dead fraction; saetool.metrics). Only rank 0 writes outputs.
`--checkpoint_every` saves weights, Adam state and the data position; `--resume` continues to exactly the
uninterrupted result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import saetool
from saetool.config import SweepConfig
from saetool.distributed import Dist, split_evenly
from saetool.ensemble import SAEEnsemble, loss_and_stats, train_step
from saetool.fused import FUSED_ARCHITECTURES, fused_loss_and_grads
from saetool.io import INDEX_FILE, member_folder_name, write_sweep
from saetool.loader import BatchLoader
from saetool.metrics import ReconstructionStats
from saetool.recipes import (
    DeadLatentTracker,
    clip_grad_norm_per_member,
    coefficient_multiplier,
    fold_normalization,
    geometric_median,
    lr_multiplier,
    normalization_factor,
    resample_dead_latents,
)
from saetool.saes import get_architecture
from saetool.saes._common import global_batch
from saetool.store import ActivationStore, StoreError

LOG_EVERY = 20
# --compile auto on CPU: compile the fused step for runs of at least this many steps. benchmarks/bench_sweep.py
# (16 members, ratio 8, d_in 576, batch 4096, 2 cores): the compiled step is 1.19x the eager one (10.6 s vs 12.6 s),
# compiling costs ~6 s with a warm inductor cache and tens of seconds cold, so it pays after 3 to ~20 steps;
# 100 leaves a margin for smaller shapes, where the saving per step is smaller.
CPU_COMPILE_MIN_STEPS = 100
# Settings that may differ between a checkpointed run and its resumption.
RESUME_FREE = ("resume", "checkpoint_every", "device", "compile", "kernel", "member_group")


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


def _architecture_options(cfg: SweepConfig) -> dict:
    """The ensemble-wide architecture options given by flags (the others keep their defaults)."""
    options = {}
    if cfg.matryoshka_widths:
        options["matryoshka_widths"] = cfg.matryoshka_widths
    if cfg.architecture in ("batchtopk", "matryoshka_batchtopk"):
        options["threshold_lr"] = cfg.threshold_lr
    return options


def split_rows(store: ActivationStore, eval_tokens: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(train_range, eval_range): the last `eval_tokens` rows, rounded up to whole contexts, are held out."""
    n, ctx = store.spec.n_rows, store.spec.context_size
    if eval_tokens == 0:
        return (0, n), None
    eval_rows = -(-eval_tokens // ctx) * ctx
    if eval_rows >= n:
        raise StoreError(f"--eval_tokens {eval_tokens} leaves no training rows in a store of {n} rows")
    return (0, n - eval_rows), (n - eval_rows, n)


def _data_sample(store: ActivationStore, hook: str, rows: tuple[int, int], max_rows: int = 65536) -> torch.Tensor:
    """The first (up to) max_rows unmasked training rows, float64 [n, d_in]."""
    start, stop = rows[0], min(rows[1], rows[0] + max_rows)
    return store.read_rows(hook, start, stop, torch.float64)[torch.from_numpy(store.read_mask(start, stop))]


def _b_dec_init(how: str, store: ActivationStore, hook: str, rows: tuple[int, int]) -> torch.Tensor | None:
    """The initial b_dec [d_in] (float32) from up to 65536 training rows: their mean or geometric median; None
    for zeros."""
    if how == "zeros":
        return None
    sample = _data_sample(store, hook, rows)
    return (sample.mean(0) if how == "mean" else geometric_median(sample)).float()


@torch.no_grad()
def evaluate(ensemble: SAEEnsemble, store: ActivationStore, hook: str, rows: tuple[int, int], batch_size: int,
             device: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Exact streaming metrics of every member over the (masked) rows `rows`; see ReconstructionStats.compute.
    The ensemble runs in eval mode (BatchTopK: its learned threshold) on scale * x; x_hat is unscaled."""
    was_training = ensemble.training
    ensemble.eval()
    stats = ReconstructionStats(ensemble.n_members, ensemble.d_in, ensemble.d_sae, device=device)
    loader = BatchLoader(store, hook, batch_size, rows, shuffle_chunks=1)
    for x in loader.epoch(0):
        x = x.to(device)
        x_hat, f = ensemble(x * scale)
        stats.update(x, x_hat / scale, f)
    ensemble.train(was_training)
    return stats.compute()


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _metric_cells(m: dict) -> str:
    """The metric columns shared by metrics_table and frontier_table."""
    return (f"{m['mse']:.4g} | {m['fvu']:.4f} | {m['explained_variance']:.4f} | {m['l0']:.1f} | "
            f"{100 * m['dead_fraction']:.1f}% |")


def metrics_table(rows: list[dict], sweep_param: str) -> str:
    """A Markdown table of member metrics sorted by the swept hyperparameter."""
    lines = [f"| {sweep_param} | MSE | FVU | explained var. | L0 | dead latents |", "|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r[sweep_param]):
        lines.append(f"| {_value(r[sweep_param])} | {_metric_cells(r['metrics'])}")
    return "\n".join(lines)


class Checkpointer:
    """OUTPUT_DIR/checkpoint/step_{s}/rank{r}.pt + `latest` (written last, atomically, by rank 0 after every
    rank has saved), so a SIGKILL at any moment leaves the previous complete checkpoint in force."""

    def __init__(self, out: Path, dist: Dist, shard_by_rank: bool):
        self.dir, self.dist, self.shard_by_rank = out / "checkpoint", dist, shard_by_rank

    def exists(self) -> bool:
        return (self.dir / "latest").is_file()

    def save(self, state: dict, step: int) -> None:
        step_dir = self.dir / f"step_{step}"
        if self.shard_by_rank or self.dist.is_main:
            step_dir.mkdir(parents=True, exist_ok=True)
            path = step_dir / f"rank{self.dist.rank if self.shard_by_rank else 0}.pt"
            torch.save(state, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
        self.dist.barrier()
        if self.dist.is_main:
            (self.dir / "latest.tmp").write_text(step_dir.name)
            os.replace(self.dir / "latest.tmp", self.dir / "latest")
            for old in self.dir.glob("step_*"):
                if old != step_dir:
                    shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()

    def load(self) -> dict:
        step_dir = self.dir / (self.dir / "latest").read_text().strip()
        path = step_dir / f"rank{self.dist.rank if self.shard_by_rank else 0}.pt"
        return torch.load(path, map_location="cpu", weights_only=False)

    def remove(self) -> None:
        self.dist.barrier()
        if self.dist.is_main:
            shutil.rmtree(self.dir, ignore_errors=True)


def _fingerprint(cfg: SweepConfig, dist: Dist) -> dict:
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}
    if cfg.parallel == "members":
        key["world_size"] = dist.world_size
    return key


def run_sweep(cfg: SweepConfig, log=print) -> dict | None:
    """Train the sweep described by `cfg`, save it under cfg.output_dir and return its index (sweep.json) on
    rank 0 (None on other ranks).

    Raises StoreError/ValueError (one line) for a missing/incomplete/foreign store, an unknown hook, an
    output_dir that already holds a finished sweep (or an unfinished one without --resume); nothing is
    written in those cases.
    """
    cfg.validate()
    if cfg.ensembles:
        return run_ensembles(cfg, log)
    dist = Dist.current()
    out = Path(cfg.output_dir)
    if (out / INDEX_FILE).exists():
        raise ValueError(f"{out} already holds a finished sweep; choose another --output_dir or delete it")
    store = ActivationStore.open(cfg.dataset_dir) if cfg.array is None else ActivationStore.open(cfg.dataset_dir,
                                                                                                  array=cfg.array)
    hook = store.resolve_hook(cfg.array or cfg.hook_name)
    d_in = store.width(hook)
    d_sae = int(d_in * cfg.ratio)
    if d_sae < 1:
        raise ValueError(f"--ratio {cfg.ratio} gives d_sae = 0 for d_in = {d_in}")
    hyper = member_hyperparams(cfg)
    n_members = len(next(iter(hyper.values())))
    by_members = cfg.parallel == "members" and dist.active
    local = split_evenly(n_members, dist.world_size, dist.rank) if by_members else range(n_members)
    if len(local) == 0:
        raise ValueError(f"--parallel members needs at least one member per process ({n_members} members, "
                         f"{dist.world_size} processes)")
    checkpointer = Checkpointer(out, dist, shard_by_rank=by_members)
    if checkpointer.exists() and not cfg.resume:
        raise ValueError(f"{out} holds an unfinished sweep; pass --resume True to continue it, or delete {out}")
    train_rows, eval_rows = split_rows(store, cfg.eval_tokens)
    device = cfg.device

    ensemble = SAEEnsemble(cfg.architecture, d_in, d_sae, {h: [v[i] for i in local] for h, v in hyper.items()},
                           seeds=[cfg.seed + i for i in local], tied=cfg.tied,
                           options=_architecture_options(cfg),
                           decoder_norm_l1=cfg.decoder_norm_l1, auxk_coefficient=cfg.auxk_coefficient, k_aux=cfg.k_aux
                           ).to(device)
    if cfg.architecture == "jumprelu":
        with torch.no_grad():
            ensemble.log_threshold.fill_(float(np.log(cfg.jumprelu_init_threshold)))
    scale = 1.0
    if cfg.normalize_activations == "expected_average_only_in":
        scale = normalization_factor(_data_sample(store, hook, train_rows))
        log(f"normalize_activations: inputs x {scale:.4g} (mean norm sqrt(d_in)), folded into the saved weights")
    b_dec = _b_dec_init(cfg.b_dec_init, store, hook, train_rows)
    if b_dec is not None:
        ensemble.set_b_dec(b_dec * scale)
    coefficient = next((h for h in ("l1_coefficient", "l0_coefficient") if h in ensemble.hyperparams), None)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=cfg.adam_lr)
    data_parallel = cfg.parallel == "data" and dist.active
    autograd_only = cfg.autocast != "none" or cfg.auxk_coefficient
    fused = cfg.kernel == "fused" or (cfg.kernel == "auto" and cfg.architecture in FUSED_ARCHITECTURES
                                      and not autograd_only)
    if fused and autograd_only:
        raise ValueError("--kernel fused has no --autocast or --auxk_coefficient; use --kernel autograd (or auto)")
    # the fused kernel sums its gradients over ranks itself; the autograd path uses DDP
    model = ensemble
    if data_parallel and not fused:
        model = torch.nn.parallel.DistributedDataParallel(ensemble, broadcast_buffers=False)
    loader = BatchLoader(store, hook, cfg.batch_size, train_rows, seed=cfg.seed, shuffle_chunks=cfg.shuffle_chunks)
    total_steps = len(loader) * cfg.n_repetitions
    on_cuda = str(device).startswith("cuda")
    use_compile = cfg.compile
    if use_compile is None:  # auto: always on CUDA; on CPU for the fused kernel when compiling pays (benchmark)
        use_compile = on_cuda or (fused and total_steps >= CPU_COMPILE_MIN_STEPS)
    group = cfg.member_group or (len(local) if on_cuda else 4)
    step_fn = _make_step_fn(use_compile, cfg.autocast, torch.device(device).type)
    fused_fn = torch.compile(fused_loss_and_grads) if (fused and use_compile) else fused_loss_and_grads
    if cfg.lr_decay_steps > total_steps:
        raise ValueError(f"--lr_decay_steps {cfg.lr_decay_steps} is more than this run's {total_steps} steps "
                         f"({loader.n_rows} rows / batch {cfg.batch_size} x {cfg.n_repetitions} repetitions)")
    restarts = range(cfg.resample_every, total_steps, cfg.resample_every) if cfg.resample_every else ()
    tracker = None
    if cfg.auxk_coefficient or cfg.resample_every:
        tracker = DeadLatentTracker(len(local), d_sae, cfg.dead_window, device)
    sweep_param = ensemble.arch.SWEEP_PARAM
    log(f"sweep: {n_members} {cfg.architecture} SAEs ({sweep_param} {hyper[sweep_param][0]:.3g}.."
        f"{hyper[sweep_param][-1]:.3g}), d_in {d_in}, d_sae {d_sae}, hook {hook}, {loader.n_rows} training rows x "
        f"{cfg.n_repetitions}, device {device}, {dist.world_size} process(es)"
        + (f", parallel {cfg.parallel}" if dist.active else "") + (", fused kernel" if fused else ", autograd")
        + (", compiled" if use_compile else ""))

    epoch = skip = steps = tokens = 0
    if cfg.resume and checkpointer.exists():
        state = checkpointer.load()
        if state["fingerprint"] != _fingerprint(cfg, dist):
            raise ValueError(f"the checkpoint in {out} was made with other settings; rerun with those or delete it")
        ensemble.load_state_dict(state["ensemble"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if tracker is not None:
            tracker.since.copy_(state["dead_since"])
        epoch, skip, steps, tokens = state["epoch"], state["batch_in_epoch"], state["steps"], state["tokens"]
        log(f"resuming {out} at step {steps} (epoch {epoch}, batch {skip})")
    elif cfg.resume:
        log(f"--resume: no checkpoint in {out}; starting from scratch")

    run_logger = None
    if cfg.wandb_project and dist.is_main:
        from saetool import wandb_log

        names = [member_folder_name(cfg.architecture, {h: (int if h == "k" else float)(v[i]) for h, v in hyper.items()})
                 for i in range(n_members)]
        run_logger = wandb_log.WandbLogger(names, project=cfg.wandb_project, name=out.name,
                                           config=dataclasses.asdict(cfg), log=log)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(out / "train_log.jsonl", steps)
    train_log = open(out / "train_log.jsonl", "a") if dist.is_main else None
    start = time.perf_counter()
    trained_here = 0
    bar = tqdm(total=loader.n_rows * cfg.n_repetitions, initial=tokens, unit="tok", unit_scale=True, desc="sweep",
               smoothing=0.1, disable=not dist.is_main)
    for epoch in range(epoch, cfg.n_repetitions):
        next_snapshot = store.spec.chunk_size
        epoch_tokens = 0
        for i, x in enumerate(loader.epoch(epoch)):
            epoch_tokens += len(x)
            if i < skip:
                continue
            rows = split_evenly(len(x), dist.world_size, dist.rank) if data_parallel else range(len(x))
            x_local = x[rows.start : rows.stop].to(device, non_blocking=True)
            if scale != 1.0:
                x_local = x_local * scale
            for group_ in optimizer.param_groups:
                group_["lr"] = cfg.adam_lr * lr_multiplier(steps, cfg.lr_warmup_steps, total_steps, cfg.lr_decay_steps,
                                                           restarts)
            if coefficient and cfg.l1_warmup_steps:
                base = torch.tensor(ensemble.hyperparams[coefficient], dtype=torch.float64)
                getattr(ensemble, coefficient).copy_(base * coefficient_multiplier(steps, cfg.l1_warmup_steps))
            dead = tracker.dead if tracker is not None and cfg.auxk_coefficient else None
            if fused:
                stats = train_batch_fused(ensemble, optimizer, x_local, len(x), group, fused_fn,
                                          dist if data_parallel else None, cfg.grad_clip_norm)
            else:
                # data-parallel BatchTopK selects over the global batch (saetool.saes._common.global_batch)
                batch_ctx = global_batch(len(x), dist.all_gather) if data_parallel else contextlib.nullcontext()
                with batch_ctx:
                    stats = train_step(ensemble, optimizer, x_local, n_total=len(x), step_fn=step_fn, model=model,
                                       loss_scale=dist.world_size if data_parallel else 1.0, dead=dead,
                                       grad_clip_norm=cfg.grad_clip_norm, member_group=0 if data_parallel else group)
            fired = stats.pop("fired")
            steps += 1
            if tracker is not None:
                if data_parallel:
                    fired = dist.all_reduce_sum(fired.int()) > 0
                tracker.update_fired(fired, len(x))
                if cfg.resample_every and steps % cfg.resample_every == 0 and steps < total_steps:
                    _resample(ensemble, optimizer, x.to(device) * scale, tracker, cfg.seed, steps, local, log)
            tokens += len(x)
            trained_here += len(x)
            bar.update(len(x))
            if (steps - 1) % LOG_EVERY == 0:
                _log_step(stats, steps, tokens, dist, data_parallel, by_members, train_log, bar,
                          optimizer.param_groups[0]["lr"], run_logger)
            if cfg.save_after_every and epoch_tokens >= next_snapshot:
                chunk = epoch_tokens // store.spec.chunk_size
                _save(ensemble, local, cfg, store, hook, out / "snapshots" / f"epoch_{epoch}_chunk_{chunk}", dist,
                      by_members, None, {}, scale)
                next_snapshot += store.spec.chunk_size
            if cfg.checkpoint_every and steps % cfg.checkpoint_every == 0:
                checkpointer.save({"ensemble": ensemble.state_dict(), "optimizer": optimizer.state_dict(),
                                   "epoch": epoch, "batch_in_epoch": i + 1, "steps": steps, "tokens": tokens,
                                   "torch_rng": torch.get_rng_state(), "fingerprint": _fingerprint(cfg, dist),
                                   "dead_since": tracker.since.cpu() if tracker is not None else None},
                                  steps)
        skip = 0
        if epoch < cfg.n_repetitions - 1:
            _save(ensemble, local, cfg, store, hook, out / "snapshots" / f"epoch_{epoch}", dist, by_members, None, {},
                  scale)
    bar.close()
    if train_log:
        train_log.close()
    seconds = time.perf_counter() - start
    rate = trained_here / max(seconds, 1e-9)
    training = {"steps": steps, "tokens": tokens, "seconds_this_run": round(seconds, 2), "tokens_per_s": round(rate, 1),
                "sae_tokens_per_s": round(rate * n_members, 1), "world_size": dist.world_size,
                "parallel": cfg.parallel if dist.active else "none", "compiled": use_compile, "autocast": cfg.autocast}
    resumed = f" ({trained_here} tokens in this run)" if trained_here != tokens else ""
    log(f"trained {steps} steps, {tokens} tokens{resumed}; this run {seconds:.1f} s ({rate:.0f} tokens/s, "
        f"{rate * n_members:.0f} SAE-tokens/s)")
    metrics = None
    if eval_rows and (by_members or dist.is_main):
        metrics = evaluate(ensemble, store, hook, eval_rows, cfg.batch_size, device, scale)
    index = _save(ensemble, local, cfg, store, hook, out, dist, by_members, metrics, training, scale)
    checkpointer.remove()
    if index is None:
        return None
    if run_logger is not None:
        run_logger.log_eval([m["metrics"] for m in index["members"]])
        run_logger.finish()
    if metrics is not None:
        table = metrics_table(index["members"], sweep_param)
        n_eval = index["members"][0]["metrics"]["n_tokens"]
        (out / "metrics.md").write_text(f"Held-out evaluation on {n_eval} rows of {store.path}\n\n{table}\n")
        log(table)
    log(f"saved {n_members} SAEs to {out}")
    if cfg.report and metrics is not None and cfg.array is not None:
        log("report skipped: `saetool report` does not read foreign --array stores yet")
    elif cfg.report and metrics is not None:
        from saetool.config import build
        from saetool.report import ReportConfig, run_report

        no_model = cfg.report_contexts == 0 or store.spec.model == "synthetic"
        run_report(build(ReportConfig, {"output_dir": str(out), "device": str(cfg.device), "variants_per_forward": 4,
                                        "eval_contexts": cfg.report_contexts or None,
                                        "model": "none" if no_model else None}), log=log)
    return index


def train_batch_fused(ensemble: SAEEnsemble, optimizer: torch.optim.Optimizer, x: torch.Tensor, n_total: int,
                      group: int, fused_fn=fused_loss_and_grads, dist: Dist | None = None, grad_clip_norm: float = 0.0
                      ) -> dict[str, torch.Tensor]:
    """One fused step: gradients of this rank's rows (normalised by the global batch n_total), summed over
    data-parallel ranks in one flat all-reduce (the exact global gradient), per-member clipping (grad_clip_norm > 0),
    Adam, decoder renormalisation."""
    stats = fused_fn(ensemble, x, n_total, group)
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


@torch.no_grad()
def _resample(ensemble: SAEEnsemble, optimizer: torch.optim.Optimizer, x: torch.Tensor, tracker: DeadLatentTracker,
              seed: int, step: int, local: range, log) -> None:
    """Resample this rank's members' dead latents on the full batch x (every rank holds it, so data-parallel
    ranks agree); member i draws from its own generator seeded by (seed, step, i), so the result does not
    depend on how members are split across ranks. The dead latents then count as fresh."""
    dead = tracker.dead
    if not dead.any():
        return
    buffers = {n: getattr(ensemble, n).clone() for n in ensemble.buffer_names}
    x_hat, _ = ensemble(x)  # the training forward (BatchTopK: batch top-k), without its buffer update:
    for n, value in buffers.items():
        getattr(ensemble, n).copy_(value)
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + step * 65_537 + i) for i in local]
    W_enc = ensemble.W_enc if ensemble.tied else ensemble.W_enc_param
    counts = resample_dead_latents(W_enc, ensemble.W_dec, ensemble.b_enc, dead, x, x_hat, generators, optimizer)
    tracker.since[dead] = 0
    log(f"step {step}: resampled {int(counts.sum())} dead latents ({counts.tolist()} per member)")


def _make_step_fn(use_compile: bool, autocast: str, device_type: str):
    fn = torch.compile(loss_and_stats) if use_compile else loss_and_stats
    if autocast == "none":
        return fn

    def step_fn(*args):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return fn(*args)

    return step_fn


def _trim_log(path: Path, steps: int) -> None:
    """Drop log lines beyond `steps` (written after the checkpoint a resumed run restarts from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= steps]
    path.write_text("".join(line + "\n" for line in keep))


def _log_step(stats: dict, steps: int, tokens: int, dist: Dist, data_parallel: bool, by_members: bool, train_log,
              bar, lr: float, run_logger=None) -> None:
    """Log the trained batch's per-member stats: summed over data-parallel ranks (they are normalised by the
    global batch), or gathered from member-parallel ranks. Every rank calls this at the same steps."""
    if data_parallel:
        stats = {k: dist.all_reduce_sum(v.clone()) for k, v in stats.items()}
    elif by_members:
        parts = dist.all_gather_objects({k: v.cpu() for k, v in stats.items()})
        stats = {k: torch.cat([p[k] for p in parts]) for k in stats}
    if train_log is None:
        return
    train_log.write(json.dumps({"step": steps, "tokens": tokens, "lr": lr, **{k: v.tolist() for k, v in stats.items()}})
                    + "\n")
    train_log.flush()
    if run_logger is not None:
        run_logger.log_train(steps, tokens, stats)
    l0, mse = stats["l0"], stats["mse"]
    bar.set_postfix_str(f"L0 {l0.min():.0f}-{l0.max():.0f}, mse {mse.min():.3g}-{mse.max():.3g}")


def _member_metrics(metrics: dict | None, i: int) -> dict:
    if metrics is None:
        return {}
    keys = ("mse", "fvu", "explained_variance", "l0", "l1", "dead_fraction", "n_dead")
    return {k: float(metrics[k][i]) for k in keys} | {"n_tokens": int(metrics["n_tokens"])}


def _save(ensemble: SAEEnsemble, local: range, cfg: SweepConfig, store: ActivationStore, hook: str, out: Path,
          dist: Dist, by_members: bool, metrics: dict | None, training: dict, scale: float = 1.0) -> dict | None:
    """Write a sweep folder from rank 0: with member-parallel ranks, every rank's members are gathered first
    (every rank must call this); with data-parallel ranks, rank 0 holds all members and writes alone.
    An input scale (normalize_activations) is folded into the saved weights (saetool.recipes.fold_normalization)."""
    spec = store.spec
    payload = []
    if by_members or dist.is_main:
        for j, i in enumerate(local):
            arch_cfg = ensemble.member_cfg(j)
            member_cfg = {
                **arch_cfg, "dtype": "float32", "device": str(cfg.device), "apply_b_dec_to_input": True,
                "normalize_activations": "none", "hook_name": hook, "tied": ensemble.tied,
                "metadata": {**arch_cfg["metadata"], "normalization_factor_folded": scale, "model_name": spec.model, "hook_name": hook, "context_size": spec.context_size,
                             "prepend_bos": spec.extra.get("prepend_bos", True), "dataset_path": str(store.path),
                             "dataset": spec.dataset, "seed": ensemble.seeds[j],
                             "saetool_version": saetool.__version__},
            }
            weights = {k: v.cpu() for k, v in ensemble.member_weights(j).items()}
            if scale != 1.0:
                weights = fold_normalization(weights, scale)
            payload.append((i, weights, member_cfg, _member_metrics(metrics, j)))
    if by_members:
        payload = [m for part in dist.all_gather_objects(payload) for m in part]
    if not dist.is_main:
        return None
    members = [m[1:] for m in sorted(payload, key=lambda m: m[0])]
    index = {"saetool_version": saetool.__version__, "config": dataclasses.asdict(cfg),
             "store": {"path": str(store.path), "model": spec.model, "hook_name": hook, "n_rows": spec.n_rows},
             "sweep_param": ensemble.arch.SWEEP_PARAM, "training": training}
    write_sweep(out, members, index)
    return json.loads((out / INDEX_FILE).read_text())


def load_sweep_config(path: str | os.PathLike) -> dict:
    """The flags of a sweep YAML (configs/sweeps/*.yaml): a mapping of SweepConfig fields, with an optional
    `ensembles` list of per-ensemble flag mappings. ValueError (one line) if it is not such a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flags")
    return {**data, "config": str(path)}


def ensemble_name(flags: dict, i: int) -> str:
    """The sub-folder of one ensemble of a multi-ensemble run: its `name` flag, else "<i>_<architecture>"."""
    return str(flags.get("name") or f"{i}_{flags.get('architecture', 'standard')}")


def run_ensembles(cfg: SweepConfig, log=print) -> dict | None:
    """Train every entry of cfg.ensembles (each a dict of flags overriding cfg's) as its own ensemble, one after the
    other, into OUTPUT_DIR/<name>/, then write OUTPUT_DIR/sweep.json indexing every member (paths relative to
    OUTPUT_DIR, each with its architecture, hyperparameters, metrics and ensemble name) and a combined metrics.md.
    Finished ensembles are skipped with --resume."""
    from saetool.config import build

    out = Path(cfg.output_dir)
    if (out / INDEX_FILE).exists():
        raise ValueError(f"{out} already holds a finished sweep; choose another --output_dir or delete it")
    base = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("ensembles", "config")}
    runs = []
    for i, entry in enumerate(cfg.ensembles):
        name = ensemble_name(entry, i)
        flags = {**base, **{k: v for k, v in entry.items() if k != "name"}, "output_dir": str(out / name)}
        sub = build(SweepConfig, flags)
        if cfg.resume and (Path(sub.output_dir) / INDEX_FILE).exists():
            log(f"ensemble {name}: already finished, skipped")
            index = json.loads((Path(sub.output_dir) / INDEX_FILE).read_text())
        else:
            log(f"ensemble {name}: {sub.architecture}")
            index = run_sweep(sub, log)
        runs.append((name, sub, index))
    if any(index is None for _, _, index in runs):
        return None
    members = [{**m, "path": f"{name}/{m['path']}", "ensemble": name} for name, _, index in runs
               for m in index["members"]]
    index = {"saetool_version": saetool.__version__, "config": dataclasses.asdict(cfg),
             "ensembles": {name: {"config": dataclasses.asdict(sub), "training": index.get("training", {}),
                                  "sweep_param": index["sweep_param"]} for name, sub, index in runs},
             "store": runs[0][2]["store"], "sweep_param": "architecture", "members": members}
    out.mkdir(parents=True, exist_ok=True)
    from saetool.io import write_json

    write_json(out / INDEX_FILE, index)
    if all(m["metrics"] for m in members):
        table = frontier_table(members)
        (out / "metrics.md").write_text(f"Held-out evaluation on {members[0]['metrics']['n_tokens']} rows of "
                                        f"{index['store']['path']}\n\n{table}\n")
        log(table)
    return index


def frontier_table(members: list[dict]) -> str:
    """Markdown table of members of several architectures, sorted by architecture then L0."""
    lines = ["| architecture | hyperparameter | MSE | FVU | explained var. | L0 | dead latents |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in sorted(members, key=lambda m: (m["architecture"], -m["metrics"]["l0"])):
        param = get_architecture(m["architecture"]).SWEEP_PARAM
        lines.append(f"| {m['architecture']} | {param} {_value(m[param])} | {_metric_cells(m['metrics'])}")
    return "\n".join(lines)
