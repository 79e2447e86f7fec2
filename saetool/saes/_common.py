"""Shared pieces of the architectures: broadcasting helpers, the affine encoder/decoder, the batch top-k.

Weights `w` come in two layouts, and every function here works for both:
  - a stack of n_members SAEs: W_enc [N, d_in, d_sae], W_dec [N, d_sae, d_in], vectors [N, 1, n] (a singleton
    row axis so they broadcast against [N, batch, n]); x [batch, d_in]; per-member hyperparameters [N];
  - one SAE: W_enc [d_in, d_sae], W_dec [d_sae, d_in], vectors [n]; x [..., d_in]; hyperparameters 0-d.
"""

from __future__ import annotations

import torch


def per_member(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a hyperparameter ([N] or 0-d) to broadcast against `like` ([N, ..., n] or [..., n])."""
    if value.dim() == 0:
        return value
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


def center(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x - b_dec: [N, batch, d_in] for a stack, [..., d_in] for one SAE."""
    return x - w["b_dec"]


def affine_pre(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The encoder pre-activations (x - b_dec) W_enc + b_enc: [N, batch, d_sae] or [..., d_sae]."""
    return center(w, x) @ w["W_enc"] + w["b_enc"]


def decode(w: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    """x_hat = f W_dec + b_dec: [N, batch, d_in] or [..., d_in]."""
    return f.to(w["W_dec"].dtype) @ w["W_dec"] + w["b_dec"]


def mse_per_token(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction error averaged over dimensions, per token: [N, batch] (or [...])."""
    return (x_hat - x).pow(2).mean(-1)


def batch_topk(acts: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """BatchTopK (Bussmann et al. 2024): keep the k * batch largest entries of acts over the whole batch.

    acts [N, batch, d_sae] (non-negative, e.g. ReLU(pre)), k [N] (each member its own k; a 0-d k with acts
    [batch, d_sae] for one SAE). Returns a tensor like `acts` with at most k * batch non-zeros per member.
    The top max(k) * batch values are found once per member (sorted) and member m keeps its first k_m * batch.
    """
    single = acts.dim() == 2
    if single:
        acts, k = acts.unsqueeze(0), k.reshape(1)
    n, batch, d_sae = acts.shape
    keep_n = k.to(torch.long) * batch
    flat = acts.reshape(n, batch * d_sae)
    values, indices = flat.topk(int(min(keep_n.max(), batch * d_sae)), dim=-1, sorted=True)
    keep = torch.arange(values.shape[-1], device=acts.device) < keep_n.unsqueeze(-1)
    out = torch.zeros_like(flat).scatter(-1, indices, values * keep).reshape(n, batch, d_sae)
    return out[0] if single else out


def jump(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Inference JumpReLU pre * 1[pre > threshold] (threshold broadcasts against pre; no gradient tricks)."""
    return pre * (pre > threshold)
