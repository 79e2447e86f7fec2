"""The TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv:2406.04093).

    f     = ReLU(TopK_k((x - b_dec) W_enc + b_enc))   keep the k largest pre-activations of each token, zero the rest
    x_hat = f W_dec + b_dec
    loss  = mean_{b,j} (x_hat - x)^2                  (sparsity is enforced by k, no penalty)

Members of one ensemble may have different k: the top max(k) values are taken once and each member keeps
its first k of them (torch.topk returns them sorted), so one batched kernel serves the whole sweep.
"""

from __future__ import annotations

import torch

NAME = "topk"
SWEEP_PARAM = "k"
# The sweep flags that act on this architecture beyond the common ones (SweepConfig refuses them elsewhere),
# and whether the fused kernel (saetool.ensemble.fused) trains it.
FLAGS = ("k_values", "auxk_coefficient", "resample_every", "target_hook")
FUSED = True
HYPERPARAMS = ("k",)


def activation(pre: torch.Tensor, hp: dict[str, torch.Tensor]) -> torch.Tensor:
    """pre [..., d_sae] (member axis first for a stack, k [n_members]) -> f of the same shape with at most k
    non-zeros per token (fewer where pre-activations are negative)."""
    k = hp["k"].to(torch.long)
    k_max = int(hp["k_max"]) if "k_max" in hp else int(k.max())   # a Python int keeps torch.compile graph-whole
    values, indices = pre.topk(k_max, dim=-1, sorted=True)
    keep = torch.arange(k_max, device=pre.device) < k.reshape(k.shape + (1,) * (pre.dim() - k.dim()))
    return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values) * keep)  # in place: no second copy


def sparsity_loss(f: torch.Tensor, hp: dict[str, torch.Tensor]) -> torch.Tensor:
    """No sparsity penalty: zeros [n_members, batch]."""
    return f.new_zeros(f.shape[:-1])
