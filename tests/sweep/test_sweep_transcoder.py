"""`saetool sweep --target_hook`: a transcoder sweep on a 2-hook store, its saved members (SAELens transcoder layout,
loaded back by saetool and by SAELens itself) and the one-line refusals before any training."""

import json

import numpy as np
import pytest
import torch

from saetool.cli import main
from saetool.config import SweepConfig, build
from saetool.evaluate.metrics import fvu
from saetool.saved.folders import load_sae, read_index
from saetool.store.activation_store import ActivationStore
from saetool.sweep.driver import run_sweep
from tests.synthetic import write_store

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def pair_store(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 6, generator=g) + 0.5
    y = torch.relu(x @ torch.randn(6, 10, generator=g)) @ torch.randn(10, 5, generator=g) / 4 + 1.0
    path = tmp_path_factory.mktemp("pair") / "s.zarr"
    write_store(path, {IN: x, OUT: y}, context_size=8, chunk_size=64)
    return path


def sweep(store, out, *flags):
    main(["sweep", "--dataset_dir", str(store), "--hook_name", IN, "--target_hook", OUT, "--output_dir", str(out),
          "--batch_size", "32", "--eval_tokens", "128", "--device", "cpu", "--report", "False", "--n_repetitions", "4",
          "--adam_lr", "1e-2", *flags])
    return read_index(out)


