"""Generation across processes (cases D1, D2, S2, S3 across ranks): `accelerate launch` with 2 and 3 CPU processes
(gloo) writes the same store as one process; uneven shares store every context exactly once; a run killed with
SIGKILL mid-way and resumed equals an uninterrupted one. Every subprocess runs under a timeout, so a hang fails."""

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import psutil
import pytest
import zarr

import saetool.generate as gen
from saetool.config import GenerateConfig
from saetool.store.activation_store import ActivationStore, StoreError
from saetool.util.distributed import Dist
from tests.helpers import WORDS

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
N_CONTEXTS = 64  # one context (16 tokens) per chunk: 64 chunks, each one commit
TIMEOUT = 150


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(1)
    # one document of N_CONTEXTS * 15 + 7 words: N_CONTEXTS contexts of BOS + 15 words, 7 words dropped
    (d / "doc.txt").write_text(" ".join(rng.choice(WORDS, N_CONTEXTS * 15 + 7)))
    return d


def flags(tiny_model_dir, text_dir, folder, **kw):
    base = {"model": str(tiny_model_dir), "dataset": str(text_dir), "locations": "residual", "layers": "0,1",
                "context_size": 16, "chunk_size": 16, "batch_size": 4, "device": "cpu", "dataset_folder": str(folder)}
    return {**base, **kw}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, text_dir, tmp_path_factory):
    """The uninterrupted one-process store of all 64 contexts."""
    folder = tmp_path_factory.mktemp("ref") / "one.zarr"
    f = flags(tiny_model_dir, text_dir, folder)
    f["layers"] = [0, 1]
    f["locations"] = ["residual"]
    return gen.run_generate(GenerateConfig(**f), log=quiet)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n_procs: int, f: dict, env_dir: Path) -> subprocess.Popen:
    """`accelerate launch --config_file configs/accelerate/cpu_2proc.yaml --num_processes N launch/generate.py`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--num_processes", str(n_procs),
           "--main_process_port", str(free_port()), str(ROOT / "launch/generate.py")]
    cmd += [f"--{k}={v}" for k, v in f.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(env_dir / "datasets_cache"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers at once (torch elastic starts each worker in its own session, so
    killing the launcher's process group alone would leave the workers running)."""
    family = [psutil.Process(proc.pid)]
    with contextlib.suppress(psutil.NoSuchProcess):
        family += family[0].children(recursive=True)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill9(proc)
        out, _ = proc.communicate()
        pytest.fail(f"accelerate launch hung for {TIMEOUT} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def rank_lines(out: str) -> dict[int, tuple[int, str]]:
    """{rank: (world_size, chunks)} from the "[rank r/N] chunks ..." line every rank prints."""
    found = re.findall(r"\[rank (\d+)/(\d+)\] chunks (\S+)", out)
    assert len(found) == len({r for r, _, _ in found}), out[-3000:]  # one line per rank
    return {int(r): (int(n), chunks) for r, n, chunks in found}


def assert_same_store(store: ActivationStore, ref: ActivationStore, n_contexts: int) -> None:
    """Tokens, mask and commits identical; activations equal within fp16 rounding (one ulp)."""
    g = zarr.open_group(str(store.path), mode="r")
    n = n_contexts * 16
    assert np.array_equal(g["tokens"][:], ref.group["tokens"][:n_contexts])
    assert np.array_equal(g["mask"][:], ref.group["mask"][:n])
    assert g["commits"][:].tolist() == [1] * n_contexts
    for h in HOOKS:
        a, b = g[h][:].astype(np.float32), ref.group[h][:n].astype(np.float32)
        assert a.shape == (n, 32)
        np.testing.assert_allclose(a, b, rtol=2**-10, atol=2**-14)


def test_three_processes_uneven_shares_equal_one_process(tiny_model_dir, text_dir, tmp_path):
    # 17 contexts = 17 chunks on 3 ranks: contiguous shares 6, 6, 5 (D2); the rows equal the one-process store's
    # with the same budget, since they depend only on the text, the settings and the seed.
    f = flags(tiny_model_dir, text_dir, tmp_path / "one.zarr", n_chunks=17)
    one = gen.run_generate(GenerateConfig(**{**f, "layers": [0, 1], "locations": ["residual"]}), log=quiet)
    out = finish(launch(3, {**f, "dataset_folder": str(tmp_path / "three.zarr")}, tmp_path))
    assert rank_lines(out) == {0: (3, "0-5"), 1: (3, "6-11"), 2: (3, "12-16")}
    assert len(re.findall(r"tokenize:\s+0%", out)) == 1, out[-3000:]  # only rank 0 reads and tokenises the text
    store = ActivationStore.open(tmp_path / "three.zarr")
    summary = store.meta["summary"]
    assert summary["world_size"] == 3 and summary["chunks_per_rank"] == [6, 6, 5] and summary["tokens"] == 17 * 16
    assert_same_store(store, one, 17)
    assert "wrote 272 tokens x 2 hook(s)" in out and "with 3 process(es)" in out


def _commits_on_disk(folder: Path) -> int:
    """Committed chunks, counted from the files of the `commits` array (one Zarr chunk per store chunk)."""
    try:
        return sum(1 for e in os.scandir(folder / "commits" / "c") if not e.name.endswith(".partial"))
    except FileNotFoundError:
        return 0


def test_sigkill_two_processes_then_resume_equals_one_process(reference, tiny_model_dir, text_dir, tmp_path):
    f = flags(tiny_model_dir, text_dir, tmp_path / "killed.zarr")
    proc = launch(2, f, tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while _commits_on_disk(tmp_path / "killed.zarr") < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    kill9(proc)  # kill -9 the launcher and both workers
    out, _ = proc.communicate(timeout=30)
    expected = {0: (2, "0-31"), 1: (2, "32-63")}
    lines = rank_lines(out)  # a rank may not have printed yet when the first commit appears
    assert lines and all(expected[r] == v for r, v in lines.items()), out[-3000:]
    committed = _commits_on_disk(tmp_path / "killed.zarr")
    assert 1 <= committed < N_CONTEXTS, f"{committed} chunks committed when killed: the run was not cut mid-way"
    with pytest.raises(StoreError, match=rf"incomplete \({committed}/{N_CONTEXTS} chunks committed\)"):
        ActivationStore.open(tmp_path / "killed.zarr")

    out = finish(launch(2, f, tmp_path))
    assert f"resuming {tmp_path / 'killed.zarr'}: {committed}/{N_CONTEXTS} chunks already committed" in out
    lines = rank_lines(out)
    assert sorted(lines) == [0, 1] and {n for n, _ in lines.values()} == {2}
    store = ActivationStore.open(tmp_path / "killed.zarr")
    assert store.meta["summary"]["world_size"] == 2
    assert store.meta["summary"]["tokens_this_run"] == (N_CONTEXTS - committed) * 16
    assert sum(store.meta["summary"]["chunks_per_rank"]) == N_CONTEXTS - committed
    assert not list((tmp_path / "killed.zarr").rglob("*.partial"))
    assert_same_store(store, reference, N_CONTEXTS)


class ThreadDist(Dist):
    """A rank of an in-process 'world' of threads: barrier() is a threading.Barrier with a timeout (a hang
    raises BrokenBarrierError instead of blocking the suite)."""

    barriers: ClassVar[dict] = {}
    boxes: ClassVar[dict] = {}

    def barrier(self) -> None:
        ThreadDist.barriers[self.world_size].wait(timeout=60)

    def broadcast_object(self, obj, src: int = 0):
        if self.rank == src:
            ThreadDist.boxes[self.world_size] = obj
        self.barrier()
        value = ThreadDist.boxes[self.world_size]
        self.barrier()  # nobody overwrites the box before every rank has read it
        return value


def test_rank_with_no_chunks_reaches_the_barrier(tiny_model_dir, text_dir, tmp_path):
    # 2 chunks on 3 ranks (D1/D2): rank 2 owns nothing, still passes every barrier; the store is complete.
    ThreadDist.barriers[3] = threading.Barrier(3)
    cfg = GenerateConfig(**{**flags(tiny_model_dir, text_dir, tmp_path / "t.zarr", n_chunks=2),
                            "locations": ["residual"], "layers": [0, 1]})
    errors, printed = [], []

    def rank(r):
        try:
            gen.run_generate(cfg, dist=ThreadDist(r, 3), log=printed.append if r == 0 else quiet)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            ThreadDist.barriers[3].abort()

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(3)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors and not any(t.is_alive() for t in threads), errors
    store = ActivationStore.open(tmp_path / "t.zarr")
    assert store.meta["summary"]["chunks_per_rank"] == [1, 1, 0]
    one = gen.run_generate(dataclasses.replace(cfg, dataset_folder=str(tmp_path / "one.zarr")), log=quiet)
    assert_same_store(store, one, 2)


def test_chunk_shares_are_contiguous_and_exact():
    assert gen.chunk_shares(list(range(17)), 8) == [[0, 1, 2]] + [[3 + 2 * i, 4 + 2 * i] for i in range(7)]
    assert gen.chunk_shares([1, 4, 5, 9], 3) == [[1, 4], [5], [9]]
    assert gen.chunk_shares([7], 3) == [[7], [], []]
    assert gen.format_chunks([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and gen.format_chunks([]) == "none"


def test_rank0_progress_aggregates_all_ranks_from_the_commits(monkeypatch):
    # 4 chunks of 16 rows on 2 ranks; rank 0 owns chunks 0-1, rank 1 chunks 2-3 (seen only through the store)
    monkeypatch.setattr(gen, "POLL_SECONDS", 0.0)

    class Bar:
        total, n = 64, 0

        def update(self, k):
            self.n += k

    class Store:
        done = np.zeros(4, bool)

        def committed_chunks(self):
            return self.done.copy()

    bar, store = Bar(), Store()
    p = gen._Progress(bar, store, {c: 16 for c in range(4)}, world_size=2)
    p.own(8)
    assert bar.n == 16  # 8 rows of rank 0, times 2 ranks
    store.done[2] = True  # rank 1 committed chunk 2
    p.own(8)
    assert bar.n == 16 + 16 * 2
    store.done[0] = True
    p.committed(0)
    assert bar.n == 48  # 32 rows committed, nothing in flight: the bar never goes back
    store.done[[1, 3]] = True
    p.wait_for_all()
    assert bar.n == 64 and not p.pending
