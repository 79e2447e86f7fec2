"""The generation loop: text -> streamed, packed, mixed contexts -> store tokens -> model forward -> activations.

Order of work (so bad input fails early and nothing half-written looks valid):
1. load the model and validate every hook name (before any text is read);
2. rank 0 starts the token writer (`write_tokens` in a thread, saetool.util.Background): it opens the text lazily
   (saetool.text.sources; a bad source or text column fails here), streams it through
   `saetool.text.stream.ContextStream` (tokenise in batches, pack, seeded shuffle buffer) only as far as the budget
   (--n_chunks x --chunk_size), creates the store once the first chunk is known (so "N tokens < one context" fails
   before anything is written) and writes every chunk's tokens and mask in order, committing each
   (`ActivationStore.commit_tokens`), then records `tokens_complete`. Its memory is the shuffle buffer plus one
   tokenisation batch (or one piece of a long document), whatever the corpus; no other process tokenises;
3. meanwhile every process (rank 0 included) records its chunks: the chunks without activations are dealt round
   robin (`chunk_shares`: rank r takes every N-th, from the r-th), and for each of its chunks, as soon as the
   chunk's tokens are committed (`TokenWatch.ready` polls the store: no collective), it reads them back, runs the
   model over them (all hooks from one forward, `stop_at_layer` = deepest hook + 1), casts (overflow-checked,
   optionally bit-rounded), then compresses, writes and commits them in a thread while the model runs on;
4. rank 0 waits (polling `commits`) until every chunk is committed, marks the store complete and prints a summary
   (tokens, bytes per token, ratio to fp32, tokens/s); the other ranks return once their chunks are committed.

The first activation comes after one chunk's tokens (plus the shuffle buffer's fill), not the whole budget's, and
the rows still depend only on the text, the settings and --seed, never on the number of processes: one writer
produces the tokens in order, the recorders only read them. Resume: `kill -9` while writing tokens resumes from the
last saved stream state (`stream_state.npz`, saved every `STATE_SECONDS`: the documents already tokenised are
skipped unread; the tokens after it are written again, identical); activations from the committed chunks.

Several processes (`accelerate launch launch/generate.py`, see `Dist`): the one-off conversion of the embedded
model runs on rank 0 while the others wait in a barrier (bounded: ~30 s, once). No rank waits in a collective on
the text: the others poll the store until rank 0's writer has claimed it (`TokenWatch.open`; rank 0's lock record
names the run), meet once in a barrier so that all read the same commits before anyone writes, then poll for their
chunks' tokens; a writer failure recorded in the store, or rank 0's lock gone, stops them with one line. A chunk
has one writer, so no two processes write the same Zarr chunk (case S2); round robin keeps every rank busy while
the tokens arrive and ends all within about one chunk of each other. Rank 0's progress bar reads `commits`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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
from saetool.store import ActivationStore, CommitProgress, StoreSpec, TokenWatch, to_store_array
from saetool.text import ContextStream, open_documents, special_token_ids
from saetool.util import Background, Dist, injected_delay, lock_owner, owner_gone, writer_lock

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
    """Run the block on rank 0, then on all other ranks together (a barrier each side; no-op for one process), for
    bounded one-off work with a disk cache (the model conversion). If rank 0 raises inside the block, the launcher
    stops the other ranks (they wait in the barrier)."""
    if not dist.is_main:
        dist.barrier()
    yield
    if dist.is_main:
        dist.barrier()


def format_chunks(chunks: list[int]) -> str:
    """Chunk ids (ascending) as runs: consecutive ids as a range, every-k-th ids as an elided progression, e.g.
    [0, 1, 2, 5] -> "0-2,5"; [1, 4, 7, 10] -> "1,4,...,10"; [] -> "none"."""
    parts, i = [], 0
    while i < len(chunks):
        step = chunks[i + 1] - chunks[i] if i + 1 < len(chunks) else 0
        j = i + 1
        while j < len(chunks) and chunks[j] - chunks[j - 1] == step:
            j += 1
        if step == 1:
            parts.append(f"{chunks[i]}-{chunks[j - 1]}")
        elif j - i >= 3:
            parts.append(f"{chunks[i]},{chunks[i + 1]},...,{chunks[j - 1]}")
        else:
            j = i + 1
            parts.append(str(chunks[i]))
        i = j
    return ",".join(parts) or "none"


def chunk_shares(todo: list[int], world_size: int) -> list[list[int]]:
    """The chunks of `todo` (uncommitted chunk ids, ascending) owned by each rank, dealt round robin: rank r owns
    todo[r::world_size]. Every chunk belongs to exactly one rank, shares differ by at most one chunk (some may be
    empty), and the ranks advance together through the chunks as their tokens are committed in order."""
    return [todo[r::world_size] for r in range(world_size)]


def my_chunks(done, rank: int, world_size: int) -> Iterator[int]:
    """Rank `rank`'s chunks in order, as `chunk_shares` deals them, without end: `done` (bool [n]) are the chunks
    committed when the run started, and every chunk beyond it counts as uncommitted (the store may still grow).
    The caller stops at the store's last chunk (`TokenWatch.ready`)."""
    i = 0
    for c in itertools.count():
        if c < len(done) and done[c]:
            continue
        if i % world_size == rank:
            yield c
        i += 1


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
    spec = store_spec(cfg, hook_names, widths)
    owner = lock_owner(cfg.dataset_folder)  # names this run: rank 0's lock record, which every rank reads
    writer = Background(write_tokens, cfg, spec, model.tokenizer, log, owner=owner, name="saetool-tokens") \
        if dist.is_main else None  # rank 0's token writer (step 2), in a thread
    try:  # rank 0 asks its writer thread whether it failed; the others whether rank 0 still holds the lock
        gone = writer.check if writer else functools.partial(owner_gone, cfg.dataset_folder, owner)
        watch = TokenWatch(cfg.dataset_folder, owner, gone, writer.result if writer else None)
        return _record(cfg, dist, model, watch, writer, spec, log)
    finally:
        if writer is not None:
            writer.close()  # stops it after its current chunk if this rank failed; else it has finished


