"""Stacks of SAEs trained as one: `SAEEnsemble`, the fused forward/backward kernel, and the training recipes
(schedules, dead latents, resampling, normalisation)."""

from __future__ import annotations

from saetool.ensemble.fused import FUSED_ARCHITECTURES, fused_loss_and_grads
from saetool.ensemble.recipes import (
    DeadLatentTracker,
    clip_grad_norm_per_member,
    coefficient_multiplier,
    fold_normalization,
    geometric_median,
    lr_multiplier,
    normalization_factor,
    resample_dead_latents,
    squared_errors,
)
from saetool.ensemble.stack import SAEEnsemble, loss_and_stats, train_step

__all__ = ['FUSED_ARCHITECTURES', 'DeadLatentTracker', 'SAEEnsemble', 'clip_grad_norm_per_member', 'coefficient_multiplier', 'fold_normalization', 'fused_loss_and_grads', 'geometric_median', 'loss_and_stats', 'lr_multiplier', 'normalization_factor', 'resample_dead_latents', 'squared_errors', 'train_step']
