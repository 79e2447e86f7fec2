"""The generation loop: text -> streamed, packed, mixed contexts -> store tokens -> model forward -> activations.

Order of work (so bad input fails early and nothing half-written looks valid):
1. load the model and validate every hook name (before any text is read);
2. rank 0 writes the store's tokens (`write_tokens`): it opens the text lazily (saetool.text.sources; a bad source or
   text column fails here), streams it through `saetool.text.stream.ContextStream` (tokenise in batches, pack, seeded
   shuffle buffer) only as far as the budget (--n_chunks x --chunk_size), creates the store once the first chunk
   is known (so "N tokens < one context" fails before anything is written) and writes every chunk's tokens and
   mask, then records `tokens_complete`. Its memory is the shuffle buffer plus one tokenisation batch (or one
   piece of a document over 1M characters, plus that document's text), whatever the corpus and document sizes;
   no other process reads or tokenises the text;
3. every process (rank 0 included) then splits the chunks without activations into one contiguous share per
   process (`split_evenly`, case D2) and, for each chunk of its share: reads its tokens back from the store,
   runs the model over them (all hooks from one forward, `stop_at_layer` = deepest hook + 1), casts
   (overflow-checked, optionally bit-rounded), then compresses, writes and commits it in a writer thread while
   the model computes the next chunk;
4. wait for every process; rank 0 marks the store complete and prints a summary (tokens, bytes per token,
   ratio to fp32, aggregated tokens/s).

Why tokens first, then activations (not a pipeline): the store's rows depend only on the text, the settings and
--seed, never on the number of processes, because one process produces them in order; the model processes then
need no coordination beyond two barriers, and the tokens are cheap next to the forward passes (the tokenizer
runs at ~1M tokens/s per core; `benchmarks/bench_scale.py` measures both). Resume: `kill -9` while writing
tokens resumes from the last saved stream state (`stream_state.npz` in the store, saved every `STATE_SECONDS`:
the documents already tokenised are skipped unread by the tokenizer); while recording, from the committed chunks.

Several processes (`accelerate launch launch/generate.py`, see `Dist`): the one-off conversion of the embedded
model and step 2 run on rank 0 while the others wait in a barrier, then they open the store it wrote. Chunks
(whole contexts, chunk-aligned rows) are the unit of work, so no two processes ever write the same Zarr chunk
(case S2). The only collectives are barriers that every rank reaches, also a rank whose share is empty (cases
D1/D2); rank 0's progress bar aggregates all ranks by reading the store's `commits` array, not by a collective.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from saetool.config import GenerateConfig
from saetool.lm import (
    EMBEDDED_MODEL,
    embedded_model_dir,
    hook_widths,
    load_model,
    record_activations,
    resolve_hook_names,
    validate_hook_names,
)
from saetool.store import ActivationStore, StoreError, StoreSpec, to_store_array
from saetool.text import ContextStream, open_documents, special_token_ids
from saetool.util import Dist, split_evenly, writer_lock

POLL_SECONDS = 1.0  # rank 0 re-reads the store's commits at most this often for the aggregated progress bar
STATE_SECONDS = 30.0  # rank 0 saves the token stream's state at most this often while writing tokens
STATE_FILE = "stream_state.npz"  # in the store folder while its tokens are being written; deleted when they are
GROW_CHUNKS = 64  # without --n_chunks the store starts at this many chunks and doubles while the text lasts


def bos_policy(cfg: GenerateConfig) -> str:
    """A one-line description of the packing policy recorded in the store."""
    if cfg.concat:
        return ("concat: documents joined with one EOS separator; each context = "
                + ("BOS + context_size-1 tokens" if cfg.prepend_bos else "context_size tokens")
                + "; last partial context dropped; BOS/separator rows masked")
    return ("per-document: each document split into contexts"
            + (" starting with BOS" if cfg.prepend_bos else "") + "; last context padded; BOS/padding rows masked")


@contextlib.contextmanager
def main_process_first(dist: Dist):
    """Run the block on rank 0, then on all other ranks together (a barrier each side; no-op for one process).

    Used so that one-off work with a disk cache (model conversion, `datasets` tokenisation, store creation) is
    done once by rank 0 and reused by the others. If rank 0 raises inside the block, the launcher stops the
    other ranks (they wait in the barrier)."""
    if not dist.is_main:
        dist.barrier()
    yield
    if dist.is_main:
        dist.barrier()


def format_chunks(chunks: list[int]) -> str:
    """Chunk ids as ranges, e.g. [0, 1, 2, 5] -> "0-2,5"; [] -> "none"."""
    if not chunks:
        return "none"
    parts, start = [], chunks[0]
    for prev, cur in zip(chunks, chunks[1:] + [None]):
        if cur is None or cur != prev + 1:  # a run of consecutive ids ends at prev
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def chunk_shares(todo: list[int], world_size: int) -> list[list[int]]:
    """The chunks of `todo` (uncommitted chunk ids, ascending) owned by each rank: contiguous slices of sizes
    differing by at most one (`split_evenly`); every chunk belongs to exactly one rank, some shares may be empty."""
    return [[todo[i] for i in split_evenly(len(todo), world_size, r)] for r in range(world_size)]


def run_generate(cfg: GenerateConfig, dist: Dist | None = None, log=print) -> ActivationStore:
    """Record the activations described by `cfg` into cfg.dataset_folder and return the store.

    dist: this process's rank and world size (default `Dist.current()`: the torch.distributed group that
    Accelerate/torchrun created, else rank 0 of 1). Every rank must call run_generate with the same cfg
    (except `device`). log: prints rank-level messages (pass Accelerator.print to print on rank 0 only); with
    several processes each rank also prints one line "[rank r/N] chunks ..." naming its share.
    Raises ValueError/StoreError with a one-line reason on bad input (unknown hook, empty text, a folder holding
    another store or something else, fp16 overflow or NaN/inf in the activations).
    """
    cfg.validate()
    dist = dist if dist is not None else Dist.current()
    with writer_lock(cfg.dataset_folder, "dataset_folder", dist):  # one writer per store (saetool.util.lock)
        return _generate(cfg, dist, log)


def _generate(cfg: GenerateConfig, dist: Dist, log) -> ActivationStore:
    model, hook_names, widths = _model_and_hooks(cfg, dist)
    store = _tokens_store(cfg, dist, store_spec(cfg, hook_names, widths), model.tokenizer, log)
    spec = store.spec  # the rows the text filled
    if store.complete:  # every rank sees the same: only rank 0 finalizes, after the final barrier
        log(f"{cfg.dataset_folder} is already complete ({spec.n_rows} rows); nothing to do")
        return store
    done = store.committed_chunks()
    dist.barrier()  # every rank has read the same commits before anyone writes
    todo = [c for c in range(spec.n_chunks) if not done[c]]
    shares = chunk_shares(todo, dist.world_size)
    mine = shares[dist.rank]
    if done.any():
        log(f"resuming {cfg.dataset_folder}: {int(done.sum())}/{spec.n_chunks} chunks already committed")
    if dist.active:
        print(f"[rank {dist.rank}/{dist.world_size}] chunks {format_chunks(mine)} ({len(mine)} of {len(todo)})",
              flush=True)

    rows_of = {c: spec.chunk_rows(c)[1] - spec.chunk_rows(c)[0] for c in todo}
    rows_todo = sum(rows_of.values())
    bar = tqdm(total=rows_todo, unit="tok", unit_scale=True, disable=not dist.is_main,
               desc=f"generate ({dist.world_size} proc)" if dist.active else "generate")
    progress = _Progress(bar, store, rows_of, dist.world_size) if dist.is_main else None

    start = time.perf_counter()
    record_chunks(cfg, store, model, mine, progress)
    if progress:
        progress.wait_for_all()  # rank 0 keeps the bar moving until the other ranks' chunks are committed
    seconds = time.perf_counter() - start
    bar.close()
    dist.barrier()
    if dist.is_main:
        _finalize(cfg, dist, store, widths, shares, rows_todo, seconds, log)
    return store


def _model_and_hooks(cfg: GenerateConfig, dist: Dist) -> tuple[object, list[str], dict[str, int]]:
    """Step 1: (model, hook names, {hook name: width}): the model loaded (the embedded one converted once, by
    rank 0) and every hook name validated, before any text is read."""
    hook_names = resolve_hook_names(cfg.locations, cfg.layers)
    if cfg.model == EMBEDDED_MODEL:
        with main_process_first(dist):  # the one-off GGUF conversion, then everyone loads the cached copy
            embedded_model_dir()
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    validate_hook_names(model, hook_names)
    return model, hook_names, hook_widths(model, hook_names)


def _tokens_store(cfg: GenerateConfig, dist: Dist, spec: StoreSpec, tokenizer, log) -> ActivationStore:
    """Step 2: rank 0 writes the store's tokens (`write_tokens`); then the other ranks open the store it wrote.
    StoreError on a rank whose store's tokens are not complete."""
    with main_process_first(dist):  # rank 0 writes the tokens; then the others open the store it wrote
        if dist.is_main:
            store = write_tokens(cfg, spec, tokenizer, log)
        else:
            store = ActivationStore.create_or_resume(cfg.dataset_folder, spec)
            if not store.tokens_complete:
                raise StoreError(f"{cfg.dataset_folder}: rank 0 did not finish writing the tokens")
    return store


