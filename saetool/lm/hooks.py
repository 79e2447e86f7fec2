"""Hook names: resolve user-facing locations, validate them against a model, and record activations.

A *location* is either a full TransformerLens hook name (``blocks.2.hook_resid_post``) or one of the
aliases in :data:`LOCATION_ALIASES`, expanded for each requested layer to ``blocks.{L}.{suffix}``.
Recorded activations are flattened to one row per token: ``[batch * pos, d]``.
"""

from __future__ import annotations

import difflib
import numbers
import re

import torch

# alias -> hook suffix under blocks.{L}. Note: in the original tool "attn" silently recorded the
# residual stream (resid_post); here it means the attention block's output, hook_attn_out.
# "mlpin" is the MLP's input (a transcoder's input; "mlpout" its target): mlp.hook_in, which equals ln2.hook_out on
# TransformerBridge. ln2.hook_normalized is NOT the MLP's input there: on the embedded SmolLM2 (RMSNorm) it is taken
# before the norm's weight (norm 53.7 vs 6.6 at blocks.1 on one context), unlike HookedTransformer's.
LOCATION_ALIASES = {
    "residual": "hook_resid_post",
    "mlp": "mlp.hook_post",
    "mlpin": "mlp.hook_in",
    "mlpout": "hook_mlp_out",
    "attn_concat": "attn.hook_z",
    "attn": "hook_attn_out",
}

