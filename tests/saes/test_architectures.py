"""BatchTopK, JumpReLU, Gated and Matryoshka BatchTopK: hand-computed cases (forward, loss, one gradient), the
ensemble equals separately trained plain-PyTorch SAEs (independent oracles), save/load, strict key checks."""

import math

import pytest
import torch
from torch import nn

from saetool.ensemble.stack import SAEEnsemble, init_member, train_step
from saetool.saved.folders import load_sae, save_sae
from saetool.saved.sae import SparseLinearAutoencoder
from tests.helpers import train_plain_sae


def identity_ensemble(arch, hp, **kw):
    """One member, d_in = d_sae = 2, W_enc = W_dec = I, all biases 0."""
    ens = SAEEnsemble(arch, 2, 2, hp, seeds=[0], **kw)
    with torch.no_grad():
        ens.W_enc_param.copy_(torch.eye(2)[None])
        ens.W_dec.copy_(torch.eye(2)[None])
        ens.b_dec.zero_()
        if ens.b_enc is not None:
            ens.b_enc.zero_()
    return ens


def loss_of(ens, x):
    x_hat, f, pre = ens(x, return_pre=True)
    return x_hat, f, ens.losses(x, x_hat, f, pre=pre)


def test_jumprelu_hand_computed():
    # theta = 0.5, eps = 0.2, l0 = 0.1; x = [1, 0.45]: pre = x, latent 1 is below theta and inside the kernel.
    # The bandwidth is relative to the batch's per-element RMS of x - b_dec, sqrt((1 + 0.45^2) / 2)
    rms = math.sqrt((1 + 0.45 ** 2) / 2)
    ens = identity_ensemble("jumprelu", {"l0_coefficient": [0.1], "bandwidth": [0.2 / rms]})
    with torch.no_grad():
        ens.theta_units.fill_(0.5)                       # threshold_unit 1: theta_units is the threshold
    x = torch.tensor([[1.0, 0.45]])
    _x_hat, f, losses = loss_of(ens, x)
    torch.testing.assert_close(f, torch.tensor([[[1.0, 0.0]]]))
    torch.testing.assert_close(losses["mse"], torch.tensor([0.45 ** 2 / 2]))
    torch.testing.assert_close(losses["sparsity"], torch.tensor([0.1]))
    losses["loss"].sum().backward()
    # dL/dtheta_1 = dL/df_1 * -(theta/eps) K + l0 * -(1/eps) K = (-0.45)(-2.5) + 0.1 (-5) = 0.625 (linear theta)
    torch.testing.assert_close(ens.theta_units.grad, torch.tensor([[0.0, 0.625]]))


def test_gated_hand_computed():
    # b_gate = [0, -1], b_mag = [0.5, 0], r_mag = [log 2, 0], l1 = 0.1, x = [1, 0.5]
    ens = identity_ensemble("gated", {"l1_coefficient": [0.1]})
    with torch.no_grad():
        ens.b_gate.copy_(torch.tensor([[0.0, -1.0]]))
        ens.b_mag.copy_(torch.tensor([[0.5, 0.0]]))
        ens.r_mag.copy_(torch.tensor([[math.log(2.0), 0.0]]))
    x = torch.tensor([[1.0, 0.5]])
    _x_hat, f, losses = loss_of(ens, x)
    # pi = [1, -0.5] -> gate [1, 0]; magnitude ReLU([2*1 + 0.5, 0.5]) = [2.5, 0.5]; f = [2.5, 0]
    torch.testing.assert_close(f, torch.tensor([[[2.5, 0.0]]]))
    torch.testing.assert_close(losses["mse"], torch.tensor([(1.5 ** 2 + 0.5 ** 2) / 2]))
    torch.testing.assert_close(losses["sparsity"], torch.tensor([0.1]))
    torch.testing.assert_close(losses["aux"], torch.tensor([0.5 ** 2 / 2]))   # ReLU(pi) I = [1, 0] vs x
    torch.testing.assert_close(losses["loss"], torch.tensor([1.475]))
    losses["loss"].sum().backward()
    torch.testing.assert_close(ens.r_mag.grad, torch.tensor([[3.0, 0.0]]))    # (x_hat0 - x0) * x0 * exp(r0)
    torch.testing.assert_close(ens.b_gate.grad, torch.tensor([[0.1, 0.0]]))   # L1 only; the aux error is 0 there
    # the auxiliary loss does not reach the (frozen) decoder: dW_dec = f^T (x_hat - x) only
    torch.testing.assert_close(ens.W_dec.grad, torch.tensor([[[3.75, -1.25], [0.0, 0.0]]]))


