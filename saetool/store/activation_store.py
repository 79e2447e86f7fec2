"""The activation store: writing and reading one Zarr v3 group per generation run (its layout, schema version and
`StoreSpec` are saetool.store.layout; docs/store.md is the full reference).

Generation writes every chunk's `tokens` and `mask` in order (one writer, rank 0, streaming the text), resizing
the arrays while it learns how many rows the text fills, and publishes each chunk as it goes (`commit_tokens`:
attrs["saetool"]["tokens_committed"]), then records `tokens_complete`; the recorders write a chunk's activations
as soon as its tokens are committed (they poll, saetool.store.watch). Commits are explicit: a writer marks chunk i
in `commits` only after every hook array's rows of chunk i are written, then records in `tokens_at_commit[i]` how
many chunks' tokens were committed at that moment; attrs["saetool"]["complete"] becomes true only when every chunk
is committed. `commits` has one Zarr chunk per store chunk, so writers of different chunks never touch the same
object on disk, and only the token writer (rank 0) writes the group's attributes. An uncommitted chunk is simply
rewritten whole on resume; resizing deletes every chunk beyond the new shape (never a chunk with tokens).

`--keepbits k` rounds every stored value to k mantissa bits (round to nearest, ties to even: the arithmetic of
numcodecs.BitRound) before compression; the arrays stay plain float16/float32/uint16 that any Zarr reader
decodes, and `keepbits` is recorded in the spec and in each array's attrs. How values are cast, rounded and checked
on the way in and out is saetool.store.values.

`ActivationStore.open(path, array=name)` instead reads one 2-D array of any Zarr group (written by another tool)
through the same read interface (`ZarrArrayRows`, saetool.store.foreign).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import zarr

from saetool.store.chunks import ChunkReader
from saetool.store.foreign import ZarrArrayRows
from saetool.store.layout import SCHEMA_VERSION, StoreSpec, create_layout, create_order_array
from saetool.store.values import StoreError, check_finite, from_store_array

__all__ = ["SCHEMA_VERSION", "ActivationStore", "StoreError", "StoreSpec", "ZarrArrayRows", "read_meta",
           "tokens_committed"]


def read_meta(path: str | os.PathLike) -> dict | None:
    """attrs["saetool"] of the store at `path` as it is on disk now (a Group object caches its attributes), or None
    where there is no store (yet). Zarr renames each metadata file into place, so a read sees one whole version."""
    try:
        meta = zarr.open_group(str(path), mode="r").attrs.get("saetool")
    except Exception:  # noqa: BLE001 - zarr raises several types where no group is (yet)
        return None
    return meta if isinstance(meta, dict) else None


def tokens_committed(meta: dict) -> int:
    """How many leading chunks' tokens are committed according to `meta` (a store of an older saetool records
    only `tokens_complete`: then all of them)."""
    if meta.get("tokens_complete"):
        return -(-int(meta["n_rows"]) // int(meta["chunk_size"]))
    return int(meta.get("tokens_committed") or 0)


class ActivationStore:
    """A saetool activation store (its layout: saetool.store.layout).

    Use `ActivationStore.create_or_resume(path, spec)` to write, `ActivationStore.open(path)` to read.
    """

    def __init__(self, path: str | os.PathLike, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self._chunk_readers: dict[str, ChunkReader | None] = {}
        meta = dict(group.attrs.get("saetool", {}))
        known = {f.name for f in dataclasses.fields(StoreSpec)}
        self.spec = StoreSpec(**{k: v for k, v in meta.items() if k in known})
        self.meta = meta

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, require_complete: bool = True,
             array: str | None = None) -> ActivationStore | ZarrArrayRows:
        """Open an existing store for reading.

        With `array`, return instead a `ZarrArrayRows` over the 2-D array `array` of the Zarr group at `path`
        (any writer; same read interface, every row kept).
        Raises StoreError (one line) if `path` does not exist, is not a saetool store, has another schema
        version, or (with require_complete) was not finished; the message says how to resume.
        """
        if array is not None:
            return ZarrArrayRows(path, array)
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no activation store at {path}: run `saetool generate --dataset_folder {path}` first")
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as e:  # noqa: BLE001 - zarr raises several types for foreign folders
            raise StoreError(f"{path} is not a Zarr store ({type(e).__name__})") from None
        meta = group.attrs.get("saetool")
        if not isinstance(meta, dict):
            raise StoreError(f"{path} is a Zarr group but not a saetool activation store (no 'saetool' attribute)")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{path} has store schema version {meta.get('schema_version')}, this saetool reads {SCHEMA_VERSION}"
            )
        store = cls(path, group)
        if require_complete and not meta.get("complete"):
            done = int(np.asarray(group["commits"][:]).sum())
            raise StoreError(
                f"activation store {path} is incomplete ({done}/{store.spec.n_chunks} chunks committed); "
                "rerun the same generate command to resume it"
            )
        return store

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike, spec: StoreSpec) -> ActivationStore:
        """Create a new store for `spec`, or reopen a partial one written with the same spec.

        A folder holding anything else (another spec, a foreign Zarr group, other files) is refused with
        StoreError saying why; nothing in it is modified.
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            store = cls.attach(path, spec)
            for leftover in path.rglob("*.partial"):  # zarr's temporary files of writes killed mid-way
                leftover.unlink(missing_ok=True)
            return store
        # Built in a temporary sibling and renamed into place, so a run killed while creating the arrays leaves
        # no folder that looks like a store (the rename replaces an empty `path` folder too).
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.creating-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
        group = zarr.open_group(str(tmp), mode="w")
        create_layout(group, spec)
        os.replace(tmp, path)
        return cls(path, zarr.open_group(str(path), mode="r+"))

    @classmethod
    def attach(cls, path: str | os.PathLike, spec: StoreSpec) -> ActivationStore:
        """Open the existing store at `path` to write its chunks, while another process may be writing it too (a
        recording rank; unlike `create_or_resume` it deletes nothing). StoreError (one line) if `path` holds
        something else or a store of other settings than `spec`."""
        path = Path(path)
        try:
            group = zarr.open_group(str(path), mode="r+")
            meta = group.attrs.get("saetool")
        except Exception:  # noqa: BLE001
            meta = None
        if not isinstance(meta, dict):
            raise StoreError(f"{path} exists and is not a saetool activation store; choose another --dataset_folder")
        new = spec.settings()
        old = {k: meta.get(k) for k in new}
        if old != new:
            diff = [k for k, v in new.items() if old.get(k) != v]
            raise StoreError(f"{path} holds a store made with different settings ({', '.join(diff)}); "
                             "use another --dataset_folder or delete it")
        return cls(path, group)

    def refresh(self) -> None:
        """Re-read the metadata another process (the token writer) may have changed: n_rows, progress fields."""
        self.__init__(self.path, zarr.open_group(str(self.path), mode="r+"))

    # ---- writing -------------------------------------------------------------------------------
    def committed_chunks(self) -> np.ndarray:
        """bool [n_chunks]: which chunks are fully written."""
        return np.asarray(self.group["commits"][:]).astype(bool)

    def write_tokens(self, chunk: int, tokens: np.ndarray, mask: np.ndarray) -> None:
        """Write the token ids (int [contexts_in_chunk, context_size]) and mask (bool, same shape or flat) of store
        chunk `chunk`. Generation writes them in chunk order, each then published by `commit_tokens`."""
        start, stop = self.spec.chunk_rows(chunk)
        c = self.spec.context_size
        if tokens.shape != ((stop - start) // c, c) or mask.size != stop - start:
            raise StoreError(f"chunk {chunk}: expected {stop - start} rows, got tokens {tokens.shape}, mask {mask.shape}")
        self.group["tokens"][start // c : stop // c] = tokens.astype(np.int32)
        self.group["mask"][start:stop] = mask.reshape(-1)

    def read_tokens(self, chunk: int) -> np.ndarray:
        """int32 [contexts_in_chunk, context_size]: the token ids of store chunk `chunk`."""
        start, stop = self.spec.chunk_rows(chunk)
        c = self.spec.context_size
        return np.asarray(self.group["tokens"][start // c : stop // c])

    def set_rows(self, n_rows: int) -> None:
        """Resize every array to `n_rows` rows (a multiple of context_size) and record it; chunks beyond are deleted.

        Only while the tokens are being written (one writer, no activation committed yet): generation creates the
        store at the rows asked for (or a capacity that it doubles), then sets the rows the text filled."""
        spec = dataclasses.replace(self.spec, n_rows=int(n_rows))
        self.group["tokens"].resize((spec.n_contexts, spec.context_size))
        self.group["mask"].resize((spec.n_rows,))
        for name in spec.hook_names:
            self.group[name].resize((spec.n_rows, spec.widths[name]))
        self.group["commits"].resize((spec.n_chunks,))
        if "tokens_at_commit" in self.group:
            self.group["tokens_at_commit"].resize((spec.n_chunks,))
        self._update_meta(n_rows=spec.n_rows)
        self.spec = spec

    def claim_tokens(self, owner: dict, committed: int) -> None:
        """The token writer `owner` (its lock record) takes over the store: its first `committed` chunks' tokens count
        as committed (an interrupted writer's later ones are written again), any failure of an earlier writer is
        cleared, and a store of an older saetool gains `tokens_at_commit`. Recorders wait for this record."""
        if "tokens_at_commit" not in self.group:
            create_order_array(self.group, self.spec.n_chunks)
        self._update_meta(token_writer={"owner": owner, "error": None}, tokens_committed=int(committed))

    def commit_tokens(self, chunk: int) -> None:
        """Publish chunk `chunk`'s tokens and mask (written by `write_tokens`, in order): tokens_committed = chunk+1."""
        self._update_meta(tokens_committed=chunk + 1)

    def fail_tokens(self, error: str) -> None:
        """Record that the token writer failed (one line), so that waiting recorders stop with it."""
        self._update_meta(token_writer={**(self.meta.get("token_writer") or {}), "error": error})

    def mark_tokens_complete(self, packing: dict) -> None:
        """Record that every chunk's tokens and mask are written (`tokens_complete`) with the packing counters."""
        self._update_meta(tokens_complete=True, tokens_committed=self.spec.n_chunks, packing=packing)

    @property
    def tokens_complete(self) -> bool:
        return bool(self.meta.get("tokens_complete"))

    def _update_meta(self, **kv) -> None:
        meta = dict(self.group.attrs["saetool"])
        meta.update(kv)
        self.group.attrs["saetool"] = meta
        self.meta = meta

    def write_chunk(self, chunk: int, acts: dict[str, np.ndarray], tokens: np.ndarray | None = None,
                    mask: np.ndarray | None = None) -> None:
        """Write the activations of store chunk `chunk` (and its tokens and mask, if given), then commit it.

        acts: {hook_name: array [rows_in_chunk, d]} already cast by `to_store_array`; tokens, mask: as `write_tokens`
        (generation writes them beforehand and passes neither). The commit marker is written last, so a crash at any
        point leaves the chunk uncommitted; then, in a generated store, `tokens_at_commit[chunk]`.
        """
        if (tokens is None) != (mask is None):
            raise StoreError(f"chunk {chunk}: pass both tokens and mask, or neither")
        if tokens is not None:
            self.write_tokens(chunk, tokens, mask)
        start, stop = self.spec.chunk_rows(chunk)
        n = stop - start
        for name in self.spec.hook_names:
            a = acts[name]
            if a.shape != (n, self.spec.widths[name]):
                raise StoreError(f"chunk {chunk}: {name} has shape {a.shape}, expected {(n, self.spec.widths[name])}")
            self.group[name][start:stop] = a
        self.group["commits"][chunk] = 1
        if tokens is None and "tokens_at_commit" in self.group:  # read after the commit: an upper bound
            self.group["tokens_at_commit"][chunk] = tokens_committed(read_meta(self.path) or {})

    def finalize(self, summary: dict) -> bool:
        """Mark the store complete if every chunk is committed; returns whether it is complete."""
        if not self.committed_chunks().all():
            return False
        self._update_meta(complete=True, rows_committed=self.spec.n_rows, summary=summary)
        return True

    # ---- reading -------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def width(self, hook_name: str) -> int:
        return self.spec.widths[self.resolve_hook(hook_name)]

    def resolve_hook(self, hook_name: str | None) -> str:
        """The hook to read: `hook_name`, or the only hook of a single-hook store. StoreError if ambiguous/absent."""
        names = self.spec.hook_names
        if hook_name is None:
            if len(names) != 1:
                raise StoreError(f"store {self.path} holds several hooks ({', '.join(names)}); pass --hook_name")
            return names[0]
        if hook_name not in names:
            raise StoreError(f"store {self.path} has no hook {hook_name!r}; it holds {', '.join(names)}")
        return hook_name

    def read_rows(self, hook_name: str, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Activations of rows [start, stop) at `hook_name` as a tensor [stop-start, d] of `dtype`. Rows within
        one chunk are decoded directly (saetool.store.chunks, ~6x zarr's read path); thread-safe.
        Raises StoreError naming the chunk (and its file) for a chunk that is missing from a complete store, that
        cannot be decoded, or that holds NaN/inf (`check_finite`)."""
        cs = self.spec.chunk_size
        where = f"store {self.path}, hook {hook_name}"
        if hook_name not in self._chunk_readers:
            self._chunk_readers[hook_name] = ChunkReader.for_array(self.path / hook_name)
        reader = self._chunk_readers[hook_name]
        if reader is not None and self.complete:
            for c in range(start // cs, -(-stop // cs)):
                if not reader.exists(c):
                    raise StoreError(f"{where}: chunk {c} (rows {c * cs}-{min((c + 1) * cs, self.spec.n_rows) - 1}) "
                                     f"is missing ({reader.file(c)}), though the store says it is complete; "
                                     "regenerate the store")
        try:
            values = None
            if reader is not None and stop > start and start // cs == (stop - 1) // cs:
                c = start // cs
                chunk = reader.read(c)
                values = None if chunk is None else chunk[start - c * cs : stop - c * cs]
            if values is None:
                values = self.group[hook_name][start:stop]
        except Exception as e:  # noqa: BLE001 - numcodecs and zarr raise RuntimeError, ValueError, ...
            c = start // cs
            raise StoreError(f"{where}: rows {start}-{stop - 1} (chunk {c}) cannot be decoded "
                             f"({type(e).__name__}: {e}); the chunk file is damaged: regenerate the store") from None
        return check_finite(from_store_array(values, self.spec.dtype), where, start, cs).to(dtype)

    def read_mask(self, start: int, stop: int) -> np.ndarray:
        """bool [stop-start]: False at BOS / separator / padding rows (never trained on)."""
        return np.asarray(self.group["mask"][start:stop]).astype(bool)

    def nbytes_stored(self) -> int:
        """Bytes on disk of the activation arrays (not tokens/mask), chunk files and metadata."""
        total = 0
        for name in self.spec.hook_names:
            for root, _, files in os.walk(self.path / name):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files if not f.endswith(".partial"))
        return total
