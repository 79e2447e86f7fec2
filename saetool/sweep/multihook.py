"""Sweeps over several hooks of one store in one read: `--hook_name all` (every hook of the store, one SAE ensemble
each) or a list `--hook_name a,b [--target_hook c,d]` (one ensemble per hook, or per input/target pair: a -> c,
b -> d transcoders).

Every ensemble is its own run (saetool.train.setup, with the flags of the sweep and its hook), trained on the SAME
row batches: one `BatchLoader` reads every hook the runs need, side by side, so each store chunk is read and decoded
once per epoch for all of them (not once per hook, as separate sweeps or SAELens' multi-SAE runner would), and each
step hands every run its columns. Since that loader walks the rows in the order a one-hook loader with the same seed
walks them (saetool.store.loader), each ensemble ends exactly as a separate sweep on its hook would.

Outputs: OUTPUT_DIR/<hook>/ is each ensemble's own sweep folder (a transcoder's is named by its input hook);
OUTPUT_DIR/sweep.json indexes every member (paths relative to OUTPUT_DIR, with hook_name / target_hook) and
OUTPUT_DIR/metrics.md holds every held-out table. A transcoder sweep over the same input/output hook of every layer
0..L-1 also writes circuit-tracer transcoder sets (saetool.export.circuit_tracer).

Across processes (Accelerate / torchrun): with --parallel data every rank holds every ensemble and trains on its
share of each batch (as a one-hook data-parallel sweep); with --parallel members the members of all ensembles, in
order, are split into contiguous shares balanced by their cost per row (saetool.util.distributed.partition_by_cost), so a
rank holds members of one or several ensembles, possibly none of some (an idle run: it trains nothing there but
takes part in that ensemble's logging, snapshots and saving, and does not read its hook). Every member equals its
one-process training.
--checkpoint_every writes each ensemble's checkpoint in its folder; --resume continues each from its own position
(a run interrupted between two ensembles' checkpoints resumes each where it was) and keeps ensembles already saved.
--array (one foreign array) is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch

from saetool.config import SweepConfig
from saetool.export import write_transcoder_sets
from saetool.saved import INDEX_FILE, write_json
from saetool.store import ActivationStore, BatchLoader, DeviceFeed, StoreError
from saetool.train import (
    RunTrainer,
    SweepRun,
    Trained,
    choose_step,
    describe,
    finish_run,
    load_checkpoint,
    member_hyperparams,
    read_saved,
    report_run,
    setup_run,
)
from saetool.util import Dist, __version__, partition_by_cost, split_evenly, writer_lock


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
        if not names:
            raise ValueError(f"--hook_name {cfg.hook_name!r} lists no hook")
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


def _refuse(cfg: SweepConfig) -> None:
    """The setting a multi-hook sweep cannot take (one line)."""
    if cfg.array is not None:
        raise ValueError(f"--array names one foreign array; it cannot act on a sweep of several hooks (--hook_name "
                         f"{cfg.hook_name})")


def member_cost(cfg: SweepConfig, store: ActivationStore) -> int:
    """The work of one member of `cfg`'s ensemble per row, in multiply-adds: d_sae (d_in + d_out) for the encoder
    and decoder, plus d_in d_out for a skip connection."""
    d_in = store.width(cfg.hook_name)
    d_out = store.width(cfg.target_hook or cfg.hook_name)
    skip = d_in * d_out if cfg.skip_connection and cfg.target_hook else 0
    return int(d_in * cfg.ratio) * (d_in + d_out) + skip


def member_shares(subs: list[SweepConfig], store: ActivationStore, dist: Dist) -> list[range | None]:
    """This rank's members of each ensemble with --parallel members over several processes (None each otherwise):
    the members of all ensembles, in order, split into contiguous shares balanced by cost
    (saetool.util.distributed.partition_by_cost), so a rank may hold members of several ensembles, or none of one.
    ValueError (one line) with fewer members than processes."""
    if not (dist.active and subs[0].parallel == "members"):
        return [None] * len(subs)
    sizes = [len(next(iter(member_hyperparams(sub).values()))) for sub in subs]
    if sum(sizes) < dist.world_size:
        raise ValueError(f"--parallel members needs at least one member per process ({sum(sizes)} members of "
                         f"{len(subs)} hooks, {dist.world_size} processes)")
    costs = [member_cost(sub, store) for sub, n in zip(subs, sizes) for _ in range(n)]
    mine, shares, offset = partition_by_cost(costs, dist.world_size)[dist.rank], [], 0
    for n in sizes:
        start, stop = max(mine.start, offset), min(mine.stop, offset + n)
        shares.append(range(start - offset, max(start, stop) - offset))
        offset += n
    return shares


def _columns(run: SweepRun, hooks: list[str], widths: list[int]) -> torch.Tensor:
    """The column indices of `run`'s batch ([x_in] or [x_in | x_out]) in the shared batch of `hooks`."""
    starts = dict(zip(hooks, [sum(widths[:i]) for i in range(len(hooks))], strict=True))
    cols = [torch.arange(starts[h], starts[h] + widths[hooks.index(h)]) for h in (run.hook, run.target) if h]
    return torch.cat(cols)


