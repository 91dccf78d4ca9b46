#!/usr/bin/env python3
"""Benchmark: retrain on N synthetic recorded flows (default 1,000,000) in the embedded store.

    scripts/bench_retrain.py [--flows 1000000] [--distinct 50000] [--data a.jsonl.gz,...] [--keep DIR]

1. Prepare (not timed as retraining): N records of a simulated app (tests/appsim.py) written through the
   recorder's own Writer (built, masked, hash-chained, inserted in batches) into a fresh embedded store:
   full records (as with openflare_record_benign_one_in: 1, the heaviest case for retraining), drawn with
   a long-tailed (Zipf-like) distribution from --distinct different requests (recorded traffic repeats
   itself; retraining dedupes it), local scores as a model would give them (benign mostly 1-3, attacks
   9-10), 10 % attacks, plus --labels operator labels in the `labels` collection.
2. Run scripts/retrain.py on that store as a child process (--dry-run: the current model stays), and print
   its wall time and peak RSS (getrusage of the children: the largest process), with the seconds of each
   step (reading the store, the base corpora, building the candidate, scoring both models).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from addons import records  # noqa: E402
from addons import retraining  # noqa: E402


def prepare(store_dir: Path, flows: int, distinct: int, labels: int, seed: int) -> None:
    import appsim

    rng = random.Random(seed)
    app = appsim.App(seed)
    pool = [app.attack() if rng.random() < 0.1 else app.benign() for _ in range(distinct)]
    pool_caps = [
        {"method": r["method"].encode(), "target": r["target"].encode(),
         "headers": [(k.encode(), v.encode()) for k, v in r["headers"]], "body": r["body"].encode(),
         "body_size": len(r["body"]), "attack": r["label"] == "attack", "label": r["label"]}
        for r in pool
    ]
    store = records.open_store(directory=store_dir)
    writer = records.Writer(store, store_dir.parent / "bench-spill.jsonl", "bench", batch=2000)
    t0 = time.perf_counter()
    now = time.time()
    batch = []
    for i in range(flows):
        p = pool_caps[min(int(rng.paretovariate(1.1)) - 1, distinct - 1) if rng.random() < 0.7 else rng.randrange(distinct)]
        if p["attack"]:
            local = rng.choice((9, 10, 10, 7))
        else:
            local = rng.choice((1, 1, 2, 2, 3, 5, 7))
        verdict = "block" if local > 6 else "pass"
        batch.append({"time": now - (flows - i) * 0.5, "client_ip": f"10.{i % 7}.{i % 251}.{i % 13}", "verdict": verdict,
                      "score": local, "full": True, "method": p["method"], "target": p["target"], "headers": p["headers"],
                      "body": p["body"], "body_size": p["body_size"], "local_score": local, "model_version": "bench",
                      "refused_by": "score" if verdict == "block" else None, "status": 403 if verdict == "block" else 200,
                      "sampled": verdict == "pass"})
        if len(batch) >= 10_000:
            writer.write(batch)
            print(f"\r  prepared {i + 1}/{flows} records ({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr, flush=True)
    writer.write(batch)
    docs = []
    for i in range(labels):
        p = pool_caps[rng.randrange(distinct)]
        cap = {"time": now - rng.randrange(86400 * 7), "client_ip": "10.9.9.9", "verdict": "block", "score": 7, "full": True,
               "method": p["method"], "target": p["target"], "headers": p["headers"], "body": p["body"], "body_size": p["body_size"]}
        doc = records.build(cap, records.Masker())
        doc.update(_id=f"bench-label-{i}", label=p["label"], label_source="operator", label_time=records.utcnow())
        docs.append(doc)
    if docs:
        retraining.labels_store(store).coll.insert_many(docs)
    store.close()
    print(f"\n  prepared {flows} records + {labels} operator labels in {time.perf_counter() - t0:.0f} s "
          f"({writer.stats['stored']} stored)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--distinct", type=int, default=50_000, help="different requests the flows are drawn from (default 50000)")
    ap.add_argument("--labels", type=int, default=1000, help="operator labels (default 1000)")
    ap.add_argument("--data", help="base corpora for retrain.py (default: every file in ../shared/datasets)")
    ap.add_argument("--keep", type=Path, help="prepare the store in this directory and keep it (reused if it exists)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("retrain_args", nargs="*", help="more arguments for scripts/retrain.py (after --)")
    args = ap.parse_args(argv)
    if args.flows < 1 or args.distinct < 1 or not 0 <= args.labels <= args.flows:
        ap.error("--flows and --distinct must be >= 1, --labels between 0 and --flows")
    work = args.keep or Path(tempfile.mkdtemp(prefix="openflare-bench-retrain-"))
    store_dir = work / "store"
    try:
        if not (args.keep and store_dir.exists()):
            print(f"preparing {args.flows} recorded flows in {store_dir}", file=sys.stderr)
            prepare(store_dir, args.flows, args.distinct, args.labels, args.seed)
        cmd = [sys.executable, str(ROOT / "scripts" / "retrain.py"), "--dir", str(store_dir), "--dry-run",
               "--candidate", str(work / "candidate.npz"), "--json", str(work / "retrain.json")]
        if args.data:
            cmd += ["--data", args.data]
        cmd += args.retrain_args
        print("running " + " ".join(cmd), file=sys.stderr)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        try:
            steps = json.loads((work / "retrain.json").read_text())["seconds"]
        except (OSError, ValueError, KeyError):
            steps = {}
        print(f"retrain on {args.flows} recorded flows ({args.distinct} distinct requests): exit {rc}, "
              f"wall {wall:.1f} s, peak RSS {peak:.0f} MB (largest process); seconds by step: {steps}")
        return 0 if rc in (0, 3) else rc
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
