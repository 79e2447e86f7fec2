"""The per-step training log: OUTPUT_DIR/train_log.jsonl, the progress bar and Weights & Biases.

Every LOG_EVERY steps (from step 1) each member's statistics of the batch trained on are gathered: summed over
data-parallel ranks (they are normalised by the global batch) or concatenated from member-parallel ranks. Every
rank takes part at the same steps; only rank 0 writes. A resumed run first drops the lines logged after its
checkpoint, so no step is logged twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saetool.train import wandb_log
from saetool.train.outputs import member_names

LOG_EVERY = 20


def trim_log(path: Path, steps: int) -> None:
    """Drop log lines beyond `steps` (written after the checkpoint a resumed run restarts from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= steps]
    path.write_text("".join(line + "\n" for line in keep))


class TrainLogger:
    """The log of one run (see the module docstring); `close()` when training ends."""

    def __init__(self, run, steps: int, tokens: int, log=print):
        dist = run.dist
        self.dist, self.data_parallel, self.by_members = dist, run.data_parallel, run.by_members
        self.file = self.wandb = None
        if run.output.wandb_project and dist.is_main:
            self.wandb = wandb_log.WandbLogger(member_names(run), project=run.output.wandb_project, name=run.out.name,
                                               config=dataclasses.asdict(run.cfg), log=log)
        if dist.is_main:
            run.out.mkdir(parents=True, exist_ok=True)
            trim_log(run.out / "train_log.jsonl", steps)
            self.file = open(run.out / "train_log.jsonl", "a")  # noqa: SIM115 (open for the run; close() shuts it)
        self.bar = tqdm(total=run.loader.n_rows * run.training.n_repetitions, initial=tokens, unit="tok", unit_scale=True,
                        desc="sweep", smoothing=0.1, disable=not dist.is_main)

    def step(self, stats: dict[str, torch.Tensor] | None, steps: int, tokens: int, n_rows: int, lr: float) -> None:
        """After step `steps` (1-based) trained on n_rows rows: advance the bar, log every LOG_EVERY steps. `stats`
        is None on a member-parallel rank that holds none of the run's members (it still takes part)."""
        self.bar.update(n_rows)
        if (steps - 1) % LOG_EVERY:
            return
        if self.data_parallel:
            stats = {k: self.dist.all_reduce_sum(v.clone()) for k, v in stats.items()}
        elif self.by_members:
            parts = self.dist.all_gather_objects(None if stats is None else {k: v.cpu() for k, v in stats.items()})
            parts = [p for p in parts if p is not None]
            stats = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if self.file is None:
            return
        self.file.write(json.dumps({"step": steps, "tokens": tokens, "lr": lr,
                                    **{k: v.tolist() for k, v in stats.items()}}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log_train(steps, tokens, stats)
        l0, mse = stats["l0"], stats["mse"]
        self.bar.set_postfix_str(f"L0 {l0.min():.0f}-{l0.max():.0f}, mse {mse.min():.3g}-{mse.max():.3g}")

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()

    def finish(self, members: list[dict]) -> None:
        """Log the held-out metrics of every member (rank 0) and end the W&B run."""
        if self.wandb is not None:
            self.wandb.log_eval([m["metrics"] for m in members])
            self.wandb.finish()
