"""The sweep driver, one for every kind of sweep: `run_sweep(cfg)`.

A sweep is one or more ensembles of SAEs (or transcoders), each trained as one `SAEEnsemble` on the same batches:
- one hook: one ensemble, written to OUTPUT_DIR;
- several hooks (`--hook_name all` or a list, saetool.sweep.multihook): one ensemble per hook (or input/target pair),
  all trained in lockstep on one read of the store, written to OUTPUT_DIR/<hook>/ and indexed in OUTPUT_DIR/sweep.json;
- `--config` ensembles (saetool.sweep.ensembles): each entry trained in turn (each one hook or several) into
  OUTPUT_DIR/<name>/, indexed together.

For each group of ensembles trained together the driver runs the same stages: setup_run -> train_runs ->
save_members (saetool.train); then, with the training state freed, on rank 0, the held-out pass, sweep.json,
metrics.md and the report (saetool.sweep.finish). Training never imports the report.

With several processes (Accelerate / torchrun) the work is split in one of two ways:
- `--parallel data`: every rank holds all members; each global batch is split across ranks (`split_evenly`), losses
  are normalised by the global batch size and gradients are summed over ranks (the fused kernel's flat all-reduce,
  or DistributedDataParallel), so training equals one process with the same global batch. Every rank walks the same
  batches, so uneven data never leaves a rank waiting in a collective (case D1).
- `--parallel members`: members are partitioned across ranks (one hook: contiguous equal shares; several hooks: the
  members of all hooks in contiguous shares balanced by cost); every rank reads the same batches; no gradient
  traffic. Each member equals single-process training.
The last `eval_tokens` rows (rounded up to whole contexts) are never trained on; every member is evaluated there
(MSE, FVU, explained variance, L0, dead fraction; saetool.evaluate). Only rank 0 writes outputs, and what only it does
after training (the held-out pass, the report) holds no other rank in a collective: they return, or, between two
`--config` ensembles, poll for its sweep.json. `--checkpoint_every`
saves weights, Adam state and the data position; `--resume` continues to exactly the uninterrupted result.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from saetool.config import SweepConfig
from saetool.report import run_report
from saetool.saved import INDEX_FILE
from saetool.store import ActivationStore
from saetool.sweep.ensembles import ensemble_configs, write_ensembles_index
from saetool.sweep.finish import SavedRun, finish, report_config
from saetool.sweep.multihook import (
    hook_pairs,
    member_shares,
    refuse_flags,
    saved_ensembles,
    write_hooks_index,
)
from saetool.train import check_runs, plan_runs, read_saved, save_members, setup_run, train_runs
from saetool.util import Dist, lock_owner, wait_while_held, writer_lock


def run_sweep(cfg: SweepConfig, log=print) -> dict | None:
    """Train the sweep described by `cfg`, save it under cfg.output_dir and return its index (sweep.json) on
    rank 0 (None on other ranks).

    Raises StoreError/ValueError (one line) for a missing/incomplete/foreign store, an unknown hook, an
    output_dir that already holds a finished sweep (or an unfinished one without --resume), a checkpoint
    made with other settings, or a run that cannot fit on its CUDA device (saetool.train.check_runs); nothing is
    written in those cases. With --plan, prints the memory estimate and returns it (`plan_sweep`), writing nothing.
    """
    cfg.validate()
    if cfg.plan:
        return plan_sweep(cfg, log)
    with writer_lock(cfg.output_dir, "output_dir", Dist.current()):
        if cfg.ensembles:
            return _run_config(cfg, log)
        return _run_hooks(cfg, log)


def several_hooks(cfg: SweepConfig) -> bool:
    """True when --hook_name is "all" or a list of hooks (saetool.sweep.multihook)."""
    return cfg.hook_name is not None and (cfg.hook_name == "all" or "," in cfg.hook_name)


def _run_config(cfg: SweepConfig, log) -> dict | None:
    """Every entry of cfg.ensembles (validated together before any training) in turn into OUTPUT_DIR/<name>/, then
    OUTPUT_DIR/sweep.json indexing them all. Finished ensembles are skipped with --resume.

    Rank 0 finishes each ensemble (held-out pass, report: unbounded work) before the next one trains; meanwhile the
    other ranks do not wait in the next ensemble's first collective but poll for the finished ensemble's sweep.json
    (saetool.util.wait_while_held), so no collective timeout limits how long a report takes."""
    _refuse_finished(Path(cfg.output_dir))
    dist, owner = Dist.current(), lock_owner(cfg.output_dir)
    runs, previous = [], None
    for name, sub in ensemble_configs(cfg):
        if previous is not None and not dist.is_main:
            wait_while_held((previous / INDEX_FILE).exists, cfg.output_dir, owner,
                            f"rank 0 to finish the ensemble in {previous}")
        previous = Path(sub.output_dir)
        if cfg.resume and (Path(sub.output_dir) / INDEX_FILE).exists():
            log(f"ensemble {name}: already finished, skipped")
            index = read_saved(sub)
        else:
            log(f"ensemble {name}: {sub.architecture}")
            with writer_lock(sub.output_dir, "output_dir", Dist.current()):
                index = _run_hooks(sub, log)
        runs.append((name, sub, index))
    if any(index is None for _, _, index in runs):
        return None
    return write_ensembles_index(cfg, runs, log)


def _run_hooks(cfg: SweepConfig, log) -> dict | None:
    """One ensemble on cfg.hook_name, or one per hook of a multi-hook sweep trained on the same batches."""
    if not several_hooks(cfg):
        return _train_group([cfg], [None], log)[0]
    dist, out = Dist.current(), Path(cfg.output_dir)
    refuse_flags(cfg)
    _refuse_finished(out)
    store = ActivationStore.open(cfg.dataset_dir)
    subs = [dataclasses.replace(cfg, hook_name=h, target_hook=t, output_dir=str(out / h))
            for h, t in hook_pairs(cfg, store)]
    for sub in subs:
        sub.validate()
    done = saved_ensembles(cfg, out, subs)
    todo = [i for i in range(len(subs)) if i not in done]
    with contextlib.ExitStack() as locks:  # no other run may write a hook's folder meanwhile
        for sub in subs:
            locks.enter_context(writer_lock(sub.output_dir, "output_dir", dist))
        shares = member_shares(subs, store, dist)
        for i, index in zip(todo, _train_group([subs[i] for i in todo], [shares[i] for i in todo], log)):
            done[i] = index
    if not dist.is_main:
        return None
    for i in set(range(len(subs))) - set(todo):  # saved before an interruption; its report may be missing
        if subs[i].report and subs[i].eval_tokens and not (Path(subs[i].output_dir) / "report" / "index.html").exists():
            run_report(report_config(subs[i], store.spec.model), log=log)
    return write_hooks_index(cfg, out, [(Path(sub.output_dir), done[i]) for i, sub in enumerate(subs)], log)


def _train_group(subs: list[SweepConfig], shares: list[range | None], log) -> list[dict | None]:
    """Set up, train and save the ensembles `subs` together (this rank's members: `shares`, None = the default
    split); then, with the training state freed, finish each on rank 0 (held-out pass, sweep.json, report). Returns
    each ensemble's index (None on other ranks)."""
    dist = Dist.current()
    groups = check_runs(subs, shares, dist, log)  # the memory estimate; on CUDA the member group, or a refusal
    runs = [setup_run(sub, dist, log, share, group) for sub, share, group in zip(subs, shares, groups, strict=True)]
    trained = train_runs(runs, log)
    saved = [_save(run, t) for run, t in zip(runs, trained, strict=True)]
    del runs, trained  # the ensembles, their Adam state and the loaders go before the evaluation and the report
    return [None if s is None else finish(s, log) for s in saved]


