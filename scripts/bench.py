"""`make bench`: what OpenFlare costs. Throughput and latency of mitmdump with and without our addons,
plus a micro-benchmark of the per-request work (fields + local model score) and a size sweep.

One run, loopback only: the demo upstream (scripts/upstream.py), then one reverse-proxy mitmdump per
case in CASES, all started up front. The SAME request mix (sampled from the TEST splits of the shared
datasets, else a built-in mix) goes through every case in interleaved rounds, so machine noise hits
all cases alike: a load phase (bounded concurrency, keep-alive connections) for throughput, then a
sequential phase for latency. Requests and time are both bounded.

    .venv/bin/python scripts/bench.py [--duration 4] [--rounds 2] [--concurrency 16] [--model NAME]

A later case (bans, recorder, LLM...) is one more `Case(...)` in CASES: extra addon modules, `--set`
options and environment variables. Each case loads its addons as one script, as `make run` does
(addons/openflare.py).
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `addons` when run without `pip install -e .`

from addons import banstore  # noqa: E402
from addons import dataset  # noqa: E402
from addons import fields  # noqa: E402
from addons import llm  # noqa: E402
from addons import model  # noqa: E402

MITMDUMP = Path(sys.executable).parent / "mitmdump"
FEATURES = "addons/features.py"
SCORER = "addons/scorer.py"
BANS = "addons/bans.py"
# The bans case: the shared Redis (OPENFLARE_BENCH_REDIS), its own key prefix, BENCH_BANS bans of other IPs
# present. The bench client (127.0.0.1) is never banned: strikes expire after 1 s, 1000 are needed, and the
# rate limit is out of reach; every attack still costs a strike in Redis. Keys are deleted at the end.
BENCH_REDIS = os.environ.get("OPENFLARE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
BENCH_PREFIX = f"openflare-bench-{os.getpid()}:"
BENCH_BANS = 10_000


@dataclass
class Case:
    """One mitmdump configuration. `scripts` None means no proxy at all (the upstream, directly)."""

    name: str
    scripts: list[str] | None
    options: dict[str, object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    pid: int | None = None  # the running mitmdump


# The baseline is the case named "plain": ratios and added latency are against it.
CASES = [
    Case("direct (no proxy)", None),
    Case("plain", []),
    Case("openflare", [FEATURES, SCORER]),
    Case("openflare+bans", [FEATURES, BANS, SCORER],
         {"openflare_strikes": 1000, "openflare_strike_window": 1, "openflare_rate_limit": 1_000_000,
          "openflare_redis_prefix": BENCH_PREFIX}, {"OPENFLARE_REDIS_URL": BENCH_REDIS}),
    # The refusal path: the first attack bans the client (in-process store), then every request gets 403.
    Case("banned client", [FEATURES, BANS, SCORER], {"openflare_strikes": 1, "openflare_rate_limit": 0},
         {"OPENFLARE_REDIS_URL": ""}),
]
CASES.append(
    # The LLM second opinion: tests/llm_server.py answering after LLM_DELAY_MS, cache off so every in-band
    # request waits for it; caps out of reach. The base URL is set once the server runs.
    Case(LLM_CASE := "openflare+llm", [FEATURES, SCORER],
         {"openflare_llm_model": "bench", "openflare_llm_cache_seconds": 0, "openflare_llm_per_minute": 1_000_000,
          "openflare_llm_ip_per_minute": 1_000_000, "openflare_llm_max_inflight": 256})
)  # fmt: skip
LLM_DELAY_MS = 500
LLM_EXTRA_ROUNDS = 4  # extra interleaved sequential rounds of openflare vs openflare+llm, for a steadier p99
# The recorder on the embedded store (a fresh temporary directory, removed at the end), against "openflare".
# The 10,000-request burst check (count + hash chain) is scripts/bench_recorder.py (`make bench` runs it).
RECORDER = "addons/recorder.py"
RECORDER_CASE = "openflare+recorder"
RECORD_DIR = Path(tempfile.gettempdir()) / f"openflare-bench-{os.getpid()}-records"
CASES.append(
    Case(RECORDER_CASE, [FEATURES, SCORER, RECORDER],
         {"openflare_record_dir": str(RECORD_DIR / "store"), "openflare_record_spill": str(RECORD_DIR / "spill.jsonl"),
          "openflare_instance": "bench"}, {"OPENFLARE_MONGO_URI": ""})
)  # fmt: skip
BASELINE = "plain"
# Paired rounds: (baseline, case) loaded at the same time on the proxy CPU; their targets are judged on these.
PAIRS = [(BASELINE, "openflare"), ("openflare", "openflare+bans"), ("openflare", RECORDER_CASE)]

# Used when no dataset is found: (label, method, target, headers, body).
BUILTIN_MIX = [
    ("benign", "GET", "/", [("User-Agent", "Mozilla/5.0")], b""),
    ("benign", "GET", "/search?q=blue+shoes&page=2", [("User-Agent", "Mozilla/5.0"), ("Cookie", "sid=abc123")], b""),
    ("benign", "GET", "/products/42?ref=home", [("User-Agent", "curl/8.5.0")], b""),
    ("benign", "POST", "/login", [("Content-Type", "application/x-www-form-urlencoded")], b"user=alice&password=correct+horse"),
    ("benign", "POST", "/api/cart", [("Content-Type", "application/json")], b'{"item": "shoes", "qty": 2}'),
    ("benign", "GET", "/static/app.js?v=3", [("User-Agent", "Mozilla/5.0"), ("Referer", "http://shop/")], b""),
    ("attack", "GET", "/?id=1%27%20OR%20%271%27=%271", [], b""),
    ("attack", "GET", "/search?q=%3Cscript%3Ealert(1)%3C/script%3E", [], b""),
    ("attack", "GET", "/download?file=..%2F..%2F..%2Fetc%2Fpasswd", [], b""),
    ("attack", "POST", "/login", [("Content-Type", "application/x-www-form-urlencoded")], b"user=admin%27--&password=x"),
]

HOP_HEADERS = {"host", "connection", "keep-alive", "proxy-connection", "content-length", "transfer-encoding", "te", "upgrade", "expect"}


@dataclass
class Req:
    label: str
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def wire(self, host: str) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in HOP_HEADERS and "\r" not in v and "\n" not in v]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace") + self.body


def load_mix(data: str | None, n: int, attack_share: float, seed: int) -> tuple[list[Req], str]:
    """`n` requests from the datasets' test splits (`attack_share` of them attacks), else the built-in mix."""
    try:
        files = dataset.parse_data_arg(data)
    except dataset.DatasetError as e:
        print(f"no dataset ({e}): using the built-in mix of {len(BUILTIN_MIX)} requests")
        return [Req(*r) for r in BUILTIN_MIX] * max(1, n // len(BUILTIN_MIX)), "built-in"
    rnd = random.Random(seed)
    want = {"attack": round(n * attack_share), "benign": n - round(n * attack_share)}
    pools: dict[str, list[Req]] = {"attack": [], "benign": []}
    seen = {"attack": 0, "benign": 0}
    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            # Parse a random tenth of the lines only: reading every record takes longer than the benchmark.
            lines = [(i, line) for i, line in enumerate(fh, 1) if rnd.random() < 0.1]
        for i, line in lines:
            try:
                r = dataset.parse_record(json.loads(line), f"{path}:{i}", path.name.split(".", 1)[0])
            except (ValueError, dataset.DatasetError) as e:
                print(f"bench: skipping a bad record: {e}", file=sys.stderr)
                continue
            if r.split != "test" or r.method not in ("GET", "POST", "PUT", "HEAD", "DELETE", "PATCH", "OPTIONS"):
                continue
            req = Req(r.label, r.method, r.target, r.headers, r.body)
            seen[r.label] += 1
            pool = pools[r.label]
            if len(pool) < want[r.label]:  # reservoir sample per label
                pool.append(req)
            else:
                j = rnd.randrange(seen[r.label])
                if j < want[r.label]:
                    pool[j] = req
    mix = pools["attack"] + pools["benign"]
    if not mix:
        return [Req(*r) for r in BUILTIN_MIX], "built-in"
    rnd.shuffle(mix)
    return mix, ", ".join(p.name for p in files) + " (test splits)"


# --- processes ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], port: int, env: dict[str, str] | None = None,
              cpus: set[int] | None = None) -> subprocess.Popen:  # fmt: skip
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        log.close()
        self.procs.append(proc)
        try:
            wait_listening(port, proc)
        except RuntimeError as e:
            out = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} did not start: {e}\n{out}") from e
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(CPUs for the proxies, CPUs for the load generator and upstream), None with fewer than 2 CPUs.

    A VM's virtual CPUs run at different speeds (another guest on the host's sibling core): pinned to one
    CPU, every mitmdump is measured on the same one, and never shares it with the load generator.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


