"""The Zarr activation store: S1 (bfloat16), S2 (chunk-aligned writers), S3 (resume), refusals."""

import json
import multiprocessing as mp
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from saetool.store import ActivationStore, StoreError, StoreSpec
from saetool.store.values import bitround, to_store_array
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
from saetool.store.activation_store import ActivationStore
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


# ---- keepbits (lossy bit rounding) ---------------------------------------------------------------------------


def test_bitround_hand_computed_float16_values():
    # fp16 1 + m/1024: keeping 8 of 10 mantissa bits rounds m to a multiple of 4, to nearest, ties to even
    x = np.array([1 + 3 / 1024, 1 + 2 / 1024, 1 + 6 / 1024, 1 + 5 / 1024, -(1 + 3 / 1024), 0.0], np.float16)
    out = bitround(x, keepbits=8, mantissa_bits=10)
    assert out.dtype == np.float16
    assert out.tolist() == [1 + 4 / 1024, 1.0, 1 + 8 / 1024, 1 + 4 / 1024, -(1 + 4 / 1024), 0.0]
    # keepbits 0: only the exponent is left and a tie goes to the even bit pattern, whose last kept bit is the
    # exponent's lowest: 1.5 = 2^0 x 1.1b (biased exponent 15, odd) -> 2.0; 3.0 (exponent 16, even) -> 2.0
    assert bitround(np.array([1.25, 1.5, 1.75, 3.0], np.float16), 0, 10).tolist() == [1.0, 2.0, 2.0, 2.0]


def test_bitround_full_mantissa_is_lossless_and_matches_numcodecs():
    x = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float16) * 30
    assert np.array_equal(bitround(x, 10, 10).view(np.uint16), x.view(np.uint16))
    numcodecs = pytest.importorskip("numcodecs")
    for keepbits in (0, 3, 7, 9):
        assert np.array_equal(bitround(x, keepbits, 10), numcodecs.BitRound(keepbits).encode(x).view(np.float16))
    y = x.astype(np.float32) * 1.2345
    assert np.array_equal(bitround(y, 11, 23), numcodecs.BitRound(11).encode(y).view(np.float32))


def test_to_store_array_keepbits_for_each_dtype_and_overflow():
    x = torch.tensor([[1 + 3 / 1024, -2.0], [65504.0, 0.0]])
    assert to_store_array(x[:1], "float16", "h", keepbits=8).tolist() == [[1 + 4 / 1024, -2.0]]
    assert np.array_equal(to_store_array(x, "float16", "h", keepbits=10), to_store_array(x, "float16", "h"))
    # bfloat16 bits: 1 + 3/128 (mantissa 0000011b) -> 5 kept bits -> 1 + 4/128; stored as uint16 bits
    b = to_store_array(torch.tensor([[1 + 3 / 128]]), "bfloat16", "h", keepbits=5)
    assert b.dtype == np.uint16 and torch.from_numpy(b).view(torch.bfloat16).item() == 1 + 4 / 128
    # 65504 = 0x7BFF (all mantissa bits set): dropping any bit rounds it up to 0x7C00 = inf
    with pytest.raises(StoreError, match="overflow float16 after rounding to --keepbits 9"):
        to_store_array(x, "float16", "blocks.0.hook_resid_post", keepbits=9)


def test_keepbits_is_recorded_and_refused_when_it_changes(tmp_path):
    x = torch.tensor([[1 + 3 / 1024, 2.0], [-1.5, 0.25]])
    store = write_store(tmp_path / "s.zarr", x, context_size=2, chunk_size=2, dtype="float16")
    assert store.spec.keepbits is None
    s8 = spec(n_rows=2, chunk=2, ctx=2, d=2, dtype="float16", keepbits=8)
    ActivationStore.create_or_resume(tmp_path / "k.zarr", s8)
    meta = json.loads((tmp_path / "k.zarr" / HOOK / "zarr.json").read_text())
    assert meta["attributes"]["keepbits"] == 8 and meta["data_type"] == "float16"
    with pytest.raises(StoreError, match=r"different settings \(keepbits\)"):
        ActivationStore.create_or_resume(tmp_path / "k.zarr", spec(n_rows=2, chunk=2, ctx=2, d=2, dtype="float16"))


