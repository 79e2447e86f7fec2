"""Benchmark of `saetool generate` on the embedded SmolLM2-135M and Shakespeare (a script, not a timed test).

    .venv/bin/python benchmarks/bench_generate.py            # ~32k tokens, a few minutes on a 2-core CPU

In one run it reports, on the same packed contexts (seed 0) and batches:
1. overhead: tokens/s of saetool generation (one hook; forward + cast + checks + compression + Zarr writes +
   commits) vs a bare `model.run_with_cache` loop over the same batches, hook and `stop_at_layer` (goal: <= 10%);
   and, load-independent, the share of each saetool run's generation time spent outside the model forward;
2. several hooks: tokens/s recording 3 hooks (residual at 3 layers) in one pass vs 3 single-hook runs;
3. bytes per token and the ratio to raw fp32 for every codec: none, zstd, blosc-zstd (default), and blosc-zstd
   with --keepbits (lossy), plus the largest relative error the rounding introduced.
Generation tokens/s is the store summary's figure (the generation loop only: model loading, tokenisation and
store creation excluded). Every measurement is repeated --repeats times; comparisons are made within each
repetition (back-to-back runs, the bare loop and saetool alternating which goes first) and the medians are
reported, as a shared machine's speed drifts between runs.
Prints a Markdown table and writes everything to <out>/bench_generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def bare_loop_tokens_per_s(model, contexts: torch.Tensor, batch_size: int, hook: str, stop_at_layer: int,
                           device: str) -> float:
    """tokens/s of `run_with_cache` over `contexts` [n, ctx] in batches, keeping only `hook` (nothing stored).
    Like a saetool run, it starts from a freshly loaded model with no warm-up batch."""
    with torch.inference_mode():
        start = time.perf_counter()
        for i in range(0, len(contexts), batch_size):
            _, cache = model.run_with_cache(contexts[i : i + batch_size].to(device), names_filter=[hook],
                                            stop_at_layer=stop_at_layer, return_cache_object=False)
            cache[hook].cpu()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return contexts.numel() / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768, help="tokens per generation run (a multiple of --chunk_size)")
    p.add_argument("--chunk_size", type=int, default=8192)
    p.add_argument("--context_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--layer", type=int, default=3, help="layer of the single residual hook")
    p.add_argument("--layers3", default="1,3,5", help="the 3 residual layers recorded in one pass")
    p.add_argument("--keepbits", type=int, default=7, help="mantissa bits kept in the lossy codec row")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of every timed run (medians reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    if args.tokens % args.chunk_size or args.chunk_size % args.context_size:
        p.error("--tokens must be a multiple of --chunk_size, itself a multiple of --context_size")

    import saetool.generate
    from saetool.config import GenerateConfig
    from saetool.generate import run_generate
    from saetool.lm.models import load_model
    from saetool.text.packing import special_token_ids
    from saetool.text.sources import open_documents
    from saetool.text.stream import ContextStream

    # Time spent inside the model forward (`record_activations` = run_with_cache + flattening) during each
    # saetool run: the rest of the generation loop is saetool's own cost, measured in the same run and so
    # insensitive to the machine's load changing between runs.
    forward = {"s": 0.0}
    record = saetool.generate.record_activations

    def timed_record(*a, **k):
        t = time.perf_counter()
        out = record(*a, **k)
        forward["s"] += time.perf_counter() - t
        return out

    saetool.generate.record_activations = timed_record

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_generate-", dir=out))
    n_chunks = args.tokens // args.chunk_size
    layers3 = [int(x) for x in args.layers3.split(",")]
    hook = f"blocks.{args.layer}.hook_resid_post"

    def generate(name: str, **kw) -> dict:
        cfg = GenerateConfig(model="smollm2-135m", dataset="shakespeare", locations=["residual"], layers=[args.layer],
                             n_chunks=n_chunks, chunk_size=args.chunk_size, context_size=args.context_size,
                             batch_size=args.batch_size, device=args.device, dataset_folder=str(work / f"{name}.zarr"))
        for k, v in kw.items():
            setattr(cfg, k, v)
        forward["s"] = 0.0
        store = run_generate(cfg, log=lambda *a: None)
        summary = store.meta["summary"]
        outside = summary["seconds_this_run"] / forward["s"] - 1
        print(f"  {name}: {summary['tokens_per_s']:.0f} tokens/s, {summary['bytes_per_token']} bytes/token, "
              f"{outside:+.1%} outside the forward", flush=True)
        return {"tokens_per_s": summary["tokens_per_s"], "bytes_per_token": summary["bytes_per_token"],
                "ratio_to_fp32": summary["ratio_to_fp32"], "hooks": list(summary["hooks"]), "path": store.path,
                "outside_forward": outside}

    load_start = os.getloadavg()[0]
    try:
        print(f"bench_generate: {args.tokens} tokens of SmolLM2-135M on {args.device}", flush=True)
        model = load_model("smollm2-135m", device=args.device)
        special = special_token_ids(model.tokenizer)
        n = args.tokens // args.context_size
        stream = ContextStream(open_documents("shakespeare"), model.tokenizer, args.context_size,
                               bos_token_id=special["bos"], sep_token_id=special["sep"], pad_token_id=special["pad"],
                               n_contexts=n, buffer_size=8192, seed=0, per_chunk=n)
        contexts = torch.from_numpy(next(iter(stream))[0]).long()  # exactly the contexts saetool stores

        # Every repetition runs each measurement once, back to back, and the comparisons are made within a
        # repetition (the bare loop and saetool swap order every time); the medians over repetitions are reported.
        bare, runs = [], {}
        plan = [("single", [args.layer]), ("3hooks", layers3)] + [(f"layer{x}", [x]) for x in layers3 if x != args.layer]

        def bare_run() -> None:
            fresh = load_model("smollm2-135m", device=args.device)
            bare.append(bare_loop_tokens_per_s(fresh, contexts, args.batch_size, hook, args.layer + 1, args.device))
            print(f"  bare run_with_cache: {bare[-1]:.0f} tokens/s", flush=True)

        for r in range(args.repeats):
            if r % 2 == 0:
                bare_run()
            for name, layers in plan:
                runs.setdefault(name, []).append(generate(f"{name}-{r}", layers=layers))
            if r % 2 == 1:
                bare_run()
        median = lambda xs: float(np.median(xs))
        single_tps = [x["tokens_per_s"] for x in runs["single"]]
        overhead = median([b / o - 1 for b, o in zip(bare, single_tps)])
        in_run = median([x["outside_forward"] for x in runs["single"]])
        sequential_r = [args.tokens / sum(args.tokens / runs["single" if x == args.layer else f"layer{x}"][r]
                                          ["tokens_per_s"] for x in layers3) for r in range(args.repeats)]
        speedup = median([m["tokens_per_s"] / q for m, q in zip(runs["3hooks"], sequential_r)])
        med = {name: median([x["tokens_per_s"] for x in rs]) for name, rs in runs.items()}
        med_bare, med_ours, sequential = median(bare), med["single"], median(sequential_r)
        default = runs["single"][0]
        multi = {"tokens_per_s": med["3hooks"], "bytes_per_token": runs["3hooks"][0]["bytes_per_token"]}
        singles = [{"tokens_per_s": med["single" if x == args.layer else f"layer{x}"]} for x in layers3]

        codecs = {"none": generate("none", compression="none"), "zstd": generate("zstd", compression="zstd"),
                  "blosc-zstd": default,
                  f"blosc-zstd, keepbits {args.keepbits}": generate("keepbits", keepbits=args.keepbits)}
        import zarr

        exact = zarr.open_group(str(default["path"]), mode="r")[hook][:].astype(np.float32)
        lossy = zarr.open_group(str(codecs[f"blosc-zstd, keepbits {args.keepbits}"]["path"]), mode="r")[hook][:]
        rel_err = float(np.abs(lossy.astype(np.float32) - exact).max() / np.abs(exact).max())
        rel_err_elem = float(np.max(np.abs(lossy.astype(np.float32) - exact) / np.maximum(np.abs(exact), 1e-3)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "command": "python benchmarks/bench_generate.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if v != p.get_default(k)),
        "machine": {"device": args.device, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                    "load_average_1min_start_end": [load_start, os.getloadavg()[0]]},
        "tokens": args.tokens, "batch_size": args.batch_size, "context_size": args.context_size, "hook": hook,
        "medians_over_repeats": True,
        "overhead": {"bare_run_with_cache_tokens_per_s": round(med_bare, 1), "saetool_tokens_per_s": med_ours,
                     "overhead_fraction": round(overhead, 4), "all_bare": [round(b, 1) for b in bare],
                     "in_run_time_outside_forward_median": round(in_run, 4),
                     "in_run_time_outside_forward": [round(x["outside_forward"], 4) for x in runs["single"]]},
        "all_runs_tokens_per_s": {name: [x["tokens_per_s"] for x in rs] for name, rs in runs.items()},
        "hooks": {"layers": layers3, "one_pass_tokens_per_s": multi["tokens_per_s"],
                  "single_runs_tokens_per_s": [s["tokens_per_s"] for s in singles],
                  "three_single_runs_effective_tokens_per_s": round(sequential, 1),
                  "speedup": round(speedup, 3),
                  "one_pass_bytes_per_token": multi["bytes_per_token"]},
        "codecs": {k: {"bytes_per_token": v["bytes_per_token"], "ratio_to_fp32": v["ratio_to_fp32"]}
                   for k, v in codecs.items()},
        "keepbits_max_abs_error_over_max_abs": rel_err, "keepbits_max_elementwise_rel_error": rel_err_elem,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (out / "bench_generate.json").write_text(json.dumps(result, indent=2) + "\n")

    d_in = model.cfg.d_model
    lines = [
        (f"SmolLM2-135M, {args.tokens} tokens, batch {args.batch_size} x {args.context_size}, {args.device} "
        f"({os.cpu_count()} CPUs, torch {torch.__version__}); medians of {args.repeats} repetitions, ratios taken "
        "within each repetition"),
        "",
        "| measurement | tokens/s | note |",
        "|---|---:|---|",
        f"| bare `run_with_cache` loop, {hook} | {med_bare:.0f} | same batches, `stop_at_layer` {args.layer + 1} |",
        (f"| saetool generate, same hook | {med_ours:.0f} | overhead {overhead:+.1%} (goal <= 10%); within its runs "
        f"{in_run:.1%} of the time is outside the forward |"),
        (f"| 3 hooks (layers {args.layers3}) in one pass | {multi['tokens_per_s']:.0f} | "
        f"{speedup:.2f}x the 3 single-hook runs |"),
        f"| 3 single-hook runs, one after another | {sequential:.0f} | "
        + ", ".join(f"{s['tokens_per_s']:.0f}" for s in singles) + " |",
        "",
        f"| codec (float16, d_in {d_in}) | bytes/token | ratio to fp32 |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v['bytes_per_token']:.1f} | {v['ratio_to_fp32']:.2f}x |" for k, v in codecs.items()]
    lines += ["", (f"keepbits {args.keepbits}: max |error| / max |x| = {rel_err:.2e}; "
              f"max elementwise relative error {rel_err_elem:.2e}"),
              f"JSON: {out / 'bench_generate.json'}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
