"""The Zarr activation store: S1 (bfloat16), S2 (chunk-aligned writers), S3 (resume), refusals."""

import json
import multiprocessing as mp
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from saetool.store import ActivationStore, StoreError, StoreSpec, to_store_array
from tests.synthetic import write_store

HOOK = "blocks.0.hook_resid_post"


def spec(n_rows=160, chunk=64, ctx=16, d=4, dtype="float32", **kw):
    return StoreSpec(model="m", dataset="t", hook_names=[HOOK], widths={HOOK: d}, n_rows=n_rows, context_size=ctx,
                     chunk_size=chunk, dtype=dtype, **kw)


def test_s1_bfloat16_bit_identical_in_a_new_process(tmp_path):
    x = torch.tensor([[1.0], [-2.5], [3.140625], [0.0]], dtype=torch.bfloat16)
    write_store(tmp_path / "s.zarr", x, context_size=2, chunk_size=2, dtype="bfloat16")
    code = f"""
import zarr, numpy as np, torch
from saetool.store import ActivationStore
s = ActivationStore.open({str(tmp_path / 's.zarr')!r})
t = s.read_rows({HOOK!r}, 0, 4, dtype=torch.bfloat16)
print(t.dtype, t.view(torch.int16).flatten().tolist(), s.group[{HOOK!r}].attrs['saetool_dtype'])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "torch.bfloat16"
    assert json.loads("".join(out[1:-1])) == x.view(torch.int16).flatten().tolist()
    assert out[-1] == "bfloat16"
    meta = json.loads((tmp_path / "s.zarr" / HOOK / "zarr.json").read_text())
    assert meta["data_type"] == "uint16" and meta["attributes"]["saetool_dtype"] == "bfloat16"
    assert "V2" not in json.dumps(meta) and "void" not in json.dumps(meta).lower()


def test_float16_overflow_and_nan_are_refused():
    with pytest.raises(StoreError, match="exceed the float16 range.*bfloat16"):
        to_store_array(torch.tensor([[70000.0]]), "float16", "blocks.9.hook_resid_post")
    with pytest.raises(StoreError, match="NaN or inf"):
        to_store_array(torch.tensor([[float("nan")]]), "float32", "h")
    assert to_store_array(torch.tensor([[65504.0]]), "float16").item() == 65504.0


def _writer(path, s, chunk, value, rounds):
    store = ActivationStore.create_or_resume(path, s)
    a, b = store.spec.chunk_rows(chunk)
    for _ in range(rounds):
        store.write_chunk(chunk, {HOOK: np.full((b - a, 16), value, np.float32)},
                          np.zeros(((b - a) // 4, 4), np.int32), np.ones(b - a, bool))


def test_s2_two_writers_own_whole_chunks(tmp_path):
    # Array (100, 16) float32 in chunks of 64 rows: rows 0-49 and 50-99 share chunk 0, so saetool never gives
    # them to different ranks: a rank owns whole chunks (rows 0-63 and 64-99).
    s = spec(n_rows=100, chunk=64, ctx=4, d=16)
    ActivationStore.create_or_resume(tmp_path / "s.zarr", s)
    assert [s.chunk_rows(c) for c in range(s.n_chunks)] == [(0, 64), (64, 100)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "s.zarr"), s, c, c + 1, 20)) for c in (0, 1)]
    [p.start() for p in procs]
    [p.join(120) for p in procs]
    assert [p.exitcode for p in procs] == [0, 0]
    data = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")[HOOK][:]
    assert data.sum() == 64 * 16 * 1 + 36 * 16 * 2  # 2176: no write lost after 20 concurrent rounds


def test_s3_resume_rewrites_uncommitted_rows(tmp_path):
    s = spec(n_rows=160, chunk=64, ctx=16)
    full = np.arange(160 * 4, dtype=np.float32).reshape(160, 4)
    tokens = np.arange(160).reshape(10, 16)

    def write(store, c):
        a, b = s.chunk_rows(c)
        store.write_chunk(c, {HOOK: full[a:b]}, tokens[a // 16 : b // 16], np.ones(b - a, bool))

    store = ActivationStore.create_or_resume(tmp_path / "s.zarr", s)
    write(store, 0)
    # crash after rows 64-127 were written but before their commit: stale garbage sits in chunk 1
    store.group[HOOK][64:128] = -1.0
    with pytest.raises(StoreError, match=r"incomplete \(1/3 chunks committed\).*resume"):
        ActivationStore.open(tmp_path / "s.zarr")
    resumed = ActivationStore.create_or_resume(tmp_path / "s.zarr", s)
    assert resumed.committed_chunks().tolist() == [True, False, False]
    assert not resumed.finalize({})
    for c in (1, 2):
        write(resumed, c)
    assert resumed.finalize({"x": 1})
    final = ActivationStore.open(tmp_path / "s.zarr")
    assert np.array_equal(final.read_rows(HOOK, 0, 160).numpy(), full)
    assert final.meta["rows_committed"] == 160 and final.group[HOOK].shape == (160, 4)


def test_refuses_other_settings_and_foreign_folders(tmp_path):
    ActivationStore.create_or_resume(tmp_path / "s.zarr", spec())
    with pytest.raises(StoreError, match=r"different settings \(chunk_size\)"):
        ActivationStore.create_or_resume(tmp_path / "s.zarr", spec(chunk=32))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a saetool activation store"):
        ActivationStore.create_or_resume(tmp_path / "other", spec())
    assert (tmp_path / "other" / "notes.txt").read_text() == "hi"
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(StoreError, match="not a saetool activation store"):
        ActivationStore.open(tmp_path / "foreign.zarr")
    with pytest.raises(StoreError, match="no activation store at"):
        ActivationStore.open(tmp_path / "missing.zarr")


def test_store_is_readable_with_plain_zarr_and_xarray(tmp_path):
    xr = pytest.importorskip("xarray")
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float16)
    write_store(tmp_path / "s.zarr", torch.from_numpy(x), context_size=8, chunk_size=32, dtype="float16")
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert np.array_equal(g[HOOK][:], x)
    assert g.attrs["saetool"]["complete"] is True and g.attrs["saetool"]["context_size"] == 8
    assert g["tokens"].shape == (8, 8) and g["commits"][:].tolist() == [1, 1]
    ds = xr.open_zarr(str(tmp_path / "s.zarr"), consolidated=False)
    assert np.array_equal(ds[HOOK].values, x)
