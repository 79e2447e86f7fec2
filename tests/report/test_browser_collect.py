"""The browser's collection pass against brute force over every activation of a small store, hand-computed
histograms and quantile groups, and logit effects against W_dec @ W_U computed directly."""

import numpy as np
import pytest
import torch

from saetool.evaluate import context_batches, encode_pass
from saetool.report.browser.collect import (
    HIST_EDGES,
    FeatureCollector,
    quantile_groups,
    sample_keys,
)
from saetool.saved.sae import SparseLinearAutoencoder
from tests.synthetic import write_store

HOOK = "blocks.0.hook_resid_post"


def relu_sae(W_enc, b_enc=None):
    d_in, d_sae = W_enc.shape
    w = {"W_enc": W_enc, "W_dec": torch.eye(d_sae, d_in, dtype=W_enc.dtype), "b_dec": torch.zeros(d_in),
         "b_enc": torch.zeros(d_sae) if b_enc is None else b_enc}
    return SparseLinearAutoencoder({k: v.to(W_enc.dtype) for k, v in w.items()},
                                   {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "l1_coefficient": 0.0})


def test_context_batches():
    assert context_batches(0, 40, 8, 16) == [(0, 16), (16, 32), (32, 40)]
    assert context_batches(5, 40, 8, 12) == [(5, 16), (16, 32), (32, 40)]  # 12 rounds up to 2 contexts
    assert context_batches(3, 3, 8, 16) == []


def brute_force(f, mask, ctx, first, before, after, k, score):
    """For every latent: the k positions with the largest score [n_rows, d_sae] among firing kept positions, with windows."""
    n_rows, d_sae = f.shape
    out = []
    for i in range(d_sae):
        cand = [r for r in range(n_rows) if mask[r] and f[r, i] > 0]
        cand.sort(key=lambda r: -score[r, i])
        kept = []
        for r in cand[:k]:
            win, wrow = [], []
            for q in range(r - before, r + after + 1):
                inside = 0 <= q < n_rows and q // ctx == r // ctx
                wrow.append(first + q if inside else -1)
                win.append(float(f[q, i]) if inside and mask[q] else 0.0)
            kept.append((first + r, float(f[r, i]), win, wrow))
        out.append(kept)
    return out


@pytest.mark.parametrize("batch_rows", [8, 24, 1000])
def test_top_and_samples_equal_brute_force(tmp_path, batch_rows):
    g = torch.Generator().manual_seed(1)
    ctx, n, d_in, d_sae = 8, 96, 6, 5
    acts = torch.randn(n, d_in, generator=g)
    mask = np.ones(n, dtype=bool)
    mask[::ctx] = False  # BOS at every context start
    mask[37] = False
    store = write_store(tmp_path / "s.zarr", acts, context_size=ctx, chunk_size=32, mask=mask)
    saes = [relu_sae(torch.randn(d_in, d_sae, generator=g)), relu_sae(torch.randn(d_in, d_sae, generator=g),
                                                                      torch.full((d_sae,), -0.5))]
    rows = (16, 96)  # the last 80 rows, as held-out rows
    col = FeatureCollector([d_sae, d_sae], ctx, top=4, samples=6, before=3, after=2)
    encode_pass(saes, store, HOOK, rows, "cpu", batch_rows=batch_rows, collector=col)
    for m, sae in enumerate(saes):
        f = sae.encode(acts[rows[0]:]).numpy()
        msk = mask[rows[0]:]
        res = col.result(m)
        assert res["n_tokens"] == msk.sum() == 69
        assert res["fired"].tolist() == [int(((f[:, i] != 0) & msk).sum()) for i in range(d_sae)]
        top = brute_force(f, msk, ctx, rows[0], 3, 2, 4, f)
        keys = np.repeat(sample_keys(torch.arange(rows[0], rows[1])).numpy()[:, None], d_sae, axis=1)
        samples = brute_force(f, msk, ctx, rows[0], 3, 2, 6, -keys)
        for name, expect in (("top", top), ("samples", samples)):
            got = res[name]
            for i in range(d_sae):
                k = len(expect[i])
                assert got["row"][i, :k].tolist() == [e[0] for e in expect[i]], (name, i)
                assert (got["row"][i, k:] == -1).all()
                np.testing.assert_allclose(got["value"][i, :k], [e[1] for e in expect[i]], rtol=1e-6)
                np.testing.assert_allclose(got["window"][i, :k], [e[2] for e in expect[i]], rtol=1e-6, atol=1e-7)
                assert got["window_row"][i, :k].tolist() == [e[3] for e in expect[i]]
        assert res["max_activation"].tolist() == pytest.approx([max([0.0] + [e[1] for e in t]) for t in top])


