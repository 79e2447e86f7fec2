"""Interop: saetool sweeps load in SAELens with the same encode/decode, SAELens folders load in saetool, and the
original tool's learned_dicts pickles load without its code.

The legacy pickles are written here by stand-in classes registered under the original module paths
(``autoencoders.learned_dict``, ``autoencoders.topk_encoder``), whose methods follow the original formulas
(shared/reference/original-code.md 2.2, 2.5, 2.7); the modules are removed before loading, as on a machine without
the original code.
"""

import json
import os
import sys
import types

import pytest
import torch

from saetool.config import SweepConfig
from saetool.saved.folders import load_sae, read_index
from saetool.saved.interop import load_legacy, load_saelens, saelens_cfg
from saetool.sweep.driver import run_sweep
from tests.synthetic import write_store

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is a dev dependency (pip install -e '.[dev]')")


def _sweep(tmp_path, name, **kw):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(1024, 8, generator=g) * torch.linspace(0.5, 3, 8) + 1.0
    store = write_store(tmp_path / f"{name}.zarr", acts, context_size=16, chunk_size=256)
    cfg = SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / name), batch_size=64, eval_tokens=256,
                      ratio=2, device="cpu", **kw)
    run_sweep(cfg, log=lambda *a: None)
    return tmp_path / name, acts


@pytest.mark.parametrize("kw", [{"l1_values": [1e-3, 3e-2]}, {"l1_values": [1e-2], "tied": True},
                                {"architecture": "topk", "k_values": [2, 5]}], ids=["standard", "tied", "topk"])
def test_saved_sweep_members_load_in_saelens_with_the_same_encode_and_decode(tmp_path, kw):
    out, acts = _sweep(tmp_path, "sweep", **kw)
    x = acts[:100] * 1.5
    for entry in read_index(out)["members"]:
        folder = out / entry["path"]
        ours = load_sae(folder)
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        with torch.no_grad():
            f_ours, f_theirs = ours.encode(x), theirs.encode(x)
            assert torch.allclose(f_theirs, f_ours, atol=1e-6, rtol=0)
            assert torch.allclose(theirs.decode(f_ours), ours.decode(f_ours), atol=1e-6, rtol=0)
            assert torch.allclose(theirs(x), ours(x), atol=1e-6, rtol=0)
        assert (f_ours != 0).any() and theirs.cfg.metadata.hook_name == ours.cfg["hook_name"]
        assert type(theirs).__name__ == {"standard": "StandardSAE", "topk": "TopKSAE"}[entry["architecture"]]


def test_saelens_cfg_keeps_the_metadata_through_saelens(tmp_path):
    out, _ = _sweep(tmp_path, "sweep", l1_values=[1e-3])
    folder = out / read_index(out)["members"][0]["path"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert sae_lens.SAE.load_from_disk(str(folder)).cfg.metadata.context_size is None  # lost without it
    (folder / "cfg.json").write_text(json.dumps(saelens_cfg(cfg)))
    meta = sae_lens.SAE.load_from_disk(str(folder)).cfg.metadata
    assert (meta.model_name, meta.context_size, meta.hook_name) == ("synthetic", 16, "blocks.0.hook_resid_post")
    assert load_sae(folder).cfg["metadata"] == cfg["metadata"]  # saetool reads it as before


def test_attn_hook_z_layout_agrees_with_saelens(tmp_path):
    """SAELens reshapes hook_z SAEs' inputs [..., heads, d_head] heads-major, as saetool flattens them."""
    from saetool.saved.folders import save_sae

    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(32, 64, generator=g), "W_dec": torch.randn(64, 32, generator=g),
         "b_enc": torch.randn(64, generator=g), "b_dec": torch.randn(32, generator=g)}
    cfg = {"architecture": "standard", "d_in": 32, "d_sae": 64, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "hook_name": "blocks.1.attn.hook_z",
           "l1_coefficient": 1e-3, "tied": False, "metadata": {}}
    save_sae(tmp_path / "z", w, cfg)
    theirs, ours = sae_lens.SAE.load_from_disk(str(tmp_path / "z")), load_sae(tmp_path / "z")
    assert theirs.cfg.reshape_activations == "hook_z"
    x = torch.randn(2, 5, 4, 8, generator=g)  # [batch, pos, heads, d_head]
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x.reshape(2, 5, 32)), atol=1e-6, rtol=0)
        assert torch.allclose(theirs(x).reshape(2, 5, 32), ours(x.reshape(2, 5, 32)), atol=1e-6, rtol=0)