def _finalize(cfg: GenerateConfig, dist: Dist, store: ActivationStore, widths: dict[str, int],
              shares: list[list[int]], rows_todo: int, seconds: float, log) -> None:
    """Step 4, rank 0, once every rank's chunks are committed: mark the store complete with its summary (tokens,
    bytes per token, ratio to fp32, this run's tokens/s, the config) and log it."""
    spec = store.spec
    packing = store.meta["packing"]
    raw_fp32 = spec.n_rows * sum(widths.values()) * 4
    stored = store.nbytes_stored()
    summary = {
        "tokens": spec.n_rows, "tokens_masked_out": spec.n_rows - packing["n_text_tokens"], "hooks": widths,
        "bytes_per_token": round(stored / spec.n_rows, 2), "ratio_to_fp32": round(raw_fp32 / max(stored, 1), 3),
        "codec": cfg.compression, "keepbits": cfg.keepbits, "world_size": dist.world_size,
        "chunks_per_rank": [len(s) for s in shares], "tokens_this_run": rows_todo,
        "seconds_this_run": round(seconds, 2), "tokens_per_s": round(rows_todo / max(seconds, 1e-9), 1),
        "config": asdict(cfg),
    }
    if store.finalize(summary):
        log(f"wrote {spec.n_rows} tokens x {len(spec.hook_names)} hook(s) to {cfg.dataset_folder} with "
            f"{dist.world_size} process(es): {summary['bytes_per_token']} bytes/token ({cfg.compression}"
            f"{'' if cfg.keepbits is None else f', keepbits {cfg.keepbits}'}), {summary['ratio_to_fp32']}x "
            f"smaller than fp32, {summary['tokens_per_s']:.0f} tokens/s; packing: {packing}")