def test_batchtopk_hand_computed_and_threshold():
    ens = identity_ensemble("batchtopk", {"k": [1]})
    x = torch.tensor([[3.0, 1.0], [0.5, 2.0]])
    _x_hat, f, losses = loss_of(ens, x)
    # the k * batch = 2 largest of the whole batch: 3 (row 0) and 2 (row 1); row 0 keeps 1 latent, row 1 keeps 1
    torch.testing.assert_close(f, torch.tensor([[[3.0, 0.0], [0.0, 2.0]]]))
    torch.testing.assert_close(losses["mse"], torch.tensor([(0.5 + 0.125) / 2]))
    torch.testing.assert_close(ens.threshold, torch.tensor([2.0]))            # first update: min kept activation
    losses["loss"].sum().backward()
    torch.testing.assert_close(ens.W_dec.grad, torch.tensor([[[0.0, -1.5], [-0.5, 0.0]]]))
    ens(torch.tensor([[4.0, 0.0], [0.0, 5.0]]))                               # min kept 4: EMA rate 0.01
    torch.testing.assert_close(ens.threshold, torch.tensor([0.99 * 2 + 0.01 * 4]))
    ens.eval()
    f_inf = ens.encode(torch.tensor([[3.0, 1.0], [0.5, 2.0]]))                 # inference: pre > 2.02
    torch.testing.assert_close(f_inf, torch.tensor([[[3.0, 0.0], [0.0, 0.0]]]))
    w = ens.member_weights(0)
    torch.testing.assert_close(w["threshold"], torch.full((2,), 2.02))


def test_batchtopk_batch_sizes_differ_per_row_and_members_keep_their_k():
    ens = SAEEnsemble("batchtopk", 6, 20, {"k": [1, 4]}, seeds=[0, 1])
    f = ens.encode(torch.randn(50, 6))
    l0 = (f != 0).sum(-1)
    assert l0[0].sum() <= 50 and l0[1].sum() <= 200 and l0[1].sum() > l0[0].sum()


def test_matryoshka_hand_computed():
    ens = identity_ensemble("matryoshka_batchtopk", {"k": [1]}, options={"matryoshka_widths": [1, 2]})
    x = torch.tensor([[3.0, 1.0], [0.5, 2.0]])
    _x_hat, f, losses = loss_of(ens, x)
    torch.testing.assert_close(f, torch.tensor([[[3.0, 0.0], [0.0, 2.0]]]))
    # full: [0.5, 0.125] per token; prefix 1 reconstructs [[3, 0], [0, 0]]: [0.5, 2.125]; mean over rows of sums
    torch.testing.assert_close(losses["mse"], torch.tensor([1.625]))
    losses["loss"].sum().backward()
    torch.testing.assert_close(ens.W_dec.grad, torch.tensor([[[0.0, -3.0], [-0.5, 0.0]]]))
    with pytest.raises(ValueError, match="matryoshka_widths"):
        SAEEnsemble("matryoshka_batchtopk", 2, 4, {"k": [1]}, seeds=[0], options={"matryoshka_widths": [3, 2, 4]})


# ---- the oracles: independent plain-PyTorch SAEs, one per architecture --------------------------------------

class PlainSAE(nn.Module):
    def __init__(self, d_in, d_sae, seed):
        super().__init__()
        w = init_member(d_in, d_sae, seed)
        self.W_enc, self.W_dec = nn.Parameter(w["W_enc"]), nn.Parameter(w["W_dec"])
        self.b_enc, self.b_dec = nn.Parameter(w["b_enc"]), nn.Parameter(w["b_dec"])

    def mse(self, x_hat, x):
        return ((x_hat - x) ** 2).mean()


