"""SAE architectures: one module each, registered by name.

Every architecture gives `SWEEP_PARAM` (the hyperparameter a sweep varies) and `HYPERPARAMS` (per member;
`hp` maps them to tensors broadcastable against the member axis: [n_members] for a stack, 0-d for one SAE).

standard and topk (the fused-kernel architectures) give `activation(pre, hp)` and `sparsity_loss(f, hp)` for
the affine encoder pre = (x - b_dec) W_enc + b_enc. The others give the generic interface (the weights `w` in
either layout of saetool.saes._common, named as saved):

    WEIGHTS                      {saved tensor name: shape in ("d_in", "d_sae", "d_out")}  (SAELens layout)
    INFERENCE_ARCHITECTURE       the cfg.json "architecture" it is saved as ("jumprelu" for batchtopk)
    HYPERPARAM_DEFAULTS          values for hyperparameters a sweep may omit (JumpReLU's bandwidth)
    init_extra(n, d_in, d_sae, dtype) -> (params, buffers)   extra tensors with a leading member axis
    inference_weights(t) -> w    training tensors (member axis first) -> the saved ones (e.g. exp(log_threshold))
    encode(w, x, hp, training) -> (f, pre)                    latents and the pre-activations the loss needs
    loss_terms(w, x, x_hat, f, pre, hp, x_in=None) -> {name: [n, batch]} per-token terms ("mse", "sparsity", ...):
                                 x the reconstruction target, x_in the encoder's input (a transcoder's; None = x)
    update_buffers(buffers, f, hp)                            optional: non-gradient state after a training forward
    default_options(d_sae), check_options(options, d_sae)     optional: settings shared by the whole ensemble
"""

from __future__ import annotations

from types import ModuleType

from saetool.saes import batchtopk, gated, jumprelu, matryoshka_batchtopk, standard, topk

ARCHITECTURES: dict[str, ModuleType] = {m.NAME: m for m in (standard, topk, batchtopk, jumprelu, gated,
                                                             matryoshka_batchtopk)}
# The architectures the fused kernel trains (each declares FUSED).
FUSED_ARCHITECTURES = tuple(name for name, arch in ARCHITECTURES.items() if arch.FUSED)
# The order architectures are named in messages ("applies to standard and gated only").
_MESSAGE_ORDER = ("standard", "gated", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu")
AFFINE_WEIGHTS = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_out"), "b_enc": ("d_sae",), "b_dec": ("d_out",)}


def architecture_flags() -> dict[str, tuple[str, ...]]:
    """{sweep flag: the architectures it acts on}, from each architecture's FLAGS: a flag set away from its default
    on any other architecture is refused (saetool.config.SweepConfig.validate)."""
    flags = dict.fromkeys(flag for name in _MESSAGE_ORDER for flag in ARCHITECTURES[name].FLAGS)
    return {flag: tuple(n for n in _MESSAGE_ORDER if flag in ARCHITECTURES[n].FLAGS) for flag in flags}


def get_architecture(name: str) -> ModuleType:
    """The module implementing architecture `name`; ValueError listing the known ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}") from None


def is_generic(arch: ModuleType) -> bool:
    """True for architectures with the generic interface (encode/loss_terms), False for standard/topk."""
    return hasattr(arch, "encode")


def weight_shapes(arch: ModuleType, d_in: int, d_sae: int, d_out: int | None = None) -> dict[str, tuple[int, ...]]:
    """{saved tensor name: shape} of one SAE of this architecture (d_out: a transcoder's output width; None = d_in).
    A skip transcoder's W_skip [d_out, d_in] is not among them (saetool.saes.transcoder adds it)."""
    sizes = {"d_in": d_in, "d_sae": d_sae, "d_out": d_in if d_out is None else d_out}
    return {k: tuple(sizes[s] for s in spec) for k, spec in getattr(arch, "WEIGHTS", AFFINE_WEIGHTS).items()}


def options_of(arch: ModuleType, d_sae: int, given: dict | None = None) -> dict:
    """The architecture's ensemble-wide options: defaults overridden by `given` (unknown keys refused), checked."""
    defaults = arch.default_options(d_sae) if hasattr(arch, "default_options") else {}
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ValueError(f"architecture {arch.NAME!r} has no option {unknown[0]!r}")
    options = {**defaults, **(given or {})}
    if hasattr(arch, "check_options"):
        arch.check_options(options, d_sae)
    return options


from saetool.saes._common import decode, global_batch, global_sum
from saetool.saes.transcoder import (
    SAVED_TRANSCODERS,
    check_sweep_flags,
    check_transcoder,
    has_skip,
    is_transcoder_cfg,
    saved_architecture,
)

__all__ = [
    "AFFINE_WEIGHTS",
    "ARCHITECTURES",
    "FUSED_ARCHITECTURES",
    "SAVED_TRANSCODERS",
    "architecture_flags",
    "check_sweep_flags",
    "check_transcoder",
    "decode",
    "get_architecture",
    "global_batch",
    "global_sum",
    "has_skip",
    "is_generic",
    "is_transcoder_cfg",
    "options_of",
    "saved_architecture",
    "weight_shapes",
]
