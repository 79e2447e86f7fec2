"""saetool.saved.folders.load_sae on folders written by SAELens (issue 13, item 4): every cfg.json field that changes SAELens'
encode/decode is applied exactly, or the load is refused naming the field.

Each SAELens SAE is built in-process with random weights (non-zero b_dec, b_enc / b_gate / b_mag / r_mag, decoder
rows far from unit norm, jumprelu thresholds of both signs), saved with SAELens' own save_model (or
save_inference_model for BatchTopK), read back by SAELens' SAE.load_from_disk and by saetool's load_sae, and the
two encode/decode are compared on random inputs.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from saetool.saved.folders import NORMALIZE_REFUSED, load_sae, save_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is a dev dependency (pip install -e '.[dev]')")
from sae_lens.saes.sae import SAEMetadata

D_IN, D_SAE, K = 16, 64, 8
TOL = {"atol": 1e-5, "rtol": 0}
CLASSES = {"standard": ("StandardSAE", "StandardSAEConfig"), "topk": ("TopKSAE", "TopKSAEConfig"),
           "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig"), "gated": ("GatedSAE", "GatedSAEConfig"),
           "abstopk": ("AbsTopKSAE", "AbsTopKSAEConfig")}


def randomize(sae, seed=0):
    """Every parameter ~ N(0, 1) (W_dec x 2, so its rows are far from unit norm); thresholds of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * {"W_dec": 2.0, "r_mag": 0.3}.get(name, 1.0))
    return sae


def saelens_sae(arch, seed=0, hook_name="blocks.1.hook_resid_post", **cfg_kw):
    sae_cls, cfg_cls = (getattr(sae_lens, n) for n in CLASSES[arch])
    if arch in ("topk", "abstopk"):
        cfg_kw.setdefault("k", K)
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(hook_name=hook_name, model_name="tiny"), **cfg_kw)
    return randomize(sae_cls(cfg), seed)


def inputs(*shape, seed=1):
    return torch.randn(*shape, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def saved(sae, folder):
    sae.save_model(folder)
    return folder


def edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def max_diffs(theirs, ours, x):
    """(encode, decode, forward) max |saetool - SAELens|."""
    with torch.no_grad():
        f = theirs.encode(x)
        return tuple(float((a - b).abs().max()) for a, b in ((ours.encode(x), f), (ours.decode(f), theirs.decode(f)),
                                                              (ours(x), theirs(x))))


def assert_same(theirs, ours, x):
    """saetool's encode/decode/forward equal SAELens' (atol 1e-5; in fact bit for bit)."""
    with torch.no_grad():
        f = theirs.encode(x)
        assert (f != 0).any() and (f == 0).any()
        assert_close(ours.encode(x), f, **TOL)
        assert_close(ours.decode(f), theirs.decode(f), **TOL)
        assert_close(ours(x), theirs(x), **TOL)
    assert max_diffs(theirs, ours, x) == (0.0, 0.0, 0.0)


CASES = [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {}), ("topk", {"apply_b_dec_to_input": False}), ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("topk", {"apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}), ("jumprelu", {"apply_b_dec_to_input": False}),
    ("gated", {}), ("gated", {"apply_b_dec_to_input": False}),
]


@pytest.mark.parametrize("arch,cfg_kw", CASES, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'defaults'}"
                                                    for a, kw in CASES])
def test_saelens_folder_encodes_and_decodes_as_saelens(tmp_path, arch, cfg_kw):
    folder = saved(saelens_sae(arch, **cfg_kw), tmp_path / "sl")
    theirs, ours = sae_lens.SAE.load_from_disk(str(folder)), load_sae(folder)
    assert type(theirs).__name__ == CLASSES[arch][0] and ours.arch.NAME == arch
    assert_same(theirs, ours, inputs(4, 32))


