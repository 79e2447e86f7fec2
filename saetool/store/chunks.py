"""Whole-chunk reads of a local Zarr v3 array, decoded with numcodecs directly.

Zarr's general read path (async codec pipeline, selection machinery, an extra copy) decodes the demo store's
fp16 Blosc-zstd chunks at ~0.2M rows/s per thread on the 2-core machine; the same chunk files read and decoded
here run at ~1.2M rows/s (benchmarks/bench_loader.py). `ChunkReader.for_array` accepts only the layouts it
decodes exactly: a regular grid of [chunk_rows, d] chunks, the default "/" chunk keys, little-endian bytes
followed by nothing, Blosc or Zstd (the codecs saetool writes). Anything else (sharding, other codecs, remote
stores) gets None, and callers read through zarr. Decoding releases the GIL, so threads read in parallel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

DTYPES = {"float16": np.float16, "float32": np.float32, "uint16": np.uint16, "bfloat16": np.uint16}


class ChunkReader:
    """Decode chunk c of the 2-D array at `path` (a folder holding zarr.json) into [chunk_rows, d] rows."""

    def __init__(self, path: Path, shape: tuple[int, int], chunk_rows: int, dtype: np.dtype, codec):
        self.path, self.shape, self.chunk_rows, self.dtype, self.codec = path, shape, chunk_rows, dtype, codec

    @classmethod
    def for_array(cls, path: str | Path) -> ChunkReader | None:
        """A reader for the array at `path`, or None where its layout is not one this module decodes."""
        try:
            meta = json.loads((Path(path) / "zarr.json").read_text())
            shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
            codecs = meta["codecs"]
            ok = (meta.get("node_type") == "array" and meta["chunk_grid"]["name"] == "regular" and len(shape) == 2
                  and chunks[1] == shape[1] and meta["data_type"] in DTYPES
                  and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                  and codecs[0] == {"name": "bytes", "configuration": {"endian": "little"}}
                  and len(codecs) <= 2 and (len(codecs) == 1 or codecs[1]["name"] in ("blosc", "zstd")))
        except (OSError, KeyError, TypeError, ValueError, IndexError):
            return None
        if not ok:
            return None
        codec = None if len(codecs) == 1 else (Blosc() if codecs[1]["name"] == "blosc" else Zstd())
        return cls(Path(path), (shape[0], shape[1]), chunks[0], np.dtype(DTYPES[meta["data_type"]]), codec)

    def file(self, chunk: int) -> Path:
        """The file holding chunk `chunk`."""
        return self.path / "c" / str(chunk) / "0"

    def exists(self, chunk: int) -> bool:
        return self.file(chunk).is_file()

    def read(self, chunk: int) -> np.ndarray | None:
        """Rows of chunk `chunk` ([rows, d], rows < chunk_rows only for the last chunk), writable; None if the
        chunk was never written (zarr would return the fill value)."""
        try:
            raw = self.file(chunk).read_bytes()
        except FileNotFoundError:
            return None
        out = np.empty((self.chunk_rows, self.shape[1]), dtype=self.dtype)
        if self.codec is None:
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
        else:
            self.codec.decode(raw, out=out)
        rows = min(self.chunk_rows, self.shape[0] - chunk * self.chunk_rows)
        return out[:rows]
