"""Benchmark the recorder: proxy throughput with and without it, and a 10,000-request burst.

    .venv/bin/python scripts/bench_recorder.py [--requests 3000] [--rounds 3] [--burst 10000] [--kill 10000] [--concurrency 8]
                                               [--no-fsync] [--scripts addons/features.py,addons/scorer.py]

Starts the demo app (scripts/upstream.py) and real mitmdumps in reverse-proxy mode (features + scorer,
then features + scorer + recorder on the embedded store in a temporary directory), drives them with
keep-alive HTTP/1.1 clients (9 benign requests in 10, 1 SQL injection), and prints requests per second
and mitmdump's CPU per request for each, alternating the cases round by round so all see the same machine.
A third case fsyncs the record journal per batch (openflare_record_fsync: true; --no-fsync skips it): every
response waits for its record's journal write either way (group commit), and with fsync for the disk too.
Then it sends a burst
through the recorder, stops mitmdump (its `done` flushes) and checks that the store holds exactly one
record per request and that `verify` finds every hash chain intact; and a kill -9 burst (--kill): mitmdump
killed half way through, restarted, and no acknowledged request (its response read in full) without its
record. Exit status 1 if a burst check fails.
`scripts/bench.py` runs the same functions as its recorder cases.
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
ATTACK = "/search?id=1%27%20OR%20%271%27=%271"
BROWSER = ("User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
           "Accept: text/html,application/xhtml+xml\r\nAccept-Language: en-US,en;q=0.5\r\n")
BASE_ADDONS = ["addons/features.py", "addons/scorer.py"]
RECORDER = "addons/recorder.py"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port  # noqa: E402  (the main bench's process helpers)
from bench import wait_listening as wait_port  # noqa: E402


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPENFLARE_"))}
    return env


class Proxy:
    """A mitmdump in reverse mode with the given scripts and option overrides (written to its confdir)."""

    def __init__(self, upstream: str, scripts: list[str], conf: dict, workdir: Path) -> None:
        self.port = free_port()
        confdir = Path(tempfile.mkdtemp(prefix="confdir-", dir=workdir))
        lines = (REPO / "mitm.conf").read_text().splitlines()
        lines = [x for x in lines if not any(x.startswith(f"{k}:") for k in conf)]
        lines += [f"{k}: {json.dumps(v)}" for k, v in conf.items()]
        (confdir / "config.yaml").write_text("\n".join(lines) + "\n")
        args = [str(BIN / "mitmdump"), "--set", f"confdir={confdir}", "--listen-host", "127.0.0.1", "-p", str(self.port),
                "--mode", f"reverse:{upstream}", "-q"]
        for s in scripts:
            args += ["-s", s]
        self.log = open(workdir / f"mitmdump-{self.port}.log", "wb")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)
        wait_port(self.port, self.proc)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) mitmdump has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


async def _client(port: int, n: int, offset: int, statuses: dict, acked: set | None = None) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(offset, offset + n):
            target = ATTACK + f"&n={i}" if i % 10 == 9 else f"/search?q=item{i}"
            writer.write(f"GET {target} HTTP/1.1\r\nHost: bench\r\n{BROWSER}\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            statuses[status] = statuses.get(status, 0) + 1
            if acked is not None:
                acked.add(target)
    except (OSError, asyncio.IncompleteReadError):
        if acked is None:
            raise  # the proxy died: only the kill -9 burst expects that
    finally:
        writer.close()


async def _load(port: int, total: int, concurrency: int, acked: set | None = None) -> tuple[float, dict]:
    statuses: dict = {}
    per = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]
    offsets = [sum(per[:i]) for i in range(concurrency)]
    start = time.perf_counter()
    await asyncio.gather(*(_client(port, n, o, statuses, acked) for n, o in zip(per, offsets)))
    return time.perf_counter() - start, statuses


def load(port: int, total: int, concurrency: int, acked: set | None = None) -> tuple[float, dict]:
    """Send `total` requests over `concurrency` keep-alive connections: (seconds, {status: count}); the
    targets whose responses were read in full are added to `acked` (then a proxy dying ends the load quietly)."""
    return asyncio.run(_load(port, total, concurrency, acked))


def start_upstream(workdir: Path) -> subprocess.Popen:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "upstream.py"), "--port", str(port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_port(port, proc)
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return proc


def recorder_conf(workdir: Path, name: str, model: str | None) -> dict:
    d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    conf = {"openflare_record_dir": str(d / "records"), "openflare_record_spill": str(d / "spill.jsonl"), "openflare_instance": name}
    if model:
        conf["openflare_model"] = model
    return conf


FSYNC_CASE = "with recorder + fsync per batch"


def throughput(upstream: str, workdir: Path, requests: int, rounds: int, concurrency: int, model: str | None, fsync: bool = True) -> dict:
    """Requests per second without and with the recorder (and with fsync), alternating; medians and the cost in percent."""
    base = {"openflare_model": model} if model else {}
    figures: dict[str, list[float]] = {"without recorder": [], "with recorder (embedded store)": []}
    if fsync:
        figures[FSYNC_CASE] = []
    cpu_ms: dict[str, list[float]] = {k: [] for k in figures}
    for r in range(rounds):
        cases = [
            ("without recorder", BASE_ADDONS, base),
            ("with recorder (embedded store)", BASE_ADDONS + [RECORDER], recorder_conf(workdir, f"bench-{r}", model)),
        ]
        if fsync:
            cases.append((FSYNC_CASE, BASE_ADDONS + [RECORDER], dict(recorder_conf(workdir, f"fsync-{r}", model), openflare_record_fsync=True)))
        for case, scripts, conf in cases:
            proxy = Proxy(upstream, scripts, conf, workdir)
            try:
                load(proxy.port, min(200, requests), concurrency)  # warm up
                cpu0 = proxy.cpu_seconds()
                secs, statuses = load(proxy.port, requests, concurrency)
                cpu = proxy.cpu_seconds() - cpu0
            finally:
                proxy.stop()
            figures[case].append(requests / secs)
            cpu_ms[case].append(1000 * cpu / requests)
            print(f"  round {r + 1}: {case}: {requests / secs:.0f} req/s, mitmdump CPU {1000 * cpu / requests:.2f} ms/request {statuses}", flush=True)
    med = {k: statistics.median(v) for k, v in figures.items()}
    a, b = med["without recorder"], med["with recorder (embedded store)"]
    cpu = {k: round(statistics.median(v), 3) for k, v in cpu_ms.items()}
    out = {"req_per_s": med, "runs": figures, "cost_percent": round(100 * (a - b) / a, 2), "cpu_ms_per_request": cpu}
    if fsync:
        out["fsync_cost_percent"] = round(100 * (a - med[FSYNC_CASE]) / a, 2)
    return out


def burst(upstream: str, workdir: Path, n: int, concurrency: int, model: str | None) -> dict:
    """`n` requests through the recorder, then stop mitmdump and check records and hash chains."""
    sys.path.insert(0, str(REPO))
    from addons import records

    conf = recorder_conf(workdir, "burst", model)
    proxy = Proxy(upstream, BASE_ADDONS + [RECORDER], conf, workdir)
    try:
        secs, statuses = load(proxy.port, n, concurrency)
    finally:
        rc = proxy.stop()
    start = time.perf_counter()
    store = records.open_store(directory=conf["openflare_record_dir"])
    try:
        count = store.coll.count_documents({})
        full = store.coll.count_documents({"tier": records.TIER_FULL})
        result = records.verify(store.find())
    finally:
        store.close()
    spill_left = Path(conf["openflare_record_spill"]).exists()
    ok = count == n and result["broken"] is None and result["records"] == n and not spill_left
    return {
        "requests": n, "seconds": round(secs, 2), "statuses": statuses, "mitmdump_exit": rc, "records": count,
        "full_records": full, "chains": result["chains"], "broken": result["broken"], "spill_left": spill_left,
        "verify_seconds": round(time.perf_counter() - start, 2), "ok": ok,
    }


def kill_burst(upstream: str, workdir: Path, n: int, concurrency: int, model: str | None) -> dict:
    """`n` requests, every one recorded in full (its target names it); kill -9 mitmdump half way, restart it
    (it replays the journal), stop it, and count the acknowledged requests (response read in full) whose
    record is missing: the recorder's promise is 0."""
    import threading

    sys.path.insert(0, str(REPO))
    from addons import records

    conf = dict(recorder_conf(workdir, "kill", model), openflare_record_benign_one_in=1)
    proxy = Proxy(upstream, BASE_ADDONS + [RECORDER], conf, workdir)
    acked: set[str] = set()

    def killer() -> None:
        while len(acked) < n // 2 and proxy.proc.poll() is None:
            time.sleep(0.005)
        os.killpg(proxy.proc.pid, signal.SIGKILL)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    load(proxy.port, n, concurrency, acked)
    t.join()
    proxy.stop()
    Proxy(upstream, BASE_ADDONS + [RECORDER], conf, workdir).stop()  # the restart replays what the killed one journaled
    store = records.open_store(directory=conf["openflare_record_dir"])
    try:
        targets = [r.get("target") for r in store.find()]
        result = records.verify(store.find())
    finally:
        store.close()
    missing = acked - set(targets)
    return {"requests": n, "acknowledged": len(acked), "records": len(targets), "acknowledged_missing": len(missing),
            "duplicates": len(targets) - len(set(targets)), "broken": result["broken"], "ok": not missing and result["broken"] is None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="requests per throughput run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    ap.add_argument("--burst", type=int, default=10000, help="requests in the burst (0 skips it)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--model", help="openflare_model for the proxies (default: mitm.conf's)")
    ap.add_argument("--no-fsync", action="store_true", help="skip the case with openflare_record_fsync: true")
    ap.add_argument("--scripts", help="comma-separated addons in front of the recorder (default: features and scorer)")
    ap.add_argument("--kill", type=int, default=10000, help="requests in the kill -9 burst (0 skips it)")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)
    if min(args.requests, args.rounds, args.burst) < 0 or args.concurrency < 1:
        ap.error("--requests, --rounds and --burst must be >= 0, --concurrency >= 1")
    if args.scripts:
        BASE_ADDONS[:] = [x.strip() for x in args.scripts.split(",") if x.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="openflare-bench-recorder-"))
    up = start_upstream(workdir)
    out: dict = {}
    try:
        if args.requests > 0 and args.rounds > 0:
            print(f"throughput: {args.requests} requests x {args.rounds} rounds, {args.concurrency} connections", flush=True)
            out["throughput"] = throughput(up.url, workdir, args.requests, args.rounds, args.concurrency, args.model, not args.no_fsync)
            t = out["throughput"]
            print(f"recorder cost: {t['cost_percent']} % ({', '.join(f'{k}: {v:.0f} req/s' for k, v in t['req_per_s'].items())})")
            if "fsync_cost_percent" in t:
                print(f"recorder + fsync cost: {t['fsync_cost_percent']} %")
            print(f"mitmdump CPU per request (medians): {', '.join(f'{k}: {v:.2f} ms' for k, v in t['cpu_ms_per_request'].items())}")
        if args.burst > 0:
            print(f"burst: {args.burst} requests through the recorder", flush=True)
            out["burst"] = b = burst(up.url, workdir, args.burst, args.concurrency, args.model)
            print(f"burst: {b['records']} records for {b['requests']} requests ({b['full_records']} full), "
                  f"{b['chains']} chain(s), {'intact' if b['broken'] is None else 'BROKEN: ' + str(b['broken'])}: "
                  f"{'OK' if b['ok'] else 'FAILED'}")
        if args.kill > 0:
            print(f"kill -9 burst: {args.kill} requests, mitmdump killed half way and restarted", flush=True)
            out["kill"] = k = kill_burst(up.url, workdir, args.kill, args.concurrency, args.model)
            print(f"kill -9 burst: {k['acknowledged']} acknowledged, {k['records']} records, {k['acknowledged_missing']} acknowledged "
                  f"missing, {k['duplicates']} duplicates, chain {'intact' if k['broken'] is None else 'BROKEN: ' + str(k['broken'])}: "
                  f"{'OK' if k['ok'] else 'FAILED'}")
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
        if args.json:
            try:
                Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
            except OSError as e:
                print(f"bench-recorder: cannot write --json {args.json}: {e.strerror or e}", file=sys.stderr)
                return 2
    return 0 if out.get("burst", {}).get("ok", True) and out.get("kill", {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
