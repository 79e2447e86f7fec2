"""`saetool export`: sparsify's folder layout (fields, tensors, and sparsify's own encode/decode formula against
saetool's SAE) and Neuronpedia's bulk layout with SAELens' sparsity.safetensors, field by field."""

import gzip
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saetool.cli import main
from saetool.config import SweepConfig
from saetool.evaluate import encode_pass
from saetool.export.sparsify import sparsify_hookpoint, sparsify_weights
from saetool.report.browser.collect import FeatureCollector
from saetool.saved.folders import load_sweep, read_index
from saetool.saved.sae import SparseLinearAutoencoder
from saetool.store.activation_store import ActivationStore
from saetool.sweep.driver import run_sweep
from tests.report.test_browser_pages import sweep_dir  # noqa: F401 - the tiny-Llama sweep fixture
from tests.synthetic import write_store

# sparsify's SparseCoderConfig fields (sparsify/config.py) + d_in, as SparseCoder.save_to_disk writes them
SPARSIFY_CFG = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                "skip_connection", "transcode", "d_in"}
# Neuronpedia's db_models (neuronpedia utils): Feature, Activation, SourceRelease, Model, SourceSet, Source
NP_FEATURE = {"modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector",
              "vectorLabel", "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues",
              "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
              "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
              "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1", "neg_str",
              "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
              "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
              "decoder_weights_dist"}
NP_ACTIVATION = {"id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values",
                 "creatorId", "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue", "createdAt",
                 "lossValues", "logitContributions", "binMin", "binMax", "binContains", "qualifyingTokenIndex"}
NP_RELEASE = {"name", "description", "creatorName", "creatorId", "visibility", "isNewUi", "featured",
              "descriptionShort", "urls", "creatorEmail", "creatorNameShort", "defaultSourceSetName",
              "defaultSourceId", "defaultUmapSourceIds", "createdAt"}
NP_MODEL = {"id", "instruct", "creatorId", "displayNameShort", "displayName", "tlensId", "dimension", "visibility",
            "defaultSourceSetName", "defaultSourceId", "inferenceEnabled", "layers", "neuronsPerLayer", "createdAt",
            "owner", "updatedAt", "website"}
NP_SOURCESET = {"modelId", "name", "creatorId", "hasDashboards", "visibility", "description", "type", "creatorName",
                "urls", "creatorEmail", "releaseName", "defaultOfModelId", "defaultRange", "defaultShowBreaks",
                "showDfa", "showCorrelated", "showHeadAttribution", "showUmap", "createdAt"}
NP_SOURCE = {"id", "modelId", "setName", "creatorId", "hasDashboards", "inferenceEnabled", "inferenceHosts",
             "saelensConfig", "saelensRelease", "saelensSaeId", "hfRepoId", "hfFolderId", "visibility",
             "defaultOfModelId", "hasUmap", "hasUmapLogSparsity", "hasUmapClusters", "num_prompts",
             "num_tokens_in_prompt", "dataset", "notes", "createdAt"}


def quiet(*a):
    pass