PROXY_CPUS: set[int] | None = None  # set by main(): where start_case pins each mitmdump


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), None where it cannot be read."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def one_script(case: Case, workdir: Path) -> Path:
    """The case's addons as one script, the way `make run` loads them (addons/openflare.py): each listed
    addon module's addon classes, fresh instances, in the listed order, served by `common.bundle`."""
    names = [Path(s).stem for s in case.scripts or []]
    path = workdir / ("case_" + "".join(c if c.isalnum() else "_" for c in case.name) + ".py")
    path.write_text(
        "import importlib\n\nfrom addons import common\n\n"
        f"BUNDLED = [type(a)() for name in {names!r} for a in importlib.import_module('addons.' + name).addons]\n"
        "globals().update(common.bundle(*BUNDLED))\n"
    )
    return path


def start_case(procs: Procs, case: Case, upstream_port: int, confdir: Path) -> int:
    if case.scripts is None:
        return upstream_port
    port = free_port()
    if case.options:  # the file beats --set for the same key: this case gets a copy without its keys
        own = confdir.parent / ("confdir-" + "".join(c if c.isalnum() else "_" for c in case.name))
        own.mkdir(exist_ok=True)
        lines = (confdir / "config.yaml").read_text().splitlines()
        kept = [line for line in lines if line.split(":", 1)[0].strip() not in case.options]
        (own / "config.yaml").write_text("\n".join(kept) + "\n")
        confdir = own
    args = [str(MITMDUMP), "--set", f"confdir={confdir}", "--listen-host", "127.0.0.1", "-p", str(port),
            "--mode", f"reverse:http://127.0.0.1:{upstream_port}", "-q"]
    for key, value in case.options.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    if case.scripts:
        args += ["-s", str(one_script(case, confdir.parent))]
    case.pid = procs.start("mitmdump-" + case.name.replace(" ", "_"), args, port, case.env, PROXY_CPUS).pid
    return port


