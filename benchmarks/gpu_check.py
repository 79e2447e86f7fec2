"""The one-call GPU check (`make gpu-check OUT=DIR`; CPU mode `--cpu` runs in `make test` so it cannot rot).

On a machine with one CUDA GPU, no network and nothing but the repository (its missing packages as wheels in
`.whl/`, docs/distributed.md "The GPU check"), in under 8 minutes:

1. the CUDA tests (`pytest -m cuda`);
2. the sweep step: SAE-tokens/s and MFU against the `torch.mm` peak measured in the same run, for 16 members of 16,384
   latents at d_in 2304, batch 4096: the fused kernel in fp32, TF32, bf16 eager and compiled, and BatchTopK compiled
   (autograd) in bf16, each with its peak memory beside saetool.train.memory's estimate (the measured peak also holds
   the check's `steps` random batches, staged on the device) and its number of compiles;
3. fed vs on-device steps/s: the same batches from the store through the loader and DeviceFeed, or already on the
   device (the two routes train to identical weights: checked);
4. generation: tokens/s of `saetool generate` on random-weight models of Gemma-2-2B and Llama-3-8B width (a few
   layers) against a bare forward of the same batches, and with `--compression none`.

Writes OUT/gpu_check.json and OUT/gpu_check.md (the table for docs/benchmarks.md, with the GPU's name).

    python benchmarks/gpu_check.py --out runs/gpu-check           # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --out /tmp/gpu-check --cpu     # tiny shapes on the CPU (tests/benchmarks)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from saetool.config import GenerateConfig
from saetool.ensemble import SAEEnsemble, train_step
from saetool.generate import run_generate
from saetool.lm import WORDS, load_model, random_model_dir
from saetool.store import ActivationStore, BatchLoader, DeviceFeed
from saetool.train.memory import MemoryShape, estimate_memory
from saetool.train.step import autograd_step_fn, fused_step_fn, make_optimizer, train_batch_fused

ROOT = Path(__file__).resolve().parents[1]
GPU = {"members": 16, "d_in": 2304, "d_sae": 16384, "batch": 4096, "steps": 20, "warmup": 3,
       "models": [("gemma-2-2b-width", 2), ("llama-3-8b-width", 2)], "n_chunks": 8, "chunk_size": 16384,
       "gen_batch": 64, "context_size": 128}
CPU = {"members": 4, "d_in": 32, "d_sae": 128, "batch": 256, "steps": 6, "warmup": 2, "models": [("tiny", 2)],
       "n_chunks": 4, "chunk_size": 512, "gen_batch": 8, "context_size": 64}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mm_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of the best of 5 `n x n @ n x n` products on `device` in `dtype`."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def step_flops(s: dict) -> int:
    """Multiply-adds x 2 of one training step of every member: five matmuls of batch x d_in x d_sae each (encode,
    decode, and the three of the backward), 10 x batch x d_in x d_sae FLOPs per member."""
    return 10 * s["batch"] * s["d_in"] * s["d_sae"] * s["members"]


def run_steps(s: dict, device: torch.device, architecture: str, precision: str, compiled: bool,
              batches: list[torch.Tensor]) -> dict:
    """Train one ensemble for len(batches) steps; seconds per step after s["warmup"], peak memory, compiles."""
    torch._dynamo.reset()
    hyper = {"l1_coefficient": [1e-3] * s["members"]} if architecture == "standard" else {"k": [32] * s["members"]}
    ens = SAEEnsemble(architecture, s["d_in"], s["d_sae"], hyper, seeds=list(range(s["members"]))).to(device)
    opt = make_optimizer(ens.parameters(), lr=1e-4)
    fused = architecture == "standard"
    shape = MemoryShape(s["d_in"], s["d_sae"], s["members"], s["batch"], architecture=architecture,
                        kernel="fused" if fused else "autograd", precision=precision, member_group=s["members"],
                        device_type=device.type, k=0 if fused else 32, store_itemsize=4)
    fn = fused_step_fn(compiled, precision) if fused else autograd_step_fn(compiled, precision, device.type)
    def step(x):
        if fused:
            train_batch_fused(ens, opt, x, len(x), s["members"], fn)
        else:
            train_step(ens, opt, x, step_fn=fn)

    counters.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for x in batches[: s["warmup"]]:
        step(x)
    sync(device)
    t = time.perf_counter()
    for x in batches[s["warmup"]:]:
        step(x)
    sync(device)
    seconds = (time.perf_counter() - t) / (len(batches) - s["warmup"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds_per_step": seconds, "sae_tokens_per_s": s["batch"] * s["members"] / seconds,
            "flops_per_s": step_flops(s) / seconds, "peak_bytes": peak,
            "estimate_bytes": estimate_memory(shape, s["members"]).training,  # saetool.train.memory, before the run
            "compiles": int(counters["stats"]["unique_graphs"]) if compiled else 0}


def step_table(s: dict, device: torch.device) -> dict:
    """The sweep step's variants on random batches (section 2)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randn(s["batch"], s["d_in"], generator=g).to(device) for _ in range(s["steps"])]
    cuda = device.type == "cuda"
    peaks = {"fp32": mm_peak(device, torch.float32, 2048 if cuda else 256)}
    peaks["bf16"] = mm_peak(device, torch.bfloat16, 8192 if cuda else 256)
    variants = [("fused fp32", "standard", "fp32", False, False), ("fused bf16", "standard", "bf16", False, False),
                ("fused bf16 compiled", "standard", "bf16", True, False),
                ("batchtopk bf16 compiled", "batchtopk", "bf16", True, False)]
    if cuda:
        variants.insert(1, ("fused tf32", "standard", "fp32", False, True))
    rows = {}
    for name, arch, precision, compiled, tf32 in variants:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        r = run_steps(s, device, arch, precision, compiled, batches)
        r["mfu_vs_bf16_peak"] = r["flops_per_s"] / peaks["bf16"]
        rows[name] = r
    torch.backends.cuda.matmul.allow_tf32 = False
    return {"peaks_flops_per_s": peaks, "variants": rows}


