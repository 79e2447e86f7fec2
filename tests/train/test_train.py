"""saetool.train: the step choice (kernel, precision, compile, groups), the snapshot clock, and resumes that land
every snapshot and checkpoint where an uninterrupted run puts them."""

import pytest
import torch

import saetool.train.step as step_mod
from saetool.config import SweepConfig
from saetool.ensemble.stack import SAEEnsemble
from saetool.saved.folders import load_sweep
from saetool.sweep.driver import run_sweep
from saetool.train.loop import _SnapshotClock
from saetool.train.setup import member_hyperparams
from saetool.train.step import choose_step, resolve_precision
from saetool.util.distributed import Dist
from tests.helpers import interrupt_on_call
from tests.synthetic import write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g) * torch.linspace(0.5, 3, 8) + 1.0
    return write_store(tmp_path_factory.mktemp("s") / "s.zarr", x, context_size=4, chunk_size=64).path


def sweep(store, out, **kw):
    if kw.get("architecture", "standard") in ("standard", "gated"):
        kw = {"l1_values": [0.0, 0.01], **kw}
    cfg = SweepConfig(dataset_dir=str(store), output_dir=str(out), ratio=2, batch_size=30, eval_tokens=40,
                      adam_lr=0.01, device="cpu", report=False, **kw)
    return run_sweep(cfg, log=lambda *a: None)


def assert_same_sweep(a, b, atol=0.0):
    sa, sb = load_sweep(a), load_sweep(b)
    assert sorted(sa) == sorted(sb)
    for key in sa:
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(sa[key], name), getattr(sb[key], name), atol=atol, rtol=0)


def step_for(total_steps=10, **kw):
    cfg = SweepConfig(device="cpu", **kw)
    cfg.validate()
    hyper = member_hyperparams(cfg)
    ens = SAEEnsemble(cfg.architecture, 4, 256, hyper, seeds=list(range(len(next(iter(hyper.values()))))),
                      auxk_coefficient=cfg.auxk_coefficient)
    return choose_step(cfg.runtime, ens, torch.optim.Adam(ens.parameters()), Dist(), False, total_steps,
                       cfg.clip_norm(ens.d_out))


@pytest.mark.parametrize("flags,fused,precision,compiled,group", [
    ({}, True, "fp32", False, 4),
    ({"architecture": "topk"}, True, "fp32", False, 4),
    ({"architecture": "gated"}, False, "fp32", False, 4),
    ({"architecture": "topk", "auxk_coefficient": 0.03}, False, "fp32", False, 4),
    ({"kernel": "autograd", "member_group": 2}, False, "fp32", False, 2),
    ({"precision": "bf16"}, True, "bf16", False, 4),
    ({"autocast": "bf16"}, True, "bf16", False, 4),
    ({"architecture": "jumprelu", "precision": "bf16"}, False, "bf16", False, 4),
    ({"compile": False}, True, "fp32", False, 4),
])
def test_step_choice(flags, fused, precision, compiled, group):
    step = step_for(**flags)
    assert (step.fused, step.precision, step.compiled, step.group) == (fused, precision, compiled, group)


def test_compile_auto_on_cpu_pays_only_for_long_fused_runs():
    assert step_for(total_steps=step_mod.CPU_COMPILE_MIN_STEPS).compiled
    assert not step_for(total_steps=step_mod.CPU_COMPILE_MIN_STEPS - 1).compiled
    assert not step_for(total_steps=10_000, architecture="gated").compiled


@pytest.mark.parametrize("flags,message", [
    ({"kernel": "fused", "architecture": "gated"}, "--kernel fused has no architecture gated"),
    ({"kernel": "fused", "architecture": "topk", "auxk_coefficient": 0.03}, "--kernel fused has no --auxk_coefficient"),
])
def test_fused_kernel_is_refused_where_it_cannot_act(flags, message):
    with pytest.raises(ValueError, match=message):
        step_for(**flags)


def test_autocast_alias_conflicting_with_precision_is_refused():
    with pytest.raises(ValueError, match="--autocast is a deprecated alias of --precision bf16"):
        SweepConfig(autocast="bf16", precision="auto").validate()
    assert SweepConfig(autocast="bf16").step_precision == "bf16"
    with pytest.raises(ValueError, match="--precision must be fp32, bf16 or auto"):
        SweepConfig(precision="fp16").validate()


def test_precision_auto_follows_the_measured_cpu_bf16_speedup(monkeypatch):
    assert resolve_precision("fp32", "cpu", Dist()) == "fp32"
    assert resolve_precision("bf16", "cpu", Dist()) == "bf16"
    monkeypatch.setattr(step_mod, "cpu_bf16_speedup", lambda: 3.9)  # AVX512-BF16: 811 vs 192 GFLOP/s
    assert resolve_precision("auto", "cpu", Dist()) == "bf16"
    monkeypatch.setattr(step_mod, "cpu_bf16_speedup", lambda: 0.26)  # no bf16 units: 63 vs 238 GFLOP/s
    assert resolve_precision("auto", "cpu", Dist()) == "fp32"


def test_snapshot_clock_by_hand():
    clock = _SnapshotClock(chunk_size=64, enabled=True, skipped=0, batch_size=30)
    # rows after each batch: 30 60 90 120 150 180 210 240 ...; a snapshot when they pass 64, 128, 192, 256
    assert [clock.due(30) for _ in range(9)] == [None, None, 1, None, 2, None, 3, None, 4]
    resumed = _SnapshotClock(chunk_size=64, enabled=True, skipped=4, batch_size=30)
    assert [resumed.due(30) for _ in range(5)] == [2, None, 3, None, 4]
    assert _SnapshotClock(64, False, 0, 30).due(1000) is None


