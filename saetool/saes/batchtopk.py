"""The BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv:2412.06410).

Training (a batch X [B, d_in]):
    pre   = (X - b_dec) W_enc + b_enc                              [B, d_sae]
    f     = BatchTopK_{k B}(ReLU(pre))      keep the k*B largest activations of the WHOLE batch, zero the rest
    x_hat = f W_dec + b_dec
    loss  = mean_{b,j} (x_hat - x)^2                               (L0 = k on average over the batch)

Inference (one token at a time; the paper's section 3): a global threshold theta replaces the batch top-k,
    f = pre * 1[pre > theta]                                       i.e. a JumpReLU with theta for every latent,
where theta is a running estimate of the smallest kept activation: after each training step,
    theta <- min_{kept} f       on the first step,   theta <- (1 - r) theta + r min_{kept} f   afterwards
with r = the `threshold_lr` option (default 0.01 as SAELens' topk_threshold_lr; dictionary_learning uses 0.001,
whose estimate stays close to the first batches' for runs of a few hundred steps); theta is a buffer [n_members],
-1 = not yet set. The SAE is saved for
inference as architecture "jumprelu" (W_enc, W_dec, b_enc, b_dec, threshold = theta repeated [d_sae]), as
SAELens does. Per-member hyperparameter: `k`.
"""

from __future__ import annotations

import torch

from saetool.saes._common import affine_pre, batch_topk, decode, jump, kept_minimum, mse_per_token

NAME = "batchtopk"
SWEEP_PARAM = "k"
# The sweep flags that act on this architecture beyond the common ones (SweepConfig refuses them elsewhere),
# and whether the fused kernel (saetool.ensemble.fused) trains it.
FLAGS = ("k_values", "auxk_coefficient", "threshold_lr", "resample_every", "target_hook")
FUSED = False
HYPERPARAMS = ("k",)
HYPERPARAM_DEFAULTS: dict = {}
INFERENCE_ARCHITECTURE = "jumprelu"
WEIGHTS = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_out"), "b_enc": ("d_sae",), "b_dec": ("d_out",),
           "threshold": ("d_sae",)}
THRESHOLD_LR = 0.01


def default_options(d_sae: int) -> dict:
    """{"threshold_lr": 0.01}: the EMA rate of the inference threshold (shared by the ensemble)."""
    return {"threshold_lr": THRESHOLD_LR}


def check_options(options: dict, d_sae: int) -> None:
    if not 0 < options["threshold_lr"] <= 1:
        raise ValueError(f"threshold_lr must be in (0, 1], got {options['threshold_lr']}")


def init_extra(n_members: int, d_in: int, d_sae: int, dtype: torch.dtype
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """No extra parameters; the buffer threshold [n_members] = -1 (unset)."""
    return {}, {"threshold": torch.full((n_members,), -1.0, dtype=dtype)}


def inference_weights(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved layout: the four affine tensors and threshold [N, d_sae] (theta of each member, repeated)."""
    d_sae = t["b_enc"].shape[-1]
    return {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
            "threshold": t["threshold"].unsqueeze(-1).expand(-1, d_sae)}


def encode(w: dict[str, torch.Tensor], x: torch.Tensor, hp: dict[str, torch.Tensor], training: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, pre): batch top-k in training ([N, batch, d_sae] with k [N]); the threshold JumpReLU otherwise."""
    pre = affine_pre(w, x)
    if training:
        return batch_topk(torch.relu(pre), hp["k"]), pre
    return jump(pre, w["threshold"]), pre


def loss_terms(w: dict[str, torch.Tensor], x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, pre: torch.Tensor,
               hp: dict[str, torch.Tensor], x_in: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-token terms [N, batch]: mse only (sparsity is fixed by k)."""
    return {"mse": mse_per_token(x_hat, x)}


@torch.no_grad()
def update_buffers(buffers: dict[str, torch.Tensor], f: torch.Tensor, hp: dict[str, torch.Tensor]) -> None:
    """Update theta [N] in place from a training batch's latents f [N, batch, d_sae] (see the module docstring)."""
    theta = buffers["threshold"]
    kept = kept_minimum(f).to(theta.dtype)                                # global under data-parallel ranks
    kept = torch.where(torch.isinf(kept), theta.clamp_min(0), kept)       # nothing kept: leave theta
    r = float(hp["threshold_lr"])
    theta.copy_(torch.where(theta < 0, kept, (1 - r) * theta + r * kept))


__all__ = ["decode", "encode", "inference_weights", "init_extra", "loss_terms", "update_buffers"]
