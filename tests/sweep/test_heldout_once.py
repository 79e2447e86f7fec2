"""The held-out rows are read and encoded once per sweep: that one pass gives sweep.json's metrics, metrics.md, the
report's numbers and the feature browser's contexts (issue 23)."""

import json

import numpy as np
import torch

import saetool.evaluate.heldout as heldout_mod
from saetool.config import SweepConfig
from saetool.saved.sae import SparseLinearAutoencoder
from saetool.sweep.driver import run_sweep
from tests.synthetic import write_store


def test_a_sweep_with_its_report_and_browser_encodes_the_heldout_rows_once(tmp_path, monkeypatch):
    ctx, n = 8, 512
    mask = np.ones(n, dtype=bool)
    mask[::ctx] = False  # BOS rows: stored, never encoded
    write_store(tmp_path / "s.zarr", torch.randn(n, 6, generator=torch.Generator().manual_seed(0)), ctx, 128,
                mask=mask)
    passes, rows = [], {}
    real_pass, real_encode = heldout_mod.encode_pass, SparseLinearAutoencoder.encode

    def counting_pass(saes, store, hook, span, *a, **k):
        passes.append(span)
        return real_pass(saes, store, hook, span, *a, **k)

    def counting_encode(self, x):
        rows[id(self)] = rows.get(id(self), 0) + x.shape[0]
        return real_encode(self, x)

    monkeypatch.setattr(heldout_mod, "encode_pass", counting_pass)
    monkeypatch.setattr(SparseLinearAutoencoder, "encode", counting_encode)
    out = tmp_path / "sweep"
    index = run_sweep(SweepConfig(dataset_dir=str(tmp_path / "s.zarr"), output_dir=str(out), l1_values=[1e-3, 1e-2],
                                  ratio=2, batch_size=32, eval_tokens=60, device="cpu"), log=lambda *a: None)
    assert passes == [(448, 512)]  # 60 tokens rounded up to whole contexts of 8: the last 64 rows, read once
    kept = int(mask[448:].sum())
    assert sorted(rows.values()) == [kept, kept]  # each member encoded each kept held-out row exactly once
    ev = json.loads((out / "report" / "evaluation.json").read_text())
    for member, entry in zip(ev["members"], index["members"], strict=True):
        assert member["heldout"]["n_tokens"] == entry["metrics"]["n_tokens"] == kept
        assert member["heldout"]["fvu"] == entry["metrics"]["fvu"]  # the same pass, the same numbers
    assert ev["sweep"]["heldout_rows"] == [448, 512]
    assert ev["browser"] == f"Contexts from the held-out rows 448..512 of {tmp_path / 's.zarr'} (never trained on)."
    data = out / "report" / "browser" / "data"
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == ["m0", "m1"]  # the browser, from that same pass
