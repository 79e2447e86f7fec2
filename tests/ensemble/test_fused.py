"""The fused, hand-derived ensemble step equals autograd's gradients (and hence the plain-SAE oracle)."""

import pytest
import torch

from saetool.ensemble.fused import fused_loss_and_grads
from saetool.ensemble.stack import SAEEnsemble, loss_and_stats


@pytest.mark.parametrize("architecture,values,tied,group,decoder_norm_l1", [
    ("standard", [0.0, 1e-2, 3e-1], False, 1, False),
    ("standard", [0.0, 1e-2, 3e-1], False, 2, False),
    ("standard", [1e-3, 1e-1], True, 4, False),
    ("topk", [1, 3, 9], False, 2, False),
    ("standard", [0.0, 1e-2, 3e-1], False, 2, True),
    ("standard", [1e-3, 1e-1], True, 1, True),
])
def test_fused_gradients_equal_autograd(architecture, values, tied, group, decoder_norm_l1):
    key = "k" if architecture == "topk" else "l1_coefficient"
    ens = SAEEnsemble(architecture, 6, 24, {key: values}, seeds=[3, 4, 5][: len(values)], tied=tied,
                      decoder_norm_l1=decoder_norm_l1).double()
    with torch.no_grad():  # move off the symmetric init so every term of the gradient is non-trivial
        for p in ens.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(37, 6, dtype=torch.float64) * 2 + 0.3
    n_total = 50  # this rank's 37 rows of a global batch of 50
    total, ref_stats = loss_and_stats(ens, ens, x, n_total, 1.0)
    total.backward()
    ref = {n: p.grad.clone() for n, p in ens.named_parameters()}
    for p in ens.parameters():
        p.grad = torch.full_like(p, float("nan"))  # stale grads must be overwritten, not accumulated
    stats = fused_loss_and_grads(ens, x, n_total, group)
    for name, p in ens.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], atol=1e-12, rtol=1e-10, msg=name)
    for k in ("loss", "mse", "sparsity", "l0"):
        torch.testing.assert_close(stats[k].double(), ref_stats[k].double(), atol=1e-6, rtol=1e-6, msg=k)


def test_empty_share_gives_zero_gradients():
    ens = SAEEnsemble("standard", 4, 8, {"l1_coefficient": [1e-2]}, seeds=[0])
    fused_loss_and_grads(ens, torch.zeros(0, 4), n_total=5, group_size=1)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ens.parameters())