def _saelens_sae(kind, d_in=6, d_sae=10, seed=0, **cfg_kw):
    g = torch.Generator().manual_seed(seed)
    meta = sae_lens.saes.sae.SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="tiny")
    if kind == "topk":
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=3, metadata=meta, **cfg_kw))
    else:
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta, **cfg_kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g))
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) * 2)  # rows far from unit norm
        sae.b_enc.copy_(torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
    return sae


@pytest.mark.parametrize("kind,cfg_kw", [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}), ("topk", {}),
    ("topk", {"rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}),
])
def test_saelens_folders_load_into_saetool(tmp_path, kind, cfg_kw):
    sae = _saelens_sae(kind, **cfg_kw)
    sae.save_model(tmp_path / "sl")
    ours = load_saelens(tmp_path / "sl")
    assert ours.cfg["architecture"] == kind and ours.cfg["hook_name"] == "blocks.1.hook_resid_post"
    assert ours.cfg["metadata"]["model_name"] == "tiny" and ours.cfg.get("k", 3) == 3
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        f = sae.encode(x)
        assert (f != 0).any()
        exact = not cfg_kw  # the folds (b_dec into b_enc, decoder norms) round differently
        tol = {"atol": 1e-6, "rtol": 0} if exact else {"atol": 2e-5, "rtol": 1e-5}
        assert torch.allclose(ours.encode(x), f, **tol)
        assert torch.allclose(ours(x), sae(x), **tol)


def test_unsupported_saelens_saes_are_refused(tmp_path):
    meta = sae_lens.saes.sae.SAEMetadata(hook_name="blocks.1.hook_resid_post")
    sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=4, d_sae=8, metadata=meta))
    sae.save_model(tmp_path / "j")
    with pytest.raises(ValueError, match="jumprelu"):
        load_saelens(tmp_path / "j")
    with pytest.raises(ValueError, match="not a SAELens SAE folder"):
        load_saelens(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------------------------
# The original tool's pickles
# ------------------------------------------------------------------------------------------------------------------


def _normalize(w):
    return w / torch.clamp(torch.norm(w, 2, dim=-1), 1e-8)[:, None]


class TiedSAE:
    """The original autoencoders.learned_dict.TiedSAE (its attributes and math)."""

    def __init__(self, encoder, encoder_bias, centering=(None, None, None), norm_encoder=True):
        self.encoder, self.encoder_bias, self.norm_encoder = encoder, encoder_bias, norm_encoder
        self.n_feats, self.activation_size = encoder.shape
        t, r, s = centering
        d = self.activation_size
        self.center_trans = torch.zeros(d) if t is None else t
        self.center_rot = torch.eye(d) if r is None else r
        self.center_scale = torch.ones(d) if s is None else s

    def center(self, x):
        return torch.einsum("cu,bu->bc", self.center_rot, x - self.center_trans[None, :]) * self.center_scale[None, :]

    def uncenter(self, x):
        return torch.einsum("cu,bc->bu", self.center_rot, x / self.center_scale[None, :]) + self.center_trans[None, :]

    def encode(self, x):
        enc = _normalize(self.encoder) if self.norm_encoder else self.encoder
        return torch.clamp(torch.einsum("nd,bd->bn", enc, x) + self.encoder_bias, min=0.0)

    def predict(self, x):
        return self.uncenter(torch.einsum("nd,bn->bd", _normalize(self.encoder), self.encode(self.center(x))))


class UntiedSAE:
    def __init__(self, encoder, decoder, encoder_bias):
        self.encoder, self.decoder, self.encoder_bias = encoder, decoder, encoder_bias
        self.n_feats, self.activation_size = encoder.shape

    def encode(self, x):
        return torch.clamp(torch.einsum("nd,bd->bn", self.encoder, x) + self.encoder_bias, min=0.0)

    def predict(self, x):
        return torch.einsum("nd,bn->bd", _normalize(self.decoder), self.encode(x))


class TopKLearnedDict:
    def __init__(self, dict, sparsity):
        self.dict, self.sparsity = dict, sparsity
        self.n_feats, self.activation_size = dict.shape

    def encode(self, x):
        scores = torch.einsum("ij,bj->bi", self.dict, x)
        top = torch.topk(scores, self.sparsity, dim=-1).indices
        code = torch.zeros_like(scores).scatter_(-1, top, scores.gather(-1, top))
        return torch.relu(code)

    def predict(self, x):
        return torch.einsum("ij,bi->bj", self.dict, self.encode(x))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/saetool_legacy_pwned",))


@pytest.fixture
def original_modules(monkeypatch):
    """Register the stand-ins under the original module paths for pickling; removed after the test."""
    pkg = types.ModuleType("autoencoders")
    ld = types.ModuleType("autoencoders.learned_dict")
    tk = types.ModuleType("autoencoders.topk_encoder")
    for cls, mod in ((TiedSAE, ld), (UntiedSAE, ld), (TopKLearnedDict, tk)):
        monkeypatch.setattr(cls, "__module__", mod.__name__)
        setattr(mod, cls.__name__, cls)
    for m in (pkg, ld, tk):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    return lambda: [sys.modules.pop(m.__name__) for m in (pkg, ld, tk)]


def test_legacy_learned_dicts_load_and_predict_like_the_original(tmp_path, original_modules):
    g = torch.Generator().manual_seed(0)
    d, n = 6, 12
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    centering = (torch.randn(d, generator=g), rot, torch.rand(d, generator=g) + 0.5)
    old = TiedSAE(torch.randn(n, d, generator=g) * 3, torch.randn(n, generator=g) * 0.1)
    for a in ("center_trans", "center_rot", "center_scale"):  # a pickle from before centring existed
        delattr(old, a)
    dicts = [
        (TiedSAE(torch.randn(n, d, generator=g) * 3, torch.randn(n, generator=g) * 0.1), {"dict_size": n, "l1_alpha": 1e-3}),
        (TiedSAE(torch.randn(n, d, generator=g), torch.randn(n, generator=g) * 0.1, centering), {"l1_alpha": 3e-4}),
        (TiedSAE(torch.randn(n, d, generator=g), torch.randn(n, generator=g) * 0.1, centering, norm_encoder=False),
         {"l1_alpha": 0.0}),
        (old, {"dict_size": n, "l1_alpha": 1e-4}),
        (UntiedSAE(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 2, torch.randn(n, generator=g) * 0.1),
         {"dict_size": n, "l1_alpha": 1e-3, "bias_decay": 0.0}),
        (TopKLearnedDict(_normalize(torch.randn(n, d, generator=g)), 3), {"dict_size": n, "sparsity": 3}),
    ]
    path = tmp_path / "learned_dicts_epoch_0.pt"
    torch.save(dicts, path)
    x = torch.randn(40, d, generator=g) * 2
    expected = []
    for ld, _ in dicts:
        if ld is old:  # the original's initialize_missing(): t = 0, R = I, s = 1
            ld = TiedSAE(old.encoder, old.encoder_bias)
        code = ld.encode(ld.center(x)) if isinstance(ld, TiedSAE) else ld.encode(x)
        expected.append((code, ld.predict(x)))
    original_modules()  # as on a machine without the original code
    assert "autoencoders.learned_dict" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)

    loaded = load_legacy(path, hook_name="blocks.2.hook_resid_post")
    assert [h for _, h in loaded] == [h for _, h in dicts]
    for i, ((sae, _), (code, pred)) in enumerate(zip(loaded, expected)):
        assert sae.cfg["hook_name"] == "blocks.2.hook_resid_post" and sae.d_in == d and sae.d_sae == n
        assert torch.allclose(sae.encode(x), code, atol=1e-5), i
        assert torch.allclose(sae(x), pred, atol=1e-5), i
    cfgs = [s.cfg for s, _ in loaded]
    assert [c["architecture"] for c in cfgs] == ["standard"] * 5 + ["topk"]
    assert [c.get("l1_coefficient") for c in cfgs[:5]] == [1e-3, 3e-4, 0.0, 1e-4, 1e-3] and cfgs[5]["k"] == 3
    assert [c["tied"] for c in cfgs] == [True, False, False, True, False, False]
    assert cfgs[4]["metadata"]["legacy_hyperparams"]["bias_decay"] == 0.0


def test_legacy_loader_runs_no_code_from_the_file(tmp_path):
    path = tmp_path / "learned_dicts_epoch_0.pt"
    torch.save([(Evil(), {})], path)
    marker = "/tmp/saetool_legacy_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(ValueError, match="refusing to load posix.system|refusing to load os.system"):
        load_legacy(path)
    assert not os.path.exists(marker)
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="list of"):
        load_legacy(tmp_path / "dict.pt")
