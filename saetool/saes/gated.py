"""The Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders",
arXiv:2404.16014): which latents fire (the gate) is decided apart from how strongly (the magnitude).

    x_c    = x - b_dec                                           [..., d_in]
    pi     = x_c W_enc + b_gate                                  gate pre-activations [..., d_sae]
    W_mag  = W_enc * exp(r_mag)                                  per-latent rescaled encoder (r_mag [d_sae])
    f      = 1[pi > 0] * ReLU(x_c W_mag + b_mag)                  [..., d_sae]
    x_hat  = f W_dec + b_dec
    loss   = mean_{b,j} (x_hat - x)^2                                              reconstruction
           + l1_coefficient * mean_b sum_i ReLU(pi_i)                               sparsity (on the gate)
           + mean_{b,j} (ReLU(pi) sg(W_dec) + sg(b_dec) - x)^2                      auxiliary (frozen decoder)

sg = stop-gradient: the auxiliary loss trains only the gate path to reconstruct x on its own, with a frozen
copy of the decoder (paper eq. 9). The gate's Heaviside passes no gradient, so the L1 and auxiliary terms are
what train W_enc and b_gate. Squared errors are averaged over dimensions as the standard SAE's (saetool's
loss convention). Tensors (SAELens "gated" layout, no b_enc): W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_dec [d_in], b_gate [d_sae], b_mag [d_sae], r_mag [d_sae]; r_mag, b_gate, b_mag start at 0.
"""

from __future__ import annotations

import torch

from saetool.saes._common import center, decode, mse_per_token, per_member

NAME = "gated"
SWEEP_PARAM = "l1_coefficient"
# The sweep flags that act on this architecture beyond the common ones (SweepConfig refuses them elsewhere),
# and whether the fused kernel (saetool.ensemble.fused) trains it.
FLAGS = ("l1_values", "l1_value_min", "l1_value_max", "l1_value_n", "l1_warmup_steps")
FUSED = False
HYPERPARAMS = ("l1_coefficient",)
HYPERPARAM_DEFAULTS: dict = {}
INFERENCE_ARCHITECTURE = NAME
WEIGHTS = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_out"), "b_dec": ("d_out",), "b_gate": ("d_sae",),
           "b_mag": ("d_sae",), "r_mag": ("d_sae",)}


def init_extra(n_members: int, d_in: int, d_sae: int, dtype: torch.dtype
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Extra trainable parameters b_gate, b_mag, r_mag, each zeros [n_members, d_sae]; no buffers."""
    return {name: torch.zeros(n_members, d_sae, dtype=dtype) for name in ("b_gate", "b_mag", "r_mag")}, {}


def inference_weights(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved tensors are the trained ones."""
    return {name: t[name] for name in WEIGHTS}


def encode(w: dict[str, torch.Tensor], x: torch.Tensor, hp: dict[str, torch.Tensor], training: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, pi): latents and gate pre-activations, [N, batch, d_sae] (or [..., d_sae])."""
    x_c = center(w, x)
    pi = x_c @ w["W_enc"] + w["b_gate"]
    mag = torch.relu(x_c @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    return (pi > 0).to(mag.dtype) * mag, pi


def loss_terms(w: dict[str, torch.Tensor], x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, pre: torch.Tensor,
               hp: dict[str, torch.Tensor], x_in: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-token terms [N, batch]: mse, sparsity (L1 of ReLU(pi)), aux (frozen-decoder reconstruction from ReLU(pi))."""
    gate = torch.relu(pre)
    l1 = gate.sum(-1)
    x_gate = gate @ w["W_dec"].detach() + w["b_dec"].detach()
    return {"mse": mse_per_token(x_hat, x), "sparsity": per_member(hp["l1_coefficient"], l1) * l1,
            "aux": mse_per_token(x_gate, x)}


__all__ = ["decode", "encode", "inference_weights", "init_extra", "loss_terms"]
