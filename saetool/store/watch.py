"""Waiting for the token writer without a collective: a recording rank polls the store's metadata.

Generation has one token writer (rank 0) that commits the chunks' tokens in order (`ActivationStore.claim_tokens`,
`commit_tokens`, `mark_tokens_complete`: attrs["saetool"]["tokens_committed"]) while every rank records the
activations of its chunks. A rank waiting for the writer re-reads attrs["saetool"] (one small file, renamed into
place by Zarr, so a read sees a whole version) with a bounded sleep between reads (POLL_FIRST, doubling up to
POLL_MAX): no rank ever waits in a collective on the writer, so no collective timeout limits how long the text
takes. Between reads it asks `gone()` whether the writer can still progress (on other ranks: does rank 0 still
hold the store's lock, saetool.util.owner_gone; on rank 0: did its writer thread fail), and a failure the writer
recorded in the store (`fail_tokens`) stops it with that line. Rank 0 follows the other ranks the same way: its
progress bar (`CommitProgress`) counts the chunks committed in the store.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from saetool.store.activation_store import ActivationStore, read_meta, tokens_committed
from saetool.store.layout import StoreSpec
from saetool.store.values import StoreError

POLL_FIRST = 0.01  # seconds slept after the first unsuccessful read of a wait ...
POLL_MAX = 0.5  # ... doubling up to this
POLL_SECONDS = 1.0  # rank 0 re-reads the store's commits at most this often for the aggregated progress bar


class TokenWatch:
    """A recorder's view of the token writer `owner` (its lock record, saetool.util.lock_owner) of the store at
    `path`. `open(spec)` waits until that writer has claimed the store (or the store is complete) and returns it
    attached for writing; `ready(chunk)` waits until the tokens of `chunk` are committed (True) or the tokens are
    complete without it (False: the store ended before). `gone()`, asked before every read, returns None while the
    writer runs and else a one-line reason (or raises the writer's own error); it turns into a StoreError.
    `settle()`, if given, is called once the writer recorded a failure in the store, before that turns into a
    StoreError: on rank 0 it waits for its writer thread and raises the writer's own error instead."""

    def __init__(self, path: str | os.PathLike, owner: dict | None, gone: Callable[[], str | None],
                 settle: Callable[[], object] | None = None):
        self.path, self.owner, self.gone, self.settle = Path(path), owner, gone, settle
        self.meta: dict = {}
        self.store: ActivationStore | None = None

    def _claimed(self, meta: dict) -> bool:
        return bool(meta.get("complete")) or (meta.get("token_writer") or {}).get("owner") == self.owner

    def _wait(self, done: Callable[[dict], bool], what: str) -> dict:
        """Poll until `done(meta)`; StoreError (one line) once the writer failed or is gone without it."""
        if self.meta and done(self.meta):
            return self.meta
        sleep = POLL_FIRST
        while True:
            reason = self.gone()  # before the read: a writer that published and then stopped is not an error
            meta = read_meta(self.path)
            if meta is not None:
                self.meta = meta
                if done(meta):
                    return meta
                writer = meta.get("token_writer") or {}
                if writer.get("error") and writer.get("owner") == self.owner:
                    if self.settle is not None:
                        self.settle()
                    raise StoreError(f"{self.path}: the token writer (rank 0) failed: {writer['error']}")
            if reason is not None:
                raise StoreError(f"{self.path}: stopped waiting for {what}: {reason}")
            time.sleep(sleep)
            sleep = min(POLL_MAX, 2 * sleep)

    def open(self, spec: StoreSpec) -> ActivationStore:
        """The store, once rank 0's writer has claimed it (or it is complete), attached for writing (StoreError if
        it holds other settings than `spec`)."""
        self._wait(self._claimed, "rank 0 to create or reopen the store")
        self.store = ActivationStore.attach(self.path, spec)
        return self.store

    def ready(self, chunk: int) -> bool:
        """Wait until the tokens of `chunk` are committed (True; the attached store then knows the rows the writer
        has set) or the tokens are complete without it (False)."""
        meta = self._wait(lambda m: tokens_committed(m) > chunk or bool(m.get("tokens_complete")),
                          f"the tokens of chunk {chunk}")
        if self.store is not None and int(meta["n_rows"]) != self.store.spec.n_rows:
            self.store.refresh()
        return tokens_committed(meta) > chunk


class CommitProgress:
    """Rank 0's progress bar over the recorders of all ranks: the rows of this run's chunks committed in the store
    (re-read from `commits` at most every POLL_SECONDS: no collective) plus rank 0's computed but uncommitted rows
    times world_size (the others are assumed to advance alike). `done`: the chunks committed before this run;
    `total`: whether the store's rows are known (the bar's total), `bar`: a tqdm-like bar (default: a new one)."""

    def __init__(self, store: ActivationStore, done, world_size: int, total: bool = True, bar=None):
        self.store, self.done, self.world = store, np.asarray(done, bool), world_size
        total = self._rows(np.ones(store.spec.n_chunks, bool)) if total else None
        self.bar = bar if bar is not None else tqdm(
            total=total, unit="tok", unit_scale=True, desc=f"generate ({world_size} proc)" if world_size > 1
            else "generate")
        self.done_rows, self.in_flight, self.last_poll = 0, 0, time.perf_counter()

    def _rows(self, chunks) -> int:
        """Rows of this run's chunks among `chunks` (bool over the store's chunks, as known now)."""
        spec = self.store.spec
        chunks = np.asarray(chunks[: spec.n_chunks], bool).copy()
        n = min(len(chunks), len(self.done))
        chunks[:n] &= ~self.done[:n]
        rows = int(chunks.sum()) * spec.chunk_size
        if len(chunks) == spec.n_chunks and len(chunks) and chunks[-1]:  # the last chunk may be shorter
            rows -= spec.chunk_size * spec.n_chunks - spec.n_rows
        return rows

    def _show(self) -> None:
        n = self.done_rows + self.in_flight * self.world
        if self.bar.total is not None:
            n = min(self.bar.total, n)
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def _poll(self, force: bool = False) -> None:
        if self.world == 1 or not (force or time.perf_counter() - self.last_poll >= POLL_SECONDS):
            return
        self.done_rows = self._rows(self.store.committed_chunks())
        self.last_poll = time.perf_counter()

    def own(self, rows: int) -> None:
        """Rank 0 ran `rows` more rows of its current chunk."""
        self.in_flight += rows
        self._poll()
        self._show()

    def committed(self, chunk: int) -> None:
        """Rank 0 committed `chunk`."""
        start, stop = self.store.spec.chunk_rows(chunk)
        self.in_flight -= stop - start
        self.done_rows += stop - start
        self._poll()
        self._show()

    def wait_for_all(self) -> None:
        """Poll until every chunk of the store (its rows final) is committed."""
        if self.bar.total is not None:  # the corpus may have ended before the budget
            self.bar.total = self._rows(np.ones(self.store.spec.n_chunks, bool))
        while not self.store.committed_chunks().all():
            self._poll(force=True)
            self._show()
            time.sleep(POLL_SECONDS / 4)
        self._poll(force=True)
        self._show()

    def close(self) -> None:
        self.bar.close()