def test_resume_writes_the_snapshots_of_the_uninterrupted_run(store, tmp_path, monkeypatch):
    sweep(store, tmp_path / "ref", save_after_every=True, n_repetitions=2)
    interrupt_on_call(monkeypatch, step_mod, "train_batch_fused", 12)
    with pytest.raises(KeyboardInterrupt):
        sweep(store, tmp_path / "out", save_after_every=True, n_repetitions=2, checkpoint_every=5)
    monkeypatch.undo()
    sweep(store, tmp_path / "out", save_after_every=True, n_repetitions=2, checkpoint_every=5, resume=True)
    ref = sorted(p.name for p in (tmp_path / "ref" / "snapshots").iterdir())
    assert sorted(p.name for p in (tmp_path / "out" / "snapshots").iterdir()) == ref
    assert "epoch_0_chunk_3" in ref and "epoch_0" in ref and "epoch_1_chunk_8" in ref
    for name in ref:
        assert_same_sweep(tmp_path / "out" / "snapshots" / name, tmp_path / "ref" / "snapshots" / name)
    assert_same_sweep(tmp_path / "out", tmp_path / "ref")


@pytest.mark.parametrize("flags", [{"precision": "bf16"}, {"precision": "bf16", "kernel": "autograd"},
                                   {"precision": "bf16", "architecture": "topk", "k_values": [2, 4]}])
def test_bf16_sweep_resumed_from_a_checkpoint_equals_the_uninterrupted_run(store, tmp_path, monkeypatch, flags):
    ref = sweep(store, tmp_path / "ref", **flags)
    assert ref["training"]["precision"] == "bf16"
    fp32 = sweep(store, tmp_path / "fp32", **{k: v for k, v in flags.items() if k != "precision"})
    for a, b in zip(ref["members"], fp32["members"]):  # bf16 trains to the fp32 result within bf16 rounding
        assert a["metrics"]["fvu"] == pytest.approx(b["metrics"]["fvu"], rel=0.02)
    name = "train_batch_fused" if flags.get("kernel") != "autograd" else "train_step"
    interrupt_on_call(monkeypatch, step_mod, name, 9)
    with pytest.raises(KeyboardInterrupt):
        sweep(store, tmp_path / "out", checkpoint_every=4, **flags)
    monkeypatch.undo()
    sweep(store, tmp_path / "out", checkpoint_every=4, resume=True, **flags)
    assert_same_sweep(tmp_path / "out", tmp_path / "ref")


def test_a_checkpoint_of_fewer_processes_is_refused_naming_why(tmp_path):
    from types import SimpleNamespace

    from saetool.train.checkpoint import Checkpointer, load_checkpoint
    from saetool.util.distributed import Dist

    rank0 = Checkpointer(tmp_path, Dist(), shard_by_rank=True)
    rank0.save({"fingerprint": {"ratio": 4}}, 3)  # rank0.pt only, written in a thread
    rank0.wait()
    rank1 = Checkpointer(tmp_path, Dist(1, 2), shard_by_rank=True)
    assert rank1.load() is None
    run = SimpleNamespace(runtime=SimpleNamespace(resume=True), checkpointer=rank1, dist=Dist(1, 2), out=tmp_path)
    with pytest.raises(ValueError, match="holds no file for rank 1: it was made by another number of processes"):
        load_checkpoint(run)


def test_a_checkpoint_is_written_in_a_thread_from_a_copy_and_published_once_every_rank_wrote(tmp_path):
    # Two member-parallel ranks in one process: rank 0's thread writes latest only once rank 1's file exists too (no
    # barrier), from copies of the tensors (training changes them in place meanwhile), and removes the older steps.
    import time

    from saetool.train.checkpoint import Checkpointer
    from saetool.util.distributed import Dist

    ranks = [Checkpointer(tmp_path, Dist(r, 2), shard_by_rank=True) for r in range(2)]
    for r, ck in enumerate(ranks):
        ck.save({"w": torch.full((3,), float(r))}, 2)
    ranks[1].wait()
    ranks[0].wait()
    assert (tmp_path / "checkpoint" / "latest").read_text() == "step_2"
    w = torch.zeros(3)
    ranks[0].save({"w": w}, 4)
    w += 5  # the next training step, while the checkpoint is being written
    time.sleep(0.3)
    assert (tmp_path / "checkpoint" / "latest").read_text() == "step_2"  # rank 1 has not written step 4 yet
    ranks[1].save({"w": torch.ones(3)}, 4)
    ranks[1].wait()
    ranks[0].wait()
    assert (tmp_path / "checkpoint" / "latest").read_text() == "step_4"
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("step_*")) == ["step_4"]
    assert torch.equal(ranks[0].load()["w"], torch.zeros(3)) and torch.equal(ranks[1].load()["w"], torch.ones(3))
    ranks[0].save({"w": w}, 6)
    ranks[0].close()  # a failing run: rank 0's own file is written, latest stays at the last complete checkpoint
    assert (tmp_path / "checkpoint" / "step_6" / "rank0.pt").is_file()
    assert (tmp_path / "checkpoint" / "latest").read_text() == "step_4"
