"""Spliced evaluation (saetool.evaluate.spliced) on the tiny random Llama, and the latent statistics (saetool.evaluate.latent_stats).

Exact values: an identity SAE (f = relu([x, -x]), x_hat = relu(x) - relu(-x) = x bit for bit) must give CE loss
recovered 1 and KL 0 exactly; a zero SAE must give CE recovered 0 exactly; one member's spliced CE must equal a hook
written by hand here, with the loss taken from the HF-style shifted cross-entropy.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saetool.evaluate.latent_stats import (
    decoder_norm_summary,
    decoder_norms,
    density_summary,
    log10_density_histogram,
    max_cosine_similarity,
    mmcs,
    mmcs_matrix,
)
from saetool.evaluate.spliced import evaluate_spliced, heldout_contexts, mean_activation
from saetool.lm.hooks import record_activations
from saetool.saved.sae import SparseLinearAutoencoder
from tests.synthetic import write_store

RESID = "blocks.0.hook_resid_post"
HOOK_Z = "blocks.1.attn.hook_z"
D = 32  # tiny Llama: hidden 32, and 4 heads x d_head 8 = 32 at hook_z


def make_sae(W_enc, W_dec, b_enc, b_dec, hook, arch="standard", **hp):
    d_in, d_sae = W_enc.shape
    hp = hp or ({"l1_coefficient": 0.0} if arch == "standard" else {})
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "hook_name": hook, **hp}
    return SparseLinearAutoencoder({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, cfg)


def identity_sae(hook, d=D):
    W = torch.cat([torch.eye(d), -torch.eye(d)], dim=1)  # [d, 2d]
    return make_sae(W, W.T.contiguous(), torch.zeros(2 * d), torch.zeros(d), hook)


def zero_sae(hook, d=D, d_sae=8):
    return make_sae(torch.zeros(d, d_sae), torch.zeros(d_sae, d), torch.zeros(d_sae), torch.zeros(d), hook)


def random_sae(hook, seed, d=D, d_sae=64):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return make_sae(W_dec.T.contiguous() * 0.8, W_dec, torch.randn(d_sae, generator=g) * 0.1,
                    torch.randn(d, generator=g) * 0.1, hook)


@pytest.fixture(scope="module")
def text():
    """6 contexts of 12 tokens: BOS first (masked); context 1 is right-padded from position 7 (masked)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 60, (6, 12), generator=g)
    tokens[:, 0] = 0
    tokens[1, 7:] = 1
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 7:] = False
    return tokens, mask


@pytest.mark.parametrize("hook", [RESID, HOOK_Z])
def test_identity_sae_recovers_everything_and_zero_sae_nothing(tiny_model, text, hook):
    tokens, mask = text
    r_id, r_zero = evaluate_spliced(tiny_model, [identity_sae(hook), zero_sae(hook)], tokens, mask, batch_size=4)
    assert r_id["spliced_ce"] == r_id["clean_ce"]
    assert r_id["ce_loss_recovered"] == 1.0
    assert r_id["ce_loss_recovered_mean_ablation"] == 1.0
    assert r_id["kl"] == 0.0
    assert r_id["ce_delta"] == 0.0
    assert r_id["kl_div_score"] == 1.0
    assert r_zero["spliced_ce"] == r_zero["zero_ablation_ce"]
    assert r_zero["ce_loss_recovered"] == 0.0
    assert r_zero["kl"] == r_zero["zero_ablation_kl"] > 0
    assert r_zero["kl_div_score"] == 0.0
    # 6 contexts x 10 scored predictions (t = 1..10 predicts t+1), context 1 only t = 1..5
    assert r_id["n_tokens"] == 5 * 10 + 5 and r_id["n_contexts"] == 6
    assert all(math.isfinite(v) for r in (r_id, r_zero) for v in r.values())