def wait_idle(pids: list[int | None], timeout: float = 60.0) -> float:
    """Wait until the processes stop using CPU (an addon may still load after the port opens: with every
    mitmdump on one CPU, that would slow the first case measured). Returns the seconds waited."""
    start = time.monotonic()
    last = [cpu_seconds(p) for p in pids]
    while time.monotonic() - start < timeout:
        time.sleep(0.5)
        now = [cpu_seconds(p) for p in pids]
        busy = sum((b or 0.0) - (a or 0.0) for a, b in zip(last, now))
        last = now
        if busy < 0.02:
            break
    return time.monotonic() - start


# --- the HTTP client ---


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds
    indices: list[int] = field(default_factory=list)  # which request of the mix, per latency
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0

    @property
    def done(self) -> int:
        return len(self.latencies)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, connection stays open). Bodies: content-length, chunked, or up to close."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip().lower()
    keep = headers.get(b"connection") != b"close"
    if b"chunked" in headers.get(b"transfer-encoding", b""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    elif status >= 200 and status not in (204, 304):
        await reader.read()
        keep = False
    return status, keep


async def drive(port: int, wires: list[bytes], concurrency: int, duration: float, max_requests: int) -> Result:
    """Send requests round-robin from `wires` over `concurrency` keep-alive connections, for at most
    `duration` seconds or `max_requests` requests."""
    res = Result()
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        reader = writer = None
        for i in counter:
            if time.perf_counter() > deadline:
                break
            wire = wires[i % len(wires)]
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
                t = time.perf_counter()
                writer.write(wire)
                status, keep = await asyncio.wait_for(read_response(reader), 30)
                res.latencies.append(time.perf_counter() - t)
                res.indices.append(i % len(wires))
                res.statuses[status] = res.statuses.get(status, 0) + 1
                if not keep:
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError, IndexError):
                res.errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.elapsed = time.perf_counter() - start
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


# --- the bans case's Redis keys ---


async def seed_bans(url: str, prefix: str, n: int) -> bool:
    """Ban n addresses (not the bench client's) under prefix, as openflare.ban does. False if Redis is down."""
    # memory=3600: should the run die before forget_bans, every key it made expires within the hour.
    store = banstore.BanStore(banstore.make_client(url), prefix, banstore.Policy(memory=3600), timeout=5)
    store.start()
    try:
        if not await store.wait_synced(3):
            return False
        for i in range(0, n, 500):
            await asyncio.gather(*(store.ban(f"10.{j >> 16 & 255}.{j >> 8 & 255}.{j & 255}", 3600, "bench")
                                   for j in range(i, min(n, i + 500))))
        return True
    finally:
        await store.close()


