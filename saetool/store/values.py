"""The values of an activation store: how activations are cast to the stored dtype (float16 / bfloat16 bits in
uint16 / float32), bit-rounded (--keepbits), checked for overflow and NaN/inf on the way in, and turned back into
tensors and checked on the way out. The store's layout is saetool.store.layout.
"""

from __future__ import annotations

import numpy as np
import torch

STORE_DTYPES = ("float16", "bfloat16", "float32")
MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23}
FP16_MAX = 65504.0


class StoreError(ValueError):
    """A store is missing, foreign, incomplete or incompatible with the requested run."""


def bitround(values: np.ndarray, keepbits: int, mantissa_bits: int) -> np.ndarray:
    """Round IEEE floats to `keepbits` mantissa bits, to nearest with ties to even (numcodecs.BitRound's rule).

    values: a float16/float32 array, or uint16 holding bfloat16 bits (`mantissa_bits` says which: 10, 23, 7).
    Returns a new array of the same dtype and shape whose low `mantissa_bits - keepbits` mantissa bits are zero;
    `keepbits == mantissa_bits` returns an unchanged copy. Rounding up can carry into the exponent, so a value
    near the dtype's maximum may become inf: callers check (see `to_store_array`).
    Source: Kloewer et al. 2021 (doi:10.1038/s43588-021-00156-2), numcodecs.bitround.BitRound.encode.
    Raises ValueError for keepbits outside 0..mantissa_bits or a dtype that is not 2 or 4 bytes wide.
    """
    if not 0 <= keepbits <= mantissa_bits:
        raise ValueError(f"keepbits must be in 0..{mantissa_bits}, got {keepbits}")
    uint = {2: np.uint16, 4: np.uint32}.get(values.dtype.itemsize)
    if uint is None:
        raise ValueError(f"bitround expects a 2- or 4-byte float array, got {values.dtype}")
    b = np.ascontiguousarray(values).view(uint).copy()
    drop = mantissa_bits - keepbits
    if drop:
        b += ((b >> drop) & 1) + uint((1 << (drop - 1)) - 1)
        b &= ~uint((1 << drop) - 1)
    return b.view(values.dtype)


def to_store_array(acts: torch.Tensor, dtype: str, hook_name: str = "", keepbits: int | None = None) -> np.ndarray:
    """Cast activations `acts` [rows, d] (any float dtype) to the NumPy array written to the store.

    float16 is checked for overflow (|x| > 65504 becomes inf) and every dtype for NaN/inf, raising
    StoreError naming the hook: larger models have outliers beyond the fp16 range (use --dtype bfloat16).
    bfloat16 returns the raw bits as uint16 (bit-exact; see the module docstring). With `keepbits`, the cast
    values are then bit-rounded (`bitround`); a value that rounds up to inf raises StoreError too.
    """
    if not torch.isfinite(acts).all():
        raise StoreError(f"activations at {hook_name} contain NaN or inf before storing")
    if dtype == "float16":
        if acts.abs().max() > FP16_MAX:
            raise StoreError(
                f"activations at {hook_name} exceed the float16 range (|x| up to {acts.abs().max().item():.4g}"
                " > 65504); rerun with --dtype bfloat16 or --dtype float32"
            )
        out = acts.to(torch.float16).cpu().numpy()
    elif dtype == "bfloat16":
        out = acts.to(torch.bfloat16).cpu().view(torch.uint16).numpy()
    elif dtype == "float32":
        out = acts.to(torch.float32).cpu().numpy()
    else:
        raise StoreError(f"unknown store dtype {dtype!r}; choose one of {', '.join(STORE_DTYPES)}")
    if keepbits is None or keepbits == MANTISSA_BITS[dtype]:
        return out
    out = bitround(out, keepbits, MANTISSA_BITS[dtype])
    bits = out.view(np.uint32 if dtype == "float32" else np.uint16)
    exponent = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000}[dtype]
    if ((bits & exponent) == exponent).any():
        raise StoreError(f"activations at {hook_name} overflow {dtype} after rounding to --keepbits {keepbits}")
    return out


def from_store_array(values: np.ndarray, logical_dtype: str) -> torch.Tensor:
    """Inverse of `to_store_array`: NumPy rows read from the store -> torch tensor in the logical dtype."""
    t = torch.from_numpy(np.ascontiguousarray(values))
    if logical_dtype == "bfloat16":
        return t.view(torch.bfloat16)
    return t


def check_finite(rows: torch.Tensor, where: str, start: int, chunk_size: int) -> torch.Tensor:
    """rows [n, d] (rows start.. of an array named by `where`), unchanged; StoreError naming the first row, its
    chunk and column if any value is NaN or inf. Cost: one max-abs reduction (~0.25 ns per fp16 value on one CPU
    core, ~20% of decoding the chunk; the slow search runs only on failure)."""
    if rows.numel() and not torch.isfinite(rows.abs().amax()):
        bad = (~torch.isfinite(rows)).nonzero()[0].tolist()
        r = start + bad[0]
        raise StoreError(f"{where}: row {r} (chunk {r // chunk_size}, rows {r // chunk_size * chunk_size}-"
                         f"{(r // chunk_size + 1) * chunk_size - 1}) holds {rows[bad[0], bad[1]].item()} at column "
                         f"{bad[1]}; a sweep cannot train on non-finite activations (regenerate the store, or "
                         "--dtype float32 if float16 overflowed)")
    return rows
