"""The fused, hand-derived ensemble step equals autograd's gradients (and hence the plain-SAE oracle)."""

import pytest
import torch

from saetool.ensemble import SAEEnsemble, loss_and_stats
from saetool.fused import fused_loss_and_grads


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