async def forget_bans(url: str, prefix: str) -> None:
    client = banstore.make_client(url)
    try:
        await banstore.delete_prefix(client, prefix)
    except Exception as e:  # noqa: BLE001 - Redis gone: the keys expire by themselves within the hour
        print(f"bench: could not delete the {prefix}* keys: {e}", file=sys.stderr)
    finally:
        await client.aclose()


# --- micro-benchmark ---


def micro(mix: list[Req], model_name: str, repeat: int) -> dict[str, list[float]]:
    """Per-request µs of fields.extract, of LocalModel.score, and of both, over the mix (the first pass
    cold: the field cache empty, as for a new client's first requests)."""
    m = model.load(model_name)
    out: dict[str, list[float]] = {"fields": [], "score": [], "fields+score": [], "ban check": []}
    # The banned-IP check of addons/bans.py: parse the client IP (uncached), look it up among BENCH_BANS
    # bans in the local view, count it in the rate limiter. No network.
    store = banstore.BanStore(banstore.make_client(None))
    for j in range(BENCH_BANS):
        store.bans[f"10.{j >> 16 & 255}.{j >> 8 & 255}.{j & 255}"] = banstore.Ban(time.monotonic() + 3600, "bench")
    limiter = banstore.RateLimiter(100)
    parse = banstore.ip_key.__wrapped__
    for _ in range(repeat):
        for i, r in enumerate(mix):
            t0 = time.perf_counter()
            key = parse(f"192.0.2.{i & 255}")
            store.check(key)
            limiter.hit(key)
            out["ban check"].append((time.perf_counter() - t0) * 1e6)
            t0 = time.perf_counter()
            try:
                req = fields.extract(r.method, r.target, r.headers, r.body)
            except fields.TooLarge:
                continue  # refused before scoring (413/431)
            t1 = time.perf_counter()
            try:
                m.score(req)
            except Exception as e:  # noqa: BLE001 - in mitmdump this request would go to the fail policy
                out.setdefault("score errors", []).append(repr(e))
                continue
            t2 = time.perf_counter()
            out["fields"].append((t1 - t0) * 1e6)
            out["score"].append((t2 - t1) * 1e6)
            out["fields+score"].append((t2 - t0) * 1e6)
    return out


SWEEP_SIZES = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20)