# ---- creation, forked workers ---------------------------------------------------------------------------------


def test_creation_is_atomic_and_clears_leftovers(tmp_path):
    # a run killed while creating the arrays leaves only a hidden ".<name>.creating-<pid>" sibling, never a
    # folder that looks like a store; the next creation removes it.
    (tmp_path / ".s.zarr.creating-123").mkdir()
    (tmp_path / ".s.zarr.creating-123" / "zarr.json").write_text("{}")
    (tmp_path / "s.zarr").mkdir()  # an empty folder is replaced
    ActivationStore.create_or_resume(tmp_path / "s.zarr", spec())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    # a zarr write killed before its rename leaves a ".partial" file: resuming deletes it
    leftover = tmp_path / "s.zarr" / HOOK / "c" / "1" / "0.abc.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"xx")
    ActivationStore.create_or_resume(tmp_path / "s.zarr", spec())
    assert not leftover.exists()


def _read_in_fork(path, queue):
    import numcodecs.blosc

    queue.put((numcodecs.blosc.use_threads, float(ActivationStore.open(path).read_rows(HOOK, 0, 64).sum())))


def test_blosc_store_is_readable_in_a_forked_worker(tmp_path):
    import numcodecs.blosc

    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3) / 7
    store = write_store(tmp_path / "s.zarr", torch.from_numpy(x), context_size=8, chunk_size=32)
    store.read_rows(HOOK, 0, 64)  # Blosc and zarr's event loop are in use in the parent before the fork
    numcodecs.blosc.use_threads = True  # as another library might set it: the at-fork hook turns it off again
    try:
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        p = ctx.Process(target=_read_in_fork, args=(str(tmp_path / "s.zarr"), queue))
        p.start()
        p.join(60)
        hung = p.is_alive()
        if hung:
            p.kill()
        assert not hung and p.exitcode == 0
        assert queue.get(timeout=5) == (False, pytest.approx(float(torch.from_numpy(x).sum()), rel=1e-6))
    finally:
        numcodecs.blosc.use_threads = False


# ---- plain readers, foreign arrays ----------------------------------------------------------------------------


