"""The Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders", arXiv:2503.17547): nested dictionaries whose prefixes each reconstruct x.

With prefix sizes m_1 < m_2 < ... < m_G = d_sae (`matryoshka_widths`) and f the BatchTopK latents [B, d_sae]
(saetool.saes.batchtopk: the k*B largest ReLU(pre) of the batch):

    x_hat_g = f[:, :m_g] W_dec[:m_g] + b_dec                       reconstruction by the first m_g latents
    loss    = sum_{g=1..G} mean_{b,j} (x_hat_g - x)^2              summed over the prefix sizes
    x_hat   = x_hat_G                                              (the full dictionary; what evaluation uses)

so early latents must carry general features on their own. At inference the batch top-k is replaced by the
learned threshold theta (a JumpReLU, as BatchTopK); the SAE is saved as architecture "matryoshka_batchtopk"
(W_enc, W_dec, b_enc, b_dec, threshold [d_sae]) with `matryoshka_widths` in cfg.json. Per-member
hyperparameter: `k`; `matryoshka_widths` is shared by the ensemble (default d_sae/8, d_sae/4, d_sae/2, d_sae).
"""

from __future__ import annotations

import itertools

import torch

from saetool.saes import batchtopk
from saetool.saes._common import decode, mse_per_token

NAME = "matryoshka_batchtopk"
SWEEP_PARAM = "k"
# The sweep flags that act on this architecture beyond the common ones (SweepConfig refuses them elsewhere),
# and whether the fused kernel (saetool.ensemble.fused) trains it.
FLAGS = ("k_values", "auxk_coefficient", "threshold_lr", "matryoshka_widths", "resample_every",
         "target_hook")
FUSED = False
HYPERPARAMS = ("k",)
HYPERPARAM_DEFAULTS: dict = {}
INFERENCE_ARCHITECTURE = NAME
WEIGHTS = batchtopk.WEIGHTS
init_extra = batchtopk.init_extra
inference_weights = batchtopk.inference_weights
encode = batchtopk.encode
update_buffers = batchtopk.update_buffers


def default_options(d_sae: int) -> dict:
    """{"matryoshka_widths": [d_sae/8, d_sae/4, d_sae/2, d_sae]} (rounded down, at least 1, deduplicated) and
    BatchTopK's threshold_lr."""
    widths = sorted({max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2), d_sae})
    return {"matryoshka_widths": widths, **batchtopk.default_options(d_sae)}


def check_options(options: dict, d_sae: int) -> None:
    batchtopk.check_options(options, d_sae)
    widths = options["matryoshka_widths"]
    if not (widths and all(a < b for a, b in itertools.pairwise(widths)) and widths[0] >= 1 and widths[-1] == d_sae):
        raise ValueError(f"matryoshka_widths must increase strictly from >= 1 to d_sae={d_sae}, got {widths}")


def loss_terms(w: dict[str, torch.Tensor], x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, pre: torch.Tensor,
               hp: dict, x_in: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-token terms [N, batch]: mse = sum over prefixes g of mean_j (x_hat_g - x)^2 (x_hat_G = x_hat)."""
    total = mse_per_token(x_hat, x)
    for m in hp["matryoshka_widths"][:-1]:
        prefix = f[..., :m] @ w["W_dec"][..., :m, :] + w["b_dec"]
        total = total + mse_per_token(prefix, x)
    return {"mse": total}


__all__ = ["decode", "encode", "inference_weights", "init_extra", "loss_terms", "update_buffers"]
