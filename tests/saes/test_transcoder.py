"""Transcoder ensembles equal separately trained plain-PyTorch transcoders (the oracle), on the autograd and the fused
step; the skip term's gradient by hand; the paired loader reads the same rows of both hooks."""

import numpy as np
import pytest
import torch
from torch import nn

from saetool.ensemble.fused import fused_loss_and_grads
from saetool.ensemble.stack import SAEEnsemble, init_member, train_step
from saetool.store.loader import BatchLoader
from saetool.train.step import train_batch_fused
from tests.synthetic import write_store


class PlainTranscoder(nn.Module):
    """An independent single transcoder: f = act(x W_enc + b_enc) (input not centred), y_hat = f W_dec + b_dec
    (+ x W_skip^T); loss = mean (y_hat - y)^2 + sparsity; textbook nn.Parameters."""

    def __init__(self, d_in, d_sae, d_out, seed, act, value, skip=False, bandwidth=0.5):
        super().__init__()
        w = init_member(d_in, d_sae, seed, d_out=d_out)
        self.W_enc, self.W_dec = nn.Parameter(w["W_enc"]), nn.Parameter(w["W_dec"])
        self.b_enc, self.b_dec = nn.Parameter(w["b_enc"]), nn.Parameter(w["b_dec"])
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if skip else None
        if act == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), 0.001))
        self.act, self.value, self.bandwidth, self.theta = act, value, bandwidth, None

    def forward(self, x, y):
        pre = x @ self.W_enc + self.b_enc
        penalty = 0.0
        if self.act == "standard":
            f = torch.relu(pre)
            penalty = self.value * f.abs().sum(-1).mean()
        elif self.act == "topk":
            v, i = pre.topk(self.value, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        elif self.act == "batchtopk":
            acts = torch.relu(pre)
            v, i = acts.flatten().topk(self.value * x.shape[0])
            f = torch.zeros(acts.numel()).scatter(0, i, v).view_as(acts)
            kept = f[f > 0].min().item()
            self.theta = kept if self.theta is None else 0.99 * self.theta + 0.01 * kept
        else:  # jumprelu: pseudo-derivatives as surrogate terms; eps from the RMS of the (uncentred) input
            theta = self.threshold + (self.threshold.clamp_min(0) - self.threshold).detach()
            eps = self.bandwidth * x.detach().pow(2).mean().sqrt()
            H = (pre > theta).float()
            K = ((pre - theta).abs() < eps / 2).float()
            f = pre * H + (-(theta / eps) * K).detach() * (theta - theta.detach())
            penalty = self.value * (H + (-K / eps).detach() * (theta - theta.detach())).sum(-1).mean()
        y_hat = f @ self.W_dec + self.b_dec + (0 if self.W_skip is None else x @ self.W_skip.T)
        return ((y_hat - y) ** 2).mean() + penalty


def pairs(n, batch, d_in, d_out, seed=1):
    """(x_in, x_out) batches where x_out is a fixed nonlinear function of x_in plus noise (an MLP-like target)."""
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(d_in, 12, generator=g), torch.randn(12, d_out, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, d_in, generator=g) + 0.5
        out.append((x, torch.relu(x @ A) @ B / 4 + 0.1 * torch.randn(batch, d_out, generator=g) + 1.0))
    return out


def train_plain(ref, data, lr):
    opt = torch.optim.Adam(ref.parameters(), lr=lr)
    for x, y in data:
        opt.zero_grad()
        ref(x, y).backward()
        opt.step()
        with torch.no_grad():
            ref.W_dec /= ref.W_dec.norm(dim=-1, keepdim=True)
    return ref


CASES = {  # architecture: (hyperparameters, activation of the oracle, the swept values, the fused kernel runs it)
    "standard": ({"l1_coefficient": [0.0, 1e-2, 1e-1]}, "standard", [0.0, 1e-2, 1e-1], True),
    "topk": ({"k": [1, 3, 8]}, "topk", [1, 3, 8], True),
    "batchtopk": ({"k": [2, 5]}, "batchtopk", [2, 5], False),
    "jumprelu": ({"l0_coefficient": [0.0, 0.1], "bandwidth": [0.5, 0.5]}, "jumprelu", [0.0, 0.1], False),
}


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch,kernel", [(a, k) for a, case in CASES.items()
                                         for k in (("autograd", "fused") if case[3] else ("autograd",))])
