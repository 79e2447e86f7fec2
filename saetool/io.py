"""Saving and loading SAEs in the SAELens layout, and the sweep index.

One SAE = one folder: `cfg.json` + `sae_weights.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc
[d_sae], b_dec [d_in]) as SAELens' `SAE.save_model` writes them. A sweep folder holds one such folder per
member under `saes/` and `sweep.json`, the index (members, their hyperparameters and metrics, the sweep
config). `sweep.json` is written last and atomically: a folder without it is not a finished sweep.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saetool.sae import SparseLinearAutoencoder, trained_architecture
from saetool.saes import get_architecture

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
INDEX_FILE = "sweep.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temporary file + os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_sae(path: str | os.PathLike, weights: dict[str, torch.Tensor], cfg: dict) -> None:
    """Write one SAE folder (created if needed). `cfg` must give architecture, d_in, d_sae, dtype."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[cfg["dtype"]]
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in weights.items()}, str(path / WEIGHTS_FILE))
    write_json(path / CFG_FILE, cfg)


def load_sae(path: str | os.PathLike, device: str | torch.device | None = "cpu",
             dtype: str | torch.dtype | None = None) -> SparseLinearAutoencoder:
    """Load one SAE folder.

    device: where every tensor goes; None means the device recorded in cfg.json when it is available here,
    else "cpu" (case L1: an SAE saved from "cuda" loads on a machine without CUDA).
    dtype: None keeps cfg.json's dtype (e.g. bfloat16); an explicit dtype converts every tensor.
    Raises ValueError if the folder lacks cfg.json / weights or the tensors do not match the cfg.
    """
    path = Path(path)
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path} is not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE})")
    cfg = json.loads((path / CFG_FILE).read_text())
    if device is None:
        device = cfg.get("device", "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
    if dtype is None:
        dtype = cfg.get("dtype", "float32")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    weights = {k: v.to(device=device, dtype=dtype) for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    cfg = {**cfg, "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
    return SparseLinearAutoencoder(weights, cfg)


def member_folder_name(architecture: str, hyperparams: dict) -> str:
    """e.g. "standard_l1_coefficient_1.00e-04" or "topk_k_32"."""
    parts = [f"{k}_{v:.2e}" if isinstance(v, float) else f"{k}_{v}" for k, v in hyperparams.items()]
    return "_".join([architecture, *parts])


def write_sweep(out_dir: str | os.PathLike, members: list[tuple[dict, dict, dict]], index: dict) -> None:
    """Write a sweep folder: members = [(weights, cfg, metrics), ...]; `index` gets a "members" list added.

    Member folders are first written to `saes.tmp/` and swapped in whole, then `sweep.json` last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "saes.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    entries = []
    for weights, cfg, metrics in members:
        arch = trained_architecture(cfg)
        hyperparams = {h: cfg[h] for h in get_architecture(arch).HYPERPARAMS}
        name = member_folder_name(arch, hyperparams)
        save_sae(tmp / name, weights, cfg)
        saved_as = {} if arch == cfg["architecture"] else {"saved_architecture": cfg["architecture"]}
        entries.append({"path": f"saes/{name}", "architecture": arch, **saved_as, **hyperparams, "metrics": metrics})
    final = out_dir / "saes"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(out_dir / INDEX_FILE, {**index, "members": entries})


def read_index(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / INDEX_FILE).is_file():
        raise ValueError(f"{path} is not a finished sweep (no {INDEX_FILE})")
    return json.loads((path / INDEX_FILE).read_text())


def load_sweep(path: str | os.PathLike, device: str | torch.device | None = "cpu",
               dtype: str | torch.dtype | None = None) -> dict[float, SparseLinearAutoencoder]:
    """All members of a sweep keyed by their swept hyperparameter: the L1 coefficient for standard SAEs
    (the original tool's contract), k for TopK/BatchTopK SAEs, l0_coefficient for JumpReLU SAEs. device/dtype as in `load_sae`."""
    path = Path(path)
    index = read_index(path)
    out: dict[float, SparseLinearAutoencoder] = {}
    for entry in index["members"]:
        sae = load_sae(path / entry["path"], device=device, dtype=dtype)
        key = sae.cfg[sae.arch.SWEEP_PARAM]
        if key in out:
            raise ValueError(f"sweep {path} has two members with {sae.arch.SWEEP_PARAM}={key}; use read_index()")
        out[key] = sae
    return out
