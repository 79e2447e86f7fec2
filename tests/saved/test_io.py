"""Saving/loading SAEs (SAELens layout), case L1, and the sweep index."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saetool.saved.folders import load_sae, load_sweep, save_sae, write_sweep


def weights(d_in=3, d_sae=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g).to(dtype), "W_dec": torch.randn(d_sae, d_in, generator=g).to(dtype),
            "b_enc": torch.randn(d_sae, generator=g).to(dtype), "b_dec": torch.randn(d_in, generator=g).to(dtype)}


def cfg(**kw):
    return {"architecture": "standard", "d_in": 3, "d_sae": 5, "dtype": "float32", "l1_coefficient": 1e-3,
            "hook_name": "blocks.0.hook_resid_post", **kw}


def test_saelens_layout_on_disk(tmp_path):
    save_sae(tmp_path / "sae", weights(), cfg())
    tensors = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"W_enc": (3, 5), "W_dec": (5, 3), "b_enc": (5,), "b_dec": (3,)}
    on_disk = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert on_disk["architecture"] == "standard" and on_disk["d_in"] == 3 and on_disk["d_sae"] == 5


def test_l1_device_and_dtype(tmp_path):
    save_sae(tmp_path / "sae", weights(dtype=torch.bfloat16), cfg(device="cuda", dtype="bfloat16"))
    sae = load_sae(tmp_path / "sae", device="cpu")
    assert {(p.device.type, p.dtype) for p in sae.parameters()} == {("cpu", torch.bfloat16)}
    if not torch.cuda.is_available():
        sae = load_sae(tmp_path / "sae", device=None)
        assert {(p.device.type, p.dtype) for p in sae.parameters()} == {("cpu", torch.bfloat16)}
    sae32 = load_sae(tmp_path / "sae", device="cpu", dtype=torch.float32)
    assert {p.dtype for p in sae32.parameters()} == {torch.float32}
    assert torch.equal(sae32.W_enc, weights(dtype=torch.bfloat16)["W_enc"].float())


def test_forward_matches_hand_computation(tmp_path):
    w = weights()
    save_sae(tmp_path / "sae", w, cfg())
    sae = load_sae(tmp_path / "sae")
    x = torch.randn(7, 3)
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ w["W_dec"] + w["b_dec"])


def test_missing_or_unexpected_tensors_are_refused(tmp_path):
    w = weights()
    w["extra"] = torch.zeros(1)
    save_sae(tmp_path / "sae", w, cfg())
    with pytest.raises(ValueError, match="exactly"):
        load_sae(tmp_path / "sae")
    with pytest.raises(ValueError, match="not an SAE folder"):
        load_sae(tmp_path / "nothing")


def test_load_sweep_is_keyed_by_l1(tmp_path):
    members = [(weights(), cfg(l1_coefficient=v), {"fvu": 0.1}) for v in (1e-4, 1e-3)]
    write_sweep(tmp_path / "sweep", members, {"sweep_param": "l1_coefficient"})
    saes = load_sweep(tmp_path / "sweep")
    assert sorted(saes) == [1e-4, 1e-3]
    assert saes[1e-3].cfg["l1_coefficient"] == 1e-3
    index = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [m["path"] for m in index["members"]] == ["saes/standard_l1_coefficient_1.00e-04",
                                                     "saes/standard_l1_coefficient_1.00e-03"]
    with pytest.raises(ValueError, match="not a finished sweep"):
        load_sweep(tmp_path)


def test_member_folder_names_never_collide():
    # issue 13 item 1: 3 significant digits put 1e-3 and 1.004e-3 in one folder; digits grow until names differ
    from saetool.saved.folders import member_folder_names

    hps = [{"l1_coefficient": v} for v in (1e-3, 1.004e-3, 0.5)]
    assert member_folder_names("standard", hps) == ["standard_l1_coefficient_1.000e-03",
                                                    "standard_l1_coefficient_1.004e-03",
                                                    "standard_l1_coefficient_5.000e-01"]
    three = [{"l1_coefficient": float(v)} for v in np.logspace(-3, -2.995, 3)]
    assert member_folder_names("standard", three) == ["standard_l1_coefficient_1.000e-03",
                                                      "standard_l1_coefficient_1.006e-03",
                                                      "standard_l1_coefficient_1.012e-03"]
    assert member_folder_names("topk", [{"k": 16}, {"k": 32}]) == ["topk_k_16", "topk_k_32"]
    assert member_folder_names("standard", [{"l1_coefficient": 1e-4}]) == ["standard_l1_coefficient_1.00e-04"]
    with pytest.raises(ValueError, match="two members have the same hyperparameters"):
        member_folder_names("topk", [{"k": 2}, {"k": 2}])


def test_close_coefficients_are_saved_and_loaded_as_separate_members(tmp_path):
    from saetool.ensemble.stack import init_member

    members = [(init_member(4, 8, i), {"architecture": "standard", "d_in": 4, "d_sae": 8, "dtype": "float32",
                                       "l1_coefficient": v}, {}) for i, v in enumerate((1e-3, 1.004e-3, 0.5))]
    write_sweep(tmp_path / "sweep", members, {"sweep_param": "l1_coefficient"})
    loaded = load_sweep(tmp_path / "sweep")
    assert sorted(loaded) == [1e-3, 1.004e-3, 0.5]
    for w, c, _ in members:
        torch.testing.assert_close(loaded[c["l1_coefficient"]].W_enc, w["W_enc"])


def test_a_damaged_index_is_one_line_naming_the_file(tmp_path):
    from saetool.saved.folders import read_index

    (tmp_path / "sweep.json").write_text('{"members": [{"path": "sa')
    with pytest.raises(ValueError, match=r"sweep\.json is not valid JSON \(Unterminated string.*the sweep's index is "
                                         r"damaged"):
        read_index(tmp_path)


def test_the_saved_index_records_the_store_by_absolute_path(tmp_path, monkeypatch):
    from saetool.config import SweepConfig
    from saetool.saved.folders import read_index
    from saetool.sweep.driver import run_sweep
    from tests.synthetic import write_store

    write_store(tmp_path / "s.zarr", torch.randn(128, 4, generator=torch.Generator().manual_seed(0)), context_size=8,
                chunk_size=32)
    monkeypatch.chdir(tmp_path)
    run_sweep(SweepConfig(dataset_dir="s.zarr", output_dir="out", batch_size=16, eval_tokens=32, l1_values=[1e-3],
                          ratio=1, device="cpu", report=False), log=lambda *a: None)
    index = read_index(tmp_path / "out")
    assert index["store"]["path"] == str(tmp_path / "s.zarr")
    member = json.loads((tmp_path / "out" / index["members"][0]["path"] / "cfg.json").read_text())
    assert member["metadata"]["dataset_path"] == str(tmp_path / "s.zarr")