def test_issue_jumprelu_apply_b_dec_to_input_false(tmp_path):
    sae = saelens_sae("jumprelu", apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.threshold.abs_()  # SAELens-trained thresholds are positive: only the b_dec centring differs
    folder = saved(sae, tmp_path / "sl")
    theirs, ours, x = sae_lens.SAE.load_from_disk(str(folder)), load_sae(folder), inputs(256)
    with torch.no_grad():  # what load_sae computed before: the b_dec centring SAELens does not do
        w = {k: v.detach() for k, v in theirs.state_dict().items()}
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        assert float((pre * (pre > w["threshold"]) - theirs.encode(x)).abs().max()) > 1
    assert_same(theirs, ours, x)


def test_issue_topk_rescale_acts_by_decoder_norm_true(tmp_path):
    folder = saved(saelens_sae("topk", rescale_acts_by_decoder_norm=True), tmp_path / "sl")
    theirs, ours, x = sae_lens.SAE.load_from_disk(str(folder)), load_sae(folder), inputs(256)
    with torch.no_grad():  # what load_sae computed before: top-k of pre, decoded by W_dec as it is
        w = {k: v.detach() for k, v in theirs.state_dict().items()}
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        values, idx = pre.topk(K, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, values.relu())
        assert float((f @ w["W_dec"] + w["b_dec"] - theirs(x)).abs().max()) > 1
    assert_same(theirs, ours, x)


def test_negative_jumprelu_thresholds_fire_as_in_saelens(tmp_path):
    """SAELens' JumpReLU is ReLU(pre) * 1[pre > threshold]: a negative threshold lets no negative pre through."""
    sae = saelens_sae("jumprelu")
    assert (sae.threshold < 0).any()
    folder = saved(sae, tmp_path / "sl")
    assert_same(sae_lens.SAE.load_from_disk(str(folder)), load_sae(folder), inputs(64))


@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_batchtopk_saved_as_jumprelu(tmp_path, rescale):
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale,
                                              metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post"))
    sae = randomize(sae_lens.BatchTopKTrainingSAE(cfg))
    sae.topk_threshold = torch.tensor(0.7, dtype=torch.double)
    sae.save_inference_model(tmp_path / "sl")
    theirs, ours = sae_lens.SAE.load_from_disk(str(tmp_path / "sl")), load_sae(tmp_path / "sl")
    assert type(theirs).__name__ == "JumpReLUSAE" and ours.cfg["architecture"] == "jumprelu"
    assert_same(theirs, ours, inputs(64))


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "torch.float32"])
def test_saelens_dtype(tmp_path, dtype):
    sae = saelens_sae("topk", apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True)
    folder = edit_cfg(saved(sae.to(dtype=getattr(torch, dtype.removeprefix("torch."))), tmp_path / "sl"), dtype=dtype)
    theirs, ours = sae_lens.SAE.load_from_disk(str(folder)), load_sae(folder)
    assert ours.W_enc.dtype == theirs.W_enc.dtype
    assert_same(theirs, ours, inputs(64))


