"""Recipes (saetool.ensemble.recipes) against hand-computed values; cases T4, T5, L2."""

import math

import pytest
import torch

from saetool.ensemble.recipes import (
    DeadLatentTracker,
    auxk_loss,
    clip_grad_norm_per_member,
    coefficient_multiplier,
    decoder_weighted_l1,
    fold_normalization,
    geometric_median,
    lr_multiplier,
    normalization_factor,
    resample_dead_latents,
)
from saetool.ensemble.stack import SAEEnsemble, loss_and_stats, train_step
from saetool.saved.folders import load_sae, save_sae
from saetool.saved.sae import SparseLinearAutoencoder


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
    # sum (z W_dec - e)^2 = 1 + 0.5 = 1.5; sum e^2 = 9 + 4 + 1 + 1 = 15
    torch.testing.assert_close(auxk_loss(pre, dead, e, W_dec, k_aux=1), torch.tensor([0.1]))
    torch.testing.assert_close(auxk_loss(pre, torch.zeros_like(dead), e, W_dec, 1), torch.tensor([0.0]))
    # the batch split in two "ranks": each rank's num / (global sum e^2) adds up to the whole batch's value
    halves = [auxk_loss(pre[:, i:i + 1], dead, e[:, i:i + 1], W_dec, 1, batch_sum=lambda d: d * 0 + 15.0)
              for i in range(2)]
    torch.testing.assert_close(halves[0] + halves[1], torch.tensor([0.1]))
    torch.testing.assert_close(halves[0], torch.tensor([1.0 / 15]))


def test_auxk_loss_is_finite_on_a_one_row_batch():
    # issue 13 item 3: the variance about the batch mean of one row is 0 (the old normaliser gave ~1e12); the
    # squared norm is not: row e = [1, 2], dead latent 1 fires at 2 -> z W_dec = [0, 2]; (0-1)^2 + 0 = 1; sum e^2 = 5
    pre = torch.tensor([[[0.5, 2.0]]])
    dead = torch.tensor([[False, True]])
    W_dec = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    e = torch.tensor([[[1.0, 2.0]]])
    torch.testing.assert_close(auxk_loss(pre, dead, e, W_dec, k_aux=1), torch.tensor([0.2]))


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


def test_resample_dead_latents_hand_case():
    # one member, d_in 2, d_sae 3; latent 2 is dead. Row 1 carries all the reconstruction error, so it is drawn
    # with probability 1: W_dec[2] = x_1/|x_1| = [0.6, 0.8]; W_enc[:, 2] = 0.2 * mean alive encoder norm (|[1,0]| = 1,
    # |[0,3]| = 3 -> 2) * [0.6, 0.8] = [0.24, 0.32]; b_enc[2] = 0; Adam moments of those entries zeroed only.
    W_enc = torch.nn.Parameter(torch.tensor([[[1.0, 0.0, 5.0], [0.0, 3.0, 5.0]]]))
    W_dec = torch.nn.Parameter(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]]))
    b_enc = torch.nn.Parameter(torch.tensor([[0.1, 0.2, 0.3]]))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc], lr=0.0)  # moments filled, weights unchanged
    for p_ in (W_enc, W_dec, b_enc):
        p_.grad = torch.ones_like(p_)
    opt.step()
    x = torch.tensor([[1.0, 1.0], [3.0, 4.0]])
    x_hat = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    dead = torch.tensor([[False, False, True]])
    counts = resample_dead_latents(W_enc, W_dec, b_enc, dead, x, x_hat, [torch.Generator().manual_seed(0)], opt)
    assert counts.tolist() == [1]
    torch.testing.assert_close(W_dec[0, 2], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(W_enc[0, :, 2], torch.tensor([0.24, 0.32]))
    assert b_enc[0].tolist() == pytest.approx([0.1, 0.2, 0.0])
    assert W_dec[0, :2].tolist() == [[1.0, 0.0], [0.0, 1.0]] and W_enc[0, :, :2].tolist() == [[1.0, 0.0], [0.0, 3.0]]
    for p_, where in ((W_dec, (0, 2)), (b_enc, (0, 2)), (W_enc, (0, slice(None), 2))):
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p_][key]
            assert state[where].abs().sum() == 0 and state.abs().sum() > 0


