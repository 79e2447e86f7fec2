"""The training batch loader and the sweep on synthetic stores: T1 (every row once), masking, splits."""

import json

import numpy as np
import pytest
import torch

from saetool.config import SweepConfig
from saetool.saved.folders import load_sweep
from saetool.store.loader import BatchLoader, DeviceFeed
from saetool.sweep.driver import run_sweep
from tests.synthetic import write_store


def test_t1_every_row_exactly_once(tmp_path):
    store = write_store(tmp_path / "s.zarr", torch.arange(8.0).reshape(8, 1), context_size=2, chunk_size=2)
    loader = BatchLoader(store, store.spec.hook_names[0], batch_size=2, seed=3, shuffle_chunks=2)
    for epoch in range(3):
        batches = list(loader.epoch(epoch))
        assert len(batches) == 4 == len(loader)
        assert sorted(torch.cat(batches).flatten().tolist()) == list(range(8))
    assert [b.tolist() for b in loader.epoch(1)] == [b.tolist() for b in loader.epoch(1)]  # deterministic
    assert [b.tolist() for b in loader.epoch(0)] != [b.tolist() for b in loader.epoch(1)]


def test_masked_rows_are_skipped_and_last_batch_is_partial(tmp_path):
    mask = np.array([False, True] * 10)  # e.g. BOS at position 0 of every 2-token context
    store = write_store(tmp_path / "s.zarr", torch.arange(20.0).reshape(20, 1), context_size=2, chunk_size=4, mask=mask)
    loader = BatchLoader(store, store.spec.hook_names[0], batch_size=4, row_range=(0, 16))
    batches = list(loader.epoch(0))
    assert [len(b) for b in batches] == [4, 4]
    assert sorted(torch.cat(batches).flatten().tolist()) == [1, 3, 5, 7, 9, 11, 13, 15]
    loader = BatchLoader(store, store.spec.hook_names[0], batch_size=3, row_range=(0, 16))
    assert sorted(len(b) for b in loader.epoch(0)) == [2, 3, 3]


def test_t1_sweep_counts_steps_and_tokens(tmp_path):
    store = write_store(tmp_path / "s.zarr", torch.arange(8.0).reshape(8, 1), context_size=2, chunk_size=2)
    cfg = SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "out"), batch_size=2, eval_tokens=0,
                      l1_values=[0.0, 1e-3], ratio=2, device="cpu")
    index = run_sweep(cfg, log=lambda *a: None)
    assert index["training"]["steps"] == 4 and index["training"]["tokens"] == 8
    first = json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["tokens"] == 2


