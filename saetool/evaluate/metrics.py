"""Evaluation metrics for sparse autoencoders (SAEs) and stacked SAE ensembles.

Conventions used throughout:

* The **last axis** of a latent tensor ``f`` is the latent axis (size ``d_sae``); every other axis is
  a token axis, in any layout (``[tokens, d_sae]``, ``[batch, seq, d_sae]``, ...). Per-token norms
  reduce over the last axis only (public case T2).
* The **last axis** of an activation tensor ``x`` is the model dimension ``d``; all other axes are
  tokens. For an ensemble, reconstructions carry one extra **leading** member axis:
  ``x_hat[n_members, ..., d]`` for inputs ``x[..., d]`` shared by every member.
* A latent "fires" on a token when its activation is non-zero (``f != 0``); L0, firing counts and
  dead latents all use this one test.
* Reconstruction quality is a **ratio of totals** about the **per-dimension mean** of ``x`` over all
  tokens, computed in float64 (public cases M1, M2)::

      FVU = sum_tokens ||x - x_hat||^2 / sum_tokens ||x - mean_tokens(x)||^2
      explained variance = 1 - FVU

  This is ``fraction_variance_unexplained`` as in SAELens, EleutherAI ``sparsify`` and the original
  tool. It is neither a mean of per-token ratios (gives 0.1244 instead of 4/75 in case M2) nor a
  ratio to the variance about zero (gives 0.992 instead of 0.0 in case M1).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FiringCounter",
    "ReconstructionStats",
    "explained_variance",
    "fvu",
    "l0_norm",
    "l1_norm",
    "l2_norm",
]


def _norm_dtype(f: Tensor) -> torch.dtype:
    """Float dtype for per-token norms: at least float32 (bf16/fp16 cannot count past 256/2048)."""
    if f.is_floating_point():
        return torch.promote_types(f.dtype, torch.float32)
    return torch.float32


def _check_has_last_axis(f: Tensor) -> None:
    if f.ndim < 1:
        raise ValueError("expected a tensor with a latent axis (last axis), got a 0-d tensor")


# ----------------------------------------------------------------------------------------------
# Per-token sparsity norms (reduce over the LAST axis only)
# ----------------------------------------------------------------------------------------------


def l0_norm(f: Tensor) -> Tensor:
    """Per-token number of non-zero latents: ``L0[t] = sum_i [f[t, i] != 0]``.

    Args:
        f: latent activations ``[..., d_sae]``, any dtype; the last axis is the latent axis.

    Returns:
        ``[...]`` (``f.shape[:-1]``), float32 (float64 if ``f`` is float64). Counts are exact
        integers stored as floats so they can be averaged directly.
    """
    _check_has_last_axis(f)
    return (f != 0).sum(dim=-1).to(_norm_dtype(f))


def l1_norm(f: Tensor) -> Tensor:
    """Per-token L1 norm: ``L1[t] = sum_i |f[t, i]|``.

    Args:
        f: latent activations ``[..., d_sae]``.

    Returns:
        ``[...]`` (``f.shape[:-1]``), float32 or wider (float64 stays float64).
    """
    _check_has_last_axis(f)
    return f.abs().sum(dim=-1, dtype=_norm_dtype(f))


def l2_norm(f: Tensor) -> Tensor:
    """Per-token L2 norm: ``L2[t] = sqrt(sum_i f[t, i]^2)``.

    Args:
        f: latent activations ``[..., d_sae]``.

    Returns:
        ``[...]`` (``f.shape[:-1]``), float32 or wider (float64 stays float64).
    """
    _check_has_last_axis(f)
    return torch.linalg.vector_norm(f.to(_norm_dtype(f)), ord=2, dim=-1)


# ----------------------------------------------------------------------------------------------
# Fraction of variance unexplained (one shot)
# ----------------------------------------------------------------------------------------------


def _has_member_axis(x: Tensor, x_hat: Tensor) -> bool:
    """True when ``x_hat`` broadcasts against ``x`` to ``[n_members, *x.shape]``; False when to
    ``x.shape``. Anything else would change the token count and is rejected."""
    try:
        shape = torch.broadcast_shapes(x.shape, x_hat.shape)
    except RuntimeError as e:
        raise ValueError(f"x_hat {tuple(x_hat.shape)} does not broadcast with x {tuple(x.shape)}") from e
    if shape == x.shape:
        return False
    if len(shape) == x.ndim + 1 and shape[1:] == x.shape:
        return True
    raise ValueError(
        f"x_hat {tuple(x_hat.shape)} must broadcast to x's shape {tuple(x.shape)} "
        f"or to [n_members, *x.shape]; it broadcasts to {tuple(shape)}"
    )


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained, a ratio of totals about the per-dimension mean.

    ``FVU = sum_{t,d} (x[t,d] - x_hat[t,d])^2 / sum_{t,d} (x[t,d] - mu[d])^2`` with
    ``mu[d] = mean_t x[t,d]`` over **all** tokens of ``x`` (every axis but the last).
    Same definition as SAELens / sparsify / the original tool's ``fraction_variance_unexplained``.

    Args:
        x: inputs ``[..., d]``.
        x_hat: reconstructions broadcastable to ``[..., d]`` (one SAE; e.g. a ``[d]`` mean
            predictor) or to ``[n_members, ..., d]`` (an ensemble on the same inputs).

    Returns:
        float64 scalar, or ``[n_members]`` float64 for an ensemble. All arithmetic is float64.
        If ``x`` has zero variance (every token identical) the result is ``inf`` (or ``nan``
        for a perfect reconstruction), as the ratio is undefined.
    """
    members = _has_member_axis(x, x_hat)
    x64 = x.to(torch.float64)
    x_hat64 = x_hat.to(torch.float64)
    d = x.shape[-1]

    mu = x64.reshape(-1, d).mean(dim=0)  # [d]
    total_variance = (x64 - mu).pow(2).sum()  # scalar

    sq_err = (x_hat64 - x64).pow(2)  # [..., d] or [n_members, ..., d]
    if members:
        sse = sq_err.reshape(sq_err.shape[0], -1).sum(dim=1)  # [n_members]
    else:
        sse = sq_err.sum()
    return sse / total_variance


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """Explained variance ``1 - fvu(x, x_hat)``; same arguments, shapes and dtype as :func:`fvu`."""
    return 1.0 - fvu(x, x_hat)