def _save(run, trained) -> SavedRun | None:
    """Save the run's members (every rank takes part; rank 0 writes) and keep what finishing needs (rank 0; None on
    other ranks). ValueError (one line) if saving fails (disk full), saying what was kept."""
    try:
        index = save_members(run, trained.summary)
    except OSError as e:
        kept = (f"the trained state is kept in {run.out / 'checkpoint'}: free space and rerun with --resume True to "
                "save it without retraining") if run.cfg.checkpoint_every else "nothing was kept (no --checkpoint_every)"
        raise ValueError(f"saving the sweep to {run.out} failed ({e.strerror or e}); {kept}") from None
    if index is None:
        return None
    return SavedRun(run.cfg, run.out, index, run.store, run.hook, run.target, run.eval_rows, trained.logger)


def plan_sweep(cfg: SweepConfig, log=print, cuda_free: int | None = None) -> dict:
    """--plan: print the memory plan of every group of ensembles `cfg` trains together (one hook; the hooks of a
    multi-hook sweep; each --config entry) and return {"plan": {name: {"bytes", "parts", "host_bytes", "member_group",
    "fits"}}}. Reads the store's metadata only: no lock is taken, nothing is trained or written. cuda_free: simulate
    a CUDA device with that many bytes free (saetool.train.plan_runs)."""
    dist, out = Dist.current(), {}
    for name, sub in ensemble_configs(cfg) if cfg.ensembles else [("sweep", cfg)]:
        subs, shares = [sub], [None]
        if several_hooks(sub):
            refuse_flags(sub)
            store = ActivationStore.open(sub.dataset_dir)
            subs = [dataclasses.replace(sub, hook_name=h, target_hook=t) for h, t in hook_pairs(sub, store)]
            shares = member_shares(subs, store, dist)
        plan = plan_runs(subs, shares, dist, cuda_free)
        prefix = "" if name == "sweep" else f"ensemble {name}: "
        for line in plan.lines:
            log(prefix + line)
        verdict = "fits" if plan.refusal is None else f"does not fit: {plan.refusal}"
        on_cuda = cuda_free is not None or plan.shapes and plan.shapes[0].device_type == "cuda"
        log(prefix + (verdict if on_cuda else "on the CPU the estimate is only printed (no run is refused)"))
        out[name] = {"bytes": plan.estimate.total, "parts": plan.estimate.parts(), "host_bytes":
                     sum(plan.estimate.host.values()), "member_group": max((g or 0) for g in plan.groups),
                     "fits": plan.refusal is None}
    log("--plan: nothing was trained or written")
    return {"plan": out}


def _refuse_finished(out: Path) -> None:
    if (out / INDEX_FILE).exists():
        raise ValueError(f"{out} already holds a finished sweep; choose another --output_dir or delete it")
