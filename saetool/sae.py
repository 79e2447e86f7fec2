"""One trained SAE for inference: `SparseLinearAutoencoder` (the original tool's output type, in SAELens layout)."""

from __future__ import annotations

import torch
from torch import nn

from saetool.saes import get_architecture


class SparseLinearAutoencoder(nn.Module):
    """A single SAE: f = act((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec.

    Tensors (SAELens layout): W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in].
    `cfg` is the member's cfg.json (architecture, d_in, d_sae, hook_name, hyperparameters such as
    `l1_coefficient` or `k`, ...). Inputs may have any leading shape [..., d_in].
    """

    def __init__(self, weights: dict[str, torch.Tensor], cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        self.arch = get_architecture(cfg["architecture"])
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        if set(weights) != set(expected):
            raise ValueError(f"SAE weights must have exactly {sorted(expected)}, got {sorted(weights)}")
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(weights[name].shape)}, expected {shape} from cfg")
            setattr(self, name, nn.Parameter(weights[name], requires_grad=False))
        self._hp = {h: torch.tensor(cfg[h]) for h in self.arch.HYPERPARAMS}

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> latents f [..., d_sae] (computed in the SAE's dtype)."""
        x = x.to(self.W_enc.dtype)
        return self.arch.activation((x - self.b_dec) @ self.W_enc + self.b_enc, self._hp)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., d_sae] -> x_hat [..., d_in]."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat [..., d_in] (the original's `predict`)."""
        return self.decode(self.encode(x))

    def __repr__(self) -> str:
        hp = ", ".join(f"{h}={self.cfg[h]}" for h in self.arch.HYPERPARAMS)
        return f"SparseLinearAutoencoder({self.cfg['architecture']}, d_in={self.d_in}, d_sae={self.d_sae}, {hp})"
