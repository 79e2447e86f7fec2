"""A sweep on damaged or non-finite data stops with one line naming the rows and chunk (issue 13, items 5, 8, 11):
NaN / inf in training or held-out rows, a deleted chunk file of a complete store, a truncated chunk read by the
loader's background threads or by the main thread. Nothing that looks like a finished sweep is left."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

from saetool.config import SweepConfig
from saetool.store.activation_store import ActivationStore, StoreError
from saetool.sweep.driver import run_sweep
from tests.synthetic import write_store

ROOT = Path(__file__).resolve().parents[2]
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def store(tmp_path):
    g = torch.Generator().manual_seed(0)
    write_store(tmp_path / "s.zarr", torch.randn(640, 8, generator=g), context_size=4, chunk_size=64)
    return tmp_path / "s.zarr"


def chunk_file(store, c):
    return store / HOOK / "c" / str(c) / "0"


def set_value(store, row, col, value):
    zarr.open_array(str(store / HOOK), mode="r+")[row, col] = value


def sweep(store, out, **kw):
    cfg = SweepConfig(dataset_dir=str(store), output_dir=str(out), ratio=2, l1_values=[0.01], batch_size=32,
                      eval_tokens=64, device="cpu", report=False, **kw)
    return run_sweep(cfg, log=lambda *a: None)


WHERE = "store {store}, hook blocks.0.hook_resid_post"


@pytest.mark.parametrize("row,value,b_dec_init", [(195, float("nan"), "mean"), (195, float("nan"), "zeros"),
                                                  (579, float("inf"), "mean")])
def test_non_finite_rows_stop_the_sweep_naming_row_and_chunk(store, tmp_path, row, value, b_dec_init):
    # row 195: training rows, read by b_dec's data sample (mean) or first by the loader's threads (zeros);
    # row 579: the held-out rows (576-639)
    set_value(store, row, 2, value)
    with pytest.raises(StoreError) as e:
        sweep(store, tmp_path / "out", b_dec_init=b_dec_init)
    chunk = row // 64
    assert str(e.value) == (WHERE.format(store=store) + f": row {row} (chunk {chunk}, rows {chunk * 64}-"
                            f"{chunk * 64 + 63}) holds {value} at column 2; a sweep cannot train on non-finite "
                            "activations (regenerate the store, or --dtype float32 if float16 overflowed)")
    assert not (tmp_path / "out" / "sweep.json").exists()


def test_a_missing_chunk_of_a_complete_store_is_an_error(store, tmp_path):
    chunk_file(store, 3).unlink()
    with pytest.raises(StoreError) as e:
        sweep(store, tmp_path / "out")
    assert str(e.value) == (WHERE.format(store=store) + f": chunk 3 (rows 192-255) is missing "
                            f"({chunk_file(store, 3)}), though the store says it is complete; regenerate the store")
    rows = ActivationStore.open(store).read_rows(HOOK, 0, 64)  # other chunks still read
    assert rows.shape == (64, 8)


def test_a_truncated_chunk_is_an_error_in_the_main_thread(store):
    data = chunk_file(store, 2).read_bytes()
    chunk_file(store, 2).write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError) as e:
        ActivationStore.open(store).read_rows(HOOK, 130, 140)
    assert str(e.value) == (WHERE.format(store=store) + ": rows 130-139 (chunk 2) cannot be decoded (RuntimeError: "
                            "error during blosc decompression: -1); the chunk file is damaged: regenerate the store")


@pytest.mark.parametrize("chunk,flags", [(3, ["--b_dec_init", "zeros"]), (9, [])])
def test_a_truncated_chunk_read_by_a_background_thread_stops_the_cli_with_one_line(store, tmp_path, chunk, flags):
    # chunk 3 is first read by the loader's threads (b_dec zeros: no data sample); chunk 9 is held out
    data = chunk_file(store, chunk).read_bytes()
    chunk_file(store, chunk).write_bytes(data[: len(data) // 2])
    r = subprocess.run([sys.executable, "-m", "saetool.cli", "sweep", "--dataset_dir", str(store), "--output_dir",
                        str(tmp_path / "out"), "--ratio", "2", "--l1_values", "0.01", "--batch_size", "32",
                        "--eval_tokens", "64", "--device", "cpu", "--report", "False", *flags],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"saetool: error: {WHERE.format(store=store)}: rows {chunk * 64}-{chunk * 64 + 63} (chunk {chunk}) cannot be "
        "decoded (RuntimeError: error during blosc decompression: -1); the chunk file is damaged: regenerate the store")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "sweep.json").exists()
