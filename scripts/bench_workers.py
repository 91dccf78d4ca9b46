"""`make bench` (workers case): requests/s of OpenFlare with 1 and with N workers on one port (addons/workers.py).

    .venv/bin/python scripts/bench_workers.py [--workers 2] [--rounds 3] [--duration 5] [--concurrency 32]
        [--worker-cpus 0,1] [--load-cpus 2,3] [--redis redis://127.0.0.1:6379/0] [--clients 50]

Both set-ups run at once (1 worker and N workers, each `python -m addons.workers` in front of one demo upstream,
scripts/upstream.py, with the shipped mitm.conf less nothing but: X-Forwarded-For from loopback believed, so each
request is its own client (--clients N: the requests cycle over N addresses, so the shared rate limit counts
repeat clients), and a record store in a temporary directory). Rounds alternate 1, N, 1, N... with the
same request mix (mostly everyday requests, one in ten an attack refused with 403), so machine noise hits both
alike; the figure is the median of the per-round ratios N/1. Keep-alive connections reconnect every
--per-connection requests, so the kernel's SO_REUSEPORT spread over workers (per connection) evens out.

What limits the figure is stated with it: the load generator (this process, one Python event loop) and the
upstream run on the same machine, and their CPU share is printed per round. On a 2-core machine two workers
compete with both for the two cores: the N-worker figure there is a floor, not the scaling. Pin the workers
(--worker-cpus, inherited by every worker; `taskset` semantics) away from the load generator (--load-cpus) on a
bigger machine to draw the curve: --workers 1,2,4,8 runs each count against the 1-worker set-up.

With --redis, the ban store and the rate limit are in that Redis (its own key prefix, deleted at the end);
without, in the embedded store the first worker owns (shared by the others through its Unix socket).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from bench import free_port, wait_listening  # noqa: E402  (the main benchmark's process helpers)

UPSTREAM = REPO / "scripts" / "upstream.py"
ATTACKS = ["/search?q=1%27%20or%201%3D1--", "/search?q=%3Cscript%3Ealert(1)%3C/script%3E", "/item?id=1%20union%20select%20password%20from%20users"]
WORDS = ["blue", "shoes", "coffee", "mug", "garden", "chair", "lamp", "travel", "guide", "red", "wool", "socks", "desk"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process so far (Linux /proc)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def mix(n: int, seed: int = 17) -> list[bytes]:
    """n request heads (the X-Forwarded-For is added per request): 9 in 10 everyday, 1 in 10 an attack."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 10 == 9:
            target = rng.choice(ATTACKS)
        elif i % 3 == 0:
            target = "/"
        else:
            target = "/search?q=" + "+".join(rng.sample(WORDS, 3)) + f"&page={rng.randint(1, 9)}"
        out.append(f"GET {target} HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: bench-workers\r\nAccept: */*\r\n".encode())
    return out


