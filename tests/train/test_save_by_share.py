"""Saving by share (issue 24): a member-parallel sweep on 2 processes writes each rank's members from that rank;
the collectives carry index entries and statistics, never weights; the folders equal one process's."""

import pickle

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from saetool.config import SweepConfig
from saetool.saved.folders import load_sweep, read_index
from saetool.sweep.driver import run_sweep
from saetool.util.distributed import Dist
from tests.synthetic import write_store

D_IN, RATIO = 16, 8  # one member's W_enc + W_dec: 2 x 16 x 128 x 4 bytes = 16 KiB


def _cfg(store, out) -> SweepConfig:
    return SweepConfig(dataset_dir=str(store), output_dir=str(out), ratio=RATIO, l1_values=[1e-3, 1e-2, 1e-1, 0.3],
                       batch_size=32, eval_tokens=64, adam_lr=1e-2, parallel="members", device="cpu", report=False,
                       save_after_every=True)


def _rank(rank: int, world: int, init: str, store: str, out: str, sizes: str) -> None:
    """One process of the sweep: every object a collective sends from this rank is pickled and measured."""
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    sent = []
    gather, broadcast = Dist.all_gather_objects, Dist.broadcast_object

    def measured_gather(self, obj):
        sent.append(len(pickle.dumps(obj)))
        return gather(self, obj)

    def measured_broadcast(self, obj, src=0):
        sent.append(len(pickle.dumps(obj)) if self.rank == src else 0)
        return broadcast(self, obj, src)

    Dist.all_gather_objects, Dist.broadcast_object = measured_gather, measured_broadcast
    torch.set_num_threads(1)
    try:
        run_sweep(_cfg(store, out), log=lambda *a: None)
    finally:
        tdist.destroy_process_group()
    with open(f"{sizes}.{rank}", "w") as f:
        f.write(" ".join(map(str, sent)))


def test_member_parallel_save_sends_no_weights_and_equals_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    write_store(tmp_path / "s.zarr", torch.randn(640, D_IN, generator=g) * torch.linspace(0.5, 2, D_IN), 8, 128)
    one = tmp_path / "one"
    run_sweep(_cfg(tmp_path / "s.zarr", one), log=lambda *a: None)
    two, sizes = tmp_path / "two", tmp_path / "sizes"
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path / "s.zarr"), str(two), str(sizes)), nprocs=2)
    member_bytes = 2 * D_IN * D_IN * RATIO * 4
    for rank in (0, 1):
        sent = [int(n) for n in (tmp_path / f"sizes.{rank}").read_text().split()]
        assert sent and max(sent) < member_bytes / 4, (rank, max(sent), member_bytes)  # entries and stats only
    assert [m["path"] for m in read_index(two)["members"]] == [m["path"] for m in read_index(one)["members"]]
    a, b = load_sweep(one), load_sweep(two)
    assert sorted(a) == sorted(b)
    for key in a:  # each member equals its one-process training
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(a[key], name), getattr(b[key], name), atol=1e-6, rtol=0)
    snapshots = sorted(p.name for p in (two / "snapshots").iterdir())
    assert snapshots == sorted(p.name for p in (one / "snapshots").iterdir()) and snapshots  # snapshots by share too
