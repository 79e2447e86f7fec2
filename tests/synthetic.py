"""Synthetic activation stores for unit tests (no model needed)."""

from __future__ import annotations

import numpy as np
import torch

from saetool.store import ActivationStore, StoreSpec
from saetool.store.values import to_store_array


def write_store(path, acts, context_size: int, chunk_size: int, dtype: str = "float32",
                mask: np.ndarray | None = None, hook_name: str = "blocks.0.hook_resid_post",
                compression: str = "blosc-zstd") -> ActivationStore:
    """Write `acts` [n_rows, d] as a complete single-hook store, or a dict {hook_name: [n_rows, d_hook]} as a store of
    several row-aligned hooks; tokens are the row indices."""
    hooks = {k: torch.as_tensor(v) for k, v in acts.items()} if isinstance(acts, dict) else {
        hook_name: torch.as_tensor(acts)}
    n = next(iter(hooks.values())).shape[0]
    mask = np.ones(n, dtype=bool) if mask is None else mask
    spec = StoreSpec(model="synthetic", dataset="synthetic", hook_names=list(hooks),
                     widths={h: a.shape[1] for h, a in hooks.items()}, n_rows=n, context_size=context_size,
                     chunk_size=chunk_size, dtype=dtype, compression=compression)
    store = ActivationStore.create_or_resume(path, spec)
    tokens = np.arange(n).reshape(-1, context_size)
    for c in range(spec.n_chunks):
        a, b = spec.chunk_rows(c)
        store.write_chunk(c, {h: to_store_array(x[a:b], dtype, h) for h, x in hooks.items()},
                          tokens[a // context_size : b // context_size], mask[a:b])
    assert store.finalize({})
    return ActivationStore.open(path)
