"""Evaluation: reconstruction metrics (MSE, FVU, explained variance, L0, dead latents), per-latent statistics, the
held-out pass that encodes a sweep's held-out rows once for every consumer, the metrics tables, and the spliced
CE/KL evaluation with the language model."""

from __future__ import annotations

from saetool.evaluate.heldout import (
    METRIC_KEYS,
    HeldOut,
    context_batches,
    encode_pass,
    heldout_rows,
    heldout_stats,
    member_metrics,
)
from saetool.evaluate.latent_stats import (
    decoder_norm_summary,
    density_summary,
    log10_density_histogram,
    mmcs,
    mmcs_matrix,
)
from saetool.evaluate.metrics import FiringCounter, ReconstructionStats, explained_variance, fvu, l0_norm
from saetool.evaluate.spliced import evaluate_spliced, heldout_contexts
from saetool.evaluate.tables import frontier_table, metrics_table

__all__ = ["METRIC_KEYS", "FiringCounter", "HeldOut", "ReconstructionStats", "context_batches", "decoder_norm_summary",
           "density_summary", "encode_pass", "evaluate_spliced", "explained_variance", "frontier_table", "fvu",
           "heldout_contexts", "heldout_rows", "heldout_stats", "l0_norm", "log10_density_histogram",
           "member_metrics", "metrics_table", "mmcs", "mmcs_matrix"]
