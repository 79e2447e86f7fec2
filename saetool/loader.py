"""Shuffled training batches from an activation store: every kept row exactly once per epoch (case T1).

Per epoch, the store chunks overlapping the row range are visited in a seeded random order; rows of
`shuffle_chunks` consecutive chunks (in that order) are pooled, masked rows (BOS, separators, padding) are
dropped, the pool is permuted, and full batches are emitted. Rows that do not fill a batch carry over into
the next pool; the very last batch of an epoch may be smaller (drop_last=False, as the original tool).
The order depends only on (seed, epoch), never on timing; the next pool is read from disk in a background
thread while the current one trains.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from queue import Queue

import numpy as np
import torch

from saetool.store import ActivationStore


class BatchLoader:
    """Iterate training batches of one hook of an `ActivationStore`.

    Args:
        store: an opened, complete store.
        hook_name: the array to read (its width is d_in).
        batch_size: rows per batch.
        row_range: [start, stop) rows of the store to use (e.g. the training split).
        seed: the base seed; epoch e uses numpy Generator seeded with (seed, e).
        shuffle_chunks: number of store chunks pooled and shuffled together (memory: that many chunks).
        use_mask: drop rows whose store mask is False (BOS / separator / padding positions).

    Yields float32 tensors [batch, d_in] on CPU.
    """

    def __init__(self, store: ActivationStore, hook_name: str, batch_size: int, row_range: tuple[int, int] | None = None,
                 seed: int = 0, shuffle_chunks: int = 4, use_mask: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store, self.hook_name, self.batch_size = store, hook_name, batch_size
        self.seed, self.shuffle_chunks, self.use_mask = seed, max(1, shuffle_chunks), use_mask
        start, stop = row_range if row_range is not None else (0, store.spec.n_rows)
        cs = store.spec.chunk_size
        self.segments = [(max(start, c), min(stop, c + cs)) for c in range((start // cs) * cs, stop, cs)]
        self.segments = [(a, b) for a, b in self.segments if b > a]
        mask = store.read_mask(start, stop) if use_mask else np.ones(stop - start, dtype=bool)
        self.n_rows = int(mask.sum())
        if self.n_rows == 0:
            raise ValueError(f"no usable rows in rows [{start}, {stop}) of {store.path}")

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.n_rows // self.batch_size)

    def _read_pool(self, segs: list[tuple[int, int]]) -> torch.Tensor:
        parts = []
        for a, b in segs:
            x = self.store.read_rows(self.hook_name, a, b)
            if self.use_mask:
                x = x[torch.from_numpy(self.store.read_mask(a, b))]
            parts.append(x)
        return torch.cat(parts)

    def epoch(self, epoch: int = 0) -> Iterator[torch.Tensor]:
        """The batches of epoch `epoch` (deterministic given seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = [self.segments[i] for i in rng.permutation(len(self.segments))]
        groups = [order[i : i + self.shuffle_chunks] for i in range(0, len(order), self.shuffle_chunks)]
        queue: Queue = Queue(maxsize=1)

        def produce() -> None:
            for g in groups:
                queue.put(self._read_pool(g))

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        carry = torch.empty(0, self.store.width(self.hook_name))
        for _ in groups:
            pool = torch.cat([carry, queue.get()])
            pool = pool[torch.from_numpy(rng.permutation(len(pool)))]
            n_full = len(pool) // self.batch_size * self.batch_size
            for i in range(0, n_full, self.batch_size):
                yield pool[i : i + self.batch_size]
            carry = pool[n_full:]
        thread.join()
        if len(carry):
            yield carry