def test_plain_zarr_and_xarray_read_a_generated_store_without_saetool(tmp_path):
    pytest.importorskip("xarray")
    x = torch.tensor([[1.0, -2.5], [3.140625, 0.0], [0.5, 8.0], [-1.0, 2.0]])
    write_store(tmp_path / "bf.zarr", x.to(torch.bfloat16), context_size=2, chunk_size=2, dtype="bfloat16",
                mask=np.array([False, True, False, True]))
    code = f"""
import json, sys, numpy as np, zarr, xarray
g = zarr.open_group({str(tmp_path / 'bf.zarr')!r}, mode="r")
bits = g[{HOOK!r}][:]
vals = (bits.astype(np.uint32) << 16).view(np.float32)   # bfloat16 bits -> float32, NumPy only
ds = xarray.open_zarr({str(tmp_path / 'bf.zarr')!r}, consolidated=False)
print(json.dumps({{"vals": vals.tolist(), "dtype": g[{HOOK!r}].attrs["saetool_dtype"], "mask": g["mask"][:].tolist(),
    "tokens": g["tokens"][:].tolist(), "dims": list(ds[{HOOK!r}].dims), "xr": ds[{HOOK!r}].values.tolist(),
    "n_rows": g.attrs["saetool"]["n_rows"], "saetool_imported": "saetool" in sys.modules}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["vals"] == x.tolist() and out["dtype"] == "bfloat16" and out["n_rows"] == 4
    assert out["mask"] == [False, True, False, True] and out["tokens"] == [[0, 1], [2, 3]]
    assert out["dims"] == ["row", f"{HOOK}.dim"] and out["xr"] == x.to(torch.bfloat16).view(torch.uint16).tolist()
    assert out["saetool_imported"] is False


def _foreign_group(path):
    """A Zarr v3 group written with plain zarr (no saetool attributes), as another tool would."""
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((20, 3)).astype(np.float32)
    g = zarr.open_group(str(path), mode="w")
    g.create_array("acts/f16", shape=(20, 3), dtype="float16", chunks=(8, 3))[:] = f32.astype(np.float16)
    g.create_array("f32", shape=(20, 3), dtype="float32", chunks=(5, 3))[:] = f32
    bf = torch.from_numpy(f32).to(torch.bfloat16)
    g.create_array("bf16", shape=(20, 3), dtype="uint16", chunks=(10, 3),
                   attributes={"dtype": "bfloat16"})[:] = bf.view(torch.uint16).numpy()
    g.create_array("raw_u16", shape=(20, 3), dtype="uint16")
    g.create_array("flat", shape=(20,), dtype="float32")
    return f32, bf


def test_foreign_zarr_arrays_read_like_a_store(tmp_path):
    f32, bf = _foreign_group(tmp_path / "other.zarr")
    for name, chunk, expected in (("acts/f16", 8, torch.from_numpy(f32).half().float()),
                                  ("f32", 5, torch.from_numpy(f32)), ("bf16", 10, bf.float())):
        src = ActivationStore.open(tmp_path / "other.zarr", array=name)
        assert (src.spec.n_rows, src.spec.chunk_size, src.spec.hook_names, src.complete) == (20, chunk, [name], True)
        assert src.resolve_hook(None) == name and src.width(name) == 3 and src.path == tmp_path / "other.zarr"
        assert torch.equal(src.read_rows(name, 4, 13), expected[4:13])
        assert src.read_rows(name, 0, 2, torch.float64).dtype == torch.float64
        assert src.read_mask(15, 20).tolist() == [True] * 5
    with pytest.raises(StoreError, match=r"has no array 'nope'; it holds bf16, f32, flat, raw_u16"):
        ActivationStore.open(tmp_path / "other.zarr", array="nope")
    with pytest.raises(StoreError, match=r"must be a 2-D array \[rows, d\], got \(20,\)"):
        ActivationStore.open(tmp_path / "other.zarr", array="flat")
    with pytest.raises(StoreError, match="has dtype uint16; expected float16, float32, or uint16 bits"):
        ActivationStore.open(tmp_path / "other.zarr", array="raw_u16")
    with pytest.raises(StoreError, match="--hook_name 'x' is not it"):
        ActivationStore.open(tmp_path / "other.zarr", array="f32").resolve_hook("x")
    with pytest.raises(StoreError, match="no Zarr store at"):
        ActivationStore.open(tmp_path / "missing.zarr", array="f32")


def test_sweep_trains_on_a_foreign_array(tmp_path):
    from saetool.config import SweepConfig
    from saetool.sweep.driver import run_sweep

    if "array" not in {f.name for f in __import__("dataclasses").fields(SweepConfig)}:
        pytest.skip("SweepConfig has no --array yet")
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    x = np.random.default_rng(1).standard_normal((96, 8)).astype(np.float16)
    g.create_array("resid", shape=(96, 8), dtype="float16", chunks=(32, 8))[:] = x
    cfg = SweepConfig(dataset_dir=str(tmp_path / "other.zarr"), array="resid", output_dir=str(tmp_path / "o"),
                      l1_values=[1e-3, 1e-2], batch_size=16, eval_tokens=32, device="cpu", report=False)
    index = run_sweep(cfg, log=lambda *a: None)
    assert index["store"] == {"path": str(tmp_path / "other.zarr"), "model": "", "hook_name": "resid", "n_rows": 96}
    assert index["training"]["tokens"] == 64 and index["training"]["steps"] == 4  # every training row once
    assert len(index["members"]) == 2 and all(m["metrics"]["n_tokens"] == 32 for m in index["members"])
