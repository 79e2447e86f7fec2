"""Hook-name resolution, validation, flattening and recording (tiny random Llama; fast)."""

from __future__ import annotations

import pytest
import torch

from saetool.lm.hooks import (
    LOCATION_ALIASES,
    flatten_activation,
    hook_widths,
    record_activations,
    resolve_hook_names,
    stop_at_layer,
    validate_hook_names,
)

# --- resolve_hook_names ---------------------------------------------------------------------------


def test_aliases_expand_per_layer_location_major():
    assert resolve_hook_names("residual", 3) == ["blocks.3.hook_resid_post"]
    assert resolve_hook_names(["residual", "mlp"], [0, 2]) == [
        "blocks.0.hook_resid_post",
        "blocks.2.hook_resid_post",
        "blocks.0.mlp.hook_post",
        "blocks.2.mlp.hook_post",
    ]
    assert resolve_hook_names("mlpout", 1) == ["blocks.1.hook_mlp_out"]
    assert resolve_hook_names("mlpin,mlpout", 1) == ["blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"]
    assert resolve_hook_names("attn_concat", 1) == ["blocks.1.attn.hook_z"]


def test_attn_alias_means_attention_output_not_residual():
    assert LOCATION_ALIASES["attn"] == "hook_attn_out"
    assert resolve_hook_names("attn", [4]) == ["blocks.4.hook_attn_out"]


def test_comma_strings_tuples_and_dedupe():
    assert resolve_hook_names("residual, mlp", (1,)) == ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    assert resolve_hook_names(("residual", "residual,attn"), "0,1") == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
        "blocks.0.hook_attn_out",
        "blocks.1.hook_attn_out",
    ]
    # a full name equal to an alias expansion is a duplicate too
    assert resolve_hook_names(["blocks.0.hook_resid_post", "residual"], [0, 1]) == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]


def test_full_names_kept_and_ignore_layers():
    assert resolve_hook_names("blocks.2.hook_resid_post") == ["blocks.2.hook_resid_post"]
    assert resolve_hook_names(["blocks.2.attn.hook_z", "ln_final.hook_normalized"], [0, 5]) == [
        "blocks.2.attn.hook_z",
        "ln_final.hook_normalized",
    ]


def test_alias_without_layers_and_unknown_location_raise():
    with pytest.raises(ValueError, match="needs layers"):
        resolve_hook_names("residual")
    with pytest.raises(ValueError, match="needs layers"):
        resolve_hook_names("mlp", [])
    with pytest.raises(ValueError, match="unknown location 'resid'"):
        resolve_hook_names("resid", 0)
    with pytest.raises(ValueError, match="no hook locations"):
        resolve_hook_names(" , ", 0)
    with pytest.raises(ValueError, match="negative"):
        resolve_hook_names("residual", -1)


# --- stop_at_layer / flatten_activation -----------------------------------------------------------


def test_stop_at_layer():
    assert stop_at_layer(["blocks.0.hook_resid_post"]) == 1
    assert stop_at_layer(["blocks.3.mlp.hook_post", "blocks.11.attn.hook_z", "blocks.2.hook_mlp_out"]) == 12
    assert stop_at_layer(["blocks.1.hook_resid_post", "ln_final.hook_normalized"]) is None
    assert stop_at_layer(["hook_embed"]) is None
    assert stop_at_layer([]) is None


def test_flatten_hook_z_is_heads_major():
    batch, pos, n_heads, d_head = 2, 3, 4, 5
    act = torch.arange(batch * pos * n_heads * d_head, dtype=torch.float32)
    act = act.reshape(batch, pos, n_heads, d_head)
    flat = flatten_activation("blocks.0.attn.hook_z", act)
    assert flat.shape == (batch * pos, n_heads * d_head)
    assert torch.equal(flat, act.reshape(batch * pos, n_heads * d_head))
    # row = (context, position), column = (head, d_head)
    assert flat[1 * pos + 2, 3 * d_head + 1] == act[1, 2, 3, 1]


def test_flatten_3d_and_bad_inputs():
    act = torch.randn(2, 3, 7)
    assert torch.equal(flatten_activation("blocks.0.hook_resid_post", act), act.reshape(6, 7))
    with pytest.raises(ValueError, match="not one vector per token"):
        flatten_activation("blocks.0.attn.hook_pattern", torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="shape"):
        flatten_activation("blocks.0.hook_resid_post", torch.randn(6, 7))
    with pytest.raises(ValueError, match="shape"):
        flatten_activation("blocks.0.hook_resid_post", torch.randn(2, 3, 4, 5))


# --- validate_hook_names --------------------------------------------------------------------------


def test_validate_accepts_good_names(tiny_model):
    validate_hook_names(tiny_model, resolve_hook_names(list(LOCATION_ALIASES), [0, 1]))
    validate_hook_names(tiny_model, ["hook_embed", "ln_final.hook_normalized"])


