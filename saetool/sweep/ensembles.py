"""`--config` sweeps: a YAML of flags whose `ensembles` list trains one ensemble per entry (architectures, widths,
hooks...) in the same run, each into OUTPUT_DIR/<name>/, indexed together in OUTPUT_DIR/sweep.json."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import yaml

from saetool.config import ARCHITECTURE_FLAGS, SweepConfig, build, join_names
from saetool.evaluate import frontier_table
from saetool.export import write_transcoder_sets
from saetool.saved import INDEX_FILE, write_json
from saetool.util import __version__


def with_config(flags: dict) -> dict:
    """`flags` with the flags of its --config YAML (load_sweep_config) underneath: a flag given on the command line
    wins. `saetool sweep` and `accelerate launch launch/sweep.py` both read their flags through this."""
    return {**load_sweep_config(flags["config"]), **flags} if flags.get("config") else flags


def load_sweep_config(path: str | os.PathLike) -> dict:
    """The flags of a sweep YAML (configs/sweeps/*.yaml): a mapping of SweepConfig fields, with an optional
    `ensembles` list of per-ensemble flag mappings. ValueError (one line) if it is not such a mapping."""
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


def write_ensembles_index(cfg: SweepConfig, runs: list[tuple[str, SweepConfig, dict]], log=print) -> dict:
    """OUTPUT_DIR/sweep.json indexing every member of every ensemble of a --config run (paths relative to OUTPUT_DIR,
    each with its architecture, hyperparameters, metrics and ensemble name), a combined metrics.md, and circuit-tracer
    transcoder sets; `runs` are (name, config, index) of the ensembles in order."""
    out = Path(cfg.output_dir)
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
