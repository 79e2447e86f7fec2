"""Is training loader-bound? The sweep's steps/s fed by the real data path (store -> BatchLoader ->
saetool.train.feed -> device) against the same steps on batches already on the device, in one run.

    .venv/bin/python benchmarks/bench_loader_bound.py --store runs/demo/activations.zarr --out runs/bench

A ratio of 1.0 means the loader hides entirely behind the step; goal >= 0.95. The default shape is the demo's
sweep (8 standard members, ratio 4, batch 1024, fused fp32 step), the lightest step we ship and so the hardest
for the loader to keep up with. Both routes alternate `--repeats` times; the median of each is reported.
Writes DIR/loader_bound.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from saetool.config import SweepConfig
from saetool.train.feed import device_batches
from saetool.train.setup import setup_run
from saetool.train.step import choose_step
from saetool.util.distributed import Dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--hook_name", default=None)
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=4)
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SweepConfig(dataset_dir=args.store, output_dir=tmp, hook_name=args.hook_name, ratio=args.ratio,
                          l1_value_n=args.members, batch_size=args.batch_size, device=args.device,
                          precision=args.precision, compile=False, report=False)
        cfg.validate()
        run = setup_run(cfg, Dist(), log=lambda *a: None)
        step = choose_step(cfg.runtime, run.ensemble, run.optimizer, run.dist, False, run.total_steps,
                           run.grad_clip_norm)
        if args.steps > len(run.loader):
            raise SystemExit(f"--steps {args.steps} is more than the {len(run.loader)} batches of one epoch")

        def fed() -> float:
            batches = device_batches(run, 0)
            x, x_local = next(batches)  # the loader's first pool is read before the clock starts in both routes
            t = time.perf_counter()
            for _, (x, x_local) in zip(range(args.steps), batches):
                step(x_local, len(x), None)
            return args.steps / (time.perf_counter() - t)

        resident = [x_local for _, (x, x_local) in zip(range(args.steps + 1), device_batches(run, 0))][1:]

        def on_device() -> float:
            t = time.perf_counter()
            for x_local in resident:
                step(x_local, len(x_local), None)
            return args.steps / (time.perf_counter() - t)

        on_device()  # warm-up
        routes = {"fed": [], "on_device": []}
        for _ in range(args.repeats):
            routes["fed"].append(fed())
            routes["on_device"].append(on_device())
    fed_rate, resident_rate = statistics.median(routes["fed"]), statistics.median(routes["on_device"])
    result = {"store": args.store, "members": args.members, "ratio": args.ratio, "batch_size": args.batch_size,
              "steps": args.steps, "device": args.device, "step": step.describe(),
              "fed_steps_per_s": round(fed_rate, 3), "on_device_steps_per_s": round(resident_rate, 3),
              "fed_vs_on_device": round(fed_rate / resident_rate, 3), "runs": routes}
    print(f"{step.describe()}, {args.members} members, ratio {args.ratio}, batch {args.batch_size}: "
          f"fed {fed_rate:.2f} steps/s, on device {resident_rate:.2f} steps/s, ratio {fed_rate / resident_rate:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_bound.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
