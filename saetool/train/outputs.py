"""What training leaves behind: the members of a run saved in the SAELens layout (saetool.saved), as a snapshot
(a complete sweep folder, during training) or as the finished sweep's member folders (the sweep driver adds the
held-out metrics and writes sweep.json, the finished marker, after training has freed its state)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from saetool.ensemble import fold_normalization
from saetool.saes import get_architecture
from saetool.saved import write_members, write_sweep
from saetool.util import __version__


def _member(run, j: int, i: int) -> tuple[int, dict, dict]:
    """(member index i, weights on the host with any input scale folded in, cfg.json) of this rank's j-th member."""
    cfg, spec, ensemble = run.cfg, run.store.spec, run.ensemble
    arch_cfg = ensemble.member_cfg(j)
    out_hook = {} if run.target is None else {"hook_name_out": run.target}
    member_cfg = {
        **arch_cfg, "dtype": "float32", "device": str(cfg.device), "apply_b_dec_to_input": run.target is None,
        "normalize_activations": "none", "hook_name": run.hook, "tied": ensemble.tied,
        "metadata": {**arch_cfg["metadata"], "normalization_factor_folded": run.scale,
                     "model_name": spec.model, "hook_name": run.hook, **out_hook,
                     "context_size": spec.context_size,
                     "prepend_bos": spec.extra.get("prepend_bos", True), "dataset_path": os.path.abspath(run.store.path),
                     "dataset": spec.dataset, "seed": ensemble.seeds[j], "saetool_version": __version__},
    }
    weights = {k: v.cpu() for k, v in ensemble.member_weights(j).items()}
    if run.scale != 1.0:
        weights = fold_normalization(weights, run.scale)
    return i, weights, member_cfg


def _gathered(run) -> list[tuple[dict, dict]] | None:
    """Every member's (weights, cfg.json) in member order on rank 0 (None on other ranks): with member-parallel
    ranks, every rank's members are gathered first (every rank must call this, also one holding none of the run's
    members); with data-parallel ranks rank 0 holds all members."""
    payload = []
    if run.by_members or run.dist.is_main:
        payload = [_member(run, j, i) for j, i in enumerate(run.local)]
    if run.by_members:
        payload = [m for part in run.dist.all_gather_objects(payload) for m in part]
    if not run.dist.is_main:
        return None
    return [(w, c) for _, w, c in sorted(payload, key=lambda m: m[0])]


def _index(run, training: dict) -> dict:
    """The run's sweep.json without its members."""
    spec = run.store.spec
    return {"saetool_version": __version__, "config": dataclasses.asdict(run.cfg),
            "store": {"path": os.path.abspath(run.store.path), "model": spec.model, "hook_name": run.hook,
                      "n_rows": spec.n_rows, **({} if run.target is None else {"target_hook": run.target})},
            "sweep_param": get_architecture(run.cfg.architecture).SWEEP_PARAM, "training": training}


def save_sweep(run, out: Path) -> None:
    """A snapshot of the run: a complete sweep folder (members and sweep.json, no metrics) written by rank 0; every
    rank must call this."""
    members = _gathered(run)
    if members is not None:
        write_sweep(out, [(w, c, {}) for w, c in members], _index(run, {}))


def save_members(run, training: dict) -> dict | None:
    """Write the finished run's member folders (OUTPUT_DIR/saes/) from rank 0 and return its index (sweep.json's
    content, each member's "metrics" still empty; None on other ranks): the driver adds the held-out metrics and
    writes sweep.json. Every rank must call this. OSError (e.g. a full disk) leaves no partial saes/ folder."""
    members = _gathered(run)
    if members is None:
        return None
    entries = write_members(run.out, [(w, c, {}) for w, c in members])
    return {**_index(run, training), "members": entries}
