"""Quality at matched L0: saetool against SAELens on the same store and the same batches in the same order.

    .venv/bin/python benchmarks/bench_quality.py --store runs/demo/activations.zarr   # after `make demo`

Every recipe trains one pass over the store's training rows (the sweep's rows: all but the last --eval_tokens) at
one batch size and learning rate. The batches are the sweep's own (saetool.store.loader.BatchLoader with the sweep's
seed and chunk pooling), handed to SAELens's SAETrainer as its data provider, so both tools see identical rows.
Each saved SAE is then evaluated here, independently of both tools' metrics code, on the held-out rows:
FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 and L0 = mean number of nonzero latents per row. The table gives
FVU on each recipe's Pareto front (FVU against L0), interpolated linearly in log L0 at L0 32, 64 and 128
("-" where a recipe's members do not span that L0).

Recipes (standard = ReLU + L1, topk; batchtopk and jumprelu for saetool's clipping only: SAELens evaluates
BatchTopK through a threshold in other units, and its JumpReLU coefficient is in other units): saetool's defaults; saetool's previous standard default (no clipping);
saetool with SAELens's standard recipe (`--decoder_norm_l1`, clipping at 1/d_in); SAELens 6.x defaults
(its init: decoder rows of norm 0.1, W_enc = W_dec^T, b_dec = 0; clipping at 1; TopK: AuxK coefficient 1 and
decoder-norm rescaling); SAELens from saetool's initial weights (unit-norm decoder rows, W_enc = W_dec^T,
b_dec = the training rows' mean), which isolates the effect of initialisation.
SAELens's MSE is summed over d_in where saetool's is a mean, so its L1 coefficients are saetool's x d_in.
Writes runs/bench/quality.json and runs/bench/quality.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from saetool.config import SweepConfig, build
from saetool.ensemble.stack import init_member
from saetool.saved.folders import load_sweep
from saetool.store.activation_store import ActivationStore
from saetool.store.loader import BatchLoader
from saetool.sweep.driver import run_sweep
from saetool.train.setup import b_dec_init, split_rows

L0_TARGETS = (32, 64, 128)


def heldout(store, hook: str, rows: tuple[int, int]) -> torch.Tensor:
    """The held-out rows the sweep never trains on, BOS/separator rows removed, float32 [n, d_in]."""
    keep = torch.from_numpy(store.read_mask(*rows))
    return store.read_rows(hook, *rows, torch.float32)[keep]


@torch.no_grad()
def quality(encode, decode, x: torch.Tensor, batch: int = 2048) -> tuple[float, float]:
    """(L0, FVU) of one SAE on x, computed here from its encode/decode."""
    err = nnz = 0.0
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        f = encode(xb)
        err += (decode(f).float() - xb).pow(2).sum().item()
        nnz += (f != 0).sum().item()
    return nnz / x.shape[0], err / (x - x.mean(0)).pow(2).sum().item()


def at_l0(points: list[tuple[float, float]], targets=L0_TARGETS) -> list[float | None]:
    """FVU of the Pareto front of (L0, FVU) points, interpolated linearly in log L0 at each target."""
    front, best = [], float("inf")
    for l0, f in sorted(points):
        if f < best:
            front.append((l0, f))
            best = f
    out = []
    for t in targets:
        pairs = [(a, b) for a, b in itertools.pairwise(front) if a[0] <= t <= b[0]]
        if not pairs:
            out.append(None)
            continue
        (l0a, fa), (l0b, fb) = pairs[0]
        w = 0.0 if l0a == l0b else (np.log(t) - np.log(l0a)) / (np.log(l0b) - np.log(l0a))
        out.append(float(fa + w * (fb - fa)))
    return out


def train_saetool(args, flags: dict, eval_x: torch.Tensor) -> list[tuple[float, float]]:
    out = Path(args.out) / "quality_runs" / "saetool"
    shutil.rmtree(out, ignore_errors=True)
    cfg = build(SweepConfig, {"dataset_dir": args.store, "output_dir": str(out), "ratio": args.ratio,
                              "batch_size": args.batch_size, "adam_lr": args.lr, "device": "cpu", "report": False,
                              "eval_tokens": args.eval_tokens, **flags})
    run_sweep(cfg, log=lambda *a, **k: None)
    saes = load_sweep(out).values()
    return [quality(s.encode, s.decode, eval_x) for s in saes]


def train_saelens(args, architecture: str, values: list, batches: list[torch.Tensor], eval_x: torch.Tensor,
                  mean: torch.Tensor | None) -> list[tuple[float, float]]:
    """SAELens's SAETrainer on `batches`, one SAE per value (L1 coefficient in SAELens's units, or k); with `mean`,
    from saetool's initial weights (member i: init_member seed i, b_dec = mean)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_in = eval_x.shape[1]
    d_sae = int(d_in * args.ratio)
    points = []
    for i, v in enumerate(values):
        torch.manual_seed(i)
        if architecture == "standard":
            sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=v))
        else:
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=int(v)))
        if mean is not None:
            with torch.no_grad():
                for name, value in init_member(d_in, d_sae, i).items():
                    getattr(sae, name).copy_(value)
                sae.b_dec.copy_(mean)
        cfg = SAETrainerConfig(total_training_samples=sum(b.shape[0] for b in batches),  # the last batch is short
                               train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr / 10,
                               device="cpu")  # lr_end as its runner config sets it (unused: constant lr)
        SAETrainer(cfg=cfg, sae=sae, data_provider=iter(batches)).fit()
        sae.eval()
        points.append(quality(sae.encode, sae.decode, eval_x))
    return points


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/activations.zarr")
    p.add_argument("--ratio", type=float, default=4)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval_tokens", type=int, default=8192)
    p.add_argument("--l1", default="-2.3,-1.2,5", help="saetool L1 coefficients: log10 min, log10 max, count (--l1=-2.3,-1.2,5)")
    p.add_argument("--k", default="16,32,64,128")
    p.add_argument("--l0", default="0.005,0.01,0.02,0.08", help="saetool JumpReLU l0_coefficient values")
    p.add_argument("--only", default="", help="comma list of architectures to run (default: all)")
    p.add_argument("--skip", default="", help="comma list of recipe names (or architecture/recipe) to skip")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--keep", action="store_true", help="keep the recipes of an earlier run with the same arguments")
    args = p.parse_args()
    skip = set(args.skip.split(","))

    store = ActivationStore.open(args.store)
    hook = store.resolve_hook(None)
    d_in = store.width(hook)
    train_rows, eval_rows = split_rows(store, args.eval_tokens)
    eval_x = heldout(store, hook, eval_rows)
    loader = BatchLoader(store, hook, args.batch_size, train_rows, seed=0, shuffle_chunks=4)  # the sweep's batches
    batches = [x.float() for x in loader.epoch(0)]
    mean = b_dec_init("mean", store, hook, train_rows)
    lo, hi, n = args.l1.split(",")
    l1 = [float(v) for v in np.logspace(float(lo), float(hi), int(n))]
    ks = [int(k) for k in args.k.split(",")]
    clip = 1.0 / d_in

    bt = {"architecture": "batchtopk", "k_values": ks, "threshold_lr": 0.05}
    mt = {**bt, "architecture": "matryoshka_batchtopk"}
    jr = {"architecture": "jumprelu", "l0_values": [float(v) for v in args.l0.split(",")]}
    recipes = [  # both tools' defaults first, then saetool's clipping on the other architectures, then matched settings
        ("standard", "saetool default (clipping 1/d_in)", lambda: train_saetool(args, {"l1_values": l1}, eval_x)),
        ("standard", "saetool, no clipping (the previous default)",
         lambda: train_saetool(args, {"l1_values": l1, "grad_clip_norm": 0.0}, eval_x)),
        ("standard", "SAELens default", lambda: train_saelens(args, "standard", [v * d_in for v in l1], batches,
                                                               eval_x, None)),
        ("topk", "saetool default", lambda: train_saetool(args, {"architecture": "topk", "k_values": ks}, eval_x)),
        ("topk", "saetool, clipping 1/d_in",
         lambda: train_saetool(args, {"architecture": "topk", "k_values": ks, "grad_clip_norm": clip}, eval_x)),
        ("topk", "SAELens default", lambda: train_saelens(args, "topk", ks, batches, eval_x, None)),
        ("batchtopk", "saetool, no clipping (the previous default)",
         lambda: train_saetool(args, {**bt, "grad_clip_norm": 0.0}, eval_x)),
        ("batchtopk", "saetool default (clipping 1/d_in)", lambda: train_saetool(args, bt, eval_x)),
        ("jumprelu", "saetool, no clipping (the previous default)",
         lambda: train_saetool(args, {**jr, "grad_clip_norm": 0.0}, eval_x)),
        ("jumprelu", "saetool default (clipping 1/d_in)", lambda: train_saetool(args, jr, eval_x)),
        ("matryoshka_batchtopk", "saetool, no clipping (the previous default)",
         lambda: train_saetool(args, {**mt, "grad_clip_norm": 0.0}, eval_x)),
        ("matryoshka_batchtopk", "saetool default (clipping 1/d_in)", lambda: train_saetool(args, mt, eval_x)),
        ("standard", "saetool `--decoder_norm_l1` (SAELens's loss), clipping 1/d_in",
         lambda: train_saetool(args, {"l1_values": l1, "decoder_norm_l1": True, "grad_clip_norm": clip}, eval_x)),
        ("standard", "SAELens from saetool's init", lambda: train_saelens(args, "standard", [v * d_in for v in l1],
                                                                           batches, eval_x, mean)),
        ("topk", "SAELens from saetool's init", lambda: train_saelens(args, "topk", ks, batches, eval_x, mean)),
    ]
    only = set(args.only.split(",")) if args.only else None
    rows, done = [], set()
    saved = Path(args.out) / "quality.json"
    if args.keep and saved.exists() and json.loads(saved.read_text())["args"] == vars(args):
        rows = json.loads(saved.read_text())["rows"]   # recipes measured by an earlier run with the same arguments
        done = {(r["architecture"], r["recipe"]) for r in rows}
    for architecture, name, fn in recipes:
        if name in skip or f"{architecture}/{name}" in skip or (only and architecture not in only) \
                or (architecture, name) in done:
            continue
        t0 = time.perf_counter()
        points = fn()
        rows.append({"architecture": architecture, "recipe": name, "points": points, "fvu_at_l0": at_l0(points),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{architecture:8s} {name}: " + ", ".join(f"L0 {a:.1f} FVU {b:.4f}" for a, b in points), flush=True)
        write_results(Path(args.out), {"args": vars(args), "d_in": d_in, "n_batches": len(batches),
                                       "n_eval_rows": eval_x.shape[0], "rows": rows})
    print((Path(args.out) / "quality.md").read_text())


def write_results(out: Path, results: dict) -> None:
    """quality.json (every point) and quality.md (the table), rewritten after every recipe."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    lines = ["| architecture | recipe | " + " | ".join(f"FVU @ L0 {t}" for t in L0_TARGETS) + " | members (L0) |",
             "|---|---|" + "---:|" * (len(L0_TARGETS) + 1)]
    for r in results["rows"]:
        l0s = ", ".join(f"{a:.0f}" for a, _ in r["points"])
        lines.append(f"| {r['architecture']} | {r['recipe']} | " + " | ".join(fmt(v) for v in r["fvu_at_l0"])
                     + f" | {l0s} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