def test_spliced_ce_equals_a_hand_built_hook(tiny_model, tiny_model_dir, text):
    from transformers import AutoModelForCausalLM

    tokens, mask = text
    sae = random_sae(RESID, seed=1)
    (r,) = evaluate_spliced(tiny_model, [sae], tokens, mask, batch_size=4)

    def hook(act, hook):
        return torch.where(mask[..., None], sae(act), act)

    with torch.no_grad():
        spliced_logits = tiny_model.run_with_hooks(tokens, fwd_hooks=[(RESID, hook)], return_type="logits")
        clean_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(tokens).logits  # plain HF
    scored = mask[:, :-1] & mask[:, 1:]
    targets = tokens[:, 1:][scored]
    ce_spliced = F.cross_entropy(spliced_logits[:, :-1][scored], targets)
    ce_clean = F.cross_entropy(clean_logits[:, :-1][scored], targets)
    kl = F.kl_div(F.log_softmax(spliced_logits[:, :-1][scored], -1), F.log_softmax(clean_logits[:, :-1][scored], -1),
                  log_target=True, reduction="batchmean")  # KL(clean || spliced), mean over tokens
    assert r["spliced_ce"] == pytest.approx(float(ce_spliced), rel=1e-6)
    assert r["clean_ce"] == pytest.approx(float(ce_clean), rel=1e-5)
    assert r["kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert r["kl"] > 0
    assert r["ce_loss_recovered"] == (r["zero_ablation_ce"] - r["spliced_ce"]) / (r["zero_ablation_ce"] - r["clean_ce"])
    assert r["spliced_perplexity"] == pytest.approx(math.exp(float(ce_spliced)), rel=1e-6)


def test_stacking_variants_and_batching_do_not_change_results(tiny_model, text):
    tokens, mask = text
    saes = [random_sae(RESID, seed=s) for s in range(3)] + [identity_sae(RESID)]
    base = evaluate_spliced(tiny_model, saes, tokens, mask, batch_size=6)
    for kw in ({"batch_size": 4, "variants_per_forward": 3}, {"batch_size": 1, "variants_per_forward": 5}):
        other = evaluate_spliced(tiny_model, saes, tokens, mask, **kw)
        for a, b in zip(base, other):
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (kw, k)
    assert base[-1]["kl"] == 0.0 and base[-1]["ce_loss_recovered"] == 1.0


def test_masked_positions_do_not_count(tiny_model, text):
    """Padding ids are never scored and, being after the real tokens of a causal model, change nothing."""
    tokens, mask = text
    saes = [random_sae(RESID, seed=4)]
    other = tokens.clone()
    other[1, 7:] = 42  # different "padding"
    mean = torch.zeros(D)
    a = evaluate_spliced(tiny_model, saes, tokens, mask, mean=mean)[0]
    b = evaluate_spliced(tiny_model, saes, other, mask, mean=mean)[0]
    assert a == b


def test_mean_ablation_uses_the_mean_of_kept_positions(tiny_model, text):
    tokens, mask = text
    acts = record_activations(tiny_model, tokens, [HOOK_Z])[HOOK_Z]  # [n * ctx, 32] heads-major
    expected = acts[mask.reshape(-1)].double().mean(0)
    assert torch.allclose(mean_activation(tiny_model, HOOK_Z, tokens, mask, batch_size=4), expected, atol=1e-12)
    # a mean-ablation "SAE" (x_hat = mean everywhere) gives exactly the mean-ablation CE
    m = expected.float()
    mean_sae = make_sae(torch.zeros(D, 4), torch.zeros(4, D), torch.zeros(4), m, HOOK_Z)
    (r,) = evaluate_spliced(tiny_model, [mean_sae], tokens, mask, mean=m)
    assert r["spliced_ce"] == r["mean_ablation_ce"] and r["ce_loss_recovered_mean_ablation"] == 0.0


def test_bad_input_is_refused(tiny_model, text):
    tokens, mask = text
    with pytest.raises(ValueError, match="at least one SAE"):
        evaluate_spliced(tiny_model, [], tokens, mask)
    with pytest.raises(ValueError, match="pass hook_name"):
        evaluate_spliced(tiny_model, [identity_sae(RESID), identity_sae(HOOK_Z)], tokens, mask)
    with pytest.raises(ValueError, match="d_in 16"):
        evaluate_spliced(tiny_model, [identity_sae(RESID, d=16)], tokens, mask)
    with pytest.raises(ValueError, match="scores no prediction"):
        evaluate_spliced(tiny_model, [identity_sae(RESID)], tokens, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="unknown or unusable hook"):
        evaluate_spliced(tiny_model, [identity_sae("blocks.9.hook_resid_post")], tokens, mask)


def test_heldout_contexts_are_whole_contexts_in_the_last_rows(tmp_path):
    n, c = 20 * 8, 8
    mask = np.ones(n, dtype=bool)
    mask[::c] = False
    store = write_store(tmp_path / "s.zarr", torch.zeros(n, 4), context_size=c, chunk_size=32, mask=mask)
    tokens, m = heldout_contexts(store, eval_tokens=3 * c)
    assert tokens.dtype == torch.int64 and tokens.shape == (3, c)
    assert torch.equal(tokens, torch.arange(17 * c, n).reshape(3, c))  # synthetic tokens = row index
    assert torch.equal(m, torch.from_numpy(mask[17 * c:]).reshape(3, c))
    tokens, _ = heldout_contexts(store, eval_tokens=3 * c + 5)  # context 16 straddles the boundary: not used
    assert tokens[0, 0] == 17 * c and len(tokens) == 3
    assert len(heldout_contexts(store, eval_tokens=3 * c, max_contexts=2)[0]) == 2
    with pytest.raises(ValueError, match="no whole context"):
        heldout_contexts(store, eval_tokens=c - 1)


# ------------------------------------------------------------------------------------------------------------------
# latent statistics
# ------------------------------------------------------------------------------------------------------------------


def test_density_summary_and_histogram():
    freq = torch.tensor([0.0, 0.0, 0.05, 0.2, 1.0], dtype=torch.float64)
    s = density_summary(freq, dense_threshold=0.1)
    assert (s["n_dead"], s["n_dense"], s["d_sae"]) == (2, 2, 5)
    assert s["dead_fraction"] == 0.4 and s["dense_fraction"] == 0.4
    assert s["median_log10_density"] == pytest.approx(math.log10(0.2), abs=1e-12)
    counts, edges = log10_density_histogram(torch.tensor([0.0, 0.01, 0.1, 1.0, 0.5]), n_tokens=100)
    assert np.allclose(edges, np.linspace(-2, 0, 9))
    # log10: -2 -> bin 0, -1 -> bin 4 (an edge goes right), 0 -> last bin, -0.301 -> bin 6; the dead latent is left out
    assert counts.tolist() == [1, 0, 0, 0, 1, 0, 1, 1]


def test_mmcs_and_decoder_norms():
    A = torch.eye(2)
    B = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])  # scale is irrelevant: atoms are normalised
    assert torch.allclose(max_cosine_similarity(A, B), torch.tensor([1.0, 1.0, 2 ** -0.5]))
    assert mmcs(A, B) == pytest.approx((2 + 2 ** -0.5) / 3, abs=1e-7)  # every B atom's best match in A
    assert mmcs(B, A) == pytest.approx(1.0, abs=1e-7)
    m = mmcs_matrix([A, B])
    assert m.dtype == torch.float64 and torch.equal(m.diagonal(), torch.ones(2))
    assert m[0, 1] == pytest.approx((2 + 2 ** -0.5) / 3, abs=1e-7) and m[1, 0] == pytest.approx(1.0, abs=1e-7)
    W = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    assert decoder_norms(W).tolist() == [5.0, 0.0, 1.0]
    assert decoder_norm_summary(W) == {"min": 0.0, "mean": 2.0, "max": 5.0}
