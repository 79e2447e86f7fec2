"""saetool.store.chunks: direct chunk decoding equals zarr's own reads, and refuses layouts it does not decode."""

import numpy as np
import pytest
import torch
import zarr

from saetool.store.chunks import ChunkReader
from tests.synthetic import write_store


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("compression", ["blosc-zstd", "zstd", "none"])
def test_direct_reads_equal_zarr(tmp_path, dtype, compression):
    x = torch.randn(1000, 5, generator=torch.Generator().manual_seed(0))
    store = write_store(tmp_path / "s.zarr", x, context_size=8, chunk_size=64, dtype=dtype, compression=compression)
    hook = store.spec.hook_names[0]
    reader = ChunkReader.for_array(store.path / hook)
    assert reader is not None
    assert reader.read(15).shape == (40, 5)  # the last chunk holds 1000 - 15 x 64 rows
    assert reader.read(16) is None  # never written
    for a, b in [(0, 64), (960, 1000), (70, 100), (999, 1000), (10, 200)]:  # the last spans chunks: zarr's path
        ref = torch.from_numpy(np.asarray(store.group[hook][a:b]))
        ref = ref.view(torch.bfloat16) if dtype == "bfloat16" else ref
        assert torch.equal(store.read_rows(hook, a, b, ref.dtype), ref)


def test_other_layouts_are_left_to_zarr(tmp_path):
    zarr.create_array(str(tmp_path / "sharded"), shape=(64, 4), chunks=(8, 4), shards=(32, 4), dtype="float32")
    assert ChunkReader.for_array(tmp_path / "sharded") is None
    split = zarr.create_array(str(tmp_path / "split"), shape=(64, 4), chunks=(8, 2), dtype="float32")
    assert split.shape == (64, 4) and ChunkReader.for_array(tmp_path / "split") is None  # chunks split the columns
    assert ChunkReader.for_array(tmp_path / "missing") is None