class Setup:
    def __init__(self, name: str, workers: int, upstream: str, conf: Path, tmp: Path, env: dict, cpus: str | None) -> None:
        self.name, self.workers = name, workers
        self.port = free_port()
        cmd = [sys.executable, "-m", "addons.workers", "--workers", str(workers), "--", "--set", f"confdir={conf}",
               "--listen-host", "127.0.0.1", "-p", str(self.port), "--mode", f"reverse:{upstream}", "-q",
               "-s", "addons/openflare.py", "--set", f"openflare_record_dir={tmp / name / 'records'}",
               "--set", f"openflare_record_spill={tmp / name / 'spill.jsonl'}",
               "--set", f"openflare_ban_socket={tmp / name / 'bans.sock'}"]  # fmt: skip
        if cpus:
            cmd = ["taskset", "-c", cpus, *cmd]
        (tmp / name).mkdir()
        self.log = open(tmp / f"{name}.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def drive(port: int, heads: list[bytes], concurrency: int, duration: float, per_conn: int, start: int,
                clients: int = 0) -> tuple[int, int, dict]:  # fmt: skip
    """Requests answered and errors in `duration` s over `concurrency` keep-alive connections."""
    done = errors = 0
    statuses: dict[int, int] = {}
    counter = iter(range(start, 1 << 62))
    deadline = time.perf_counter() + duration

    async def one_conn() -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            try:
                for _ in range(per_conn):
                    if time.perf_counter() >= deadline:
                        break
                    i = next(counter)
                    c = i % clients if clients else i  # default: every request its own client
                    ip = f"10.{c >> 16 & 255}.{c >> 8 & 255}.{c & 255}".encode()
                    writer.write(heads[i % len(heads)] + b"X-Forwarded-For: " + ip + b"\r\n\r\n")
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head.split(b" ", 2)[1])
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    await reader.readexactly(length)
                    statuses[status] = statuses.get(status, 0) + 1
                    done += 1
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
            finally:
                writer.close()

    await asyncio.gather(*(one_conn() for _ in range(concurrency)))
    return done, errors, statuses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="2", help="worker counts to compare with one worker, e.g. 2 or 2,4,8 (default 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per set-up per round")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--per-connection", type=int, default=20, help="requests per connection before it reconnects")
    ap.add_argument("--worker-cpus", help="CPU list for every worker (taskset -c), e.g. 0-3")
    ap.add_argument("--load-cpus", help="CPU list for this load generator, e.g. 4,5")
    ap.add_argument("--redis", help="ban store and rate limit in this Redis (else the embedded store)")
    ap.add_argument("--clients", type=int, default=0, help="client addresses the requests cycle over (0: each request its own)")
    args = ap.parse_args(argv)
    try:
        counts = sorted({int(x) for x in args.workers.split(",")})
    except ValueError:
        ap.error(f"--workers: worker counts separated by commas, not {args.workers!r}")
    if not counts or counts[0] < 2:
        ap.error("--workers: counts of 2 or more (each is compared with one worker)")
    if args.rounds < 1 or args.duration <= 0 or args.concurrency < 1 or args.per_connection < 1 or args.clients < 0:
        ap.error("--rounds, --duration, --concurrency and --per-connection must be positive")
    if args.worker_cpus and not shutil.which("taskset"):
        ap.error("--worker-cpus needs taskset (util-linux)")
    if args.load_cpus:
        os.sched_setaffinity(0, {int(c) for part in args.load_cpus.split(",") for c in _cpu_range(part)})

    tmp = Path(tempfile.mkdtemp(prefix="openflare-bench-workers-"))
    conf = tmp / "conf"
    conf.mkdir()
    # The shipped configuration, plus: X-Forwarded-For believed from loopback (each request its own client).
    (conf / "config.yaml").write_text((REPO / "mitm.conf").read_text() + "\nopenflare_trusted_proxies: ['127.0.0.1']\n")
    prefix = f"openflare-bench-workers-{os.getpid()}:"
    env = {**os.environ, "OPENFLARE_MONGO_URI": "", "OPENFLARE_REDIS_URL": args.redis or ""}
    if args.redis:
        (conf / "config.yaml").write_text((conf / "config.yaml").read_text() + f"openflare_redis_prefix: '{prefix}'\n")
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(UPSTREAM), "--port", str(up_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    setups = [Setup("w1", 1, f"http://127.0.0.1:{up_port}", conf, tmp, env, args.worker_cpus)]
    setups += [Setup(f"w{n}", n, f"http://127.0.0.1:{up_port}", conf, tmp, env, args.worker_cpus) for n in counts]
    heads = mix(1000)
    try:
        wait_listening(up_port, upstream, timeout=180)
        for s in setups:
            wait_listening(s.port, s.proc, timeout=180)
        time.sleep(3.0 + max(counts))  # every worker of each set-up up (the first listening is not all)
        for s in setups:  # warm up: every worker loaded and connected upstream
            asyncio.run(drive(s.port, heads, args.concurrency, 1.0, args.per_connection, 0))
        nproc = os.cpu_count() or 1
        print(f"bench_workers: {nproc} CPUs; workers pinned to {args.worker_cpus or 'any CPU'}, load generator to "
              f"{args.load_cpus or 'any CPU'}; {args.concurrency} connections, {args.per_connection} requests each; "
              f"store: {'Redis ' + args.redis if args.redis else 'embedded'}; "
              f"{f'{args.clients} clients' if args.clients else 'each request its own client'}")  # fmt: skip
        rates: dict[str, list[float]] = {s.name: [] for s in setups}
        ratios: dict[str, list[float]] = {s.name: [] for s in setups[1:]}
        start = 0
        for r in range(args.rounds):
            order = setups if r % 2 == 0 else [setups[0], *reversed(setups[1:])]
            got = {}
            for s in order:
                pids = s.worker_pids()
                cpu0 = {p: cpu_seconds(p) for p in pids}
                up0, me0 = cpu_seconds(upstream.pid), time.process_time()
                t0 = time.perf_counter()
                done, errors, statuses = asyncio.run(drive(s.port, heads, args.concurrency, args.duration, args.per_connection, start, args.clients))
                wall = time.perf_counter() - t0
                start += done
                rps = done / wall
                got[s.name] = rps
                rates[s.name].append(rps)
                workers_cpu = [100 * (cpu_seconds(p) - cpu0[p]) / wall for p in pids]
                per_request = 10 * sum(workers_cpu) * wall / max(done, 1)  # ms of worker CPU per request
                print(f"  round {r + 1} {s.name}: {rps:7.0f} req/s  errors {errors}  statuses {dict(sorted(statuses.items()))}  "
                      f"worker CPU {per_request:.2f} ms/request; load average {os.getloadavg()[0]:.1f}; "
                      f"CPU %: workers {' + '.join(f'{c:.0f}' for c in workers_cpu)}, "
                      f"load generator {100 * (time.process_time() - me0) / wall:.0f}, "
                      f"upstream {100 * (cpu_seconds(upstream.pid) - up0) / wall:.0f} (of {100 * nproc})")  # fmt: skip
            for s in setups[1:]:
                ratios[s.name].append(got[s.name] / got["w1"])
        print(f"  w1: median {statistics.median(rates['w1']):.0f} req/s")
        for s in setups[1:]:
            print(f"  {s.name}: median {statistics.median(rates[s.name]):.0f} req/s; paired ratio {s.name}/w1 "
                  f"median {statistics.median(ratios[s.name]):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios[s.name])})")  # fmt: skip
    finally:
        for s in setups:
            s.stop()
        upstream.terminate()
        upstream.wait(10)
        if args.redis:
            asyncio.run(_forget(args.redis, prefix))
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _cpu_range(part: str) -> range:
    lo, _, hi = part.partition("-")
    return range(int(lo), int(hi or lo) + 1)


async def _forget(url: str, prefix: str) -> None:
    sys.path.insert(0, str(REPO))
    from addons import banstore

    client = banstore.make_client(url)
    try:
        await banstore.delete_prefix(client, prefix)
    finally:
        await client.aclose()


if __name__ == "__main__":
    sys.exit(main())
