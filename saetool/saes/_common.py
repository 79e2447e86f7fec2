"""Shared pieces of the architectures: broadcasting helpers, the affine encoder/decoder, the batch top-k.

Weights `w` come in two layouts, and every function here works for both:
  - a stack of n_members SAEs: W_enc [N, d_in, d_sae], W_dec [N, d_sae, d_out], vectors [N, 1, n] (a singleton
    row axis so they broadcast against [N, batch, n]); x [batch, d_in]; per-member hyperparameters [N];
  - one SAE: W_enc [d_in, d_sae], W_dec [d_sae, d_out], vectors [n]; x [..., d_in]; hyperparameters 0-d.
d_out = d_in for an SAE. A transcoder (x_in -> x_out) has b_dec [d_out] and w["apply_b_dec_to_input"] = False: its
encoder reads x_in uncentred (`center`). Its skip term x_in W_skip^T is added by the caller, after `decode`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


def per_member(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a hyperparameter ([N] or 0-d) to broadcast against `like` ([N, ..., n] or [..., n])."""
    if value.dim() == 0:
        return value
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


def input_centre(w: dict) -> torch.Tensor | None:
    """The vector subtracted from the encoder's input: b_dec for an SAE; None for a transcoder, whose b_dec lives in
    the output space (w["apply_b_dec_to_input"] is False: SAELens' transcoder convention, which requires it)."""
    return w["b_dec"] if w.get("apply_b_dec_to_input", True) else None


def center(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x - b_dec: [N, batch, d_in] for a stack, [..., d_in] for one SAE; x itself for a transcoder."""
    b = input_centre(w)
    return x if b is None else x - b


def affine_pre(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The encoder pre-activations (x - b_dec) W_enc + b_enc: [N, batch, d_sae] or [..., d_sae]."""
    return center(w, x) @ w["W_enc"] + w["b_enc"]


def decode(w: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    """x_hat = f W_dec + b_dec: [N, batch, d_out] or [..., d_out]."""
    return f.to(w["W_dec"].dtype) @ w["W_dec"] + w["b_dec"]


def mse_per_token(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction error averaged over dimensions, per token: [N, batch] (or [...])."""
    return (x_hat - x).pow(2).mean(-1)


@dataclass
class GlobalBatch:
    """A batch split across data-parallel ranks: n_total rows in all, `gather` stacks a tensor of every rank
    ([world, ...]). batch_topk records here the smallest activation it kept in the whole batch (kept_min [N])."""

    n_total: int
    gather: object
    kept_min: torch.Tensor | None = field(default=None)


_GLOBAL_BATCH: GlobalBatch | None = None


@contextlib.contextmanager
def global_batch(n_total: int, gather):
    """Within this block, batch_topk selects over the GLOBAL batch of n_total rows spread across ranks (every
    rank must run the same forwards in it), so data-parallel BatchTopK equals one process with the whole batch."""
    global _GLOBAL_BATCH
    previous, _GLOBAL_BATCH = _GLOBAL_BATCH, GlobalBatch(n_total, gather)
    try:
        yield _GLOBAL_BATCH
    finally:
        _GLOBAL_BATCH = previous


def batch_topk(acts: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """BatchTopK (Bussmann et al. 2024): keep the k * batch largest entries of acts over the whole batch.

    acts [N, batch, d_sae] (non-negative, e.g. ReLU(pre)), k [N] (each member its own k; a 0-d k with acts
    [batch, d_sae] for one SAE). Returns a tensor like `acts` with at most k * batch non-zeros per member.
    The top max(k) * batch values are found once per member (sorted) and member m keeps its first k_m * batch.
    Inside `global_batch` (data-parallel ranks), "batch" is the global batch: see _global_batch_topk.
    """
    single = acts.dim() == 2
    if single:
        acts, k = acts.unsqueeze(0), k.reshape(1)
    if _GLOBAL_BATCH is not None:
        out = _global_batch_topk(acts, k, _GLOBAL_BATCH)
        return out[0] if single else out
    n, batch, d_sae = acts.shape
    keep_n = k.to(torch.long) * batch
    flat = acts.reshape(n, batch * d_sae)
    values, indices = flat.topk(int(min(keep_n.max(), batch * d_sae)), dim=-1, sorted=True)
    keep = torch.arange(values.shape[-1], device=acts.device) < keep_n.unsqueeze(-1)
    out = torch.zeros_like(flat).scatter(-1, indices, values * keep).reshape(n, batch, d_sae)
    return out[0] if single else out


@torch.compiler.disable  # a collective: run eagerly inside a compiled step
@torch.no_grad()
def _global_thresholds(acts: torch.Tensor, keep_n: torch.Tensor, group: GlobalBatch) -> torch.Tensor:
    """t [N]: the keep_n[m]-th largest entry of member m's acts over the global batch. Each rank sends its top
    L = min(max keep_n, n_total * d_sae) values (zero-padded: acts >= 0), the ranks' candidates are merged and
    the keep_n-th largest taken; the global top keep_n are among the candidates, so t is exact."""
    n, rows, d_sae = acts.shape
    length = int(min(keep_n.max(), group.n_total * d_sae))
    flat = acts.reshape(n, rows * d_sae)
    local = flat.topk(min(length, flat.shape[-1]), dim=-1, sorted=False).values
    padded = torch.zeros(n, length, dtype=acts.dtype, device=acts.device)
    padded[:, : local.shape[-1]] = local
    merged = group.gather(padded).permute(1, 0, 2).reshape(n, -1)                  # [N, world * L]
    top = merged.topk(length, dim=-1, sorted=True).values                           # [N, L]
    t = top.gather(-1, (keep_n.clamp(1, length) - 1).unsqueeze(-1)).squeeze(-1)
    positive = torch.where(top > 0, top, torch.full_like(top, float("inf")))
    kept = positive.masked_fill(torch.arange(length, device=acts.device) >= keep_n.unsqueeze(-1), float("inf"))
    group.kept_min = kept.amin(-1)                                                  # inf: nothing kept
    return t


def _global_batch_topk(acts: torch.Tensor, k: torch.Tensor, group: GlobalBatch) -> torch.Tensor:
    """Keep the entries of this rank's acts [N, rows, d_sae] that are among member m's k_m * n_total largest of
    the global batch: acts >= t_m and > 0 (see _global_thresholds). Equal to batch_topk on the concatenated batch
    except at exact ties with the k*B-th value (the single-process top-k breaks those arbitrarily)."""
    keep_n = k.to(torch.long) * group.n_total
    t = _global_thresholds(acts, keep_n, group)
    mask = (acts >= t.view(-1, 1, 1)) & (acts > 0)
    return acts * mask


def kept_minimum(f: torch.Tensor) -> torch.Tensor:
    """The smallest non-zero of f [N, batch, d_sae] per member ([N]; inf where f is all zero): over the global batch
    when batch_topk ran inside `global_batch` (every rank gets the same value), else over f."""
    if _GLOBAL_BATCH is not None and _GLOBAL_BATCH.kept_min is not None:
        return _GLOBAL_BATCH.kept_min
    return torch.where(f > 0, f, torch.full_like(f, float("inf"))).flatten(1).amin(-1)


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the data-parallel ranks inside `global_batch` (every rank gets the sum), else t itself. For
    batch statistics that must be those of the global batch (AuxK's normaliser); t carries no gradient."""
    if _GLOBAL_BATCH is None:
        return t
    return _GLOBAL_BATCH.gather(t.detach()).sum(0)


def jump(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Inference JumpReLU pre * 1[pre > threshold] (threshold broadcasts against pre; no gradient tricks)."""
    return pre * (pre > threshold)
