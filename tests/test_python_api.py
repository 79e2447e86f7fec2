"""The Python API quickstart of docs/python-api.md, end to end, with the calls it shows: run_generate(GenerateConfig),
run_sweep(SweepConfig), load_sweep / load_sae / read_index, a member attached to the model's hook with
TransformerBridge.run_with_hooks, and its latents read there.

Offline and fast: the tiny random Llama of tests/helpers.py (hidden 32, 2 layers) on a small word text, not the
embedded SmolLM2 the page uses; the store keeps float32 so the comparisons are tight. The oracles are independent of
the code under test where they can be: the latents read at the hook must equal the member's encoder applied by hand
(ReLU((x - b_dec) W_enc + b_enc), from the saved safetensors) to the activations the store recorded for the same
tokens, and the sweep must hold one member per L1 value."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saetool import (
    ActivationStore,
    GenerateConfig,
    SweepConfig,
    load_model,
    load_sae,
    load_sweep,
    read_index,
    run_generate,
    run_sweep,
)
from tests.helpers import WORDS

L1_VALUES = [1e-3, 1e-2, 1e-1]
CONTEXT = 16


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("python_api")
    (root / "text").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        (root / "text" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, 300)))
    # docs/python-api.md: "Train from Python"
    store = run_generate(GenerateConfig(model=str(tiny_model_dir), dataset=str(root / "text"), locations=["residual"],
                                        layers=[1], context_size=CONTEXT, chunk_size=128, n_chunks=3, batch_size=8,
                                        dtype="float32", device="cpu", dataset_folder=str(root / "acts.zarr")),
                         log=quiet)
    index = run_sweep(SweepConfig(dataset_dir=str(root / "acts.zarr"), output_dir=str(root / "sweep"), ratio=2,
                                  l1_values=L1_VALUES, batch_size=32, eval_tokens=128, adam_lr=1e-2, device="cpu",
                                  report=False), log=quiet)
    return root, store, index


def test_the_sweep_holds_one_member_per_l1_value(trained):
    root, store, index = trained
    assert isinstance(store, ActivationStore) and store.spec.n_rows == 3 * 128
    assert store.spec.hook_names == ["blocks.1.hook_resid_post"]
    saes = load_sweep(root / "sweep")
    assert sorted(saes) == L1_VALUES                       # keyed by the L1 coefficient
    members = read_index(root / "sweep")["members"]
    assert len(members) == len(L1_VALUES) == len(index["members"])
    assert sorted(m["l1_coefficient"] for m in members) == L1_VALUES
    for sae in saes.values():
        assert (sae.d_in, sae.d_sae) == (32, 64)           # d_sae = int(d_in * ratio)
        assert sae.cfg["hook_name"] == "blocks.1.hook_resid_post"


def test_load_sae_reads_the_member_that_load_sweep_returns(trained):
    root, _, _ = trained
    saes = load_sweep(root / "sweep")
    for m in read_index(root / "sweep")["members"]:
        sae = load_sae(root / "sweep" / m["path"])
        other = saes[m["l1_coefficient"]]
        assert sae.cfg == other.cfg
        for name, value in sae.weights().items():
            assert torch.equal(value, other.weights()[name]), name


def test_latents_read_at_the_hook_are_the_encoder_of_the_stored_activations(trained, tiny_model_dir):
    root, _, _ = trained
    sae = load_sweep(root / "sweep")[1e-2]
    model = load_model(str(tiny_model_dir), device="cpu")
    store = ActivationStore.open(root / "acts.zarr")
    tokens = torch.from_numpy(np.asarray(store.group["tokens"][:4])).long()   # the first 4 stored contexts

    # docs/python-api.md: "Attach a member to the model"
    latents = []

    def record(act, hook):
        latents.append(sae.encode(act).detach())          # act [batch, pos, d_in] -> [batch, pos, d_sae]

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg["hook_name"], record)])
    (f,) = latents
    assert f.shape == (4, CONTEXT, sae.d_sae)

    # the oracle: the saved weights applied by hand to the rows the store recorded for the same tokens
    x = store.read_rows(sae.cfg["hook_name"], 0, 4 * CONTEXT)                  # [64, d_in], float32
    folder = root / "sweep" / next(m["path"] for m in read_index(root / "sweep")["members"]
                                   if m["l1_coefficient"] == 1e-2)
    w = load_file(folder / "sae_weights.safetensors")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["apply_b_dec_to_input"] is True
    expected = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(f.reshape(-1, sae.d_sae), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.encode(x), expected, atol=1e-5, rtol=1e-4)
    # a trained member at L1 1e-2 is sparse but alive on these tokens
    fired = (f > 0).float().sum(-1).mean().item()
    assert 0 < fired < sae.d_sae
