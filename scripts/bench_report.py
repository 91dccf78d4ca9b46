#!/usr/bin/env python3
"""Benchmark: `openflare report` on N recorded flows (default 1,000,000: the retrain benchmark's store).

    scripts/bench_report.py [--flows 1000000] [--distinct 50000] [--keep DIR] [--since 30d]

1. Prepare (not timed): the store scripts/bench_retrain.py builds (`prepare`: N full records of a simulated
   app written through the recorder's own Writer into a fresh embedded store, hash-chained, 10 % attacks);
   with --keep DIR it is made once in DIR and reused.
2. Run `python -m addons.cli report` on it as a child process (its default 2 workers) and print its wall
   time, its peak RSS (the largest process, getrusage; and all its processes together, sampled every 0.2 s)
   and the size of the HTML file; the report must count every record.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def tree_rss(pid: int) -> int:
    """Resident KB of a process and its descendants (Linux /proc; 0 for what cannot be read)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--distinct", type=int, default=50_000, help="different requests the flows are drawn from (default 50000)")
    ap.add_argument("--keep", type=Path, help="prepare the store in this directory and keep it (reused if it exists)")
    ap.add_argument("--since", default="30d", help="the report's --since (default 30d: every record of the store)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.flows < 1 or args.distinct < 1:
        ap.error("--flows and --distinct must be >= 1")
    work = args.keep or Path(tempfile.mkdtemp(prefix="openflare-bench-report-"))
    store_dir = work / "store"
    try:
        if not (args.keep and store_dir.exists()):
            import bench_retrain

            print(f"preparing {args.flows} recorded flows in {store_dir}", file=sys.stderr)
            work.mkdir(parents=True, exist_ok=True)
            bench_retrain.prepare(store_dir, args.flows, args.distinct, 0, args.seed)
        out = work / "report.html"
        cmd = [sys.executable, "-m", "addons.cli", "report", "--record-dir", str(store_dir), "--since", args.since,
               "--out", str(out)]
        print("running " + " ".join(cmd), file=sys.stderr)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT)
        peak_total = 0
        while proc.poll() is None:  # the report process and its workers together, every 0.2 s
            peak_total = max(peak_total, tree_rss(proc.pid))
            time.sleep(0.2)
        rc = proc.returncode
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        size = out.stat().st_size if out.exists() else 0
        html = out.read_text(errors="replace") if out.exists() else ""
        m = re.search(r'data-records="(\d+)"', html)
        counted = int(m.group(1)) if m else None
        print(f"report on {args.flows} recorded flows: exit {rc}, wall {wall:.1f} s, peak RSS {peak:.0f} MB (largest process), "
              f"{peak_total / 1024:.0f} MB (all its processes together, sampled), "
              f"HTML {size / 1024:.0f} KB, records counted {counted}")
        if counted is not None and counted != args.flows and args.since == "30d":
            print(f"bench_report: the report counted {counted} records, the store holds {args.flows}", file=sys.stderr)
            return 1
        return rc
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
