"""Training recipes as small pure functions: schedules, activation normalisation, b_dec initialisation, AuxK,
decoder-norm-weighted L1, per-member gradient clipping and dead-latent tracking.

Every function works on the stacked ensemble layout (leading member axis, see saetool.ensemble) and keeps
members independent: what one member gets never depends on another (so the ensemble still equals N separate
trainings).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


# ---- schedules ------------------------------------------------------------------------------------------------

def lr_multiplier(step: int, warmup_steps: int = 0, total_steps: int | None = None, decay_steps: int = 0,
                  restarts: Iterable[int] = ()) -> float:
    """The learning-rate multiplier in [0, 1] at optimiser step `step` (0-based).

    Linear warm-up over `warmup_steps`, restarted at every step in `restarts` (e.g. after each neuron resampling,
    as Bricken et al. 2023 / dictionary_learning), times a linear decay to 0 over the last `decay_steps` of
    `total_steps`:
        warm(s)  = min(1, (s - r) / warmup_steps)      r = the last restart <= s (0 if none)
        decay(s) = min(1, (total_steps - s) / decay_steps)
    Case T4: warmup 10, restarts every 100 steps: steps 0, 5, 10, 100, 105, 110 -> 0, 0.5, 1, 0, 0.5, 1.
    """
    since = step - max([0, *[r for r in restarts if r <= step]])
    warm = 1.0 if warmup_steps <= 0 else min(1.0, since / warmup_steps)
    decay = 1.0
    if decay_steps > 0 and total_steps is not None:
        decay = max(0.0, min(1.0, (total_steps - step) / decay_steps))
    return warm * decay


def coefficient_multiplier(step: int, warmup_steps: int = 0) -> float:
    """Sparsity-coefficient warm-up (SAELens l1_warm_up_steps, dictionary_learning sparsity_warmup_steps):
    min(1, step / warmup_steps), 1 without warm-up. Multiply l1_coefficient / l0_coefficient by it."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


# ---- activation normalisation ------------------------------------------------------------------------------

def normalization_factor(sample: torch.Tensor) -> float:
    """SAELens "expected_average_only_in" (Anthropic, April 2024): the scalar s with mean_b ||s x_b|| = sqrt(d_in),
    s = sqrt(d_in) / mean_b ||x_b||, estimated on sample [n, d_in] (in float64).

    Case T5: 1000 rows, row 0 = [100, 0], the rest [1, 0]: s = sqrt(2) / 1.099 = 1.287.
    """
    x = sample.to(torch.float64)
    return float(math.sqrt(x.shape[-1]) / x.norm(dim=-1).mean())


def fold_normalization(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold the input scale s into the weights of an SAE trained on s x, so the result reads raw x.

    With W_enc' = s W_enc, b_dec' = b_dec / s, W_dec' = W_dec / s (everything else unchanged: b_enc, threshold,
    Gated's b_gate, b_mag, r_mag):
        (x - b_dec') W_enc' = (s x - b_dec) W_enc            the latents are those of s x, unchanged
        f W_dec' + b_dec'   = (f W_dec + b_dec) / s          the reconstruction is unscaled
    i.e. sae'(x) = sae(s x) / s (case L2). Works for one SAE or a stack (member axis first). Returns new tensors.
    """
    out = dict(weights)
    out["W_enc"] = weights["W_enc"] * scale
    out["W_dec"] = weights["W_dec"] / scale
    out["b_dec"] = weights["b_dec"] / scale
    return out


# ---- initialisation -------------------------------------------------------------------------------------------

def geometric_median(x: torch.Tensor, max_iter: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """argmin_m sum_b ||x_b - m|| of x [n, d] by Weiszfeld's iteration (the b_dec init of Bricken et al. 2023 and
    openai/sparse_autoencoder): m <- sum_b x_b / ||x_b - m|| / sum_b 1 / ||x_b - m||, from the mean, in float64.
    Returns [d] in x's dtype."""
    X = x.to(torch.float64)
    m = X.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (X - m).norm(dim=-1).clamp_min(1e-12)
        new = (w[:, None] * X).sum(0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, float(m.norm())):
            m = new
            break
        m = new
    return m.to(x.dtype)


# ---- losses ---------------------------------------------------------------------------------------------------

def auxk_loss(pre: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor, W_dec: torch.Tensor, k_aux: int
              ) -> torch.Tensor:
    """AuxK (Gao et al. 2024, arXiv:2406.04093, section A.2): reconstruct the main reconstruction's error with the
    k_aux largest pre-activations among DEAD latents, so they get gradient again.

        e      = x - x_hat (detached)                                   residual [N, B, d_in]
        z      = TopK_{k_aux}(ReLU(pre) on dead latents, 0 elsewhere)   [N, B, d_sae]
        L_aux  = sum_{b,j} (z W_dec - e)^2 / sum_{b,j} (e - mean_b e)^2  per member [N]

    (normalised MSE as openai/sparse_autoencoder; no b_dec in the auxiliary reconstruction, SAELens #644). Add
    alpha * L_aux (alpha = 1/32 in the paper) to the loss. dead [N, d_sae] bool; members with no dead latent get 0.
    """
    masked = torch.where(dead.unsqueeze(1), torch.relu(pre), torch.zeros_like(pre))
    k = min(k_aux, pre.shape[-1])
    values, indices = masked.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    e = residual.detach()
    num = (z @ W_dec - e).pow(2).sum((-2, -1))
    den = (e - e.mean(-2, keepdim=True)).pow(2).sum((-2, -1)).clamp_min(1e-12)
    return torch.where(dead.any(-1), num / den, torch.zeros_like(num))


def decoder_weighted_l1(f: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """The April 2024 (Anthropic) L1: sum_i |f_i| ||W_dec[i]||, per token. f [N, B, d_sae], W_dec [N, d_sae, d_in]
    -> [N, B] (also for one SAE: f [B, d_sae], W_dec [d_sae, d_in] -> [B]). Equals the plain L1 while atoms are
    unit norm; the recipe drops that constraint and lets this term control the atoms' norms instead."""
    return (f.abs() * W_dec.norm(dim=-1).unsqueeze(-2)).sum(-1)


# ---- gradient clipping ------------------------------------------------------------------------------------------

@torch.no_grad()
def clip_grad_norm_per_member(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each member's gradient to L2 norm <= max_norm, the norm taken over all of that member's tensors (the
    leading axis of every parameter is the member axis): the same as torch.nn.utils.clip_grad_norm_ on each member
    trained alone. Returns the norms before clipping [n_members]."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.flatten(1).pow(2).sum(-1) for g in grads]).sum(0).sqrt()
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view(-1, *([1] * (g.dim() - 1))))
    return norms


# ---- dead latents ---------------------------------------------------------------------------------------------

class DeadLatentTracker:
    """Tokens since each latent last fired, per member: dead = not fired in the last `window` tokens (OpenAI: 10M).

    update(f) with f [N, B, d_sae] after each training batch; `dead` [N, d_sae] bool.
    """

    def __init__(self, n_members: int, d_sae: int, window: int, device: str | torch.device = "cpu"):
        self.window = window
        self.since = torch.zeros(n_members, d_sae, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, f: torch.Tensor) -> None:
        fired = (f != 0).any(-2)
        self.since = torch.where(fired, torch.zeros_like(self.since), self.since + f.shape[-2])

    @property
    def dead(self) -> torch.Tensor:
        return self.since >= self.window
