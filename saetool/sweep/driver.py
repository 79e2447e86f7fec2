"""The sweep driver: store -> ensemble of SAEs -> saved members -> evaluation on held-out rows.

All members (one per L1 coefficient, or per k for TopK) train together as one `SAEEnsemble` on the same
batches. With several processes (Accelerate / torchrun) the work is split in one of two ways:

- `--parallel data`: every rank holds all members; each global batch is split across ranks
  (`split_evenly`), losses are normalised by the global batch size and gradients are summed over ranks (the
  fused kernel's flat all-reduce, or DistributedDataParallel), so training equals one process with the same
  global batch. Every rank walks the same batches, so uneven data never leaves a rank waiting in a collective
  (case D1).
- `--parallel members`: members are partitioned across ranks (equal shapes, so contiguous equal shares are
  balanced; a sweep of several hooks balances the members of all hooks by cost, saetool.sweep.multihook); every rank
  reads the same batches; no gradient traffic. Each member equals single-process training.

The last `eval_tokens` rows (rounded up to whole contexts) are never trained on; every member is evaluated
there (MSE, FVU, explained variance, L0, dead fraction; saetool.evaluate.metrics). Only rank 0 writes outputs.
`--checkpoint_every` saves weights, Adam state and the data position; `--resume` continues to exactly the
uninterrupted result. The rooms of the training loop are in saetool.train.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from saetool.config import SweepConfig
from saetool.export import write_transcoder_sets
from saetool.saved import INDEX_FILE, write_json
from saetool.sweep.multihook import run_multi_hook
from saetool.train import (
    choose_step,
    describe,
    finish_run,
    frontier_table,
    load_checkpoint,
    read_saved,
    setup_run,
    train,
)
from saetool.util import Dist, __version__, writer_lock


def run_sweep(cfg: SweepConfig, log=print) -> dict | None:
    """Train the sweep described by `cfg`, save it under cfg.output_dir and return its index (sweep.json) on
    rank 0 (None on other ranks).

    Raises StoreError/ValueError (one line) for a missing/incomplete/foreign store, an unknown hook, an
    output_dir that already holds a finished sweep (or an unfinished one without --resume), or a checkpoint
    made with other settings; nothing is written in those cases.
    """
    cfg.validate()
    with writer_lock(cfg.output_dir, "output_dir", Dist.current()):
        if cfg.ensembles:
            return run_ensembles(cfg, log)
        if several_hooks(cfg):
            return run_multi_hook(cfg, log)
        return _train_and_save(cfg, log)


def _train_and_save(cfg: SweepConfig, log) -> dict | None:
    run = setup_run(cfg, Dist.current(), log)
    state = load_checkpoint(run, log)
    step = choose_step(cfg, run.ensemble, run.optimizer, run.dist, run.data_parallel, run.total_steps,
                       precision=state.get("precision") if state else None)
    log(describe(run, step))
    return finish_run(run, train(run, step, state, log), log)


def several_hooks(cfg: SweepConfig) -> bool:
    """True when --hook_name is "all" or a list of hooks (saetool.sweep.multihook)."""
    return cfg.hook_name is not None and (cfg.hook_name == "all" or "," in cfg.hook_name)


def with_config(flags: dict) -> dict:
    """`flags` with the flags of its --config YAML (load_sweep_config) underneath: a flag given on the command line
    wins. `saetool sweep` and `accelerate launch launch/sweep.py` both read their flags through this."""
    return {**load_sweep_config(flags["config"]), **flags} if flags.get("config") else flags


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


def ensemble_configs(cfg: SweepConfig) -> list[tuple[str, SweepConfig]]:
    """(name, validated config) of every entry of cfg.ensembles, all built before any training, so a bad entry
    fails before the first ensemble trains. A top-level flag that acts on some architectures only
    (saetool.config.ARCHITECTURE_FLAGS) is passed to the ensembles it acts on, and refused if it acts on none.
    Raises ValueError naming the flag (or the repeated ensemble name)."""
    from saetool.config import ARCHITECTURE_FLAGS, build, join_names

    defaults = SweepConfig()
    base = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("ensembles", "config")}
    architectures = [entry.get("architecture", cfg.architecture) for entry in cfg.ensembles]
    for flag, acts_on in ARCHITECTURE_FLAGS.items():
        if base[flag] != getattr(defaults, flag) and not set(architectures) & set(acts_on):
            raise ValueError(f"--{flag} applies to {join_names(acts_on)} only, and no ensemble is one "
                             f"({', '.join(architectures)})")
    out, subs = Path(cfg.output_dir), []
    for i, (entry, arch) in enumerate(zip(cfg.ensembles, architectures, strict=True)):
        name = ensemble_name(entry, i)
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name) or ".." in name:
            raise ValueError(f"--ensembles: the name {name!r} must be a plain folder name (letters, digits, _ . -)")
        if name in [n for n, _ in subs]:
            raise ValueError(f"--ensembles: two ensembles are named {name!r} (each needs its own folder)")
        shared = {k: v if k not in ARCHITECTURE_FLAGS or arch in ARCHITECTURE_FLAGS[k] else getattr(defaults, k)
                  for k, v in base.items()}
        flags = {**shared, **{k: v for k, v in entry.items() if k != "name"}, "output_dir": str(out / name)}
        try:
            subs.append((name, build(SweepConfig, flags)))
        except ValueError as e:
            raise ValueError(f"ensemble {name!r}: {e}") from None
    return subs


def run_ensembles(cfg: SweepConfig, log=print) -> dict | None:
    """Train every entry of cfg.ensembles (each a dict of flags overriding cfg's) as its own ensemble, one after the
    other, into OUTPUT_DIR/<name>/, then write OUTPUT_DIR/sweep.json indexing every member (paths relative to
    OUTPUT_DIR, each with its architecture, hyperparameters, metrics and ensemble name) and a combined metrics.md.
    Finished ensembles are skipped with --resume."""
    out = Path(cfg.output_dir)
    if (out / INDEX_FILE).exists():
        raise ValueError(f"{out} already holds a finished sweep; choose another --output_dir or delete it")
    runs = []
    for name, sub in ensemble_configs(cfg):
        if cfg.resume and (Path(sub.output_dir) / INDEX_FILE).exists():
            log(f"ensemble {name}: already finished, skipped")
            index = read_saved(sub)
        else:
            log(f"ensemble {name}: {sub.architecture}")
            index = run_sweep(sub, log)
        runs.append((name, sub, index))
    if any(index is None for _, _, index in runs):
        return None
    members = [{**m, "path": f"{name}/{m['path']}", "ensemble": name} for name, _, index in runs
               for m in index["members"]]
    index = {"saetool_version": __version__, "config": dataclasses.asdict(cfg),
             "ensembles": {name: {"config": dataclasses.asdict(sub), "training": index.get("training", {}),
                                  "sweep_param": index["sweep_param"]} for name, sub, index in runs},
             "store": runs[0][2]["store"], "sweep_param": "architecture", "members": members}
    out.mkdir(parents=True, exist_ok=True)
    sets = write_transcoder_sets(out, [(Path(sub.output_dir), ix) for _, sub, ix in runs], log)
    if sets:
        index["transcoder_sets"] = sets
    write_json(out / INDEX_FILE, index)
    if all(m["metrics"] for m in members):
        table = frontier_table(members)
        (out / "metrics.md").write_text(f"Held-out evaluation on {members[0]['metrics']['n_tokens']} rows of "
                                        f"{index['store']['path']}\n\n{table}\n")
        log(table)
    return index


