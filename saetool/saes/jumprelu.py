"""The JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders", arXiv:2407.14435), trained with straight-through estimators and an L0 penalty.

    pre   = (x - b_dec) W_enc + b_enc                          [..., d_sae]
    f     = JumpReLU_theta(pre) = pre * H(pre - theta)          one threshold theta_i >= 0 per latent [d_sae]
    x_hat = f W_dec + b_dec
    loss  = mean_{b,j} (x_hat - x)^2 + l0_coefficient * mean_b sum_i H(pre_i - theta_i)

H is the Heaviside step, whose derivative is zero almost everywhere; the paper's pseudo-derivatives (eq. 11, 12)
with a rectangle kernel K(u) = 1[|u| < 1/2] of width eps give theta a gradient:

    d JumpReLU_theta(z) / d theta := -(theta / eps) K((z - theta) / eps)      d JumpReLU / d z = H(z - theta)
    d H(z - theta) / d theta      := -(1 / eps) K((z - theta) / eps)          d H / d z = 0

The threshold's parameterisation (the fix of issue 13 item 7; SAELens made the same move in 6.48, issues
#718/#719). Both the kernel width and the threshold's parameter are tied to the scale of the data, because a
JumpReLU trained on raw activations (per-element RMS ~4 in a small LM's residual stream) with the paper's
constants for unit-scale inputs did not learn at all:

  - bandwidth is RELATIVE: eps = bandwidth * sigma_batch, sigma_batch = the per-element RMS of the batch's
    centred inputs x - b_dec (per member, detached; over the global batch under data-parallel ranks). With an
    absolute eps = 0.001 on inputs of scale ~4, ~1e-4 of the pre-activations fell in a latent's window: most
    steps gave theta no gradient at all. Default 0.05 (SAELens' default on unit-scale inputs).
  - theta is trained LINEARLY, as `theta_units` [n_members, d_sae] in units of the buffer `threshold_unit`
    [n_members]: theta = max(theta_units, 0) * threshold_unit. Adam moves a parameter by at most ~lr a step
    whatever its gradient's size, so the unit sets how fast theta can move: a log parameterisation (the old
    `log_threshold`) moves theta by ~0.1% a step (lr 1e-3), i.e. from 0.001 to 0.00125 in a 200-step run,
    while the loss-preferred thresholds lie at ~0.1..1 sigma. The sweep's setup (`initialise`) sets
    threshold_unit = sigma * sqrt(d_in), sigma = the per-element RMS of the centred training sample (so
    sigma * sqrt(d_in) is the RMS norm of the centred inputs, the bound on |pre| for a unit encoder row): one
    Adam step can then move theta by up to lr * sigma * sqrt(d_in), as fast as one step on a W_enc column can
    move the pre-activations it gates, and a 200-step run can reach any threshold up to a few sigma. (With the
    unit sigma alone theta could travel at most ~0.2 sigma in such a run, too little for L0 to follow the
    coefficient.) An ensemble built directly (no setup) has threshold_unit 1: theta_units is then the
    threshold itself, SAELens' linear parameterisation.
  - positivity: the forward uses max(theta_units, 0) with the gradient passed straight through (SAELens
    projects the parameter instead); a threshold pushed below 0 acts as 0 (the latents that fire are those of
    a ReLU), and at theta = 0 the MSE pseudo-gradient vanishes (it is proportional to theta) while the L0 one
    pushes up, so a negative excursion comes back.

Saved as `threshold` [d_sae] (the SAELens "jumprelu" layout: W_enc, W_dec, b_enc, b_dec, threshold). Per-member
hyperparameters: `l0_coefficient` (the sweep axis) and `bandwidth` (relative, default 0.05). The initial
threshold is `init_threshold` * sigma (`initialise`; default 0.001 sigma, Gemma Scope's 0.001 on unit-scale
inputs).
"""

from __future__ import annotations

import math

import torch

from saetool.saes._common import affine_pre, decode, global_sum, input_centre, mse_per_token, per_member

NAME = "jumprelu"
SWEEP_PARAM = "l0_coefficient"
# The sweep flags that act on this architecture beyond the common ones (SweepConfig refuses them elsewhere),
# and whether the fused kernel (saetool.ensemble.fused) trains it.
FLAGS = ("l1_warmup_steps", "l0_values", "jumprelu_bandwidth", "jumprelu_init_threshold", "target_hook")
FUSED = False
HYPERPARAMS = ("l0_coefficient", "bandwidth")
BANDWIDTH = 0.05
HYPERPARAM_DEFAULTS = {"bandwidth": BANDWIDTH}
INFERENCE_ARCHITECTURE = NAME
WEIGHTS = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_out"), "b_enc": ("d_sae",), "b_dec": ("d_out",),
           "threshold": ("d_sae",)}
