#!/usr/bin/env python3
"""Benchmark (`make bench`): what the metrics addon costs a request. The `openflare+metrics` case.

    scripts/bench_metrics.py [--rounds 8] [--duration 4] [--concurrency 16] [--scrape-every 1]

Two real mitmdump reverse proxies in front of the demo upstream (scripts/upstream.py), both the bundle
`make run` loads (features, bans, scorer, recorder, labels, flowcap: each its own embedded stores):

    openflare           the bundle without the metrics addon
    openflare+metrics   addons/openflare.py itself, with openflare_metrics_port set, and /metrics scraped
                        every --scrape-every seconds during the load (Prometheus scrapes every 15 s or more)

Paired rounds: both proxies pinned to the same CPU (the load generator and upstream on the others) and
loaded at the same time with the same request mix (the shared datasets' test splits, 30 % attacks; else a
built-in mix), so the scheduler gives them equal CPU time and the request ratio is their cost ratio, and
minute-to-minute drift hits both. Printed: each round's ratio, the median, and CPU ms per request of each.
The bench client is never banned or rate-limited (strikes 1000 in 1 s, rate limit 1,000,000); the LLM is off.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from addons import dataset  # noqa: E402
from bench import cpu_seconds, free_port, wait_listening  # noqa: E402  (the main benchmark's process helpers)

MITMDUMP = Path(sys.executable).parent / "mitmdump"
BASE, METRICS = "openflare", "openflare+metrics"
TARGET = 0.98  # the metrics addon may cost at most 2 % of throughput
BUILTIN = [
    ("GET", "/", [("User-Agent", "Mozilla/5.0")], b""),
    ("GET", "/search?q=blue+shoes&page=2", [("User-Agent", "Mozilla/5.0"), ("Cookie", "sid=abc123")], b""),
    ("POST", "/api/cart", [("Content-Type", "application/json")], b'{"item": "shoes", "qty": 2}'),
    ("GET", "/?id=1%27%20OR%20%271%27=%271", [], b""),
    ("GET", "/search?q=%3Cscript%3Ealert(1)%3C/script%3E", [], b""),
]
HOP = {"host", "connection", "keep-alive", "proxy-connection", "content-length", "transfer-encoding", "te", "upgrade", "expect",
       "forwarded", "x-forwarded-for", "x-real-ip"}  # fmt: skip
WITHOUT_METRICS = (
    "from addons import common\nfrom addons import openflare\n\n"
    "# The bundle of addons/openflare.py, fresh instances, less the metrics addon.\n"
    "BUNDLED = [type(a)() for a in openflare.BUNDLED if type(a).__name__ != 'Metrics']\n"
    "globals().update(common.bundle(*BUNDLED))\n"
)


def wire(method: str, target: str, headers, body: bytes, host: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in HOP and "\r" not in v and "\n" not in v]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace") + body


def load_mix(n: int, attack_share: float, seed: int) -> tuple[list[tuple], str]:
    """`n` requests of the shared datasets' test splits (a random tenth of each file read), else the built-in mix."""
    rnd = random.Random(seed)
    try:
        files = dataset.parse_data_arg(None)
    except dataset.DatasetError:
        files = []
    pools: dict[str, list] = {"attack": [], "benign": []}
    want = {"attack": round(n * attack_share), "benign": n - round(n * attack_share)}
    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if rnd.random() >= 0.1:
                    continue
                try:
                    r = dataset.parse_record(json.loads(line), f"{path}:{i}", path.name.split(".", 1)[0])
                except (ValueError, dataset.DatasetError):
                    continue
                if r.split == "test" and r.method in ("GET", "POST", "PUT", "HEAD", "DELETE", "PATCH") and len(pools[r.label]) < want[r.label]:
                    pools[r.label].append((r.method, r.target, r.headers, r.body))
    mix = pools["attack"] + pools["benign"]
    if not mix:
        return BUILTIN * max(1, n // len(BUILTIN)), "the built-in mix"
    rnd.shuffle(mix)
    return mix, ", ".join(p.name for p in files) + " (test splits)"


async def read_response(reader: asyncio.StreamReader) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip().lower()
    if b"chunked" in headers.get(b"transfer-encoding", b""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    return headers.get(b"connection") != b"close"


async def drive(port: int, wires: list[bytes], concurrency: int, duration: float) -> int:
    """Requests answered in `duration` seconds over `concurrency` keep-alive connections."""
    done = 0
    counter = iter(range(1 << 40))
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal done
        reader = writer = None
        for i in counter:
            if time.perf_counter() > deadline:
                break
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
                writer.write(wires[i % len(wires)])
                keep = await asyncio.wait_for(read_response(reader), 30)
                done += 1
                if not keep:
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def scraper(port: int, every: float, stop: asyncio.Event, got: list[int]) -> None:
    """GET /metrics every `every` seconds (in a thread: urllib blocks) until `stop`."""
    while not stop.is_set():
        try:
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read())
            got.append(len(body))
        except OSError:
            got.append(-1)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def micro(n: int = 100_000) -> float:
    """µs per flow of the metrics addon's response hook, in-process, over flows whose metadata is what the bundle
    writes (a pass, a refusal by the model, a ban refusal), the endpoint on."""
    from mitmproxy.test import tflow
    from mitmproxy.test import tutils

    from addons import common
    from addons import metrics

    m = metrics.Metrics(peers=[])
    m.counting = True
    kinds = [
        ({common.VERDICT: "pass", common.SCORE: 2, common.LOCAL_SCORE: 2, common.SCORE_MS: 0.4, common.LLM_STATUS: "off"}, 200, b"ok"),
        ({common.VERDICT: "block", common.SCORE: 10, common.LOCAL_SCORE: 10, common.SCORE_MS: 0.9, common.LLM_STATUS: "off",
          common.CATEGORY: "sqli", common.FIELD: ["query", "id"]}, 403, common.BLOCK_BODY),
        ({common.BANNED: True, common.REASON: "ip banned: x"}, 403, common.BLOCK_BODY),
    ]  # fmt: skip
    flows = []
    for i in range(3000):
        meta, status, body = kinds[i % 3]
        f = tflow.tflow(req=tutils.treq(), resp=tutils.tresp(status_code=status, content=body))
        flows.append((f, dict(meta)))
    t0 = time.perf_counter()
    for i in range(n):
        f, meta = flows[i % len(flows)]
        f.metadata = dict(meta)
        m.response(f)
    loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        f, meta = flows[i % len(flows)]
        f.metadata = dict(meta)
    return (loop - (time.perf_counter() - t0)) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="paired rounds (default 8)")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds of load per round (default 4)")
    ap.add_argument("--concurrency", type=int, default=16, help="keep-alive connections per proxy (default 16)")
    ap.add_argument("--requests", type=int, default=2000, help="size of the request mix (default 2000)")
    ap.add_argument("--scrape-every", type=float, default=1.0, help="seconds between scrapes of /metrics during the load (default 1; 0: none)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.concurrency < 1 or args.requests < 1 or args.scrape_every < 0:
        ap.error("--rounds, --concurrency, --requests >= 1; --duration > 0; --scrape-every >= 0")
    if not MITMDUMP.exists():
        print(f"mitmdump not found at {MITMDUMP}: run `make install`", file=sys.stderr)
        return 1
    mix, source = load_mix(args.requests, 0.3, args.seed)
    print(f"mix: {len(mix)} requests from {source}")
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu = {cpus[-1]} if len(cpus) > 1 else None
    if proxy_cpu:
        os.sched_setaffinity(0, set(cpus[:-1]))
        print(f"cpus: both mitmdumps on CPU {cpus[-1]}; load generator, scraper and upstream on {', '.join(map(str, cpus[:-1]))}")
    else:
        print("one CPU: not pinned (the ratio is noisier)")
    work = Path(tempfile.mkdtemp(prefix="openflare-bench-metrics-"))
    procs: list[subprocess.Popen] = []

    def start(name: str, args_: list[str], port: int, pin: bool) -> subprocess.Popen:
        log = work / f"{name}.log"
        with open(log, "wb") as fh:
            p = subprocess.Popen(args_, cwd=REPO, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OPENFLARE_REDIS_URL": "", "OPENFLARE_MONGO_URI": "", "OPENAI_API_KEY": "",
                                      "OPENAI_BASE_URL": ""}, start_new_session=True,
                                 preexec_fn=(lambda: os.sched_setaffinity(0, proxy_cpu)) if pin and proxy_cpu else None)  # fmt: skip
        procs.append(p)
        wait_listening(port, p, log=log)
        return p

    try:
        up = free_port()
        start("upstream", [sys.executable, str(REPO / "scripts" / "upstream.py"), "--port", str(up)], up, pin=False)
        (work / "without_metrics.py").write_text(WITHOUT_METRICS)
        ports, pids = {}, {}
        metrics_port = free_port()
        for name, script in ((BASE, str(work / "without_metrics.py")), (METRICS, "addons/openflare.py")):
            d = work / name.replace("+", "_")
            (d / "confdir").mkdir(parents=True)
            (d / "confdir" / "config.yaml").write_text("")  # never the user's mitm.conf
            opts = {"openflare_record_dir": d / "records", "openflare_record_spill": d / "spill.jsonl", "openflare_ban_socket": "",
                    "openflare_strikes": 1000, "openflare_strike_window": 1, "openflare_rate_limit": 1_000_000,
                    "openflare_llm_enabled": "false", "openflare_instance": name}  # fmt: skip
            if name == METRICS:
                opts["openflare_metrics_port"] = metrics_port
            port = ports[name] = free_port()
            cmd = [str(MITMDUMP), "--set", f"confdir={d / 'confdir'}", "--listen-host", "127.0.0.1", "-p", str(port), "-q",
                   "--mode", f"reverse:http://127.0.0.1:{up}", "-s", script]  # fmt: skip
            for k, v in opts.items():
                cmd += ["--set", f"{k}={v}"]
            pids[name] = start(name, cmd, port, pin=True).pid
        time.sleep(3)  # the model's probe check and the stores settle after the port opens
        wires = {n: [wire(*r, f"127.0.0.1:{p}") for r in mix] for n, p in ports.items()}
        for n in ports:  # warm-up: caches, the first records
            asyncio.run(drive(ports[n], wires[n], args.concurrency, 1.0))
        ratios, cpu = [], {BASE: [], METRICS: []}
        scrapes: list[int] = []

        async def paired() -> tuple[int, int]:
            stop = asyncio.Event()
            task = asyncio.create_task(scraper(metrics_port, args.scrape_every, stop, scrapes)) if args.scrape_every else None
            a, b = await asyncio.gather(drive(ports[BASE], wires[BASE], args.concurrency, args.duration),
                                        drive(ports[METRICS], wires[METRICS], args.concurrency, args.duration))  # fmt: skip
            stop.set()
            if task:
                await task
            return a, b

        for rnd in range(args.rounds):
            c0 = {n: cpu_seconds(pids[n]) for n in ports}
            a, b = asyncio.run(paired())
            c1 = {n: cpu_seconds(pids[n]) for n in ports}
            for n, done in ((BASE, a), (METRICS, b)):
                if done:
                    cpu[n].append((c1[n] - c0[n]) / done * 1000)
            if a:
                ratios.append(b / a)
            print(f"  paired round {rnd + 1}: {BASE} {a / args.duration:.0f} req/s, {METRICS} {b / args.duration:.0f} req/s "
                  f"at the same time ({b / a:.1%})" if a else f"  paired round {rnd + 1}: no request answered", flush=True)  # fmt: skip
        final = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        shutil.rmtree(work, ignore_errors=True)
    if not ratios:
        print("bench_metrics: no paired round answered a request", file=sys.stderr)
        return 1
    med = statistics.median(ratios)
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in final.splitlines() if line.startswith("openflare_requests_total{"))
    ok_scrapes = [s for s in scrapes if s > 0]
    print(f"scrapes of /metrics during the load: {len(ok_scrapes)} answered ({statistics.median(ok_scrapes) / 1024:.1f} KB each)"
          f"{f', {len(scrapes) - len(ok_scrapes)} failed' if len(ok_scrapes) < len(scrapes) else ''}; requests counted there: {counted:.0f}"
          if ok_scrapes else "no scrape during the load")  # fmt: skip
    print(f"CPU per request (median of rounds): {BASE} {statistics.median(cpu[BASE]):.3f} ms, {METRICS} {statistics.median(cpu[METRICS]):.3f} ms")
    print(f"paired rounds ({BASE} and {METRICS} loaded at the same time on one CPU): {METRICS}/{BASE} median {med:.1%} "
          f"(rounds: {', '.join(f'{x:.1%}' for x in ratios)})")
    us = micro()
    base_ms = statistics.median(cpu[BASE])
    print(f"micro-benchmark: the metrics hooks cost {us:.2f} µs per request in-process ({us / 10 / base_ms:.3f} % of the "
          f"bundle's {base_ms:.3f} ms of CPU per request here)")
    print(f"target: {METRICS} >= {TARGET:.0%} of {BASE} throughput: {med:.1%} {'met' if med >= TARGET else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
