"""Sweep-step throughput, side by side in one run: saetool's ensemble step against a Python loop of separate
PyTorch SAEs and against SAELens training the same SAEs one after another, as ratios and as a fraction of
the machine's matmul peak measured in the same run.

    .venv/bin/python benchmarks/bench_sweep.py --store runs/demo/activations.zarr   # after `make demo`

Every variant trains the same members (16 L1 values, ratio 8 -> d_sae 4608 for d_in 576) on the same stored
batches (batch 4096) for `--steps` timed steps after `--warmup` untimed ones, and reports SAE-tokens/s
(members x tokens / s), achieved FLOP/s counting the five matmuls a step needs (10 x batch x d_in x d_sae per
member) against a `torch.mm` peak of the same shape, and each variant's FVU on held-out rows afterwards.

Every variant optimises the SAME objective from the SAME initial weights, so the comparison is at equal FVU:
SAELens' standard training loss (MSE summed over d_in, L1 weighted by decoder norms, no unit-norm projection,
gradients clipped to norm 1 per SAE as its SAETrainer does). saetool runs it as `--decoder_norm_l1` with
`--grad_clip_norm 1/d_in` and L1 / d_in (its MSE is a mean over d_in, so its loss is SAELens' / d_in; Adam
follows the same path). The table's last column is the largest relative FVU difference to SAELens.
Writes runs/bench/sweep.json and runs/bench/sweep.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saetool.ensemble.fused import fused_loss_and_grads
from saetool.ensemble.stack import SAEEnsemble, init_member, train_step
from saetool.evaluate.metrics import fvu
from saetool.store.activation_store import ActivationStore
from saetool.store.loader import BatchLoader
from saetool.train.step import train_batch_fused


def matmul_peak(batch: int, d_in: int, d_sae: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """The machine's matmul peak for this step: the best FLOP/s of torch.mm over the three shapes a step multiplies
    ([batch, d_in] @ [d_in, d_sae], [batch, d_sae] @ [d_sae, d_in], [d_in, batch] @ [batch, d_sae]), best of
    `repeats` each."""
    best = 0.0
    for m, k, n in ((batch, d_in, d_sae), (batch, d_sae, d_in), (d_in, batch, d_sae)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - t))
    return best


WARMUP_SECONDS: dict[str, float] = {}


def timed(step, batches, warmup: int) -> float:
    """Seconds per step over batches[warmup:] after running batches[:warmup] (their total time, which holds
    torch.compile's compilation, goes to WARMUP_SECONDS["last"])."""
    t = time.perf_counter()
    for x in batches[:warmup]:
        step(x)
    WARMUP_SECONDS["last"] = time.perf_counter() - t
    t = time.perf_counter()
    for x in batches[warmup:]:
        step(x)
    return (time.perf_counter() - t) / (len(batches) - warmup)


class PlainSAE(nn.Module):
    """One textbook SAE (the loop baseline): same init and loss as saetool's members (decoder-norm L1)."""

    def __init__(self, d_in, d_sae, seed, l1):
        super().__init__()
        w = init_member(d_in, d_sae, seed)
        self.W_enc, self.W_dec = nn.Parameter(w["W_enc"]), nn.Parameter(w["W_dec"])
        self.b_enc, self.b_dec = nn.Parameter(w["b_enc"]), nn.Parameter(w["b_dec"])
        self.l1 = l1

    def forward(self, x):
        f = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        return f @ self.W_dec + self.b_dec, f

    def loss(self, x):
        x_hat, f = self(x)
        return ((x_hat - x) ** 2).mean() + self.l1 * (f * self.W_dec.norm(dim=-1)).sum(-1).mean()


def run_saetool(variant, l1, d_in, d_sae, mean, batches, eval_x, warmup, group=4, compile_=False, autocast=False,
                grouped=False):
    """variant "fused" (members in groups of `group`; bf16 matmul operands with autocast) or "autograd" (stacked,
    or in groups of `group` if grouped; under bf16 autocast with autocast)."""
    ens = SAEEnsemble("standard", d_in, d_sae, {"l1_coefficient": l1}, seeds=list(range(len(l1))), decoder_norm_l1=True)
    clip = 1.0 / d_in
    ens.set_b_dec(mean)
    opt = torch.optim.Adam(ens.parameters(), lr=1e-3, eps=1e-8 / d_in)  # SAELens eps 1e-8 on a loss x d_in
    if variant == "fused":
        fn = torch.compile(fused_loss_and_grads) if compile_ else fused_loss_and_grads
        if autocast:
            fn = functools.partial(fn, compute_dtype=torch.bfloat16)

        def step(x):
            train_batch_fused(ens, opt, x, len(x), group, fn, grad_clip_norm=clip)
    else:
        from saetool.ensemble.stack import loss_and_stats

        fn = torch.compile(loss_and_stats) if compile_ else loss_and_stats

        def step(x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                train_step(ens, opt, x, step_fn=fn, grad_clip_norm=clip, member_group=group if grouped else 0)
    seconds = timed(step, batches, warmup)
    with torch.no_grad():
        x_hat, _ = ens(eval_x)
    return seconds, fvu(eval_x, x_hat).tolist()


def run_loop(l1, d_in, d_sae, mean, batches, eval_x, warmup, compile_=False, autocast=False):
    saes = [PlainSAE(d_in, d_sae, i, v) for i, v in enumerate(l1)]
    for s in saes:
        with torch.no_grad():
            s.b_dec.copy_(mean)
    opts = [torch.optim.Adam(s.parameters(), lr=1e-3, eps=1e-8 / d_in) for s in saes]
    losses = [torch.compile(s.loss) if compile_ else s.loss for s in saes]

    def step(x):
        for s, opt, loss in zip(saes, opts, losses):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss(x).backward()
            nn.utils.clip_grad_norm_(s.parameters(), 1.0 / d_in)
            opt.step()

    seconds = timed(step, batches, warmup)
    with torch.no_grad():
        return seconds, [fvu(eval_x, s(eval_x)[0]).item() for s in saes]


def run_saelens(l1, d_in, d_sae, mean, batches, eval_x, warmup, compile_=False, autocast=False):
    """SAELens' StandardTrainingSAE trained one SAE after another, each step as its SAETrainer does it:
    training_forward_pass, backward, clip_grad_norm_(1.0), Adam; initial weights are saetool's (init_member), so
    every variant starts from the same point."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    saes, opts, fwd = [], [], []
    for v in l1:
        torch.manual_seed(len(saes))
        # SAELens sums the squared error over d_in where saetool averages it: d_in * l1 is the same objective
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=v * d_in))
        init = init_member(d_in, d_sae, len(saes))
        with torch.no_grad():
            for name, value in init.items():
                getattr(sae, name).copy_(value)
            sae.b_dec.copy_(mean)
        saes.append(sae)
        opts.append(torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.9, 0.999)))
        fwd.append(torch.compile(sae.training_forward_pass) if compile_ else sae.training_forward_pass)

    def step(x):
        for sae, opt, f in zip(saes, opts, fwd):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = f(TrainStepInput(sae_in=x, coefficients={"l1": sae.cfg.l1_coefficient}, dead_neuron_mask=None,
                                       n_training_steps=0, is_logging_step=False))
            out.loss.backward()
            nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()

    seconds = timed(step, batches, warmup)
    with torch.no_grad():
        return seconds, [fvu(eval_x, sae(eval_x)).item() for sae in saes]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/activations.zarr")
    p.add_argument("--ratio", type=float, default=8)
    p.add_argument("--n_members", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--groups", default="1,4,16", help="member groups of the fused kernel to measure")
    p.add_argument("--skip", default="", help="comma list of variants to skip: saelens,loop,autograd,compiled,bf16")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    skip = set(args.skip.split(","))

    torch.manual_seed(0)
    store = ActivationStore.open(args.store)
    hook = store.resolve_hook(None)
    d_in = store.width(hook)
    d_sae = int(d_in * args.ratio)
    n_steps = max(args.warmup, 2) + args.steps
    loader = BatchLoader(store, hook, args.batch_size, (0, store.spec.n_rows - 8192), seed=0)
    batches = [x.float() for _, x in zip(range(n_steps), loader.epoch(0))]  # the store's fp16 rows, as fp32
    eval_x = BatchLoader(store, hook, 8192, (store.spec.n_rows - 8192, store.spec.n_rows)).epoch(0).__next__().float()
    mean = torch.cat(batches).mean(0)
    l1 = [float(v) for v in np.logspace(-3, -1, args.n_members)]
    flops_per_step = 10 * args.batch_size * d_in * d_sae * args.n_members
    peak32 = matmul_peak(args.batch_size, d_in, d_sae, torch.float32)
    peak16 = matmul_peak(args.batch_size, d_in, d_sae, torch.bfloat16)
    print(f"d_in {d_in}, d_sae {d_sae}, {args.n_members} members, batch {args.batch_size}, threads "
          f"{torch.get_num_threads()}; torch.mm peak fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s")

    rows = []

    def record(name, precision, seconds, fvus):
        flops = flops_per_step / seconds
        peak = peak32 if precision == "fp32" else peak16
        rows.append({"variant": name, "precision": precision, "seconds_per_step": seconds,
                     "sae_tokens_per_s": args.n_members * args.batch_size / seconds, "gflops": flops / 1e9,
                     "fraction_of_peak": flops / peak, "fvu_min": min(fvus), "fvu_max": max(fvus), "fvu": fvus,
                     "warmup_seconds": WARMUP_SECONDS.get("last")})
        print(f"  {name:38s} {precision}  {rows[-1]['sae_tokens_per_s']:8.0f} SAE-tok/s  {flops / peak:5.0%} of peak"
              f"  FVU {min(fvus):.4f}..{max(fvus):.4f}", flush=True)

    common = (l1, d_in, d_sae, mean, batches, eval_x, args.warmup)
    for g in [int(g) for g in args.groups.split(",")]:
        record(f"saetool fused, groups of {g}", "fp32", *run_saetool("fused", *common, group=g))
    if "compiled" not in skip:
        best = max((r for r in rows if r["variant"].startswith("saetool fused")), key=lambda r: r["sae_tokens_per_s"])
        g = int(best["variant"].rsplit(" ", 1)[1])
        warm = (*common[:-1], max(args.warmup, 2))  # the first two calls compile (grads are created on the first)
        record(f"saetool fused compiled, groups of {g}", "fp32", *run_saetool("fused", *warm, group=g, compile_=True))
    if "autograd" not in skip:
        record("saetool autograd (stacked bmm)", "fp32", *run_saetool("autograd", *common))
        record("saetool autograd, groups of 4", "fp32", *run_saetool("autograd", *common, grouped=True))
    if "loop" not in skip:
        record("loop of separate torch SAEs", "fp32", *run_loop(*common))
    if "saelens" not in skip:
        record("SAELens, one SAE after another", "fp32", *run_saelens(*common))
    if "bf16" not in skip:
        g = int(args.groups.split(",")[-1] if "4" not in args.groups.split(",") else 4)
        record(f"saetool fused bf16, groups of {g}", "bf16", *run_saetool("fused", *common, group=g, autocast=True))
        if "compiled" not in skip:
            warm = (*common[:-1], max(args.warmup, 2))
            record(f"saetool fused bf16 compiled, groups of {g}", "bf16",
                   *run_saetool("fused", *warm, group=g, compile_=True, autocast=True))
        if "autograd" not in skip:
            record("saetool autograd groups of 4, bf16 autocast", "bf16",
                   *run_saetool("autograd", *common, autocast=True, grouped=True))
        if "saelens" not in skip:
            record("SAELens, bf16 autocast", "bf16", *run_saelens(*common, autocast=True))

    saelens = {r["precision"]: r for r in rows if r["variant"].startswith("SAELens")}
    lines = [("| variant | precision | SAE-tokens/s | GFLOP/s | % of mm peak | vs SAELens | held-out FVU | "
             "max rel. FVU diff. vs SAELens |"), "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        ref = saelens.get(r["precision"])
        ratio = r["sae_tokens_per_s"] / ref["sae_tokens_per_s"] if ref else float("nan")
        diff = max(abs(a / b - 1) for a, b in zip(r["fvu"], ref["fvu"])) if ref else float("nan")
        r["fvu_rel_diff_vs_saelens"] = diff
        lines.append(f"| {r['variant']} | {r['precision']} | {r['sae_tokens_per_s']:.0f} | {r['gflops']:.0f} | "
                     f"{100 * r['fraction_of_peak']:.0f}% | {ratio:.2f}x | {r['fvu_min']:.4f}..{r['fvu_max']:.4f} | "
                     f"{100 * diff:.2f}% |")
    header = (f"d_in {d_in}, d_sae {d_sae}, {args.n_members} members (L1 1e-3..1e-1), batch {args.batch_size}, "
              f"{args.steps} timed steps after {args.warmup} warm-up; torch.mm peak fp32 {peak32 / 1e9:.0f}, "
              f"bf16 {peak16 / 1e9:.0f} GFLOP/s; {torch.get_num_threads()} threads")
    table = header + "\n\n" + "\n".join(lines)
    compiled = [r for r in rows if "compiled" in r["variant"]]
    if compiled:
        c = compiled[0]
        eager = next(r for r in rows if r["variant"] == c["variant"].replace(" compiled", ""))
        overhead = c["warmup_seconds"] - 2 * c["seconds_per_step"]
        saving = eager["seconds_per_step"] - c["seconds_per_step"]
        c["compile_seconds"] = overhead
        table += (f"\n\ntorch.compile: ~{overhead:.0f} s to compile (its two warm-up steps minus two compiled steps), "
                  f"{saving:.2f} s saved per step: pays after ~{overhead / saving:.0f} steps" if saving > 0 else
                  f"\n\ntorch.compile: ~{overhead:.0f} s to compile, no saving per step")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(table + "\n")
    (out / "sweep.json").write_text(json.dumps({"config": vars(args), "peak_fp32": peak32, "peak_bf16": peak16,
                                                "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
