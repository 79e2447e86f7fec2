"""Exact, hand-computed checks for saetool.evaluate.metrics (public cases T2, M1, M2, M3)."""

from __future__ import annotations

import pytest
import torch

from saetool.evaluate.metrics import (
    FiringCounter,
    ReconstructionStats,
    explained_variance,
    fvu,
    l0_norm,
    l1_norm,
    l2_norm,
)

F64 = torch.float64

# M1: column means are [10, 5]; total squared deviation about the mean = (1+1) + (1+1) = 4.
X_M1 = torch.tensor([[11.0, 5.0], [9.0, 5.0], [10.0, 6.0], [10.0, 4.0]], dtype=F64)


# ---------------------------------------------------------------- T2: norms over the last axis
@pytest.mark.parametrize("shape", [(2, 3, 4), (6, 4)])
def test_t2_norms_reduce_last_axis(shape):
    f = torch.ones(shape)
    tokens = shape[:-1]
    for fn, value in [(l1_norm, 4.0), (l2_norm, 2.0), (l0_norm, 4.0)]:
        out = fn(f)
        assert out.shape == tokens
        assert torch.equal(out, torch.full(tokens, value))
        assert out.mean().item() == value  # not 3.0 (L1) / 1.732 (L2)


def test_l0_counts_exactly_in_bf16():
    f = torch.ones(2, 1000, dtype=torch.bfloat16)  # bf16 cannot represent 999 or 1000 exactly
    f[1, 0] = 0
    assert l0_norm(f).tolist() == [1000.0, 999.0]


# ---------------------------------------------------------------- M1: variance about the mean
def test_m1_mean_predictor_explains_nothing():
    x_hat = X_M1.mean(dim=0).expand_as(X_M1)
    assert explained_variance(X_M1, x_hat).item() == 0.0  # not 0.992
    assert fvu(X_M1, X_M1.mean(dim=0)).item() == 1.0  # a broadcast [d] prediction
    assert explained_variance(X_M1, X_M1).item() == 1.0


# ---------------------------------------------------------------- M2: ratio of totals
X_M2 = torch.tensor([[0.0], [0.0], [0.0], [10.0]])  # mean 2.5, total variance 3*6.25 + 56.25 = 75


def test_m2_fvu_is_ratio_of_totals():
    out = fvu(X_M2, X_M2 + 1)
    assert out.dtype == F64 and out.shape == ()
    assert abs(out.item() - 4 / 75) < 1e-12  # not 0.1244


def test_m2_streaming_equals_one_batch():
    def run(batches):
        stats = ReconstructionStats(n_members=1, d_in=1, d_sae=1)
        for x in batches:
            stats.update(x, (x + 1)[None], torch.ones(1, x.shape[0], 1))
        return stats.compute()

    one = run([X_M2])
    streamed = run(X_M2.split(1))
    assert one["n_tokens"] == streamed["n_tokens"] == 4
    for out in (one, streamed):
        assert abs(out["fvu"].item() - 4 / 75) < 1e-12
        assert abs(out["explained_variance"].item() - 71 / 75) < 1e-12
        assert out["mse"].item() == 1.0
    assert abs(one["fvu"].item() - streamed["fvu"].item()) < 1e-12


# ---------------------------------------------------------------- M3: dead latents
def m3_batches():
    b1 = torch.zeros(4, 3)
    b1[0, 0] = 2.0  # latent 0: batch 1 row 0 only
    b2 = torch.zeros(4, 3)
    b2[3, 1] = 0.5  # latent 1: batch 2 row 3 only; latent 2 never fires
    return b1, b2


def assert_m3(counts, n_alive, n_dead, alive_fraction, freq):
    assert counts.tolist() == [1, 1, 0]
    assert int(n_alive) == 2 and int(n_dead) == 1
    assert float(alive_fraction) == 2 / 3
    assert freq.tolist() == [1 / 8, 1 / 8, 0.0]


@pytest.mark.parametrize("layout", [(4, 3), (2, 2, 3)])
def test_m3_firing_counter(layout):
    counter = FiringCounter(d_sae=3)
    for b in m3_batches():
        counter.update(b.reshape(layout))
    assert counter.n_tokens == 8 and counter.counts.dtype == torch.int64
    assert_m3(counter.counts, counter.n_alive(), counter.n_dead(), counter.alive_fraction(),
              counter.firing_frequency())
    assert counter.dead_fraction().item() == 1 / 3
    counter.reset()
    assert counter.n_tokens == 0 and int(counter.n_dead()) == 3


