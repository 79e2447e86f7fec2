"""The training loop: every (epoch, batch) of the run, from a checkpoint's position or the start.

Per step: the learning-rate schedule (warm-up, restarts at resamplings, decay) and the L1/L0 coefficient
warm-up are set, the step trains every member on the batch, the dead-latent counters advance (summed over
data-parallel ranks), dead latents are resampled every `resample_every` steps, and the step is logged. Snapshots
(after every repetition, or every store chunk with --save_after_every) and checkpoints (--checkpoint_every) are
written at the same points in a resumed run as in an uninterrupted one; a checkpoint is written in a thread while
training goes on (saetool.train.checkpoint), and training ends once the last one is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from saetool.ensemble import (
    DeadLatentTracker,
    coefficient_multiplier,
    lr_multiplier,
    resample_dead_latents,
    squared_errors,
)
from saetool.saes import get_architecture
from saetool.train.checkpoint import fingerprint, load_checkpoint
from saetool.train.feed import device_batches, run_batch, shared_loader
from saetool.train.logs import TrainLogger
from saetool.train.memory import resample_group
from saetool.train.outputs import save_sweep
from saetool.train.setup import SweepRun
from saetool.train.step import Step, choose_step


@dataclass
class Position:
    """Where training stands: the epoch, the next batch of that epoch, and the steps and rows trained so far."""

    epoch: int = 0
    batch: int = 0
    steps: int = 0
    tokens: int = 0


@dataclass
class Trained:
    """train()'s result: the summary written to sweep.json's "training", and the open logger (for eval metrics)."""

    summary: dict
    logger: TrainLogger


def describe(run: SweepRun, step: Step | None) -> str:
    """The one-line summary printed before training (this rank's; step None for an idle run)."""
    dist = run.dist
    param = get_architecture(run.arch.architecture).SWEEP_PARAM
    values = run.hyper[param]
    kind, hooks = "SAEs", f"hook {run.hook}"
    d_in, d_out = run.store.width(run.hook), run.store.width(run.target or run.hook)
    if run.target is not None:
        kind = "skip transcoders" if run.arch.skip_connection else "transcoders"
        hooks = f"d_out {d_out}, hooks {run.hook} -> {run.target}"
    members = f", members {run.local.start}..{run.local.stop - 1} here" if run.by_members and not run.idle else ""
    return (f"sweep: {run.n_members} {run.arch.architecture} {kind} ({param} {values[0]:.3g}..{values[-1]:.3g}), "
            f"d_in {d_in}, d_sae {int(d_in * run.arch.ratio)}, {hooks}, {run.loader.n_rows} training "
            f"rows x {run.training.n_repetitions}, device {run.runtime.device}, {dist.world_size} process(es)"
            + (f", parallel {run.runtime.parallel}" if dist.active else "") + members
            + (f", {step.describe()}" if step else ", no member on this rank"))


def train_runs(runs: list[SweepRun], log=print) -> list[Trained]:
    """Train `runs` (one ensemble each; one run, or one per hook of a multi-hook sweep) in lockstep on the same row
    batches (saetool.train.feed), each from its own checkpoint (a resumed run skips the batches it had trained, so a
    run interrupted between two ensembles' checkpoints resumes each where it was). An idle run (no member on this
    member-parallel rank) trains nothing but takes part in its run's collectives. Returns each run's Trained."""
    run0 = runs[0]
    states = [load_checkpoint(run, log) for run in runs]
    steps = [None if run.idle else choose_step(run.runtime, run.ensemble, run.optimizer, run.dist, run.data_parallel,
                                               run.total_steps, run.grad_clip_norm, (state or {}).get("precision"),
                                               run.member_group)
             for run, state in zip(runs, states)]
    loader, columns = shared_loader(runs)
    for run, step in zip(runs, steps):
        log(describe(run, step))
    if len(runs) > 1:
        idle = sum(run.idle for run in runs)
        log(f"{len(runs)} ensembles on the same batches: each step reads {len(loader.hooks)} hook(s) of the store once"
            + (f" (this rank holds no member of {idle} ensemble(s) and skips their hooks)" if idle else ""))
    trainers = [RunTrainer(run, step, state, log) for run, step, state in zip(runs, steps, states)]
    start = time.perf_counter()
    try:  # the progress bars end before an error is printed
        for epoch in range(min(t.at.epoch for t in trainers), run0.training.n_repetitions):
            active = [(t, cols, t.start_epoch(epoch)) for t, cols in zip(trainers, columns) if t.at.epoch <= epoch]
            first = min(f for *_, f in active)
            batches = device_batches(loader, epoch, first, run0.dist, run0.data_parallel, run0.runtime.device)
            for i, (x, x_local) in enumerate(batches, start=first):
                for t, cols, f in active:
                    if i >= f:
                        t.batch(epoch, i, *run_batch(t.run, x, x_local, cols))
            for t, _, _ in active:
                t.end_epoch(epoch)
        for t in trainers:
            t.end()
        for t in trainers:  # the checkpoints in flight are written before the members are saved
            t.run.checkpointer.wait()
    finally:
        for t in trainers:
            t.close()
    seconds = time.perf_counter() - start
    return [t.result(seconds) for t in trainers]


class RunTrainer:
    """One run's training, batch by batch: `start_epoch(e)` -> first batch, `batch(e, i, x, x_local)` for each batch,
    `end_epoch(e)`, `end()`, `close()`, `result(seconds)`. `train_runs` drives one RunTrainer per run in lockstep.
    An idle run (no member on this member-parallel rank; step None) trains nothing but takes part in the run's
    collectives (logs, snapshots, checkpoints) at the same steps as the ranks that train it."""

    def __init__(self, run: SweepRun, step: Step | None, state: dict | None, log=print):
        self.run, self.step, self.log = run, step, log
        self.tracker = None
        if (run.arch.auxk_coefficient or run.training.resample_every) and not run.idle:
            self.tracker = DeadLatentTracker(len(run.local), run.ensemble.d_sae, run.training.dead_window, run.runtime.device)
        self.at = _restore(run, self.tracker, state)
        self.logger = TrainLogger(run, self.at.steps, self.at.tokens, log)
        self.restarts = range(run.training.resample_every, run.total_steps, run.training.resample_every) if run.training.resample_every else ()
        self.trained_here = 0
        self.snapshots: _SnapshotClock | None = None

    def start_epoch(self, epoch: int) -> int:
        """Begin `epoch`; returns its first batch (a resumed epoch's position, else 0)."""
        first = self.at.batch if epoch == self.at.epoch else 0
        self.snapshots = _SnapshotClock(self.run.store.spec.chunk_size, self.run.output.save_after_every, first,
                                        self.run.data.batch_size)
        return first

    def batch(self, epoch: int, i: int, x: torch.Tensor, x_local: torch.Tensor) -> None:
        """Train on batch i of `epoch`: x the whole batch on the host, x_local this rank's rows on the device."""
        run, at, tracker = self.run, self.at, self.tracker
        lr = _set_schedules(run, at.steps, self.restarts)
        stats = None
        if not run.idle:
            dead = tracker.dead if tracker is not None and run.arch.auxk_coefficient else None
            stats = self.step(x_local, len(x), dead)
            fired = stats.pop("fired")
        at.steps += 1
        if tracker is not None:
            _track_dead(run, tracker, fired, x, at.steps, self.log, (self.step.members_per_pass, len(x_local)))
        at.tokens += len(x)
        self.trained_here += len(x)
        self.logger.step(stats, at.steps, at.tokens, len(x), lr)
        chunk = self.snapshots.due(len(x))
        if chunk is not None:
            save_sweep(run, run.out / "snapshots" / f"epoch_{epoch}_chunk_{chunk}")
        if run.runtime.checkpoint_every and at.steps % run.runtime.checkpoint_every == 0:
            _checkpoint(run, self.step, tracker, Position(epoch, i + 1, at.steps, at.tokens))

    def end_epoch(self, epoch: int) -> None:
        if epoch < self.run.training.n_repetitions - 1:
            save_sweep(self.run, self.run.out / "snapshots" / f"epoch_{epoch}")

    def end(self) -> None:
        run, at = self.run, self.at
        if run.runtime.checkpoint_every and self.trained_here and at.steps % run.runtime.checkpoint_every:
            # the end of training, so that a save that fails (disk full) resumes without retraining
            _checkpoint(self.run, self.step, self.tracker,
                        Position(run.training.n_repetitions - 1, len(self.run.loader), at.steps, at.tokens))

    def close(self) -> None:
        self.logger.close()
        self.run.checkpointer.close()  # after a failure: this rank's checkpoint write in flight ends

    def result(self, seconds: float) -> Trained:
        """The summary of the training (sweep.json's "training") after `seconds` of it."""
        run, step, at = self.run, self.step, self.at
        rate = self.trained_here / max(seconds, 1e-9)
        kernel = None if step is None else {"compiled": step.compiled, "kernel": "fused" if step.fused else "autograd",
                                            "precision": step.precision, "grad_clip_norm": step.grad_clip_norm}
        if run.by_members:  # an idle rank 0 reports the step of the first rank that trains members
            kernel = next(k for k in run.dist.all_gather_objects(kernel) if k is not None)
        resumed = f" ({self.trained_here} tokens in this run)" if self.trained_here != at.tokens else ""
        self.log(f"trained {at.steps} steps, {at.tokens} tokens{resumed}; this run {seconds:.1f} s ({rate:.0f} "
                 f"tokens/s, {rate * run.n_members:.0f} SAE-tokens/s)")
        summary = {"steps": at.steps, "tokens": at.tokens, "seconds_this_run": round(seconds, 2),
                   "tokens_per_s": round(rate, 1), "sae_tokens_per_s": round(rate * run.n_members, 1),
                   "world_size": run.dist.world_size, "parallel": run.runtime.parallel if run.dist.active else "none",
                   **kernel}
        return Trained(summary, self.logger)


class _SnapshotClock:
    """--save_after_every: a snapshot each time the epoch's rows pass another store chunk (at most one per batch).
    A resumed epoch first replays its `skipped` full batches without saving, so snapshots fall where they would."""

    def __init__(self, chunk_size: int, enabled: bool, skipped: int, batch_size: int):
        self.chunk_size, self.enabled = chunk_size, enabled
        self.rows, self.next = 0, chunk_size
        for _ in range(skipped):
            self.due(batch_size)

    def due(self, n_rows: int) -> int | None:
        """After a batch of n_rows: the chunk number of a snapshot to save now, or None."""
        self.rows += n_rows
        if not self.enabled or self.rows < self.next:
            return None
        self.next += self.chunk_size
        return self.rows // self.chunk_size


def _restore(run: SweepRun, tracker: DeadLatentTracker | None, state: dict | None) -> Position:
    """Load a checkpoint's weights, Adam state, RNG and dead-latent counters; its position (or the start)."""
    if state is None:
        return Position()
    if not run.idle:
        run.ensemble.load_state_dict(state["ensemble"])
        run.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if tracker is not None:
        tracker.since.copy_(state["dead_since"])
    return Position(state["epoch"], state["batch_in_epoch"], state["steps"], state["tokens"])


def _checkpoint(run: SweepRun, step: Step | None, tracker: DeadLatentTracker | None, at: Position) -> None:
    """Save the run's state at position `at` (an idle run: the position only, in its rank's file)."""
    idle = run.idle
    run.checkpointer.save({"ensemble": None if idle else run.ensemble.state_dict(),
                           "optimizer": None if idle else run.optimizer.state_dict(),
                           "epoch": at.epoch, "batch_in_epoch": at.batch, "steps": at.steps, "tokens": at.tokens,
                           "torch_rng": torch.get_rng_state(), "fingerprint": fingerprint(run),
                           "precision": None if idle else step.precision,
                           "dead_since": tracker.since.cpu() if tracker is not None else None}, at.steps)


def _set_schedules(run: SweepRun, steps: int, restarts) -> float:
    """Set step `steps`'s learning rate (returned) and coefficient warm-up."""
    ensemble = run.ensemble
    lr = run.training.adam_lr * lr_multiplier(steps, run.training.lr_warmup_steps, run.total_steps, run.training.lr_decay_steps, restarts)
    if run.idle:
        return lr
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    coefficient = next((h for h in ("l1_coefficient", "l0_coefficient") if h in ensemble.hyperparams), None)
    if coefficient and run.training.l1_warmup_steps:
        base = torch.tensor(ensemble.hyperparams[coefficient], dtype=torch.float64)
        getattr(ensemble, coefficient).copy_(base * coefficient_multiplier(steps, run.training.l1_warmup_steps))
    return lr


def _track_dead(run: SweepRun, tracker: DeadLatentTracker, fired: torch.Tensor, x: torch.Tensor, steps: int,
                log, group: tuple[int, int]) -> None:
    """Advance the dead-latent counters by the global batch x; resample every --resample_every steps. group: (members
    per forward of the step, this rank's rows of the batch), which bound resampling's member group."""
    if run.data_parallel:
        fired = run.dist.all_reduce_sum(fired.int()) > 0
    tracker.update_fired(fired, len(x))
    if run.training.resample_every and steps % run.training.resample_every == 0 and steps < run.total_steps:
        _resample(run, x.to(run.runtime.device).float() * run.scale, tracker, steps, log, *group)


@torch.no_grad()
def _resample(run: SweepRun, x: torch.Tensor, tracker: DeadLatentTracker, step: int, log, group: int,
              x_local_rows: int) -> None:
    """Resample this rank's members' dead latents on the full batch x (every rank holds it, so data-parallel
    ranks agree); member i draws from its own generator seeded by (seed, step, i), so the result does not
    depend on how members are split across ranks. The dead latents then count as fresh. The members are encoded a
    group at a time (saetool.train.memory.resample_group: no more [members, rows, d_sae] at once than the step's)."""
    ensemble, dead = run.ensemble, tracker.dead
    if not dead.any():
        return
    buffers = {n: getattr(ensemble, n).clone() for n in ensemble.buffer_names}
    errors = []
    n, size = ensemble.n_members, resample_group(group, x_local_rows, len(x), ensemble.n_members)
    for start in range(0, n, size):  # the training forward (BatchTopK: batch top-k), a member group at a time
        with ensemble.members(slice(start, min(n, start + size))):
            errors.append(squared_errors(ensemble(x)[0], x))
    for name, value in buffers.items():  # without the forward's buffer update
        getattr(ensemble, name).copy_(value)
    generators = [torch.Generator().manual_seed(run.data.seed * 1_000_003 + step * 65_537 + i) for i in run.local]
    W_enc = ensemble.W_enc if ensemble.tied else ensemble.W_enc_param
    counts = resample_dead_latents(W_enc, ensemble.W_dec, ensemble.b_enc, dead, x, None, generators,
                                   run.optimizer, err=torch.cat(errors))
    tracker.since[dead] = 0
    log(f"step {step}: resampled {int(counts.sum())} dead latents ({counts.tolist()} per member)")