def test_sweep_end_to_end_on_low_rank_data(tmp_path):
    # 2-sparse data over 16 fixed unit directions in d_in = 8: the small-L1 member must reconstruct it well
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    codes = torch.zeros(4096, 16)
    idx = torch.randint(0, 16, (4096, 2), generator=g)
    codes.scatter_(1, idx, torch.rand(4096, 2, generator=g) * 4 + 1)
    store = write_store(tmp_path / "s.zarr", codes @ dirs, context_size=16, chunk_size=512)
    cfg = SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "out"), batch_size=64, eval_tokens=512,
                      l1_values=[1e-4, 1e-1, 1.0], ratio=4, adam_lr=1e-2, n_repetitions=3, device="cpu")
    index = run_sweep(cfg, log=lambda *a: None)
    m = {e["l1_coefficient"]: e["metrics"] for e in index["members"]}
    assert m[1e-4]["fvu"] < 0.05
    assert m[1e-4]["l0"] > m[1e-1]["l0"] > m[1.0]["l0"]
    assert all(v["n_tokens"] == 512 for v in m.values())
    saes = load_sweep(tmp_path / "out")
    x = store.read_rows(store.spec.hook_names[0], 3584, 4096)
    fvu = ((saes[1e-4](x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert abs(fvu.item() - m[1e-4]["fvu"]) < 1e-5  # the saved SAE reproduces the recorded metric
    assert (tmp_path / "out" / "metrics.md").read_text().count("\n| ") == 4
    with pytest.raises(ValueError, match="already holds a finished sweep"):
        run_sweep(cfg, log=lambda *a: None)


def reference_batches(store, hook, batch_size, row_range, seed, shuffle_chunks, epoch):
    """The loader's documented semantics, written plainly (the pre-threads implementation): the oracle."""
    start, stop = row_range
    cs = store.spec.chunk_size
    segs = [(max(start, c), min(stop, c + cs)) for c in range((start // cs) * cs, stop, cs)]
    segs = [(a, b) for a, b in segs if b > a]
    rng = np.random.default_rng([seed, epoch])
    order = [segs[i] for i in rng.permutation(len(segs))]
    carry = torch.empty(0, store.width(hook))
    out = []
    for g in range(0, len(order), shuffle_chunks):
        parts = [store.read_rows(hook, a, b)[torch.from_numpy(store.read_mask(a, b))] for a, b in order[g : g + shuffle_chunks]]
        pool = torch.cat([carry, *parts])
        pool = pool[torch.from_numpy(rng.permutation(len(pool)))]
        n_full = len(pool) // batch_size * batch_size
        out += [pool[i : i + batch_size] for i in range(0, n_full, batch_size)]
        carry = pool[n_full:]
    return out + ([carry] if len(carry) else [])


@pytest.fixture(scope="module")
def fp16_store(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    mask = np.random.default_rng(2).random(1000) > 0.2
    return write_store(tmp_path_factory.mktemp("l") / "s.zarr", torch.randn(1000, 3, generator=g) * 4, context_size=8,
                       chunk_size=64, dtype="float16", mask=mask)


@pytest.mark.parametrize("batch_size,shuffle_chunks,row_range,threads", [
    (32, 4, (0, 1000), 1), (32, 4, (0, 1000), 2), (50, 1, (70, 930), 2), (7, 3, (5, 999), 3), (1000, 2, (0, 1000), 2),
])
def test_batches_equal_the_documented_semantics_and_resume_at_every_batch(fp16_store, batch_size, shuffle_chunks,
                                                                          row_range, threads):
    hook = fp16_store.spec.hook_names[0]
    loader = BatchLoader(fp16_store, hook, batch_size, row_range, seed=5, shuffle_chunks=shuffle_chunks,
                         num_threads=threads, prefetch=2)
    for epoch in (0, 1):
        ref = reference_batches(fp16_store, hook, batch_size, row_range, 5, shuffle_chunks, epoch)
        got = list(loader.epoch(epoch))
        assert all(b.dtype == torch.float16 for b in got)  # rows stay in the store dtype
        assert [b.float().tolist() for b in got] == [b.tolist() for b in ref]
        for s in range(len(ref) + 1):
            assert [b.float().tolist() for b in loader.epoch(epoch, start_batch=s)] == [b.tolist() for b in ref[s:]]


def test_resume_reads_only_the_segments_it_needs(fp16_store, monkeypatch):
    hook = fp16_store.spec.hook_names[0]
    loader = BatchLoader(fp16_store, hook, 32, seed=0, shuffle_chunks=2)
    reads = []
    real = type(fp16_store).read_rows
    monkeypatch.setattr(type(fp16_store), "read_rows", lambda self, h, a, b, dtype=torch.float32:
                        reads.append(a) or real(self, h, a, b, dtype))
    full = list(loader.epoch(0))
    assert len(reads) == len(loader.segments)
    reads.clear()
    tail = list(loader.epoch(0, start_batch=len(full) - 2))
    assert len(tail) == 2 and len(reads) < len(loader.segments) // 2  # the last pools and the carry's segments


def _epoch_sum(path):
    from saetool.store.activation_store import ActivationStore

    store = ActivationStore.open(path)
    loader = BatchLoader(store, store.spec.hook_names[0], 32, seed=3, num_threads=2)
    return float(sum(b.double().sum() for b in loader.epoch(0)))


def test_loader_works_in_a_forked_worker(fp16_store):
    import multiprocessing

    _epoch_sum(fp16_store.path)  # the parent has used its threads (and zarr's) before forking
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(_epoch_sum, (fp16_store.path,)).get(timeout=60)
    assert child == _epoch_sum(fp16_store.path)


def test_device_feed_on_cpu_moves_the_last_element_only():
    batches = [(torch.arange(3), torch.arange(6.0).reshape(2, 3).half()) for _ in range(3)]
    out = list(DeviceFeed(iter(batches), "cpu"))
    assert len(out) == 3 and all(torch.equal(a, b[0]) and torch.equal(x, b[1]) for (a, x), b in zip(out, batches))
    assert [t.tolist() for t in DeviceFeed([torch.ones(2)], "cpu")] == [[1.0, 1.0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_feed_on_cuda_equals_the_host_batches(fp16_store):
    loader = BatchLoader(fp16_store, fp16_store.spec.hook_names[0], 32, seed=1)
    host = list(loader.epoch(0))
    fed = list(DeviceFeed(loader.epoch(0), "cuda", depth=2))
    assert all(f.is_cuda and torch.equal(f.cpu(), h) for f, h in zip(fed, host)) and len(fed) == len(host)