def sparsify_forward(t: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """sparsify's SparseCoder.encode/decode as published: top-k of ReLU((x - b_dec) W^T + b), then f W_dec + b_dec."""
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(cfg["k"], dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals) @ t["W_dec"] + t["b_dec"]


def test_export_sparsify(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    store = write_store(tmp_path / "s.zarr", torch.randn(256, 8, generator=g), context_size=16, chunk_size=64)
    run_sweep(SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "a"), batch_size=32, eval_tokens=64,
                          architecture="topk", k_values=[2, 3], ratio=2, device="cpu"), log=quiet)
    main(["export", "sparsify", str(tmp_path / "a")])
    assert "2 sparsify coders (layers.0)" in capsys.readouterr().out
    x = torch.randn(50, 8, generator=g)
    for entry, sae in zip(read_index(tmp_path / "a")["members"], load_sweep(tmp_path / "a").values()):
        folder = tmp_path / "a" / "export" / "sparsify" / entry["path"].split("/")[-1] / "layers.0"
        cfg = json.loads((folder / "cfg.json").read_text())
        assert set(cfg) == SPARSIFY_CFG
        assert cfg == {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": 16,
                       "k": sae.cfg["k"], "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": 8}
        t = load_file(folder / "sae.safetensors")
        assert {k: tuple(v.shape) for k, v in t.items()} == {"encoder.weight": (16, 8), "encoder.bias": (16,),
                                                             "W_dec": (16, 8), "b_dec": (8,)}
        torch.testing.assert_close(sparsify_forward(t, cfg, x), sae(x), rtol=1e-5, atol=1e-5)
    # a SAELens-style TopK member (x not centred, acts rescaled by decoder norms) folds into sparsify's form
    w = {"W_enc": torch.randn(8, 16, generator=g), "W_dec": torch.randn(16, 8, generator=g) * 3,
         "b_enc": torch.randn(16, generator=g), "b_dec": torch.randn(8, generator=g)}
    sae = SparseLinearAutoencoder(w, {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 4,
                                      "apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True})
    t, cfg = sparsify_weights(sae)
    torch.testing.assert_close(sparsify_forward(t, cfg, x), sae(x), rtol=1e-4, atol=1e-4)
    assert sparsify_hookpoint("blocks.3.hook_mlp_out") == "layers.3.mlp"
    with pytest.raises(ValueError, match=r"no sparsify hookpoint known for 'blocks.0.attn.hook_z'.*--hookpoint"):
        sparsify_hookpoint("blocks.0.attn.hook_z")
    run_sweep(SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "b"), batch_size=32, eval_tokens=64,
                          l1_values=[1e-3], ratio=2, device="cpu"), log=quiet)
    with pytest.raises(SystemExit) as e:
        main(["export", "sparsify", str(tmp_path / "b")])
    assert e.value.code == 2 and "cannot be exported to sparsify: its coders are TopK only" in capsys.readouterr().err
    assert not (tmp_path / "b" / "export").exists()


