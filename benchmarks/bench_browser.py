"""Cost of the feature browser's collection pass vs the held-out evaluation pass it extends (a script, not a test).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_browser.py --rows 16384 --skip_alone   # ~2 min, 2-core CPU
    .venv/bin/python benchmarks/bench_browser.py --rows 1000000 --device cuda            # the issue's full size

Issue 12 item 4: collecting for 16 members x 4,608 latents over 1M rows must cost at most the held-out
evaluation pass plus 50%. Both passes run here side by side, on the same store and SAEs, in one process:

* ``eval``: :func:`saetool.browser.collect.encode_pass` with the report's ReconstructionStats only (what the
  report's held-out metrics cost: read, encode, decode, statistics);
* ``eval+browser``: the same pass feeding the browser's :class:`FeatureCollector` too (the report's default: one
  encode serves both; top 20, 25 samples, windows 12 + 1 + 4);
* ``browser alone``: encode + collector, no decode (``--browser_rows``, a separate pass over training rows).

Data: a synthetic store (float16, context 128, Gaussian rows of width ``--d_in``) and ``--members`` random ReLU
SAEs of ``--d_sae`` latents with unit encoder columns and biases from -2.2 to -3.0 (densities ~0.1-1.4%, L0
~6-64). Rows default to 16,384 and 65,536 (the shared 2-core CPU evaluated 100-200 rows/s for 16 x 4,608
latents, so 1M rows would take hours), so the trend shows how the ratio moves with rows: the collector merges fewer
candidates per row as its thresholds rise. Prints a Markdown table; JSON in --out.
"""

from __future__ import annotations

import argparse
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
    from saetool.store import ActivationStore, StoreSpec, to_store_array

    ctx, chunk = 128, 8192
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


def make_saes(members: int, d_in: int, d_sae: int, device: str):
    from saetool.sae import SparseLinearAutoencoder

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


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run(store, saes, rows: int, device: str, batch_rows: int, skip_alone: bool = False) -> dict:
    from saetool.browser.collect import FeatureCollector, encode_pass
    from saetool.metrics import ReconstructionStats

    span = (0, rows)

    def stats():
        return [ReconstructionStats(1, s.d_in, s.d_sae, device=device) for s in saes]

    def collector():
        return FeatureCollector([s.d_sae for s in saes], 128, top=20, samples=25, before=12, after=4, device=device)

    out = {}
    out["eval"] = timed(lambda: encode_pass(saes, store, HOOK, span, device, batch_rows, stats=stats()), device)
    col = collector()
    out["eval+browser"] = timed(lambda: encode_pass(saes, store, HOOK, span, device, batch_rows, stats=stats(),
                                                    collector=col), device)
    out["browser alone"] = float("nan") if skip_alone else timed(
        lambda: encode_pass(saes, store, HOOK, span, device, batch_rows, collector=collector()), device)
    res = col.result(0)
    out["l0_first_member"] = float(res["fired"].sum() / res["n_tokens"])
    out["ratio"] = out["eval+browser"] / out["eval"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="16384,65536", help="row counts to measure, comma-separated")
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--d_in", type=int, default=576)
    p.add_argument("--d_sae", type=int, default=4608)
    p.add_argument("--batch_rows", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip_alone", action="store_true", help="skip the browser-alone pass (saves a third)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "bench_browser.json"))
    args = p.parse_args()
    row_counts = [int(r) for r in args.rows.split(",")]
    saes = make_saes(args.members, args.d_in, args.d_sae, args.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "s.zarr", max(row_counts), args.d_in)
        run(store, saes, min(2048, max(row_counts)), args.device, args.batch_rows, True)  # warm-up
        for rows in row_counts:
            r = run(store, saes, rows, args.device, args.batch_rows, args.skip_alone)
            results.append({"rows": rows, **r})
            print(f"rows {rows}: {r}", flush=True)
    print(f"\n{args.members} members x {args.d_sae} latents, d_in {args.d_in}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| rows | eval pass (s) | eval + browser (s) | ratio | browser alone (s) | L0 (member 0) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['eval']:.1f} | {r['eval+browser']:.1f} | {r['ratio']:.3f} | "
              f"{r['browser alone']:.1f} | {r['l0_first_member']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