def run_multi_hook(cfg: SweepConfig, log=print) -> dict | None:
    """Train one ensemble per hook (or pair) of `cfg` on the same row batches and save them (see the module
    docstring); returns OUTPUT_DIR/sweep.json's index on rank 0 (None on other ranks). Every check raises one line
    before training starts. With --resume, ensembles already saved are read back and the others continue from their
    checkpoints, each from its own position."""
    dist, out = Dist.current(), Path(cfg.output_dir)
    _refuse(cfg)
    if (out / INDEX_FILE).exists():
        raise ValueError(f"{out} already holds a finished sweep; choose another --output_dir or delete it")
    store = ActivationStore.open(cfg.dataset_dir)
    subs = [dataclasses.replace(cfg, hook_name=h, target_hook=t, output_dir=str(out / h))
            for h, t in hook_pairs(cfg, store)]
    for sub in subs:
        sub.validate()
    done = _saved_ensembles(cfg, out, subs)
    with contextlib.ExitStack() as locks:  # no other run may write a hook's folder meanwhile
        for sub in subs:
            locks.enter_context(writer_lock(sub.output_dir, "output_dir", dist))
        shares = member_shares(subs, store, dist)
        runs = {i: setup_run(sub, dist, log, shares[i]) for i, sub in enumerate(subs) if i not in done}
        if runs:
            trained = _train_together(cfg, store, list(runs.values()), dist, log)
            for (i, run), result in zip(runs.items(), trained, strict=True):
                done[i] = finish_run(run, result, log, report=False)
    if not dist.is_main:
        return None
    ensembles = [(Path(sub.output_dir), done[i]) for i, sub in enumerate(subs)]
    index = _write_index(cfg, out, ensembles, log)
    if cfg.report and cfg.eval_tokens:  # after every ensemble is saved (ranks do not wait on rank 0's reports)
        for sub in subs:
            if not (Path(sub.output_dir) / "report" / "index.html").exists():
                report_run(sub, store.spec.model, log)
    return index


def _saved_ensembles(cfg: SweepConfig, out: Path, subs: list[SweepConfig]) -> dict[int, dict]:
    """{position: index} of the ensembles an interrupted run already saved, kept with --resume (each checked against
    its flags, saetool.train.checkpoint.read_saved). ValueError (one line) without --resume, or when OUTPUT_DIR
    holds ensembles of hooks that --hook_name no longer lists (they would drop out of the index)."""
    saved = {i: sub for i, sub in enumerate(subs) if (Path(sub.output_dir) / INDEX_FILE).exists()}
    if saved and not cfg.resume:
        raise ValueError(f"{out} holds ensembles saved by an interrupted sweep ({', '.join(s.hook_name for s in saved.values())}"
                         f"); pass --resume True to finish it, or delete {out}")
    names = {Path(sub.output_dir).name for sub in subs}
    stray = sorted(d.name for d in out.iterdir() if d.is_dir() and d.name not in names
                   and ((d / INDEX_FILE).exists() or (d / "checkpoint").is_dir())) if cfg.resume and out.is_dir() else []
    if stray:
        raise ValueError(f"--resume: {out} holds ensembles of hooks that --hook_name does not list ({', '.join(stray)})"
                         "; rerun with the same hooks or delete it")
    return {i: read_saved(sub) for i, sub in saved.items()}


