"""Sweeps over several hooks of one store in one read: `--hook_name all` (every hook of the store, one SAE ensemble
each) or a list `--hook_name a,b [--target_hook c,d]` (one ensemble per hook, or per input/target pair: a -> c,
b -> d transcoders).

Every ensemble is its own run (saetool.train.setup, with the flags of the sweep and its hook), trained on the SAME
row batches: one `BatchLoader` reads every hook the runs need, side by side, so each store chunk is read and decoded
once per epoch for all of them (not once per hook, as separate sweeps or SAELens' multi-SAE runner would), and each
step hands every run its columns. Since that loader walks the rows in the order a one-hook loader with the same seed
walks them (saetool.loader), each ensemble ends exactly as a separate sweep on its hook would.

Outputs: OUTPUT_DIR/<hook>/ is each ensemble's own sweep folder (a transcoder's is named by its input hook);
OUTPUT_DIR/sweep.json indexes every member (paths relative to OUTPUT_DIR, with hook_name / target_hook) and
OUTPUT_DIR/metrics.md holds every held-out table. A transcoder sweep over the same input/output hook of every layer
0..L-1 also writes circuit-tracer transcoder sets (saetool.transcoder_set).

One process only for now: several processes (--parallel data|members), --checkpoint_every / --resume and --array
are refused with one line.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

import saetool
from saetool.config import SweepConfig
from saetool.distributed import Dist
from saetool.io import INDEX_FILE, write_json
from saetool.loader import BatchLoader, DeviceFeed
from saetool.store import ActivationStore, StoreError
from saetool.train.loop import RunTrainer, describe
from saetool.train.setup import SweepRun, setup_run
from saetool.train.step import choose_step


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def hook_pairs(cfg: SweepConfig, store: ActivationStore) -> list[tuple[str, str | None]]:
    """(input hook, target hook or None) of every ensemble: --hook_name all = every hook of the store (SAEs);
    a list pairs elementwise with --target_hook's list. ValueError (one line naming the flag) for all with
    --target_hook, lists of different lengths, a hook the store lacks, or a hook given twice."""
    if cfg.hook_name == "all":
        if cfg.target_hook:
            raise ValueError("--hook_name all trains one SAE per hook; for transcoders list the pairs: "
                             "--hook_name a,b --target_hook c,d")
        names = list(store.spec.hook_names)
    else:
        names = _split(cfg.hook_name)
    targets = _split(cfg.target_hook) if cfg.target_hook else [None] * len(names)
    if len(targets) != len(names):
        raise ValueError(f"--target_hook lists {len(targets)} hooks but --hook_name {len(names)}; give one target "
                         "per input hook")
    for flag, hooks in (("hook_name", names), ("target_hook", [t for t in targets if t])):
        for h in hooks:
            if h not in store.spec.hook_names:
                raise StoreError(f"--{flag}: store {store.path} has no hook {h!r}; it holds "
                                 f"{', '.join(store.spec.hook_names)}")
    repeated = next((h for i, h in enumerate(names) if h in names[:i]), None)
    if repeated:
        raise ValueError(f"--hook_name lists {repeated} twice (each ensemble needs its own folder)")
    return list(zip(names, targets, strict=True))


def _refuse(cfg: SweepConfig, dist: Dist) -> None:
    """The settings a multi-hook sweep cannot take yet (one line each)."""
    if dist.active:
        raise ValueError(f"--hook_name {cfg.hook_name}: several hooks train in one process only for now "
                         f"({dist.world_size} processes); launch one sweep per hook")
    for flag, given in (("checkpoint_every", cfg.checkpoint_every), ("resume", cfg.resume),
                        ("array", cfg.array is not None)):
        if given:
            raise ValueError(f"--{flag} cannot act on a sweep of several hooks (--hook_name {cfg.hook_name}) yet")


def _columns(run: SweepRun, hooks: list[str], widths: list[int]) -> torch.Tensor:
    """The column indices of `run`'s batch ([x_in] or [x_in | x_out]) in the shared batch of `hooks`."""
    starts = dict(zip(hooks, [sum(widths[:i]) for i in range(len(hooks))], strict=True))
    cols = [torch.arange(starts[h], starts[h] + widths[hooks.index(h)]) for h in (run.hook, run.target) if h]
    return torch.cat(cols)