def _record(cfg: GenerateConfig, dist: Dist, model, watch: TokenWatch, writer: Background | None,
            spec: StoreSpec, log) -> ActivationStore:
    """Step 3 on every rank, then step 4 on rank 0; returns this rank's store (rank 0's is finalized)."""
    store = watch.open(spec)  # polls until rank 0's writer has claimed the store: no collective
    if store.complete:  # every rank sees the same
        log(f"{cfg.dataset_folder} is already complete ({store.spec.n_rows} rows); nothing to do")
        return store
    done = store.committed_chunks()
    dist.barrier()  # every rank has read the same commits before anyone writes (each came here by polling)
    _announce(cfg, dist, store, done, log)
    progress = CommitProgress(store, done, dist.world_size, total=bool(cfg.n_chunks)) if dist.is_main else None
    start = time.perf_counter()
    record_chunks(cfg, store, model, my_chunks(done, dist.rank, dist.world_size), progress, watch.ready)
    if writer is None:
        return store  # the other ranks end here: rank 0 polls the commits, no collective waits for it
    final = writer.result()  # the writer's store, its tokens complete and its rows final
    progress.store = final
    progress.wait_for_all()  # rank 0 keeps the bar moving until the other ranks' chunks are committed
    seconds = time.perf_counter() - start
    progress.close()
    _finalize(cfg, dist, final, spec.widths, done, seconds, log)
    return final


def _announce(cfg: GenerateConfig, dist: Dist, store: ActivationStore, done, log) -> None:
    """The resume line (rank 0) and, with several processes, each rank's line "[rank r/N] chunks ..." naming its
    share of the chunks known so far."""
    if done.any():
        log(f"resuming {cfg.dataset_folder}: {int(done.sum())}/{len(done)} chunks already committed")
    if dist.active:
        todo = [c for c in range(len(done)) if not done[c]]
        mine = chunk_shares(todo, dist.world_size)[dist.rank]
        known = "" if store.tokens_complete or cfg.n_chunks else " so far; every N-th while the text lasts"
        print(f"[rank {dist.rank}/{dist.world_size}] chunks {format_chunks(mine)} ({len(mine)} of {len(todo)}"
              f"{known})", flush=True)


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


