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
# What `make run` loads: every addon as one script (addons/openflare.py), with the shipped mitm.conf.
BUNDLE = "addons/openflare.py"
FEATURES = "addons/features.py"
SCORER = "addons/scorer.py"
BANS = "addons/bans.py"
RECORDER = "addons/recorder.py"
# The Redis bans case: the shared Redis (OPENFLARE_BENCH_REDIS), its own key prefix, BENCH_BANS bans of other IPs
# present. Its client is never banned: strikes expire after 1 s, 1000 are needed, and the rate limit is out of
# reach; every attack still costs a strike in Redis. Keys are deleted at the end.
BENCH_REDIS = os.environ.get("OPENFLARE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
BENCH_PREFIX = f"openflare-bench-{os.getpid()}:"
BENCH_BANS = 10_000
RECORD_DIR = Path(tempfile.gettempdir()) / f"openflare-bench-{os.getpid()}-records"

# Who sends each request. The load generator stands for many clients behind a load balancer at 127.0.0.1
# (openflare_trusted_proxies: [127.0.0.1] in the bench's copy of mitm.conf, and an X-Forwarded-For per request):
# a benign request of the mix always comes from its own address (one client per request of the mix: a false
# positive bans only that client), and every attack sent comes from an address not seen before, so each one is
# scored, refused and struck, none refused early by a ban from an earlier round. "one-ip": every request from
# one address (the banned-client case).
CLIENTS_PER_REQUEST = "per-request"
CLIENTS_ONE = "one-ip"


@dataclass
class Case:
    """One mitmdump configuration. `scripts` None means no proxy at all (the upstream, directly).

    `mix`: "all" (the mix, with its attack share) or "benign" (its benign requests only)."""

    name: str
    scripts: list[str] | None
    options: dict[str, object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    mix: str = "all"
    clients: str = CLIENTS_PER_REQUEST
    pid: int | None = None  # the running mitmdump


BASELINE = "plain"
OPENFLARE = "openflare"  # the bundle `make run` loads: the case the headline ratio is judged on
BENIGN_CASE = "openflare benign-only"
NO_BANS = "openflare without bans"
FS = "features+scorer"
FS_BANS = "features+scorer+bans(redis)"
BANNED = "banned client"
LLM_CASE = "features+scorer+llm"
RECORDER_CASE = "features+scorer+recorder"
# No Redis and no MongoDB for the bundle cases: the shipped defaults (the in-process ban store, the embedded
# record store in a temporary directory).
NO_SERVERS = {"OPENFLARE_REDIS_URL": "", "OPENFLARE_MONGO_URI": ""}
CASES = [
    Case("direct (no proxy)", None),
    Case(BASELINE, []),
    Case(OPENFLARE, [BUNDLE], env=NO_SERVERS),
    Case(BENIGN_CASE, [BUNDLE], env=NO_SERVERS, mix="benign"),
    Case(NO_BANS, [BUNDLE, "-" + BANS], env=NO_SERVERS),
    Case(FS, [FEATURES, SCORER]),
    Case(FS_BANS, [FEATURES, BANS, SCORER],
         {"openflare_strikes": 1000, "openflare_strike_window": 1, "openflare_rate_limit": 1_000_000,
          "openflare_redis_prefix": BENCH_PREFIX}, {"OPENFLARE_REDIS_URL": BENCH_REDIS}),
    # The refusal path: the first attack bans the one client (the bundle, in-process store), then every request gets 403.
    Case(BANNED, [BUNDLE], {"openflare_strikes": 1, "openflare_rate_limit": 0}, NO_SERVERS, clients=CLIENTS_ONE),
    # The LLM second opinion: tests/llm_server.py answering after LLM_DELAY_MS, cache off so every in-band
    # request waits for it; caps out of reach. The base URL is set once the server runs.
    Case(LLM_CASE, [FEATURES, SCORER],
         {"openflare_llm_model": "bench", "openflare_llm_cache_seconds": 0, "openflare_llm_per_minute": 1_000_000,
          "openflare_llm_ip_per_minute": 1_000_000, "openflare_llm_max_inflight": 256}),
    # The recorder alone on the embedded store (a fresh temporary directory, removed at the end), against features+scorer.
    # The 10,000-request burst check (count + hash chain) is scripts/bench_recorder.py (`make bench` runs it).
    Case(RECORDER_CASE, [FEATURES, SCORER, RECORDER], env={"OPENFLARE_MONGO_URI": ""}),
]  # fmt: skip
LLM_DELAY_MS = 500
LLM_BAND_REQUESTS = 100  # sequential requests per round of the LLM case drawn from the mix's requests in the band
LLM_EXTRA_ROUNDS = 4  # extra interleaved sequential rounds of features+scorer vs +llm, for a steadier p99
# Paired rounds: (baseline, case) loaded at the same time on the proxy CPU; their targets are judged on these.
PAIRS = [(BASELINE, OPENFLARE), (BASELINE, BENIGN_CASE), (NO_BANS, OPENFLARE), (BASELINE, FS), (FS, FS_BANS),
         (FS, RECORDER_CASE)]

# With --builtin-mix (a smoke run without the shared data): (label, method, target, headers, body).
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

HOP_HEADERS = {"host", "connection", "keep-alive", "proxy-connection", "content-length", "transfer-encoding", "te", "upgrade", "expect",
               "forwarded", "x-forwarded-for", "x-real-ip"}  # the bench writes its own X-Forwarded-For (CLIENTS_*)


@dataclass
class Req:
    label: str
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def wire(self, host: str) -> tuple[bytes, bytes]:
        """The request on the wire, split where the X-Forwarded-For header goes: head + header + rest."""
        lines = [f"{self.method} {self.target} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in HOP_HEADERS and "\r" not in v and "\n" not in v]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace"), b"\r\n\r\n" + self.body


def ip4(n: int, first: int) -> bytes:
    return f"{first}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}".encode()


class Wires:
    """What the client sends for request i of a mix (CLIENTS_*): bytes, an X-Forwarded-For per request."""

    _attacks = iter(range(1, 1 << 62))  # every attack sent, in every case and round: a new address

    def __init__(self, mix: list[Req], host: str, clients: str = CLIENTS_PER_REQUEST, attackers: int = 0) -> None:
        self.parts = [r.wire(host) for r in mix]
        self.attack = [r.label == "attack" for r in mix]
        self.clients = clients
        self.attackers = attackers  # > 0: attacks come from this many addresses in turn (scripts/soak.py), not new ones

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> bytes:
        head, rest = self.parts[i]
        if self.clients == CLIENTS_ONE:
            ip = b"198.51.100.7"
        elif self.attack[i]:
            n = next(self._attacks)
            if self.attackers:
                n = 1 + n % self.attackers
            ip = ip4(n & 0xFFFFFF, 11 + (n >> 24) % 100)  # 11.0.0.1 ... : 16.7 M addresses per first octet
        else:
            ip = ip4(i, 172)  # request i of the mix: 172.0.0.i (the Redis case seeds bans of 10.0.0.0-10.0.39.15)
        return head + b"X-Forwarded-For: " + ip + rest


def load_mix(data: str | None, n: int, attack_share: float, seed: int, builtin: bool = False) -> tuple[list[Req], str]:
    """`n` requests from the datasets' test splits (`attack_share` of them attacks); the built-in mix only
    when asked for (`--builtin-mix`). No dataset: DatasetError."""
    if builtin:
        return [Req(*r) for r in BUILTIN_MIX] * max(1, n // len(BUILTIN_MIX)), f"the built-in mix of {len(BUILTIN_MIX)} requests"
    files = dataset.parse_data_arg(data)
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
        raise dataset.DatasetError(f"no test-split request in {', '.join(map(str, files))}")
    rnd.shuffle(mix)
    return mix, ", ".join(p.name for p in files) + " (test splits)"


# --- processes ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 120, log: Path | None = None) -> None:
    """Until something listens on the port; an error if the process exits first (with its log's tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = f":\n{log.read_text(errors='replace')[-3000:]}" if log is not None and log.exists() else ""
            raise RuntimeError(f"process exited with code {proc.returncode}{tail}")
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
    addon module's addon classes, fresh instances, in the listed order, served by `common.bundle`.
    [BUNDLE, "-addons/x.py"]: the bundle's own instances (addons/openflare.py's BUNDLED) but x's."""
    names = [Path(s).stem for s in case.scripts or []]
    path = workdir / ("case_" + "".join(c if c.isalnum() else "_" for c in case.name) + ".py")
    if case.scripts and case.scripts[0] == BUNDLE:
        left_out = [Path(s[1:]).stem for s in case.scripts[1:]]
        path.write_text(
            "import importlib\n\nfrom addons import common\nfrom addons import openflare\n\n"
            f"OUT = tuple(type(a) for name in {left_out!r} for a in importlib.import_module('addons.' + name).addons)\n"
            "BUNDLED = [a for a in openflare.BUNDLED if not isinstance(a, OUT)]\n"
            "globals().update(common.bundle(*BUNDLED))\n"
        )
        return path
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
    if case.scripts == [BUNDLE]:
        args += ["-s", str(REPO / BUNDLE)]  # exactly what `make run` loads
    elif case.scripts:
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
    codes: list[int] = field(default_factory=list)  # its status, per latency
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


async def drive(port: int, wires: Wires, concurrency: int, duration: float, max_requests: int, first: int = 0,
                order: list[int] | None = None) -> Result:  # fmt: skip
    """Send requests round-robin from `wires` (from request `first` on, or the mix indices in `order`) over
    `concurrency` keep-alive connections, for at most `duration` seconds or `max_requests` requests."""
    res = Result()
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + duration
    order = order or range(len(wires))

    async def worker() -> None:
        reader = writer = None
        for i in counter:
            if time.perf_counter() > deadline:
                break
            index = order[(first + i) % len(order)]
            wire = wires[index]
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
                t = time.perf_counter()
                writer.write(wire)
                status, keep = await asyncio.wait_for(read_response(reader), 30)
                res.latencies.append(time.perf_counter() - t)
                res.indices.append(index)
                res.codes.append(status)
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


def llm_report(mix, band: list[bool], data, lm, samples: dict[str, list[tuple[float, int]]], in_band: list[float], results) -> None:
    """The LLM case against features+scorer: p99 of requests outside the band, the in-band requests'
    latency (sampled from the mix's requests in the band), and who reaches the LLM."""
    low, high = llm.OPTION_DEFAULTS["openflare_llm_band_low"], llm.OPTION_DEFAULTS["openflare_llm_band_high"]
    out = {n: [t for t, i in samples[n] if not band[i]] for n in (FS, LLM_CASE)}
    p_off, p_on = pct(out[FS], 99) * 1000, pct(out[LLM_CASE], 99) * 1000
    rps = {n: statistics.median(r.done / r.elapsed for r in results[n]) for n in (FS, LLM_CASE)}
    print(f"LLM case (test server answering in {LLM_DELAY_MS} ms, band {low}-{high}, cache off): "
          f"{sum(band)} of {len(mix)} mix requests in the band; throughput {rps[LLM_CASE] / rps[FS]:.1%} of {FS}")
    inb = (f"p50 {pct(in_band, 50) * 1000:.0f} ms, p99 {pct(in_band, 99) * 1000:.0f} ms ({len(in_band)} samples of the "
           f"{sum(band)} in-band requests, 8 at a time)") if in_band else "no request of the mix is in the band"
    print(f"  outside the band: p99 {p_on:.2f} ms with the LLM vs {p_off:.2f} ms without "
          f"({len(out[LLM_CASE])} / {len(out[FS])} samples); in the band: {inb}")
    try:
        benign = [r for path in dataset.parse_data_arg(data) for r in dataset.read(path) if r.split == "test" and not r.attack]
    except dataset.DatasetError:
        benign = [r for r in mix if r.label == "benign"]  # the built-in mix
    def in_band_score(r) -> bool:
        try:
            return low <= lm.score_request(r.method, r.target, r.headers, r.body)[0] <= high
        except Exception:  # noqa: BLE001
            return False
    share = sum(map(in_band_score, benign)) / max(1, len(benign))
    print(f"LLM: outside-band p99 within 10 % of LLM off: {p_on / p_off - 1:+.1%} ({'met' if p_on <= 1.1 * p_off else 'NOT met'}); "
          f"benign test requests reaching the LLM <= 1 %: {share:.2%} of {len(benign)} ({'met' if share <= 0.01 else 'NOT met'})")


# --- the size sweep through the proxy ---

PROXY_SWEEP_SIZES = (100, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20)


def proxy_sweep(ports: dict[str, int], pids: dict[str, int | None], names: tuple[str, str], rounds: int = 2) -> list[tuple]:
    """(kind, bytes, added CPU ms per request, status of the second case) through two running mitmdumps:
    fresh benign requests of each kind and size (every value new), the same ones through each, interleaved
    `rounds` times; mitmdump CPU time per request of the second case minus the first's."""
    rng = random.Random(7)
    rows = []
    for kind in ("query", "form", "json", "multipart"):
        for size in PROXY_SWEEP_SIZES:
            if kind == "query" and size > 32 << 10:
                continue  # a request line beyond ~32-64 KB: mitmproxy and real servers refuse it anyway
            n = max(2, min(200, (1 << 20) // size))  # bounded bytes per size: the large ones cost seconds each
            reqs = [Req("benign", *sweep_request(kind, size, rng)) for _ in range(n)]
            wires = {name: Wires(reqs, f"127.0.0.1:{ports[name]}") for name in names}
            cpu = {name: [] for name in names}
            codes: dict[int, int] = {}
            for r in range(rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    c0 = cpu_seconds(pids[name])
                    res = asyncio.run(drive(ports[name], wires[name], 2, 120.0, n))
                    c1 = cpu_seconds(pids[name])
                    if c0 is not None and c1 is not None and res.done:
                        cpu[name].append((c1 - c0) / res.done * 1000)
                    if name == names[1]:
                        for st, c in res.statuses.items():
                            codes[st] = codes.get(st, 0) + c
            if all(cpu.values()):
                base, case = statistics.median(cpu[names[0]]), statistics.median(cpu[names[1]])
                nbytes = statistics.mean(len(r.target) + len(r.body) for r in reqs)
                rows.append((kind, int(nbytes), base, case - base, "/".join(f"{c}x{st}" for st, c in sorted(codes.items()))))
    return rows


def in_llm_band(lm, mix: list[Req], host: str, low: int, high: int) -> list[bool]:
    """Whether each request of the mix scores low..high locally with the headers the proxy sees (Host, the
    bench's X-Forwarded-For): the requests the LLM case asks its LLM about."""
    out = []
    for i, r in enumerate(mix):
        ip = "11.0.0.1" if r.label == "attack" else ip4(i, 172).decode()
        headers = [("Host", host)] + [(k, v) for k, v in r.headers if k.lower() not in HOP_HEADERS] + [("X-Forwarded-For", ip)]
        try:
            out.append(low <= lm.score_request(r.method, r.target, headers, r.body)[0] <= high)
        except Exception:  # noqa: BLE001 - mitmdump applies the fail policy: no LLM
            out.append(False)
    return out


def latency_split(samples: dict[str, Result], case: str, base: str) -> dict[str, tuple[float, int]]:
    """Median added latency (ms) over `base` for the same requests, of those `case` refused (403/429) and
    those it forwarded (2xx): (ms, samples)."""
    by_index: dict[int, list[float]] = {}
    for t, i in zip(samples[base].latencies, samples[base].indices, strict=True):
        by_index.setdefault(i, []).append(t)
    out: dict[str, list[float]] = {"refused": [], "forwarded": []}
    for t, i, code in zip(samples[case].latencies, samples[case].indices, samples[case].codes, strict=True):
        if i in by_index:
            kind = "refused" if code in (403, 429) else "forwarded" if 200 <= code < 300 else None
            if kind:
                out[kind].append(t - statistics.median(by_index[i]))
    return {k: (statistics.median(v) * 1000 if v else float("nan"), len(v)) for k, v in out.items()}


# --- main ---


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark mitmdump with and without the OpenFlare addons.")
    ap.add_argument("--data", help="comma-separated JSONL files (default: every file in the shared datasets)")
    ap.add_argument("--builtin-mix", action="store_true", help="a smoke run on the built-in mix of 10 requests "
                    "(figures from it say nothing about real traffic); without it, no dataset stops the bench")
    ap.add_argument("--requests", type=int, default=2000, help="size of the request mix (default 2000)")
    ap.add_argument("--attack-share", type=float, default=0.3, help="share of attacks in the mix (default 0.3)")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds of load per case per round (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all cases (default 3)")
    ap.add_argument("--concurrency", type=int, default=16, help="connections in the load phase (default 16)")
    ap.add_argument("--latency-requests", type=int, default=200, help="sequential requests per case per round, "
                    "a different slice of the mix each round (default 200)")
    ap.add_argument("--model", default=model.DEFAULT_MODEL, help="the model (name in models/ or path) for every case and the micro-benchmark")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--paired", type=int, default=8, help="rounds per pair in PAIRS (plain with openflare, ...) loaded at "
                    "the same time on the proxy CPU (default 8; 0: none; needs pinning)")
    ap.add_argument("--no-pin", action="store_true", help="let the scheduler place the processes (default: every mitmdump "
                    "on the last CPU, the load generator and upstream on the others)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the size sweep through the proxy")
    ap.add_argument("--cases", help="comma-separated case names to run (plain and openflare always run; default: all)")
    args = ap.parse_args(argv)
    for name, low in (("requests", 1), ("rounds", 1), ("concurrency", 1), ("latency_requests", 0), ("paired", 0)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be at least {low}")
    if args.duration <= 0 or not 0 <= args.attack_share <= 1:
        ap.error("--duration must be > 0 and --attack-share between 0 and 1")
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",") if c.strip()} | {BASELINE, OPENFLARE}
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

    try:
        mix, source = load_mix(args.data, args.requests, args.attack_share, args.seed, args.builtin_mix)
    except dataset.DatasetError as e:
        print(f"bench: {e}\nbench: the figures need the shared datasets' test splits (--data FILES to name them); "
              "`--builtin-mix` runs a smoke test on 10 built-in requests instead", file=sys.stderr)
        return 2
    benign_mix = [r for r in mix if r.label == "benign"] or mix
    mixes = {"all": mix, "benign": benign_mix}
    n_attack = sum(r.label == "attack" for r in mix)
    print(f"mix: {len(mix)} requests ({n_attack} attacks, {len(mix) - n_attack} benign) from {source}")
    lm = model.load(str(model_path))
    low, high = llm.OPTION_DEFAULTS["openflare_llm_band_low"], llm.OPTION_DEFAULTS["openflare_llm_band_high"]
    band: list[bool] = [False] * len(mix)  # which requests of the mix the LLM case asks the LLM about
    band_idx: list[int] = []

    work = Path(tempfile.mkdtemp(prefix="openflare-bench-"))
    confdir = work / "confdir"
    confdir.mkdir()
    conf = (REPO / "mitm.conf").read_text().splitlines()
    own = ("openflare_model:", "openflare_ban_socket:", "openflare_trusted_proxies:")
    conf = [line for line in conf if not line.startswith(own)]
    # The shipped mitm.conf plus: the bench's model; no embedded ban store shared through the repo's
    # data/bans.sock (a running `make run` would otherwise own it, and the bench's strikes would ban there);
    # the load generator as a load balancer in front (CLIENTS_PER_REQUEST). Record stores: per case, below.
    conf += [f"openflare_model: {json.dumps(str(model_path))}", 'openflare_ban_socket: ""', 'openflare_trusted_proxies: ["127.0.0.1"]']
    for case in CASES:
        if case.scripts and (BUNDLE in case.scripts or RECORDER in case.scripts):
            tag = "".join(c if c.isalnum() else "_" for c in case.name)
            case.options.update({"openflare_record_dir": str(RECORD_DIR / tag / "store"),
                                 "openflare_record_spill": str(RECORD_DIR / tag / "spill.jsonl"), "openflare_instance": "bench"})  # fmt: skip
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
    try:
        print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[2]:.2f} (15 min) on {os.cpu_count()} CPUs before the run")
    except OSError:
        pass
    procs = Procs(work)
    by_name = {c.name: c for c in CASES}
    results: dict[str, list[Result]] = {c.name: [] for c in CASES}
    seq: dict[str, Result] = {c.name: Result() for c in CASES}  # the sequential phase's samples
    llm_lat: dict[str, list[tuple[float, int]]] = {FS: [], LLM_CASE: []}
    in_band: list[float] = []
    statuses: dict[str, dict[int, int]] = {c.name: {} for c in CASES}
    errors: dict[str, int] = {c.name: 0 for c in CASES}
    cpu_ms: dict[str, list[float]] = {c.name: [] for c in CASES}  # mitmdump CPU ms per request, load phase
    paired: dict[tuple[str, str], list[float]] = {}  # (base, case) -> case's requests / base's, per paired round
    sweep_rows: list[tuple] = []
    t_start = time.perf_counter()
    try:
        if any(BANS in (c.scripts or []) and c.env.get("OPENFLARE_REDIS_URL") for c in CASES):
            seeded = asyncio.run(seed_bans(BENCH_REDIS, BENCH_PREFIX, BENCH_BANS))
            print(f"{FS_BANS}: {BENCH_BANS} bans present in Redis under {BENCH_PREFIX}" if seeded else
                  f"{FS_BANS}: Redis at {BENCH_REDIS} unreachable: that case runs without Redis (fail-open)")
        up_port = free_port()
        procs.start("upstream", [sys.executable, str(REPO / "scripts" / "upstream.py"), "--port", str(up_port)], up_port)
        if LLM_CASE in by_name:
            llm_port = free_port()
            procs.start("llm-server", [sys.executable, str(REPO / "tests" / "llm_server.py"), "--port", str(llm_port),
                                       "--mode", "ok", "--delay-ms", str(LLM_DELAY_MS)], llm_port)  # fmt: skip
            by_name[LLM_CASE].options["openflare_llm_base_url"] = f"http://127.0.0.1:{llm_port}/v1"
        ports = {}
        for case in CASES:
            ports[case.name] = start_case(procs, case, up_port, confdir)
        wait_idle([c.pid for c in CASES])
        if LLM_CASE in ports:  # scored as that mitmdump sees each request: its Host and X-Forwarded-For too
            band[:] = in_llm_band(lm, mix, f"127.0.0.1:{ports[LLM_CASE]}", low, high)
            band_idx[:] = [i for i, b in enumerate(band) if b]
        print(f"started {len(CASES) - 1} mitmdump(s) in {time.perf_counter() - t_start:.1f} s; "
              f"{args.rounds} rounds x {args.duration:g} s load (concurrency {args.concurrency}) "
              f"+ {args.latency_requests} sequential requests per case")
        wire_cache: dict[tuple[str, str], Wires] = {}

        def wires(name: str, mixname: str | None = None) -> Wires:
            case = by_name[name]
            key = (name, mixname or case.mix)
            if key not in wire_cache:
                wire_cache[key] = Wires(mixes[key[1]], f"127.0.0.1:{ports[name]}", case.clients)
            return wire_cache[key]

        for rnd in range(args.rounds):
            for case in CASES if rnd % 2 == 0 else list(reversed(CASES)):
                name = case.name
                asyncio.run(drive(ports[name], wires(name), args.concurrency, 1.0, 500))  # warm-up
                cpu0 = cpu_seconds(case.pid)
                res = asyncio.run(drive(ports[name], wires(name), args.concurrency, args.duration, 10**7))
                cpu1 = cpu_seconds(case.pid)
                if cpu0 is not None and cpu1 is not None and res.done:
                    cpu_ms[name].append((cpu1 - cpu0) / res.done * 1000)
                results[name].append(res)
                # A different slice of the mix each round, the same slice for every case in the round.
                lat = asyncio.run(drive(ports[name], wires(name), 1, 30.0, args.latency_requests, first=rnd * args.latency_requests))
                for attr in ("latencies", "indices", "codes"):
                    getattr(seq[name], attr).extend(getattr(lat, attr))
                for st, c in list(res.statuses.items()) + list(lat.statuses.items()):
                    statuses[name][st] = statuses[name].get(st, 0) + c
                errors[name] += res.errors + lat.errors
                print(f"  round {rnd + 1} {name:<28} {res.done / res.elapsed:8.0f} req/s", flush=True)
        for base, name in PAIRS:
            if base not in ports or name not in ports:
                continue
            mixname = by_name[name].mix
            for rnd in range(args.paired if PROXY_CPUS else 0):
                # Two cases under load at the same time, on the one proxy CPU: the scheduler gives them equal
                # CPU time, so the req/s ratio is their cost ratio, and minute-to-minute drift hits both.
                async def both(names=(base, name)) -> list[Result]:
                    return await asyncio.gather(*(drive(ports[n], wires(n, mixname), args.concurrency, args.duration, 10**7) for n in names))

                a, b = asyncio.run(both())
                if a.done:
                    paired.setdefault((base, name), []).append(b.done / a.done)
                    print(f"  paired round {rnd + 1}: {base} {a.done / a.elapsed:.0f} req/s, {name} {b.done / b.elapsed:.0f} "
                          f"req/s at the same time ({paired[(base, name)][-1]:.1%})", flush=True)
        if LLM_CASE in ports and FS in ports:
            for rnd in range(LLM_EXTRA_ROUNDS):
                for name in (FS, LLM_CASE)[:: 1 if rnd % 2 == 0 else -1]:
                    lat = asyncio.run(drive(ports[name], wires(name), 1, 60.0, 400, first=(args.rounds + rnd) * 400))
                    llm_lat[name] += list(zip(lat.latencies, lat.indices, strict=True))
            if band_idx:  # the requests the LLM is asked about, 8 at a time (each waits LLM_DELAY_MS)
                lat = asyncio.run(drive(ports[LLM_CASE], wires(LLM_CASE), 8, 120.0, LLM_BAND_REQUESTS, order=band_idx))
                in_band = lat.latencies
        if not args.no_sweep and PROXY_CPUS:
            print("size sweep through the proxy: plain and openflare, fresh requests of each kind and size ...", flush=True)
            sweep_rows = proxy_sweep(ports, {c.name: c.pid for c in CASES}, (BASELINE, OPENFLARE))
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)  # process logs: a failed start already printed its own
        shutil.rmtree(RECORD_DIR, ignore_errors=True)
        asyncio.run(forget_bans(BENCH_REDIS, BENCH_PREFIX))
    bench_s = time.perf_counter() - t_start

    print("micro-benchmark: fields + LocalModel.score, in-process, per request over the mix ...", flush=True)
    micro_res = micro(mix, str(model_path), repeat=2)
    print("size sweep: fields + score of one cold request per kind and size, in-process ...", flush=True)
    sweep = size_sweep(str(model_path))

    base_rps = statistics.median(r.done / r.elapsed for r in results[BASELINE])
    base_lat = seq[BASELINE].latencies
    print()
    print(f"Throughput: median of {args.rounds} rounds, {args.concurrency} keep-alive connections. "
          f"Latency: {args.latency_requests * args.rounds} sequential requests per case.")
    print(f"Cases: {OPENFLARE} = `make run` (addons/openflare.py, every addon, mitm.conf); {BENIGN_CASE} = the same on "
          f"the mix's benign requests; {NO_BANS} = the same addons without bans; {FS} = features + scorer alone; "
          "the others add one addon to features+scorer.")
    hdr = (f"{'case':<28} {'req/s':>8} {'vs plain':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
           f"{'cpu ms':>7} {'2xx':>7} {'403':>7} {'other':>6} {'errors':>6}")
    print(hdr)
    print("-" * len(hdr))
    for case in CASES:
        name = case.name
        rps = statistics.median(r.done / r.elapsed for r in results[name])
        lat = seq[name].latencies
        p50, p99 = pct(lat, 50) * 1000, pct(lat, 99) * 1000
        st = statuses[name]
        ok = sum(c for s, c in st.items() if 200 <= s < 300)
        blocked = st.get(403, 0)
        other = sum(st.values()) - ok - blocked
        added = "" if name == BASELINE or case.scripts is None else (
            f"{p50 - pct(base_lat, 50) * 1000:>+8.2f} {p99 - pct(base_lat, 99) * 1000:>+8.2f}")
        cpu = f"{statistics.median(cpu_ms[name]):>7.2f}" if cpu_ms[name] else f"{'—':>7}"
        print(f"{name:<28} {rps:>8.0f} {rps / base_rps:>8.1%} {p50:>8.2f} {p99:>8.2f} {added:>17} "
              f"{cpu} {ok:>7} {blocked:>7} {other:>6} {errors[name]:>6}")
    print("cpu ms: CPU time of the case's mitmdump per request during the load phase (median of rounds; it is "
          f"less sensitive than req/s to what else the machine runs). {BENIGN_CASE}: latency against plain on the full mix.")
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
    print()
    print("Size sweep (in-process, cold: every value new to the field cache):")
    print(f"{'kind':<10} {'bytes':>9} {'fields':>7} {'ms':>9} {'µs/KB':>7}")
    for kind, n, nf, ms, per_kb in sweep:
        print(f"{kind:<10} {n:>9} {nf if nf >= 0 else 'refused':>7} {ms:>9.2f} {per_kb:>7.1f}")
    worst_small = None
    if sweep_rows:
        print()
        print(f"Size sweep through the proxy ({OPENFLARE} against plain; fresh requests, the same through both, "
              "2 interleaved rounds): mitmdump CPU per request")
        print(f"{'kind':<10} {'bytes':>9} {'plain ms':>9} {'added ms':>9} {'added µs/KB':>11}  statuses")
        for kind, n, base, added, codes in sweep_rows:
            print(f"{kind:<10} {n:>9} {base:>9.3f} {added:>+9.3f} {added * 1000 / (n / 1024):>11.1f}  {codes}")
        small = [added for _, n, _, added, _ in sweep_rows if n <= 17 << 10]
        worst_small = max(small) if small else None
    print()
    if cpu_ms.get(BASELINE) and cpu_ms.get(OPENFLARE):
        c_base, c_of = statistics.median(cpu_ms[BASELINE]), statistics.median(cpu_ms[OPENFLARE])
        print(f"mitmdump CPU per request: plain {c_base:.2f} ms, openflare {c_of:.2f} ms (+{c_of - c_base:.2f} ms; "
              f"plain/openflare {c_base / c_of:.1%}, the throughput ratio a CPU-bound mitmdump would reach)")
    for (base, name), values in paired.items():
        print(f"paired rounds ({base} and {name} loaded at the same time on CPU {min(PROXY_CPUS)}): {name}/{base} "
              f"median {statistics.median(values):.1%} (rounds: {', '.join(f'{x:.1%}' for x in values)})")

    def judged_ratio(name: str, base: str) -> tuple[float, str]:
        """Paired median when there are paired rounds (sequential rounds drift by 10 points or more here)."""
        if paired.get((base, name)):
            return statistics.median(paired[(base, name)]), "paired median"
        rps = {n: statistics.median(r.done / r.elapsed for r in results[n]) for n in (name, base) if results.get(n)}
        return (rps[name] / rps[base], "sequential rounds") if len(rps) == 2 else (float("nan"), "not run")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print()
    judged, how = judged_ratio(OPENFLARE, BASELINE)
    print(f"target: {OPENFLARE} (the whole bundle, {args.attack_share:.0%} attacks) >= 90 % of plain: {judged:.1%}, {how} ({verdict(judged >= 0.9)})")
    if BENIGN_CASE in results:
        r, how = judged_ratio(BENIGN_CASE, BASELINE)
        print(f"target: {BENIGN_CASE} >= 95 % of plain: {r:.1%}, {how} ({verdict(r >= 0.95)})")
    if NO_BANS in results:
        r, how = judged_ratio(OPENFLARE, NO_BANS)
        print(f"target: {OPENFLARE} >= 97 % of {NO_BANS} (what bans cost): {r:.1%}, {how} ({verdict(r >= 0.97)})")
    split_lat = latency_split(seq, OPENFLARE, BASELINE)
    (ref, n_ref), (fwd, n_fwd) = split_lat["refused"], split_lat["forwarded"]
    print(f"target: refused requests' added latency <= forwarded ones' ({OPENFLARE} over plain, the same requests, "
          f"median): refused {ref:+.3f} ms ({n_ref}), forwarded {fwd:+.3f} ms ({n_fwd}) ({verdict(ref <= fwd)})")
    if BANNED in results:
        b = latency_split(seq, BANNED, BASELINE)
        print(f"  {BANNED} (refused by a ban before scoring): {b['refused'][0]:+.3f} ms over plain forwarding the same requests ({b['refused'][1]})")
    if worst_small is not None:
        print(f"target: added CPU per request <= 0.3 ms up to 16 KB through the proxy: worst {worst_small:+.3f} ms "
              f"({verdict(worst_small <= 0.3)}); beyond: the µs/KB column")
    print(f"fields+score in-process p99: {p99:.0f} µs")
    if FS_BANS in results:
        r_bans, how = judged_ratio(FS_BANS, FS)
        check = pct(micro_res["ban check"], 99)
        print(f"{FS_BANS} / {FS}: {r_bans:.1%}, {how}; ban check p99 {check:.1f} µs")
    if RECORDER_CASE in results:
        r_rec, how = judged_ratio(RECORDER_CASE, FS)
        print(f"{RECORDER_CASE} / {FS}: {r_rec:.1%}, {how}; the burst check: scripts/bench_recorder.py")
    if LLM_CASE in results and FS in results:
        llm_report(mix, band, args.data, lm, {n: list(zip(seq[n].latencies, seq[n].indices, strict=True)) + llm_lat[n] for n in llm_lat},
                   in_band, results)
    print(f"proxy phase {bench_s:.0f} s, total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