def store_spec(cfg: GenerateConfig, hook_names: list[str], widths: dict[str, int]) -> StoreSpec:
    """The store's settings for `cfg`; n_rows is the budget (--n_chunks x --chunk_size) or, without --n_chunks, a
    first capacity of GROW_CHUNKS chunks that `write_tokens` doubles and finally sets to the rows the text filled."""
    return StoreSpec(
        model=cfg.model, dataset=cfg.dataset, hook_names=hook_names, widths=widths,
        n_rows=(cfg.n_chunks or GROW_CHUNKS) * cfg.chunk_size, context_size=cfg.context_size,
        chunk_size=cfg.chunk_size, dtype=cfg.dtype, compression=cfg.compression, bos_policy=bos_policy(cfg),
        seed=cfg.seed, keepbits=cfg.keepbits,
        extra={"dataset_split": cfg.dataset_split, "text_column": cfg.text_column, "prepend_bos": cfg.prepend_bos,
               "concat": cfg.concat, "model_dtype": cfg.model_dtype, "shuffle_buffer": cfg.shuffle_buffer,
               "n_chunks_asked": cfg.n_chunks},
    )


def record_chunks(cfg: GenerateConfig, store: ActivationStore, model, chunks: list[int], progress=None) -> None:
    """Run the model over the stored tokens of each chunk of `chunks`, write its activations and commit it.

    One writer thread compresses and writes chunk c while the model computes chunk c+1 (Blosc/zstd release the
    GIL); at most one chunk waits, so memory stays at two chunks. Chunk c is committed by its own write; a failed
    write re-raises here, in the calling thread."""
    hook_names = store.spec.hook_names

    def write(c: int, parts: dict[str, list[np.ndarray]]) -> int:
        store.write_chunk(c, {h: np.concatenate(p) for h, p in parts.items()})
        return c

    def committed(future) -> None:
        c = future.result()
        if progress:
            progress.committed(c)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="saetool-writer") as writer:
        pending = None
        for c in chunks:
            ctx = torch.from_numpy(store.read_tokens(c)).long()
            parts: dict[str, list[np.ndarray]] = {h: [] for h in hook_names}
            for i in range(0, len(ctx), cfg.batch_size):
                batch = ctx[i : i + cfg.batch_size].to(cfg.device)
                acts = record_activations(model, batch, hook_names)
                for h in hook_names:
                    parts[h].append(to_store_array(acts[h], cfg.dtype, h, cfg.keepbits))
                if progress:
                    progress.own(batch.numel())
            if pending is not None:
                committed(pending)
            pending = writer.submit(write, c, parts)
        if pending is not None:
            committed(pending)


