"""Evaluation: reconstruction metrics (MSE, FVU, explained variance, L0, dead latents), per-latent statistics,
and the spliced CE/KL evaluation with the language model."""

from __future__ import annotations

from saetool.evaluate.latent_stats import (
    decoder_norm_summary,
    density_summary,
    log10_density_histogram,
    mmcs_matrix,
)
from saetool.evaluate.metrics import ReconstructionStats
from saetool.evaluate.spliced import evaluate_spliced, heldout_contexts

__all__ = ['ReconstructionStats', 'decoder_norm_summary', 'density_summary', 'evaluate_spliced', 'heldout_contexts', 'log10_density_histogram', 'mmcs_matrix']
