"""Interoperability: SAELens folders in and out, and the original tool's ``learned_dicts_epoch_*.pt`` files.

**saetool -> SAELens.** A saved member folder (``cfg.json`` + ``sae_weights.safetensors``, W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]) already loads with ``sae_lens.SAE.load_from_disk(folder)`` and gives
the same ``encode``/``decode`` (tests/saved/test_interop.py). SAELens (>= 6) treats a cfg.json without ``sae_lens_version``
as a pre-6.0 config and keeps, of its metadata, only the top-level keys it knows (``model_name``, ``hook_name``,
``context_size``, ``prepend_bos``, ``dataset_path``, ...); :func:`saelens_cfg` copies those from saetool's nested
``metadata`` to the top level so they survive the load.

**SAELens -> saetool.** :func:`load_saelens` reads a folder written by SAELens (``SAE.save_model``, v6 or pre-6 cfg)
for the ``standard`` (ReLU) and ``topk`` architectures and converts it exactly to saetool's form
``f = act((x - b_dec) W_enc + b_enc)``, ``x_hat = f W_dec + b_dec``:

* ``apply_b_dec_to_input = False`` (SAELens: ``f = act(x W_enc + b_enc)``): ``b_enc' = b_enc + b_dec W_enc``;
* TopK ``rescale_acts_by_decoder_norm`` (SAELens: top-k of ``pre * n``, decode ``(f / n) W_dec`` with
  ``n_i = ||W_dec[i]||``): folded as ``W_enc' = W_enc n``, ``b_enc' = b_enc n``, ``W_dec' = W_dec / n``;
* a pre-6.0 ``scaling_factor`` s (decode ``(f * s) W_dec``): ``W_dec' = s W_dec``.

Folds are computed in float64 and cast once. Refused (ValueError): other architectures (JumpReLU, gated, ...),
``normalize_activations`` other than ``none``, single-head SAEs (``hook_head_index``).

**The original tool** (HoagyC/sparse_coding) saved sweeps with ``torch.save`` as a list of ``(learned_dict,
hyperparams)`` pairs whose objects are instances of ``autoencoders.learned_dict.TiedSAE`` / ``UntiedSAE`` and
``autoencoders.topk_encoder.TopKLearnedDict``. :func:`load_legacy` reads them without the original code: a restricted
unpickler maps those class names to small stand-ins (and allows nothing else but tensor rebuilding, so a file cannot
run arbitrary code), and each dictionary is converted exactly (see :func:`legacy_to_saetool`).
"""

from __future__ import annotations

import json
import os
import pickle
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

from saetool.saved.folders import CFG_FILE, DTYPES, WEIGHTS_FILE
from saetool.saved.sae import SparseLinearAutoencoder

__all__ = [
    "SAELENS_TOP_LEVEL_METADATA",
    "legacy_to_saetool",
    "load_legacy",
    "load_saelens",
    "saelens_cfg",
    "saelens_to_saetool",
]

# Metadata keys SAELens' pre-6.0 config path keeps from the top level of cfg.json
# (sae_lens.loading.pretrained_sae_loaders.LLM_METADATA_KEYS, the ones saetool has).
SAELENS_TOP_LEVEL_METADATA = ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path")


def saelens_cfg(cfg: dict) -> dict:
    """saetool's member cfg.json with the metadata SAELens reads copied to the top level.

    Returns a new dict: ``cfg`` plus, for each key of :data:`SAELENS_TOP_LEVEL_METADATA` present in
    ``cfg["metadata"]`` and absent from the top level, ``cfg[key] = cfg["metadata"][key]``. Nothing is removed or
    renamed, so saetool reads the result exactly as before.
    """
    out = dict(cfg)
    for key in SAELENS_TOP_LEVEL_METADATA:
        if key not in out and key in cfg.get("metadata", {}):
            out[key] = cfg["metadata"][key]
    return out


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return name