# --- bf16 compute (compute_dtype=torch.bfloat16) -------------------------------------------------------------
# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 = 0.0039. Each gradient passes through a few roundings of
# the operands/results of the matmuls (x and the weights, pre/f, g_xhat, g_pre, the result); independent
# per-element errors add in quadrature, so the norm-wise relative error of a gradient is ~1-2u (measured
# 0.0023-0.0086 for the ReLU cases, against fp32 and against autocast autograd). BF16_RTOL = 2e-2 ~ 5u is 2x the
# worst measured; a wrong or missing term gives O(1) errors. TopK is discontinuous: a token whose k-th and
# (k+1)-th pre-activations lie within bf16 rounding of each other swaps a latent, an O(f) change of that
# token's gradient rather than O(u f); measured 0.011-0.039 (autocast autograd vs fp32: 0.013-0.038, the same),
# so TopK gets BF16_TOPK_RTOL = 8e-2. Statistics: measured <= 0.0018 (mse, loss), l0 <= 0.0007.
BF16_RTOL = 2e-2
BF16_TOPK_RTOL = 8e-2
BF16_CASES = [  # architecture, values, tied, group, decoder_norm_l1
    ("standard", [1e-3, 1e-2, 3e-2], False, 1, False),
    ("standard", [1e-3, 1e-2, 3e-2], False, 2, False),
    ("topk", [4, 8, 16], False, 2, False),
    ("standard", [1e-3, 1e-2], True, 2, False),
    ("standard", [1e-3, 1e-2, 3e-2], False, 2, True),
]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _bf16_problem(architecture, values, tied, decoder_norm_l1, d_in=32, d_sae=128, batch=256, seed=0):
    key = "k" if architecture == "topk" else "l1_coefficient"
    ens = SAEEnsemble(architecture, d_in, d_sae, {key: values}, seeds=list(range(len(values))), tied=tied,
                      decoder_norm_l1=decoder_norm_l1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ens.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(batch, d_in, generator=g) + 0.3
    return ens, x


def _fused_grads(ens, x, n_total, group, compute_dtype=None, fn=fused_loss_and_grads):
    for p in ens.parameters():
        p.grad = None
    stats = fn(ens, x, n_total, group, compute_dtype=compute_dtype)
    return {n: p.grad.clone() for n, p in ens.named_parameters()}, stats


@pytest.mark.parametrize("architecture,values,tied,group,decoder_norm_l1", BF16_CASES)
def test_bf16_fused_close_to_fp32(architecture, values, tied, group, decoder_norm_l1):
    ens, x = _bf16_problem(architecture, values, tied, decoder_norm_l1)
    n_total = 300
    ref, ref_stats = _fused_grads(ens, x, n_total, group)
    got, stats = _fused_grads(ens, x, n_total, group, torch.bfloat16)
    rtol = BF16_TOPK_RTOL if architecture == "topk" else BF16_RTOL
    for name in ref:
        assert got[name].dtype == torch.float32, name
        assert _rel(got[name], ref[name]) < rtol, (name, _rel(got[name], ref[name]))
    for k in ("loss", "mse", "sparsity", "l0"):
        assert stats[k].dtype == torch.float32, k
        if ref_stats[k].abs().sum():
            assert _rel(stats[k], ref_stats[k]) < BF16_RTOL, (k, _rel(stats[k], ref_stats[k]))
        else:  # topk: no sparsity term
            assert not stats[k].abs().sum(), k
    assert all(p.dtype == torch.float32 for p in ens.parameters())


@pytest.mark.parametrize("architecture,values,tied,group,decoder_norm_l1", BF16_CASES[1:])
def test_bf16_fused_close_to_autocast_autograd(architecture, values, tied, group, decoder_norm_l1):
    ens, x = _bf16_problem(architecture, values, tied, decoder_norm_l1, seed=1)
    n_total = 300
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, ref_stats = loss_and_stats(ens, ens, x, n_total, 1.0)
    total.backward()
    ref = {n: p.grad.clone() for n, p in ens.named_parameters()}
    got, stats = _fused_grads(ens, x, n_total, group, torch.bfloat16)
    rtol = BF16_TOPK_RTOL if architecture == "topk" else BF16_RTOL
    for name, want in ref.items():
        assert _rel(got[name], want) < rtol, (name, _rel(got[name], want))
    for k in ("loss", "mse", "sparsity", "l0"):
        if ref_stats[k].abs().sum():
            assert _rel(stats[k], ref_stats[k]) < BF16_RTOL, (k, _rel(stats[k], ref_stats[k]))


def _sparse_lowrank_data(n, d_in=32, n_features=64, p_active=0.05, seed=0):
    """Sparse non-negative codes over fixed random unit directions (the directions come from seed 0 always)."""
    dirs = torch.randn(n_features, d_in, generator=torch.Generator().manual_seed(0))
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, n_features, generator=g) * (torch.rand(n, n_features, generator=g) < p_active)
    return codes @ dirs


def _train_fused(compute_dtype, data, steps, batch):
    ens = SAEEnsemble("standard", 32, 128, {"l1_coefficient": [1e-3, 1e-2]}, seeds=[0, 1])
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    for i in range(steps):
        x = data[i * batch:(i + 1) * batch]
        fused_loss_and_grads(ens, x, batch, 1, compute_dtype=compute_dtype)
        opt.step()
        ens.normalize_decoder()
    return ens


def _fvu(ens, x):
    with torch.no_grad():
        x_hat, _ = ens(x)
    return (x_hat - x).pow(2).sum((1, 2)) / (x - x.mean(0)).pow(2).sum()


def test_bf16_fused_training_matches_fp32():
    steps, batch = 150, 256
    data = _sparse_lowrank_data(steps * batch, seed=1)
    held_out = _sparse_lowrank_data(4096, seed=2)
    fvu32 = _fvu(_train_fused(None, data, steps, batch), held_out)
    fvu16 = _fvu(_train_fused(torch.bfloat16, data, steps, batch), held_out)
    assert (fvu32 < 0.5).all(), fvu32  # it learned something
    rel = (fvu16 - fvu32).abs() / fvu32
    assert (rel < 1e-2).all(), (fvu32, fvu16, rel)


def test_bf16_fused_compiles():
    ens, x = _bf16_problem("standard", [1e-3, 1e-2], False, False, d_in=8, d_sae=16, batch=32)
    ref, ref_stats = _fused_grads(ens, x, 40, 2, torch.bfloat16)
    got, stats = _fused_grads(ens, x, 40, 2, torch.bfloat16, fn=torch.compile(fused_loss_and_grads))
    for name in ref:  # the same bf16 operands; compiled elementwise code may round intermediates differently
        assert _rel(got[name], ref[name]) < 1e-2, (name, _rel(got[name], ref[name]))
    for k in ("loss", "mse", "l0"):
        torch.testing.assert_close(stats[k], ref_stats[k], rtol=1e-2, atol=1e-6)
