"""Synthetic activation stores for unit tests (no model needed)."""

from __future__ import annotations

import numpy as np
import torch

from saetool.store import ActivationStore, StoreSpec, to_store_array


def write_store(path, acts: np.ndarray | torch.Tensor, context_size: int, chunk_size: int, dtype: str = "float32",
                mask: np.ndarray | None = None, hook_name: str = "blocks.0.hook_resid_post",
                compression: str = "blosc-zstd") -> ActivationStore:
    """Write `acts` [n_rows, d] as a complete single-hook store; tokens are the row indices."""
    acts = torch.as_tensor(acts)
    n, d = acts.shape
    mask = np.ones(n, dtype=bool) if mask is None else mask
    spec = StoreSpec(model="synthetic", dataset="synthetic", hook_names=[hook_name], widths={hook_name: d},
                     n_rows=n, context_size=context_size, chunk_size=chunk_size, dtype=dtype, compression=compression)
    store = ActivationStore.create_or_resume(path, spec)
    tokens = np.arange(n).reshape(-1, context_size)
    for c in range(spec.n_chunks):
        a, b = spec.chunk_rows(c)
        store.write_chunk(c, {hook_name: to_store_array(acts[a:b], dtype, hook_name)},
                          tokens[a // context_size : b // context_size], mask[a:b])
    assert store.finalize({})
    return ActivationStore.open(path)