class PlainJumpReLU(PlainSAE):
    """Pseudo-derivatives written as surrogate terms: value + c.detach() * (theta - theta.detach()). The threshold
    is trained linearly (used clamped at 0, gradient straight through); eps = bandwidth x the batch's RMS of
    x - b_dec."""

    def __init__(self, d_in, d_sae, seed, l0, bandwidth):
        super().__init__(d_in, d_sae, seed)
        self.threshold = nn.Parameter(torch.full((d_sae,), 0.001))
        self.l0, self.bandwidth = l0, bandwidth

    def forward(self, x):
        theta = self.threshold + (self.threshold.clamp_min(0) - self.threshold).detach()
        self.eps = self.bandwidth * (x - self.b_dec).detach().pow(2).mean().sqrt()
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        H = (pre > theta).float()
        K = ((pre - theta).abs() < self.eps / 2).float()
        f = pre * H + (-(theta / self.eps) * K).detach() * (theta - theta.detach())
        step = H + (-K / self.eps).detach() * (theta - theta.detach())
        return self.mse(f @ self.W_dec + self.b_dec, x) + self.l0 * step.sum(-1).mean()


class PlainGated(PlainSAE):
    def __init__(self, d_in, d_sae, seed, l1):
        super().__init__(d_in, d_sae, seed)
        del self.b_enc
        self.b_gate, self.b_mag, self.r_mag = (nn.Parameter(torch.zeros(d_sae)) for _ in range(3))
        self.l1 = l1

    def forward(self, x):
        xc = x - self.b_dec
        pi = xc @ self.W_enc + self.b_gate
        f = (pi > 0).float() * torch.relu(xc @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag)
        aux = self.mse(torch.relu(pi) @ self.W_dec.detach() + self.b_dec.detach(), x)
        return self.mse(f @ self.W_dec + self.b_dec, x) + self.l1 * torch.relu(pi).sum(-1).mean() + aux


class PlainBatchTopK(PlainSAE):
    def __init__(self, d_in, d_sae, seed, k, widths=None):
        super().__init__(d_in, d_sae, seed)
        self.k, self.widths, self.theta = k, widths or [d_sae], None

    def forward(self, x):
        acts = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        v, i = acts.flatten().topk(self.k * x.shape[0])
        f = torch.zeros(acts.numel()).scatter(0, i, v).view_as(acts)
        kept = f[f > 0].min().item()
        self.theta = kept if self.theta is None else 0.99 * self.theta + 0.01 * kept
        return sum(self.mse(f[:, :m] @ self.W_dec[:m] + self.b_dec, x) for m in self.widths)


