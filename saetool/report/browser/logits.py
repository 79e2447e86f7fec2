"""Logit effects of latents (the tokens a latent's decoder direction promotes and suppresses) and token strings.

The logit effect of latent ``i`` is ``W_dec[i] @ W_U`` (SAEDashboard's logit table, the "direct logit attribution"
of the decoder direction): ``W_U [d_model, d_vocab]`` is the model's unembedding as ``TransformerBridge.W_U`` gives
it, without the final layer norm's scale (HookedTransformer's ``fold_ln`` would fold it in; the bridge keeps the
Hugging Face weights unchanged). It means something only where the SAE's input space is the residual stream
(:data:`RESIDUAL_SUFFIXES`): for ``attn.hook_z`` (per-head values before ``W_O``), ``mlp.hook_post`` (neurons before
``W_out``) and other hooks the decoder direction is not a residual-stream vector and no effect is shown.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import Tensor

__all__ = ["RESIDUAL_SUFFIXES", "logit_effects", "logit_effects_reason", "token_strings"]

RESIDUAL_SUFFIXES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def logit_effects_reason(hook_name: str | None, d_in: int, d_model: int | None) -> str | None:
    """None when logit effects apply to an SAE on ``hook_name`` of width ``d_in``; else why not (one line)."""
    if d_model is None:
        return "no model loaded"
    if not hook_name or not re.fullmatch(r"blocks\.\d+\.(" + "|".join(RESIDUAL_SUFFIXES) + ")", hook_name):
        return (f"{hook_name} is not a residual-stream hook ({', '.join(RESIDUAL_SUFFIXES)}): its decoder directions "
                "are not residual-stream vectors, so W_dec @ W_U has no meaning")
    if d_in != d_model:
        return f"the SAE's d_in {d_in} differs from the model's d_model {d_model}"
    return None


@torch.no_grad()
def logit_effects(W_dec: Tensor, W_U: Tensor, k: int = 10, chunk: int = 512) -> dict[str, np.ndarray]:
    """Top and bottom ``k`` entries of ``W_dec @ W_U`` per latent.

    Args:
        W_dec: ``[n_latents, d_model]`` decoder rows; W_U: ``[d_model, d_vocab]``. Computed in float32 on W_U's
            device, ``chunk`` latents at a time (memory ``chunk * d_vocab`` floats).

    Returns:
        ``top_values``/``bottom_values`` float32 ``[n_latents, k]`` (largest first / most negative first) and
        ``top_ids``/``bottom_ids`` int64 ``[n_latents, k]`` token ids.
    """
    W_U = W_U.detach().float()
    k = min(int(k), W_U.shape[1])
    out = {n: [] for n in ("top_values", "top_ids", "bottom_values", "bottom_ids")}
    for start in range(0, W_dec.shape[0], chunk):
        effect = W_dec[start:start + chunk].detach().to(W_U.device, torch.float32) @ W_U
        top, bottom = effect.topk(k, dim=1), effect.topk(k, dim=1, largest=False)
        out["top_values"].append(top.values.cpu())
        out["top_ids"].append(top.indices.cpu())
        out["bottom_values"].append(bottom.values.cpu())
        out["bottom_ids"].append(bottom.indices.cpu())
    return {n: torch.cat(v).numpy() if v else np.zeros((0, k)) for n, v in out.items()}


def token_strings(tokenizer, ids) -> dict[int, str]:
    """``{id: text}`` for each distinct id: the tokenizer's decoding of that single token (so " the" keeps its
    space), special tokens (BOS, EOS, pad, ...) as their names, e.g. ``<|endoftext|>``. Without a tokenizer every
    id shows as ``#<id>``."""
    ids = sorted({int(i) for i in np.asarray(ids).reshape(-1) if int(i) >= 0})
    if tokenizer is None:
        return {i: f"#{i}" for i in ids}
    return {i: tokenizer.decode([i]) for i in ids}
