"""The sweep driver: store -> ensemble of SAEs -> saved members -> evaluation on held-out rows.

All members (one per L1 coefficient, or per k for TopK) train together as one `SAEEnsemble` on the same
batches. The last `eval_tokens` rows of the store are never trained on; after training every member is
evaluated there (MSE, FVU, explained variance, L0, dead fraction; saetool.metrics) and the table is printed
and saved with the sweep (`metrics.md`, and per member in `sweep.json`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import saetool
from saetool.config import SweepConfig
from saetool.ensemble import SAEEnsemble, train_step
from saetool.io import INDEX_FILE, write_sweep
from saetool.loader import BatchLoader
from saetool.metrics import ReconstructionStats
from saetool.store import ActivationStore, StoreError


def member_hyperparams(cfg: SweepConfig) -> dict[str, list]:
    """The swept values: {"l1_coefficient": [...]} (explicit list, or 10**linspace(min, max, n) as the original)
    or {"k": [...]}."""
    if cfg.architecture == "topk":
        return {"k": [int(k) for k in (cfg.k_values or [16, 32, 64, 128])]}
    if cfg.l1_values is not None:
        return {"l1_coefficient": [float(v) for v in cfg.l1_values]}
    return {"l1_coefficient": [float(v) for v in np.logspace(cfg.l1_value_min, cfg.l1_value_max, cfg.l1_value_n)]}


def split_rows(store: ActivationStore, eval_tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train_range, eval_range): the last `eval_tokens` rows of the store are held out."""
    n = store.spec.n_rows
    if eval_tokens >= n:
        raise StoreError(f"--eval_tokens {eval_tokens} leaves no training rows in a store of {n} rows")
    return (0, n - eval_tokens), (n - eval_tokens, n)


def _data_mean(store: ActivationStore, hook: str, rows: tuple[int, int], max_rows: int = 65536) -> torch.Tensor:
    start, stop = rows[0], min(rows[1], rows[0] + max_rows)
    x = store.read_rows(hook, start, stop, torch.float64)[torch.from_numpy(store.read_mask(start, stop))]
    return x.mean(0).float()


@torch.no_grad()
def evaluate(ensemble: SAEEnsemble, store: ActivationStore, hook: str, rows: tuple[int, int], batch_size: int,
             device: str) -> dict[str, torch.Tensor]:
    """Exact streaming metrics of every member over the (masked) rows `rows`; see ReconstructionStats.compute."""
    stats = ReconstructionStats(ensemble.n_members, ensemble.d_in, ensemble.d_sae, device=device)
    loader = BatchLoader(store, hook, batch_size, rows, shuffle_chunks=1)
    for x in loader.epoch(0):
        x = x.to(device)
        x_hat, f = ensemble(x)
        stats.update(x, x_hat, f)
    return stats.compute()