def batches(n, batch, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(d, generator=g) * 3
    return [torch.randn(batch, d, generator=g) * scale + 0.5 for _ in range(n)]


CASES = {
    "jumprelu": ({"l0_coefficient": [0.0, 0.05, 0.3], "bandwidth": [0.5, 0.3, 1.0]},
                 lambda i, hp: PlainJumpReLU(8, 32, 10 + i, hp["l0_coefficient"][i], hp["bandwidth"][i]), {}),
    "gated": ({"l1_coefficient": [0.0, 1e-2, 1e-1]}, lambda i, hp: PlainGated(8, 32, 10 + i, hp["l1_coefficient"][i]), {}),
    "batchtopk": ({"k": [1, 3, 8]}, lambda i, hp: PlainBatchTopK(8, 32, 10 + i, hp["k"][i]), {}),
    "matryoshka_batchtopk": ({"k": [2, 5]}, lambda i, hp: PlainBatchTopK(8, 32, 10 + i, hp["k"][i], [4, 12, 32]),
                             {"matryoshka_widths": [4, 12, 32]}),
}


@pytest.mark.parametrize("member_group", [0, 1, 2])
@pytest.mark.parametrize("arch", list(CASES))
def test_ensemble_equals_separate_saes(arch, member_group):
    # member_group > 0: the autograd step runs forward/backward for groups of members (uneven: 3 = 2 + 1)
    hp, make, options = CASES[arch]
    n = len(next(iter(hp.values())))
    lr = 3e-3
    ens = SAEEnsemble(arch, 8, 32, hp, seeds=[10 + i for i in range(n)], options=options)
    opt = torch.optim.Adam(ens.parameters(), lr=lr)
    data = batches(30, 64, 8)
    for x in data:
        train_step(ens, opt, x, member_group=member_group)
    ens.eval()
    for i in range(n):
        ref = train_plain_sae(make(i, hp), data, lr)
        w = ens.member_weights(i)
        expected = {k: v.detach() for k, v in ref.named_parameters() if k != "threshold"}
        if arch == "jumprelu":
            expected["threshold"] = ref.threshold.detach().clamp_min(0)
            assert (w["threshold"] != 0.001).any()    # the STE moved some thresholds
        if "batchtopk" in arch:
            expected["threshold"] = torch.full((32,), ref.theta)
        assert set(w) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(w[name], value, atol=1e-5, rtol=1e-5, msg=f"{arch} member {i} {name}")


@pytest.mark.parametrize("arch", list(CASES))
def test_save_load_gives_same_encode_decode(arch, tmp_path):
    hp, _, options = CASES[arch]
    n = len(next(iter(hp.values())))
    ens = SAEEnsemble(arch, 8, 32, hp, seeds=list(range(n)), options=options)
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    for x in batches(10, 64, 8):
        train_step(ens, opt, x)
    ens.eval()
    x = batches(1, 100, 8, seed=5)[0]
    with torch.no_grad():
        x_hat, f = ens(x)
    for i in range(n):
        cfg = {**ens.member_cfg(i), "dtype": "float32"}
        save_sae(tmp_path / f"m{i}", ens.member_weights(i), cfg)
        sae = load_sae(tmp_path / f"m{i}")
        assert sae.cfg["architecture"] == {"batchtopk": "jumprelu"}.get(arch, arch)
        assert sae.arch.NAME == arch
        torch.testing.assert_close(sae.encode(x), f[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(sae(x), x_hat[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(sae.decode(f[i]), x_hat[i], atol=1e-6, rtol=0)
    # missing or unexpected tensors are refused, not dropped
    weights = ens.member_weights(0)
    cfg = {**ens.member_cfg(0), "dtype": "float32"}
    extra = "threshold" if arch != "gated" else "r_mag"
    with pytest.raises(ValueError, match="must have exactly"):
        SparseLinearAutoencoder({k: v for k, v in weights.items() if k != extra}, cfg)
    with pytest.raises(ValueError, match="must have exactly"):
        SparseLinearAutoencoder({**weights, "log_threshold": weights["W_dec"][:, 0]}, cfg)


def test_a_plain_sae_lens_jumprelu_checkpoint_loads():
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(4, 6, generator=g), "W_dec": torch.randn(6, 4, generator=g),
         "b_enc": torch.randn(6, generator=g), "b_dec": torch.randn(4, generator=g), "threshold": torch.full((6,), 0.3)}
    sae = SparseLinearAutoencoder(w, {"architecture": "jumprelu", "d_in": 4, "d_sae": 6})
    x = torch.randn(5, 4, generator=g)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(sae.encode(x), pre * (pre > 0.3))


def test_batch_topk_over_a_global_batch_split_across_two_ranks():
    # Two "ranks" hold 5 and 3 rows of an 8-row batch; each keeps exactly its entries among the k * 8 largest
    # of the whole batch (candidates merged through `gather`), and both see the same global minimum kept.
    from saetool.saes._common import batch_topk, global_batch

    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(2, 8, 6, generator=g))                     # 2 members, k = 1 and 3
    k = torch.tensor([1, 3])
    parts = (acts[:, :5], acts[:, 5:])
    sent = {}

    def capture(rank):
        def gather(t):
            sent[rank] = t
            return torch.stack([t, t])
        return gather

    for r, part in enumerate(parts):            # first pass: what each rank sends
        with global_batch(8, capture(r)):
            batch_topk(part, k)
    outs, kept = [], []
    for r, part in enumerate(parts):
        with global_batch(8, lambda t: torch.stack([sent[0], sent[1]])) as ctx:
            outs.append(batch_topk(part, k))
            kept.append(ctx.kept_min)
    expected = batch_topk(acts, k)
    assert torch.equal(torch.cat(outs, dim=1), expected)
    assert torch.equal((expected != 0).sum((1, 2)), torch.minimum(k * 8, (acts > 0).sum((1, 2))))
    smallest = torch.where(expected > 0, expected, torch.full_like(expected, float("inf"))).flatten(1).amin(-1)
    assert torch.equal(kept[0], smallest) and torch.equal(kept[1], smallest)
