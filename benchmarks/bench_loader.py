"""The training loader against what the machine can do, side by side in one run on one store:

    .venv/bin/python benchmarks/bench_loader.py --store runs/demo/activations.zarr --out runs/bench

(a) `BatchLoader.epoch` (shuffled, masked batches in the store dtype, `--threads` read threads);
(b) the same chunk files decoded directly (saetool.store.chunks, no shuffle or mask) on the same number of threads;
(c) a random gather + fp16 -> fp32 of rows already in RAM, batch by batch (what the step's side pays);
(d) the old single-threaded path for reference: zarr reads converted to fp32, then masked and permuted.
Each route runs `--repeats` times; the best is reported. Writes DIR/loader.json.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from saetool.store.activation_store import ActivationStore
from saetool.store.chunks import ChunkReader
from saetool.store.loader import BatchLoader


def best_rate(fn, repeats: int) -> float:
    """Rows per second of fn() (which returns the rows it produced), best of `repeats`."""
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--hook_name", default=None)
    ap.add_argument("--batch_size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    store = ActivationStore.open(args.store)
    hook = store.resolve_hook(args.hook_name)
    loader = BatchLoader(store, hook, args.batch_size, seed=0, num_threads=args.threads)
    itemsize = torch.empty(0, dtype=loader.store_dtype).element_size()
    row_bytes = store.width(hook) * itemsize

    epochs = iter(range(10**6))
    loader_rate = best_rate(lambda: sum(len(b) for b in loader.epoch(next(epochs))), args.repeats)

    reader = ChunkReader.for_array(store.path / hook)
    if reader is None:
        raise SystemExit(f"{args.store}: {hook} is not in a layout saetool.store.chunks decodes")

    def decode() -> int:
        with ThreadPoolExecutor(args.threads) as ex:
            return sum(len(x) for x in ex.map(reader.read, range(store.spec.n_chunks)))

    decode_rate = best_rate(decode, args.repeats)
    rows = torch.from_numpy(reader.read(0).copy())
    if loader.store_dtype == torch.bfloat16:
        rows = rows.view(torch.bfloat16)

    def gather() -> int:
        perm = torch.randperm(len(rows))
        for i in range(0, len(rows) - args.batch_size + 1, args.batch_size):
            rows.index_select(0, perm[i : i + args.batch_size]).float()
        return len(rows) // args.batch_size * args.batch_size

    gather_rate = best_rate(gather, args.repeats)

    def old_path() -> int:
        rng, n = np.random.default_rng(0), 0
        for c in range(store.spec.n_chunks):
            a, b = store.spec.chunk_rows(c)
            x = torch.from_numpy(np.asarray(store.group[hook][a:b])).float()[torch.from_numpy(store.read_mask(a, b))]
            n += len(x[torch.from_numpy(rng.permutation(len(x)))])
        return n

    old_rate = best_rate(old_path, 1)
    result = {"store": args.store, "hook_name": hook, "d_in": store.width(hook), "dtype": store.spec.dtype,
              "batch_size": args.batch_size, "threads": args.threads, "torch_threads": torch.get_num_threads(),
              "loader_rows_per_s": round(loader_rate), "loader_mb_per_s": round(loader_rate * row_bytes / 1e6),
              "decode_rows_per_s": round(decode_rate), "gather_rows_per_s": round(gather_rate),
              "old_path_rows_per_s": round(old_rate), "loader_vs_decode": round(loader_rate / decode_rate, 3),
              "loader_vs_old": round(loader_rate / old_rate, 2)}
    print("| route | rows/s | MB/s | vs direct decode |\n|---|---:|---:|---:|")
    for name, rate in (("(a) BatchLoader.epoch", loader_rate), ("(b) direct decode, same threads", decode_rate),
                       ("(c) in-RAM gather + fp32", gather_rate), ("(d) old path (zarr, fp32, 1 thread)", old_rate)):
        print(f"| {name} | {rate:,.0f} | {rate * row_bytes / 1e6:,.0f} | {rate / decode_rate:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
