"""The sweep's training loop, in rooms of its own (data flows top to bottom):

- `setup`: the run a config describes: store, hook, train/eval split, members on this rank, the ensemble and
  its initialisation, the optimizer and the batch loader (`SweepRun`).
- `step`: the step choice (fused kernel or autograd, fp32 or bf16, compiled or eager) and one training step.
- `feed`: one loader of every hook the runs need, and each batch to the training device (this rank's share, fp32,
  each run's columns and input scale).
- `loop`: `train_runs`, the one loop over epochs and batches for one run or several in lockstep: schedules, dead
  latents, resampling, snapshots, checkpoints.
- `checkpoint`: the atomic, resumable checkpoint and the settings it must match.
- `logs`: the per-step log (train_log.jsonl, progress bar, Weights & Biases).
- `outputs`: the saved members (snapshots, and the finished run's member folders).
- `memory`: the memory estimate per rank (parameters, Adam, gradients, the step's intermediates, the loader) and the
  member group that fits; `plan`: the estimate of the runs a config describes, before they are built (`check_runs`:
  printed before training, refused on CUDA when it cannot fit; `plan_runs`: `saetool sweep --plan True`).

`saetool.sweep.run_sweep` strings them together: setup_run -> train_runs -> save_members; then, with the training
state freed, the held-out pass (saetool.evaluate), sweep.json and the report.
"""

from saetool.train.checkpoint import read_saved
from saetool.train.loop import Trained, describe, train_runs
from saetool.train.memory import MemoryEstimate, MemoryShape, estimate_memory
from saetool.train.outputs import save_members
from saetool.train.plan import Plan, check_runs, plan_runs
from saetool.train.setup import SweepRun, member_hyperparams, setup_run

__all__ = ["MemoryEstimate", "MemoryShape", "Plan", "SweepRun", "Trained", "check_runs", "describe", "estimate_memory",
           "member_hyperparams", "plan_runs", "read_saved", "save_members", "setup_run", "train_runs"]
