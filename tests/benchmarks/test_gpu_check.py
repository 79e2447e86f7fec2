"""The GPU check's CPU mode (tiny shapes): the script behind `make gpu-check` runs end to end and its figures rest on
known quantities, so it cannot rot between the sessions that have a GPU."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    result = gpu_check.main(["--out", str(tmp_path), "--cpu"])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(result))
    s = gpu_check.CPU
    assert result["step_flops"] == 10 * 256 * 32 * 128 * 4 == 10 * s["batch"] * s["d_in"] * s["d_sae"] * s["members"]
    variants = result["step"]["variants"]
    assert list(variants) == ["fused fp32", "fused bf16", "fused bf16 compiled", "batchtopk bf16 compiled"]
    for r in variants.values():  # throughput, FLOP/s and MFU are the same measurement in three units
        assert abs(r["sae_tokens_per_s"] * r["seconds_per_step"] - s["batch"] * s["members"]) < 1e-6 * s["batch"]
        assert abs(r["flops_per_s"] * r["seconds_per_step"] - result["step_flops"]) < 1e-6 * result["step_flops"]
    assert variants["fused fp32"]["compiles"] == 0 and variants["fused bf16 compiled"]["compiles"] >= 1
    assert result["feed"]["same_weights"] is True  # fed and on-device routes train on the same batches identically
    kept = 4 * 512 - 4 * 512 // 64  # the store's rows (4 chunks of 512) but each context's BOS row (masked)
    assert result["feed"]["batches"] == -(-kept // 256)  # in batches of 256, the last one short
    assert result["generation"]["tiny"]["n_tokens"] == 4 * 512
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("GPU check on ") and "| fused bf16 compiled |" in table and "| tiny |" in table
