"""Batches from the loader to the training device, for one or several runs on the same rows.

Every run of a sweep (one ensemble per hook, or one) trains on the same row batches: `shared_loader(runs)` reads
every hook the runs this rank trains need, side by side ([batch, sum of widths]; a transcoder's input and target are
two of them), so each store chunk is read and decoded once per epoch for all of them. `device_batches` copies this
rank's share of each batch (all of it, or its `split_evenly` slice with --parallel data) to the device (on CUDA from
pinned memory on a side stream, `saetool.store.DeviceFeed`) and converts it to float32 there; `run_batch` hands a run
its columns, times its input scale. Only the share travels: the full host batch is kept for the rare steps that need
it (resampling). A transcoder run's rows hold [x_in | x_out]; the step splits them (saetool.train.step.split_pair).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from saetool.store import BatchLoader, DeviceFeed
from saetool.util import split_evenly


def shared_loader(runs) -> tuple[BatchLoader, list[torch.Tensor | None]]:
    """One loader of every hook that `runs` (saetool.train.setup.SweepRun, sharing the sweep's batch settings) train
    on here, and each run's column indices in its batches (None: all columns in order, or an idle run). Only the hooks
    of runs this rank trains are read (a member-parallel rank skips its idle runs' hooks: the rows walked do not
    depend on the hooks read, saetool.store.loader)."""
    data, device = runs[0].data, runs[0].runtime.device
    hooks = list(dict.fromkeys(h for run in runs if not run.idle for h in (run.hook, run.target) if h))
    loader = BatchLoader(runs[0].store, hooks, data.batch_size, runs[0].train_rows, seed=data.seed,
                         shuffle_chunks=data.shuffle_chunks)
    starts = dict(zip(hooks, [sum(loader.widths[:i]) for i in range(len(hooks))], strict=True))
    columns = []
    for run in runs:
        own = [] if run.idle else [h for h in (run.hook, run.target) if h]
        cols = [torch.arange(starts[h], starts[h] + loader.widths[hooks.index(h)]) for h in own]
        full = own == hooks
        columns.append(None if run.idle or full else torch.cat(cols).to(device))
    return loader, columns


def device_batches(loader: BatchLoader, epoch: int, first_batch: int, dist, data_parallel: bool,
                   device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, x_local) for batches first_batch, first_batch + 1, ... of `epoch`: x the whole batch [batch, width] on the
    host in the store dtype (len(x) is the global batch size), x_local this rank's rows on `device`, float32."""

    def shares():
        for x in loader.epoch(epoch, start_batch=first_batch):
            rows = split_evenly(len(x), dist.world_size, dist.rank) if data_parallel else range(len(x))
            yield x, x[rows.start : rows.stop]

    for x, x_local in DeviceFeed(shares(), device):
        yield x, x_local.float()


def run_batch(run, x: torch.Tensor, x_local: torch.Tensor, columns: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`run`'s view of a shared batch: (its host batch: the shared one, or its columns when it resamples; its device
    rows times its input scale, None for an idle run)."""
    if run.idle:
        return x, None
    if columns is not None:
        x_local = x_local.index_select(1, columns)
        if run.training.resample_every:  # resampling reads the host batch
            x = x.index_select(1, columns.cpu())
    return x, (x_local * run.scale if run.scale != 1.0 else x_local)