def test_m3_firing_counter_members_2x2_layout():
    b1, b2 = m3_batches()
    counter = FiringCounter(d_sae=3, n_members=2)
    for b in (b1, b2):
        counter.update(torch.stack([b, torch.ones_like(b)]).reshape(2, 2, 2, 3))
    assert counter.n_tokens == 8
    assert_m3(counter.counts[0], counter.n_alive()[0], counter.n_dead()[0],
              counter.alive_fraction()[0], counter.firing_frequency()[0])
    assert counter.counts[1].tolist() == [8, 8, 8] and counter.n_dead()[1].item() == 0


def test_m3_reconstruction_stats_one_member():
    stats = ReconstructionStats(n_members=1, d_in=2, d_sae=3)
    for b in m3_batches():
        x = torch.randn(4, 2)
        stats.update(x, x[None], b[None])
    out = stats.compute()
    assert out["n_tokens"] == 8
    assert_m3(stats.firing.counts[0], out["n_alive"][0], out["n_dead"][0],
              out["alive_fraction"][0], out["firing_frequency"][0])
    assert out["n_dead"].dtype == torch.int64
    assert out["l0"].tolist() == [2 / 8]
    assert out["l1"].tolist() == [2.5 / 8]


def test_m3_reconstruction_stats_two_members_independent():
    # Member 1: latent 2 fires on every token of batch 1, latents 0 and 1 never fire.
    stats = ReconstructionStats(n_members=2, d_in=2, d_sae=3)
    for i, b in enumerate(m3_batches()):
        other = torch.zeros(4, 3)
        if i == 0:
            other[:, 2] = 1.0
        x = torch.randn(4, 2)
        stats.update(x, torch.stack([x, x]), torch.stack([b, other]))
    out = stats.compute()
    assert_m3(stats.firing.counts[0], out["n_alive"][0], out["n_dead"][0],
              out["alive_fraction"][0], out["firing_frequency"][0])
    assert stats.firing.counts[1].tolist() == [0, 0, 4]
    assert out["n_alive"].tolist() == [2, 1] and out["n_dead"].tolist() == [1, 2]
    assert out["dead_fraction"].tolist() == [1 / 3, 2 / 3]
    assert out["firing_frequency"][1].tolist() == [0.0, 0.0, 0.5]
    assert out["l0"].tolist() == [2 / 8, 4 / 8]


# ---------------------------------------------------------------- ensemble: perfect vs mean
def test_ensemble_perfect_and_mean_members():
    x_hat = torch.stack([X_M1, X_M1.mean(dim=0).expand_as(X_M1)])  # [2, 4, 2]
    assert fvu(X_M1, x_hat).tolist() == [0.0, 1.0]
    assert explained_variance(X_M1, x_hat).tolist() == [1.0, 0.0]

    f = torch.zeros(2, 4, 5)
    for stream in ([X_M1], X_M1.split(1)):
        stats = ReconstructionStats(n_members=2, d_in=2, d_sae=5)
        for i, x in enumerate(stream):
            n = x.shape[0]
            stats.update(x, x_hat[:, i * n:(i + 1) * n], f[:, :n])
        out = stats.compute()
        assert out["fvu"].tolist() == [0.0, 1.0]
        assert out["explained_variance"].tolist() == [1.0, 0.0]
        # member 1 squared errors: 1, 1, 1, 1 over 4 tokens x 2 dims -> 4 / 8
        assert out["mse"].tolist() == [0.0, 0.5]
        assert out["mse"].dtype == F64
        assert out["n_dead"].tolist() == [5, 5] and out["dead_fraction"].tolist() == [1.0, 1.0]


def test_shape_errors():
    with pytest.raises(ValueError):
        fvu(torch.zeros(4, 2), torch.zeros(3, 5, 4, 2))
    stats = ReconstructionStats(n_members=2, d_in=2, d_sae=3)
    with pytest.raises(ValueError):
        stats.update(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(2, 4, 3))
    with pytest.raises(ValueError):
        FiringCounter(d_sae=3, n_members=2).update(torch.zeros(3, 4, 3))
