"""addons/workers.py: SO_REUSEPORT for the workers' servers, each worker's arguments, the supervisor
(restart, stop, one prefixed log) run against small stand-in workers (no mitmdump: tests/test_workers_e2e.py)."""

import asyncio
import io
import os
import signal
import socket
import sys
import textwrap
import threading
import time

import pytest

from addons import workers

# A stand-in worker: says it listens (as mitmdump logs it), prints its id, then sleeps until killed.
# FAIL_FAST=1 makes it exit with code 3 before it "listens".
FAKE = textwrap.dedent(
    """
    import os, sys, time
    if os.environ.get("FAIL_FAST"):
        print("bad option", flush=True)
        sys.exit(3)
    print("reverse proxy listening at 127.0.0.1:1 args=" + " ".join(sys.argv[1:]), flush=True)
    print("pid", os.getpid(), "worker", os.environ["OPENFLARE_WORKER"], "of", os.environ["OPENFLARE_WORKERS"], flush=True)
    while True:
        time.sleep(1)
    """
)


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(workers, "RESTART_MIN", 0.1)
    monkeypatch.setattr(workers, "STOP_WAIT_S", 3.0)


async def test_reuse_port_lets_two_servers_share_one_port():
    workers.reuse_port()
    workers.reuse_port()  # idempotent: wrapped once
    assert asyncio.base_events.BaseEventLoop.create_server.openflare_reuse_port
    one = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = one.sockets[0].getsockname()[1]
    two = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)  # EADDRINUSE without the option
    try:
        for server in (one, two):
            assert server.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        one.close()
        two.close()


def test_each_worker_gets_its_own_instance_and_embedded_record_store(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENFLARE_MONGO_URI", raising=False)
    monkeypatch.delenv("OPENFLARE_INSTANCE", raising=False)
    (tmp_path / "config.yaml").write_text("openflare_record_dir: rec\nopenflare_instance: edge\n")
    args = ["--set", f"confdir={tmp_path}", "-p", "8080", "-s", "addons/openflare.py", "--set", "openflare_instance=front"]
    one, env1 = workers.worker_args(args, 1, 2)
    two, env2 = workers.worker_args(args, 2, 2)
    assert env1 == {"OPENFLARE_WORKER": "1", "OPENFLARE_WORKERS": "2"} and env2["OPENFLARE_WORKER"] == "2"
    # --set wins over the file; set once only (mitmproxy refuses an option set twice)
    assert [a for a in one if a.startswith("openflare_instance=")] == ["openflare_instance=front-w1"]
    assert "openflare_record_dir=rec-w2" in two and "openflare_record_spill=data/records-spill-w2.jsonl" in two
    assert not any(a.startswith("openflare_record_dir=") for a in one)  # worker 1: the configured store
    assert one[-2:] == ["-s", workers.__file__] and two[:6] == args[:6]
    assert not any(a.startswith("openflare_metrics_port=") for a in two)  # metrics off: nothing to move
    three, _ = workers.worker_args([*args, "--set", "openflare_metrics_port=9100"], 3, 3)
    assert [a for a in three if a.startswith("openflare_metrics_port=")] == ["openflare_metrics_port=9102"]
    monkeypatch.setenv("OPENFLARE_MONGO_URI", "mongodb://db/")
    two, _ = workers.worker_args(args, 2, 2)
    assert not any(a.startswith("openflare_record_") for a in two)  # MongoDB takes every writer


def test_requestheaders_tags_the_flow_with_the_worker(monkeypatch):
    from mitmproxy.test import tflow

    f = tflow.tflow()
    monkeypatch.setattr(workers, "_WORKER_ID", "2")
    workers.requestheaders(f)
    assert f.metadata[workers.WORKER_KEY] == "2"


class Running:
    """A Supervisor in a thread, its log in a buffer."""

    def __init__(self, n: int, env: dict | None = None, script=FAKE) -> None:
        self.out = io.StringIO()
        self.sup = workers.Supervisor(n, ["-p", "1"], out=self.out, command=[sys.executable, "-c", script])
        for w in self.sup.workers:
            w.env.update(env or {})
        self.code = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.sup.run_loop()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sup.stopping = True
        self.thread.join(10)

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def wait_for(self, cond, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError("timed out; log:\n" + self.out.getvalue())
            time.sleep(0.05)


def _pids(run: Running, k: int) -> list[int]:
    return [int(x.split()[2]) for x in run.lines() if x.startswith(f"[w{k}] pid ")]


def test_supervisor_prefixes_each_line_restarts_a_killed_worker_and_stops_all():
    with Running(2) as run:
        run.wait_for(lambda: _pids(run, 1) and _pids(run, 2))
        assert any(x.startswith("[w1] reverse proxy listening at") for x in run.lines())
        assert any(x.endswith("worker 2 of 2") for x in run.lines())
        first, other = _pids(run, 1)[0], _pids(run, 2)[0]
        os.kill(first, signal.SIGKILL)
        run.wait_for(lambda: len(_pids(run, 1)) == 2)
        assert any("worker 1" in x and "exited with code -9: restarting" in x for x in run.lines())
        assert _pids(run, 2) == [other]  # the other worker was left alone
        live = [w.proc for w in run.sup.workers]
    run.thread.join(10)
    assert run.code == 0 and all(p.poll() is not None for p in live)
    assert "[supervisor] stopping every worker" in run.lines()


def test_a_worker_failing_before_it_listens_stops_the_supervisor_with_its_code():
    with Running(2, env={"FAIL_FAST": "1"}) as run:
        run.thread.join(15)
    assert run.code == 3
    assert any("exited with code 3 before it listened: stopping all" in x for x in run.lines())
    assert any(x == "[w1] bad option" or x == "[w2] bad option" for x in run.lines())


def test_sigterm_to_the_supervisor_stops_every_worker(tmp_path):
    import subprocess

    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    code = (
        "import sys; from addons import workers\n"
        f"sys.exit(workers.Supervisor(2, [], command=[sys.executable, {str(fake)!r}]).run())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = []
    for line in proc.stdout:
        if line.startswith(("[w1] pid", "[w2] pid")):
            pids.append(int(line.split()[2]))
        if len(pids) == 2:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=15)[0]
    assert proc.returncode == 0 and "stopping every worker" in rest
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_workers.py"
    spec = importlib.util.spec_from_file_location("bench_workers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [["--workers", "1"], ["--workers", "two"], ["--rounds", "0"], ["--duration", "0"]])
def test_bench_workers_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        _bench().main(argv)
    assert e.value.code == 2


def test_bench_workers_mix_is_one_attack_in_ten():
    heads = _bench().mix(100)
    assert sum(h.startswith((b"GET /search?q=1%27", b"GET /search?q=%3Cscript", b"GET /item?id=1%20union")) for h in heads) == 10
    assert all(h.endswith(b"\r\n") and b"X-Forwarded-For" not in h for h in heads)  # the client is added per request
