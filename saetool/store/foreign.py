"""A foreign array read as a store: one 2-D array of any Zarr group (written by another tool), behind the read
interface of `ActivationStore` (`ActivationStore.open(path, array=name)` returns one).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import zarr

from saetool.store.layout import StoreSpec
from saetool.store.values import StoreError, check_finite, from_store_array


class ZarrArrayRows:
    """Rows of one 2-D array in any Zarr group (e.g. written by another tool), read like an `ActivationStore`.

    The array is [n_rows, d] float16, float32, or bfloat16 stored as uint16 bits with attrs `saetool_dtype` or
    `dtype` = "bfloat16". It exposes what the sweep reads: `path`, `spec` (a StoreSpec with n_rows, chunk_size
    = the array's row chunking, hook_names = [array], widths, dtype; context_size 1 as contexts are unknown),
    `complete` (True), `resolve_hook`, `width`, `read_rows`, and `read_mask` (every row True: no mask).
    Raises StoreError (one line) for a missing path, a folder that is not a Zarr group, a missing array (the
    message lists the arrays there), an array that is not 2-D, or an unsupported dtype.
    """

    complete = True

    def __init__(self, path: str | os.PathLike, name: str):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no Zarr store at {self.path}")
        try:
            group = zarr.open_group(str(self.path), mode="r")
        except Exception as e:  # noqa: BLE001 - zarr raises several types for foreign folders
            raise StoreError(f"{self.path} is not a Zarr group ({type(e).__name__})") from None
        try:
            arr = group[name]
        except KeyError:
            arrays = sorted(n for n, _ in group.arrays())
            held = ", ".join(arrays) or "no arrays"
            raise StoreError(f"{self.path} has no array {name!r}; it holds {held}") from None
        if not isinstance(arr, zarr.Array) or arr.ndim != 2:
            got = getattr(arr, "shape", "a group")
            raise StoreError(f"{self.path}/{name} must be a 2-D array [rows, d], got {got}")
        declared = arr.attrs.get("saetool_dtype", arr.attrs.get("dtype"))
        if arr.dtype in (np.float16, np.float32):
            logical = str(arr.dtype)
        elif arr.dtype == np.uint16 and declared == "bfloat16":
            logical = "bfloat16"
        else:
            raise StoreError(f"{self.path}/{name} has dtype {arr.dtype}; expected float16, float32, or uint16 bits "
                             "with attrs dtype='bfloat16'")
        self.array, self.meta = arr, {}
        n, d = arr.shape
        self.spec = StoreSpec(model=str(arr.attrs.get("model", "")), dataset=str(self.path), hook_names=[name],
                              widths={name: int(d)}, n_rows=int(n), context_size=1, chunk_size=int(arr.chunks[0]),
                              dtype=logical, compression="foreign", extra={"array": name})

    def resolve_hook(self, hook_name: str | None) -> str:
        """The array's name; StoreError if `hook_name` names anything else."""
        name = self.spec.hook_names[0]
        if hook_name not in (None, name):
            raise StoreError(f"{self.path} is read as the single array {name!r}; --hook_name {hook_name!r} is not it")
        return name

    def width(self, hook_name: str | None = None) -> int:
        """d, the array's second dimension."""
        return self.spec.widths[self.resolve_hook(hook_name)]

    def read_rows(self, hook_name: str, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [start, stop) as a tensor [stop-start, d] of `dtype`."""
        self.resolve_hook(hook_name)
        rows = from_store_array(self.array[start:stop], self.spec.dtype)
        return check_finite(rows, f"{self.path}/{self.spec.hook_names[0]}", start, self.spec.chunk_size).to(dtype)

    def read_mask(self, start: int, stop: int) -> np.ndarray:
        """bool [stop-start], all True: a foreign array has no mask."""
        return np.ones(max(0, min(stop, self.spec.n_rows) - start), dtype=bool)
