"""``saetool export sparsify OUTPUT_DIR``: every TopK member in EleutherAI sparsify's folder layout, which delphi
(auto-interpretability) and ``sparsify.SparseCoder.load_from_disk`` / ``load_many`` read.

Layout: ``<export_dir>/<member folder name>/<hookpoint>/cfg.json`` + ``sae.safetensors``, where

* ``cfg.json`` holds sparsify's ``SparseCoderConfig`` fields plus ``d_in``: ``activation`` "topk",
  ``expansion_factor`` (d_sae // d_in), ``normalize_decoder`` true, ``num_latents`` d_sae, ``k``, ``multi_topk``
  false, ``skip_connection`` false, ``transcode`` false, ``d_in``;
* ``sae.safetensors`` holds ``encoder.weight`` [d_sae, d_in] (= W_enc^T), ``encoder.bias`` [d_sae], ``W_dec``
  [d_sae, d_in] and ``b_dec`` [d_in] in the member's dtype.

sparsify encodes ``top-k(ReLU((x - b_dec) encoder.weight^T + encoder.bias))`` and decodes ``f W_dec + b_dec``
(sparsify/sparse_coder.py, fused_encoder.py), which is saetool's TopK SAE exactly; a SAELens-style member with
``apply_b_dec_to_input`` false or ``rescale_acts_by_decoder_norm`` true is folded into that form in float64 (as
:mod:`saetool.saved.interop` does). Other architectures are refused: sparsify's coders are TopK only (a BatchTopK member
infers with a JumpReLU threshold, which sparsify cannot express).

The hookpoint is sparsify's module name: ``blocks.L.hook_resid_post`` -> ``layers.L`` (the output of decoder layer
L), ``blocks.L.hook_mlp_out`` -> ``layers.L.mlp``, ``blocks.L.hook_attn_out`` -> ``layers.L.self_attn`` (Llama-style
names, as SmolLM2); other hooks or other module names need ``--hookpoint``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from saetool.config import SparsifyConfig
from saetool.saved import DTYPES, finish_export, load_sae, single_hook_index, start_export

__all__ = ["SparsifyConfig", "export_sparsify", "sparsify_hookpoint", "sparsify_weights"]

_HOOKPOINTS = {"hook_resid_post": "layers.{}", "hook_mlp_out": "layers.{}.mlp", "hook_attn_out": "layers.{}.self_attn"}




def sparsify_hookpoint(hook_name: str | None) -> str:
    """sparsify's module name for a TransformerLens hook name (see the module docstring); ValueError if none."""
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)", hook_name or "")
    if m is None or m.group(2) not in _HOOKPOINTS:
        raise ValueError(f"no sparsify hookpoint known for {hook_name!r} (known: blocks.L.{', blocks.L.'.join(_HOOKPOINTS)})"
                         "; pass --hookpoint with sparsify's name of the module whose output the hook records "
                         "(e.g. layers.3 for blocks.3.hook_resid_post)")
    return _HOOKPOINTS[m.group(2)].format(m.group(1))


def sparsify_weights(sae) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, cfg)`` of one TopK SAE in sparsify's form (see the module docstring); ValueError otherwise."""
    if sae.transcoder:
        raise ValueError(f"{sae.cfg.get('architecture')} members cannot be exported to sparsify yet: saetool writes "
                         "SAEs only (sparsify's transcode / skip_connection layout is not supported)")
    if sae.arch.NAME != "topk" or sae.cfg["architecture"] != "topk":
        raise ValueError(f"architecture {sae.cfg['architecture']} cannot be exported to sparsify: its coders are "
                         "TopK only (train with --architecture topk)")
    W_enc, W_dec, b_enc, b_dec = (getattr(sae, n).detach().cpu().to(torch.float64) for n in
                                  ("W_enc", "W_dec", "b_enc", "b_dec"))
    if not sae.apply_b_dec_to_input:  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        b_enc = b_enc + b_dec @ W_enc
    if sae.rescale_acts_by_decoder_norm:  # top-k of pre * n, decode (f / n) W_dec
        n = torch.linalg.vector_norm(W_dec, dim=-1)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    dtype = DTYPES[str(sae.W_enc.dtype).removeprefix("torch.")]
    tensors = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    d_in, d_sae = sae.d_in, sae.d_sae
    cfg = {"activation": "topk", "expansion_factor": max(1, d_sae // d_in), "normalize_decoder": True,
           "num_latents": d_sae, "k": int(sae.cfg["k"]), "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": d_in}
    return tensors, cfg


def export_sparsify(cfg: SparsifyConfig, log=print) -> Path:
    """Write every member of the sweep ``cfg.output_dir`` in sparsify's layout; returns the export folder.

    Raises ValueError (one line, before anything is written) for a sweep that is not finished, a member that is not
    TopK, or a hook without a known hookpoint and no ``--hookpoint``.
    """
    out_dir = Path(cfg.output_dir)
    index = single_hook_index(out_dir, "saetool export sparsify")
    saes = [(Path(e["path"]).name, load_sae(out_dir / e["path"], device="cpu")) for e in index["members"]]
    hook = saes[0][1].cfg.get("hook_name") or index.get("store", {}).get("hook_name")
    converted = [(name, *sparsify_weights(sae)) for name, sae in saes]
    hookpoint = cfg.hookpoint or sparsify_hookpoint(hook)
    final = Path(cfg.export_dir) if cfg.export_dir else out_dir / "export" / "sparsify"
    tmp = start_export(final, out_dir, index)
    for name, tensors, sp_cfg in converted:
        folder = tmp / name / hookpoint
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps(sp_cfg, indent=2) + "\n")
    finish_export(tmp, final)
    log(f"export: {len(converted)} sparsify coders ({hookpoint}) in {final}")
    return final
