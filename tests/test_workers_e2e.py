"""`python -m addons.workers --workers 2` (make run WORKERS=2) end to end: two real mitmdump workers on one port
in front of the demo app, sharing the Redis on 127.0.0.1:6379 under this module's own key prefix. Clients are
told apart by X-Forwarded-For (loopback is a trusted proxy); which worker served a request is read from the
supervisor's one log stream: the worker's `[wK] 127.0.0.1:<client port>: GET ...` line."""

from __future__ import annotations

import http.client
import os
import re
import signal
import sys
import threading
import time
import uuid

import pytest
import redis

from conftest import free_port
from conftest import make_confdir
from conftest import mitmdump_args

REDIS_URL = "redis://127.0.0.1:6379/0"
PREFIX = f"oftest-workers17-{uuid.uuid4().hex[:10]}:"
RATE_LIMIT = 10
SQLI = "/?q=1%27%20or%201%3D1--"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(processes, upstream, tmp_path_factory, model_conf):
    tmp = tmp_path_factory.mktemp("workers")
    conf = make_confdir(tmp / "conf", host_conf(model_conf, tmp))
    port = free_port()
    args = [sys.executable, "-m", "addons.workers", "--workers", "2", "--",
            *mitmdump_args(port, conf, ["addons/openflare.py"], mode=f"reverse:{upstream.url}")[1:]]  # fmt: skip
    proc = processes.start("workers", args, port, env={"OPENFLARE_REDIS_URL": REDIS_URL, "OPENFLARE_MONGO_URI": ""})
    # both listening and connected to Redis (until then a worker limits on its own, as while Redis is down)
    wait_log(proc, lambda log: all(re.search(rf"^\[w{k}\] .*listening at", log, re.M) and re.search(rf"^\[w{k}\] .*Redis reachable", log, re.M)
                                   for k in (1, 2)), "both listening and on Redis")  # fmt: skip
    yield proc, port, tmp
    proc.stop()
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=PREFIX + "*"))
    if keys:
        r.delete(*keys)
    r.close()


def host_conf(model_conf: dict, tmp, **more) -> dict:
    """One host's configuration: the shared Redis prefix; its own ban socket and record store (its directory)."""
    return {
        **model_conf,
        "openflare_trusted_proxies": ["127.0.0.1"],
        "openflare_llm_enabled": False,
        "openflare_rate_limit": RATE_LIMIT,
        "openflare_strikes": 1,
        "openflare_redis_prefix": PREFIX,
        "openflare_ban_socket": str(tmp / "bans.sock"),
        "openflare_record_dir": str(tmp / "records"),
        "openflare_record_spill": str(tmp / "spill.jsonl"),
        **more,
    }  # fmt: skip