def test_transcoder_members_equal_separate_plain_transcoders(arch, kernel, skip):
    hp, act, values, _ = CASES[arch]
    d_in, d_sae, d_out, lr = 6, 24, 5, 3e-3
    ens = SAEEnsemble(arch, d_in, d_sae, hp, seeds=[10 + i for i in range(len(values))], d_out=d_out,
                      skip_connection=skip)
    opt = torch.optim.Adam(ens.parameters(), lr=lr)
    data = pairs(25, 48, d_in, d_out)
    for x, y in data:
        if kernel == "fused":
            train_batch_fused(ens, opt, x, len(x), 2, target=y)
        else:
            train_step(ens, opt, x, member_group=2, target=y)
    for i, v in enumerate(values):
        ref = train_plain(PlainTranscoder(d_in, d_sae, d_out, 10 + i, act, v, skip), data, lr)
        w = ens.member_weights(i)
        expected = {k: t.detach() for k, t in ref.named_parameters() if k != "threshold"}
        if act == "jumprelu":
            expected["threshold"] = ref.threshold.detach().clamp_min(0)
            assert v == 0.0 or (w["threshold"] != 0.001).any()   # the STE moved some thresholds
        if act == "batchtopk":
            expected["threshold"] = torch.full((d_sae,), ref.theta)
        assert set(w) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(w[name], value, atol=1e-5, rtol=1e-5, msg=f"{arch} member {i} {name}")
    if skip:
        assert ens.W_skip.abs().sum() > 0   # the skip term trained


@pytest.mark.parametrize("kernel", ["autograd", "fused"])
def test_skip_gradient_by_hand(kernel):
    # f = 0 (b_enc very negative), W_skip = b_dec = 0: y_hat = 0, so dL/dW_skip = g^T x with g = 2 (0 - y) / (n d_out)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ens = SAEEnsemble("standard", 2, 3, {"l1_coefficient": [0.0]}, seeds=[0], d_out=2, skip_connection=True)
    with torch.no_grad():
        ens.b_enc.fill_(-100.0)
    if kernel == "fused":
        fused_loss_and_grads(ens, x, 2, 1, target=y)
    else:
        from saetool.ensemble.stack import loss_and_stats

        loss_and_stats(ens, ens, x, 2, 1.0, None, y)[0].backward()
    # g = -y / 2 = [[-0.5, 0], [0, -1]]; g^T x = [[-0.5, -1], [-3, -4]]
    torch.testing.assert_close(ens.W_skip.grad[0], torch.tensor([[-0.5, -1.0], [-3.0, -4.0]]), atol=0, rtol=0)
    torch.testing.assert_close(ens.b_dec.grad[0], torch.tensor([-0.5, -1.0]), atol=0, rtol=0)
    assert float(ens.W_enc_param.grad.abs().sum()) == 0.0


def test_transcoder_settings_that_cannot_act_are_refused():
    with pytest.raises(ValueError, match="--skip_connection needs --target_hook"):
        SAEEnsemble("standard", 4, 8, {"l1_coefficient": [0.0]}, seeds=[0], skip_connection=True)
    with pytest.raises(ValueError, match="'gated' has no transcoder form"):
        SAEEnsemble("gated", 4, 8, {"l1_coefficient": [0.0]}, seeds=[0], d_out=3)
    with pytest.raises(ValueError, match="--tied cannot act on a transcoder"):
        SAEEnsemble("standard", 4, 8, {"l1_coefficient": [0.0]}, seeds=[0], d_out=3, tied=True)


def test_paired_loader_reads_the_same_rows_of_both_hooks(tmp_path):
    n = 96
    rows = torch.arange(n, dtype=torch.float32)
    x_in = torch.stack([rows, -rows, 2 * rows], 1)            # every column names its row
    x_out = torch.stack([rows + 0.5, rows * 3], 1)
    mask = np.ones(n, dtype=bool)
    mask[::8] = False
    store = write_store(tmp_path / "s.zarr", {"a.hook_in": x_in, "a.hook_out": x_out}, context_size=8, chunk_size=32,
                        mask=mask)
    loader = BatchLoader(store, ("a.hook_in", "a.hook_out"), 10, seed=3, shuffle_chunks=2)
    assert loader.widths == [3, 2]
    single = torch.cat(list(BatchLoader(store, "a.hook_in", 10, seed=3, shuffle_chunks=2).epoch(0)))
    both = torch.cat(list(loader.epoch(0)))
    torch.testing.assert_close(both[:, :3], single, atol=0, rtol=0)     # the same order as one hook
    r = both[:, 0]
    torch.testing.assert_close(both, torch.stack([r, -r, 2 * r, r + 0.5, 3 * r], 1), atol=0, rtol=0)
    assert sorted(r.tolist()) == [float(i) for i in range(n) if mask[i]]
