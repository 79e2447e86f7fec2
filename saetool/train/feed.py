"""Batches from the loader to the training device: `device_batches(run, epoch, first_batch)`.

The loader yields rows in the store's dtype (fp16/bf16/fp32) on the host; this rank's share of each batch
(all of it, or its `split_evenly` slice with --parallel data) is copied to the device (on CUDA from pinned
memory on a side stream, `saetool.store.loader.DeviceFeed`), converted to fp32 there and multiplied by the input
scale. Only the share travels: the full host batch is kept for the rare steps that need it (resampling).
A transcoder run's rows hold its input and target hooks side by side ([x_in | x_out], saetool.store.loader); the step
splits them (saetool.train.step.split_pair).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from saetool.store import DeviceFeed
from saetool.util import split_evenly


def device_batches(run, epoch: int, first_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, x_local) for batches first_batch, first_batch + 1, ... of `epoch`: x the whole batch [batch, d_in] on
    the host in the store dtype (len(x) is the global batch size), x_local this rank's rows on cfg.device,
    float32, times run.scale."""
    dist = run.dist

    def shares():
        for x in run.loader.epoch(epoch, start_batch=first_batch):
            rows = split_evenly(len(x), dist.world_size, dist.rank) if run.data_parallel else range(len(x))
            yield x, x[rows.start : rows.stop]

    for x, x_local in DeviceFeed(shares(), run.cfg.device):
        x_local = x_local.float()
        yield x, (x_local * run.scale if run.scale != 1.0 else x_local)