def test_histogram_and_quantile_groups_hand_computed(tmp_path):
    # one latent reads dimension 0 exactly (W_enc = 1, no bias): the activations are the stored values
    values = [0.0005, 0.5, 4.0, 2000.0, 0.25, 0.0, 0.5, 3.0, 1.5, 0.75, 6.0, 0.0]
    acts = torch.tensor(values)[:, None]
    store = write_store(tmp_path / "s.zarr", acts, context_size=4, chunk_size=4)
    col = FeatureCollector([1], 4, top=3, samples=20, before=1, after=1)
    encode_pass([relu_sae(torch.ones(1, 1))], store, HOOK, (0, 12), "cpu", batch_rows=4, collector=col)
    res = col.result(0)
    assert res["fired"].tolist() == [10] and res["density"].tolist() == [10 / 12]
    # log10: -3.30 -> underflow bin 0; 0.5 -> -0.301 in [-0.4, -0.3) = bin 27 (twice); 4 -> 0.602 in [0.6, 0.7) = 37;
    # 2000 -> overflow bin 61; 0.25 -> -0.602 in [-0.7, -0.6) = 24; 3 -> 0.477 in [0.4, 0.5) = 35;
    # 1.5 -> 0.176 in [0.1, 0.2) = 32; 0.75 -> -0.125 in [-0.2, -0.1) = 29; 6 -> 0.778 in [0.7, 0.8) = 38
    expect = np.zeros(len(HIST_EDGES) + 1, dtype=int)
    for b in (0, 27, 27, 37, 61, 24, 35, 32, 29, 38):
        expect[b] += 1
    assert res["hist"][0].tolist() == expect.tolist()
    assert res["top"]["value"][0].tolist() == [2000.0, 6.0, 4.0]
    assert res["top"]["row"][0].tolist() == [3, 10, 2]
    assert res["top"]["window"][0, 0].tolist() == [4.0, 2000.0, 0.0]  # row 4 starts the next context
    assert res["top"]["window_row"][0, 0].tolist() == [2, 3, -1]
    # 20 sample slots hold all 10 firing positions; 5 groups of 2 in value order
    s = res["samples"]
    groups = [sorted(s["value"][0][g].tolist()) for g in quantile_groups(s["value"][0], s["row"][0], 5)]
    assert groups == [[float(np.float32(0.0005)), 0.25], [0.5, 0.5], [0.75, 1.5], [3.0, 4.0], [6.0, 2000.0]]


def test_logit_effects_equal_w_dec_at_w_u(tiny_model):
    from saetool.report.browser.logits import logit_effects, logit_effects_reason, token_strings

    g = torch.Generator().manual_seed(3)
    W_dec = torch.randn(7, 32, generator=g)
    got = logit_effects(W_dec, tiny_model.W_U, k=5, chunk=3)
    direct = (W_dec @ tiny_model.W_U).detach()  # [7, d_vocab]
    for i in range(7):
        order = torch.argsort(direct[i], descending=True)
        assert got["top_ids"][i].tolist() == order[:5].tolist()
        assert got["bottom_ids"][i].tolist() == order.flip(0)[:5].tolist()
        np.testing.assert_allclose(got["top_values"][i], direct[i, order[:5]].numpy(), rtol=1e-5)
    assert logit_effects_reason("blocks.1.hook_resid_post", 32, 32) is None
    assert "not a residual-stream hook" in logit_effects_reason("blocks.0.attn.hook_z", 32, 32)
    assert logit_effects_reason("blocks.0.hook_mlp_out", 32, None) == "no model loaded"
    assert token_strings(tiny_model.tokenizer, [0, 3, 3]) == {0: "<bos>", 3: "the"}
    assert token_strings(None, [5, -1]) == {5: "#5"}
