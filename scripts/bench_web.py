"""Benchmark `make web` under load for a long session: mitmweb's memory (RSS) over time, with the flow cap.

    .venv/bin/python scripts/bench_web.py [--minutes 30] [--cap N] [--concurrency 8] [--sample 30]
    make bench-web MINUTES=30

Starts the demo app (scripts/upstream.py) and mitmweb as `make web UPSTREAM=...` does (the bundle
addons/openflare.py in reverse mode, the options of mitm.conf), with a temporary confdir and record store,
no browser, 127.0.0.1 allowlisted (one load generator must not get itself banned or rate-limited). One
websocket client stays connected to mitmweb's /updates, as an open dashboard does, reads every message and
counts the flows the dashboard would list (added minus removed). Keep-alive clients send the bench's request
mix (test splits of the shared datasets, 30 % attacks; else a built-in mix) for the whole run. Every
`--sample` seconds one line: minutes, mitmweb's RSS, requests/s, flows listed. At the end: RSS after the
warm-up (`--warmup` minutes, default a sixth of the run): median, min, max, the largest deviation from the
median, and the trend (least squares, MB per hour). A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import drive  # noqa: E402  (the main bench's load generator and request mix)
from bench import free_port  # noqa: E402
from bench import load_mix  # noqa: E402
from bench import wait_listening  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Dashboard:
    """A websocket client on mitmweb's /updates, as an open browser tab: reads everything, counts flows."""

    def __init__(self) -> None:
        self.flows = 0
        self.messages = 0
        self.task: asyncio.Task | None = None

    async def run(self, url: str) -> None:
        from tornado import websocket

        conn = await websocket.websocket_connect(url)
        while True:
            msg = await conn.read_message()
            if msg is None:
                return
            self.messages += 1
            kind = json.loads(msg).get("type")
            if kind == "flows/add":
                self.flows += 1
            elif kind == "flows/remove":
                self.flows -= 1
            elif kind == "flows/reset":
                self.flows = 0


def trend_mb_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, MB), in MB per hour."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


