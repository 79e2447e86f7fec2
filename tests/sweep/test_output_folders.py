"""Output folders (issue 13, items 6, 10, 11): one writer per folder (saetool.util.lock), one-line errors for paths
that cannot be written, and a save that fails (disk full) keeps the trained state for `--resume True`."""

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import saetool.saved.folders as io_mod
from saetool.config import GenerateConfig, SweepConfig
from saetool.generate import run_generate
from saetool.saved.folders import load_sweep
from saetool.sweep.driver import run_sweep
from saetool.util.lock import lock_path, writer_lock
from tests.synthetic import write_store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    write_store(path, torch.randn(640, 8, generator=g), context_size=4, chunk_size=64)
    return path


def sweep(store, out, **kw):
    cfg = SweepConfig(dataset_dir=str(store), output_dir=str(out), ratio=2, l1_values=[0.01, 0.1], batch_size=32,
                      eval_tokens=64, device="cpu", report=False, **kw)
    return run_sweep(cfg, log=lambda *a: None)


def hold(folder, pid, host=None):
    lock_path(folder).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                             "started": "2026-12-04 10:00:00", "command": "saetool sweep"}))


def test_a_second_writer_of_a_folder_is_refused(store, tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live process
    try:
        hold(tmp_path / "out", parent.pid)
        with pytest.raises(ValueError) as e:
            sweep(store, tmp_path / "out")
        assert str(e.value) == (f"--output_dir {tmp_path / 'out'} is being written by another run (pid {parent.pid} "
                                f"on {socket.gethostname()}, started 2026-12-04 10:00:00); wait for it or choose "
                                f"another folder (if that run is gone, delete {lock_path(tmp_path / 'out')})")
        assert not (tmp_path / "out").exists()
        cfg = GenerateConfig(dataset_folder=str(tmp_path / "out"), device="cpu")
        with pytest.raises(ValueError, match=r"^--dataset_folder .* is being written by another run"):
            run_generate(cfg, log=lambda *a: None)
    finally:
        parent.kill()
        parent.wait()


def test_a_stale_lock_is_taken_over_and_the_lock_is_released(store, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    hold(tmp_path / "out", dead.pid)
    index = sweep(store, tmp_path / "out")
    assert len(index["members"]) == 2
    assert not lock_path(tmp_path / "out").exists()


def test_a_lock_of_another_host_is_refused(tmp_path):
    hold(tmp_path / "out", 1, host="node-7")
    with pytest.raises(ValueError, match=r"\(pid 1 on node-7, started 2026-12-04 10:00:00\)"), \
            writer_lock(tmp_path / "out", "output_dir"):
        pass


def test_two_sweeps_started_together_one_is_refused(store, tmp_path):
    cmd = [sys.executable, "-m", "saetool.cli", "sweep", "--dataset_dir", str(store), "--output_dir",
           str(tmp_path / "out"), "--ratio", "2", "--l1_values", "0.01,0.1", "--batch_size", "8", "--n_repetitions",
           "3", "--eval_tokens", "64", "--device", "cpu", "--report", "False"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(240), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert refused.strip().splitlines()[-1].startswith(f"saetool: error: --output_dir {tmp_path / 'out'} is being "
                                                       "written by another run (pid ")
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "train_log.jsonl").open()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one run's log, not two interleaved


def test_an_output_path_that_is_a_file_is_refused(store, tmp_path):
    (tmp_path / "out").write_text("notes")
    with pytest.raises(ValueError) as e:
        sweep(store, tmp_path / "out")
    assert str(e.value) == f"--output_dir {tmp_path / 'out'} is a file, not a folder; choose another path"
    assert (tmp_path / "out").read_text() == "notes"


@pytest.mark.parametrize("code,reason", [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "the disk is full"),
                                         (errno.EACCES, "permission denied")])
def test_a_folder_that_cannot_be_written_is_refused_before_any_work(store, tmp_path, monkeypatch, code, reason):
    real_open = os.open

    def failing_open(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(ValueError) as e:
        sweep(store, tmp_path / "out")
    assert str(e.value) == (f"--output_dir {tmp_path / 'out'} cannot be written: {reason} (its lock "
                            f"{lock_path(tmp_path / 'out')})")
    (tmp_path / "existing").mkdir()
    real_write = Path.write_bytes

    def failing_write(self, data):
        if ".saetool-write-test-" in self.name:
            raise OSError(code, os.strerror(code), str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(ValueError) as e:
        sweep(store, tmp_path / "existing")
    assert str(e.value) == f"--output_dir {tmp_path / 'existing'} cannot be written: {reason}"


def test_a_save_that_fails_keeps_the_checkpoint_and_resume_saves_without_retraining(store, tmp_path, monkeypatch):
    ref = sweep(store, tmp_path / "ref")
    real = io_mod.save_sae
    calls = []

    def disk_full(path, weights, cfg):
        calls.append(path)
        if len(calls) == 2:  # the second member's folder: the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, weights, cfg)

    monkeypatch.setattr(io_mod, "save_sae", disk_full)
    with pytest.raises(ValueError) as e:
        sweep(store, tmp_path / "out", checkpoint_every=7)
    out = tmp_path / "out"
    assert str(e.value) == (f"saving the sweep to {out} failed (No space left on device); the trained state is kept "
                            f"in {out / 'checkpoint'}: free space and rerun with --resume True to save it without "
                            "retraining")
    assert not (out / "saes.tmp").exists() and not (out / "sweep.json").exists()
    assert (out / "checkpoint" / "latest").read_text() == "step_18"  # the end (18 steps), not step 14
    monkeypatch.undo()
    import saetool.train.step as step_mod

    def no_training(*a, **k):
        raise AssertionError("the resumed run trained again")

    monkeypatch.setattr(step_mod, "train_batch_fused", no_training)
    index = sweep(store, out, checkpoint_every=7, resume=True)
    assert index["training"]["steps"] == ref["training"]["steps"] == 18
    a, b = load_sweep(out), load_sweep(tmp_path / "ref")
    for key in a:
        torch.testing.assert_close(a[key].W_enc, b[key].W_enc, atol=0, rtol=0)
    assert not (out / "checkpoint").exists()
