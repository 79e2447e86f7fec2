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

from saetool.config import SweepConfig
from saetool.distributed import Dist

# Settings that may differ between a checkpointed run and its resumption.
RESUME_FREE = ("resume", "checkpoint_every", "device", "compile", "kernel", "member_group")


def fingerprint(cfg: SweepConfig, dist: Dist) -> dict:
    """The settings a checkpoint records and a resumed run must repeat (with --parallel members, also the world
    size, since each rank's file holds its own members)."""
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}
    if cfg.parallel == "members":
        key["world_size"] = dist.world_size
    return key


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

    def load(self) -> dict:
        step_dir = self.dir / (self.dir / "latest").read_text().strip()
        path = step_dir / f"rank{self.dist.rank if self.shard_by_rank else 0}.pt"
        return torch.load(path, map_location="cpu", weights_only=False)

    def remove(self) -> None:
        self.dist.barrier()
        if self.dist.is_main:
            shutil.rmtree(self.dir, ignore_errors=True)
