"""Generation across processes (cases D1, D2, S2, S3 across ranks): `accelerate launch` with 2 and 3 CPU processes
(gloo) writes the same store as one process; uneven shares store every context exactly once; a run killed with
SIGKILL mid-way and resumed equals an uninterrupted one; tokenising that outlasts --dist_timeout holds no rank in a
collective, and activations are committed while the tokens are still being written. Every subprocess runs under a
timeout, so a hang fails."""

import contextlib
import dataclasses
import itertools
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
from saetool.store import CommitProgress, StoreSpec, watch
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


def launch(n_procs: int, f: dict, env_dir: Path, **env) -> subprocess.Popen:
    """`accelerate launch --config_file configs/accelerate/cpu_2proc.yaml --num_processes N launch/generate.py`
    (`env`: more environment variables)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--num_processes", str(n_procs),
           "--main_process_port", str(free_port()), str(ROOT / "launch/generate.py")]
    cmd += [f"--{k}={v}" for k, v in f.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(env_dir / "datasets_cache"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
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
    # 17 contexts = 17 chunks on 3 ranks: shares of 6, 6, 5 chunks dealt round robin (D2); the rows equal the one-process store's
    # with the same budget, since they depend only on the text, the settings and the seed.
    f = flags(tiny_model_dir, text_dir, tmp_path / "one.zarr", n_chunks=17)
    one = gen.run_generate(GenerateConfig(**{**f, "layers": [0, 1], "locations": ["residual"]}), log=quiet)
    out = finish(launch(3, {**f, "dataset_folder": str(tmp_path / "three.zarr")}, tmp_path))
    assert rank_lines(out) == {0: (3, "0,3,...,15"), 1: (3, "1,4,...,16"), 2: (3, "2,5,...,14")}  # round robin
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
    expected = {0: (2, "0,2,...,62"), 1: (2, "1,3,...,63")}
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


def run_threads(cfg: GenerateConfig, world: int) -> dict[int, BaseException | None]:
    """run_generate on `world` in-process ranks (ThreadDist); {rank: its error or None}."""
    ThreadDist.barriers[world] = threading.Barrier(world)
    errors = {}

    def rank(r):
        try:
            gen.run_generate(cfg, dist=ThreadDist(r, world), log=quiet)
            errors[r] = None
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return errors


def test_a_failed_token_writer_stops_every_rank_with_one_line(tiny_model_dir, text_dir, tmp_path, monkeypatch):
    # The text cannot fill one context: rank 0 fails before the store exists, and the ranks polling for it see that
    # rank 0 let go of the store's lock.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    base = {**flags(tiny_model_dir, text_dir, tmp_path / "a.zarr", n_chunks=8), "locations": ["residual"],
            "layers": [0]}
    errors = run_threads(GenerateConfig(**{**base, "dataset": str(tmp_path / "empty")}), 3)
    assert isinstance(errors[0], ValueError) and "0 tokens < one context of 16" in str(errors[0])
    for r in (1, 2):
        assert isinstance(errors[r], StoreError), errors
        assert "stopped waiting for rank 0 to create or reopen the store: rank 0 (pid" in str(errors[r])
        assert "no longer holds the lock" in str(errors[r]) and "\n" not in str(errors[r])
    # The writer fails at chunk 3, once the ranks record: it records the failure, and every rank stops with it.
    real = ActivationStore.write_tokens

    def failing(self, chunk, tokens, mask):
        if chunk == 3:
            while not self.committed_chunks().any():  # every rank is past the start barrier, recording
                time.sleep(0.01)
            raise OSError("No space left on device")
        return real(self, chunk, tokens, mask)

    monkeypatch.setattr(ActivationStore, "write_tokens", failing)
    errors = run_threads(GenerateConfig(**{**base, "dataset_folder": str(tmp_path / "b.zarr")}), 3)
    assert isinstance(errors[0], OSError) and str(errors[0]) == "No space left on device"
    for r in (1, 2):
        assert isinstance(errors[r], StoreError), errors
        assert str(errors[r]) == (f"{tmp_path / 'b.zarr'}: the token writer (rank 0) failed: OSError: No space left "
                                  "on device")
    monkeypatch.setattr(ActivationStore, "write_tokens", real)
    errors = run_threads(GenerateConfig(**{**base, "dataset_folder": str(tmp_path / "b.zarr")}), 3)  # resumed
    assert errors == {0: None, 1: None, 2: None}
    one = gen.run_generate(GenerateConfig(**{**base, "dataset_folder": str(tmp_path / "one.zarr")}), log=quiet)
    resumed = ActivationStore.open(tmp_path / "b.zarr")
    assert resumed.meta["token_writer"]["error"] is None
    for name in ["tokens", "mask", "commits", "blocks.0.hook_resid_post"]:
        assert np.array_equal(resumed.group[name][:], one.group[name][:]), name


def test_chunk_shares_are_dealt_round_robin():
    assert gen.chunk_shares(list(range(17)), 8) == [[0, 8, 16]] + [[r, r + 8] for r in range(1, 8)]
    assert gen.chunk_shares([1, 4, 5, 9], 3) == [[1, 9], [4], [5]]
    assert gen.chunk_shares([7], 3) == [[7], [], []]
    # the endless walk of a rank: the chunks committed before the run are skipped, every chunk beyond them counts
    done = np.array([True, False, True, False, False])
    for r in range(3):
        walk = list(itertools.islice(gen.my_chunks(done, r, 3), 4))
        assert walk == gen.chunk_shares([1, 3, 4] + list(range(5, 14)), 3)[r][:4]
    assert gen.format_chunks([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and gen.format_chunks([]) == "none"
    assert gen.format_chunks([1, 4, 7, 10, 12]) == "1,4,...,10,12" and gen.format_chunks([0, 2]) == "0,2"


def test_rank0_progress_aggregates_all_ranks_from_the_commits(monkeypatch):
    # 4 chunks of 16 rows on 2 ranks; rank 0 owns chunks 0 and 2, rank 1 chunks 1 and 3 (seen only through the store)
    monkeypatch.setattr(watch, "POLL_SECONDS", 0.0)

    class Bar:
        total, n = 64, 0

        def update(self, k):
            self.n += k

    class Store:
        spec = StoreSpec(model="m", dataset="t", hook_names=["h"], widths={"h": 1}, n_rows=64, context_size=16,
                         chunk_size=16)
        done = np.zeros(4, bool)

        def committed_chunks(self):
            return self.done.copy()

    bar, store = Bar(), Store()
    p = CommitProgress(store, np.zeros(4, bool), world_size=2, bar=bar)
    p.own(8)
    assert bar.n == 16  # 8 rows of rank 0, times 2 ranks
    store.done[1] = True  # rank 1 committed chunk 1
    p.own(8)
    assert bar.n == 16 + 16 * 2
    store.done[0] = True
    p.committed(0)
    assert bar.n == 48  # 32 rows committed, nothing in flight: the bar never goes back
    store.done[[2, 3]] = True
    p.wait_for_all()
    assert bar.n == 64
    resumed = CommitProgress(store, np.array([True, False, False, False]), world_size=2, bar=Bar())
    resumed.wait_for_all()
    assert resumed.bar.n == 48  # chunks committed before the run do not count


def test_tokenising_longer_than_the_collective_timeout_overlaps_the_recording(tiny_model_dir, text_dir, tmp_path):
    # 40 chunks whose tokens take >= 0.6 s each (an injected delay: 24 s in all) under --dist_timeout 20 on gloo:
    # the old design, every other rank in a barrier until rank 0 had tokenised the whole budget, failed here.
    # Now no rank waits in a collective on the tokens, every rank records its chunks as their tokens are committed,
    # and the stores of 2 and 3 processes equal the one-process store.
    f = flags(tiny_model_dir, text_dir, tmp_path / "one.zarr", n_chunks=40, shuffle_buffer=2)
    one = gen.run_generate(GenerateConfig(**{**f, "layers": [0, 1], "locations": ["residual"]}), log=quiet)
    start = time.monotonic()  # both runs at once: they mostly sleep in the token writer
    procs = {n: launch(n, {**f, "dataset_folder": str(tmp_path / f"{n}.zarr"), "dist_timeout": 20}, tmp_path,
                       SAETOOL_TEST_DELAY_TOKENS="0.6") for n in (2, 3)}
    outs = {n: finish(proc) for n, proc in procs.items()}
    assert time.monotonic() - start > 24  # the tokens alone took longer than the timeout
    for n, out in outs.items():
        assert f"gloo, {n} processes, collective timeout 20 s (--dist_timeout 20)" in out, out[-3000:]
        store = ActivationStore.open(tmp_path / f"{n}.zarr")
        assert_same_store(store, one, 40)
        assert store.meta["summary"]["chunks_per_rank"] == [len(s) for s in gen.chunk_shares(list(range(40)), n)]
        # tokens_at_commit[c]: the token chunks committed when chunk c's activations had been committed. The first
        # activation chunk was committed before the last token chunk, in fact within the first few of them.
        order = zarr.open_group(str(tmp_path / f"{n}.zarr"), mode="r")["tokens_at_commit"][:]
        assert (order > np.arange(40)).all()  # never before the chunk's own tokens
        assert order.min() <= 10, order.tolist()