# Hooks laid out [batch, pos, n_heads, d_head]; flattened heads-major to [batch * pos, n_heads * d_head].
_PER_HEAD_SUFFIXES = (
    "hook_z", "hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_result"
)
# Hooks that are not one vector per token (attention [batch, head, q, k]; rotary tables [1, pos, d]).
_NOT_PER_TOKEN_SUFFIXES = ("hook_pattern", "hook_attn_scores", "hook_cos", "hook_sin")

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def _split_commas(values) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (items stripped, empty items dropped)."""
    if isinstance(values, str):
        values = [values]
    out = []
    for value in values:
        out.extend(part.strip() for part in str(value).split(","))
    return [part for part in out if part]


def _layer_list(layers) -> list[int]:
    """``3`` / ``[0, 2]`` / ``(0, 2)`` / ``"0,2"`` -> list of non-negative ints (ValueError otherwise)."""
    if layers is None:
        return []
    if isinstance(layers, str):
        items = _split_commas(layers)
    elif isinstance(layers, (list, tuple, range)):
        items = list(layers)
    else:
        items = [layers]
    result = []
    for item in items:
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            layer = item
        elif isinstance(item, str) and item.strip().lstrip("-").isdigit():
            layer = int(item)
        else:
            raise ValueError(f"layer {item!r} is not an integer")
        if layer < 0:
            raise ValueError(f"layer {layer} is negative; layers count from 0")
        result.append(layer)
    return result


def resolve_hook_names(locations: str | list[str], layers: int | list[int] | None = None) -> list[str]:
    """Expand locations into TransformerLens hook names.

    Args:
        locations: a location or a list of them; comma-separated strings (``"residual,mlp"``) and
            tuples (as Fire passes them) are accepted. Each location is a full hook name (anything
            containing ``hook_``, e.g. ``blocks.2.hook_resid_post``, kept as is and not combined with
            ``layers``) or an alias of :data:`LOCATION_ALIASES`:
            ``residual`` -> ``hook_resid_post``, ``mlp`` -> ``mlp.hook_post`` (MLP hidden activations),
            ``mlpin`` -> ``mlp.hook_in`` (the MLP's input, a transcoder's input),
            ``mlpout`` -> ``hook_mlp_out``, ``attn_concat`` -> ``attn.hook_z`` (per-head outputs before
            W_O), ``attn`` -> ``hook_attn_out`` (attention output; the original tool's ``attn`` meant
            resid_post).
        layers: block indices (int, list/tuple of ints, or ``"0,2"``) each alias is expanded for.

    Returns:
        Hook names, location-major then layer order (``residual`` at layers 0,1 then ``mlp`` at 0,1),
        duplicates removed keeping the first occurrence.

    Raises:
        ValueError: no locations; an unknown location; an alias without layers; a bad layer value.
    """
    names = _split_commas(locations)
    if not names:
        raise ValueError("no hook locations given")
    layer_list = _layer_list(layers)
    result: list[str] = []
    for location in names:
        if location in LOCATION_ALIASES:
            if not layer_list:
                raise ValueError(
                    f"location alias {location!r} needs layers (e.g. layers=3), or give a full hook name "
                    f"like blocks.3.{LOCATION_ALIASES[location]}"
                )
            result.extend(f"blocks.{layer}.{LOCATION_ALIASES[location]}" for layer in layer_list)
        elif "hook_" in location:
            result.append(location)
        else:
            raise ValueError(
                f"unknown location {location!r}: use one of {', '.join(LOCATION_ALIASES)} "
                f"or a full hook name like blocks.0.hook_resid_post"
            )
    return list(dict.fromkeys(result))


def _n_layers(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "n_layers", None)


def _explain_unknown(name: str, valid: list[str], n_layers: int | None) -> str:
    """One-phrase explanation for an unknown hook name, with the closest valid names."""
    match = _BLOCK_RE.match(name)
    if match and n_layers is not None and int(match.group(1)) >= n_layers:
        return f"{name!r} (the model has {n_layers} layers, blocks.0 .. blocks.{n_layers - 1})"
    pool = valid
    if match:  # suggest among the same layer's hooks
        pool = [v for v in valid if v.startswith(f"blocks.{match.group(1)}.")] or valid
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.5)
    if close:
        return f"{name!r} (did you mean {', '.join(close)}?)"
    return f"{name!r} (valid names include {', '.join(sorted(pool)[:8])}, ...)"


def as_hook_list(hook_names: str | list[str]) -> list[str]:
    """A list of hook names: a bare string is one name (not its characters), any other iterable is listed."""
    return [hook_names] if isinstance(hook_names, str) else list(hook_names)


def validate_hook_names(model, hook_names: str | list[str]) -> None:
    """Check that every hook name can be recorded from ``model``, before any data is read.

    A name must be in ``model.hook_dict``, must not be gated off in the bridge (e.g. ``attn.hook_result``
    needs ``model.set_use_attn_result(True)``), and must be a per-token activation (not an attention
    pattern/score or a rotary table).

    Raises:
        ValueError: one line naming each bad hook with the closest valid names (or the layer range).
    """
    hook_names = as_hook_list(hook_names)
    if not hook_names:
        raise ValueError("no hook names given")
    valid = list(model.hook_dict)
    valid_set = set(valid)
    problems = []
    for name in hook_names:
        if name not in valid_set:
            problems.append(_explain_unknown(name, valid, _n_layers(model)))
        elif name.endswith(_NOT_PER_TOKEN_SUFFIXES):
            problems.append(f"{name!r} (not one vector per token, cannot be flattened to rows)")
        else:
            gated = getattr(model, "_gated_hook_reason", None)
            reason = gated(name) if callable(gated) else None
            if reason is not None:
                problems.append(f"{name!r} (gated off: call model.set_{reason}(True) first)")
    if problems:
        raise ValueError("unknown or unusable hook name(s): " + "; ".join(problems))


def stop_at_layer(hook_names: str | list[str]) -> int | None:
    """Number of blocks the forward pass must run to reach all ``hook_names``: max block index + 1.

    Returns None (run the whole model) if any name is not under ``blocks.{N}.`` (e.g. ``ln_final.*``,
    ``hook_embed``) or if the list is empty.
    """
    layers = []
    for name in as_hook_list(hook_names):
        match = _BLOCK_RE.match(name)
        if match is None:
            return None
        layers.append(int(match.group(1)))
    return max(layers) + 1 if layers else None


def flatten_activation(hook_name: str, act: torch.Tensor) -> torch.Tensor:
    """Flatten one hook's activation to one row per token, rows in (context, position) order.

    ``[batch, pos, d]`` -> ``[batch * pos, d]``; per-head hooks (``attn.hook_z``, ``hook_q``/``k``/``v``,
    ``hook_result``) ``[batch, pos, n_heads, d_head]`` -> ``[batch * pos, n_heads * d_head]``, heads-major
    (the original's ``rearrange("b s n d -> (b s) (n d)")``). Dtype and device are kept; the result is a
    view when possible.

    Raises:
        ValueError: a hook that is not one vector per token, or a tensor of an unexpected rank.
    """
    if hook_name.endswith(_NOT_PER_TOKEN_SUFFIXES):
        raise ValueError(f"hook {hook_name!r} is not one vector per token and cannot be flattened to rows")
    if act.dim() == 3:
        batch, pos, width = act.shape
        return act.reshape(batch * pos, width)
    if act.dim() == 4 and hook_name.endswith(_PER_HEAD_SUFFIXES):
        batch, pos, n_heads, d_head = act.shape
        return act.reshape(batch * pos, n_heads * d_head)
    raise ValueError(
        f"hook {hook_name!r} gave a tensor of shape {tuple(act.shape)}; expected [batch, pos, d] "
        f"or, for per-head hooks, [batch, pos, n_heads, d_head]"
    )


def _model_device(model) -> torch.device:
    cfg_device = getattr(getattr(model, "cfg", None), "device", None)
    if cfg_device is not None:
        return torch.device(cfg_device)
    return next(model.parameters()).device


@torch.inference_mode()
def record_activations(model, tokens: torch.Tensor, hook_names: str | list[str]) -> dict[str, torch.Tensor]:
    """Run ``tokens`` through ``model`` and return the flattened activations at ``hook_names``.

    Args:
        model: a ``TransformerBridge`` (see :func:`saetool.lm.models.load_model`).
        tokens: int64 token ids ``[batch, pos]`` on any device (moved to the model's). They are used
            exactly as given: no BOS is prepended.
        hook_names: hook names (see :func:`resolve_hook_names`; check them first with
            :func:`validate_hook_names`).

    Returns:
        ``{hook_name: tensor [batch * pos, d]}`` for exactly the requested names, rows in
        (context, position) order, in the model's dtype and on the model's device. The forward pass
        stops after the last block needed (:func:`stop_at_layer`). The tensors are inference-mode
        tensors: ``.clone()`` them outside inference mode before using them where autograd must save
        them (they are fine as plain inputs, for ``.cpu()``, ``.numpy()`` or storage).

    Raises:
        ValueError: tokens not a 2-D integer tensor; a hook that produced no activation.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an integer tensor [batch, pos], got {shape}")
    hook_names = as_hook_list(hook_names)
    if not hook_names:
        raise ValueError("no hook names given")
    tokens = tokens.to(device=_model_device(model), dtype=torch.long)
    _, cache = model.run_with_cache(
        tokens,
        names_filter=hook_names,
        stop_at_layer=stop_at_layer(hook_names),
        return_cache_object=False,
    )
    result = {}
    for name in hook_names:
        act = cache.get(name)
        if act is None:
            raise ValueError(f"hook {name!r} produced no activation; check it with validate_hook_names")
        result[name] = flatten_activation(name, act)
    return result


def hook_widths(model, hook_names: str | list[str]) -> dict[str, int]:
    """Width ``d`` of each hook's flattened activation (``[batch * pos, d]``), from one 1-token forward.

    E.g. ``hook_resid_post`` -> d_model, ``mlp.hook_post`` -> d_mlp, ``attn.hook_z`` -> n_heads * d_head.
    Raises ValueError like :func:`record_activations`.
    """
    tokens = torch.zeros((1, 1), dtype=torch.long)
    acts = record_activations(model, tokens, hook_names)
    return {name: int(act.shape[1]) for name, act in acts.items()}