def fed_vs_device(s: dict, device: torch.device, store_path: Path) -> dict:
    """Section 3: the same store batches fed through BatchLoader + DeviceFeed, or staged on the device first."""
    store = ActivationStore.open(store_path)
    hook = store.spec.hook_names[0]
    loader = BatchLoader(store, hook, s["batch"], seed=0)
    d_in = store.width(hook)
    results, weights = {}, {}
    for route in ("on-device", "fed", "on-device", "fed"):  # each route twice: the first pass warms up, untimed
        ens = SAEEnsemble("standard", d_in, 4 * d_in, {"l1_coefficient": [1e-3] * 4}, seeds=[0, 1, 2, 3]).to(device)
        opt = torch.optim.Adam(ens.parameters(), lr=1e-4)
        fn = fused_step_fn(False, "fp32")
        staged = [x.to(device).float() for x in loader.epoch(0)] if route == "on-device" else None
        sync(device)
        t, n = time.perf_counter(), 0
        batches = staged if staged is not None else (x.float() for x in DeviceFeed(loader.epoch(0), device))
        for x in batches:
            train_batch_fused(ens, opt, x, len(x), 4, fn)
            n += 1
        sync(device)
        results[route] = n / (time.perf_counter() - t)
        weights[route] = ens.W_enc.detach().cpu()
    return {"steps_per_s": results, "batches": n, "same_weights": bool(torch.equal(weights["fed"], weights["on-device"]))}


def generation(s: dict, device: torch.device, work: Path) -> tuple[dict, Path]:
    """Section 4: saetool generate vs a bare forward, on random-weight models; returns the figures and the last
    model's store (for section 3)."""
    text = work / "text"
    text.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        (text / f"doc{i}.txt").write_text(" ".join(WORDS[j] for j in torch.randint(len(WORDS), (60000,), generator=g)))
    out, store = {}, None
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    for preset, layers in s["models"]:
        model_dir = random_model_dir(work / preset, preset, layers=layers)
        row = {}
        for compression in ("blosc-zstd", "none"):
            store = work / f"{preset}-{compression}.zarr"
            cfg = GenerateConfig(model=str(model_dir), dataset=str(text), layers=[layers - 1], device=str(device),
                                 n_chunks=s["n_chunks"], chunk_size=s["chunk_size"], context_size=s["context_size"],
                                 batch_size=s["gen_batch"], model_dtype=dtype, compression=compression,
                                 dataset_folder=str(store))
            t = time.perf_counter()
            run_generate(cfg, log=lambda *a: None)
            row[f"generate {compression} tokens/s"] = s["n_chunks"] * s["chunk_size"] / (time.perf_counter() - t)
        row["bare forward tokens/s"] = bare_forward(model_dir, device, dtype, s, layers)
        row["n_tokens"] = s["n_chunks"] * s["chunk_size"]
        out[preset] = row
    return out, work / f"{s['models'][-1][0]}-blosc-zstd.zarr"


