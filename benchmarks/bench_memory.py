"""The memory estimate per rank (saetool.train.memory) against measured peaks, and for the GPU shapes of the docs.

    .venv/bin/python benchmarks/bench_memory.py --measure       # estimate vs measured, CPU, scaled-down shapes
    .venv/bin/python benchmarks/bench_memory.py --table         # the estimates of docs/distributed.md#memory

--measure trains each shape in a fresh process on a synthetic fp16 store (setup_run + train_runs, one process, the
sweep's own plan for the estimate) and measures the process's peak resident memory over setup and training minus
its resident memory before (/proc/self/status VmHWM after resetting it through /proc/self/clear_refs, VmRSS), with
glibc's MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the process at once. On the CPU the device is the host:
the estimate is the training peak plus the loader's pools. --table prints the estimates for d_in 2304 and 4096, 16
members of 16k and 64k latents, batch 4096, fp32 and bf16, on one GPU and on 8 GPUs with --parallel data and
--parallel members, each with the member group --member_group 0 picks on an 80 GB GPU (79 GiB free) and with every
member in one group (the old CUDA default). Writes runs/bench/memory.json and runs/bench/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from saetool.config import SweepConfig, build
from saetool.store import ActivationStore, StoreSpec
from saetool.store.values import to_store_array
from saetool.train import plan_runs, setup_run, train_runs
from saetool.train.memory import GiB, MemoryShape, auto_member_group, estimate_memory
from saetool.util import Dist

# The scaled-down CPU shapes: sweep flags on a synthetic store of d_in columns (16 chunks of 2048 rows).
SHAPES = {
    "standard fused fp32, 8 x 4096, group 4": {"d_in": 128, "ratio": 32, "l1_value_n": 8, "member_group": 4},
    "standard fused fp32, 8 x 4096, group 8": {"d_in": 128, "ratio": 32, "l1_value_n": 8, "member_group": 8},
    "topk fused fp32, 8 x 4096, group 4": {"d_in": 128, "ratio": 32, "architecture": "topk",
                                           "k_values": [8, 16, 24, 32, 40, 48, 56, 64], "member_group": 4},
    "standard fused bf16, 8 x 4096, group 4": {"d_in": 128, "ratio": 32, "l1_value_n": 8, "member_group": 4,
                                               "precision": "bf16"},
    "batchtopk autograd fp32, 4 x 4096, group 2": {"d_in": 128, "ratio": 32, "architecture": "batchtopk",
                                                   "k_values": [8, 16, 32, 64], "member_group": 2},
    "standard fused fp32, tied, 16 x 2048, group 4": {"d_in": 256, "ratio": 8, "l1_value_n": 16, "member_group": 4,
                                                      "tied": True},
}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(flags: dict) -> dict:
    """In this process: a synthetic store, the plan's estimate, then setup + training with the peak RSS measured."""
    flags = dict(flags)
    d_in, chunks = flags.pop("d_in"), flags.pop("chunks", 16)
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    spec = StoreSpec(model="synthetic", dataset="synthetic", hook_names=["h"], widths={"h": d_in}, n_rows=chunks * 2048,
                     context_size=32, chunk_size=2048, dtype="float16")
    store = ActivationStore.create_or_resume(tmp / "acts.zarr", spec)
    g = torch.Generator().manual_seed(0)
    for c in range(spec.n_chunks):
        a, b = spec.chunk_rows(c)
        rows = to_store_array(torch.randn(b - a, d_in, generator=g), "float16", "h")
        store.write_chunk(c, {"h": rows}, np.arange(a, b).reshape(-1, 32), np.ones(b - a, dtype=bool))
    assert store.finalize({})
    cfg = build(SweepConfig, {"dataset_dir": str(tmp / "acts.zarr"), "output_dir": str(tmp / "out"), "device": "cpu",
                              "batch_size": 2048, "eval_tokens": 0, "report": False, "compile": False, **flags})
    plan = plan_runs([cfg], [None], Dist.current())
    torch.mm(torch.randn(256, 256), torch.randn(256, 256))  # the BLAS library and its threads, before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS")
    run = setup_run(cfg, Dist.current(), log=lambda *_: None)
    train_runs([run], log=lambda *_: None)
    peak = _status("VmHWM")
    e = plan.estimate
    return {"estimate": e.training + sum(e.host.values()), "measured": peak - base, "parts": e.parts(),
            "host": e.host, "group": e.group}


