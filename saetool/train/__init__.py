"""The sweep's training loop, in rooms of its own (data flows top to bottom):

- `setup`: the run a config describes: store, hook, train/eval split, members on this rank, the ensemble and
  its initialisation, the optimizer and the batch loader (`SweepRun`).
- `step`: the step choice (fused kernel or autograd, fp32 or bf16, compiled or eager) and one training step.
- `feed`: batches from the loader to the training device (this rank's share, fp32, input scale).
- `loop`: the loop over epochs and batches: schedules, dead latents, resampling, snapshots, checkpoints.
- `checkpoint`: the atomic, resumable checkpoint and the settings it must match.
- `logs`: the per-step log (train_log.jsonl, progress bar, Weights & Biases).
- `outputs`: held-out evaluation, the saved sweep folder and its metrics tables.

`saetool.sweep.run_sweep` strings them together: setup -> train -> evaluate -> save.
"""
