"""Recipes (saetool.recipes) against hand-computed values; cases T4, T5, L2."""

import math

import pytest
import torch

from saetool.io import load_sae, save_sae
from saetool.recipes import (DeadLatentTracker, auxk_loss, clip_grad_norm_per_member, coefficient_multiplier,
                             decoder_weighted_l1, fold_normalization, geometric_median, lr_multiplier,
                             normalization_factor)
from saetool.sae import SparseLinearAutoencoder


def test_t4_warmup_restarts_after_every_resample():
    restarts = range(0, 1000, 100)
    got = [lr_multiplier(s, warmup_steps=10, restarts=restarts) for s in (0, 5, 10, 100, 105, 110)]
    assert got == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    assert max(lr_multiplier(s, 10, restarts=restarts) for s in range(1000)) == 1.0


def test_lr_decay_and_coefficient_warmup():
    # linear decay over the last 20 of 100 steps, no warm-up
    assert [lr_multiplier(s, 0, total_steps=100, decay_steps=20) for s in (0, 80, 90, 100)] == [1.0, 1.0, 0.5, 0.0]
    assert lr_multiplier(5, 10, total_steps=100, decay_steps=20) == 0.5
    assert [coefficient_multiplier(s, 4) for s in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert coefficient_multiplier(0, 0) == 1.0


def test_t5_normalization_factor_uses_the_whole_sample():
    sample = torch.tensor([[1.0, 0.0]]).repeat(1000, 1)
    sample[0] = torch.tensor([100.0, 0.0])
    s = normalization_factor(sample)
    assert s == pytest.approx(math.sqrt(2) / 1.099) and round(s, 3) == 1.287
    # constant data [10, 0]: scaled rows are [sqrt 2, 0], so b_dec initialised to their mean is [sqrt 2, 0]
    const = torch.tensor([[10.0, 0.0]]).repeat(50, 1)
    b_dec = (const * normalization_factor(const)).mean(0)
    torch.testing.assert_close(b_dec, torch.tensor([math.sqrt(2), 0.0]))


def test_l2_folding_the_scale_into_a_jumprelu_sae(tmp_path):
    g = torch.Generator().manual_seed(0)
    d_in, d_sae, s = 8, 16, 0.1
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g), "W_dec": torch.randn(d_sae, d_in, generator=g),
         "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d_in, generator=g),
         "threshold": torch.full((d_sae,), 0.5)}
    cfg = {"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "normalize_activations": "none"}
    trained = SparseLinearAutoencoder(w, cfg)                  # the SAE as trained, on scaled inputs s x
    folded = SparseLinearAutoencoder(fold_normalization(w, s), cfg)
    x = torch.randn(200, d_in, generator=g) * 10
    f_scaled = trained.encode(s * x)
    assert 0 < (f_scaled != 0).float().sum(-1).mean() < d_sae  # the threshold matters
    torch.testing.assert_close(folded(x), trained(s * x) / s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded.encode(x), f_scaled, atol=1e-5, rtol=1e-5)
    assert torch.equal((folded.encode(x) != 0).sum(-1), (f_scaled != 0).sum(-1))
    torch.testing.assert_close(folded.threshold, w["threshold"])
    # saved with normalize_activations "none": loading does not scale again
    save_sae(tmp_path / "sae", folded.weights(), cfg)
    torch.testing.assert_close(load_sae(tmp_path / "sae")(x), trained(s * x) / s, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="normalize_activations"):
        SparseLinearAutoencoder(w, {**cfg, "normalize_activations": "expected_average_only_in"})


def test_geometric_median_is_the_fermat_point():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    t = 1 - 1 / math.sqrt(3)                               # each side seen under 120 degrees
    torch.testing.assert_close(geometric_median(x, max_iter=1000, tol=1e-12), torch.tensor([t, t]), atol=1e-5, rtol=0)


def test_auxk_loss_hand_computed():
    pre = torch.tensor([[[1.0, 2.0, 3.0], [3.0, -1.0, 0.5]]])
    dead = torch.tensor([[False, True, True]])
    W_dec = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    e = torch.tensor([[[3.0, 2.0], [1.0, 1.0]]])
    # top-1 dead latent per token: latent 2 (3.0) and latent 2 (0.5): z W_dec = [[3, 3], [0.5, 0.5]]
    # sum (z W_dec - e)^2 = 1 + 0.5 = 1.5; sum (e - mean e)^2 = 2.5
    torch.testing.assert_close(auxk_loss(pre, dead, e, W_dec, k_aux=1), torch.tensor([0.6]))
    torch.testing.assert_close(auxk_loss(pre, torch.zeros_like(dead), e, W_dec, 1), torch.tensor([0.0]))


def test_decoder_weighted_l1():
    f = torch.tensor([[1.0, -2.0]])
    W_dec = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    torch.testing.assert_close(decoder_weighted_l1(f, W_dec), torch.tensor([3.0]))


def test_gradient_clipping_is_per_member():
    a = torch.zeros(2, 2, requires_grad=True)
    b = torch.zeros(2, 1, requires_grad=True)
    a.grad = torch.tensor([[3.0, 0.0], [0.3, 0.0]])
    b.grad = torch.tensor([[4.0], [0.4]])
    norms = clip_grad_norm_per_member([a, b], max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(a.grad, torch.tensor([[0.6, 0.0], [0.3, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([[0.8], [0.4]]), atol=1e-6, rtol=0)


def test_dead_latent_tracker_window():
    t = DeadLatentTracker(1, 3, window=8)
    t.update(torch.tensor([[[1.0, 0.0, 0.0]] * 4]))        # latent 0 fires; 4 tokens
    t.update(torch.tensor([[[0.0, 0.0, 0.0]] * 3 + [[0.0, 2.0, 0.0]]]))
    assert t.since.tolist() == [[4, 0, 8]] and t.dead.tolist() == [[False, False, True]]