def measure(names: list[str], chunks: int = 16) -> list[dict]:
    """Each shape of SHAPES in its own process (see the module docstring), on a store of `chunks` x 2048 rows."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = []
    for name in names:
        flags = json.dumps({**SHAPES[name], "chunks": chunks})
        result = subprocess.run([sys.executable, __file__, "--worker", flags], env=env, capture_output=True,
                                text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["shape"] = name
        row["ratio"] = row["measured"] / row["estimate"]
        out.append(row)
    return out


def gpu_table(free: int = 79 * GiB) -> list[dict]:
    """The estimates of the docs' GPU shapes (see the module docstring)."""
    rows = []
    for d_in in (2304, 4096):
        for d_sae in (16384, 65536):
            for precision in ("fp32", "bf16"):
                for mode, world in (("1 GPU", 1), ("data", 8), ("members", 8)):
                    shape = MemoryShape(d_in=d_in, d_sae=d_sae, n_members=16 // world if mode == "members" else 16,
                                        rows=4096 // world if mode == "data" else 4096, precision=precision,
                                        member_group=16, device_type="cuda", global_rows=4096, all_members=16)
                    group, _ = auto_member_group([shape], free)
                    auto, whole = estimate_memory(shape, group), estimate_memory(shape, shape.n_members)
                    rows.append({"d_in": d_in, "d_sae": d_sae, "precision": precision, "mode": mode,
                                 "members_per_rank": shape.n_members, "rows_per_rank": shape.rows,
                                 "fixed": auto.fixed, "group": group, "intermediates": auto.transient["step intermediates"],
                                 "training": auto.training, "evaluation": auto.evaluation,
                                 "one_group": whole.training, "fits": auto.total <= free})
    return rows


def _markdown_table(rows: list[dict]) -> str:
    head = ("| d_in | d_sae | precision | processes | members / rows per rank | parameters + Adam + gradients + "
            "batch | auto group | step intermediates | training per rank | rank 0's evaluation | training with "
            "all members in one group |\n|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    body = []
    for r in rows:
        where = r["mode"] if r["mode"] == "1 GPU" else "8 GPUs, " + r["mode"]
        fits = "" if r["fits"] else " (does not fit)"
        body.append(f"| {r['d_in']} | {r['d_sae'] // 1024}k | {r['precision']} | {where} | {r['members_per_rank']} / "
                    f"{r['rows_per_rank']} | {r['fixed'] / GiB:.1f} GiB | {r['group']} | {r['intermediates'] / GiB:.1f} "
                    f"GiB | {r['training'] / GiB:.1f} GiB{fits} | {r['evaluation'] / GiB:.1f} GiB | "
                    f"{r['one_group'] / GiB:.1f} GiB |")
    return "\n".join([head, *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result, md = {}, []
    if args.table:
        result["gpu"] = gpu_table()
        md.append(_markdown_table(result["gpu"]))
    if args.measure:
        result["cpu"] = measure(list(SHAPES))
        md.append("| shape (members x d_sae, batch 2048) | estimate | measured peak | measured / estimate |\n"
                  "|---|---:|---:|---:|\n" + "\n".join(
                      f"| {r['shape']} | {r['estimate'] / 2**20:.0f} MiB | {r['measured'] / 2**20:.0f} MiB "
                      f"| {r['ratio']:.2f} |" for r in result["cpu"]))
    (out / "memory.json").write_text(json.dumps(result, indent=1))
    (out / "memory.md").write_text("\n\n".join(md) + "\n")
    print("\n\n".join(md))


if __name__ == "__main__":
    main()
