"""Per-latent statistics of trained SAEs: firing density, dead and dense latents, decoder norms, and the mean max
cosine similarity (MMCS) between dictionaries.

Firing frequencies come from :class:`saetool.evaluate.metrics.FiringCounter` (a latent fires on a token when it is non-zero),
so these numbers agree with the sweep's dead fraction. Conventions:

* density of latent i = fraction of (kept) tokens it fires on, ``counts[i] / n_tokens``;
* dead: density 0 (never fired on the evaluated tokens); dense: density > ``dense_threshold`` (default 0.1: fires
  on more than one token in ten; a convention, not a standard, so it is a parameter);
* the density histogram is over ``log10(density)`` of the *alive* latents (dead ones are counted apart, instead of
  being piled at ``log10(1e-10)`` as in SAELens' W&B histogram ``log10(feature_sparsity + 1e-10)``);
* MMCS (the original tool's ``standard_metrics.mmcs``): for dictionaries ``A`` [n_a, d] and ``B`` [n_b, d] (rows are
  atoms, here decoder rows ``W_dec``), ``mmcs(A, B) = mean_j max_i cos(A_i, B_j)``: how well each atom of ``B`` is
  matched by some atom of ``A``. It is asymmetric when the sizes differ; atoms are normalised here (the original
  assumed unit rows).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from saetool.config import DENSE_THRESHOLD

__all__ = [
    "decoder_norm_summary",
    "decoder_norms",
    "density_summary",
    "log10_density_histogram",
    "max_cosine_similarity",
    "mmcs",
    "mmcs_matrix",
]


def density_summary(firing_frequency: Tensor, dense_threshold: float = DENSE_THRESHOLD) -> dict:
    """Dead/dense counts and the spread of the alive latents' log10 density.

    Args:
        firing_frequency: ``[d_sae]`` fraction of tokens each latent fired on (any float dtype).
        dense_threshold: a latent is dense when its frequency is strictly greater than this.

    Returns:
        dict of Python numbers: ``n_dead`` (frequency == 0), ``n_dense`` (> dense_threshold), ``dead_fraction``,
        ``dense_fraction`` (over d_sae), ``median_log10_density`` (median of log10 frequency over alive latents;
        NaN if none is alive), ``d_sae``.
    """
    freq = firing_frequency.detach().to(torch.float64).reshape(-1).cpu()
    d_sae = freq.numel()
    alive = freq[freq > 0]
    n_dead = d_sae - alive.numel()
    n_dense = int((freq > dense_threshold).sum())
    median = float(torch.log10(alive).median()) if alive.numel() else float("nan")
    return {"n_dead": n_dead, "n_dense": n_dense, "dead_fraction": n_dead / d_sae, "dense_fraction": n_dense / d_sae,
            "median_log10_density": median, "d_sae": d_sae}


def log10_density_histogram(firing_frequency: Tensor, n_tokens: int, bins_per_decade: int = 4
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of ``log10(frequency)`` over the alive latents, on fixed edges.

    The edges run from ``floor(log10(1 / n_tokens))`` (the smallest non-zero frequency that can be observed) to 0,
    ``bins_per_decade`` bins per decade, so histograms over the same number of tokens share their bins.

    Returns:
        ``(counts, edges)``: int64 ``[n_bins]`` and float64 ``[n_bins + 1]`` NumPy arrays. Dead latents are not
        counted (see :func:`density_summary`). A frequency exactly on an edge goes to the bin on its right; 1.0 goes
        to the last bin; values below the first edge (only rounding can produce them) go to the first bin.
    """
    freq = firing_frequency.detach().to(torch.float64).reshape(-1).cpu().numpy()
    low = math.floor(math.log10(1.0 / max(int(n_tokens), 1)))
    low = min(low, -1)
    edges = np.linspace(low, 0.0, (-low) * bins_per_decade + 1)
    alive = freq[freq > 0]
    # clip: a frequency handed in float32 may round just below 1 / n_tokens
    counts, _ = np.histogram(np.clip(np.log10(alive), low, 0.0), bins=edges)
    return counts.astype(np.int64), edges


def decoder_norms(W_dec: Tensor) -> Tensor:
    """L2 norm of every decoder atom: ``W_dec [d_sae, d_in] -> [d_sae]`` float32 (float64 stays float64)."""
    w = W_dec.detach()
    return torch.linalg.vector_norm(w.to(torch.promote_types(w.dtype, torch.float32)), dim=-1)


def decoder_norm_summary(W_dec: Tensor) -> dict:
    """``{"min", "mean", "max"}`` of :func:`decoder_norms` as Python floats (all 1 for a saetool-trained SAE)."""
    n = decoder_norms(W_dec).to(torch.float64)
    return {"min": float(n.min()), "mean": float(n.mean()), "max": float(n.max())}


def _unit_rows(a: Tensor) -> Tensor:
    a = a.detach().to(torch.float32)
    return a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(1e-8)


def max_cosine_similarity(reference: Tensor, atoms: Tensor, chunk: int = 4096) -> Tensor:
    """For every row of ``atoms`` [n_b, d], the largest cosine similarity to any row of ``reference`` [n_a, d].

    The original tool's ``mcs_duplicates(ground=reference, model=atoms)``. Computed in float32 on the device of
    ``atoms``, ``chunk`` rows at a time (memory ``chunk * n_a`` floats). Returns float32 ``[n_b]`` in [-1, 1]
    (up to rounding).
    """
    if reference.shape[-1] != atoms.shape[-1]:
        raise ValueError(f"atoms have width {atoms.shape[-1]}, reference rows {reference.shape[-1]}")
    ref = _unit_rows(reference.to(atoms.device))
    out = [(_unit_rows(atoms[i:i + chunk]) @ ref.T).max(dim=-1).values for i in range(0, atoms.shape[0], chunk)]
    return torch.cat(out)


def mmcs(reference: Tensor, atoms: Tensor) -> float:
    """Mean max cosine similarity ``mean_j max_i cos(reference_i, atoms_j)`` (the original ``mmcs(model, model2)``
    with ``model = reference``, ``model2 = atoms``). 1.0 when every atom has an exact duplicate in ``reference``."""
    return float(max_cosine_similarity(reference, atoms).to(torch.float64).mean())


def mmcs_matrix(dictionaries: list[Tensor]) -> Tensor:
    """MMCS between every pair of dictionaries (members of a sweep, or SAEs of different sizes).

    Args:
        dictionaries: M tensors ``[n_m, d]`` (decoder rows ``W_dec``); sizes ``n_m`` may differ.

    Returns:
        float64 ``[M, M]`` with ``out[i, j] = mmcs(dictionaries[i], dictionaries[j])`` (how well member i covers
        member j's atoms) and a diagonal of exactly 1, as the original ``mmcs_from_list``; unlike it, both
        triangles are computed (the two directions differ when sizes differ).
    """
    m = len(dictionaries)
    out = torch.eye(m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            if i != j:
                out[i, j] = mmcs(dictionaries[i], dictionaries[j])
    return out