def _finalize(cfg: GenerateConfig, dist: Dist, store: ActivationStore, widths: dict[str, int], done,
              seconds: float, log) -> None:
    """Step 4, rank 0, once every chunk is committed: mark the store complete with its summary (tokens, bytes per
    token, ratio to fp32, this run's chunks per rank and tokens/s, the config) and log it. `done`: the chunks
    committed before this run."""
    spec = store.spec
    packing = store.meta["packing"]
    todo = [c for c in range(spec.n_chunks) if c >= len(done) or not done[c]]
    rows_todo = sum(spec.chunk_rows(c)[1] - spec.chunk_rows(c)[0] for c in todo)
    raw_fp32 = spec.n_rows * sum(widths.values()) * 4
    stored = store.nbytes_stored()
    summary = {
        "tokens": spec.n_rows, "tokens_masked_out": spec.n_rows - packing["n_text_tokens"], "hooks": widths,
        "bytes_per_token": round(stored / spec.n_rows, 2), "ratio_to_fp32": round(raw_fp32 / max(stored, 1), 3),
        "codec": cfg.compression, "keepbits": cfg.keepbits, "world_size": dist.world_size,
        "chunks_per_rank": [len(s) for s in chunk_shares(todo, dist.world_size)], "tokens_this_run": rows_todo,
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


def record_chunks(cfg: GenerateConfig, store: ActivationStore, model, chunks: Iterable[int], progress=None,
                  ready: Callable[[int], bool] | None = None) -> None:
    """Run the model over the stored tokens of each chunk of `chunks`, write its activations and commit it.

    ready(c), if given, is asked before chunk c: it waits until the chunk's tokens are committed (True) or says
    that the store ended before it (False: stop). One writer thread compresses and writes chunk c while the model
    computes chunk c+1 (Blosc/zstd release the GIL); at most one chunk waits, so memory stays at two chunks. Chunk c
    is committed by its own write; a failed write re-raises here, in the calling thread."""
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
            if ready is not None and not ready(c):
                break
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


def write_tokens(cfg: GenerateConfig, spec: StoreSpec, tokenizer, log=print, owner: dict | None = None,
                 stop: threading.Event | None = None) -> ActivationStore:
    """Rank 0: stream the text into the store's `tokens` and `mask` (step 2 of the module docstring); return the store.

    A store whose tokens are complete is returned as is; one whose tokens were interrupted continues from its saved
    stream state (or from the first document if none was saved yet). The store is created only after the first
    chunk of contexts exists, so an empty corpus or a bad text column leaves nothing behind. The writer claims the
    store for `owner` (this run, `ActivationStore.claim_tokens`) as soon as it exists, commits every chunk's tokens
    as it writes them, and records a failure in the store. `stop` (set) ends it after the current chunk, with the
    stream state saved. A corpus that ends before --n_chunks is stored whole, with a warning line saying how many
    tokens were stored.
    """
    folder = cfg.dataset_folder
    store = state = None
    per_chunk = cfg.chunk_size // cfg.context_size
    if os.path.isdir(folder) and os.listdir(folder):
        store = ActivationStore.create_or_resume(folder, spec)  # refuses other settings, another store, other files
        if store.tokens_complete:
            if not store.complete:
                store.claim_tokens(owner, store.spec.n_chunks)
            return store
        state = _load_state(store)
        store.claim_tokens(owner, 0 if state is None else int(state["n_emitted"]) // per_chunk)
    try:
        stream = _open_stream(cfg, spec, tokenizer, state)
        c = stream.n_emitted // per_chunk  # the next chunk to write
        if state is not None:
            inside = f", and {stream.doc_pos} characters of the next" if stream.doc is not None else ""
            log(f"resuming the tokens of {folder} at chunk {c} ({stream.n_docs} documents already tokenised{inside})")
        chunks = iter(stream)
        first = next(chunks, None)  # raises "N tokens < one context" here, before the store exists
        if store is None:
            store = ActivationStore.create_or_resume(folder, spec)
            store.claim_tokens(owner, 0)
        if _write_chunks(cfg, store, stream, itertools.chain([first] if first is not None else [], chunks), c, stop):
            _end_tokens(cfg, store, stream, spec, log)
    except BaseException as e:
        if store is not None:  # the recorders waiting for tokens stop with this line
            with contextlib.suppress(Exception):
                store.fail_tokens(f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    return store


def _open_stream(cfg: GenerateConfig, spec: StoreSpec, tokenizer, state: dict | None) -> ContextStream:
    """The store's contexts from the text (saetool.text), from the start or from a saved stream state."""
    special = special_token_ids(tokenizer)
    return ContextStream(
        open_documents(cfg.dataset, split=cfg.dataset_split, text_column=cfg.text_column), tokenizer,
        cfg.context_size, bos_token_id=special["bos"], sep_token_id=special["sep"], pad_token_id=special["pad"],
        prepend_bos=cfg.prepend_bos, concat=cfg.concat, n_contexts=None if cfg.n_chunks is None else spec.n_contexts,
        buffer_size=cfg.shuffle_buffer, seed=cfg.seed, per_chunk=cfg.chunk_size // cfg.context_size, state=state)


def _write_chunks(cfg: GenerateConfig, store: ActivationStore, stream: ContextStream, chunks, first: int,
                  stop: threading.Event | None) -> bool:
    """Write and commit the stream's remaining chunks in order from chunk `first`, growing or trimming the store's rows
    as the text tells; save the stream state at most every STATE_SECONDS. False if `stop` ended it early."""
    per_chunk = cfg.chunk_size // cfg.context_size
    bar = tqdm(total=store.spec.n_contexts if cfg.n_chunks else None, initial=first * per_chunk, unit="ctx",
               desc="tokenize")
    saved = time.perf_counter()
    for c, (tokens, mask) in enumerate(chunks, start=first):
        injected_delay("tokens")  # tests only: slower tokens (SAETOOL_TEST_DELAY_TOKENS seconds a chunk)
        if c >= store.spec.n_chunks:
            store.set_rows(2 * store.spec.n_rows)
        if len(tokens) < per_chunk:  # the last, short chunk: the store ends with it
            store.set_rows(c * cfg.chunk_size + len(tokens) * cfg.context_size)
        store.write_tokens(c, tokens, mask)
        store.commit_tokens(c)  # published: the recorders may start on it
        bar.update(len(tokens))
        stopping = stop is not None and stop.is_set()
        if stopping or time.perf_counter() - saved >= STATE_SECONDS:
            _save_state(store, stream.state())
            saved = time.perf_counter()
        if stopping:
            return False
    bar.close()
    return True


def _end_tokens(cfg: GenerateConfig, store: ActivationStore, stream: ContextStream, spec: StoreSpec, log) -> None:
    """The text is done: set the rows it filled, record `tokens_complete`, delete the stream state."""
    if store.spec.n_rows != stream.n_emitted * cfg.context_size:
        store.set_rows(stream.n_emitted * cfg.context_size)
    store.mark_tokens_complete(stream.summary())
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(cfg.dataset_folder, STATE_FILE))
    if cfg.n_chunks is not None and stream.n_emitted < spec.n_contexts:
        per_chunk = cfg.chunk_size // cfg.context_size
        log(f"warning: the corpus ended after {stream.n_emitted} contexts ({store.spec.n_rows} tokens), fewer than "
            f"the {spec.n_contexts} asked for (--n_chunks {cfg.n_chunks} x {per_chunk}); storing "
            f"{store.spec.n_rows} tokens")


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