@pytest.mark.parametrize("arch,flags,saved_as", [
    ("topk", ["--k_values", "2,4", "--skip_connection", "True"], "topk_skip_transcoder"),
    ("standard", ["--l1_values", "1e-3,1e-2", "--kernel", "autograd"], "transcoder"),
    ("batchtopk", ["--k_values", "3", "--skip_connection", "True"], "jumprelu_skip_transcoder"),
])
def test_transcoder_sweep_saves_members_that_reproduce_their_heldout_metrics(pair_store, tmp_path, arch, flags,
                                                                             saved_as):
    index = sweep(pair_store, tmp_path / "out", "--architecture", arch, *flags)
    assert index["store"]["target_hook"] == OUT
    store = ActivationStore.open(pair_store)
    x, y = store.read_rows(IN, 512, 640), store.read_rows(OUT, 512, 640)
    for m in index["members"]:
        sae = load_sae(tmp_path / "out" / m["path"])
        cfg = json.loads((tmp_path / "out" / m["path"] / "cfg.json").read_text())
        assert (cfg["architecture"], cfg["d_in"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (saved_as, 6, 5, False)
        assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == (IN, OUT)
        with torch.no_grad():
            y_hat = sae(x)
            f = sae.encode(x)
        # the held-out metrics are about the target: FVU of x_out, L0 of the latents
        assert m["metrics"]["fvu"] == pytest.approx(float(fvu(y, y_hat)), rel=1e-4)
        assert m["metrics"]["l0"] == pytest.approx(float((f != 0).sum(-1).float().mean()), rel=1e-5)
        assert m["metrics"]["fvu"] < 0.8   # it learned the map (b_dec alone, the target's mean, gives FVU ~1)


def test_saved_transcoders_load_in_sae_lens_with_the_same_forward(pair_store, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    cases = {"transcoder": ["--architecture", "standard", "--l1_values", "1e-3"],
             "skip_transcoder": ["--architecture", "standard", "--l1_values", "1e-3", "--skip_connection", "True"],
             "jumprelu_transcoder": ["--architecture", "jumprelu", "--l0_values", "1e-3"],
             "jumprelu_skip_transcoder": ["--architecture", "jumprelu", "--l0_values", "1e-3", "--skip_connection",
                                          "True"]}
    x = ActivationStore.open(pair_store).read_rows(IN, 512, 640)
    for name, flags in cases.items():
        out = tmp_path / name
        index = sweep(pair_store, out, *flags)
        folder = out / index["members"][0]["path"]
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        assert type(theirs).__name__.lower() == name.replace("_", "")
        ours = load_sae(folder)
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=0)
            torch.testing.assert_close(theirs.encode(x), ours.encode(x), atol=1e-5, rtol=0)
        if "skip" in name:
            torch.testing.assert_close(theirs.W_skip.detach(), ours.W_skip.detach(), atol=0, rtol=0)
            assert ours.W_skip.abs().sum() > 0


def test_bad_transcoder_input_is_refused_in_one_line_before_training(pair_store, tmp_path):
    base = {"dataset_dir": str(pair_store), "hook_name": IN, "output_dir": str(tmp_path / "o"), "device": "cpu"}
    cases = [
        ({"skip_connection": True}, "--skip_connection needs --target_hook"),
        ({"target_hook": OUT, "architecture": "gated"}, "--target_hook applies to"),
        ({"target_hook": OUT, "normalize_activations": "expected_average_only_in"},
         "--normalize_activations cannot act on a transcoder"),
        ({"target_hook": OUT, "resample_every": 5}, "--resample_every cannot act on a transcoder"),
        ({"target_hook": OUT, "tied": True}, "--tied cannot act on a transcoder"),
        ({"target_hook": IN}, "--target_hook blocks.0.ln2.hook_normalized is --hook_name itself"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            build(SweepConfig, {**base, **flags})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"--target_hook: store .* has no hook 'blocks.0.hook_resid_post'") as e:
        run_sweep(build(SweepConfig, {**base, "target_hook": "blocks.0.hook_resid_post"}))
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_a_target_hook_with_other_rows_is_refused(tmp_path):
    x = np.ones((64, 3), dtype=np.float32)
    write_store(tmp_path / "s.zarr", {IN: x, OUT: x[:, :2]}, context_size=8, chunk_size=32)
    import zarr

    zarr.open_group(str(tmp_path / "s.zarr"))[OUT].resize((56, 2))   # damaged: fewer rows than the input hook
    cfg = build(SweepConfig, {"dataset_dir": str(tmp_path / "s.zarr"), "hook_name": IN, "target_hook": OUT,
                              "output_dir": str(tmp_path / "o"), "device": "cpu", "eval_tokens": 0})
    with pytest.raises(ValueError, match="--target_hook blocks.0.hook_mlp_out has 56 rows but --hook_name") as e:
        run_sweep(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_generate_mlpin_mlpout_then_transcoder_sweep_with_report_on_the_tiny_model(tiny_model_dir, tiny_model,
                                                                                   tmp_path):
    """One `generate` records both hooks; the sweep's report scores each transcoder on the target and splices it in
    place of the MLP output: its numbers are those of evaluate_spliced run directly on the loaded members."""
    import saetool.generate as gen
    from saetool.config import GenerateConfig
    from saetool.evaluate.spliced import evaluate_spliced, heldout_contexts
    from saetool.report.sweep_report import write_report
    from saetool.saved.folders import load_sweep
    from tests.helpers import WORDS

    text = tmp_path / "text"
    text.mkdir()
    rng = np.random.default_rng(0)
    (text / "doc.txt").write_text(" ".join(rng.choice(WORDS, 600)))
    gen.run_generate(GenerateConfig(model=str(tiny_model_dir), dataset=str(text), locations=["mlpin", "mlpout"],
                                    layers=[0], context_size=16, chunk_size=128, n_chunks=4, batch_size=8,
                                    device="cpu", dtype="float32", dataset_folder=str(tmp_path / "s.zarr")),
                     log=lambda *a: None)
    store = ActivationStore.open(tmp_path / "s.zarr")
    assert store.spec.hook_names == ["blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"]
    out = tmp_path / "sweep"
    run_sweep(build(SweepConfig, {"dataset_dir": str(tmp_path / "s.zarr"), "hook_name": "blocks.0.mlp.hook_in",
                                  "target_hook": "blocks.0.hook_mlp_out", "output_dir": str(out), "batch_size": 32,
                                  "eval_tokens": 128, "architecture": "topk", "k_values": [4, 8], "ratio": 2,
                                  "skip_connection": True, "n_repetitions": 2, "adam_lr": 1e-2, "device": "cpu",
                                  "report": False}), log=lambda *a: None)
    write_report(out, model=tiny_model, device="cpu", batch_size=4, log=lambda *a: None)
    ev = json.loads((out / "report" / "evaluation.json").read_text())
    index = read_index(out)
    for m, e in zip(ev["members"], index["members"]):
        for k in ("fvu", "l0", "mse"):
            assert m["heldout"][k] == pytest.approx(e["metrics"][k], rel=1e-5, abs=1e-9), k
    tokens, mask = heldout_contexts(store, 128)
    direct = evaluate_spliced(tiny_model, list(load_sweep(out).values()), tokens, mask, batch_size=8)
    for m, d in zip(ev["members"], direct):
        for k in ("clean_ce", "spliced_ce", "zero_ablation_ce", "mean_ablation_ce", "kl"):
            assert m["spliced"][k] == pytest.approx(d[k], rel=1e-6), k
        assert m["spliced"]["spliced_ce"] != m["spliced"]["clean_ce"]
    assert ev["sweep"]["hook_name"] == "blocks.0.mlp.hook_in -> blocks.0.hook_mlp_out"