def metrics_table(rows: list[dict], sweep_param: str) -> str:
    """A Markdown table of member metrics sorted by the swept hyperparameter."""
    head = f"| {sweep_param} | MSE | FVU | explained var. | L0 | dead latents |"
    lines = [head, "|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r[sweep_param]):
        p = r[sweep_param]
        p = f"{p:.3g}" if isinstance(p, float) else str(p)
        m = r["metrics"]
        lines.append(f"| {p} | {m['mse']:.4g} | {m['fvu']:.4f} | {m['explained_variance']:.4f} | "
                     f"{m['l0']:.1f} | {100 * m['dead_fraction']:.1f}% |")
    return "\n".join(lines)


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Train the sweep described by `cfg`, save it under cfg.output_dir and return its index (sweep.json).

    Raises StoreError/ValueError (one line) for a missing/incomplete/foreign store, an unknown hook, or an
    output_dir that already holds a finished sweep; nothing is written in those cases.
    """
    cfg.validate()
    out = Path(cfg.output_dir)
    if (out / INDEX_FILE).exists():
        raise ValueError(f"{out} already holds a finished sweep; choose another --output_dir or delete it")
    store = ActivationStore.open(cfg.dataset_dir)
    hook = store.resolve_hook(cfg.hook_name)
    d_in = store.width(hook)
    d_sae = int(d_in * cfg.ratio)
    if d_sae < 1:
        raise ValueError(f"--ratio {cfg.ratio} gives d_sae = 0 for d_in = {d_in}")
    hyper = member_hyperparams(cfg)
    n_members = len(next(iter(hyper.values())))
    train_rows, eval_rows = split_rows(store, cfg.eval_tokens) if cfg.eval_tokens else ((0, store.spec.n_rows), None)
    device = cfg.device
    torch.manual_seed(cfg.seed)
    ensemble = SAEEnsemble(cfg.architecture, d_in, d_sae, hyper, seeds=[cfg.seed + i for i in range(n_members)],
                           tied=cfg.tied).to(device)
    if cfg.b_dec_init == "mean":
        ensemble.set_b_dec(_data_mean(store, hook, train_rows))
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=cfg.adam_lr)
    loader = BatchLoader(store, hook, cfg.batch_size, train_rows, seed=cfg.seed, shuffle_chunks=cfg.shuffle_chunks)
    sweep_param = ensemble.arch.SWEEP_PARAM
    log(f"sweep: {n_members} {cfg.architecture} SAEs ({sweep_param} {hyper[sweep_param][0]:.3g}..{hyper[sweep_param][-1]:.3g}),"
        f" d_in {d_in}, d_sae {d_sae}, hook {hook}, {loader.n_rows} training rows x {cfg.n_repetitions}, device {device}")

    out.mkdir(parents=True, exist_ok=True)
    train_log = open(out / "train_log.jsonl", "w")
    steps = tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=loader.n_rows * cfg.n_repetitions, unit="tok", unit_scale=True, desc="sweep", smoothing=0.1)
    for epoch in range(cfg.n_repetitions):
        next_snapshot = store.spec.chunk_size
        epoch_tokens = 0
        for x in loader.epoch(epoch):
            stats = train_step(ensemble, optimizer, x.to(device, non_blocking=True))
            steps += 1
            tokens += len(x)
            epoch_tokens += len(x)
            bar.update(len(x))
            if steps % 20 == 1:
                row = {"step": steps, "tokens": tokens, **{k: v.tolist() for k, v in stats.items()}}
                train_log.write(json.dumps(row) + "\n")
                l0 = stats["l0"]
                bar.set_postfix_str(f"L0 {l0.min():.0f}-{l0.max():.0f}, mse {stats['mse'].min():.3g}-{stats['mse'].max():.3g}")
            if cfg.save_after_every and epoch_tokens >= next_snapshot:
                chunk = epoch_tokens // store.spec.chunk_size
                _save(ensemble, cfg, store, hook, out / "snapshots" / f"epoch_{epoch}_chunk_{chunk}", None, {})
                next_snapshot += store.spec.chunk_size
        if epoch < cfg.n_repetitions - 1:
            _save(ensemble, cfg, store, hook, out / "snapshots" / f"epoch_{epoch}", None, {})
    bar.close()
    train_log.close()
    seconds = time.perf_counter() - start
    training = {"steps": steps, "tokens": tokens, "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
    log(f"trained {steps} steps, {tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} tokens/s, "
        f"{n_members * tokens / max(seconds, 1e-9):.0f} SAE-tokens/s)")
    metrics = evaluate(ensemble, store, hook, eval_rows, cfg.batch_size, device) if eval_rows else None
    index = _save(ensemble, cfg, store, hook, out, metrics, training)
    if metrics is not None:
        table = metrics_table(index["members"], sweep_param)
        (out / "metrics.md").write_text(f"Held-out evaluation on {metrics['n_tokens']} rows of {store.path}\n\n{table}\n")
        log(table)
    log(f"saved {n_members} SAEs to {out}")
    return index


def _member_metrics(metrics: dict | None, i: int) -> dict:
    if metrics is None:
        return {}
    keys = ("mse", "fvu", "explained_variance", "l0", "l1", "dead_fraction", "n_dead")
    return {k: float(metrics[k][i]) for k in keys} | {"n_tokens": int(metrics["n_tokens"])}


def _save(ensemble: SAEEnsemble, cfg: SweepConfig, store: ActivationStore, hook: str, out: Path,
          metrics: dict | None, training: dict) -> dict:
    spec = store.spec
    members = []
    for i in range(ensemble.n_members):
        member_cfg = {
            "architecture": ensemble.architecture, "d_in": ensemble.d_in, "d_sae": ensemble.d_sae,
            "dtype": "float32", "device": str(cfg.device), "apply_b_dec_to_input": True,
            "normalize_activations": "none", "hook_name": hook, **ensemble.member_hyperparams(i),
            "tied": ensemble.tied,
            "metadata": {"model_name": spec.model, "hook_name": hook, "context_size": spec.context_size,
                         "prepend_bos": spec.extra.get("prepend_bos", True), "dataset_path": str(store.path),
                         "dataset": spec.dataset, "seed": ensemble.seeds[i], "saetool_version": saetool.__version__},
        }
        members.append((ensemble.member_weights(i), member_cfg, _member_metrics(metrics, i)))
    index = {"saetool_version": saetool.__version__, "config": dataclasses.asdict(cfg),
             "store": {"path": str(store.path), "model": spec.model, "hook_name": hook, "n_rows": spec.n_rows},
             "sweep_param": ensemble.arch.SWEEP_PARAM, "training": training}
    write_sweep(out, members, index)
    return json.loads((out / INDEX_FILE).read_text())
