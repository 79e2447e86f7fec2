"""The generation loop: text -> packed contexts -> model forward -> activations -> Zarr store.

Order of work (so bad input fails early and nothing half-written looks valid):
1. load the model and validate every hook name (before any text is read);
2. load, tokenise and pack the text (saetool.data); fail if it cannot fill one context;
3. create the store, or resume a partial one written with the same settings (saetool.store);
4. for every uncommitted chunk owned by this process: run the model over its contexts (all hooks from one
   forward, `stop_at_layer` = deepest hook + 1), cast (overflow-checked), write, commit;
5. mark the store complete and print a summary (tokens, bytes per token, compression ratio, tokens/s).

Chunk c is owned by rank c % world_size, so several processes write disjoint, chunk-aligned row blocks.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from saetool.config import GenerateConfig
from saetool.data import load_texts, pack_contexts, special_token_ids, tokenize_documents
from saetool.hooks import hook_widths, record_activations, resolve_hook_names, validate_hook_names
from saetool.models import load_model
from saetool.store import ActivationStore, StoreSpec, to_store_array


def bos_policy(cfg: GenerateConfig) -> str:
    """A one-line description of the packing policy recorded in the store."""
    if cfg.concat:
        return ("concat: documents joined with one EOS separator; each context = "
                + ("BOS + context_size-1 tokens" if cfg.prepend_bos else "context_size tokens")
                + "; last partial context dropped; BOS/separator rows masked")
    return ("per-document: each document split into contexts"
            + (" starting with BOS" if cfg.prepend_bos else "") + "; last context padded; BOS/padding rows masked")


def run_generate(cfg: GenerateConfig, rank: int = 0, world_size: int = 1, barrier=None, log=print) -> ActivationStore:
    """Record the activations described by `cfg` into cfg.dataset_folder and return the store.

    rank/world_size/barrier come from Accelerate when several processes share the work; chunks are
    assigned round-robin. Raises ValueError/StoreError with a one-line reason on bad input.
    """
    cfg.validate()
    hook_names = resolve_hook_names(cfg.locations, cfg.layers)
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    validate_hook_names(model, hook_names)
    widths = hook_widths(model, hook_names)

    texts = load_texts(cfg.dataset, split=cfg.dataset_split, text_column=cfg.text_column)
    tokenizer = model.tokenizer
    special = special_token_ids(tokenizer)
    docs = tokenize_documents(texts, tokenizer)
    packed = pack_contexts(docs, cfg.context_size, bos_token_id=special["bos"], sep_token_id=special["sep"],
                           pad_token_id=special["pad"], prepend_bos=cfg.prepend_bos, concat=cfg.concat,
                           shuffle=True, seed=cfg.seed)
    per_chunk = cfg.chunk_size // cfg.context_size
    n_contexts = len(packed.tokens)
    if cfg.n_chunks is not None:
        if cfg.n_chunks * per_chunk > n_contexts:
            log(f"warning: the text fills {n_contexts} contexts, fewer than --n_chunks {cfg.n_chunks} x "
                f"{per_chunk}; writing {n_contexts} contexts")
        n_contexts = min(n_contexts, cfg.n_chunks * per_chunk)
    spec = StoreSpec(
        model=cfg.model, dataset=cfg.dataset, hook_names=hook_names, widths=widths,
        n_rows=n_contexts * cfg.context_size, context_size=cfg.context_size, chunk_size=cfg.chunk_size,
        dtype=cfg.dtype, compression=cfg.compression, bos_policy=bos_policy(cfg), seed=cfg.seed,
        extra={"dataset_split": cfg.dataset_split, "text_column": cfg.text_column, "prepend_bos": cfg.prepend_bos,
               "concat": cfg.concat, "model_dtype": cfg.model_dtype, "packing": packed.summary()},
    )
    store = ActivationStore.create_or_resume(cfg.dataset_folder, spec)
    if store.complete:
        log(f"{cfg.dataset_folder} is already complete ({spec.n_rows} rows); nothing to do")
        return store
    done = store.committed_chunks()
    todo = [c for c in range(spec.n_chunks) if c % world_size == rank and not done[c]]
    if done.any():
        log(f"resuming {cfg.dataset_folder}: {int(done.sum())}/{spec.n_chunks} chunks already committed")
    tokens_all = packed.tokens[:n_contexts]
    mask_all = packed.mask[:n_contexts].reshape(-1).numpy()
    start = time.perf_counter()
    n_done = 0
    bar = tqdm(total=sum(len(range(*spec.chunk_rows(c))) for c in todo), unit="tok", unit_scale=True,
               desc="generate", disable=rank != 0)
    for c in todo:
        row_start, row_stop = spec.chunk_rows(c)
        ctx = tokens_all[row_start // cfg.context_size : row_stop // cfg.context_size]
        parts: dict[str, list[np.ndarray]] = {h: [] for h in hook_names}
        for i in range(0, len(ctx), cfg.batch_size):
            batch = ctx[i : i + cfg.batch_size].to(cfg.device)
            acts = record_activations(model, batch, hook_names)
            for h in hook_names:
                parts[h].append(to_store_array(acts[h], cfg.dtype, h))
            bar.update(batch.numel())
            n_done += batch.numel()
        store.write_chunk(c, {h: np.concatenate(p) for h, p in parts.items()}, ctx.numpy(),
                          mask_all[row_start:row_stop])
    bar.close()
    seconds = time.perf_counter() - start
    if barrier is not None:
        barrier()
    if rank == 0:
        raw_fp32 = spec.n_rows * sum(widths.values()) * 4
        stored = store.nbytes_stored()
        summary = {
            "tokens": spec.n_rows, "tokens_masked_out": int((~mask_all).sum()), "hooks": widths,
            "bytes_per_token": round(stored / spec.n_rows, 2), "ratio_to_fp32": round(raw_fp32 / max(stored, 1), 3),
            "seconds_this_run": round(seconds, 2), "tokens_per_s": round(n_done / max(seconds, 1e-9), 1),
            "config": asdict(cfg),
        }
        if store.finalize(summary):
            log(f"wrote {spec.n_rows} tokens x {len(hook_names)} hook(s) to {cfg.dataset_folder}: "
                f"{summary['bytes_per_token']} bytes/token, {summary['ratio_to_fp32']}x smaller than fp32, "
                f"{summary['tokens_per_s']:.0f} tokens/s; packing: {packed.summary()}")
    return store
