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

import dataclasses
from pathlib import Path

from saetool.config import SweepConfig
from saetool.export import write_transcoder_sets
from saetool.saved import INDEX_FILE, write_json
from saetool.store import ActivationStore, StoreError
from saetool.train import member_hyperparams, read_saved
from saetool.util import Dist, __version__, partition_by_cost


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


def refuse_flags(cfg: SweepConfig) -> None:
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


def saved_ensembles(cfg: SweepConfig, out: Path, subs: list[SweepConfig]) -> dict[int, dict]:
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


def write_hooks_index(cfg: SweepConfig, out: Path, ensembles: list[tuple[Path, dict]], log) -> dict:
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
