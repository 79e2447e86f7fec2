"""Saving and loading SAEs in the SAELens layout, and the sweep index.

One SAE = one folder: `cfg.json` + `sae_weights.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc
[d_sae], b_dec [d_in]) as SAELens' `SAE.save_model` writes them. A sweep folder holds one such folder per
member under `saes/` and `sweep.json`, the index (members, their hyperparameters and metrics, the sweep
config). `sweep.json` is written last and atomically: a folder without it is not a finished sweep.

`load_sae` also reads folders written by SAELens (`SAE.save_model` / `save_inference_model`, v6 or pre-6.0 cfg) of
the architectures both have (standard, topk, jumprelu incl. SAELens' BatchTopK, gated): every cfg.json field that
changes SAELens' encode/decode (sae_lens 6.54, saes/sae.py and saes/*_sae.py) is applied exactly or refused
(`saelens_fields`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from saetool.saes import get_architecture
from saetool.saved.sae import SparseLinearAutoencoder, trained_architecture

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
    """Write one SAE folder (created if needed). `cfg` must give architecture, d_in, d_sae, dtype.
    Raises OSError (e.g. ENOSPC for a full disk) if a file cannot be written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[cfg["dtype"]]
    data = safetensors_bytes({k: v.detach().to("cpu", dtype).contiguous() for k, v in weights.items()})
    (path / WEIGHTS_FILE).write_bytes(data)  # through Python's file API, so a write error is an OSError
    write_json(path / CFG_FILE, cfg)


NORMALIZE_REFUSED = {
    "expected_average_only_in": "the input scale is not stored in the folder (SAELens' load_from_disk leaves inputs "
                                "unscaled); fold it into the weights (SAELens fold_activation_norm_scaling_factor) first",
    "constant_norm_rescale": "SAELens rescales each input row to norm sqrt(d_in) and undoes it on the output, so "
                             "decode would depend on the input, not only on the latents",
    "layer_norm": "SAELens layer-normalises each input row and undoes it on the output, so decode would depend on the "
                  "input, not only on the latents",
    "covariance_whitening": "the whitening statistics are not stored in the folder; fold them into the weights "
                            "(SAELens fold_activation_whitening) first",
}