# ----------------------------------------------------------------------------------------------
# Streaming firing counts / dead latents
# ----------------------------------------------------------------------------------------------


class FiringCounter:
    """Counts, per latent, how many tokens it fired on; leading axes are tokens (any layout).

    The single mechanism for firing frequency and dead latents, so training logs, saved files and
    final evaluation agree (public case M3). A latent fires on a token when its activation is
    non-zero. A latent is dead when it fired on no token seen since the last :meth:`reset`.

    Attributes:
        n_tokens: number of tokens seen (Python int). For an ensemble every member sees the same
            tokens, so this counts tokens once, not once per member.
        counts: int64 ``[d_sae]`` (``n_members is None``) or ``[n_members, d_sae]``: tokens on which
            each latent fired.
    """

    def __init__(self, d_sae: int, n_members: int | None = None, device: torch.device | str = "cpu"):
        self.d_sae = int(d_sae)
        self.n_members = None if n_members is None else int(n_members)
        shape = (self.d_sae,) if self.n_members is None else (self.n_members, self.d_sae)
        self.counts = torch.zeros(shape, dtype=torch.int64, device=device)
        self.n_tokens = 0

    def update(self, f: Tensor) -> None:
        """Add one batch of latent activations.

        Args:
            f: ``[..., d_sae]`` when ``n_members`` is None, else ``[n_members, ..., d_sae]``. Every
                axis between the member axis (if any) and the last (latent) axis is a token axis.
        """
        if f.shape[-1] != self.d_sae:
            raise ValueError(f"last axis of f is {f.shape[-1]}, expected d_sae={self.d_sae}")
        fired = f != 0
        if self.n_members is None:
            fired = fired.reshape(-1, self.d_sae)  # [tokens, d_sae]
            batch_counts = fired.sum(dim=0)  # [d_sae]
            n = fired.shape[0]
        else:
            if f.ndim < 2 or f.shape[0] != self.n_members:
                raise ValueError(
                    f"f must be [n_members={self.n_members}, ..., d_sae], got {tuple(f.shape)}"
                )
            fired = fired.reshape(self.n_members, -1, self.d_sae)  # [n_members, tokens, d_sae]
            batch_counts = fired.sum(dim=1)  # [n_members, d_sae]
            n = fired.shape[1]
        self.counts += batch_counts.to(device=self.counts.device, dtype=torch.int64)
        self.n_tokens += int(n)

    def firing_frequency(self) -> Tensor:
        """Fraction of tokens each latent fired on: ``counts / n_tokens``, float64, shape of
        ``counts``. All zeros before any token was seen."""
        return self.counts.to(torch.float64) / max(self.n_tokens, 1)

    def n_dead(self) -> Tensor:
        """Latents that never fired: int64 scalar, or ``[n_members]``."""
        return (self.counts == 0).sum(dim=-1)

    def n_alive(self) -> Tensor:
        """Latents that fired at least once: int64 scalar, or ``[n_members]``."""
        return (self.counts > 0).sum(dim=-1)

    def dead_fraction(self) -> Tensor:
        """``n_dead / d_sae``, float64 scalar or ``[n_members]``."""
        return self.n_dead().to(torch.float64) / self.d_sae

    def alive_fraction(self) -> Tensor:
        """``n_alive / d_sae``, float64 scalar or ``[n_members]``."""
        return self.n_alive().to(torch.float64) / self.d_sae

    def reset(self) -> None:
        """Forget all counts (e.g. at the start of a new dead-latent window)."""
        self.counts.zero_()
        self.n_tokens = 0


# ----------------------------------------------------------------------------------------------
# Streaming, exact reconstruction evaluation for an ensemble
# ----------------------------------------------------------------------------------------------


