"""A sweep YAML with several architectures: one ensemble each in one run, normalisation folded at save, the index
records every member, and every saved SAE reproduces its held-out metrics on raw activations."""

import json

import torch
import yaml

from saetool.cli import main
from saetool.saes import ARCHITECTURES
from saetool.saved.folders import load_sae, read_index
from saetool.store.activation_store import ActivationStore
from tests.synthetic import write_store


def test_sweep_config_with_every_architecture(tmp_path):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(640, 8, generator=g) * torch.linspace(0.5, 3, 8) * 5 + 2
    write_store(tmp_path / "s.zarr", acts, context_size=8, chunk_size=64)
    config = {
        "dataset_dir": str(tmp_path / "s.zarr"), "ratio": 2, "batch_size": 32, "eval_tokens": 128,
        "normalize_activations": "expected_average_only_in", "lr_warmup_steps": 5, "device": "cpu",
        "ensembles": [
            {"architecture": "standard", "l1_values": [1e-3, 1e-2], "l1_warmup_steps": 5},
            {"name": "tk", "architecture": "topk", "k_values": [2, 4]},
            {"architecture": "batchtopk", "k_values": [2, 4]},
            {"architecture": "matryoshka_batchtopk", "k_values": [3], "matryoshka_widths": [4, 16]},
            {"architecture": "jumprelu", "l0_values": [1e-3, 1e-2], "jumprelu_bandwidth": 0.5},
            {"architecture": "gated", "l1_values": [1e-2]},
        ],
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--output_dir", str(out)])
    index = read_index(out)
    assert {m["architecture"] for m in index["members"]} == set(ARCHITECTURES)
    assert len(index["members"]) == 10
    assert [m["ensemble"] for m in index["members"]][2:4] == ["tk", "tk"]
    assert (out / "metrics.md").read_text().count("| batchtopk |") == 2
    store = ActivationStore.open(tmp_path / "s.zarr")
    hook = store.spec.hook_names[0]
    x = store.read_rows(hook, 640 - 128, 640, torch.float32)
    for m in index["members"]:
        sae = load_sae(out / m["path"])
        assert sae.cfg["normalize_activations"] == "none" and sae.arch.NAME == m["architecture"]
        assert sae.cfg["metadata"]["normalization_factor_folded"] != 1.0
        if m["architecture"] == "batchtopk":
            assert sae.cfg["architecture"] == "jumprelu" and m["saved_architecture"] == "jumprelu"
        with torch.no_grad():
            x_hat, f = sae(x), sae.encode(x)
        mse = (x_hat - x).pow(2).mean().item()
        assert abs(mse - m["metrics"]["mse"]) <= 1e-4 * max(1.0, mse), m["path"]
        assert abs((f != 0).sum(-1).float().mean().item() - m["metrics"]["l0"]) < 1e-3
    cfg_std = json.loads((out / "0_standard" / "sweep.json").read_text())["config"]
    assert cfg_std["l1_warmup_steps"] == 5 and cfg_std["normalize_activations"] == "expected_average_only_in"
