"""`make bench`, hostile bodies: what one request built to stall the proxy costs it (issue 15).

    .venv/bin/python scripts/bench_hostile.py [--model NAME]

Each request goes through what the addons run on it (fields.extract with the default inspection limits,
then the local model), in-process: a gzip bomb (64 KB that inflate to 64 MB: refused with 413 once the
inflated body passes 8 MiB), 64 KB and 1 MB of unclosed comment openers (`/*a`: the normaliser's comment
scan is linear), and 1 MB of nested brackets. Printed: milliseconds each and the peak RSS above the
process's baseline. Targets: under 50 ms each for the bomb and 64 KB of `/*a`, under 100 MB of memory.
"""

from __future__ import annotations

import argparse
import gzip
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from addons import model  # noqa: E402

CASES = (  # (name, headers, body, target ms or None)
    ("gzip bomb, 64 KB -> 64 MB", [("Content-Encoding", "gzip"), ("Content-Type", "text/plain")],
     gzip.compress(b"a" * (64 << 20), 9), 50),
    ("64 KB of /*a", [("Content-Type", "text/plain")], b"/*a" * ((64 << 10) // 3), 50),
    ("1 MB of /*a in a form", [("Content-Type", "application/x-www-form-urlencoded")], b"q=" + b"/*a" * ((1 << 20) // 3), None),
    ("1 MB of nested [ in JSON", [("Content-Type", "application/json")], b"[" * (1 << 20), None),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=model.DEFAULT_MODEL, help="a name in models/ or a path to a .npz")
    args = ap.parse_args(argv)
    lm = model.load(args.model)
    lm.score_request("GET", "/", [], b"")  # warm up: imports and caches are not what is measured
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    met = True
    for name, headers, body, target in CASES:
        t = time.perf_counter()
        score, _p, hit = lm.score_request("POST", "/upload", headers, body)
        ms = (time.perf_counter() - t) * 1000
        ok = target is None or ms < target
        met &= ok
        what = hit.signal or "scored"
        goal = f" (target < {target} ms: {'met' if ok else 'NOT met'})" if target else ""
        print(f"{name:<28} {len(body):>9} B  {ms:8.1f} ms  score {score:>2} ({what}){goal}")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(f"peak RSS above the baseline: {grown:.0f} MB (target < 100 MB: {'met' if grown < 100 else 'NOT met'})")
    return 0 if met and grown < 100 else 1


if __name__ == "__main__":
    sys.exit(main())
