"""What a sweep leaves behind: held-out metrics of every member, the saved sweep folder, the metrics tables."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from saetool.ensemble import SAEEnsemble, fold_normalization
from saetool.evaluate import ReconstructionStats
from saetool.saes import get_architecture
from saetool.saved import INDEX_FILE, write_sweep
from saetool.store import ActivationStore, BatchLoader
from saetool.train.step import split_pair
from saetool.util import __version__

METRIC_KEYS = ("mse", "fvu", "explained_variance", "l0", "l1", "dead_fraction", "n_dead")


@torch.no_grad()
def evaluate(ensemble: SAEEnsemble, store: ActivationStore, hook: str, rows: tuple[int, int], batch_size: int,
             device: str, scale: float = 1.0, target: str | None = None) -> dict[str, torch.Tensor]:
    """Exact streaming metrics of every member over the (masked) rows `rows`; see ReconstructionStats.compute.
    The ensemble runs in eval mode (BatchTopK: its learned threshold) on scale * x (fp32); x_hat is unscaled.
    A transcoder (target: its output hook) is scored on its prediction of the target rows: FVU of x_out."""
    was_training = ensemble.training
    ensemble.eval()
    stats = ReconstructionStats(ensemble.n_members, ensemble.d_out, ensemble.d_sae, device=device)
    loader = BatchLoader(store, hook if target is None else (hook, target), batch_size, rows, shuffle_chunks=1)
    for x in loader.epoch(0):
        x = x.to(device).float()
        x, y = (x, x) if target is None else split_pair(x, ensemble.d_in)
        x_hat, f = ensemble(x * scale)
        stats.update(y, x_hat / scale, f)
    ensemble.train(was_training)
    return stats.compute()


def member_metrics(metrics: dict | None, i: int) -> dict:
    """Member i's held-out metrics as floats ({} without an evaluation)."""
    if metrics is None:
        return {}
    return {k: float(metrics[k][i]) for k in METRIC_KEYS} | {"n_tokens": int(metrics["n_tokens"])}


def save_sweep(run, out: Path, metrics: dict | None, training: dict) -> dict | None:
    """Write a sweep folder from rank 0 and return its index (None on other ranks): with member-parallel ranks,
    every rank's members are gathered first (every rank must call this, also one holding none of the run's members);
    with data-parallel ranks, rank 0 holds all members and writes alone. An input scale (normalize_activations) is folded into the saved weights
    (saetool.ensemble.recipes.fold_normalization)."""
    cfg, store, ensemble, dist = run.cfg, run.store, run.ensemble, run.dist
    spec = store.spec
    payload = []
    if run.by_members or dist.is_main:
        for j, i in enumerate(run.local):
            arch_cfg = ensemble.member_cfg(j)
            out_hook = {} if run.target is None else {"hook_name_out": run.target}
            member_cfg = {
                **arch_cfg, "dtype": "float32", "device": str(cfg.device), "apply_b_dec_to_input": run.target is None,
                "normalize_activations": "none", "hook_name": run.hook, "tied": ensemble.tied,
                "metadata": {**arch_cfg["metadata"], "normalization_factor_folded": run.scale,
                             "model_name": spec.model, "hook_name": run.hook, **out_hook,
                             "context_size": spec.context_size,
                             "prepend_bos": spec.extra.get("prepend_bos", True), "dataset_path": os.path.abspath(store.path),
                             "dataset": spec.dataset, "seed": ensemble.seeds[j],
                             "saetool_version": __version__},
            }
            weights = {k: v.cpu() for k, v in ensemble.member_weights(j).items()}
            if run.scale != 1.0:
                weights = fold_normalization(weights, run.scale)
            payload.append((i, weights, member_cfg, member_metrics(metrics, j)))
    if run.by_members:
        payload = [m for part in dist.all_gather_objects(payload) for m in part]
    if not dist.is_main:
        return None
    members = [m[1:] for m in sorted(payload, key=lambda m: m[0])]
    index = {"saetool_version": __version__, "config": dataclasses.asdict(cfg),
             "store": {"path": os.path.abspath(store.path), "model": spec.model, "hook_name": run.hook, "n_rows": spec.n_rows,
                       **({} if run.target is None else {"target_hook": run.target})},
             "sweep_param": get_architecture(cfg.architecture).SWEEP_PARAM, "training": training}
    write_sweep(out, members, index)
    return json.loads((out / INDEX_FILE).read_text())


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


def frontier_table(members: list[dict]) -> str:
    """Markdown table of members of several architectures, sorted by architecture then L0."""
    lines = ["| architecture | hyperparameter | MSE | FVU | explained var. | L0 | dead latents |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in sorted(members, key=lambda m: (m["architecture"], -m["metrics"]["l0"])):
        param = get_architecture(m["architecture"]).SWEEP_PARAM
        lines.append(f"| {m['architecture']} | {param} {_value(m[param])} | {_metric_cells(m['metrics'])}")
    return "\n".join(lines)