def _train_together(cfg: SweepConfig, store: ActivationStore, runs: list[SweepRun], dist: Dist, log) -> list[Trained]:
    """Train `runs` in lockstep on one loader of every hook they need; each run from its own checkpoint position
    (a resumed run skips the batches it had trained). Returns each run's Trained."""
    states = [load_checkpoint(run, log) for run in runs]
    steps = [None if run.idle else choose_step(run.cfg, run.ensemble, run.optimizer, dist, run.data_parallel,
                                               run.total_steps, precision=(state or {}).get("precision"))
             for run, state in zip(runs, states)]
    # only the hooks of the ensembles this rank trains are read (a member-parallel rank skips its idle runs' hooks;
    # the batches' rows do not depend on which hooks are read)
    hooks = list(dict.fromkeys(h for run in runs if not run.idle for h in (run.hook, run.target) if h))
    loader = BatchLoader(store, hooks, cfg.batch_size, runs[0].train_rows, seed=cfg.seed,
                         shuffle_chunks=cfg.shuffle_chunks)
    columns = [None if run.idle else _columns(run, hooks, loader.widths).to(cfg.device) for run in runs]
    for run, step in zip(runs, steps):
        log(describe(run, step))
    idle = sum(run.idle for run in runs)
    log(f"{len(runs)} ensembles on the same batches: each step reads {len(hooks)} hook(s) of the store once"
        + (f" (this rank holds no member of {idle} ensemble(s) and skips their hooks)" if idle else ""))
    trainers = [RunTrainer(run, step, state, log) for run, step, state in zip(runs, steps, states)]
    data_parallel = runs[0].data_parallel

    def shares(batches):  # (the whole host batch, this rank's rows of it for the device)
        for x in batches:
            rows = split_evenly(len(x), dist.world_size, dist.rank) if data_parallel else range(len(x))
            yield x, x[rows.start : rows.stop]

    start = time.perf_counter()
    try:
        for epoch in range(min(t.at.epoch for t in trainers), cfg.n_repetitions):
            active = [(run, t, cols, t.start_epoch(epoch)) for run, t, cols in zip(runs, trainers, columns)
                      if t.at.epoch <= epoch]
            first = min(f for *_, f in active)
            feed = DeviceFeed(shares(loader.epoch(epoch, start_batch=first)), cfg.device)
            for i, (x, x_dev) in enumerate(feed, start=first):
                x_dev = x_dev.float()
                for run, t, cols, f in active:
                    if i >= f:
                        resampling = run.cfg.resample_every and not run.idle  # resampling reads the host batch
                        t.batch(epoch, i, x.index_select(1, cols.cpu()) if resampling else x,
                                None if run.idle else x_dev.index_select(1, cols) * run.scale)
            for _, t, _, _ in active:
                t.end_epoch(epoch)
        for t in trainers:
            t.end()
    finally:
        for t in trainers:
            t.close()
    seconds = time.perf_counter() - start
    return [t.result(seconds) for t in trainers]


def _write_index(cfg: SweepConfig, out: Path, ensembles: list[tuple[Path, dict]], log) -> dict:
    """OUTPUT_DIR/sweep.json indexing every member of every hook, metrics.md, and transcoder sets."""
    names = [folder.name for folder, _ in ensembles]
    members = [{**m, "path": f"{name}/{m['path']}", "ensemble": name, "hook_name": ix["store"]["hook_name"],
                **({"target_hook": ix["store"]["target_hook"]} if ix["store"].get("target_hook") else {})}
               for name, (_, ix) in zip(names, ensembles) for m in ix["members"]]
    index = {"saetool_version": __version__, "config": dataclasses.asdict(cfg),
             "ensembles": {name: {"config": ix["config"], "training": ix.get("training", {}),
                                  "sweep_param": ix["sweep_param"], "target_hook": ix["store"].get("target_hook")}
                           for name, (_, ix) in zip(names, ensembles)},
             "store": {**ensembles[0][1]["store"], "hook_name": names}, "sweep_param": "hook_name", "members": members}
    index["store"].pop("target_hook", None)
    sets = write_transcoder_sets(out, ensembles, log)
    if sets:
        index["transcoder_sets"] = sets
    write_json(out / INDEX_FILE, index)
    tables = [(name, folder / "metrics.md") for name, (folder, _) in zip(names, ensembles)]
    if all(path.exists() for _, path in tables):
        (out / "metrics.md").write_text("".join(f"## {name}\n\n{path.read_text()}\n" for name, path in tables))
    return index