async def run(args, mitmweb: subprocess.Popen, port: int, web_url: str, wires: list[bytes]) -> list[dict]:
    dash = Dashboard()
    if not args.no_dashboard:
        ws = web_url.replace("http://", "ws://").replace("/?token=", "/updates?token=")
        dash.task = asyncio.create_task(dash.run(ws))
        await asyncio.sleep(1)
    samples = []
    start = time.monotonic()
    end = start + args.minutes * 60
    total = 0
    print(f"{'min':>6} {'RSS MB':>8} {'req/s':>7} {'flows listed':>13} {'errors':>7}", flush=True)
    while time.monotonic() < end:
        slice_s = min(args.sample, end - time.monotonic())
        res = await drive(port, wires, args.concurrency, slice_s, 10**12)
        total += res.done
        if mitmweb.poll() is not None:
            raise RuntimeError(f"mitmweb exited with code {mitmweb.returncode}")
        s = {
            "minutes": round((time.monotonic() - start) / 60, 2),
            "rss_mb": round(rss_mb(mitmweb.pid), 1),
            "rps": round(res.done / res.elapsed, 1) if res.elapsed else 0.0,
            "flows_listed": dash.flows if dash.task else None,
            "errors": res.errors,
            "requests": total,
        }
        samples.append(s)
        print(f"{s['minutes']:>6.1f} {s['rss_mb']:>8.1f} {s['rps']:>7.1f} {str(s['flows_listed']):>13} {s['errors']:>7}", flush=True)
    if dash.task:
        if dash.task.done() and dash.task.exception():
            print(f"dashboard client failed: {dash.task.exception()!r}", file=sys.stderr)
        dash.task.cancel()
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="minutes of load (default 30)")
    ap.add_argument("--warmup", type=float, default=None, help="minutes left out of the summary (default: a sixth of the run)")
    ap.add_argument("--cap", type=int, default=None, help="openflare_view_max_flows (default: mitm.conf's, else 5000; 0: no cap)")
    ap.add_argument("--concurrency", type=int, default=8, help="keep-alive connections (default 8)")
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples (default 30)")
    ap.add_argument("--data", default=None, help="dataset files for the request mix (default: the shared datasets)")
    ap.add_argument("--requests", type=int, default=2000, help="size of the request mix (default 2000)")
    ap.add_argument("--no-dashboard", action="store_true", help="no websocket client on /updates")
    ap.add_argument("--json", type=Path, default=None, help="write the samples and summary here")
    ap.add_argument("--bundle", default="addons/openflare.py",
                    help="the OpenFlare script (default: the bundle, as make web; addons/flowcap.py: mitmweb with the cap alone)")
    ap.add_argument("--script", action="append", default=[], help="one more mitmproxy script for mitmweb (repeatable), e.g. a memory probe")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE", help="one more mitmweb option (repeatable)")
    args = ap.parse_args(argv)

    mix, source = load_mix(args.data, args.requests, 0.3, 1)
    print(f"mix: {len(mix)} requests from {source}")
    work = Path(tempfile.mkdtemp(prefix="openflare-bench-web-"))
    confdir = work / "confdir"
    confdir.mkdir()
    shutil.copyfile(REPO / "mitm.conf", confdir / "config.yaml")  # what `make web` reads (its link)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPENFLARE_"))}
    procs: list[subprocess.Popen] = []
    samples: list[dict] = []
    try:
        up_port = free_port()
        up = subprocess.Popen([sys.executable, str(REPO / "scripts" / "upstream.py"), "--port", str(up_port)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        procs.append(up)
        wait_listening(up_port, up)
        port, web_port = free_port(), free_port()
        sets = {"web_port": web_port, "web_host": "127.0.0.1", "web_open_browser": "false",
                "openflare_record_dir": work / "records", "openflare_record_spill": work / "spill.jsonl",
                "openflare_allowlist": "127.0.0.1"}  # fmt: skip
        if args.cap is not None:
            sets["openflare_view_max_flows"] = args.cap
        cmd = [str(BIN / "mitmweb"), "--set", f"confdir={confdir}", "-p", str(port), "--listen-host", "127.0.0.1",
               "--mode", f"reverse:http://127.0.0.1:{up_port}", "-s", args.bundle]  # fmt: skip
        for script in args.script:
            cmd += ["-s", script]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        for spec in args.sets:
            cmd += ["--set", spec]
        log_path = work / "mitmweb.log"
        log = open(log_path, "wb")
        web = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(web)
        wait_listening(port, web)
        wait_listening(web_port, web)
        token_url = ""
        for _ in range(100):
            for line in log_path.read_text(errors="replace").splitlines():
                if "Web server listening at " in line:
                    token_url = line.split("Web server listening at ", 1)[1].strip()
            if token_url:
                break
            time.sleep(0.1)
        cap = args.cap if args.cap is not None else "as mitm.conf says (default 5000)"
        print(f"mitmweb pid {web.pid} on :{port}, UI {token_url.split('?')[0]}; openflare_view_max_flows: {cap}")
        wires = [r.wire(f"127.0.0.1:{port}") for r in mix]
        samples = asyncio.run(run(args, web, port, token_url, wires))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
    warmup = args.warmup if args.warmup is not None else args.minutes / 6
    after = [s for s in samples if s["minutes"] >= warmup]
    summary: dict = {"warmup_minutes": warmup, "samples": len(samples)}
    if after:
        rss = [s["rss_mb"] for s in after]
        med = statistics.median(rss)
        dev = max(abs(x - med) for x in rss) / med * 100
        slope = trend_mb_per_hour([(s["minutes"], s["rss_mb"]) for s in after])
        reqs = samples[-1]["requests"]
        summary.update(median_mb=med, min_mb=min(rss), max_mb=max(rss), max_deviation_pct=round(dev, 1),
                       trend_mb_per_hour=round(slope, 1), requests=reqs,
                       first_mb=samples[0]["rss_mb"], flows_listed_last=samples[-1]["flows_listed"])  # fmt: skip
        print(f"\nafter {warmup:g} min of warm-up ({len(after)} samples): RSS median {med:.1f} MB, "
              f"min {min(rss):.1f}, max {max(rss):.1f}: within {dev:.1f} % of the median; trend {slope:+.1f} MB/h; "
              f"{reqs} requests in {args.minutes:g} min")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "samples": samples,
                                         "summary": summary}, indent=1, default=str))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
