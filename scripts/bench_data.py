"""Benchmarks of the prepared-data path (docs/benchmarks.md, "Prepared data"); not a test.

    .venv/bin/python scripts/bench_data.py --work /tmp/samlm-bench-data [--big-mb 1000]

1. Prepare throughput: MB of text per second with ``bytes`` and ``bpe:8192``, at 1 and 2 workers,
   on a JSONL corpus of documents (Tiny Shakespeare's paragraphs and the python-stdlib modules,
   repeated in a seeded shuffle to ``--prepare-mb``).
2. Memory: peak RSS of a 1-step ``samlm pretrain`` over a prepared ``--big-mb`` corpus and over a
   10 MB one (each in its own process; ``ru_maxrss``).
3. Start-up: wall time of those runs and of the same run over Tiny Shakespeare (each prepared
   beforehand), ``--repeats`` round-robin repeats, median; and, in one process, the part of a
   run's start that depends on the data (``load_data``: open and check the prepared files or the
   cache entry, load the tokenizer, the first training batch and the two validation slices),
   min over the repeats of wall and of CPU time (robust to a loaded machine).
Prints one JSON object; ``--json FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

RUN = [
    "--layers",
    "2",
    "--width",
    "64",
    "--heads",
    "4",
    "--context",
    "128",
    "--batch",
    "16",
    "--steps",
    "1",
    "--no-sharpness",
    "--no-progress",
    "--eval-every",
    "0",
    "--val-batches",
    "4",
    "--threads",
    "1",
]


def documents() -> list[str]:
    from samlm.data.sources import load_corpus, open_source

    shakespeare = [p for p in load_corpus("tinyshakespeare").split("\n\n") if p.strip()]
    return shakespeare + list(open_source("python-stdlib").documents())


def write_corpus(path: Path, megabytes: int, *, jsonl: bool) -> Path:
    if path.exists():
        return path
    docs, rng = documents(), random.Random(0)
    target, written = megabytes * 1_000_000, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(docs)
            for doc in docs:
                line = json.dumps({"text": doc}) + "\n" if jsonl else doc + "\n\n"
                f.write(line)
                written += len(line.encode())
                if written >= target:
                    break
    os.replace(tmp, path)
    return path


def samlm(*argv, env=None) -> tuple[float, int]:
    """(wall seconds, peak RSS in MB) of ``python -m samlm ARGV`` in a fresh process."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "samlm", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    if out[2] != "0":
        raise SystemExit(f"samlm {' '.join(map(str, argv))} failed")
    return float(out[0]), int(out[1]) // 1024


def data_startup(prepared: dict, repeats: int, env: dict) -> dict:
    """Seconds of the data part of a run's start-up per corpus, in a child process (min of wall, CPU)."""
    code = r"""
import json, os, sys, time
from samlm.harness.pretrain import PretrainConfig
from samlm.harness.pretrain.build import load_data
corpora, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
best = {name: [1e9, 1e9] for name in corpora}
for _ in range(repeats):
    for name, data in corpora.items():
        config = PretrainConfig(data=str(data), layers=2, width=64, heads=4, context=128, batch=16, val_batches=4,
                                progress=False)
        wall, cpu = time.perf_counter(), time.process_time()
        run_data = load_data(config)
        next(run_data.dataset.train_batches(16, seed=0))
        run_data.dataset.val_batches(16, max_batches=8)
        best[name] = [min(best[name][0], time.perf_counter() - wall), min(best[name][1], time.process_time() - cpu)]
print(json.dumps({name: {"wall_s": round(w, 4), "cpu_s": round(c, 4)} for name, (w, c) in best.items()}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps({k: str(v) for k, v in prepared.items()}), str(repeats)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/samlm-bench-data")
    parser.add_argument("--big-mb", type=int, default=1000)
    parser.add_argument("--prepare-mb", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SAMLM_CACHE=str(work / "cache"), TOKENIZERS_PARALLELISM="false")
    result: dict = {"machine": f"{os.cpu_count()} CPU cores", "prepare": {}, "runs": {}}

    corpus = write_corpus(work / f"docs-{args.prepare_mb}mb.jsonl", args.prepare_mb, jsonl=True)
    megabytes = corpus.stat().st_size / 1e6
    for tokenizer in ("bytes", "bpe:8192"):
        for workers in (1, 2):
            out = work / f"prep-{tokenizer.replace(':', '')}-w{workers}"
            seconds, _ = samlm(
                "prepare",
                "--data",
                corpus,
                "--tokenizer",
                tokenizer,
                "--workers",
                workers,
                "--out",
                out,
                "--overwrite",
                "--no-progress",
                env=env,
            )
            meta = json.loads((out / "meta.json").read_text())
            tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
            result["prepare"][f"{tokenizer} x{workers}"] = {
                "mb": round(megabytes, 1),
                "seconds": round(seconds, 2),
                "prepare_seconds": meta["seconds"],
                "mb_per_s": round(megabytes / meta["seconds"], 2),
                "tokens_per_s": round(tokens / meta["seconds"]),
                "chars_per_token": round(meta["source"]["characters"] / tokens, 3),
            }
            print(tokenizer, workers, result["prepare"][f"{tokenizer} x{workers}"], flush=True)

    prepared = {}
    for name, mb in (("10mb", 10), (f"{args.big_mb}mb", args.big_mb)):
        text = write_corpus(work / f"text-{mb}mb.txt", mb, jsonl=False)
        out = work / f"prep-text-{mb}mb"
        if not (out / "meta.json").exists():
            seconds, _ = samlm("prepare", "--data", text, "--out", out, "--no-progress", env=env)
            result["prepare"][f"bytes text {mb} MB"] = {
                "seconds": round(seconds, 1),
                "mb_per_s": round(mb / seconds, 1),
            }
        prepared[name] = out
    prepared["tinyshakespeare"] = "tinyshakespeare"
    samlm("pretrain", "--data", "tinyshakespeare", *RUN, "--out", work / "warm", "--overwrite", env=env)  # cache it
    walls = {name: [] for name in prepared}
    rss = {name: [] for name in prepared}
    for _ in range(args.repeats):  # round robin: a load change on the machine hits every corpus alike
        for name, data in prepared.items():
            wall, peak = samlm("pretrain", "--data", data, *RUN, "--out", work / f"run-{name}", "--overwrite", env=env)
            walls[name].append(wall)
            rss[name].append(peak)
    for name in prepared:
        result["runs"][name] = {
            "wall_s_median": round(statistics.median(walls[name]), 2),
            "walls": [round(w, 2) for w in walls[name]],
            "peak_rss_mb": max(rss[name]),
        }
        print(name, result["runs"][name], flush=True)
    result["data_startup"] = data_startup(prepared, args.repeats, env)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
