"""`make soak`: does the proxy stay flat? A benchmark, not a test: the bundle `make run` loads
(addons/openflare.py, every addon, the shipped mitm.conf) under steady load for `--requests` requests
(default 500,000), printing per window of `--window` requests (default 50,000) mitmdump's RSS and its CPU time
per request, then the change from the window ending at `--from` requests (default 100,000) to the last one;
and the idle CPU of the running proxy (`--idle` seconds before and after the load).

    .venv/bin/python scripts/soak.py [--requests 500000] [--window 50000] [--concurrency 16] [--attackers 5000]

The request mix is the bench's (scripts/bench.py: the shared datasets' test splits, 30 % attacks), and so are
the clients behind a trusted load balancer (X-Forwarded-For): each benign request of the mix from its own
address; attacks from `--attackers` addresses in turn (each is struck, then banned for an hour and refused
by the ban check), or with `--attackers 0` every attack from a new address (per-IP state for every attack:
strike counts, the rate limiter's window, the store's strike keys for the strike window). The embedded
ban and record stores, in a temporary directory removed at the end; mitmdump and the load generator pinned
to different CPUs as in the bench. Run it on a quiet machine: CPU per request moves with what else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402 - scripts/bench.py: the mix, the clients, the HTTP client, process handling

from addons import dataset  # noqa: E402
from addons import model  # noqa: E402


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def idle_ms_per_s(pid: int, seconds: float) -> float:
    """CPU milliseconds per second the process uses over `seconds` (/proc/<pid>/schedstat: nanoseconds)."""
    def ns() -> int:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])

    t0, c0 = time.monotonic(), ns()
    time.sleep(seconds)
    return (ns() - c0) / 1e6 / (time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The OpenFlare bundle under steady load: RSS and CPU per request over time.")
    ap.add_argument("--requests", type=int, default=500_000, help="requests in all (default 500,000)")
    ap.add_argument("--window", type=int, default=50_000, help="requests per line of output (default 50,000)")
    ap.add_argument("--from", dest="start", type=int, default=100_000, help="the flatness is judged from the window "
                    "ending here to the last one (default 100,000)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--attackers", type=int, default=5000, help="attacker addresses in turn (0: every attack from a new one)")
    ap.add_argument("--data", help="comma-separated JSONL files (default: the shared datasets)")
    ap.add_argument("--builtin-mix", action="store_true", help="a smoke run on the bench's 10 built-in requests")
    ap.add_argument("--mix", type=int, default=2000, help="size of the request mix (default 2000)")
    ap.add_argument("--model", default=model.DEFAULT_MODEL)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measured before the load, once "
                    "started and settled, and again after it (default 60; 0: not measured)")
    args = ap.parse_args(argv)
    if args.window < 1 or args.requests < args.window:
        ap.error("--requests must be at least --window (>= 1)")
    try:
        model_path = model.resolve(args.model)
        model.read_card(model_path)
        mix, source = bench.load_mix(args.data, args.mix, 0.3, 1, args.builtin_mix)
    except (model.ModelError, dataset.DatasetError) as e:
        print(f"soak: {e}" + ("" if isinstance(e, model.ModelError) else " (--builtin-mix for a smoke run)"), file=sys.stderr)
        return 2
    n_attack = sum(r.label == "attack" for r in mix)
    print(f"mix: {len(mix)} requests ({n_attack} attacks) from {source}; attacks from "
          f"{args.attackers or 'a new'} address{'es in turn' if args.attackers else ' each'}")

    work = Path(tempfile.mkdtemp(prefix="openflare-soak-"))
    confdir = work / "confdir"
    confdir.mkdir()
    conf = [line for line in (bench.REPO / "mitm.conf").read_text().splitlines()
            if not line.startswith(("openflare_model:", "openflare_ban_socket:", "openflare_trusted_proxies:"))]  # fmt: skip
    conf += [f"openflare_model: {json.dumps(str(model_path))}", 'openflare_ban_socket: ""', 'openflare_trusted_proxies: ["127.0.0.1"]',
             f"openflare_record_dir: {json.dumps(str(work / 'records'))}", f"openflare_record_spill: {json.dumps(str(work / 'spill.jsonl'))}"]  # fmt: skip
    (confdir / "config.yaml").write_text("\n".join(conf) + "\n")
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        os.environ.pop(var, None)
    split = bench.split_cpus()
    if split:
        bench.PROXY_CPUS, others = split
        os.sched_setaffinity(0, others)
    procs = bench.Procs(work)
    rows = []
    try:
        print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[2]:.2f} (15 min) on {os.cpu_count()} CPUs")
        up = bench.free_port()
        procs.start("upstream", [sys.executable, str(bench.REPO / "scripts" / "upstream.py"), "--port", str(up)], up)
        case = bench.Case("openflare", [bench.BUNDLE], env=bench.NO_SERVERS)
        port = bench.start_case(procs, case, up, confdir)
        bench.wait_idle([case.pid])
        idle = [idle_ms_per_s(case.pid, args.idle)] if args.idle > 0 else []
        wires = bench.Wires(mix, f"127.0.0.1:{port}", attackers=args.attackers)
        done, t0 = 0, time.perf_counter()
        print(f"{'requests':>9} {'RSS MB':>8} {'cpu ms/req':>10} {'req/s':>7} {'errors':>6}  statuses", flush=True)
        while done < args.requests:
            c0, w0 = bench.cpu_seconds(case.pid), time.perf_counter()
            res = asyncio.run(bench.drive(port, wires, args.concurrency, 3600.0, args.window, first=done))
            c1, w1 = bench.cpu_seconds(case.pid), time.perf_counter()
            done += res.done + res.errors
            rss = rss_mb(case.pid)
            cpu = (c1 - c0) / max(1, res.done) * 1000 if c0 is not None and c1 is not None else float("nan")
            rows.append((done, rss, cpu))
            st = ", ".join(f"{c}x{s}" for s, c in sorted(res.statuses.items()))
            print(f"{done:>9} {rss or float('nan'):>8.1f} {cpu:>10.3f} {res.done / (w1 - w0):>7.0f} {res.errors:>6}  {st}", flush=True)
            if res.done == 0:
                print("soak: no request answered in a window: stopping", file=sys.stderr)
                return 1
        print(f"{done} requests in {time.perf_counter() - t0:.0f} s")
        if args.idle > 0:
            time.sleep(5)  # the last responses' work (records stored, strikes delivered)
            idle.append(idle_ms_per_s(case.pid, args.idle))
            print(f"idle CPU of mitmdump (the bundle, upstream up, no requests) over {args.idle:g} s: "
                  f"{idle[0]:.3f} ms/s before the load, {idle[1]:.3f} ms/s after; target <= 0.2 ms/s: "
                  f"{'met' if max(idle) <= 0.2 else 'NOT met'}")
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    base = [r for r in rows if r[0] >= args.start]
    if len(base) >= 2 and base[0][1] and base[-1][1]:
        (n0, rss0, _), (n1, rss1, _) = base[0], base[-1]
        cpus = [r[2] for r in base]
        first_cpu = statistics.median(cpus[:2])
        last_cpu = statistics.median(cpus[-2:])
        print(f"RSS {rss0:.1f} MB at {n0} requests -> {rss1:.1f} MB at {n1} ({rss1 / rss0 - 1:+.1%}, "
              f"{(rss1 - rss0) * 1024 * 1024 / (n1 - n0):+.1f} bytes per request); max {max(r[1] for r in base):.1f} MB")
        print(f"CPU per request: {first_cpu:.3f} ms (median of the first two windows from {n0}) -> {last_cpu:.3f} ms "
              f"(the last two) ({last_cpu / first_cpu - 1:+.1%}); range {min(cpus):.3f}-{max(cpus):.3f}")
        flat = abs(rss1 / rss0 - 1) <= 0.05 and abs(last_cpu / first_cpu - 1) <= 0.05
        print(f"target: RSS and CPU per request flat within ±5 % from {n0} to {n1} requests: {'met' if flat else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
