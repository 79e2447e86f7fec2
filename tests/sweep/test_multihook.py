"""`--hook_name all` / lists (saetool.sweep.multihook): one ensemble per hook on the same row batches, the store read once
per step for all of them, each ensemble equal to a separate sweep on its hook; circuit-tracer transcoder sets."""

import json
import os
import re
import socket
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import saetool.sweep.driver as driver_mod
from saetool.cli import main
from saetool.config import SweepConfig, build
from saetool.saved.folders import read_index
from saetool.store.activation_store import ActivationStore
from saetool.sweep.driver import run_sweep
from saetool.train.checkpoint import Checkpointer
from tests.helpers import interrupt_on_call, kill_processes_with, launch
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
             ({"hook_name": "all", "array": "x", "eval_tokens": 128}, "--array names one foreign array; it cannot act"),
             ({"hook_name": " , ", "eval_tokens": 128}, "--hook_name ' , ' lists no hook")]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            run_sweep(build(SweepConfig, {**base, **flags}))
        assert "\n" not in str(e.value) and not (tmp_path / "o" / "sweep.json").exists()


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """A store of an MLP's input and output at layers 0 and 1."""
    g = torch.Generator().manual_seed(1)
    hooks = {}
    for layer in (0, 1):
        x = torch.randn(512, 6, generator=g) + 0.3
        hooks[f"blocks.{layer}.mlp.hook_in"] = x
        hooks[f"blocks.{layer}.hook_mlp_out"] = torch.relu(x @ torch.randn(6, 8, generator=g)) @ torch.randn(8, 6,
                                                                                                          generator=g)
    path = tmp_path_factory.mktemp("layered") / "s.zarr"
    write_store(path, hooks, context_size=8, chunk_size=64)
    return path


