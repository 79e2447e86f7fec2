"""Checkpoints that a SIGKILL at any moment cannot corrupt, and the settings a resumed run must match.

A checkpoint holds the ensemble, the Adam state, the data position (epoch, batch in epoch), the step and token
counts, torch's RNG state, the dead-latent counters and the resolved step precision. `--resume` continues from it
to exactly the uninterrupted result. Writing one holds no rank in a collective: each writing rank copies its state
to host memory and writes it in a thread while training goes on (`Checkpointer`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch

from saetool.saved import read_index
from saetool.util import Background, Dist, injected_delay

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
    run.checkpointer.drop_stale()
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
    """OUTPUT_DIR/checkpoint/step_{s}/rank{r}.pt + `latest` (written last, atomically, by rank 0 once every rank's
    file of step s exists), so a SIGKILL at any moment leaves the previous complete checkpoint in force.
    With shard_by_rank (member-parallel) every rank saves its own file; otherwise rank 0 saves rank0.pt.

    Saving holds no rank in a collective: `save` copies the state to host memory (the only wait of the training
    loop, bounded by the state's size) and writes it in a thread (saetool.util.Background) while training goes on;
    rank 0's thread then polls for the other ranks' files (no barrier), writes `latest` and removes the older steps.
    One write is in flight at a time: the next `save`, and `wait` at the end of training, wait for it (and raise its
    error, e.g. a full disk). The host copy costs the host memory of one checkpoint while it is written."""

    def __init__(self, out: Path, dist: Dist, shard_by_rank: bool):
        self.dir, self.dist, self.shard_by_rank = out / "checkpoint", dist, shard_by_rank
        self.pending: Background | None = None

    def exists(self) -> bool:
        return (self.dir / "latest").is_file()

    def save(self, state: dict, step: int) -> None:
        self.wait()
        if self.shard_by_rank or self.dist.is_main:
            self.pending = Background(self._write, _on_host(state), step, name="saetool-checkpoint")

    def _write(self, state: dict, step: int, stop) -> None:
        step_dir = self.dir / f"step_{step}"
        step_dir.mkdir(parents=True, exist_ok=True)
        path = step_dir / f"rank{self.dist.rank if self.shard_by_rank else 0}.pt"
        injected_delay("checkpoint")  # tests only: a slow disk
        torch.save(state, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        if not self.dist.is_main:
            return
        files = [step_dir / f"rank{r}.pt" for r in (range(self.dist.world_size) if self.shard_by_rank else [0])]
        sleep = 0.01
        while not all(f.is_file() for f in files):  # the other ranks write theirs meanwhile
            if stop.is_set():  # this run is failing: `latest` stays at the last complete checkpoint
                return
            time.sleep(sleep)
            sleep = min(0.5, 2 * sleep)
        (self.dir / "latest.tmp").write_text(step_dir.name)
        os.replace(self.dir / "latest.tmp", self.dir / "latest")
        for old in self.dir.glob("step_*"):
            if _step(old) < step:
                shutil.rmtree(old, ignore_errors=True)

    def wait(self) -> None:
        """Wait until the checkpoint being written is written (rank 0: with every rank's file and `latest`)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """On the way out of a failed run: let this rank's write in flight end (not waiting for other ranks)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.close()

    def drop_stale(self) -> None:
        """Rank 0, resuming, before training: remove every step folder but the latest, i.e. the partial ones of the
        interrupted run, so no file of theirs passes for a file of this run."""
        if self.dist.is_main and self.exists():
            latest = (self.dir / "latest").read_text().strip()
            for old in self.dir.glob("step_*"):
                if old.name != latest:
                    shutil.rmtree(old, ignore_errors=True)

    def load(self) -> dict | None:
        """This rank's saved state (None when the checkpoint has no file for it: made by fewer processes), its
        tensors memory-mapped from the file (copied only where they are loaded into the ensemble and Adam)."""
        step_dir = self.dir / (self.dir / "latest").read_text().strip()
        path = step_dir / f"rank{self.dist.rank if self.shard_by_rank else 0}.pt"
        if not path.is_file():
            return None
        # memory-mapped: every data-parallel rank reads rank 0's file through the shared page cache, not a full copy
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _step(folder: Path) -> int:
    """s of a step_{s} folder (-1 for another name)."""
    try:
        return int(folder.name.removeprefix("step_"))
    except ValueError:
        return -1


def _on_host(obj):
    """A copy of `obj` (nested dicts, lists and tuples of tensors and plain values) whose tensors are on the host and
    share no memory with training, which goes on while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _on_host(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_on_host(v) for v in obj)
    return obj