def read_jsonl_gz(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_export_neuronpedia_fields_and_sparsity(sweep_dir, tiny_model, tmp_path):  # noqa: F811
    from saetool.config import NeuronpediaConfig
    from saetool.export.neuronpedia import export_neuronpedia

    cfg = NeuronpediaConfig(output_dir=str(sweep_dir), export_dir=str(tmp_path / "np"), browser_top=4,
                            browser_samples=5, browser_before=3, browser_after=1, device="cpu")
    export_neuronpedia(cfg, model=tiny_model, log=quiet)
    index = read_index(sweep_dir)
    store = ActivationStore.open(index["store"]["path"])
    saes = list(load_sweep(sweep_dir).values())
    col = FeatureCollector([s.d_sae for s in saes], 16, top=4, samples=5, before=3, after=1)
    encode_pass(saes, store, "blocks.0.hook_resid_post", (store.spec.n_rows - 128, store.spec.n_rows), "cpu",
                collector=col)
    tokens = np.asarray(store.group["tokens"][:]).reshape(-1)
    tok = tiny_model.tokenizer
    for m, (entry, sae) in enumerate(zip(index["members"], saes)):
        res = col.result(m)
        # sparsity.safetensors beside the member: SAELens' key and log10(density + 1e-10)
        sp = load_file(sweep_dir / entry["path"] / "sparsity.safetensors")
        assert list(sp) == ["sparsity"] and sp["sparsity"].dtype == torch.float32
        expect = torch.log10(torch.tensor(res["fired"], dtype=torch.float64) / res["n_tokens"] + 1e-10).float()
        torch.testing.assert_close(sp["sparsity"], expect, rtol=0, atol=0)
        source = f"0-saetool-{entry['path'].split('/')[-1].lower().replace('_', '-').replace('.', '-')}"
        folder = tmp_path / "np" / tiny_model_id(index) / source
        for name, fields in (("release", NP_RELEASE), ("model", NP_MODEL), ("sourceset", NP_SOURCESET),
                             ("source", NP_SOURCE)):
            lines = (folder / f"{name}.jsonl").read_text().splitlines()
            assert len(lines) == 1 and set(json.loads(lines[0])) == fields, name
        feats = read_jsonl_gz(folder / "features" / "batch-0.jsonl.gz")
        acts = read_jsonl_gz(folder / "activations" / "batch-0.jsonl.gz")
        assert [f["index"] for f in feats] == [str(i) for i in range(64)]
        for f in feats:
            i = int(f["index"])
            assert set(f) == NP_FEATURE and f["layer"] == source
            assert f["frac_nonzero"] == res["density"][i]
            direct = (sae.W_dec[i] @ tiny_model.W_U).detach()
            assert f["pos_str"] == [tok.decode([t]) for t in torch.argsort(direct, descending=True)[:10].tolist()]
            assert f["neg_str"] == [tok.decode([t]) for t in torch.argsort(direct)[:10].tolist()]
            assert sum(f["freq_hist_data_bar_heights"]) == res["fired"][i]
        for a in acts:
            assert set(a) == NP_ACTIVATION
            assert a["maxValue"] == max(a["values"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
        top = [a for a in acts if a["index"] == "5" and a["binMin"] == -1]
        assert [a["maxValue"] for a in top] == pytest.approx([float(f"{v:.4g}") for v in res["top"]["value"][5]
                                                              if v > 0])
        for a, row in zip(top, res["top"]["row"][5]):  # the context's own tokens, as the tokenizer spells them
            first = row - a["qualifyingTokenIndex"]
            assert a["tokens"] == [tok.decode([t]) for t in tokens[first:first + len(a["tokens"])]]


def tiny_model_id(index):
    from pathlib import Path

    return Path(ActivationStore.open(index["store"]["path"]).spec.model).name.lower().replace("_", "-")


def test_export_cli_errors(tmp_path, capsys):
    for argv, message in ((["export"], "saetool export needs a format: neuronpedia or sparsify (saetool export FORMAT OUTPUT_DIR)"),
                          (["export", "csv", str(tmp_path)], "saetool export needs a format: neuronpedia or sparsify (saetool export FORMAT OUTPUT_DIR)"),
                          (["export", "sparsify", str(tmp_path)], f"{tmp_path} is not a finished sweep (no sweep.json)"),
                          (["export", "neuronpedia", str(tmp_path), "--browser_logits", "30"],
                           "--browser_logits must be in 0..20 (Neuronpedia shows at most 20)")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and capsys.readouterr().err == f"saetool: error: {message}\n"


def test_export_dir_replaces_only_an_earlier_export(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    store = write_store(tmp_path / "s.zarr", torch.randn(256, 8, generator=g), context_size=16, chunk_size=64)
    out = tmp_path / "a"
    run_sweep(SweepConfig(dataset_dir=str(store.path), output_dir=str(out), batch_size=32, eval_tokens=64,
                          architecture="topk", k_values=[2], ratio=2, device="cpu"), log=quiet)
    weights = sorted(p.name for p in (out / "saes").rglob("*"))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    for target, message in ((out / "saes", "holds"), (out, "holds"), (precious, "is not an earlier saetool export")):
        with pytest.raises(SystemExit) as e:
            main(["export", "sparsify", str(out), "--export_dir", str(target)])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in (out / "saes").rglob("*")) == weights      # nothing removed
    assert (precious / "thesis.txt").read_text() == "keep me"
    fresh = tmp_path / "fresh"
    main(["export", "sparsify", str(out), "--export_dir", str(fresh)])
    main(["export", "sparsify", str(out), "--export_dir", str(fresh)])       # an earlier export is replaced
    assert (fresh / ".saetool-export").is_file() and (fresh / "topk_k_2" / "layers.0" / "cfg.json").is_file()