def wait_log(proc, cond, what: str, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = proc.output()[0]
        if cond(log):
            return log
        if time.monotonic() > deadline or proc.popen.poll() is not None:
            raise AssertionError(f"{what}: not seen; log:\n{log[-6000:]}")
        time.sleep(0.05)


def worker_of(proc, client_port: int) -> int:
    """The worker whose log shows the request from this client port."""
    pat = re.compile(rf"^\[w(\d)\] 127\.0\.0\.1:{client_port}: ", re.M)
    log = wait_log(proc, lambda text: pat.search(text), f"request from port {client_port}", 15)
    return int(pat.search(log).group(1))


def request(port: int, client_ip: str, path: str = "/") -> tuple[int, int]:
    """One GET on a fresh connection as `client_ip`: (status, the client's local port)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.connect()
        local = conn.sock.getsockname()[1]
        conn.request("GET", path, headers={"X-Forwarded-For": client_ip})
        resp = conn.getresponse()
        resp.read()
        return resp.status, local
    finally:
        conn.close()


def test_both_workers_serve_and_a_ban_by_one_is_enforced_by_the_other(cluster):
    proc, port, tmp = cluster
    served = {1: 0, 2: 0}
    for i in range(16):  # several clients, a fresh connection each: the kernel spreads them
        status, local = request(port, f"198.51.100.{10 + i}")
        assert status == 200
        served[worker_of(proc, local)] += 1
    assert served[1] > 0 and served[2] > 0, served
    # an attack from one client: refused and struck (strikes=1) by whichever worker takes it
    attacker = "203.0.113.50"
    ban = re.compile(rf"^\[w(\d)\] .*openflare ban ip={re.escape(attacker)} ", re.M)
    for _ in range(3):  # a score of 10 is a whole strike, 9 two thirds: at most three refusals ban
        status, local = request(port, attacker, SQLI)
        assert status == 403
        if ban.search(wait_log(proc, lambda log: re.search(rf"^\[w\d\] 127\.0\.0\.1:{local}: ", log, re.M), "the attack")):
            break
    banning = int(ban.search(wait_log(proc, ban.search, "the ban")).group(1))
    time.sleep(1.0)  # the acceptance's bound: a ban made by one worker is enforced by the other within 1 s
    seen = {1: [], 2: []}
    for _ in range(200):
        status, local = request(port, attacker, "/")  # a plain page: only the ban refuses it
        seen[worker_of(proc, local)].append(status)
        if seen[1] and seen[2]:
            break
    assert seen[3 - banning] and set(seen[1]) == {403} and set(seen[2]) == {403}, seen  # the other worker refuses too
    assert (tmp / "records").is_dir() and (tmp / "records-w2").is_dir()  # one embedded record store per worker


def test_the_rate_limit_is_counted_across_both_workers(cluster):
    proc, port, _ = cluster
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def one() -> None:
        res = request(port, "198.51.100.99")
        with lock:
            results.append(res)

    threads = [threading.Thread(target=one) for _ in range(2 * RATE_LIMIT)]  # 2 x the limit at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = [s for s, _ in results]
    workers = {worker_of(proc, local) for _, local in results}
    assert workers == {1, 2}  # spread over both
    # Per worker, each would admit RATE_LIMIT (2 x in all); counted together, the limit plus at most what each
    # worker's fast path admitted before Redis had counted it (RATE_FAST_PERCENT of the limit: 1 each). The
    # rest get 429, or 403 once the 429's strike has banned the client (openflare_strikes=1 here).
    assert statuses.count(200) <= RATE_LIMIT + 2 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429, 403}


def test_sigkill_of_one_worker_restarts_it_and_the_other_serves_on(cluster):
    proc, port, _ = cluster
    pids = {int(k): int(p) for k, p in re.findall(r"^\[supervisor\] worker (\d) started, pid (\d+)", proc.output()[0], re.M)}
    # keep-alive connections, each on one worker; keep those on worker 2 (the one not killed)
    keep = []
    for i in range(12):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.connect()
        local = conn.sock.getsockname()[1]
        conn.request("GET", "/", headers={"X-Forwarded-For": f"198.51.100.{120 + i}"})
        resp = conn.getresponse()
        resp.read()
        if worker_of(proc, local) == 2:
            keep.append((conn, f"198.51.100.{120 + i}"))
        else:
            conn.close()
    assert keep, "no connection landed on worker 2"
    failures, statuses, stop = [], [], threading.Event()

    def load() -> None:
        while not stop.is_set():
            for conn, ip in keep:
                try:
                    conn.request("GET", "/", headers={"X-Forwarded-For": ip})
                    resp = conn.getresponse()
                    resp.read()
                    statuses.append(resp.status)
                except Exception as e:  # noqa: BLE001 - any failure on worker 2 fails the test
                    failures.append(repr(e))
                    return
            stop.wait(0.2)  # each client well below the rate limit (10/s)

    t = threading.Thread(target=load)
    t.start()
    try:
        os.kill(pids[1], signal.SIGKILL)
        log = wait_log(proc, lambda text: len(re.findall(r"^\[supervisor\] worker 1 started", text, re.M)) == 2, "restart")
        assert f"worker 1 (pid {pids[1]}) exited with code -9: restarting" in log
        wait_log(proc, lambda text: len(re.findall(r"^\[w1\] .*listening at", text, re.M)) == 2, "worker 1 listening again")
        n = len(statuses)
        wait_log(proc, lambda text: len(statuses) > n + 5, "requests on worker 2 after the restart")
    finally:
        stop.set()
        t.join(30)
    assert failures == [] and statuses and set(statuses) == {200}
    new = int(re.findall(r"^\[supervisor\] worker 1 started, pid (\d+)", proc.output()[0], re.M)[-1])
    assert new != pids[1]
    for _ in range(200):  # the restarted worker takes new connections again
        status, local = request(port, "198.51.100.140")
        if worker_of(proc, local) == 1:
            break
    else:
        pytest.fail("no request reached the restarted worker 1")
    assert status == 200
    for conn, _ in keep:
        conn.close()


def test_two_hosts_share_bans_and_the_rate_limit_through_redis(cluster, processes, upstream, tmp_path_factory, model_conf):
    """The README's two-host recipe, the hosts simulated as two worker groups on two ports, each in its own
    directory (ban socket, record store) with its own instance name: host A is the module's two workers,
    host B one more group (one worker here: this machine has two cores). Redis shared; records per host
    (the recipe's shared MongoDB URI cannot be tested here: no MongoDB server, and mongomock is per process)."""
    proc_a, port_a, _ = cluster
    tmp = tmp_path_factory.mktemp("host-b")
    conf = make_confdir(tmp / "conf", host_conf(model_conf, tmp, openflare_instance="edge-b"))
    port_b = free_port()
    args = [sys.executable, "-m", "addons.workers", "--workers", "1", "--",
            *mitmdump_args(port_b, conf, ["addons/openflare.py"], mode=f"reverse:{upstream.url}")[1:]]  # fmt: skip
    proc_b = processes.start("host-b", args, port_b, env={"OPENFLARE_REDIS_URL": REDIS_URL, "OPENFLARE_MONGO_URI": ""})
    try:
        log = wait_log(proc_b, lambda text: re.search(r"^\[w1\] .*Redis reachable", text, re.M), "host B on Redis")
        assert re.search(r"^\[w1\] .*chain edge-b-w1/", log, re.M)  # host B's own recorder chain
        # a ban made on host B is enforced on host A
        attacker = "203.0.113.60"
        ban = re.compile(rf"^\[w1\] .*openflare ban ip={re.escape(attacker)} ", re.M)
        for _ in range(3):
            assert request(port_b, attacker, SQLI)[0] == 403
            if ban.search(proc_b.output()[0]):
                break
        wait_log(proc_b, ban.search, "the ban on host B")
        time.sleep(1.0)
        assert [request(port_a, attacker, "/")[0] for _ in range(4)] == [403] * 4
        # one client, 2 x the limit at once, half on each host: the limit holds across hosts
        results: list[int] = []

        def one(port: int) -> None:
            results.append(request(port, "198.51.100.98")[0])

        threads = [threading.Thread(target=one, args=(port_a if i % 2 else port_b,)) for i in range(2 * RATE_LIMIT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # the limit plus what each of the three workers' fast paths admitted before Redis counted it (1 each)
        assert results.count(200) <= RATE_LIMIT + 3 and results.count(429) >= 1, results
    finally:
        proc_b.stop()


def test_without_redis_two_workers_share_the_embedded_store(processes, upstream, tmp_path_factory, model_conf):
    """The embedded defaults with WORKERS=2: the first worker owns the ban store, the other reaches it through
    the Unix socket; bans and the rate limit hold across both."""
    tmp = tmp_path_factory.mktemp("embedded")
    conf = make_confdir(tmp / "conf", host_conf(model_conf, tmp))
    port = free_port()
    args = [sys.executable, "-m", "addons.workers", "--workers", "2", "--",
            *mitmdump_args(port, conf, ["addons/openflare.py"], mode=f"reverse:{upstream.url}")[1:]]  # fmt: skip
    proc = processes.start("embedded", args, port, env={"OPENFLARE_REDIS_URL": "", "OPENFLARE_MONGO_URI": ""})
    try:
        wait_log(proc, lambda log: re.search(r"^\[w\d\] .*in-process ban store ready", log, re.M)
                 and re.search(r"^\[w\d\] .*shared ban store reachable", log, re.M), "one owner, one member")  # fmt: skip
        results: list[tuple[int, int]] = []

        def one() -> None:
            results.append(request(port, "198.51.100.97"))

        threads = [threading.Thread(target=one) for _ in range(2 * RATE_LIMIT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        statuses = [s for s, _ in results]
        assert {worker_of(proc, local) for _, local in results} == {1, 2}
        assert statuses.count(200) <= RATE_LIMIT + 2 and statuses.count(429) >= 1, statuses
        attacker = "203.0.113.70"
        ban = re.compile(rf"^\[w(\d)\] .*openflare ban ip={re.escape(attacker)} ", re.M)
        for _ in range(3):
            assert request(port, attacker, SQLI)[0] == 403
            if ban.search(proc.output()[0]):
                break
        wait_log(proc, ban.search, "the ban")
        time.sleep(1.0)
        seen = {1: [], 2: []}
        for _ in range(200):
            status, local = request(port, attacker, "/")
            seen[worker_of(proc, local)].append(status)
            if seen[1] and seen[2]:
                break
        assert seen[1] and seen[2] and set(seen[1]) == set(seen[2]) == {403}, seen
    finally:
        proc.stop()


def test_a_new_model_reaches_every_worker(processes, upstream, tmp_path_factory):
    """Each worker watches the model file: a model written over it (a retrain, a rollback) is loaded by both."""
    import models  # tests/models.py

    tmp = tmp_path_factory.mktemp("reload")
    path = models.save(models.attack_model(), tmp / "model", "m", "workers-1")
    conf = make_confdir(tmp / "conf", host_conf({"openflare_model": str(path)}, tmp))
    port = free_port()
    args = [sys.executable, "-m", "addons.workers", "--workers", "2", "--",
            *mitmdump_args(port, conf, ["addons/openflare.py"], mode=f"reverse:{upstream.url}")[1:]]  # fmt: skip
    proc = processes.start("reload", args, port, env={"OPENFLARE_REDIS_URL": "", "OPENFLARE_MONGO_URI": ""})
    try:
        wait_log(proc, lambda log: all(re.search(rf"^\[w{k}\] .*listening at", log, re.M) for k in (1, 2)), "both listening")
        models.save(models.attack_model(), tmp / "model", "m", "workers-2")
        wait_log(proc, lambda log: all(re.search(rf"^\[w{k}\] .*local model workers-1 -> workers-2", log, re.M) for k in (1, 2)),
                 "the new model in both workers")  # fmt: skip
    finally:
        proc.stop()
