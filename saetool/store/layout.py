"""The activation store's layout: one Zarr v3 group per generation run, readable by plain `zarr` and `xarray`.

Layout (schema version 1; docs/store.md is the full reference)::

    <dataset_folder>/                 zarr group, attrs["saetool"] = the run's metadata (see `StoreSpec`)
        tokens                        int32 [n_contexts, context_size]   the token ids of every stored context
        mask                          bool  [n_rows]                      False at BOS / separator / padding rows
        <hook_name>                   float16 | float32 | uint16 [n_rows, d]   one array per hook point
        commits                       uint8 [n_chunks], chunks of 1       1 once chunk i is fully written
        tokens_at_commit              int32 [n_chunks], chunks of 1       attrs' tokens_committed read right after
                                                                          chunk i's commit (0: not recorded)

Tokens are published in order by one writer: attrs["saetool"]["tokens_committed"] = k once the tokens and mask of
chunks 0..k-1 are written (recorders poll it, saetool.store.watch); `tokens_at_commit` orders every activation
commit against the token commits. Both were added within schema version 1: a store without them (an older
saetool's) reads the same, and its tokens count as committed once `tokens_complete` is set.
A row is one (context, position) pair; row r belongs to context r // context_size, so the rows of a context
are contiguous and a chunk of `chunk_size` rows (a multiple of context_size) holds whole contexts.
bfloat16 activations are stored as their raw bits in uint16 arrays whose attrs say
``{"saetool_dtype": "bfloat16"}`` (NumPy has no bfloat16; never an unnamed 2-byte void type).

This module holds what defines that layout: the schema version, `StoreSpec` (the run's settings and its chunk
geometry), the codecs of `--compression`, the Zarr dtype of each stored dtype, and `create_layout` (the empty
arrays and metadata of a new store). Writing and reading a store is saetool.store.activation_store.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import numcodecs.blosc
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

from saetool.store.values import StoreError

SCHEMA_VERSION = 1
COMPRESSIONS = ("blosc-zstd", "zstd", "none")


def _no_blosc_threads() -> None:
    """Blosc's global thread pool does not survive fork(): compress single-threaded (per call context)."""
    numcodecs.blosc.use_threads = False


# zarr >= 3 already sets this at import; saetool does not rely on it, and repeats it in every forked child
# (DataLoader / multiprocessing workers), where a thread pool inherited from the parent can hang.
_no_blosc_threads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_no_blosc_threads)


@dataclass
class StoreSpec:
    """Everything that defines a store's content; two runs with equal specs produce equal stores.

    Stored as ``attrs["saetool"]`` together with the progress fields (`complete`, `rows_committed`, `summary`).
    """

    model: str
    dataset: str
    hook_names: list[str]
    widths: dict[str, int]
    n_rows: int
    context_size: int
    chunk_size: int
    dtype: str = "float16"
    compression: str = "blosc-zstd"
    bos_policy: str = ""
    seed: int = 0
    extra: dict = field(default_factory=dict)
    keepbits: int | None = None

    @property
    def n_contexts(self) -> int:
        return self.n_rows // self.context_size

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_size)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        """Row range [start, stop) of store chunk `chunk`; the last chunk may be shorter."""
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.n_rows)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def settings(self) -> dict:
        """What defines the content (everything but `n_rows`, which generation learns only as the text is read)."""
        return {k: v for k, v in self.to_json().items() if k != "n_rows"}


def compressors(name: str) -> list:
    """The Zarr codecs of `--compression name` (one of COMPRESSIONS); StoreError for another name."""
    if name == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)]
    if name == "zstd":
        return [ZstdCodec(level=3)]
    if name == "none":
        return []
    raise StoreError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")


def zarr_dtype(dtype: str) -> str:
    """The Zarr array dtype that holds activations of the stored dtype (bfloat16: its bits in uint16)."""
    return {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}[dtype]


def create_order_array(group: zarr.Group, n_chunks: int) -> None:
    """`tokens_at_commit` (int32 [n_chunks], one Zarr chunk per store chunk, 0-filled) in `group`."""
    group.create_array("tokens_at_commit", shape=(n_chunks,), dtype="int32", chunks=(1,), fill_value=0,
                       dimension_names=["chunk"])


def create_layout(group: zarr.Group, spec: StoreSpec) -> None:
    """Create in the empty `group` the arrays of `spec` (tokens, mask, one per hook, commits, tokens_at_commit:
    zero-filled, chunked by store chunk) and its metadata ``attrs["saetool"]`` (schema version, the spec,
    ``complete`` False, ``tokens_committed`` 0)."""
    codecs = compressors(spec.compression)
    rows_per_chunk = spec.chunk_size
    group.create_array(
        "tokens", shape=(spec.n_contexts, spec.context_size), dtype="int32",
        chunks=(rows_per_chunk // spec.context_size, spec.context_size), compressors=codecs, fill_value=0,
        dimension_names=["context", "position"],
    )
    group.create_array("mask", shape=(spec.n_rows,), dtype="bool", chunks=(rows_per_chunk,),
                       compressors=codecs, fill_value=False, dimension_names=["row"])
    for name in spec.hook_names:
        group.create_array(
            name, shape=(spec.n_rows, spec.widths[name]), dtype=zarr_dtype(spec.dtype),
            chunks=(rows_per_chunk, spec.widths[name]), compressors=codecs, fill_value=0,
            dimension_names=["row", f"{name}.dim"],
            attributes={"saetool_dtype": spec.dtype, "hook_name": name, "keepbits": spec.keepbits},
        )
    group.create_array("commits", shape=(spec.n_chunks,), dtype="uint8", chunks=(1,), fill_value=0,
                       dimension_names=["chunk"])
    create_order_array(group, spec.n_chunks)
    meta = {"schema_version": SCHEMA_VERSION, **spec.to_json(), "complete": False, "tokens_committed": 0}
    group.attrs["saetool"] = meta