def run_multi_hook(cfg: SweepConfig, log=print) -> dict | None:
    """Train one ensemble per hook (or pair) of `cfg` on the same row batches and save them (see the module
    docstring); returns OUTPUT_DIR/sweep.json's index. Every check raises one line before training starts."""
    dist, out = Dist.current(), Path(cfg.output_dir)
    _refuse(cfg, dist)
    if (out / INDEX_FILE).exists():
        raise ValueError(f"{out} already holds a finished sweep; choose another --output_dir or delete it")
    store = ActivationStore.open(cfg.dataset_dir)
    pairs = hook_pairs(cfg, store)
    subs = [dataclasses.replace(cfg, hook_name=h, target_hook=t, output_dir=str(out / h)) for h, t in pairs]
    for sub in subs:
        sub.validate()
    runs = [setup_run(sub, dist, log) for sub in subs]
    steps = [choose_step(sub, run.ensemble, run.optimizer, dist, False, run.total_steps) for sub, run in zip(subs, runs)]
    hooks = list(dict.fromkeys(h for run in runs for h in (run.hook, run.target) if h))
    loader = BatchLoader(store, hooks, cfg.batch_size, runs[0].train_rows, seed=cfg.seed,
                         shuffle_chunks=cfg.shuffle_chunks)
    columns = [_columns(run, hooks, loader.widths).to(cfg.device) for run in runs]
    for run, step in zip(runs, steps):
        log(describe(run, step))
    log(f"{len(runs)} ensembles on the same batches: each step reads {len(hooks)} hooks of the store once")
    trainers = [RunTrainer(run, step, None, log) for run, step in zip(runs, steps)]
    start = time.perf_counter()
    try:
        for epoch in range(cfg.n_repetitions):
            for t in trainers:
                t.start_epoch(epoch)
            for i, (x, x_dev) in enumerate(DeviceFeed(((x, x) for x in loader.epoch(epoch)), cfg.device)):
                x_dev = x_dev.float()
                for run, t, cols in zip(runs, trainers, columns):
                    x_run = x_dev.index_select(1, cols)
                    host = x.index_select(1, cols.cpu()) if run.cfg.resample_every else x  # resampling reads it
                    t.batch(epoch, i, host, x_run * run.scale if run.scale != 1.0 else x_run)
            for t in trainers:
                t.end_epoch(epoch)
    finally:
        for t in trainers:
            t.close()
    seconds = time.perf_counter() - start
    from saetool.sweep import finish_run

    indexes = [finish_run(run, t.result(seconds), log) for run, t in zip(runs, trainers)]
    return _write_index(cfg, out, runs, indexes, log)


def _write_index(cfg: SweepConfig, out: Path, runs: list[SweepRun], indexes: list[dict], log) -> dict:
    """OUTPUT_DIR/sweep.json indexing every member of every hook, metrics.md, and transcoder sets."""
    from saetool.transcoder_set import write_transcoder_sets

    members = [{**m, "path": f"{run.hook}/{m['path']}", "ensemble": run.hook, "hook_name": run.hook,
                **({"target_hook": run.target} if run.target else {})}
               for run, index in zip(runs, indexes) for m in index["members"]]
    index = {"saetool_version": saetool.__version__, "config": dataclasses.asdict(cfg),
             "ensembles": {run.hook: {"config": dataclasses.asdict(run.cfg), "training": ix.get("training", {}),
                                      "sweep_param": ix["sweep_param"], "target_hook": run.target}
                           for run, ix in zip(runs, indexes)},
             "store": {**indexes[0]["store"], "hook_name": [run.hook for run in runs]},
             "sweep_param": "hook_name", "members": members}
    sets = write_transcoder_sets(out, runs, indexes, log)
    if sets:
        index["transcoder_sets"] = sets
    write_json(out / INDEX_FILE, index)
    tables = [(run.hook, run.out / "metrics.md") for run in runs]
    if all(path.exists() for _, path in tables):
        (out / "metrics.md").write_text("".join(f"## {hook}\n\n{path.read_text()}\n" for hook, path in tables))
    return index