def test_saelens_hook_z_takes_heads_flattened(tmp_path):
    """reshape_activations "hook_z": SAELens flattens [..., n_heads, d_head] heads-major; saetool takes it flat."""
    sae = saelens_sae("standard", hook_name="blocks.1.attn.hook_z", reshape_activations="hook_z",
                      apply_b_dec_to_input=False)
    folder = saved(sae, tmp_path / "sl")
    theirs, ours = sae_lens.SAE.load_from_disk(str(folder)), load_sae(folder)
    x = inputs(3, 5).reshape(3, 5, 4, D_IN // 4)  # [batch, pos, heads, d_head]
    with torch.no_grad():
        f = theirs.encode(x)
        assert_close(ours.encode(x.flatten(-2)), f, **TOL)
        assert_close(ours.decode(f), theirs.decode(f).flatten(-2), **TOL)
        assert_close(ours(x.flatten(-2)), theirs(x).flatten(-2), **TOL)


def test_pre_6_saelens_topk_cfg(tmp_path):
    """A pre-6.0 cfg (no sae_lens_version; architecture standard with activation_fn_str topk) is a TopK SAE."""
    folder = saved(saelens_sae("topk"), tmp_path / "sl")
    edit_cfg(folder, metadata={}, architecture="standard", k=None, rescale_acts_by_decoder_norm=None,
             activation_fn_str="topk", activation_fn_kwargs={"k": K}, hook_point="blocks.1.hook_resid_post",
             normalize_activations=False)
    theirs, ours = sae_lens.SAE.load_from_disk(str(folder)), load_sae(folder)
    assert type(theirs).__name__ == "TopKSAE" and ours.arch.NAME == "topk" and ours.cfg["k"] == K
    assert_same(theirs, ours, inputs(64))


def test_saelens_scaling_factor_of_ones_is_dropped(tmp_path):
    folder = saved(saelens_sae("standard"), tmp_path / "sl")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**tensors, "scaling_factor": torch.ones(D_SAE)}, str(folder / "sae_weights.safetensors"))
    assert_same(sae_lens.SAE.load_from_disk(str(folder)), load_sae(folder), inputs(64))
    save_file({**tensors, "scaling_factor": torch.full((D_SAE,), 2.0)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="scaling_factor"):
        load_sae(folder)


def test_loaded_saelens_sae_saves_and_reloads_the_same(tmp_path):
    folder = saved(saelens_sae("topk", apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True), tmp_path / "sl")
    ours = load_sae(folder)
    save_sae(tmp_path / "again", ours.weights(), ours.cfg)
    assert_same(sae_lens.SAE.load_from_disk(str(folder)), load_sae(tmp_path / "again"), inputs(64))
    assert_same(sae_lens.SAE.load_from_disk(str(tmp_path / "again")), ours, inputs(64))


@pytest.mark.parametrize("norm", sorted(NORMALIZE_REFUSED))
def test_unsupported_normalize_activations_is_refused(tmp_path, norm):
    folder = saved(saelens_sae("standard", normalize_activations=norm), tmp_path / "sl")
    with pytest.raises(ValueError) as err:
        load_sae(folder)
    assert str(err.value) == (f"{folder / 'cfg.json'} field 'normalize_activations'={norm!r} is not supported; "
                              f"{NORMALIZE_REFUSED[norm]}")


def test_layer_norm_message(tmp_path):
    folder = saved(saelens_sae("jumprelu", normalize_activations="layer_norm"), tmp_path / "sl")
    with pytest.raises(ValueError) as err:
        load_sae(folder)
    assert str(err.value) == (
        f"{folder / 'cfg.json'} field 'normalize_activations'='layer_norm' is not supported; SAELens layer-normalises "
        "each input row and undoes it on the output, so decode would depend on the input, not only on the latents")


@pytest.mark.parametrize("field,value,why", [
    ("reshape_activations", "hook_q", "expected 'none' or 'hook_z'"),
    ("apply_b_dec_to_input", "false", "expected true or false"),
    ("rescale_acts_by_decoder_norm", 1, "expected true or false"),
    ("normalize_activations", True, NORMALIZE_REFUSED["expected_average_only_in"]),
    ("normalize_activations", "whatever", "expected 'none'"),
    ("activation_fn_str", "tanh-relu", "saetool reads 'relu' and (pre-6.0 SAELens) 'topk' with activation_fn_kwargs.k"),
])
def test_unsupported_field_values_are_refused_by_name(tmp_path, field, value, why):
    folder = edit_cfg(saved(saelens_sae("topk"), tmp_path / "sl"), **{field: value})
    with pytest.raises(ValueError) as err:
        load_sae(folder)
    assert str(err.value) == f"{folder / 'cfg.json'} field {field!r}={value!r} is not supported; {why}"


@pytest.mark.parametrize("key", ["architecture", "d_in", "d_sae"])
def test_cfg_without_architecture_is_a_value_error(tmp_path, key):
    folder = edit_cfg(saved(saelens_sae("standard"), tmp_path / "sl"), **{key: None})
    with pytest.raises(ValueError) as err:
        load_sae(folder)
    assert str(err.value) == f"{folder / 'cfg.json'} has no {key!r} field (needs architecture, d_in, d_sae)"


def test_saelens_only_architectures_are_refused(tmp_path):
    folder = saved(saelens_sae("abstopk"), tmp_path / "sl")
    with pytest.raises(ValueError, match="unknown architecture 'abstopk'"):
        load_sae(folder)