def bare_forward(model_dir: Path, device: torch.device, dtype: str, s: dict, layers: int) -> float:
    """Tokens/s of the model's forward alone on random token batches of the generation's shape."""
    model = load_model(str(model_dir), device=str(device), dtype=dtype)
    tokens = torch.randint(3, 60, (s["gen_batch"], s["context_size"]), device=device)
    n = s["n_chunks"] * s["chunk_size"] // (s["gen_batch"] * s["context_size"])
    with torch.no_grad():
        model(tokens, stop_at_layer=layers)
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            model(tokens, stop_at_layer=layers)
        sync(device)
    return n * s["gen_batch"] * s["context_size"] / (time.perf_counter() - t)


def cuda_tests() -> dict:
    """Section 1: `pytest -m cuda` (they skip cleanly without CUDA)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                       check=False, cwd=ROOT, capture_output=True, text=True)
    return {"returncode": r.returncode, "summary": (r.stdout.strip().splitlines() or [""])[-1]}


def markdown(result: dict) -> str:
    command = f"`python benchmarks/gpu_check.py --out DIR{' --cpu' if result['cpu_mode'] else ''}`"
    lines = [f"GPU check on {result['device_name']} ({result['date']}, torch {result['torch']}): {command}", "",
             f"CUDA tests: {result['cuda_tests']['summary']}", "",
             "| step variant | ms/step | SAE-tokens/s | TFLOP/s | MFU (bf16 mm peak) | peak GB | estimate GB | compiles |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["step"]["variants"].items():
        peak = f"{r['peak_bytes'] / 1e9:.1f}" if r["peak_bytes"] else "-"
        lines.append(f"| {name} | {1e3 * r['seconds_per_step']:.2f} | {r['sae_tokens_per_s']:.3g} | "
                     f"{r['flops_per_s'] / 1e12:.3g} | {r['mfu_vs_bf16_peak']:.3f} | {peak} | "
                     f"{r['estimate_bytes'] / 1e9:.1f} | {r['compiles']} |")
    f = result["feed"]
    fed, dev = f["steps_per_s"]["fed"], f["steps_per_s"]["on-device"]
    lines += ["", (f"Fed vs on-device: {fed:.3g} vs {dev:.3g} steps/s (ratio {fed / dev:.2f}; same weights: "
                   f"{f['same_weights']})"),
              "", "| model | generate tokens/s | generate (no compression) | bare forward | ratio |", "|---|---:|---:|---:|---:|"]
    for preset, r in result["generation"].items():
        lines.append(f"| {preset} | {r['generate blosc-zstd tokens/s']:.3g} | {r['generate none tokens/s']:.3g} | "
                     f"{r['bare forward tokens/s']:.3g} | {r['generate blosc-zstd tokens/s'] / r['bare forward tokens/s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (the mode make test runs)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; pass --cpu for the CPU mode")
    s, device = (CPU, torch.device("cpu")) if args.cpu else (GPU, torch.device("cuda"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
              "cpu_mode": args.cpu, "shapes": {k: v for k, v in s.items() if k != "models"},
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU",
              "step_flops": step_flops(s)}
    result["cuda_tests"] = cuda_tests() if not args.cpu else {"returncode": 0, "summary": "not run in --cpu mode"}
    result["step"] = step_table(s, device)
    with tempfile.TemporaryDirectory() as tmp:
        result["generation"], store = generation(s, device, Path(tmp))
        result["feed"] = fed_vs_device(s, device, store)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