def sweep_request(kind: str, size: int, rng: random.Random) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """A benign request of about `size` bytes of `kind` (query, form, json, multipart): words and numbers,
    fresh each call (nothing cached)."""
    words = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")

    def value() -> str:
        return " ".join(rng.choice(words) for _ in range(4)) + f" {rng.randrange(10**6)}"

    if kind == "query":
        parts, n = [], 0
        while n < size:
            parts.append(f"p{len(parts)}={value().replace(' ', '+')}")
            n += len(parts[-1]) + 1
        return "GET", "/search?" + "&".join(parts), [("Host", "bench")], b""
    if kind == "form":
        body = "&".join(f"f{i}={value().replace(' ', '+')}" for i in range(max(1, size // 40))).encode()[:size]
        return "POST", "/form", [("Content-Type", "application/x-www-form-urlencoded")], body
    if kind == "json":
        body = json.dumps([{"id": i, "name": value(), "tags": [value()]} for i in range(max(1, size // 90))]).encode()
        return "POST", "/api", [("Content-Type", "application/json")], body
    b = "bench7MA4YWxkTrZu0gW"
    part = "".join(f"--{b}\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\n{value()}\r\n" for i in range(max(1, size // 100)))
    return "POST", "/upload", [("Content-Type", f"multipart/form-data; boundary={b}")], (part + f"--{b}--\r\n").encode()


def size_sweep(model_name: str, kinds=("query", "form", "json", "multipart"), sizes=SWEEP_SIZES) -> list[tuple]:
    """(kind, bytes, fields, ms, µs per KB) of fields + score, in-process, cold (every value new)."""
    m = model.load(model_name)
    rng = random.Random(5)
    rows = []
    for kind in kinds:
        for size in sizes:
            if kind == "query" and size > 64 << 10:
                continue  # a request line beyond 64 KB: mitmproxy and real servers refuse it anyway
            method, target, headers, body = sweep_request(kind, size, rng)
            n = len(target) + len(body)
            t0 = time.perf_counter()
            try:
                req = fields.extract(method, target, headers, body)
                m.score(req)
                nf = len(req.fields)
            except fields.TooLarge:
                nf = -1
            ms = (time.perf_counter() - t0) * 1000
            rows.append((kind, n, nf, ms, ms * 1000 / (n / 1024)))
    return rows


def llm_report(mix, model_path, data, samples: dict[str, list[tuple[float, int]]], results) -> None:
    """The LLM case against plain openflare: p99 of requests outside the band, and who reaches the LLM."""
    lm = model.load(str(model_path))
    low, high = llm.OPTION_DEFAULTS["openflare_llm_band_low"], llm.OPTION_DEFAULTS["openflare_llm_band_high"]

    def scores(reqs) -> list[int | None]:  # None: the model raised (mitmdump applies the fail policy, no LLM)
        out: list[int | None] = []
        for r in reqs:
            try:
                out.append(lm.score_request(r.method, r.target, r.headers, r.body)[0])
            except Exception:  # noqa: BLE001
                out.append(None)
        return out

    band = [s is not None and low <= s <= high for s in scores(mix)]
    out = {n: [t for t, i in samples[n] if not band[i]] for n in ("openflare", LLM_CASE)}
    inb = [t for t, i in samples[LLM_CASE] if band[i]]
    p_off, p_on = pct(out["openflare"], 99) * 1000, pct(out[LLM_CASE], 99) * 1000
    rps = {n: statistics.median(r.done / r.elapsed for r in results[n]) for n in ("openflare", LLM_CASE)}
    print(f"LLM case (test server answering in {LLM_DELAY_MS} ms, band {low}-{high}, cache off): "
          f"{sum(band)} of {len(mix)} mix requests in the band; throughput {rps[LLM_CASE] / rps['openflare']:.1%} of openflare")
    print(f"  outside the band: p99 {p_on:.2f} ms with the LLM vs {p_off:.2f} ms without "
          f"({len(out[LLM_CASE])} / {len(out['openflare'])} samples); in the band: p50 {pct(inb, 50) * 1000:.0f} ms ({len(inb)} samples)")
    try:
        benign = [r for path in dataset.parse_data_arg(data) for r in dataset.read(path) if r.split == "test" and not r.attack]
    except dataset.DatasetError:
        benign = [r for r in mix if r.label == "benign"]  # the built-in mix
    share = sum(s is not None and low <= s <= high for s in scores(benign)) / max(1, len(benign))
    print(f"targets: outside-band p99 within 10 % of LLM off: {p_on / p_off - 1:+.1%} ({'met' if p_on <= 1.1 * p_off else 'NOT met'}); "
          f"benign test requests reaching the LLM <= 1 %: {share:.2%} of {len(benign)} ({'met' if share <= 0.01 else 'NOT met'})")


# --- main ---


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark mitmdump with and without the OpenFlare addons.")
    ap.add_argument("--data", help="comma-separated JSONL files (default: every file in the shared datasets)")
    ap.add_argument("--requests", type=int, default=2000, help="size of the request mix (default 2000)")
    ap.add_argument("--attack-share", type=float, default=0.3, help="share of attacks in the mix (default 0.3)")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds of load per case per round (default 4)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds over all cases (default 4)")
    ap.add_argument("--concurrency", type=int, default=16, help="connections in the load phase (default 16)")
    ap.add_argument("--latency-requests", type=int, default=200, help="sequential requests per case per round (default 200)")
    ap.add_argument("--model", default=model.DEFAULT_MODEL, help="the model (name in models/ or path) for every case and the micro-benchmark")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--paired", type=int, default=8, help="rounds per pair in PAIRS (plain with openflare, openflare with "
                    "+bans and with +recorder) loaded at the same time on the proxy CPU (default 8; 0: none; needs pinning)")
    ap.add_argument("--no-pin", action="store_true", help="let the scheduler place the processes (default: every mitmdump "
                    "on the last CPU, the load generator and upstream on the others)")
    ap.add_argument("--cases", help="comma-separated case names to run (plain and openflare always run; default: all)")
    args = ap.parse_args(argv)
    for name, low in (("requests", 1), ("rounds", 1), ("concurrency", 1), ("latency_requests", 0), ("paired", 0)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be at least {low}")
    if args.duration <= 0 or not 0 <= args.attack_share <= 1:
        ap.error("--duration must be > 0 and --attack-share between 0 and 1")
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",") if c.strip()} | {BASELINE, "openflare"}
        unknown = wanted - {c.name for c in CASES}
        if unknown:
            print(f"bench: unknown case(s) {', '.join(sorted(unknown))}; cases: {', '.join(c.name for c in CASES)}", file=sys.stderr)
            return 2
        CASES[:] = [c for c in CASES if c.name in wanted]

    if not MITMDUMP.exists():
        print(f"mitmdump not found at {MITMDUMP}: run `make install`", file=sys.stderr)
        return 1
    try:
        model_path = model.resolve(args.model)
        model.read_card(model_path)
    except model.ModelError as e:
        print(f"bench: {e} (train one with `make train`, or pass --model)", file=sys.stderr)
        return 1

    mix, source = load_mix(args.data, args.requests, args.attack_share, args.seed)
    n_attack = sum(r.label == "attack" for r in mix)
    print(f"mix: {len(mix)} requests ({n_attack} attacks, {len(mix) - n_attack} benign) from {source}")

    work = Path(tempfile.mkdtemp(prefix="openflare-bench-"))
    confdir = work / "confdir"
    confdir.mkdir()
    conf = (REPO / "mitm.conf").read_text().splitlines()
    conf = [line for line in conf if not line.startswith(("openflare_model:", "openflare_ban_socket:"))]
    # The bench's own model, and no embedded ban store shared through the repo's data/bans.sock (a running
    # `make run` would otherwise own it, and the bench's strikes would ban 127.0.0.1 there).
    conf += [f"openflare_model: {json.dumps(str(model_path))}", 'openflare_ban_socket: ""']
    set_keys = {k for c in CASES for k in c.options}  # the file beats --set: drop the keys a case sets
    conf = [line for line in conf if line.partition(":")[0] not in set_keys]
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):  # the bench never talks to a real LLM
        os.environ.pop(var, None)
    (confdir / "config.yaml").write_text("\n".join(conf) + "\n")

    global PROXY_CPUS
    split = None if args.no_pin else split_cpus()
    if split:
        PROXY_CPUS, others = split
        os.sched_setaffinity(0, others)  # this process (the load generator) and the servers it starts
        print(f"cpus: every mitmdump on CPU {min(PROXY_CPUS)}; load generator and upstream on CPU(s) "
              f"{', '.join(map(str, sorted(others)))}")
    procs = Procs(work)
    results: dict[str, list[Result]] = {c.name: [] for c in CASES}
    latencies: dict[str, list[float]] = {c.name: [] for c in CASES}
    lat_index: dict[str, list[int]] = {c.name: [] for c in CASES}
    llm_lat: dict[str, list[tuple[float, int]]] = {"openflare": [], LLM_CASE: []}
    statuses: dict[str, dict[int, int]] = {c.name: {} for c in CASES}
    errors: dict[str, int] = {c.name: 0 for c in CASES}
    cpu_ms: dict[str, list[float]] = {c.name: [] for c in CASES}  # mitmdump CPU ms per request, load phase
    paired: dict[str, list[float]] = {}  # case -> its requests / its PAIRS baseline's, per paired round
    t_start = time.perf_counter()
    try:
        if any(BANS in (c.scripts or []) and c.env.get("OPENFLARE_REDIS_URL") for c in CASES):
            seeded = asyncio.run(seed_bans(BENCH_REDIS, BENCH_PREFIX, BENCH_BANS))
            print(f"bans case: {BENCH_BANS} bans present in Redis under {BENCH_PREFIX}" if seeded else
                  f"bans case: Redis at {BENCH_REDIS} unreachable: that case runs without Redis (fail-open)")
        up_port = free_port()
        procs.start("upstream", [sys.executable, str(REPO / "scripts" / "upstream.py"), "--port", str(up_port)], up_port)
        if any(c.name == LLM_CASE for c in CASES):
            llm_port = free_port()
            procs.start("llm-server", [sys.executable, str(REPO / "tests" / "llm_server.py"), "--port", str(llm_port),
                                       "--mode", "ok", "--delay-ms", str(LLM_DELAY_MS)], llm_port)  # fmt: skip
            next(c for c in CASES if c.name == LLM_CASE).options["openflare_llm_base_url"] = f"http://127.0.0.1:{llm_port}/v1"
        ports = {}
        for case in CASES:
            ports[case.name] = start_case(procs, case, up_port, confdir)
        wait_idle([c.pid for c in CASES])
        print(f"started {len(CASES) - 1} mitmdump(s) in {time.perf_counter() - t_start:.1f} s; "
              f"{args.rounds} rounds x {args.duration:g} s load (concurrency {args.concurrency}) "
              f"+ {args.latency_requests} sequential requests per case")
        wires = {name: [r.wire(f"127.0.0.1:{port}") for r in mix] for name, port in ports.items()}
        for rnd in range(args.rounds):
            for case in CASES if rnd % 2 == 0 else list(reversed(CASES)):
                name = case.name
                asyncio.run(drive(ports[name], wires[name], args.concurrency, 1.0, 500))  # warm-up
                cpu0 = cpu_seconds(case.pid)
                res = asyncio.run(drive(ports[name], wires[name], args.concurrency, args.duration, 10**7))
                cpu1 = cpu_seconds(case.pid)
                if cpu0 is not None and cpu1 is not None and res.done:
                    cpu_ms[name].append((cpu1 - cpu0) / res.done * 1000)
                results[name].append(res)
                lat = asyncio.run(drive(ports[name], wires[name], 1, 30.0, args.latency_requests))
                latencies[name] += lat.latencies
                lat_index[name] += lat.indices
                for st, c in list(res.statuses.items()) + list(lat.statuses.items()):
                    statuses[name][st] = statuses[name].get(st, 0) + c
                errors[name] += res.errors + lat.errors
                print(f"  round {rnd + 1} {name:<18} {res.done / res.elapsed:8.0f} req/s", flush=True)
        for base, name in PAIRS:
            if base not in ports or name not in ports:
                continue
            for rnd in range(args.paired if PROXY_CPUS else 0):
                # Two cases under load at the same time, on the one proxy CPU: the scheduler gives them equal
                # CPU time, so the req/s ratio is their cost ratio, and minute-to-minute drift hits both.
                async def both(names=(base, name)) -> list[Result]:
                    return await asyncio.gather(*(drive(ports[n], wires[n], args.concurrency, args.duration, 10**7) for n in names))

                a, b = asyncio.run(both())
                if a.done:
                    paired.setdefault(name, []).append(b.done / a.done)
                    print(f"  paired round {rnd + 1}: {base} {a.done / a.elapsed:.0f} req/s, {name} {b.done / b.elapsed:.0f} "
                          f"req/s at the same time ({paired[name][-1]:.1%})", flush=True)
        for rnd in range(LLM_EXTRA_ROUNDS if LLM_CASE in ports else 0):
            for name in ("openflare", LLM_CASE)[:: 1 if rnd % 2 == 0 else -1]:
                lat = asyncio.run(drive(ports[name], wires[name], 1, 60.0, 400))
                llm_lat[name] += list(zip(lat.latencies, lat.indices, strict=True))
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)  # process logs: a failed start already printed its own
        asyncio.run(forget_bans(BENCH_REDIS, BENCH_PREFIX))
    bench_s = time.perf_counter() - t_start

    print("micro-benchmark: fields + LocalModel.score, in-process, per request over the mix ...", flush=True)
    micro_res = micro(mix, str(model_path), repeat=2)
    print("size sweep: fields + score of one cold request per kind and size ...", flush=True)
    sweep = size_sweep(str(model_path))

    base_rps = statistics.median(r.done / r.elapsed for r in results[BASELINE])
    base_lat = latencies[BASELINE]
    print()
    print(f"Throughput: median of {args.rounds} rounds, {args.concurrency} keep-alive connections. "
          f"Latency: {args.latency_requests * args.rounds} sequential requests per case.")
    hdr = (f"{'case':<18} {'req/s':>8} {'vs plain':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
           f"{'cpu ms':>7} {'2xx':>7} {'403':>7} {'other':>6} {'errors':>6}")
    print(hdr)
    print("-" * len(hdr))
    for case in CASES:
        name = case.name
        rps = statistics.median(r.done / r.elapsed for r in results[name])
        lat = latencies[name]
        p50, p99 = pct(lat, 50) * 1000, pct(lat, 99) * 1000
        st = statuses[name]
        ok = sum(c for s, c in st.items() if 200 <= s < 300)
        blocked = st.get(403, 0)
        other = sum(st.values()) - ok - blocked
        added = "" if name == BASELINE or case.scripts is None else (
            f"{p50 - pct(base_lat, 50) * 1000:>+8.2f} {p99 - pct(base_lat, 99) * 1000:>+8.2f}")
        cpu = f"{statistics.median(cpu_ms[name]):>7.2f}" if cpu_ms[name] else f"{'—':>7}"
        print(f"{name:<18} {rps:>8.0f} {rps / base_rps:>8.1%} {p50:>8.2f} {p99:>8.2f} {added:>17} "
              f"{cpu} {ok:>7} {blocked:>7} {other:>6} {errors[name]:>6}")
    print("cpu ms: CPU time of the case's mitmdump per request during the load phase (median of rounds; it is "
          "less sensitive than req/s to what else the machine runs)")
    print()
    print(f"Per request, in-process ({len(micro_res['score'])} samples, model {model_path.name}):")
    print(f"{'step':<18} {'p50 µs':>8} {'p99 µs':>8} {'mean µs':>8}")
    score_errors = micro_res.pop("score errors", [])
    for step, values in micro_res.items():
        print(f"{step:<18} {pct(values, 50):>8.0f} {pct(values, 99):>8.0f} {statistics.fmean(values):>8.0f}")
    if score_errors:
        print(f"WARNING: the model raised on {len(score_errors)} of {len(mix) * 2} requests "
              f"(in mitmdump: the fail policy), e.g. {score_errors[0]}")
    p99 = pct(micro_res["fields+score"], 99)
    small = [v for v, r in zip(micro_res["fields+score"], [r for _ in range(2) for r in mix], strict=False)
             if len(r.target) + len(r.body) <= 16 << 10]
    print()
    print("Size sweep (in-process, cold: every value new to the field cache):")
    print(f"{'kind':<10} {'bytes':>9} {'fields':>7} {'ms':>9} {'µs/KB':>7}")
    for kind, n, nf, ms, per_kb in sweep:
        print(f"{kind:<10} {n:>9} {nf if nf >= 0 else 'refused':>7} {ms:>9.2f} {per_kb:>7.1f}")
    print()
    if cpu_ms.get(BASELINE) and cpu_ms.get("openflare"):
        c_base, c_of = statistics.median(cpu_ms[BASELINE]), statistics.median(cpu_ms["openflare"])
        print(f"mitmdump CPU per request: plain {c_base:.2f} ms, openflare {c_of:.2f} ms (+{c_of - c_base:.2f} ms; "
              f"plain/openflare {c_base / c_of:.1%}, the throughput ratio a CPU-bound mitmdump would reach)")
    for base, name in PAIRS:
        if name in paired:
            print(f"paired rounds ({base} and {name} loaded at the same time on CPU {min(PROXY_CPUS)}): {name}/{base} "
                  f"median {statistics.median(paired[name]):.1%} (rounds: {', '.join(f'{x:.1%}' for x in paired[name])})")

    def judged_ratio(name: str, base: str) -> tuple[float, str]:
        """Paired median when there are paired rounds (sequential rounds drift by 10 points or more here)."""
        if paired.get(name):
            return statistics.median(paired[name]), "paired median"
        rps = {n: statistics.median(r.done / r.elapsed for r in results[n]) for n in (name, base)}
        return rps[name] / rps[base], "sequential rounds"

    judged, how = judged_ratio("openflare", BASELINE)
    print(f"targets: openflare >= 90 % of plain throughput: {judged:.1%}, {how} ({'met' if judged >= 0.9 else 'NOT met'}); "
          f"fields+score p99 <= 1000 µs: {p99:.0f} µs ({'met' if p99 <= 1000 else 'NOT met'}); requests <= 16 KB: "
          f"p99 {pct(small, 99):.0f} µs")
    if "openflare+bans" in results:
        r_bans, how = judged_ratio("openflare+bans", "openflare")
        added = (pct(latencies["openflare+bans"], 99) - pct(latencies["openflare"], 99)) * 1000
        check = pct(micro_res["ban check"], 99)
        print(f"targets: openflare+bans >= 97 % of openflare throughput: {r_bans:.1%}, {how} "
              f"({'met' if r_bans >= 0.97 else 'NOT met'}); ban check p99 <= 200 µs: {check:.1f} µs "
              f"({'met' if check <= 200 else 'NOT met'}); end-to-end p99 added over openflare: {added:+.2f} ms")
    if RECORDER_CASE in results:
        r_rec, how = judged_ratio(RECORDER_CASE, "openflare")
        print(f"targets: openflare+recorder >= 95 % of openflare throughput: {r_rec:.1%}, {how} "
              f"({'met' if r_rec >= 0.95 else 'NOT met'}); the burst check: scripts/bench_recorder.py")
        shutil.rmtree(RECORD_DIR, ignore_errors=True)
    if LLM_CASE in results:
        llm_report(mix, model_path, args.data, {n: list(zip(latencies[n], lat_index[n], strict=True)) + llm_lat[n] for n in llm_lat}, results)
    print(f"proxy phase {bench_s:.0f} s, total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