def test_validate_typo_suggests_valid_name(tiny_model):
    with pytest.raises(ValueError) as err:
        validate_hook_names(tiny_model, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pots"])
    message = str(err.value)
    assert "blocks.1.hook_resid_pots" in message
    assert "blocks.1.hook_resid_post" in message
    assert "\n" not in message


def test_validate_layer_out_of_range(tiny_model):
    with pytest.raises(ValueError, match=r"blocks.7.hook_resid_post.*2 layers"):
        validate_hook_names(tiny_model, ["blocks.7.hook_resid_post"])


def test_validate_gated_and_non_token_hooks(tiny_model):
    with pytest.raises(ValueError, match="set_use_attn_result"):
        validate_hook_names(tiny_model, ["blocks.0.attn.hook_result"])
    with pytest.raises(ValueError, match="not one vector per token"):
        validate_hook_names(tiny_model, ["blocks.0.attn.hook_pattern"])
    with pytest.raises(ValueError, match="no hook names"):
        validate_hook_names(tiny_model, [])


# --- hook_widths / record_activations ---------------------------------------------------------------


def test_hook_widths(tiny_model):
    cfg = tiny_model.cfg
    names = resolve_hook_names(list(LOCATION_ALIASES), [1])
    assert hook_widths(tiny_model, names) == {
        "blocks.1.hook_resid_post": cfg.d_model,
        "blocks.1.mlp.hook_post": cfg.d_mlp,
        "blocks.1.mlp.hook_in": cfg.d_model,
        "blocks.1.hook_mlp_out": cfg.d_model,
        "blocks.1.attn.hook_z": cfg.n_heads * cfg.d_head,
        "blocks.1.hook_attn_out": cfg.d_model,
    }
    assert (cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_head) == (32, 64, 4, 8)


def _tokens(batch=3, pos=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 60, (batch, pos), generator=generator)  # no special tokens (0, 1, 2)


def test_record_returns_only_requested_names_flattened(tiny_model):
    tokens = _tokens()
    # hook_attn_out and hook_mlp_out are aliases inside the bridge: its cache holds extra keys
    names = [
        "blocks.0.hook_attn_out",
        "blocks.0.hook_mlp_out",
        "blocks.0.attn.hook_z",
        "blocks.0.mlp.hook_post",
    ]
    acts = record_activations(tiny_model, tokens, names)
    assert list(acts) == names
    assert acts["blocks.0.hook_attn_out"].shape == (15, 32)
    assert acts["blocks.0.hook_mlp_out"].shape == (15, 32)
    assert acts["blocks.0.attn.hook_z"].shape == (15, 32)
    assert acts["blocks.0.mlp.hook_post"].shape == (15, 64)
    assert all(a.dtype == torch.float32 for a in acts.values())


def test_record_uses_tokens_as_given_without_bos(tiny_model):
    hf = tiny_model.original_model
    tokens = _tokens(batch=2, pos=4, seed=1)
    acts = record_activations(tiny_model, tokens, ["hook_embed", "blocks.0.hook_resid_post"])
    # embedding rows are exactly the given tokens' embeddings, in (context, position) order
    expected_embed = hf.model.embed_tokens(tokens).detach().reshape(8, -1)
    assert torch.equal(acts["hook_embed"], expected_embed)
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hidden[1].reshape(8, -1), rtol=0, atol=1e-6)


def test_hook_z_flattening_matches_o_proj(tiny_model):
    """Heads-major flattening of hook_z is the layout HF's o_proj consumes: o_proj(z) == attn_out."""
    tokens = _tokens(seed=2)
    acts = record_activations(tiny_model, tokens, ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"])
    o_proj = tiny_model.original_model.model.layers[1].self_attn.o_proj
    with torch.no_grad():
        torch.testing.assert_close(o_proj(acts["blocks.1.attn.hook_z"]), acts["blocks.1.hook_attn_out"])


def test_record_rejects_bad_tokens(tiny_model):
    with pytest.raises(ValueError, match="integer tensor"):
        record_activations(tiny_model, torch.tensor([3, 4, 5]), ["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError, match="integer tensor"):
        record_activations(tiny_model, torch.zeros(2, 3), ["blocks.0.hook_resid_post"])


def test_a_bare_hook_name_string_is_one_name_everywhere(tiny_model):
    # issue 13 item 14: a string was iterated character by character
    name = "blocks.0.hook_resid_post"
    tokens = _tokens()
    one = record_activations(tiny_model, tokens, name)
    assert list(one) == [name]
    torch.testing.assert_close(one[name], record_activations(tiny_model, tokens, [name])[name], atol=0, rtol=0)
    validate_hook_names(tiny_model, name)
    with pytest.raises(ValueError, match="unknown or unusable hook name"):
        validate_hook_names(tiny_model, "blocks.0.hook_resid_pots")
    assert hook_widths(tiny_model, name) == {name: 32}
    assert stop_at_layer("blocks.1.hook_resid_post") == 2
    assert resolve_hook_names("blocks.0.hook_resid_post") == [name]


def test_mlpin_is_the_input_of_the_hf_mlp_module(tiny_model, tiny_model_dir):
    # the alias a transcoder reads must be exactly what the MLP computes from: the HF module's input (and mlpout its
    # output), captured here with a plain PyTorch forward hook on the Hugging Face model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    seen = {}
    handle = hf.model.layers[1].mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    tokens = _tokens()
    with torch.no_grad():
        hf(tokens)
    handle.remove()
    acts = record_activations(tiny_model, tokens, resolve_hook_names("mlpin,mlpout", 1))
    torch.testing.assert_close(acts["blocks.1.mlp.hook_in"], seen["x"].reshape(-1, 32), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts["blocks.1.hook_mlp_out"], seen["y"].reshape(-1, 32), atol=1e-5, rtol=1e-5)
