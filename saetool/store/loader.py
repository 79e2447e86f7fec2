"""Shuffled training batches from an activation store: every kept row exactly once per epoch (case T1).

Per epoch, the store chunks overlapping the row range are visited in a seeded random order; rows of
`shuffle_chunks` consecutive chunks (in that order) are pooled, masked rows (BOS, separators, padding) are
dropped, the pool is permuted, and full batches are emitted. Rows that do not fill a batch carry over into
the next pool; the very last batch of an epoch may be smaller (drop_last=False, as the original tool).
The order depends only on (seed, epoch), never on timing or on the number of read threads.

The data path: chunks are read and decoded by a pool of `num_threads` threads (Zarr's reads release the GIL in
Blosc/Zstd), up to `prefetch` pools ahead of the one being trained on. Rows stay in the store's dtype (fp16,
bf16 or fp32) on the host; they are converted on the training device (saetool.train.feed). `DeviceFeed` copies
batches to a CUDA device from pinned memory on a side stream, ahead of the step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from saetool.store.activation_store import ActivationStore


class BatchLoader:
    """Iterate training batches of one hook, or of several hooks of the same rows, of an `ActivationStore`.

    Args:
        store: an opened, complete store.
        hook_name: the array to read (its width is d_in), or a sequence of arrays: each batch then holds the same rows
            of every one, their columns side by side ([batch, sum of widths], in the order given; `widths` gives
            the split), read in one pass (a transcoder's input and target, every hook of a sweep).
        batch_size: rows per batch.
        row_range: [start, stop) rows of the store to use (e.g. the training split).
        seed: the base seed; epoch e uses numpy Generator seeded with (seed, e).
        shuffle_chunks: number of store chunks pooled and shuffled together.
        use_mask: drop rows whose store mask is False (BOS / separator / padding positions).
        num_threads: threads reading and decoding chunks (>= 1).
        prefetch: pools read ahead of the one being emitted (>= 1).

    Memory: at most (prefetch + 1) pools, each shuffle_chunks x chunk_size x d_in x itemsize bytes (plus one
    permuted copy), e.g. 3 x 4 x 16384 x 576 x 2 B = 226 MB for the demo store's fp16 rows. Only per-chunk row
    counts are kept for the whole range (never a mask or index per row).
    Raises ValueError for batch_size < 1 or a range without usable rows.
    """

    def __init__(self, store: ActivationStore, hook_name: str | Sequence[str], batch_size: int,
                 row_range: tuple[int, int] | None = None,
                 seed: int = 0, shuffle_chunks: int = 4, use_mask: bool = True, num_threads: int = 2,
                 prefetch: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store, self.hook_name, self.batch_size = store, hook_name, batch_size
        self.hooks = (hook_name,) if isinstance(hook_name, str) else tuple(hook_name)
        self.widths = [store.width(h) for h in self.hooks]
        self.seed, self.shuffle_chunks, self.use_mask = seed, max(1, shuffle_chunks), use_mask
        self.num_threads, self.prefetch = max(1, num_threads), max(1, prefetch)
        start, stop = row_range if row_range is not None else (0, store.spec.n_rows)
        cs = store.spec.chunk_size
        segments = [(max(start, c), min(stop, c + cs)) for c in range((start // cs) * cs, stop, cs)]
        self.segments = [(a, b) for a, b in segments if b > a]
        self.kept = [int(self._mask(a, b).sum()) for a, b in self.segments]  # usable rows per segment
        self.n_rows = sum(self.kept)
        if self.n_rows == 0:
            raise ValueError(f"no usable rows in rows [{start}, {stop}) of {store.path}")

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.n_rows // self.batch_size)  # noqa: PLE0303 (a ceiling division of non-negatives)

    def _mask(self, a: int, b: int) -> np.ndarray:
        return self.store.read_mask(a, b) if self.use_mask else np.ones(b - a, dtype=bool)

    def _read(self, seg: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
        """All rows of one segment [b - a, sum of widths] in the store dtype (every hook's columns side by side),
        and the positions of its usable rows."""
        parts = [self.store.read_rows(h, *seg, dtype=self.store_dtype) for h in self.hooks]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, 1)), np.flatnonzero(self._mask(*seg))

    @staticmethod
    def _pool(carry: torch.Tensor, parts: list[tuple[torch.Tensor, np.ndarray]], perm: np.ndarray) -> torch.Tensor:
        """carry + the usable rows of parts, permuted by perm: one concatenation and one gather."""
        offsets = np.cumsum([len(carry)] + [len(x) for x, _ in parts[:-1]])
        positions = np.concatenate([np.arange(len(carry)), *[o + keep for o, (_, keep) in zip(offsets, parts)]])
        return torch.cat([carry, *[x for x, _ in parts]]).index_select(0, torch.from_numpy(positions[perm]))

    @property
    def store_dtype(self) -> torch.dtype:
        """The dtype of the yielded rows: torch.float16, torch.bfloat16 or torch.float32, as stored."""
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.store.spec.dtype, torch.float32)

    def _plan(self, epoch: int) -> tuple[np.random.Generator, list[list[int]]]:
        """The epoch's rng (after permuting the segments) and its pools as lists of segment indices."""
        rng = np.random.default_rng([self.seed, epoch])
        order = [int(i) for i in rng.permutation(len(self.segments))]
        return rng, [order[i : i + self.shuffle_chunks] for i in range(0, len(order), self.shuffle_chunks)]

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """The batches of epoch `epoch` from batch `start_batch` on (deterministic given seed and epoch):
        tensors [batch_size, d_in] (the last one may be smaller) in `store_dtype`, on the host.
        Pools wholly before `start_batch` are not read: their permutations are replayed from their row counts,
        and only the segments holding the rows they carry into the first pool read are fetched."""
        rng, pools = self._plan(epoch)
        first, emitted, carry_index = self._skip(rng, pools, start_batch)
        with ThreadPoolExecutor(self.num_threads, thread_name_prefix="saetool-loader") as ex:
            carry = self._read_carry(carry_index, ex)
            ahead: deque = deque()
            submitted = first
            for _ in range(first, len(pools)):
                while len(ahead) <= self.prefetch and submitted < len(pools):
                    ahead.append([ex.submit(self._read, self.segments[s]) for s in pools[submitted]])
                    submitted += 1
                parts = [f.result() for f in ahead.popleft()]
                pool = self._pool(carry, parts, rng.permutation(len(carry) + sum(len(k) for _, k in parts)))
                n_full = len(pool) // self.batch_size * self.batch_size
                for i in range(0, n_full, self.batch_size):
                    if emitted >= start_batch:
                        yield pool[i : i + self.batch_size]
                    emitted += 1
                carry = pool[n_full:]
        if len(carry) and emitted >= start_batch:
            yield carry

    def _skip(self, rng: np.random.Generator, pools: list[list[int]], start_batch: int
              ) -> tuple[int, int, np.ndarray]:
        """Replay the pools whose batches all come before `start_batch` without reading them. Returns the first
        pool to read, the batches emitted before it, and the rows carried into it: int64 [rows, 2] of (segment
        index, position among that segment's kept rows), in carry order. Costs one permutation per skipped pool."""
        carry = np.zeros((0, 2), dtype=np.int64)
        emitted = 0
        for p, segs in enumerate(pools[:-1]):
            size = len(carry) + sum(self.kept[s] for s in segs)
            n_batches = size // self.batch_size
            if emitted + n_batches > start_batch:
                return p, emitted, carry
            new = [np.stack([np.full(self.kept[s], s), np.arange(self.kept[s])], 1) for s in segs]
            source = np.concatenate([carry, *new])
            carry = source[rng.permutation(size)[n_batches * self.batch_size :]]
            emitted += n_batches
        return len(pools) - 1, emitted, carry

    def _read_carry(self, index: np.ndarray, ex: ThreadPoolExecutor) -> torch.Tensor:
        """The carried rows `index` (see _skip), in that order; reads only the segments they come from."""
        if len(index) == 0:
            return torch.empty(0, sum(self.widths), dtype=self.store_dtype)
        needed = sorted(set(index[:, 0].tolist()))
        parts = [x[torch.from_numpy(keep)] for x, keep in ex.map(lambda s: self._read(self.segments[s]), needed)]
        offsets = dict(zip(needed, np.cumsum([0] + [len(x) for x in parts[:-1]])))
        rows = np.array([offsets[s] for s in index[:, 0].tolist()]) + index[:, 1]
        return torch.cat(parts)[torch.from_numpy(rows)]


class DeviceFeed:
    """Iterate `batches` (tensors, or tuples whose LAST element is the tensor to move) with that tensor on
    `device`: on CUDA, each batch is copied into pinned host memory and sent with a non-blocking copy on a side
    stream, `depth` batches ahead of the consumer; the consumer's stream waits on the copy's event before the
    batch is used (record_stream keeps the memory alive). On other devices the tensor is moved with `.to(device)`
    as it is consumed. Values and dtype are unchanged. Memory on CUDA: depth batches on the device and in pinned
    host memory."""

    def __init__(self, batches: Iterable, device: str | torch.device, depth: int = 2):
        self.batches, self.device, self.depth = batches, torch.device(device), max(1, depth)

    def __iter__(self) -> Iterator:
        if self.device.type != "cuda":
            for item in self.batches:
                yield self._with(item, self._last(item).to(self.device))
            return
        stream = torch.cuda.Stream(self.device)
        queue: deque = deque()
        for item in self.batches:
            queue.append(self._send(item, stream))
            if len(queue) > self.depth:
                yield self._receive(*queue.popleft())
        while queue:
            yield self._receive(*queue.popleft())

    @staticmethod
    def _last(item):
        return item[-1] if isinstance(item, tuple) else item

    @staticmethod
    def _with(item, tensor):
        return (*item[:-1], tensor) if isinstance(item, tuple) else tensor

    def _send(self, item, stream: torch.cuda.Stream):
        host = self._last(item).pin_memory()
        with torch.cuda.stream(stream):
            moved = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return item, moved, event

    def _receive(self, item, moved: torch.Tensor, event: torch.cuda.Event):
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        moved.record_stream(current)
        return self._with(item, moved)