def saelens_to_saetool(cfg: dict, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Convert a SAELens config dict + state dict (standard or topk) to saetool ``(weights, cfg)``.

    Args:
        cfg: the parsed cfg.json (SAELens v6 with ``architecture`` and ``metadata``, or a pre-6.0 config with
            ``hook_point``/``activation_fn_str``/``activation_fn_kwargs``).
        state_dict: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]`` and
            optionally ``scaling_factor``/``finetuning_scaling_factor [d_sae]``.

    Returns:
        weights in the cfg's dtype and saetool cfg: architecture, d_in, d_sae, dtype, device "cpu",
        apply_b_dec_to_input True, normalize_activations "none", hook_name, ``l1_coefficient`` (NaN when SAELens
        did not record it) or ``k``, tied False, metadata (SAELens' metadata + ``source``).

    Raises:
        ValueError: an unsupported architecture or option, or missing/unexpected tensors.
    """
    meta = dict(cfg.get("metadata") or {})
    arch, fn_kwargs, hook_name = _saelens_kind(cfg, meta)
    W_enc, W_dec, b_enc, b_dec, scale, dtype = _saelens_tensors(cfg, state_dict, arch)
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    if scale is not None:
        W_dec = W_dec * scale.detach().cpu().to(torch.float64)[:, None]
    hyper: dict
    if arch == "topk":
        k = cfg.get("k", fn_kwargs.get("k"))
        if k is None:
            raise ValueError("SAELens topk SAE without k in its cfg")
        hyper = {"k": int(k)}
        if cfg.get("rescale_acts_by_decoder_norm", False):
            n = torch.linalg.vector_norm(W_dec, dim=-1)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    else:
        l1 = cfg.get("l1_coefficient")
        hyper = {"l1_coefficient": float("nan") if l1 is None else float(l1)}
    torch_dtype = DTYPES[dtype]
    weights = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    weights = {k: v.to(torch_dtype).contiguous() for k, v in weights.items()}
    out_cfg = {
        "architecture": arch, "d_in": int(W_enc.shape[0]), "d_sae": int(W_enc.shape[1]), "dtype": dtype,
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none", "hook_name": hook_name,
        **hyper, "tied": False, "metadata": {**meta, "source": "saelens"},
    }
    return weights, out_cfg


def _saelens_kind(cfg: dict, meta: dict) -> tuple[str, dict, str | None]:
    """(architecture "standard" | "topk", activation_fn_kwargs, hook name) of a SAELens cfg (v6 or pre-6.0).
    ValueError for another architecture or activation, normalised activations or a single-head SAE."""
    fn = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    fn_kwargs = cfg.get("activation_fn_kwargs") or {}
    arch = cfg.get("architecture") or ("topk" if fn == "topk" else "standard")
    if arch == "standard" and fn == "topk":
        arch = "topk"
    if arch not in ("standard", "topk"):
        raise ValueError(f"SAELens architecture {arch!r} is not supported by saetool (standard, topk)")
    if arch == "standard" and fn not in (None, "relu"):
        raise ValueError(f"SAELens activation function {fn!r} is not supported by saetool (relu, topk)")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, False, "none"):
        raise ValueError(f"SAELens normalize_activations={norm!r} is not supported: saetool SAEs read raw activations")
    head = cfg.get("hook_head_index", meta.get("hook_head_index"))
    if head is not None:
        raise ValueError(f"single-head SAELens SAEs (hook_head_index={head}) are not supported")
    return arch, fn_kwargs, cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name")


def _saelens_tensors(cfg: dict, state_dict: dict[str, torch.Tensor], arch: str) -> tuple:
    """(W_enc, W_dec, b_enc, b_dec) in float64 on the CPU, the scaling factor (None if absent) and the dtype name
    (the cfg's, else W_enc's). ValueError unless the state dict holds exactly those four (+ a scaling factor)."""
    sd = dict(state_dict)
    scale = sd.pop("scaling_factor", None)
    scale = sd.pop("finetuning_scaling_factor", scale)
    needed = {"W_enc", "W_dec", "b_enc", "b_dec"}
    if set(sd) != needed:
        raise ValueError(f"SAELens {arch} SAE must hold exactly {sorted(needed)} (+ scaling_factor), got {sorted(sd)}")
    dtype = _dtype_name(cfg.get("dtype") or sd["W_enc"].dtype)
    W_enc, W_dec, b_enc, b_dec = (sd[k].detach().cpu().to(torch.float64) for k in ("W_enc", "W_dec", "b_enc", "b_dec"))
    return W_enc, W_dec, b_enc, b_dec, scale, dtype


def load_saelens(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None) -> SparseLinearAutoencoder:
    """Load a folder written by SAELens (``cfg.json`` + ``sae_weights.safetensors``) as a saetool SAE.

    See :func:`saelens_to_saetool` for what is converted and refused. ``dtype`` None keeps the cfg's dtype.
    The result's ``cfg["metadata"]["source_path"]`` is ``path``.
    """
    path = Path(path)
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path} is not a SAELens SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE})")
    cfg = json.loads((path / CFG_FILE).read_text())
    weights, sae_cfg = saelens_to_saetool(cfg, load_file(str(path / WEIGHTS_FILE)))
    sae_cfg["metadata"]["source_path"] = str(path)
    if dtype is not None:
        sae_cfg["dtype"] = _dtype_name(dtype)
    torch_dtype = DTYPES[sae_cfg["dtype"]]
    weights = {k: v.to(device=device, dtype=torch_dtype) for k, v in weights.items()}
    sae_cfg["device"] = str(device)
    return SparseLinearAutoencoder(weights, sae_cfg)


# ------------------------------------------------------------------------------------------------------------------
# The original tool's pickles
# ------------------------------------------------------------------------------------------------------------------


class _LegacyDict:
    """Stand-in for an original ``LearnedDict`` subclass: unpickling only fills ``__dict__``."""

    legacy_name = "LearnedDict"

    def __repr__(self) -> str:
        return f"<legacy {self.legacy_name}: {sorted(self.__dict__)}>"


class LegacyTiedSAE(_LegacyDict):
    legacy_name = "TiedSAE"


class LegacyUntiedSAE(_LegacyDict):
    legacy_name = "UntiedSAE"


class LegacyTopKLearnedDict(_LegacyDict):
    legacy_name = "TopKLearnedDict"


_LEGACY_CLASSES = {
    ("autoencoders.learned_dict", "TiedSAE"): LegacyTiedSAE,
    ("autoencoders.learned_dict", "UntiedSAE"): LegacyUntiedSAE,
    ("autoencoders.learned_dict", "TopKLearnedDict"): LegacyTopKLearnedDict,
    ("autoencoders.topk_encoder", "TopKLearnedDict"): LegacyTopKLearnedDict,
}
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves the original class names to stand-ins; allows only tensor rebuilding and plain containers."""

    def find_class(self, module: str, name: str):
        if (module, name) in _LEGACY_CLASSES:
            return _LEGACY_CLASSES[(module, name)]
        if module.startswith("autoencoders"):
            raise pickle.UnpicklingError(
                f"{module}.{name} is not supported (saetool reads TiedSAE, UntiedSAE and TopKLearnedDict)")
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module.startswith("numpy") and name.startswith(("Float", "Int", "UInt", "Bool")) and name.endswith("DType"):
            return super().find_class(module, name)  # numpy >= 1.25 dtype classes of pickled numpy scalars
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a legacy learned_dicts file")


_legacy_pickle = types.ModuleType("saetool_legacy_pickle")
_legacy_pickle.Unpickler = _RestrictedUnpickler
_legacy_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
_legacy_pickle.__dict__["UnpicklingError"] = pickle.UnpicklingError


def _unit_rows64(w: torch.Tensor) -> torch.Tensor:
    """The original's ``w / clamp(||w_i||_2, 1e-8)`` per row."""
    return w / torch.linalg.vector_norm(w, dim=-1).clamp(min=1e-8)[:, None]


def legacy_to_saetool(learned_dict, hyperparams: dict | None = None, hook_name: str | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """Convert one original learned dictionary to saetool ``(weights, cfg)`` computing the same ``predict``.

    The original (shared/reference/original-code.md 2.2, 2.5, 2.7) computes, with ``normalize`` = row-wise
    ``w / clamp(||w||, 1e-8)``:

    * ``TiedSAE(encoder E_raw [n, d], encoder_bias b [n], center_trans t [d], center_rot R [d, d], center_scale s
      [d], norm_encoder)``: ``D = normalize(E_raw)``, ``E = D`` if norm_encoder else ``E_raw``;
      ``center(x) = ((x - t) R^T) * s``, ``c = relu(center(x) E^T + b)``, ``uncenter(y) = (y / s) R + t``,
      ``predict(x) = uncenter(c D)``. Missing centring attributes (old pickles) default to t = 0, R = I, s = 1
      (the original ``initialize_missing``).
      -> ``W_enc = R^T diag(s) E^T``, ``b_enc = b``, ``b_dec = t``, ``W_dec = D diag(1/s) R``. So saetool's
      ``encode(x)`` is the original ``encode(center(x))`` and ``sae(x)`` its ``predict(x)``.
    * ``UntiedSAE(encoder E [n, d], decoder [n, d], encoder_bias b)``: ``c = relu(x E^T + b)`` (raw encoder),
      ``predict(x) = c normalize(decoder)`` -> ``W_enc = E^T``, ``b_enc = b``, ``W_dec = normalize(decoder)``,
      ``b_dec = 0``.
    * ``TopKLearnedDict(dict N [n, d] already normalised, sparsity k)``: ``c = relu(topk_k(x N^T))``,
      ``predict(x) = c N`` -> topk with ``W_enc = N^T``, ``W_dec = N``, zero biases, ``k``.

    Products are taken in float64 and cast to the dictionary's dtype. ``hyperparams`` (the pair's dict, e.g.
    ``{"dict_size": 2048, "l1_alpha": 1e-3}``) gives ``l1_coefficient = l1_alpha`` (NaN if absent) and is kept in
    ``cfg["metadata"]["legacy_hyperparams"]``.
    """
    hyperparams = dict(hyperparams or {})
    a = learned_dict.__dict__
    if isinstance(learned_dict, LegacyTopKLearnedDict):
        weights, dtype, arch, hyper = _legacy_topk(a, hyperparams)
    elif isinstance(learned_dict, (LegacyTiedSAE, LegacyUntiedSAE)):
        weights, dtype, arch, hyper = _legacy_sae(learned_dict, hyperparams)
    else:
        raise TypeError(f"unsupported legacy dictionary {learned_dict!r}")
    n, d = (a["dict"] if arch == "topk" else a["encoder"]).shape  # the dictionary's [d_sae, d_in]
    weights = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    tied = arch == "standard" and torch.equal(weights["W_enc"], weights["W_dec"].T)
    cfg = {
        "architecture": arch, "d_in": d, "d_sae": n, "dtype": _dtype_name(dtype), "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "hook_name": hook_name, **hyper, "tied": tied,
        "metadata": {"source": f"sparse_coding {learned_dict.legacy_name}",
                     "legacy_hyperparams": {k: (v.item() if isinstance(v, torch.Tensor) else v)
                                            for k, v in hyperparams.items()}},
    }
    return weights, cfg


def _legacy_topk(a: dict, hyperparams: dict) -> tuple[dict[str, torch.Tensor], torch.dtype, str, dict]:
    """A TopKLearnedDict's float64 weights (W_enc = N^T, W_dec = N, zero biases), its dtype, "topk" and {"k": k}."""
    N = a["dict"].detach().cpu()
    dtype = N.dtype
    N = N.to(torch.float64)
    n, d = N.shape
    k = a.get("sparsity", hyperparams.get("sparsity"))
    k = int(k.item() if isinstance(k, torch.Tensor) else k)
    weights = {"W_enc": N.T, "W_dec": N, "b_enc": torch.zeros(n, dtype=torch.float64),
               "b_dec": torch.zeros(d, dtype=torch.float64)}
    return weights, dtype, "topk", {"k": k}


def _legacy_sae(learned_dict, hyperparams: dict) -> tuple[dict[str, torch.Tensor], torch.dtype, str, dict]:
    """A TiedSAE's or UntiedSAE's float64 weights (see `legacy_to_saetool`), its dtype, "standard" and
    {"l1_coefficient": l1_alpha or NaN}."""
    a = learned_dict.__dict__
    E_raw = a["encoder"].detach().cpu()
    dtype = E_raw.dtype
    E_raw = E_raw.to(torch.float64)
    d = E_raw.shape[1]
    b = a["encoder_bias"].detach().cpu().to(torch.float64)
    if isinstance(learned_dict, LegacyUntiedSAE):
        D = _unit_rows64(a["decoder"].detach().cpu().to(torch.float64))
        weights = {"W_enc": E_raw.T, "W_dec": D, "b_enc": b, "b_dec": torch.zeros(d, dtype=torch.float64)}
    else:
        weights = _legacy_tied_weights(a, E_raw, b)
    l1 = hyperparams.get("l1_alpha", a.get("l1_alpha"))
    return weights, dtype, "standard", {"l1_coefficient": float("nan") if l1 is None else float(l1)}


def _legacy_tied_weights(a: dict, E_raw: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """A TiedSAE's centring folded into float64 weights: W_enc = R^T diag(s) E^T, W_dec = D diag(1/s) R, b_enc = b,
    b_dec = t; missing centring attributes default to t = 0, R = I, s = 1."""
    d = E_raw.shape[1]
    t = a.get("center_trans")
    R = a.get("center_rot")
    s = a.get("center_scale")
    t = torch.zeros(d, dtype=torch.float64) if t is None else t.detach().cpu().to(torch.float64)
    R = torch.eye(d, dtype=torch.float64) if R is None else R.detach().cpu().to(torch.float64)
    s = torch.ones(d, dtype=torch.float64) if s is None else s.detach().cpu().to(torch.float64)
    D = _unit_rows64(E_raw)
    E = D if a.get("norm_encoder", True) else E_raw
    return {"W_enc": R.T @ (s[:, None] * E.T), "W_dec": (D / s) @ R, "b_enc": b, "b_dec": t}


def load_legacy(path: str | os.PathLike, hook_name: str | None = None, device: str | torch.device = "cpu"
                ) -> list[tuple[SparseLinearAutoencoder, dict]]:
    """Load an original ``learned_dicts_epoch_*.pt`` (or big_sweep ``learned_dicts.pt``) file.

    Args:
        path: the file (a ``torch.save``d list of ``(learned_dict, hyperparams)`` pairs).
        hook_name: the TransformerLens hook the dictionaries were trained on (the file does not record it), stored
            in each cfg so the SAEs can be spliced in; None leaves it unset.
        device: where the converted tensors go.

    Returns:
        ``[(sae, hyperparams), ...]`` in file order; ``sae`` reproduces the original ``predict`` (see
        :func:`legacy_to_saetool`; ``cfg["metadata"]["source_path"]`` is ``path``).

    Raises:
        ValueError: not such a file, or an unsupported dictionary class (the message names it).
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=_legacy_pickle, weights_only=False)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: {e}") from None
    if isinstance(obj, tuple):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in obj):
        raise ValueError(f"{path} does not hold a list of (learned_dict, hyperparams) pairs")
    out = []
    for learned_dict, hyperparams in obj:
        weights, cfg = legacy_to_saetool(learned_dict, hyperparams, hook_name)
        cfg["metadata"]["source_path"] = str(path)
        cfg["device"] = str(device)
        out.append((SparseLinearAutoencoder({k: v.to(device) for k, v in weights.items()}, cfg), dict(hyperparams)))
    return out
