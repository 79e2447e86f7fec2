"""`--hook_name all` / lists (saetool.multihook): one ensemble per hook on the same row batches, the store read once
per step for all of them, each ensemble equal to a separate sweep on its hook; circuit-tracer transcoder sets."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from saetool.cli import main
from saetool.config import SweepConfig, build
from saetool.io import read_index
from saetool.store import ActivationStore
from saetool.sweep import run_sweep
from tests.synthetic import write_store

A, B = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
FLAGS = ["--batch_size", "32", "--eval_tokens", "128", "--device", "cpu", "--report", "False", "--l1_values",
         "1e-3,1e-2", "--grad_clip_norm", "0.0", "--shuffle_chunks", "2"]


@pytest.fixture(scope="module")
def two_hooks(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(640, 6, generator=g) * torch.linspace(0.5, 2, 6) + 1
    path = tmp_path_factory.mktemp("two") / "s.zarr"
    write_store(path, {A: a, B: torch.tanh(a @ torch.randn(6, 4, generator=g)) * 3}, context_size=8, chunk_size=64)
    return path


def saved(folder):
    index = read_index(folder)
    return {m["path"].split("/saes/")[-1]: load_file(str(folder / m["path"] / "sae_weights.safetensors"))
            for m in index["members"]}, index


def test_all_hooks_equal_separate_sweeps_and_read_each_row_once_per_step(two_hooks, tmp_path, monkeypatch):
    for hook in (A, B):
        main(["sweep", "--dataset_dir", str(two_hooks), "--hook_name", hook, "--output_dir", str(tmp_path / hook),
              *FLAGS])
    reads = []
    original = ActivationStore.read_rows

    def counting(self, hook_name, start, stop, dtype=torch.float32):
        if stop <= 512 and stop - start <= 64:  # the loader's chunk reads of training rows (not the b_dec sample)
            reads.append((hook_name, start, stop))
        return original(self, hook_name, start, stop, dtype)

    monkeypatch.setattr(ActivationStore, "read_rows", counting)
    main(["sweep", "--dataset_dir", str(two_hooks), "--hook_name", "all", "--output_dir", str(tmp_path / "all"),
          *FLAGS])
    monkeypatch.undo()
    # 512 training rows = 8 chunks of 64: each chunk of each hook decoded exactly once in the epoch (16 steps)
    assert sorted(reads) == sorted((h, c * 64, c * 64 + 64) for h in (A, B) for c in range(8))
    top = read_index(tmp_path / "all")
    assert [m["hook_name"] for m in top["members"]] == [A, A, B, B]
    for hook in (A, B):
        together, index = saved(tmp_path / "all" / hook)
        alone, index_alone = saved(tmp_path / hook)
        assert together.keys() == alone.keys()
        for name in together:
            for k, v in together[name].items():
                torch.testing.assert_close(v, alone[name][k], atol=1e-6, rtol=0, msg=f"{hook} {name} {k}")
        for m, m_alone in zip(index["members"], index_alone["members"]):
            assert m["metrics"]["fvu"] == pytest.approx(m_alone["metrics"]["fvu"], rel=1e-5)
        assert any(m["path"].startswith(f"{hook}/saes/") for m in top["members"])
    assert "## blocks.1.hook_resid_post" in (tmp_path / "all" / "metrics.md").read_text()


def test_several_hooks_bad_input_is_refused_in_one_line(two_hooks, tmp_path):
    base = {"dataset_dir": str(two_hooks), "output_dir": str(tmp_path / "o"), "device": "cpu"}
    cases = [({"hook_name": "all", "target_hook": B}, "--hook_name all trains one SAE per hook"),
             ({"hook_name": f"{A},{B}", "target_hook": B}, "--target_hook lists 1 hooks but --hook_name 2"),
             ({"hook_name": f"{A},blocks.5.hook_x"}, "--hook_name: store .* has no hook 'blocks.5.hook_x'"),
             ({"hook_name": f"{A},{A}"}, "--hook_name lists blocks.0.hook_resid_post twice"),
             ({"hook_name": "all", "checkpoint_every": 5}, "--checkpoint_every cannot act on a sweep of several hooks")]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            run_sweep(build(SweepConfig, {**base, **flags}))
        assert "\n" not in str(e.value) and not (tmp_path / "o" / "sweep.json").exists()


def test_transcoders_at_every_layer_make_circuit_tracer_sets(tmp_path):
    g = torch.Generator().manual_seed(1)
    hooks = {}
    for layer in (0, 1):
        x = torch.randn(512, 6, generator=g) + 0.3
        hooks[f"blocks.{layer}.mlp.hook_in"] = x
        hooks[f"blocks.{layer}.hook_mlp_out"] = torch.relu(x @ torch.randn(6, 8, generator=g)) @ torch.randn(8, 6,
                                                                                                          generator=g)
    write_store(tmp_path / "s.zarr", hooks, context_size=8, chunk_size=64)
    out = tmp_path / "out"
    main(["sweep", "--dataset_dir", str(tmp_path / "s.zarr"), "--hook_name", "blocks.0.mlp.hook_in,blocks.1.mlp.hook_in",
          "--target_hook", "blocks.0.hook_mlp_out,blocks.1.hook_mlp_out", "--architecture", "jumprelu",
          "--l0_values", "1e-3,1e-2", "--skip_connection", "True", "--output_dir", str(out), "--batch_size", "32",
          "--eval_tokens", "64", "--device", "cpu", "--report", "False"])
    index = read_index(out)
    assert len(index["transcoder_sets"]) == 2 and len(index["members"]) == 4
    for j, rel in enumerate(index["transcoder_sets"]):
        folder = out / rel
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config == {"model_kind": "transcoder_set", "model_name": "synthetic",
                          "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out"}
        assert sorted(p.name for p in folder.glob("layer_*.safetensors")) == ["layer_0.safetensors",
                                                                            "layer_1.safetensors"]
        for layer in (0, 1):
            member = [m for m in index["members"] if m["hook_name"] == f"blocks.{layer}.mlp.hook_in"][j]
            ours = load_file(str(out / member["path"] / "sae_weights.safetensors"))
            cfg = json.loads((out / member["path"] / "cfg.json").read_text())
            theirs = load_file(str(folder / f"layer_{layer}.safetensors"))
            assert cfg["architecture"] == "jumprelu_skip_transcoder"
            assert set(theirs) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip"}
            assert theirs["W_enc"].shape == (24, 6) and theirs["W_skip"].shape == (6, 6)
            torch.testing.assert_close(theirs["W_enc"], ours["W_enc"].T, atol=0, rtol=0)
            for k in ("W_dec", "b_enc", "b_dec", "W_skip"):
                torch.testing.assert_close(theirs[k], ours[k], atol=0, rtol=0)
            torch.testing.assert_close(theirs["activation_function.threshold"], ours["threshold"], atol=0, rtol=0)
            # circuit-tracer's forward: F.linear(x, W_enc, b_enc) -> JumpReLU -> @ W_dec + b_dec + x @ W_skip.T
            x = torch.randn(5, 6, generator=g)
            pre = torch.nn.functional.linear(x, theirs["W_enc"], theirs["b_enc"])
            f = pre * (pre > theirs["activation_function.threshold"])
            y = f @ theirs["W_dec"] + theirs["b_dec"] + x @ theirs["W_skip"].T
            from saetool.io import load_sae

            torch.testing.assert_close(y, load_sae(out / member["path"])(x), atol=1e-5, rtol=0)
    assert np.isfinite([m["metrics"]["fvu"] for m in index["members"]]).all()


def test_report_and_export_of_several_hooks_name_the_per_hook_folders(two_hooks, tmp_path, capsys):
    main(["sweep", "--dataset_dir", str(two_hooks), "--hook_name", "all", "--output_dir", str(tmp_path / "all"),
          *FLAGS])
    capsys.readouterr()
    for args in (["report", str(tmp_path / "all"), "--model", "none"], ["export", "sparsify", str(tmp_path / "all")]):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "holds sweeps of several hooks: run saetool" in err
        assert str(tmp_path / "all" / A) in err and str(tmp_path / "all" / B) in err
    assert not (tmp_path / "all" / "report").exists() and not (tmp_path / "all" / "export").exists()
