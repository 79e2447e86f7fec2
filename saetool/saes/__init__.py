"""SAE architectures: one module each, registered by their SAELens architecture name.

Every architecture gives, for a stack of members (leading axis n_members) or a single SAE (no member axis):
`activation(pre, hp)` (pre-activations [..., d_sae] -> latents f), `sparsity_loss(f, hp)` (per member and token) and
`SWEEP_PARAM`, the hyperparameter a sweep varies. `hp` maps hyperparameter names to tensors broadcastable
against the member axis ([n_members] for a stack, 0-d for a single SAE).
"""

from __future__ import annotations

from types import ModuleType

from saetool.saes import standard, topk

ARCHITECTURES: dict[str, ModuleType] = {standard.NAME: standard, topk.NAME: topk}


def get_architecture(name: str) -> ModuleType:
    """The module implementing architecture `name`; ValueError listing the known ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}") from None