class ReconstructionStats:
    """Streaming, exact evaluation over many batches for an ensemble of n_members SAEs on the same inputs.

    Accumulates, in float64 on ``device``:

    * ``sum_x[d]``, ``sum_x2[d]`` and the token count ``n``, so the total variance about the
      per-dimension mean over all tokens is exact however the data is batched:
      ``total_var = sum_d (sum_x2[d] - sum_x[d]^2 / n)``;
    * ``sse[m] = sum_{t,d} (x_hat[m,t,d] - x[t,d])^2``;
    * ``sum_t L0`` and ``sum_t L1`` per member;
    * per-latent firing counts through a :class:`FiringCounter`.

    ``compute()`` then gives ``fvu = sse / total_var`` (ratio of totals, as :func:`fvu`), so
    streaming in batches of 1 equals one batch up to float64 rounding (public case M2).

    Memory: each update upcasts ``x_hat`` to float64 (``[n_members, batch, d_in]``).
    """

    def __init__(self, n_members: int, d_in: int, d_sae: int, device: torch.device | str = "cpu"):
        self.n_members = int(n_members)
        self.d_in = int(d_in)
        self.d_sae = int(d_sae)
        self.device = torch.device(device)
        f64 = {"dtype": torch.float64, "device": self.device}
        self.sum_x = torch.zeros(self.d_in, **f64)
        self.sum_x2 = torch.zeros(self.d_in, **f64)
        self.sse = torch.zeros(self.n_members, **f64)
        self.l0_sum = torch.zeros(self.n_members, **f64)
        self.l1_sum = torch.zeros(self.n_members, **f64)
        self.firing = FiringCounter(self.d_sae, n_members=self.n_members, device=self.device)

    @property
    def n_tokens(self) -> int:
        return self.firing.n_tokens

    def update(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        """Add one batch.

        Args:
            x: inputs ``[batch, d_in]`` (any leading token axes allowed), shared by all members.
            x_hat: reconstructions ``[n_members, batch, d_in]``.
            f: latent activations ``[n_members, batch, d_sae]``.
        """
        tokens = tuple(x.shape[:-1])
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must be [batch, d_in={self.d_in}], got {tuple(x.shape)}")
        if tuple(x_hat.shape) != (self.n_members, *x.shape):
            raise ValueError(
                f"x_hat must be [n_members={self.n_members}, *{tuple(x.shape)}], got {tuple(x_hat.shape)}"
            )
        if tuple(f.shape) != (self.n_members, *tokens, self.d_sae):
            raise ValueError(
                f"f must be [n_members={self.n_members}, *{tokens}, d_sae={self.d_sae}], got {tuple(f.shape)}"
            )

        x64 = x.to(device=self.device, dtype=torch.float64).reshape(-1, self.d_in)  # [n, d_in]
        x_hat64 = x_hat.to(device=self.device, dtype=torch.float64).reshape(self.n_members, -1, self.d_in)
        f = f.to(self.device).reshape(self.n_members, -1, self.d_sae)  # [n_members, n, d_sae]

        self.sum_x += x64.sum(dim=0)
        self.sum_x2 += x64.pow(2).sum(dim=0)
        self.sse += (x_hat64 - x64).pow(2).sum(dim=(1, 2))
        self.l0_sum += l0_norm(f).to(torch.float64).sum(dim=1)
        self.l1_sum += f.abs().sum(dim=-1, dtype=torch.float64).sum(dim=1)
        self.firing.update(f)  # also advances n_tokens

    def total_variance(self) -> Tensor:
        """``sum_d (sum x_d^2 - (sum x_d)^2 / n)``: total squared deviation about the mean, float64 scalar."""
        n = self.n_tokens
        return (self.sum_x2 - self.sum_x.pow(2) / n).sum()

    def compute(self) -> dict[str, Tensor | int]:
        """Return the metrics over everything seen so far.

        Returns:
            dict with, per member (``[n_members]`` float64 unless noted):

            * ``"mse"``: ``sse / (n_tokens * d_in)``, mean over tokens and dimensions;
            * ``"fvu"``: ``sse / total_variance``; ``"explained_variance"``: ``1 - fvu``;
            * ``"l0"``, ``"l1"``: mean per-token L0 / L1;
            * ``"dead_fraction"``: latents that never fired / d_sae; ``"alive_fraction"``: n_alive / d_sae;
            * ``"n_dead"``, ``"n_alive"``: int64 ``[n_members]``;
            * ``"firing_frequency"``: ``[n_members, d_sae]`` float64, fraction of tokens non-zero;
            * ``"n_tokens"``: Python int.
        """
        n = self.n_tokens
        if n == 0:
            raise ValueError("ReconstructionStats.compute() called before any update()")
        fvu_ = self.sse / self.total_variance()
        return {
            "mse": self.sse / (n * self.d_in),
            "fvu": fvu_,
            "explained_variance": 1.0 - fvu_,
            "l0": self.l0_sum / n,
            "l1": self.l1_sum / n,
            "dead_fraction": self.firing.dead_fraction(),
            "alive_fraction": self.firing.alive_fraction(),
            "n_dead": self.firing.n_dead(),
            "n_alive": self.firing.n_alive(),
            "firing_frequency": self.firing.firing_frequency(),
            "n_tokens": n,
        }
