"""Checkpoints that a SIGKILL at any moment cannot corrupt, and the settings a resumed run must match.

A checkpoint holds the ensemble, the Adam state, the data position (epoch, batch in epoch), the step and token
counts, torch's RNG state, the dead-latent counters and the resolved step precision. `--resume` continues from it
to exactly the uninterrupted result.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from saetool.saved import read_index
from saetool.util import Dist

# Settings that may differ between a checkpointed run and its resumption.
RESUME_FREE = ("resume", "checkpoint_every", "device", "compile", "kernel", "member_group", "dist_timeout")


def fingerprint(run) -> dict:
    """The settings a checkpoint of `run` (a saetool.train.setup.SweepRun) records and a resumed run must repeat
    (with --parallel members, also the world size and this rank's members, since each rank's file holds its own)."""
    key = {k: v for k, v in dataclasses.asdict(run.cfg).items() if k not in RESUME_FREE}
    if run.runtime.parallel == "members":
        key["world_size"] = run.dist.world_size
        if run.by_members:
            key["members"] = [run.local.start, run.local.stop]
    return key


def differing(saved: dict, now: dict) -> list[str]:
    """The settings (keys of either dict, except RESUME_FREE) whose values differ between `saved` and `now`."""
    return sorted(k for k in saved.keys() | now.keys() if k not in RESUME_FREE and saved.get(k) != now.get(k))


def load_checkpoint(run, log=print) -> dict | None:
    """The checkpoint `run` resumes from with --resume (None without --resume, or with no checkpoint yet).
    ValueError (one line) if it was made with other settings."""
    if not run.runtime.resume:
        return None
    if not run.checkpointer.exists():
        log(f"--resume: no checkpoint in {run.out}; starting from scratch")
        return None
    state = run.checkpointer.load()
    if state is None:
        raise ValueError(f"the checkpoint in {run.out} holds no file for rank {run.dist.rank}: it was made by another "
                         "number of processes (or --parallel); rerun with those or delete it")
    differ = differing(state["fingerprint"], fingerprint(run))
    if differ:
        raise ValueError(f"the checkpoint in {run.out} was made with other settings ({', '.join(differ)}); rerun with "
                         "those or delete it")
    log(f"resuming {run.out} at step {state['steps']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})")
    return state


def read_saved(cfg) -> dict:
    """The index (sweep.json) of the ensemble already saved in cfg.output_dir, which a resumed run of several
    ensembles keeps instead of training it again; ValueError (one line naming the settings) if it was trained with
    other settings than `cfg` (a SweepConfig) asks for."""
    index = read_index(cfg.output_dir)
    differ = differing(index.get("config", {}), dataclasses.asdict(cfg))
    if differ:
        raise ValueError(f"--resume: {cfg.output_dir} holds an ensemble saved with other settings ({', '.join(differ)})"
                         "; rerun with those or delete it")
    return index


class Checkpointer:
    """OUTPUT_DIR/checkpoint/step_{s}/rank{r}.pt + `latest` (written last, atomically, by rank 0 after every
    rank has saved), so a SIGKILL at any moment leaves the previous complete checkpoint in force.
    With shard_by_rank (member-parallel) every rank saves its own file; otherwise rank 0 saves rank0.pt."""

    def __init__(self, out: Path, dist: Dist, shard_by_rank: bool):
        self.dir, self.dist, self.shard_by_rank = out / "checkpoint", dist, shard_by_rank

    def exists(self) -> bool:
        return (self.dir / "latest").is_file()

    def save(self, state: dict, step: int) -> None:
        step_dir = self.dir / f"step_{step}"
        if self.shard_by_rank or self.dist.is_main:
            step_dir.mkdir(parents=True, exist_ok=True)
            path = step_dir / f"rank{self.dist.rank if self.shard_by_rank else 0}.pt"
            torch.save(state, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
        self.dist.barrier()
        if self.dist.is_main:
            (self.dir / "latest.tmp").write_text(step_dir.name)
            os.replace(self.dir / "latest.tmp", self.dir / "latest")
            for old in self.dir.glob("step_*"):
                if old != step_dir:
                    shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()

    def load(self) -> dict | None:
        """This rank's saved state (None when the checkpoint has no file for it: made by fewer processes)."""
        step_dir = self.dir / (self.dir / "latest").read_text().strip()
        path = step_dir / f"rank{self.dist.rank if self.shard_by_rank else 0}.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def remove(self) -> None:
        self.dist.barrier()
        if self.dist.is_main:
            shutil.rmtree(self.dir, ignore_errors=True)
