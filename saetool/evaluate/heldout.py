"""The held-out pass: the rows a sweep never trained on, read and encoded once for every consumer.

A sweep holds out the last ``eval_tokens`` rows of its store, rounded up to whole contexts (:func:`heldout_rows`).
After training, those rows are read once and encoded once by every saved member (:func:`encode_pass`); the latents
feed every consumer in the same pass: the reconstruction statistics of each member (MSE, FVU, explained variance, L0,
dead latents and firing densities, :class:`saetool.evaluate.metrics.ReconstructionStats`: sweep.json, metrics.md and
the report) and, when the report's browser is on, its collector (passed in: any object with
``update(member, start_row, kept_mask, latents)``). :func:`heldout_stats` runs that pass and returns a
:class:`HeldOut`, which the report reuses instead of encoding again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from saetool.evaluate.metrics import ReconstructionStats

__all__ = ["METRIC_KEYS", "HeldOut", "context_batches", "encode_pass", "heldout_rows", "heldout_stats",
           "member_metrics"]

# The held-out numbers of each member in sweep.json ("metrics") and metrics.md.
METRIC_KEYS = ("mse", "fvu", "explained_variance", "l0", "l1", "dead_fraction", "n_dead")


def heldout_rows(n_rows: int, context_size: int, eval_tokens: int) -> tuple[int, int] | None:
    """The held-out row range ``(start, n_rows)`` of a store of ``n_rows`` rows: the last ``eval_tokens`` rows rounded
    up to whole contexts of ``context_size`` rows; None for ``eval_tokens`` 0. ValueError if nothing is left to train
    on."""
    if eval_tokens == 0:
        return None
    held = -(-eval_tokens // context_size) * context_size
    if held >= n_rows:
        raise ValueError(f"--eval_tokens {eval_tokens} leaves no training rows in a store of {n_rows} rows")
    return n_rows - held, n_rows


def context_batches(start: int, stop: int, context_size: int, batch_rows: int) -> list[tuple[int, int]]:
    """Split rows ``[start, stop)`` into batches whose inner boundaries fall on context boundaries.

    Boundaries are the multiples of ``batch_rows`` rounded up to whole contexts (``ceil(batch_rows / context_size)
    * context_size``), so a window never needs rows of another batch except in a context cut by ``start`` or
    ``stop`` (clipped there). Returns ``[(start, stop), ...]`` covering the range in order.
    """
    step = max(1, -(-int(batch_rows) // context_size)) * context_size
    edges = [start] + list(range((start // step + 1) * step, stop, step)) + [stop]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


@torch.no_grad()
def encode_pass(saes, store, hook: str, rows: tuple[int, int], device, batch_rows: int = 2048, stats=None,
                collector: Any = None, target: str | None = None) -> None:
    """Read rows ``[rows[0], rows[1])`` of ``store`` once, encode the kept rows (the store's mask) with every SAE, and
    feed the latents ``f`` [kept rows, d_sae] to ``stats`` (a list of
    :class:`saetool.evaluate.metrics.ReconstructionStats`, one per SAE) and/or ``collector`` (the browser's
    ``FeatureCollector``, or any object with ``update(i, start, keep, f)``). Rows are read as float32 in batches of
    :func:`context_batches` (``batch_rows`` rows, rounded to whole contexts). Transcoders (``target``: their output
    hook) are scored on their prediction of the target rows from the input rows."""
    c = max(1, int(store.spec.context_size))
    for start, stop in context_batches(rows[0], rows[1], c, batch_rows):
        keep = torch.from_numpy(store.read_mask(start, stop))
        if not keep.any():
            continue
        x = store.read_rows(hook, start, stop, torch.float32)[keep].to(device)
        y = x if target is None else store.read_rows(target, start, stop, torch.float32)[keep].to(device)
        for i, sae in enumerate(saes):
            f = sae.encode(x)
            if stats is not None:
                stats[i].update(y, (sae.decode(f) if target is None else sae(x)).to(x.dtype)[None], f[None])
            if collector is not None:
                collector.update(i, start, keep, f)


@dataclass
class HeldOut:
    """The result of one held-out pass: the ``rows`` read, the ``saes`` that encoded them (saved members,
    :class:`saetool.saved.SparseLinearAutoencoder`, in index order), each member's statistics (``stats[i]``:
    ``ReconstructionStats.compute()`` of member i, tensors with a leading member axis of 1 and ``firing_frequency``
    [1, d_sae]; None when no row was kept) and the browser's ``collector`` that the same pass filled (or None)."""

    rows: tuple[int, int]
    saes: list
    stats: list[dict | None]
    collector: Any = None


def heldout_stats(saes, store, hook: str, rows: tuple[int, int], device, collector: Any = None,
                  target: str | None = None) -> HeldOut:
    """Run the held-out pass over ``rows`` (see the module docstring) and return its :class:`HeldOut`."""
    stats = [ReconstructionStats(1, s.d_out, s.d_sae, device=device) for s in saes]
    encode_pass(saes, store, hook, rows, device, stats=stats, collector=collector, target=target)
    return HeldOut(rows, list(saes), [st.compute() if st.n_tokens else None for st in stats], collector)


def member_metrics(stats: dict | None) -> dict:
    """One member's held-out numbers for sweep.json ("metrics"): METRIC_KEYS as floats and ``n_tokens`` ({} without
    a held-out pass)."""
    if stats is None:
        return {}
    return {k: float(stats[k][0]) for k in METRIC_KEYS} | {"n_tokens": int(stats["n_tokens"])}