def test_transcoders_at_every_layer_make_circuit_tracer_sets(layered, tmp_path):
    g = torch.Generator().manual_seed(2)
    out = tmp_path / "out"
    main(["sweep", "--dataset_dir", str(layered), "--hook_name", "blocks.0.mlp.hook_in,blocks.1.mlp.hook_in",
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
            from saetool.saved.folders import load_sae

            torch.testing.assert_close(y, load_sae(out / member["path"])(x), atol=1e-5, rtol=0)
    assert np.isfinite([m["metrics"]["fvu"] for m in index["members"]]).all()


def test_a_config_of_one_transcoder_ensemble_per_layer_makes_circuit_tracer_sets(layered, tmp_path):
    config = {"dataset_dir": str(layered), "output_dir": str(tmp_path / "out"), "architecture": "topk",
              "k_values": [2, 4], "batch_size": 32, "eval_tokens": 64, "device": "cpu", "report": False,
              "ensembles": [{"name": f"layer{i}", "hook_name": f"blocks.{i}.mlp.hook_in",
                             "target_hook": f"blocks.{i}.hook_mlp_out"} for i in (1, 0)]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    main(["sweep", "--config", str(tmp_path / "sweep.yaml")])
    index = read_index(tmp_path / "out")
    assert index["transcoder_sets"] == ["transcoder_sets/topk_k_2", "transcoder_sets/topk_k_4"]
    for rel, k in zip(index["transcoder_sets"], (2, 4), strict=True):
        config = yaml.safe_load((tmp_path / "out" / rel / "config.yaml").read_text())
        assert config == {"model_kind": "transcoder_set", "model_name": "synthetic", "feature_input_hook": "mlp.hook_in",
                          "feature_output_hook": "hook_mlp_out", "activation": "topk", "k": k}
        for layer in (0, 1):  # layer_0 is the second ensemble of the file
            ours = load_file(str(tmp_path / "out" / f"layer{layer}" / "saes" / f"topk_k_{k}" / "sae_weights.safetensors"))
            theirs = load_file(str(tmp_path / "out" / rel / f"layer_{layer}.safetensors"))
            torch.testing.assert_close(theirs["W_enc"], ours["W_enc"].T, atol=0, rtol=0)
            torch.testing.assert_close(theirs["W_dec"], ours["W_dec"], atol=0, rtol=0)


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


def every_member(folder):
    index = read_index(folder)
    return {m["path"]: load_file(str(folder / m["path"] / "sae_weights.safetensors")) for m in index["members"]}, index


def assert_same_members(a, b, atol=0.0):
    ours, index = every_member(a)
    theirs, _ = every_member(b)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for name in ours:
        for k, v in ours[name].items():
            torch.testing.assert_close(v, theirs[name][k], atol=atol, rtol=0, msg=f"{name} {k}")
    return index


@pytest.fixture(scope="module")
def uninterrupted(two_hooks, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "all"
    main(["sweep", "--dataset_dir", str(two_hooks), "--hook_name", "all", "--output_dir", str(out), *FLAGS])
    return out


def test_resume_from_checkpoints_at_different_steps_equals_uninterrupted(two_hooks, uninterrupted, tmp_path,
                                                                          monkeypatch):
    """Killed between the two ensembles' checkpoints of step 6: A resumes from step 6, B from step 3."""
    out = tmp_path / "all"
    args = ["sweep", "--dataset_dir", str(two_hooks), "--hook_name", "all", "--output_dir", str(out), *FLAGS,
            "--checkpoint_every", "3"]
    interrupt_on_call(monkeypatch, Checkpointer, "save", 4)  # calls: A@3, B@3, A@6, (B@6 killed)
    with pytest.raises(SystemExit):  # the CLI turns the interrupt into an exit saying how to resume
        main(args)
    monkeypatch.undo()
    assert [(out / h / "checkpoint" / "latest").read_text() for h in (A, B)] == ["step_6", "step_3"]
    with pytest.raises(SystemExit):  # an unfinished sweep is not started over without --resume
        main(args)
    main([*args, "--resume", "True"])
    index = assert_same_members(out, uninterrupted)
    assert [m["hook_name"] for m in index["members"]] == [A, A, B, B]
    for h in (A, B):  # every step logged once
        steps = [json.loads(line)["step"] for line in (out / h / "train_log.jsonl").open()]
        assert steps == [1], h
        assert not (out / h / "checkpoint").exists()


def test_resume_keeps_an_ensemble_already_saved(two_hooks, uninterrupted, tmp_path, monkeypatch, capsys):
    """Killed while finishing the second ensemble (its members saved, no sweep.json yet): the first is read back, the
    second is saved again from its final checkpoint without training again."""
    out = tmp_path / "all"
    args = ["sweep", "--dataset_dir", str(two_hooks), "--hook_name", "all", "--output_dir", str(out), *FLAGS,
            "--checkpoint_every", "5"]
    interrupt_on_call(monkeypatch, driver_mod, "finish", 2)
    with pytest.raises(SystemExit):  # the CLI turns the interrupt into an exit saying how to resume
        main(args)
    monkeypatch.undo()
    assert (out / A / "sweep.json").exists() and not (out / B / "sweep.json").exists()
    assert (out / B / "checkpoint" / "latest").read_text() == "step_16"  # the end of training
    refusals = [(args, "holds ensembles saved by an interrupted sweep .*; pass --resume True to finish it"),
                ([*args, "--resume", "True", "--ratio", "2"], "holds an ensemble saved with other settings \\(ratio\\)"),
                ([*args[:4], f"{A},", *args[5:], "--resume", "True"], f"hooks that --hook_name does not list \\({B}\\)")]
    for bad, message in refusals:  # never a sweep that silently mixes settings or drops a trained hook
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(bad)
        assert re.search(message, capsys.readouterr().err), message
    saves, real = [], driver_mod.save_members
    monkeypatch.setattr(driver_mod, "save_members", lambda run, training: saves.append((run.hook, training["tokens"]))
                        or real(run, training))
    main([*args, "--resume", "True"])
    assert saves == [(B, 512)]  # B alone, saved with its 16 steps x 32 rows, trained before the kill
    assert_same_members(out, uninterrupted)


def _flags(store, out, *extra):
    return ["--dataset_dir", str(store), "--hook_name", "all", "--output_dir", str(out), "--ratio", "4", *FLAGS, *extra]


@pytest.mark.parametrize("mode", ["members", "data"])
def test_several_hooks_across_processes_equal_one_process(two_hooks, tmp_path, mode):
    """Members: A's 2 members cost 24 x 12 each per row, B's 16 x 8: the cost-balanced shares are [A0] and
    [A1, B0, B1], so rank 0 holds none of B's members (it takes part in B's logging, checkpoints and saving idle)."""
    recipe = ("--resample_every", "5", "--dead_window", "64") if mode == "members" else ()  # resampling reads rows
    main(["sweep", *_flags(two_hooks, tmp_path / "one", *recipe)])
    r = launch(2, [*_flags(two_hooks, tmp_path / "two", *recipe, "--parallel", mode, "--checkpoint_every", "5")])
    # rank 0 (its lines are printed) reads only the hooks of the members it trains
    reads = "1 hook(s) of the store once (this rank holds no member of 1" if mode == "members" else "2 hook(s)"
    assert f"each step reads {reads}" in r.stdout
    index = assert_same_members(tmp_path / "two", tmp_path / "one", atol=1e-6)
    for hook in (A, B):
        training = index["ensembles"][hook]["training"]
        assert (training["world_size"], training["parallel"], training["steps"]) == (2, mode, 16)
        assert training["kernel"] == "fused"  # rank 0 idle for B reports the step of the rank that trains it
        assert not (tmp_path / "two" / hook / "checkpoint").exists()
    one = read_index(tmp_path / "one")
    for a, b in zip(one["members"], index["members"], strict=True):
        assert b["metrics"]["fvu"] == pytest.approx(a["metrics"]["fvu"], abs=1e-5)
    logged = [json.loads(line) for line in (tmp_path / "two" / B / "train_log.jsonl").open()]
    assert [len(line["l0"]) for line in logged] == [2]  # both members of B, gathered from rank 1


def test_member_parallel_sweep_of_several_hooks_resumes_after_sigkill(two_hooks, tmp_path):
    """Killed (every rank) once a checkpoint exists; the resumed 2-process run equals one uninterrupted process."""
    extra = ("--batch_size", "8", "--n_repetitions", "3")
    main(["sweep", *_flags(two_hooks, tmp_path / "one", *extra)])
    args = _flags(two_hooks, tmp_path / "two", *extra, "--parallel", "members", "--checkpoint_every", "10")
    proc = launch(2, args, wait=False)
    latest = tmp_path / "two" / B / "checkpoint" / "latest"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:  # every rank at once (and the launcher)
        killed = kill_processes_with(str(tmp_path / "two")) >= 2
    proc.wait(60)
    print("killed mid-run:", killed, latest.read_text() if latest.exists() else None)
    if killed:
        assert not (tmp_path / "two" / "sweep.json").exists()
        launch(2, [*args, "--resume", "True"])
    assert_same_members(tmp_path / "two", tmp_path / "one", atol=1e-6)


def test_member_shares_balance_the_members_of_every_hook_by_cost(two_hooks):
    from saetool.sweep.multihook import member_cost, member_shares
    from saetool.util.distributed import Dist

    store = ActivationStore.open(two_hooks)
    base = SweepConfig(dataset_dir=str(two_hooks), output_dir="unused", ratio=4, l1_values=[1e-3, 1e-2],
                       parallel="members")
    subs = [build(SweepConfig, {**base.__dict__, "hook_name": h}) for h in (A, B)]
    assert [member_cost(s, store) for s in subs] == [24 * 12, 16 * 8]  # d_sae (d_in + d_out)
    # members [288, 288, 128, 128]: the best split is [288 | 288 + 128 + 128] (largest share 544, not 576)
    assert member_shares(subs, store, Dist(0, 2)) == [range(1), range(0)]
    assert member_shares(subs, store, Dist(1, 2)) == [range(1, 2), range(2)]
    assert member_shares(subs, store, Dist(0, 1)) == [None, None]
    skip = build(SweepConfig, {**base.__dict__, "hook_name": A, "target_hook": B, "skip_connection": True})
    assert member_cost(skip, store) == 24 * (6 + 4) + 6 * 4
    with pytest.raises(ValueError, match=r"needs at least one member per process \(4 members of 2 hooks, 5 proc"):
        member_shares(subs, store, Dist(0, 5))


def test_accelerate_launch_reads_a_config_like_the_cli(layered, tmp_path):
    config = {"dataset_dir": str(layered), "architecture": "topk", "k_values": [2, 4], "batch_size": 32,
              "eval_tokens": 64, "device": "cpu", "report": False, "parallel": "members",
              "ensembles": [{"name": f"layer{i}", "hook_name": f"blocks.{i}.mlp.hook_in",
                             "target_hook": f"blocks.{i}.hook_mlp_out"} for i in (0, 1)]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--output_dir", str(tmp_path / "one")])
    launch(2, ["--config", str(tmp_path / "sweep.yaml"), "--output_dir", str(tmp_path / "two")])
    index = assert_same_members(tmp_path / "two", tmp_path / "one", atol=1e-6)
    assert index["transcoder_sets"] == ["transcoder_sets/topk_k_2", "transcoder_sets/topk_k_4"]
    assert {e["training"]["world_size"] for e in index["ensembles"].values()} == {2}


def test_a_hook_folder_being_written_by_another_run_is_refused(two_hooks, tmp_path):
    out = tmp_path / "all"
    out.mkdir()
    lock = out / f".{B}.lock"  # a live run (this process) writes OUTPUT_DIR/<B> alone
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(ValueError, match=f"--output_dir {out / B} is being written by another run"):
        run_sweep(build(SweepConfig, {"dataset_dir": str(two_hooks), "hook_name": "all", "output_dir": str(out),
                                      "eval_tokens": 128, "device": "cpu"}))
    assert sorted(p.name for p in out.iterdir()) == [lock.name]  # nothing written, A's lock released