def write_tokens(cfg: GenerateConfig, spec: StoreSpec, tokenizer, log=print) -> ActivationStore:
    """Rank 0: stream the text into the store's `tokens` and `mask` (step 2 of the module docstring); return the store.

    A store whose tokens are complete is returned as is; one whose tokens were interrupted continues from its saved
    stream state (or from the first document if none was saved yet). The store is created only after the first
    chunk of contexts exists, so an empty corpus or a bad text column leaves nothing behind. A corpus that ends
    before --n_chunks is stored whole, with a warning line saying how many tokens were stored.
    """
    folder = cfg.dataset_folder
    store = state = None
    if os.path.isdir(folder) and os.listdir(folder):
        store = ActivationStore.create_or_resume(folder, spec)  # refuses other settings, another store, other files
        if store.tokens_complete:
            return store
        state = _load_state(store)
    special = special_token_ids(tokenizer)
    per_chunk = cfg.chunk_size // cfg.context_size
    stream = ContextStream(
        open_documents(cfg.dataset, split=cfg.dataset_split, text_column=cfg.text_column), tokenizer,
        cfg.context_size, bos_token_id=special["bos"], sep_token_id=special["sep"], pad_token_id=special["pad"],
        prepend_bos=cfg.prepend_bos, concat=cfg.concat, n_contexts=None if cfg.n_chunks is None else spec.n_contexts,
        buffer_size=cfg.shuffle_buffer, seed=cfg.seed, per_chunk=per_chunk, state=state)
    c = stream.n_emitted // per_chunk
    if state is not None:
        inside = f", and {stream.doc_pos} characters of the next" if stream.doc is not None else ""
        log(f"resuming the tokens of {folder} at chunk {c} ({stream.n_docs} documents already tokenised{inside})")
    chunks = iter(stream)
    first = next(chunks, None)  # raises "N tokens < one context" here, before the store exists
    store = store or ActivationStore.create_or_resume(folder, spec)
    bar = tqdm(total=spec.n_contexts if cfg.n_chunks else None, initial=c * per_chunk, unit="ctx", desc="tokenize")
    saved = time.perf_counter()
    for tokens, mask in itertools.chain([first] if first is not None else [], chunks):
        if c >= store.spec.n_chunks:
            store.set_rows(2 * store.spec.n_rows)
        if len(tokens) < per_chunk:  # the last, short chunk: the store ends with it
            store.set_rows(c * cfg.chunk_size + len(tokens) * cfg.context_size)
        store.write_tokens(c, tokens, mask)
        c += 1
        bar.update(len(tokens))
        if time.perf_counter() - saved >= STATE_SECONDS:
            _save_state(store, stream.state())
            saved = time.perf_counter()
    bar.close()
    if store.spec.n_rows != stream.n_emitted * cfg.context_size:
        store.set_rows(stream.n_emitted * cfg.context_size)
    store.mark_tokens_complete(stream.summary())
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, STATE_FILE))
    if cfg.n_chunks is not None and stream.n_emitted < spec.n_contexts:
        log(f"warning: the corpus ended after {stream.n_emitted} contexts ({store.spec.n_rows} tokens), fewer than "
            f"the {spec.n_contexts} asked for (--n_chunks {cfg.n_chunks} x {per_chunk}); storing "
            f"{store.spec.n_rows} tokens")
    return store