def test_decoder_norm_l1_and_clipping_train_exactly_as_saelens():
    # Oracle: SAELens' StandardTrainingSAE (loss = sum_j MSE + l1 * sum_i f_i |W_dec_i|, no decoder projection)
    # trained by hand as its SAETrainer does (Adam, clip_grad_norm_). Its loss is d_in x ours with l1 x d_in, so
    # Adam follows the same path (up to eps) when our per-member clip is its clip / d_in.
    pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    d_in, d_sae, l1, clip = 6, 12, [0.01, 0.05], 0.05
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, d_in, generator=g) * 2 + 0.5 for _ in range(6)]
    ens = SAEEnsemble("standard", d_in, d_sae, {"l1_coefficient": l1}, seeds=[0, 1], decoder_norm_l1=True)
    with torch.no_grad():
        ens.W_dec.mul_(torch.tensor([0.3, 2.0]).view(2, 1, 1))   # off unit norm: the weighting matters
        ens.b_enc.fill_(0.05)
    saes = []
    for i, v in enumerate(l1):
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=v * d_in))
        sae.load_state_dict(ens.member_weights(i), strict=False)
        saes.append((sae, torch.optim.Adam(sae.parameters(), lr=1e-2, eps=1e-12)))
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2, eps=1e-12 / d_in)
    clipped = 0
    for x in batches:
        ens.zero_grad()
        total, _ = loss_and_stats(ens, ens, x, len(x), 1.0)
        total.backward()
        clipped += int((clip_grad_norm_per_member(ens.parameters(), 1e9) > clip).sum())
        opt.zero_grad()
        train_step(ens, opt, x, grad_clip_norm=clip)
        for sae, sae_opt in saes:
            sae_opt.zero_grad()
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": sae.cfg.l1_coefficient},
                                                           dead_neuron_mask=None, n_training_steps=0,
                                                           is_logging_step=False))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), clip * d_in)
            sae_opt.step()
    assert clipped > 0                                           # the clip was active on some steps
    for i, (sae, _) in enumerate(saes):
        for name, value in ens.member_weights(i).items():
            torch.testing.assert_close(value, getattr(sae, name).detach(), atol=2e-5, rtol=1e-4)


def test_auxk_gives_dead_latents_gradient_and_members_stay_independent():
    d_in, d_sae = 4, 32
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, d_in, generator=g) for _ in range(3)]
    dead = torch.zeros(2, d_sae, dtype=torch.bool)
    dead[0, 16:] = True
    dead[1, :16] = True

    def make(members, seeds):
        return SAEEnsemble("topk", d_in, d_sae, {"k": members}, seeds=seeds, auxk_coefficient=1 / 32, k_aux=2)

    ens = make([2, 3], [0, 1])
    x_hat, _f, pre = ens(xs[0], return_pre=True)
    total, stats = loss_and_stats(ens, ens, xs[0], 4, 1.0, dead)
    expected = auxk_loss(pre, dead, xs[0].unsqueeze(0) - x_hat, ens.W_dec, 2)
    torch.testing.assert_close(stats["auxk"], expected)
    torch.testing.assert_close(stats["loss"], stats["mse"] + expected / 32)
    total.backward()
    # decoder rows of latents the top-k never picked get gradient only through AuxK
    never_picked = dead & ~stats["fired"]
    assert (ens.W_dec.grad[never_picked].abs().sum(-1) > 0).sum() >= 2
    ens.zero_grad()
    loss_and_stats(ens, ens, xs[0], 4, 1.0, None)[0].backward()
    assert ens.W_dec.grad[never_picked].abs().sum() == 0
    # the ensemble equals each member alone (same seed, same dead mask) over three Adam steps
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    alone = [make([k], [s]) for k, s in ((2, 0), (3, 1))]
    opts = [torch.optim.Adam(a.parameters(), lr=1e-2) for a in alone]
    for x in xs:
        train_step(ens, opt, x, dead=dead)
        for i, (a, o) in enumerate(zip(alone, opts)):
            train_step(a, o, x, dead=dead[i : i + 1])
    for i, a in enumerate(alone):
        for name, value in a.member_weights(0).items():
            torch.testing.assert_close(ens.member_weights(i)[name], value, atol=1e-6, rtol=1e-5)
