"""Spliced evaluation of transcoders (saetool.evaluate.spliced): the MLP's output replaced by the transcoder's prediction from
the MLP's input. Oracle: the plain Hugging Face model with a forward hook on its MLP module written here (no
TransformerLens hook names involved); a transcoder predicting 0 must equal the zero ablation exactly."""

import pytest
import torch
import torch.nn.functional as F

from saetool.evaluate.spliced import evaluate_spliced
from saetool.saved.sae import SparseLinearAutoencoder
from tests.evaluate.test_evaluate import RESID, identity_sae, text  # noqa: F401 (the `text` fixture)

IN, OUT, D = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", 32


def transcoder(seed, d_sae=48, skip=True, zero=False):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D, d_sae, generator=g) * 0.3, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, D, generator=g) * 0.2, "b_dec": torch.randn(D, generator=g) * 0.1}
    if skip:
        w["W_skip"] = torch.randn(D, D, generator=g) * 0.1
    if zero:
        w = {k: torch.zeros_like(v) if k in ("W_dec", "b_dec", "W_skip") else v for k, v in w.items()}
    cfg = {"architecture": "skip_transcoder" if skip else "transcoder", "d_in": D, "d_sae": d_sae, "d_out": D,
           "hook_name": IN, "l1_coefficient": 0.0, "apply_b_dec_to_input": False,
           "metadata": {"hook_name": IN, "hook_name_out": OUT}}
    return SparseLinearAutoencoder(w, cfg)


def test_spliced_transcoder_equals_a_hand_built_hook_on_the_hf_mlp(tiny_model, tiny_model_dir, text):  # noqa: F811
    from transformers import AutoModelForCausalLM

    tokens, mask = text
    tcs = [transcoder(1), transcoder(2, skip=False)]
    results = evaluate_spliced(tiny_model, tcs, tokens, mask, batch_size=4)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    scored = mask[:, :-1] & mask[:, 1:]
    targets = tokens[:, 1:][scored]
    with torch.no_grad():
        clean = hf(tokens).logits[:, :-1][scored]
    for tc, r in zip(tcs, results):
        def splice(module, args, output, tc=tc):   # the MLP's output -> the transcoder's prediction from its input
            return torch.where(mask[..., None], tc(args[0]), output)

        handle = hf.model.layers[0].mlp.register_forward_hook(splice)
        with torch.no_grad():
            spliced = hf(tokens).logits[:, :-1][scored]
        handle.remove()
        kl = F.kl_div(F.log_softmax(spliced, -1), F.log_softmax(clean, -1), log_target=True, reduction="batchmean")
        assert r["spliced_ce"] == pytest.approx(float(F.cross_entropy(spliced, targets)), rel=1e-5)
        assert r["clean_ce"] == pytest.approx(float(F.cross_entropy(clean, targets)), rel=1e-5)
        assert r["kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
        assert r["kl"] > 0


def test_a_transcoder_predicting_zero_is_the_zero_ablation_of_the_mlp_output(tiny_model, text):  # noqa: F811
    tokens, mask = text
    (r,) = evaluate_spliced(tiny_model, [transcoder(3, zero=True)], tokens, mask, batch_size=4)
    assert r["spliced_ce"] == r["zero_ablation_ce"] != r["clean_ce"]
    assert r["ce_loss_recovered"] == 0.0 and r["kl"] == r["zero_ablation_kl"] > 0


def test_saes_and_transcoders_are_not_mixed(tiny_model, text):  # noqa: F811
    tokens, mask = text
    with pytest.raises(ValueError, match="SAEs and transcoders are spliced at different hooks"):
        evaluate_spliced(tiny_model, [identity_sae(RESID), transcoder(1)], tokens, mask)
