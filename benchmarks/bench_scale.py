"""Generation cost vs corpus size (a script, not a timed test): streaming makes it grow with the budget only.

    .venv/bin/python benchmarks/bench_scale.py                  # ~10 min on a 2-core CPU
    .venv/bin/python benchmarks/bench_scale.py --long_rows 10000000   # + the long tiny-model run (RSS over time)
    .venv/bin/python benchmarks/bench_scale.py --sizes "" --first_commit 1000000,10000000,100000000   # ~3 min

1. Builds local jsonl corpora of 1x, 4x, 16x and 64x the embedded plays (replica r: every play's lines in a
   seeded order with ~10% of the words perturbed, cut into documents of 200 lines, so the tokenizer does real work
   on every replica); written under --tmp and deleted at the end, never committed.
2. For each size, `saetool generate` (SmolLM2-135M, residual layer 3, 4 chunks of 4,096 rows) with 1 process and
   with 2 (`accelerate launch`): time to the first committed chunk, total time and peak RSS (the sum over the
   process tree, sampled every 50 ms).
3. Tokenising throughput: `ContextStream` (read + tokenise + pack + shuffle buffer, no model) vs the tokenizer's own
   batched call on the same documents, in the same run.
4. --long_rows N: one run of N rows on a tiny random Llama (word tokenizer), RSS sampled over the run.
5. --first_commit B1,B2,...: for each budget (rows) of the tiny random Llama on enough copies of the 4x corpus to
   fill it (links to one file; chunks of 65,536 rows, contexts of 128), with 1 process and 2, the time from the start of `saetool generate` to its first
   committed activation chunk; the run is killed there. Rank 0 tokenises while the model records, so this stays
   flat in the budget (it was the time to tokenise the whole budget before).
Prints a Markdown table and writes <out>/bench_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_corpus(path: Path, copies: int) -> int:
    """Write `copies` perturbed replicas of the plays to a jsonl; returns its size in bytes."""
    from saetool.text.sources import shakespeare_files

    plays = [Path(f).read_text(errors="replace").splitlines() for f in shakespeare_files()]
    with open(path, "w") as f:
        for r in range(copies):
            rng = np.random.default_rng(r)
            for lines in plays:
                lines = [lines[i] for i in rng.permutation(len(lines))] if r else lines
                for a in range(0, len(lines), 200):
                    words = " \n".join(lines[a : a + 200]).split(" ")
                    if r:
                        hit = rng.random(len(words)) < 0.1
                        words = [w + "e" if h else w for w, h in zip(words, hit, strict=True)]
                    f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path.stat().st_size


def watch(cmd: list[str], store: Path, env: dict, stop_at_first: bool = False) -> dict:
    """Run `cmd`; time to the first committed chunk of `store`, total time, peak RSS of the process tree. With
    stop_at_first the process tree is killed at the first commit."""
    log = open(store.parent / f"{store.name}.log", "w+")  # noqa: SIM115 a file, not a pipe: a full pipe would block the child
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    root, peak, first, samples = psutil.Process(proc.pid), 0, None, []
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            rss = 0
        peak = max(peak, rss)
        samples.append((time.perf_counter() - start, rss))
        if first is None and (store / "commits" / "c").is_dir() and any((store / "commits" / "c").iterdir()):
            first = time.perf_counter() - start
            if stop_at_first:
                for q in [*root.children(recursive=True), root]:
                    q.kill()
                proc.wait()
                break
        time.sleep(0.05)
    log.seek(0)
    out = log.read()
    log.close()
    if proc.returncode and not stop_at_first:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"first_chunk_s": first, "total_s": time.perf_counter() - start, "peak_rss_gb": peak / 1e9,
            "samples": samples}


def generate_cmd(n_procs: int, flags: dict) -> list[str]:
    args = [f"--{k}={v}" for k, v in flags.items()]
    if n_procs == 1:
        return [str(ROOT / ".venv/bin/saetool"), "generate", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--num_processes", str(n_procs),
            str(ROOT / "launch/generate.py"), *args]


def tokenise_rates(corpus: Path, n_tokens: int) -> dict:
    """tokens/s of ContextStream vs the tokenizer's own batched call, on the same first documents."""
    from saetool.lm.models import load_model
    from saetool.text.packing import encode_texts, special_token_ids
    from saetool.text.sources import open_documents
    from saetool.text.stream import ContextStream

    tok = load_model("smollm2-135m", device="cpu").tokenizer
    special = special_token_ids(tok)
    stream = ContextStream(open_documents(str(corpus)), tok, 128, bos_token_id=special["bos"],
                           sep_token_id=special["sep"], n_contexts=n_tokens // 128, seed=0, per_chunk=128)
    start = time.perf_counter()
    n = sum(t.size for t, _ in stream)
    ours = n / (time.perf_counter() - start)
    docs = []
    for d in open_documents(str(corpus)):
        docs.append(d)
        if len(docs) >= stream.packer.n_documents:
            break
    start = time.perf_counter()
    m = sum(len(x) for x in encode_texts(tok, docs))
    bare = m / (time.perf_counter() - start)
    return {"stream_tokens_per_s": ours, "tokenizer_tokens_per_s": bare, "ratio": bare / ours}


def first_corpus(tmp: Path, rows: int) -> Path:
    """A folder of links to one 4x corpus, enough of them for `rows` tokens of the word tokenizer (one per word)."""
    one = tmp / "corpus_4x.jsonl"
    if not one.exists():
        build_corpus(one, 4)
    with open(one) as f:
        words = sum(len(json.loads(line)["text"].split()) for line in f)
    folder = tmp / "corpus_first"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for i in range(-(-rows * 11 // (10 * words))):  # 10% more than asked (separators, the dropped tail)
        (folder / f"part{i:03d}.jsonl").symlink_to(one)
    return folder


def first_commits(tmp: Path, budgets: list[int], procs: list[int], env: dict) -> list[dict]:
    """Time to the first committed chunk of the tiny model for each budget (rows) and process count (item 5)."""
    from tests.helpers import make_tiny_llama_dir

    model_dir = tmp / "tiny" if (tmp / "tiny" / "config.json").exists() else make_tiny_llama_dir(tmp / "tiny")
    corpus = first_corpus(tmp, max(budgets))
    runs, chunk = [], 65536
    for budget in budgets:
        for n_procs in procs:
            store = tmp / f"first_{budget}_{n_procs}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            flags = {"model": str(model_dir), "dataset": str(corpus), "locations": "residual", "layers": 1,
                     "n_chunks": -(-budget // chunk), "chunk_size": chunk, "context_size": 128, "batch_size": 64,
                     "device": "cpu", "dataset_folder": str(store)}
            r = watch(generate_cmd(n_procs, flags), store, env, stop_at_first=True)
            runs.append({"budget_rows": flags["n_chunks"] * chunk, "procs": n_procs,
                         "first_chunk_s": r["first_chunk_s"]})
            print(json.dumps(runs[-1]), flush=True)
            shutil.rmtree(store, ignore_errors=True)
            (tmp / f".{store.name}.lock").unlink(missing_ok=True)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,4,16,64")
    p.add_argument("--procs", default="1,2")
    p.add_argument("--long_rows", type=int, default=0, help="rows of the long tiny-model run (0: skip)")
    p.add_argument("--first_commit", default="", help="budgets (rows) for the time to the first committed chunk "
                   "of the tiny model, e.g. 1000000,10000000,100000000 (empty: skip)")
    p.add_argument("--tmp", default="/tmp/saetool-bench-scale")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    tmp, out = Path(args.tmp), Path(args.out)
    tmp.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    results: dict = {"runs": []}
    try:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            corpus = tmp / f"corpus_{size}x.jsonl"
            nbytes = build_corpus(corpus, size)
            for n_procs in [int(x) for x in args.procs.split(",")]:
                store = tmp / f"s{size}_{n_procs}.zarr"
                shutil.rmtree(store, ignore_errors=True)
                flags = {"model": "smollm2-135m", "dataset": str(corpus), "locations": "residual", "layers": 3,
                         "n_chunks": 4, "chunk_size": 4096, "context_size": 128, "device": "cpu",
                         "dataset_folder": str(store)}
                r = watch(generate_cmd(n_procs, flags), store, env)
                r.pop("samples")
                results["runs"].append({"size": size, "corpus_mb": nbytes / 1e6, "procs": n_procs, **r})
                print(json.dumps(results["runs"][-1]), flush=True)
                shutil.rmtree(store, ignore_errors=True)
            if size == 16:
                results["tokenise"] = tokenise_rates(corpus, 2_000_000)
                print(json.dumps(results["tokenise"]), flush=True)
        if args.long_rows:
            from tests.helpers import make_tiny_llama_dir

            model_dir = make_tiny_llama_dir(tmp / "tiny")
            corpus = tmp / "corpus_16x.jsonl"
            if not corpus.exists():
                build_corpus(corpus, 16)
            store = tmp / "long.zarr"
            shutil.rmtree(store, ignore_errors=True)
            chunk = 65536
            flags = {"model": str(model_dir), "dataset": str(corpus), "locations": "residual", "layers": 1,
                     "n_chunks": -(-args.long_rows // chunk), "chunk_size": chunk, "context_size": 128,
                     "batch_size": 64, "device": "cpu", "dataset_folder": str(store)}
            r = watch(generate_cmd(1, flags), store, env)
            samples = r.pop("samples")
            at = {f"rss_gb_at_{q}%": max(s for t, s in samples if t <= r["total_s"] * q / 100) / 1e9
                  for q in (10, 25, 50, 75, 100)}
            results["long"] = {"rows": flags["n_chunks"] * chunk, **r, **at}
            print(json.dumps(results["long"]), flush=True)
            shutil.rmtree(store, ignore_errors=True)
        if args.first_commit:
            results["first_commit"] = first_commits(tmp, [int(b) for b in args.first_commit.split(",")],
                                                    [int(x) for x in args.procs.split(",")], env)
    finally:
        shutil.rmtree(tmp / "corpus_first", ignore_errors=True)
        for f in tmp.glob("corpus_*.jsonl"):
            f.unlink()
    (out / "bench_scale.json").write_text(json.dumps(results, indent=2))
    print("\n| corpus | jsonl MB | processes | first chunk s | total s | peak RSS GB |\n|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['size']}x | {r['corpus_mb']:.0f} | {r['procs']} | {r['first_chunk_s']:.1f} | {r['total_s']:.1f} "
              f"| {r['peak_rss_gb']:.2f} |")
    if results.get("first_commit"):
        print("\n| budget, rows | processes | first chunk committed, s |\n|---:|---:|---:|")
        for r in results["first_commit"]:
            print(f"| {r['budget_rows']:,} | {r['procs']} | {r['first_chunk_s']:.1f} |")


if __name__ == "__main__":
    main()
