"""A sweep over every hook of a store in one read against one sweep per hook, side by side in one run:

    .venv/bin/python benchmarks/bench_multihook.py --store runs/mlp3.zarr --out runs/bench

(a) `saetool sweep --hook_name all` (saetool.sweep.multihook: one loader reads every hook's columns of the same rows);
(b) one `saetool sweep --hook_name H` per hook of the store, one after the other.
Same flags for both (standard, --l1_values of --members values, --ratio, --batch_size, one pass, no report). Counts
the store's chunk reads of training rows (ActivationStore.read_rows calls of at most one chunk) and the wall time of
each route, and checks that every member of (a) equals its twin of (b). Writes DIR/multihook.json.

    .venv/bin/python benchmarks/bench_multihook.py --plan

prints, without training, how `--parallel members` shares the members of several hooks across ranks for common
models and hook sets (saetool.sweep.multihook.member_shares' cost model and saetool.util.distributed.partition_by_cost): the
largest rank's cost over the mean (1.00 = perfect balance) against two simpler splits, equal member counts ignoring
cost, and each hook's members split evenly over the ranks (what one member-parallel sweep per hook does, which
leaves ranks idle when a hook has fewer members than ranks), and the most ensembles one rank holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from saetool.config import SweepConfig, build
from saetool.saved.folders import read_index
from saetool.store.activation_store import ActivationStore
from saetool.sweep.driver import run_sweep


def counted(fn, store_rows: int, chunk: int) -> tuple[float, int]:
    """(seconds, chunk reads of training rows) of fn()."""
    reads = []
    original = ActivationStore.read_rows

    def counting(self, hook_name, start, stop, dtype=torch.float32):
        if stop - start <= chunk and stop <= store_rows:
            reads.append((hook_name, start))
        return original(self, hook_name, start, stop, dtype)

    ActivationStore.read_rows = counting
    try:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t, len(reads)
    finally:
        ActivationStore.read_rows = original


# (case, [(d_in, d_out, members, ratio, skip), ...] one per hook, ranks)
PLANS = [
    ("SmolLM2-135M, resid_post x 30 layers, 16 members, ratio 8", [(576, 576, 16, 8, False)] * 30, 8),
    ("SmolLM2-135M, resid_post (576) + mlp hook_post (1536) x 30 layers, 4 members, ratio 8",
     [(576, 576, 4, 8, False), (1536, 1536, 4, 8, False)] * 30, 8),
    ("SmolLM2-135M, skip transcoders mlp.hook_in -> hook_mlp_out x 30 layers, 4 members, ratio 16",
     [(576, 576, 4, 16, True)] * 30, 8),
    ("Gemma-2-2B, resid (2304), attn hook_z (2048), mlp hook_post (9216) x 26 layers, 4 members, ratio 8",
     [(2304, 2304, 4, 8, False), (2048, 2048, 4, 8, False), (9216, 9216, 4, 8, False)] * 26, 8),
    ("Pythia-70M, resid_post x 6 layers, 3 members (fewer than ranks per hook), ratio 32",
     [(512, 512, 3, 32, False)] * 6, 8),
]


def _worst(costs: list[int], shares, ranks: int) -> float:
    """The largest share's cost over the mean share's."""
    return max(sum(costs[i] for i in share) for share in shares) / (sum(costs) / ranks)


def plan() -> None:
    """The --plan table (see the module docstring)."""
    from saetool.util.distributed import partition_by_cost, split_evenly

    print("| case | ranks | members | cost-balanced (ours) | equal counts | each hook split evenly | most ensembles "
          "on one rank |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, hooks, ranks in PLANS:
        costs = [int(d_in * ratio) * (d_in + d_out) + (d_in * d_out if skip else 0)
                 for d_in, d_out, n, ratio, skip in hooks for _ in range(n)]
        owner = [h for h, (_, _, n, _, _) in enumerate(hooks) for _ in range(n)]

        ours = partition_by_cost(costs, ranks)
        equal = [split_evenly(len(costs), ranks, r) for r in range(ranks)]
        per_hook, offset = [[] for _ in range(ranks)], 0
        for _, _, n, _, _ in hooks:
            for r in range(ranks):
                per_hook[r] += [offset + i for i in split_evenly(n, ranks, r)]
            offset += n
        ensembles = max(len({owner[i] for i in share}) for share in ours)
        worst = [f"{_worst(costs, shares, ranks):.3f}" for shares in (ours, equal, per_hook)]
        print(f"| {name} | {ranks} | {len(costs)} | {' | '.join(worst)} | "
              f"{ensembles} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", action="store_true", help="print the member shares of common cases; train nothing")
    ap.add_argument("--store")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--batch_size", type=int, default=1024)
    args = ap.parse_args()
    if args.plan:
        return plan()
    if not args.store:
        ap.error("--store is required (or --plan)")
    store = ActivationStore.open(args.store)
    hooks, spec = store.spec.hook_names, store.spec
    work = Path(args.out) / "multihook"
    shutil.rmtree(work, ignore_errors=True)
    flags = {"dataset_dir": args.store, "ratio": args.ratio, "batch_size": args.batch_size, "report": False,
             "device": "cpu", "l1_values": list(np.logspace(-3, -1, args.members)), "grad_clip_norm": 0.0}
    train_stop = spec.n_rows - 8192

    def together():
        run_sweep(build(SweepConfig, {**flags, "hook_name": "all", "output_dir": str(work / "all")}), log=lambda *a: None)

    def apart():
        for h in hooks:
            run_sweep(build(SweepConfig, {**flags, "hook_name": h, "output_dir": str(work / "apart" / h)}),
                      log=lambda *a: None)

    t_all, reads_all = counted(together, train_stop, spec.chunk_size)
    t_apart, reads_apart = counted(apart, train_stop, spec.chunk_size)
    worst = 0.0
    for h in hooks:
        for m, twin in zip(read_index(work / "all" / h)["members"], read_index(work / "apart" / h)["members"]):
            a = load_file(str(work / "all" / h / m["path"] / "sae_weights.safetensors"))
            b = load_file(str(work / "apart" / h / twin["path"] / "sae_weights.safetensors"))
            worst = max(worst, max(float((a[k] - b[k]).abs().max()) for k in a))
    result = {"store": args.store, "hooks": hooks, "n_rows": spec.n_rows, "members_per_hook": args.members,
              "ratio": args.ratio, "batch_size": args.batch_size, "seconds_all_in_one": round(t_all, 2),
              "seconds_one_per_hook": round(t_apart, 2), "speedup": round(t_apart / t_all, 3),
              "chunk_reads_all_in_one": reads_all, "chunk_reads_one_per_hook": reads_apart,
              "max_weight_difference": worst}
    (Path(args.out) / "multihook.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
