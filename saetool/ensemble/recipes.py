"""Training recipes as small pure functions: schedules, activation normalisation, b_dec initialisation, AuxK,
decoder-norm-weighted L1, per-member gradient clipping, dead-latent tracking and neuron resampling.

Every function works on the stacked ensemble layout (leading member axis, see saetool.ensemble.stack) and keeps
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

def auxk_loss(pre: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor, W_dec: torch.Tensor, k_aux: int,
              batch_sum=None) -> torch.Tensor:
    """AuxK (Gao et al. 2024, arXiv:2406.04093, section A.2): reconstruct the main reconstruction's error with the
    k_aux largest pre-activations among DEAD latents, so they get gradient again.

        e      = x - x_hat (detached)                                   residual [N, B, d_in]
        z      = TopK_{k_aux}(ReLU(pre) on dead latents, 0 elsewhere)   [N, B, d_sae]
        L_aux  = sum_{b,j} (z W_dec - e)^2 / sum_{b,j} e^2               per member [N]

    The normaliser is the residual's squared norm over the whole batch (about zero, as openai/sparse_autoencoder's
    normalised MSE divides by its target's squared norm): L_aux = 1 when the dead latents reconstruct nothing.
    Unlike the variance about the batch mean (0 for a 1-row batch, which made L_aux ~1e12), it is positive for any
    batch with a non-zero residual, one row included, and it is a sum over rows: `batch_sum` (e.g.
    saetool.saes._common.global_sum) turns this rank's denominator into the global batch's, so the ranks' terms
    num_r / den add up to exactly the one-process value. Clamped at 1e-30 (a residual of exactly zero).
    No b_dec in the auxiliary reconstruction (SAELens #644). Add alpha * L_aux (alpha = 1/32 in the paper) to the
    loss. dead [N, d_sae] bool; members with no dead latent get 0.
    """
    masked = torch.where(dead.unsqueeze(1), torch.relu(pre), torch.zeros_like(pre))
    k = min(k_aux, pre.shape[-1])
    values, indices = masked.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    e = residual.detach()
    num = (z @ W_dec - e).pow(2).sum((-2, -1))
    den = e.pow(2).sum((-2, -1))
    den = (batch_sum(den) if batch_sum is not None else den).clamp_min(1e-30)
    return torch.where(dead.any(-1), num / den, torch.zeros_like(num))


def decoder_weighted_l1(f: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """The April 2024 (Anthropic) L1: sum_i |f_i| ||W_dec[i]||, per token. f [N, B, d_sae], W_dec [N, d_sae, d_in]
    -> [N, B] (also for one SAE: f [B, d_sae], W_dec [d_sae, d_in] -> [B]). Equals the plain L1 while atoms are
    unit norm; the recipe drops that constraint and lets this term control the atoms' norms instead."""
    return (f.abs() * W_dec.norm(dim=-1).unsqueeze(-2)).sum(-1)


# ---- statistics -----------------------------------------------------------------------------------------------

def nonzero_count(f: torch.Tensor) -> torch.Tensor:
    """The non-zero entries of f [n_members, batch, d_sae] per member, float32 [n_members], without an integer copy
    of f (the sum of a bool mask casts it whole to int64: 8 bytes per entry, twice an fp32 f). vector_norm's ord 0
    counts inside the reduction; a bf16 f (whose count would round to bf16) is cast to float32 one member at a time
    (one [batch, d_sae] copy). Equals the int64 count converted to float32 (exactly while it is below 2^24)."""
    if f.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(f, ord=0, dim=(-2, -1)).float()
    return torch.stack([torch.linalg.vector_norm(m, ord=0, dtype=torch.float32) for m in f])


# ---- gradient clipping ------------------------------------------------------------------------------------------

@torch.no_grad()
def clip_grad_norm_per_member(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each member's gradient to L2 norm <= max_norm, the norm taken over all of that member's tensors (the
    leading axis of every parameter is the member axis): the same as torch.nn.utils.clip_grad_norm_ on each member
    trained alone. Returns the norms before clipping [n_members]."""
    grads = [p.grad for p in params if p.grad is not None]
    # per tensor, then over tensors (as torch.nn.utils.clip_grad_norm_): no squared copy of the gradients
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=-1) for g in grads]), dim=0)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view(-1, *([1] * (g.dim() - 1))))
    return norms


# ---- dead latents ---------------------------------------------------------------------------------------------

class DeadLatentTracker:
    """Tokens since each latent last fired, per member: dead = not fired in the last `window` tokens (OpenAI: 10M).

    update(f) with f [N, B, d_sae] after each training batch, or update_fired(fired [N, d_sae] bool, n_tokens)
    (what data-parallel ranks agree on after OR-ing their masks); `dead` [N, d_sae] bool. `since` is the state a
    checkpoint saves.
    """

    def __init__(self, n_members: int, d_sae: int, window: int, device: str | torch.device = "cpu"):
        self.window = window
        self.since = torch.zeros(n_members, d_sae, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, f: torch.Tensor) -> None:
        self.update_fired((f != 0).any(-2), f.shape[-2])

    @torch.no_grad()
    def update_fired(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.since = torch.where(fired, torch.zeros_like(self.since), self.since + n_tokens)

    @property
    def dead(self) -> torch.Tensor:
        return self.since >= self.window


# ---- neuron resampling ----------------------------------------------------------------------------------------

RESAMPLE_ENCODER_SCALE = 0.2


def squared_errors(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||x_hat[m, b] - x_b||^2, float64 [N, B], of reconstructions x_hat [N, B, d] of rows x [B, d]."""
    return (x_hat - x.unsqueeze(0)).pow(2).sum(-1).double()


@torch.no_grad()
def resample_dead_latents(W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, dead: torch.Tensor,
                          x: torch.Tensor, x_hat: torch.Tensor | None, generators: list[torch.Generator],
                          optimizer: torch.optim.Optimizer | None = None, err: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Neuron resampling (Bricken et al. 2023, "Towards Monosemanticity", appendix "Neuron Resampling"), in place.

    For member m, every dead latent i gets an input row x_b drawn with probability proportional to the squared
    reconstruction error ||x_hat[m, b] - x_b||^2 (independent draws, from generators[m]), then
        W_dec[m, i]    = x_b / ||x_b||
        W_enc[m, :, i] = x_b / ||x_b|| * 0.2 * mean_{alive j} ||W_enc[m, :, j]||   (1 if no latent is alive)
        b_enc[m, i]    = 0
    and the optimizer's state for those entries (Adam's exp_avg, exp_avg_sq) is zeroed, so stale moments do not
    push the new latent back. Restart the learning-rate warm-up afterwards (case T4, saetool.ensemble.recipes.lr_multiplier).

    Shapes: W_enc [N, d_in, d_sae], W_dec [N, d_sae, d_in], b_enc [N, d_sae], dead [N, d_sae] bool, x [B, d_in],
    x_hat [N, B, d_in], or instead err [N, B] float64, the squared errors ||x_hat[m, b] - x_b||^2 (x_hat None: a
    caller that encodes the members in groups need not hold every member's x_hat). A tied W_enc (a view of W_dec) is
    set through W_dec only. Returns the number resampled [N].
    """
    tied = W_enc.data_ptr() == W_dec.data_ptr()
    if err is None:
        err = squared_errors(x_hat, x)                                          # [N, B]
    counts = dead.sum(-1)
    for m in range(dead.shape[0]):
        idx = dead[m].nonzero().squeeze(-1)
        if idx.numel() == 0:
            continue
        weights = err[m].cpu() if float(err[m].sum()) > 0 else torch.ones(x.shape[0], dtype=torch.float64)
        rows = torch.multinomial(weights, idx.numel(), replacement=True, generator=generators[m]).to(x.device)
        v = x[rows].to(W_dec.dtype)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)                   # [n_dead, d_in]
        alive = ~dead[m]
        enc_norm = W_enc[m].norm(dim=0)[alive].mean() if alive.any() else W_enc.new_tensor(1.0)
        W_dec[m, idx] = v
        if not tied:
            W_enc[m][:, idx] = (v * RESAMPLE_ENCODER_SCALE * enc_norm).T
        b_enc[m, idx] = 0
        if optimizer is not None:
            for param, where in ((W_dec, (m, idx)), (b_enc, (m, idx))) + (() if tied else ((W_enc, (m, slice(None), idx)),)):
                for key in ("exp_avg", "exp_avg_sq"):
                    state = optimizer.state.get(param, {}).get(key)
                    if state is not None:
                        state[where] = 0
    return counts