INIT_THRESHOLD = 0.001


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to `shape` (the inverse of broadcasting)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    dims = [i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class JumpReLUFunction(torch.autograd.Function):
    """f = pre * H(pre - theta) with d/d pre = H(pre - theta), d/d theta = -(theta/eps) K((pre - theta)/eps)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta, eps)
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta, eps = ctx.saved_tensors
        g_pre = g * (pre > theta)
        g_theta = _sum_to(-g * (theta / eps) * _rectangle((pre - theta) / eps), theta.shape)
        return g_pre, g_theta, None


class StepFunction(torch.autograd.Function):
    """H(pre - theta) with d/d pre = 0, d/d theta = -(1/eps) K((pre - theta)/eps)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta, eps)
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta, eps = ctx.saved_tensors
        g_theta = _sum_to(-g / eps * _rectangle((pre - theta) / eps), theta.shape)
        return None, g_theta, None


def init_extra(n_members: int, d_in: int, d_sae: int, dtype: torch.dtype
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The trained theta_units [n_members, d_sae] = 0.001 and the buffer threshold_unit [n_members] = 1 (the
    sweep's setup rescales both to the data with `initialise`)."""
    return ({"theta_units": torch.full((n_members, d_sae), INIT_THRESHOLD, dtype=dtype)},
            {"threshold_unit": torch.ones(n_members, dtype=dtype)})


def data_scale(sample: torch.Tensor) -> float:
    """sigma: the per-element RMS of the centred rows of `sample` [n, d_in] (the square root of the mean
    per-dimension variance)."""
    sample = sample.double()
    return float((sample - sample.mean(0)).pow(2).mean().sqrt())


@torch.no_grad()
def initialise(t: dict[str, torch.Tensor], init_threshold: float, sample: torch.Tensor) -> float:
    """Tie the threshold to the data (the sweep's setup; `sample` [n, d_in] in the units trained on, e.g. after
    normalisation): threshold_unit = sigma * sqrt(d_in) and every threshold = init_threshold * sigma, sigma =
    data_scale(sample). t: the ensemble's training tensors (views, written in place). Returns sigma."""
    sigma = data_scale(sample)
    unit = sigma * math.sqrt(sample.shape[-1])
    t["threshold_unit"].fill_(unit)
    t["theta_units"].fill_(init_threshold * sigma / unit)
    return sigma


def inference_weights(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training tensors (member axis first) -> the saved layout: threshold = max(theta_units, 0) * threshold_unit
    (differentiable; the max passes the gradient straight through)."""
    theta = t["theta_units"]
    theta = theta + (theta.clamp_min(0) - theta).detach()
    return {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
            "threshold": theta * t["threshold_unit"].unsqueeze(-1)}


def kernel_width(w: dict[str, torch.Tensor], x: torch.Tensor, hp: dict[str, torch.Tensor], like: torch.Tensor
                 ) -> torch.Tensor:
    """eps = bandwidth * sigma_batch, shaped like a hyperparameter against `like`: sigma_batch = the per-element
    RMS of the encoder's input x - b_dec (a transcoder's: x_in itself, saetool.saes._common.center) over the batch (per member for a stack; over the global batch inside
    saetool.saes._common.global_batch), detached, float32. Computed from the sums of x and x^2 (float64), without
    forming x - b_dec for every member."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    b = input_centre(w)
    b = x.new_zeros(1, x.shape[-1]) if b is None else b                      # a transcoder: x_in uncentred
    b = b.detach().double().reshape(-1, x.shape[-1])                          # [N or 1, d_in]
    sumsq = rows.pow(2).sum() - 2 * b @ rows.sum(0) + rows.shape[0] * b.pow(2).sum(-1)
    sums = global_sum(torch.cat([sumsq, sumsq.new_tensor([float(rows.numel())])]))
    sigma = (sums[:-1].clamp_min(0) / sums[-1]).sqrt().float()
    sigma = sigma if w["W_enc"].dim() == 3 else sigma.reshape(())
    bandwidth = hp.get("bandwidth", torch.tensor(BANDWIDTH))
    return per_member(bandwidth.to(sigma) * sigma, like)


def encode(w: dict[str, torch.Tensor], x: torch.Tensor, hp: dict[str, torch.Tensor], training: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, pre), both [N, batch, d_sae] (or [..., d_sae]); in training the gradient reaches theta through the STE."""
    pre = affine_pre(w, x)
    if not training:
        return pre * (pre > w["threshold"]), pre
    return JumpReLUFunction.apply(pre, w["threshold"], kernel_width(w, x, hp, pre)), pre


def loss_terms(w: dict[str, torch.Tensor], x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, pre: torch.Tensor,
               hp: dict[str, torch.Tensor], x_in: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-token terms [N, batch]: mse (mean over dims) and sparsity = l0_coefficient * sum_i H(pre_i - theta_i)."""
    l0 = StepFunction.apply(pre, w["threshold"], kernel_width(w, x if x_in is None else x_in, hp, pre)).sum(-1)
    return {"mse": mse_per_token(x_hat, x), "sparsity": per_member(hp["l0_coefficient"], l0) * l0}


__all__ = ["decode", "encode", "inference_weights", "init_extra", "initialise", "loss_terms"]
