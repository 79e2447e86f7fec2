"""Cost of the feature browser's collection pass vs the held-out evaluation pass it extends (a script, not a test).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_browser.py --rows 16384 --block_rows 4096   # 16 x 4,608
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_browser.py --members 2 \
        --rows 16384,65536,262144,1000000 --store runs/bench/store1M.zarr      # the issue's 1M rows, ~1 CPU-hour
    .venv/bin/python benchmarks/bench_browser.py --rows 1000000 --device cuda            # the issue's full size

Issue 12 item 4: collecting for 16 members x 4,608 latents over 1M rows must cost at most the held-out
evaluation pass plus 50%. Both passes run here side by side, on the same store and SAEs, in one process:

* ``eval``: :func:`saetool.evaluate.encode_pass` with the report's ReconstructionStats only (what the
  report's held-out metrics cost: read, encode, decode, statistics);
* ``eval+browser``: the same pass feeding the browser's :class:`FeatureCollector` too (the report's default: one
  encode serves both; top 20, 25 samples, windows 12 + 1 + 4);
* ``browser alone`` (``--mode sequential`` only): encode + collector, no decode (``--browser_rows``, a separate pass
  over training rows).

``--mode interleaved`` (default) walks the rows once in blocks of ``--block_rows`` (whole batches) and runs both
passes over each block, alternating which goes first, each with its own statistics and the collector kept across
blocks, so each pass sees the rows in order exactly as one long pass would; it sums each pass's time and reports the
totals at every row count of ``--rows`` (one run gives the trend). Load from other jobs on a shared CPU then falls
on both passes alike instead of on whichever ran during it. ``--mode sequential`` times whole passes one after the
other, once per row count.

Members are independent (each is encoded and collected on its own), so the ratio of a member does not depend on
how many are run; the members' L0 grows from the last to the first, so ``--members 2`` runs the sparsest and the
densest of the 16.

Data: a synthetic store (float16, context 128, Gaussian rows of width ``--d_in``) and ``--members`` random ReLU
SAEs of ``--d_sae`` latents with unit encoder columns and biases from -2.2 to -3.0 (densities ~0.1-1.4%, L0
~6-64). Prints a Markdown table; JSON in --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOOK = "blocks.0.hook_resid_post"


def make_store(path: Path, rows: int, d_in: int):
    from saetool.store import ActivationStore, StoreSpec
    from saetool.store.values import to_store_array

    ctx, chunk = 128, 8192
    rows = -(-rows // chunk) * chunk  # whole chunks (a pass may stop inside the last one)
    spec = StoreSpec(model="synthetic", dataset="synthetic", hook_names=[HOOK], widths={HOOK: d_in}, n_rows=rows,
                     context_size=ctx, chunk_size=chunk, dtype="float16", compression="blosc-zstd")
    store = ActivationStore.create_or_resume(path, spec)
    g = torch.Generator().manual_seed(0)
    for c in range(spec.n_chunks):
        a, b = spec.chunk_rows(c)
        mask = np.ones(b - a, dtype=bool)
        mask[::ctx] = False
        tokens = torch.randint(0, 50000, ((b - a) // ctx, ctx), generator=g).numpy()
        store.write_chunk(c, {HOOK: to_store_array(torch.randn(b - a, d_in, generator=g), "float16", HOOK)},
                          tokens, mask)
    store.finalize({})
    return ActivationStore.open(path)


def open_store(path: Path, rows: int, d_in: int):
    """A new synthetic store written at ``path``, or the one there when it is a complete synthetic store of at least
    ``rows`` rows of width ``d_in`` (anything else at ``path`` is refused, never overwritten)."""
    from saetool.store.activation_store import ActivationStore

    if not path.exists():
        return make_store(path, rows, d_in)
    store = ActivationStore.open(path) if (path / "zarr.json").exists() else None
    if store is None or store.spec.model != "synthetic" or not store.complete or store.spec.n_rows < rows \
            or store.spec.widths.get(HOOK) != d_in:
        sys.exit(f"--store {path}: not a complete synthetic store of >= {rows} rows of width {d_in}; "
                 "pass a new folder")
    return store


def make_saes(members: int, d_in: int, d_sae: int, device: str):
    from saetool.saved.sae import SparseLinearAutoencoder

    g = torch.Generator().manual_seed(1)
    saes = []
    for b in np.linspace(-2.2, -3.0, members):
        w = torch.randn(d_in, d_sae, generator=g)
        w /= w.norm(dim=0, keepdim=True)
        weights = {"W_enc": w, "W_dec": w.T.contiguous(), "b_enc": torch.full((d_sae,), float(b)),
                   "b_dec": torch.zeros(d_in)}
        saes.append(SparseLinearAutoencoder({k: v.to(device) for k, v in weights.items()},
                                            {"architecture": "standard", "d_in": d_in, "d_sae": d_sae,
                                             "l1_coefficient": 0.0}))
    return saes


def timed(fn, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def add_time(total: dict, name: str, wall_cpu: tuple[float, float]) -> None:
    total[name] = total.get(name, 0.0) + wall_cpu[0]
    total[name + " cpu"] = total.get(name + " cpu", 0.0) + wall_cpu[1]


def passes(saes, device: str, batch_rows: int):
    """The two passes over a row range ``span``: ``eval(span)`` and ``both(span)``, each with its own statistics and
    ``both`` with one collector kept across calls."""
    from saetool.evaluate import encode_pass
    from saetool.evaluate.metrics import ReconstructionStats
    from saetool.report.browser.collect import FeatureCollector

    def stats():
        return [ReconstructionStats(1, s.d_in, s.d_sae, device=device) for s in saes]

    def collector():
        return FeatureCollector([s.d_sae for s in saes], 128, top=20, samples=25, before=12, after=4, device=device)

    st_eval, st_both, col = stats(), stats(), collector()
    return {"eval": lambda store, span: encode_pass(saes, store, HOOK, span, device, batch_rows, stats=st_eval),
            "eval+browser": lambda store, span: encode_pass(saes, store, HOOK, span, device, batch_rows,
                                                            stats=st_both, collector=col),
            "browser alone": lambda store, span: encode_pass(saes, store, HOOK, span, device, batch_rows,
                                                             collector=collector()),
            "collector": col}


def run(store, saes, rows: int, device: str, batch_rows: int, skip_alone: bool = False) -> dict:
    """Sequential mode: whole passes over rows ``[0, rows)`` one after the other."""
    p, span, out = passes(saes, device, batch_rows), (0, rows), {}
    for name in ("eval", "eval+browser") if skip_alone else ("eval", "eval+browser", "browser alone"):
        add_time(out, name, timed(lambda name=name: p[name](store, span), device))
    return finish(out, p["collector"], device)


def run_interleaved(store, saes, row_counts: list[int], device: str, batch_rows: int, block_rows: int) -> list[dict]:
    """Interleaved mode: one walk over ``[0, max(row_counts))`` in blocks, both passes over each block (alternating
    which goes first); the summed times at every row count of ``row_counts``."""
    p = passes(saes, device, batch_rows)
    step = -(-batch_rows // 128) * 128  # the batch step of context_batches: blocks hold whole batches
    block = max(1, -(-block_rows // step)) * step
    edges = sorted(set(range(0, max(row_counts), block)) | set(row_counts))
    total, results = {}, []
    for i, (a, b) in enumerate(itertools.pairwise(edges)):
        for name in (["eval", "eval+browser"] if i % 2 == 0 else ["eval+browser", "eval"]):
            add_time(total, name, timed(lambda name=name, span=(a, b): p[name](store, span), device))
        if b in row_counts:
            results.append({"rows": b, **finish(dict(total), p["collector"], device)})
            print(f"rows {b}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[-1].items() if k != "l0"),
                  flush=True)
    return results


def finish(out: dict, col, device: str) -> dict:
    """Adds the ratios: ``ratio`` of CPU times on a CPU device (what the passes cost this process, whatever else runs
    on a shared machine; one torch thread), of wall times on a GPU; ``ratio_wall`` of wall times."""
    l0 = [float(r["fired"].sum() / r["n_tokens"]) for r in map(col.result, range(len(col.n_latents)))]
    out["l0"] = l0
    out["ratio_wall"] = out["eval+browser"] / out["eval"]
    out["ratio"] = out["ratio_wall"] if device.startswith("cuda") else out["eval+browser cpu"] / out["eval cpu"]
    out.setdefault("browser alone", float("nan"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="16384,65536", help="row counts to measure, comma-separated")
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--d_in", type=int, default=576)
    p.add_argument("--d_sae", type=int, default=4608)
    p.add_argument("--batch_rows", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=["interleaved", "sequential"], default="interleaved")
    p.add_argument("--block_rows", type=int, default=16384, help="interleaved mode: rows per block")
    p.add_argument("--skip_alone", action="store_true", help="sequential mode: skip the browser-alone pass")
    p.add_argument("--store", default=None, help="keep the synthetic store in this folder and reuse it when it "
                   "holds enough rows of --d_in (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "bench_browser.json"))
    args = p.parse_args()
    row_counts = [int(r) for r in args.rows.split(",")]
    saes = make_saes(args.members, args.d_in, args.d_sae, args.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(args.store) if args.store else Path(tmp) / "s.zarr", max(row_counts), args.d_in)
        run(store, saes, min(2048, max(row_counts)), args.device, args.batch_rows, True)  # warm-up
        if args.mode == "interleaved":
            results = run_interleaved(store, saes, row_counts, args.device, args.batch_rows, args.block_rows)
        for rows in row_counts if args.mode == "sequential" else []:
            r = run(store, saes, rows, args.device, args.batch_rows, args.skip_alone)
            results.append({"rows": rows, **r})
            print(f"rows {rows}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "l0"), flush=True)
    print(f"\n{args.members} members x {args.d_sae} latents, d_in {args.d_in}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, mode {args.mode}\n")
    cpu = not args.device.startswith("cuda")
    t = "CPU" if cpu else "wall"
    print(f"| rows | eval pass ({t} s) | eval + browser ({t} s) | ratio ({t}) | ratio (wall) | browser alone (s) "
          "| L0 (first, last member) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        e, b = (r[k + " cpu"] if cpu else r[k] for k in ("eval", "eval+browser"))
        print(f"| {r['rows']:,} | {e:.1f} | {b:.1f} | {r['ratio']:.3f} | {r['ratio_wall']:.3f} | "
              f"{r['browser alone']:.1f} | {r['l0'][0]:.1f}, {r['l0'][-1]:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
