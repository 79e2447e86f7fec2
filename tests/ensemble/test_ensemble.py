"""The stacked ensemble equals separately trained plain-PyTorch SAEs (the oracle); T3; Adam's step count."""

import pytest
import torch
from torch import nn

from saetool.ensemble.stack import SAEEnsemble, init_member, train_step
from saetool.saved.folders import load_sae, save_sae
from tests.helpers import train_plain_sae


class PlainSAE(nn.Module):
    """An independent, textbook single SAE (the oracle): nn.Parameters, torch.optim.Adam, renorm after step."""

    def __init__(self, d_in, d_sae, seed, l1=0.0, k=None, tied=False):
        super().__init__()
        w = init_member(d_in, d_sae, seed)
        self.W_dec = nn.Parameter(w["W_dec"])
        self.W_enc = None if tied else nn.Parameter(w["W_enc"])
        self.b_enc, self.b_dec = nn.Parameter(w["b_enc"]), nn.Parameter(w["b_dec"])
        self.l1, self.k = l1, k

    def forward(self, x):
        W_enc = self.W_dec.T if self.W_enc is None else self.W_enc
        pre = (x - self.b_dec) @ W_enc + self.b_enc
        if self.k is None:
            f = torch.relu(pre)
        else:
            v, i = pre.topk(self.k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        x_hat = f @ self.W_dec + self.b_dec
        return ((x_hat - x) ** 2).mean() + self.l1 * f.abs().sum(-1).mean()


def batches(n, batch, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(d, generator=g) * 3
    return [torch.randn(batch, d, generator=g) * scale + 0.5 for _ in range(n)]


@pytest.mark.parametrize("architecture,values,tied,member_group", [
    ("standard", [0.0, 1e-3, 1e-2, 1e-1], False, 0),
    ("standard", [0.0, 1e-3, 1e-2, 1e-1], False, 3),   # autograd step in member groups of 3 + 1
    ("standard", [1e-3, 3e-2], True, 0),
    ("standard", [1e-3, 3e-2], True, 1),
    ("topk", [1, 3, 8], False, 0),
    ("topk", [1, 3, 8], False, 2),
])
def test_ensemble_equals_separate_saes(architecture, values, tied, member_group):
    d_in, d_sae, lr = 8, 32, 3e-3
    key = "k" if architecture == "topk" else "l1_coefficient"
    ens = SAEEnsemble(architecture, d_in, d_sae, {key: values}, seeds=[10 + i for i in range(len(values))], tied=tied)
    opt = torch.optim.Adam(ens.parameters(), lr=lr)
    data = batches(30, 64, d_in)
    for x in data:
        train_step(ens, opt, x, member_group=member_group)
    for i, v in enumerate(values):
        ref = train_plain_sae(PlainSAE(d_in, d_sae, 10 + i, **({"k": v} if key == "k" else {"l1": v}), tied=tied),
                              data, lr)
        w = ens.member_weights(i)
        ref_W_enc = ref.W_dec.T if tied else ref.W_enc
        for name, ref_t in [("W_enc", ref_W_enc), ("W_dec", ref.W_dec), ("b_enc", ref.b_enc), ("b_dec", ref.b_dec)]:
            torch.testing.assert_close(w[name], ref_t.detach(), atol=1e-5, rtol=0)
    # Adam's step counter advances (the original tool froze it at 1)
    assert all(int(s["step"]) == 30 for s in opt.state.values())


def test_member_with_more_l1_is_sparser_and_stats_come_from_the_trained_batch():
    ens = SAEEnsemble("standard", 8, 32, {"l1_coefficient": [0.0, 0.3]}, seeds=[0, 1])
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    data = batches(200, 64, 8)
    for x in data[:-1]:
        train_step(ens, opt, x)
    with torch.no_grad():
        x_hat, f = ens(data[-1])
        expected = ens.losses(data[-1], x_hat, f)
    stats = train_step(ens, opt, data[-1])
    torch.testing.assert_close(stats["loss"], expected["loss"], atol=0, rtol=0)
    assert stats["l0"][1] < stats["l0"][0]


def test_t3_decoder_atoms_stay_unit_norm_and_survive_save_load(tmp_path):
    ens = SAEEnsemble("standard", 4, 16, {"l1_coefficient": [1e-3]}, seeds=[0])
    opt = torch.optim.Adam(ens.parameters(), lr=0.1)
    x = batches(5, 32, 4)
    for b in x:
        train_step(ens, opt, b)
        norms = ens.W_dec[0].norm(dim=-1)
        assert norms.shape == (16,)
        torch.testing.assert_close(norms, torch.ones(16), atol=1e-5, rtol=0)
    cfg = {"architecture": "standard", "d_in": 4, "d_sae": 16, "dtype": "float32", "l1_coefficient": 1e-3}
    save_sae(tmp_path / "sae", ens.member_weights(0), cfg)
    sae = load_sae(tmp_path / "sae")
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(16), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(sae(x[0]), ens(x[0])[0][0], atol=1e-6, rtol=0)


def test_topk_members_keep_their_own_k():
    ens = SAEEnsemble("topk", 6, 20, {"k": [1, 4, 20]}, seeds=[0, 1, 2])
    f = ens.encode(torch.randn(50, 6))
    l0 = (f != 0).sum(-1)
    assert (l0[0] <= 1).all() and (l0[1] <= 4).all() and (l0[2] <= 20).all()
    assert l0[1].max() == 4  # ReLU can only lower the count


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="expected 2 values"):
        SAEEnsemble("standard", 4, 8, {"l1_coefficient": [1e-3]}, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"k must be in \[1, d_sae=8\]"):
        SAEEnsemble("topk", 4, 8, {"k": [9]}, seeds=[0])
    with pytest.raises(ValueError, match="unknown architecture 'ghost'"):
        SAEEnsemble("ghost", 4, 8, {}, seeds=[0])