def _save_state(store: ActivationStore, state: dict) -> None:
    """Write the stream state atomically (a temporary file renamed into place): a kill leaves the old or the new."""
    tmp = store.path / f".{STATE_FILE}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **state)
    os.replace(tmp, store.path / STATE_FILE)


def _load_state(store: ActivationStore) -> dict | None:
    path = store.path / STATE_FILE
    if not path.exists():
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


class _Progress:
    """Rank 0's progress bar over all ranks: rows committed in the store (read from `commits`, all ranks) plus
    rank 0's computed but uncommitted rows times world_size (the others are assumed to advance alike)."""

    def __init__(self, bar, store: ActivationStore, rows_of: dict[int, int], world_size: int):
        self.bar, self.store, self.rows_of, self.world = bar, store, rows_of, world_size
        self.pending = set(rows_of)  # chunks of this run not yet seen committed
        self.done_rows, self.in_flight, self.last_poll = 0, 0, time.perf_counter()

    def _show(self) -> None:
        n = min(self.bar.total, self.done_rows + self.in_flight * self.world)
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def _poll(self, force: bool = False) -> None:
        if self.world == 1 or not (force or time.perf_counter() - self.last_poll >= POLL_SECONDS):
            return
        done = self.store.committed_chunks()
        for c in [c for c in self.pending if done[c]]:
            self.pending.discard(c)
            self.done_rows += self.rows_of[c]
        self.last_poll = time.perf_counter()

    def own(self, rows: int) -> None:
        """Rank 0 ran `rows` more rows of its current chunk."""
        self.in_flight += rows
        self._poll()
        self._show()

    def committed(self, chunk: int) -> None:
        """Rank 0 committed `chunk`."""
        self.in_flight -= self.rows_of[chunk]
        if chunk in self.pending:
            self.pending.discard(chunk)
            self.done_rows += self.rows_of[chunk]
        self._poll()
        self._show()

    def wait_for_all(self) -> None:
        """Poll until every chunk of this run is committed (the barrier that follows then returns at once)."""
        while self.pending and self.world > 1:
            self._poll(force=True)
            self._show()
            if self.pending:
                time.sleep(POLL_SECONDS / 4)
