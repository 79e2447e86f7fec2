"""The JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders", arXiv:2407.14435), trained with straight-through estimators and an L0 penalty.

    pre   = (x - b_dec) W_enc + b_enc                          [..., d_sae]
    f     = JumpReLU_theta(pre) = pre * H(pre - theta)          theta = exp(log_threshold) > 0, one per latent [d_sae]
    x_hat = f W_dec + b_dec
    loss  = mean_{b,j} (x_hat - x)^2 + l0_coefficient * mean_b sum_i H(pre_i - theta_i)

H is the Heaviside step, whose derivative is zero almost everywhere; the paper's pseudo-derivatives (eq. 11, 12)
with a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps give theta a gradient:

    d JumpReLU_theta(z) / d theta := -(theta / eps) K((z - theta) / eps)      d JumpReLU / d z = H(z - theta)
    d H(z - theta) / d theta      := -(1 / eps) K((z - theta) / eps)          d H / d z = 0

The threshold is trained as log_threshold (as SAELens, so theta stays positive) and saved as `threshold` [d_sae]
(the SAELens "jumprelu" layout: W_enc, W_dec, b_enc, b_dec, threshold). Per-member hyperparameters:
`l0_coefficient` (the sweep axis) and `bandwidth` eps (default 0.001, the paper's value for inputs of norm ~1
per dimension, e.g. after normalisation to mean norm sqrt(d_in)). theta starts at 0.001 (Gemma Scope).
"""

from __future__ import annotations

import math

import torch

from saetool.saes._common import affine_pre, decode, mse_per_token, per_member

NAME = "jumprelu"
SWEEP_PARAM = "l0_coefficient"
HYPERPARAMS = ("l0_coefficient", "bandwidth")
HYPERPARAM_DEFAULTS = {"bandwidth": 0.001}
INFERENCE_ARCHITECTURE = NAME
WEIGHTS = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",),
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
    """Extra trainable parameters {log_threshold [n_members, d_sae] = log 0.001} and no buffers."""
    return {"log_threshold": torch.full((n_members, d_sae), math.log(INIT_THRESHOLD), dtype=dtype)}, {}


def inference_weights(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training tensors (member axis first) -> the saved layout: threshold = exp(log_threshold) (differentiable)."""
    return {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
            "threshold": t["log_threshold"].exp()}


def encode(w: dict[str, torch.Tensor], x: torch.Tensor, hp: dict[str, torch.Tensor], training: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, pre), both [N, batch, d_sae] (or [..., d_sae]); in training the gradient reaches theta through the STE."""
    pre = affine_pre(w, x)
    if not training:
        return pre * (pre > w["threshold"]), pre
    eps = per_member(hp.get("bandwidth", torch.tensor(HYPERPARAM_DEFAULTS["bandwidth"])), pre).to(pre)
    return JumpReLUFunction.apply(pre, w["threshold"], eps), pre


def loss_terms(w: dict[str, torch.Tensor], x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, pre: torch.Tensor,
               hp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-token terms [N, batch]: mse (mean over dims) and sparsity = l0_coefficient * sum_i H(pre_i - theta_i)."""
    eps = per_member(hp["bandwidth"], pre).to(pre)
    l0 = StepFunction.apply(pre, w["threshold"], eps).sum(-1)
    return {"mse": mse_per_token(x_hat, x), "sparsity": per_member(hp["l0_coefficient"], l0) * l0}


__all__ = ["decode", "encode", "inference_weights", "init_extra", "loss_terms"]
