"""The standard ReLU SAE with an L1 penalty (Bricken et al. 2023, "Towards Monosemanticity"; Cunningham et al.
2023, arXiv:2309.08600, the paper of the tool saetool replaces).

    f     = ReLU((x - b_dec) W_enc + b_enc)                      f: [..., d_sae]
    x_hat = f W_dec + b_dec                                       W_dec rows (atoms) kept at unit L2 norm
    loss  = mean_{b,j} (x_hat - x)^2 + l1_coefficient * mean_b sum_i |f_i|

The loss is the original tool's (reconstruction averaged over tokens AND dimensions, L1 summed over latents
and averaged over tokens), so its default L1 range 1e-4..1e-2 keeps its meaning. With `tied`, W_enc is
W_dec transposed (the original `FunctionalTiedSAE`).
"""

from __future__ import annotations

import torch

NAME = "standard"
SWEEP_PARAM = "l1_coefficient"
# The sweep flags that act on this architecture beyond the common ones (SweepConfig refuses them elsewhere),
# and whether the fused kernel (saetool.ensemble.fused) trains it.
FLAGS = ("l1_values", "l1_value_min", "l1_value_max", "l1_value_n", "l1_warmup_steps", "decoder_norm_l1", "tied",
         "resample_every", "target_hook")
FUSED = True
HYPERPARAMS = ("l1_coefficient",)


def activation(pre: torch.Tensor, hp: dict[str, torch.Tensor]) -> torch.Tensor:
    """ReLU of the pre-activations; same shape and dtype as `pre`."""
    return torch.relu(pre)


def sparsity_loss(f: torch.Tensor, hp: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token penalty l1_coefficient * sum_i |f_i|: f [n_members, batch, d_sae] -> [n_members, batch]
    (the ensemble averages it over tokens)."""
    return hp["l1_coefficient"].unsqueeze(-1) * f.abs().sum(-1)
