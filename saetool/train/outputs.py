"""What training leaves behind: the members of a run saved in the SAELens layout (saetool.saved), as a snapshot
(a complete sweep folder, during training) or as the finished sweep's member folders (the sweep driver adds the
held-out metrics and writes sweep.json, the finished marker, after training has freed its state).

Saving is by share: each member-parallel rank writes its own members' folders and sends rank 0 only their index
entries; nothing gathers the weights of all members in one process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from saetool.ensemble import fold_normalization
from saetool.saes import get_architecture
from saetool.saved import (
    INDEX_FILE,
    MEMBERS_TMP,
    member_folder_names,
    publish_members,
    write_json,
    write_member,
)
from saetool.util import __version__


def _member(run, j: int) -> tuple[dict, dict]:
    """(weights on the host with any input scale folded in, cfg.json) of this rank's j-th member."""
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
    return weights, member_cfg


def member_names(run) -> list[str]:
    """The folder name of every member of the run (all ranks' members), from the swept values every rank knows."""
    arch = get_architecture(run.arch.architecture)
    return member_folder_names(arch.NAME, [{h: run.hyper[h][i] for h in arch.HYPERPARAMS}
                                           for i in range(run.n_members)])


def _write_folders(run, out: Path) -> list[dict] | None:
    """Write the run's member folders into OUT/saes/ and return their index entries in member order on rank 0 (None
    on other ranks). By share: with member-parallel ranks each rank writes its own members' folders into
    OUT/saes.tmp/ and only their index entries (a few hundred bytes each) go to rank 0, which swaps the folder in
    once every rank has written; with data-parallel ranks (or one process) rank 0 holds every member and writes
    alone. No weights travel between ranks. Every rank must call this. OSError (one line, on every rank) if a rank
    could not write; no partial saes/ folder is left."""
    dist, tmp = run.dist, out / MEMBERS_TMP
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if run.by_members:
        dist.barrier()  # the stale tmp folder is gone before any rank writes
    names, mine, error = member_names(run), [], None
    if run.by_members or dist.is_main:
        try:
            mine = [(i, write_member(tmp, names[i], *_member(run, j), {})) for j, i in enumerate(run.local)]
        except OSError as e:
            error = f"rank {dist.rank}: {e.strerror or e}" if dist.active else str(e.strerror or e)
    shares = dist.all_gather_objects((mine, error)) if run.by_members else [(mine, error)]
    errors = [err for _, err in shares if err]
    if errors:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(errors[0])
    if not dist.is_main:
        return None
    publish_members(out)
    return [entry for _, entry in sorted((m for part, _ in shares for m in part), key=lambda m: m[0])]


def _index(run, training: dict) -> dict:
    """The run's sweep.json without its members."""
    spec = run.store.spec
    return {"saetool_version": __version__, "config": dataclasses.asdict(run.cfg),
            "store": {"path": os.path.abspath(run.store.path), "model": spec.model, "hook_name": run.hook,
                      "n_rows": spec.n_rows, **({} if run.target is None else {"target_hook": run.target})},
            "sweep_param": get_architecture(run.arch.architecture).SWEEP_PARAM, "training": training}


def save_sweep(run, out: Path) -> None:
    """A snapshot of the run: a complete sweep folder (members and sweep.json, no metrics), written by share
    (_write_folders); every rank must call this."""
    entries = _write_folders(run, out)
    if entries is not None:
        write_json(out / INDEX_FILE, {**_index(run, {}), "members": entries})


def save_members(run, training: dict) -> dict | None:
    """Write the finished run's member folders (OUTPUT_DIR/saes/, by share: _write_folders) and return its index on
    rank 0 (sweep.json's content, each member's "metrics" still empty; None on other ranks): the driver adds the
    held-out metrics and writes sweep.json. Every rank must call this. OSError (e.g. a full disk on any rank) leaves
    no partial saes/ folder."""
    entries = _write_folders(run, run.out)
    if entries is None:
        return None
    return {**_index(run, training), "members": entries}
