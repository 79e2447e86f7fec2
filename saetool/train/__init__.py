"""The sweep's training loop, in rooms of its own (data flows top to bottom):

- `setup`: the run a config describes: store, hook, train/eval split, members on this rank, the ensemble and
  its initialisation, the optimizer and the batch loader (`SweepRun`).
- `step`: the step choice (fused kernel or autograd, fp32 or bf16, compiled or eager) and one training step.
- `feed`: batches from the loader to the training device (this rank's share, fp32, input scale).
- `loop`: the loop over epochs and batches: schedules, dead latents, resampling, snapshots, checkpoints.
- `checkpoint`: the atomic, resumable checkpoint and the settings it must match.
- `logs`: the per-step log (train_log.jsonl, progress bar, Weights & Biases).
- `outputs`: held-out evaluation, the saved sweep folder and its metrics tables.

`saetool.sweep.driver.run_sweep` strings them together: setup -> train -> evaluate -> save.
"""

from saetool.train.checkpoint import load_checkpoint, read_saved
from saetool.train.finish import finish_run, report_run
from saetool.train.loop import RunTrainer, Trained, describe, train
from saetool.train.outputs import frontier_table
from saetool.train.setup import SweepRun, member_hyperparams, setup_run
from saetool.train.step import choose_step

__all__ = ["RunTrainer", "SweepRun", "Trained", "choose_step", "describe", "finish_run", "frontier_table",
           "load_checkpoint", "member_hyperparams", "read_saved", "report_run", "setup_run", "train"]