def saelens_fields(cfg: dict, weights: dict[str, torch.Tensor], cfg_path: str | os.PathLike
                   ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The cfg.json fields of SAELens that change encode/decode, applied or refused: returns (cfg, weights).

    SAELens 6.54 (saes/sae.py process_sae_in, saes/*_sae.py) encodes f = act((x - b_dec * apply_b_dec_to_input)
    W_enc + b_enc) and decodes x_hat = f W_dec + b_dec, with per architecture:
      topk      f = TopK_k(pre * n), x_hat = (f / n) W_dec + b_dec when rescale_acts_by_decoder_norm
                (n [d_sae] = ||W_dec[i]||)
      jumprelu  f = ReLU(pre) * 1[pre > threshold]   (saetool: pre * 1[pre > threshold])
      gated     b_gate, b_mag, r_mag in place of b_enc
    Applied: apply_b_dec_to_input and (topk) rescale_acts_by_decoder_norm, as SAELens computes them
    (SparseLinearAutoencoder.encode/decode); negative jumprelu thresholds, clamped to 0 (ReLU(pre) 1[pre > t] = pre 1[pre > max(t, 0)]);
    pre-6.0 activation_fn "topk" with activation_fn_kwargs.k (architecture topk, as SAELens converts it);
    normalize_activations null/false (= "none"); reshape_activations "hook_z" (saetool takes the inputs flattened
    heads-major, [..., n_heads * d_head], as SAELens reshapes them); dtype "torch.float32" etc.; an all-ones
    scaling_factor tensor (dropped, as SAELens drops it); a standard cfg without l1_coefficient (NaN: SAELens
    inference cfgs do not record it). Refused, ValueError naming the field and value: every other
    normalize_activations (see NORMALIZE_REFUSED), reshape_activations or activation_fn, non-boolean flags.
    Fields SAELens does not read for the architecture (e.g. a jumprelu's rescale_acts_by_decoder_norm) are ignored,
    as in SAELens; hook_head_index picks the input outside the SAE and stays in the cfg.
    """
    cfg, weights = dict(cfg), dict(weights)

    def refuse(field: str, why: str):
        raise ValueError(f"{cfg_path} field {field!r}={cfg[field]!r} is not supported; {why}")

    for field in ("activation_fn", "activation_fn_str"):  # pre-6.0 SAELens
        fn, k = cfg.get(field), (cfg.get("activation_fn_kwargs") or {}).get("k")
        if fn == "topk" and cfg["architecture"] == "standard" and k is not None:
            cfg.update(architecture="topk", k=int(k))
        elif fn not in (None, "relu") and not (fn == "topk" and cfg["architecture"] == "topk"):
            refuse(field, "saetool reads 'relu' and (pre-6.0 SAELens) 'topk' with activation_fn_kwargs.k")
    norm = cfg.get("normalize_activations", "none")
    if norm in (None, False):  # pre-6.0 SAELens
        cfg["normalize_activations"] = "none"
    elif norm != "none":
        refuse("normalize_activations", NORMALIZE_REFUSED.get(norm if isinstance(norm, str) else
                                                              "expected_average_only_in", "expected 'none'"))
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        refuse("reshape_activations", "expected 'none' or 'hook_z'")
    for field in ["apply_b_dec_to_input"] + (["rescale_acts_by_decoder_norm"] if cfg["architecture"] == "topk" else []):
        if field in cfg and not isinstance(cfg[field], bool):
            refuse(field, "expected true or false")
    if isinstance(cfg.get("dtype"), str):
        cfg["dtype"] = cfg["dtype"].removeprefix("torch.")
    if cfg["architecture"] in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder") and "threshold" in weights:
        weights["threshold"] = weights["threshold"].clamp_min(0)
    if "scaling_factor" in weights and bool((weights["scaling_factor"] == 1).all()):
        del weights["scaling_factor"]
    if trained_architecture(cfg) == "standard" and "l1_coefficient" not in cfg:
        cfg["l1_coefficient"] = float("nan")
    return cfg, weights


def load_sae(path: str | os.PathLike, device: str | torch.device | None = "cpu",
             dtype: str | torch.dtype | None = None) -> SparseLinearAutoencoder:
    """Load one SAE folder (saetool's, or SAELens' with its cfg fields applied or refused: `saelens_fields`).

    device: where every tensor goes; None means the device recorded in cfg.json when it is available here,
    else "cpu" (case L1: an SAE saved from "cuda" loads on a machine without CUDA).
    dtype: None keeps cfg.json's dtype (e.g. bfloat16); an explicit dtype converts every tensor.
    Raises ValueError if the folder lacks cfg.json / weights, cfg.json lacks architecture / d_in / d_sae, a SAELens
    field is not supported, or the tensors do not match the cfg.
    """
    path = Path(path)
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path} is not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE})")
    cfg = json.loads((path / CFG_FILE).read_text())
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise ValueError(f"{path / CFG_FILE} has no {key!r} field (needs architecture, d_in, d_sae)")
    if device is None:
        device = cfg.get("device", "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
    cfg, weights = saelens_fields(cfg, load_file(str(path / WEIGHTS_FILE)), path / CFG_FILE)
    if dtype is None:
        dtype = cfg.get("dtype", "float32")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    cfg = {**cfg, "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
    return SparseLinearAutoencoder(weights, cfg)


def member_folder_names(architecture: str, hyperparams: list[dict]) -> list[str]:
    """The folder name of each member of one ensemble, e.g. "standard_l1_coefficient_1.00e-04" or "topk_k_32".

    Floats get 3 significant digits, or as many more as it takes for every member's name to differ
    (1e-3 and 1.004e-3 -> "1.000e-03" and "1.004e-03"); names never collide. Raises ValueError for two members
    with the same hyperparameters (SweepConfig.validate refuses repeated values before training)."""
    for digits in range(3, 18):
        names = ["_".join([architecture, *(f"{k}_{v:.{digits - 1}e}" if isinstance(v, float) else f"{k}_{v}"
                                           for k, v in hp.items())]) for hp in hyperparams]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"two members have the same hyperparameters: {names}")


def write_member(root: str | os.PathLike, name: str, weights: dict, cfg: dict, metrics: dict) -> dict:
    """Save one member as ROOT/<name>/ (save_sae) and return its index entry (path "saes/<name>", architecture,
    hyperparameters, metrics)."""
    arch = trained_architecture(cfg)
    save_sae(Path(root) / name, weights, cfg)
    saved_as = {} if arch == cfg["architecture"] else {"saved_architecture": cfg["architecture"]}
    hyperparams = {h: cfg[h] for h in get_architecture(arch).HYPERPARAMS}
    return {"path": f"saes/{name}", "architecture": arch, **saved_as, **hyperparams, "metrics": metrics}


def write_members(out_dir: str | os.PathLike, members: list[tuple[dict, dict, dict]]) -> list[dict]:
    """Write the member folders of a sweep: members = [(weights, cfg, metrics), ...] into OUTPUT_DIR/saes/<name>/;
    returns their index entries (write_member). The folders are first written to `saes.tmp/` and swapped in whole
    (publish_members), so an error (e.g. a full disk) leaves no partial saes/ folder."""
    out_dir = Path(out_dir)
    tmp = out_dir / MEMBERS_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    names = {}
    for _, cfg, _ in members:
        arch = trained_architecture(cfg)
        names.setdefault(arch, []).append({h: cfg[h] for h in get_architecture(arch).HYPERPARAMS})
    names = {arch: iter(member_folder_names(arch, hps)) for arch, hps in names.items()}
    try:
        entries = [write_member(tmp, next(names[trained_architecture(cfg)]), weights, cfg, metrics)
                   for weights, cfg, metrics in members]
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: free what was written
        raise
    publish_members(out_dir)
    return entries


MEMBERS_TMP = "saes.tmp"


def publish_members(out_dir: str | os.PathLike) -> None:
    """Replace OUTPUT_DIR/saes/ by the finished OUTPUT_DIR/saes.tmp/ (one rename)."""
    out_dir = Path(out_dir)
    final = out_dir / "saes"
    if final.exists():
        shutil.rmtree(final)
    os.replace(out_dir / MEMBERS_TMP, final)


def write_sweep(out_dir: str | os.PathLike, members: list[tuple[dict, dict, dict]], index: dict) -> None:
    """Write a whole sweep folder: the member folders (write_members), then `sweep.json` (`index` with its "members"
    list), last and atomically: a folder without it is not a finished sweep."""
    entries = write_members(out_dir, members)
    write_json(Path(out_dir) / INDEX_FILE, {**index, "members": entries})


def read_index(path: str | os.PathLike) -> dict:
    """The sweep index OUTPUT_DIR/sweep.json; ValueError (one line, naming the file) if missing or not JSON."""
    path = Path(path)
    if not (path / INDEX_FILE).is_file():
        raise ValueError(f"{path} is not a finished sweep (no {INDEX_FILE})")
    try:
        return json.loads((path / INDEX_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / INDEX_FILE} is not valid JSON ({e}): the sweep's index is damaged") from None


def single_hook_index(path: str | os.PathLike, what: str) -> dict:
    """read_index(path) for a sweep whose members all read one hook (and one target); a sweep over several hooks
    (`--hook_name all` or a list) is refused in one line naming its per-hook folders, which `what` takes one by one."""
    index = read_index(path)
    hooks = sorted({(m.get("hook_name"), m.get("target_hook")) for m in index["members"]}, key=str)
    if len(hooks) > 1 or isinstance(index.get("store", {}).get("hook_name"), list):
        folders = sorted({m["path"].split("/")[0] for m in index["members"]})
        raise ValueError(f"{path} holds sweeps of several hooks: run {what} on each of its folders "
                         f"({', '.join(str(Path(path) / f) for f in folders)})")
    return index


EXPORT_MARK = ".saetool-export"


def start_export(final: Path, out_dir: Path, index: dict) -> Path:
    """Check the export folder `final` for the sweep `out_dir` (check_export_dir: its members and store are the
    sources) and return a fresh `final`.tmp folder, marked as an export, to write into; finish_export publishes it."""
    check_export_dir(final, [out_dir / e["path"] for e in index["members"]]
                     + [Path(index.get("store", {}).get("path") or out_dir)])
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / EXPORT_MARK).write_text("written by saetool export; a later export may replace this folder\n")
    return tmp


def finish_export(tmp: Path, final: Path) -> None:
    """Replace `final` (an earlier export, if any) by the finished `tmp` folder."""
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(final)


def check_export_dir(final: Path, sources: list[Path]) -> None:
    """Refuse (ValueError, one line, nothing removed) an export folder that would replace anything but an earlier
    export: an existing folder that is not empty and lacks EXPORT_MARK, or one holding a sweep member or the store."""
    final = Path(os.path.abspath(final))
    for src in sources:
        src = Path(os.path.abspath(src))
        if src == final or final in src.parents:
            raise ValueError(f"--export_dir {final} holds {src}, which the export reads; choose another folder")
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / EXPORT_MARK).exists())):
        raise ValueError(f"--export_dir {final} exists and is not an earlier saetool export; it is left as it is "
                         "(remove it or choose another folder)")


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
