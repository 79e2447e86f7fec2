"""The training batch loader and the sweep on synthetic stores: T1 (every row once), masking, splits."""

import json

import numpy as np
import pytest
import torch

from saetool.config import SweepConfig
from saetool.io import load_sweep
from saetool.loader import BatchLoader
from saetool.sweep import run_sweep
from tests.synthetic import write_store


def test_t1_every_row_exactly_once(tmp_path):
    store = write_store(tmp_path / "s.zarr", torch.arange(8.0).reshape(8, 1), context_size=2, chunk_size=2)
    loader = BatchLoader(store, store.spec.hook_names[0], batch_size=2, seed=3, shuffle_chunks=2)
    for epoch in range(3):
        batches = list(loader.epoch(epoch))
        assert len(batches) == 4 == len(loader)
        assert sorted(torch.cat(batches).flatten().tolist()) == list(range(8))
    assert [b.tolist() for b in loader.epoch(1)] == [b.tolist() for b in loader.epoch(1)]  # deterministic
    assert [b.tolist() for b in loader.epoch(0)] != [b.tolist() for b in loader.epoch(1)]


def test_masked_rows_are_skipped_and_last_batch_is_partial(tmp_path):
    mask = np.array([False, True] * 10)  # e.g. BOS at position 0 of every 2-token context
    store = write_store(tmp_path / "s.zarr", torch.arange(20.0).reshape(20, 1), context_size=2, chunk_size=4, mask=mask)
    loader = BatchLoader(store, store.spec.hook_names[0], batch_size=4, row_range=(0, 16))
    batches = list(loader.epoch(0))
    assert [len(b) for b in batches] == [4, 4]
    assert sorted(torch.cat(batches).flatten().tolist()) == [1, 3, 5, 7, 9, 11, 13, 15]
    loader = BatchLoader(store, store.spec.hook_names[0], batch_size=3, row_range=(0, 16))
    assert sorted(len(b) for b in loader.epoch(0)) == [2, 3, 3]


def test_t1_sweep_counts_steps_and_tokens(tmp_path):
    store = write_store(tmp_path / "s.zarr", torch.arange(8.0).reshape(8, 1), context_size=2, chunk_size=2)
    cfg = SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "out"), batch_size=2, eval_tokens=0,
                      l1_values=[0.0, 1e-3], ratio=2, device="cpu")
    index = run_sweep(cfg, log=lambda *a: None)
    assert index["training"]["steps"] == 4 and index["training"]["tokens"] == 8
    first = json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["tokens"] == 2


def test_sweep_end_to_end_on_low_rank_data(tmp_path):
    # 2-sparse data over 16 fixed unit directions in d_in = 8: the small-L1 member must reconstruct it well
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    codes = torch.zeros(4096, 16)
    idx = torch.randint(0, 16, (4096, 2), generator=g)
    codes.scatter_(1, idx, torch.rand(4096, 2, generator=g) * 4 + 1)
    store = write_store(tmp_path / "s.zarr", codes @ dirs, context_size=16, chunk_size=512)
    cfg = SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "out"), batch_size=64, eval_tokens=512,
                      l1_values=[1e-4, 1e-1, 1.0], ratio=4, adam_lr=1e-2, n_repetitions=3, device="cpu")
    index = run_sweep(cfg, log=lambda *a: None)
    m = {e["l1_coefficient"]: e["metrics"] for e in index["members"]}
    assert m[1e-4]["fvu"] < 0.05
    assert m[1e-4]["l0"] > m[1e-1]["l0"] > m[1.0]["l0"]
    assert all(v["n_tokens"] == 512 for v in m.values())
    saes = load_sweep(tmp_path / "out")
    x = store.read_rows(store.spec.hook_names[0], 3584, 4096)
    fvu = ((saes[1e-4](x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert abs(fvu.item() - m[1e-4]["fvu"]) < 1e-5  # the saved SAE reproduces the recorded metric
    assert (tmp_path / "out" / "metrics.md").read_text().count("\n| ") == 4
    with pytest.raises(ValueError, match="already holds a finished sweep"):
        run_sweep(cfg, log=lambda *a: None)
