"""N mitmdump workers on one port: a supervisor, and the worker side (SO_REUSEPORT, the worker's id).

    python -m addons.workers --workers 2 -- --set confdir=.mitmproxy -p 8080 -s addons/openflare.py ...

(`make run WORKERS=N`; WORKERS=1 runs a plain mitmdump, exactly as before.) Everything after `--` is a
mitmdump command line, the same for every worker. The supervisor starts N workers, each a mitmdump in its
own process (one event loop, one core), and:

- **One port.** Each worker's listening sockets get `SO_REUSEPORT` (Linux >= 3.9, the BSDs), so all N bind
  the same address and the kernel spreads new connections over them (by a hash of the connection's
  addresses and ports; a keep-alive connection stays on its worker). mitmproxy has no option for it: it
  calls `asyncio.start_server(handler, host, port)`. A worker is `python addons/workers.py --worker`, which
  wraps asyncio's `BaseEventLoop.create_server` (standard library API, used by every asyncio server) to
  default `reuse_port=True`, then runs mitmproxy's own `mitmdump()` entry point. No mitmproxy internals are
  touched, so an upgrade keeps working as long as mitmproxy listens through asyncio; if it stopped, the
  second worker would fail to bind (address in use) and the supervisor would stop with that error,
  never run silently on one worker (tests/test_workers_e2e.py binds two).
- **Restarts.** A worker that exits after it was listening is started again (after RESTART_MIN seconds,
  doubled while it keeps dying within STABLE_S of its start, up to RESTART_MAX). A worker that exits before
  it ever listened on its first start (a bad option, a busy port) stops them all: the supervisor exits with
  its code, as a lone mitmdump would.
- **Stop.** SIGINT (Ctrl-C) or SIGTERM: every worker gets SIGTERM, and SIGKILL after STOP_WAIT_S. Workers
  run in their own process group (a terminal's Ctrl-C reaches the supervisor only) and get SIGKILL if the
  supervisor itself dies (PR_SET_PDEATHSIG, set by the worker as it starts).
- **One log.** Each worker's stdout and stderr become lines of the supervisor's stdout prefixed `[wK] `.
- **Per worker.** `OPENFLARE_WORKER=K` and `OPENFLARE_WORKERS=N` in its environment; its own recorder
  chain (`openflare_instance` = the configured name, or hostname, plus `-wK`); without a MongoDB URI its own
  embedded record store and spill file (worker 1 the configured ones, worker K `<dir>-wK` and
  `<spill stem>-wK.jsonl`): the embedded store allows one writer. With `openflare_metrics_port` P, worker K
  serves its Prometheus endpoint on P + K - 1 (one scrape target per worker). The worker id goes into each flow's
  metadata (`openflare.worker`, by this module loaded as a script: `-s addons/workers.py`).
  Bans are shared as with one process: Redis, or the embedded ban store the first worker owns and the
  others reach through its Unix socket. The model file is watched by each worker (hot reload reaches all).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ENV_WORKER = "OPENFLARE_WORKER"
ENV_WORKERS = "OPENFLARE_WORKERS"
ENV_SUPERVISOR = "OPENFLARE_SUPERVISOR_PID"
WORKER_KEY = "openflare.worker"  # flow metadata: the id of the worker that served the flow
RESTART_MIN = 0.5  # seconds before a dead worker is started again
RESTART_MAX = 30.0
STABLE_S = 60.0  # a worker that ran this long before dying is restarted after RESTART_MIN again
STOP_WAIT_S = 10.0  # seconds between SIGTERM and SIGKILL at stop
LISTENING = "listening at"  # mitmproxy's log line once a proxy server listens
RECORD_DIR, RECORD_SPILL = "data/records", "data/records-spill.jsonl"


# --- the worker side ---


def reuse_port() -> None:
    """Make every TCP server this process creates through asyncio set SO_REUSEPORT (idempotent)."""
    base = asyncio.base_events.BaseEventLoop
    if getattr(base.create_server, "openflare_reuse_port", False):
        return
    if not hasattr(socket, "SO_REUSEPORT"):
        raise RuntimeError("this platform has no SO_REUSEPORT: run one worker (WORKERS=1) or a balancer in front")
    orig = base.create_server

    @functools.wraps(orig)
    async def create_server(self, protocol_factory, host=None, port=None, *args, **kwargs):
        if kwargs.get("sock") is None:
            kwargs.setdefault("reuse_port", True)
        return await orig(self, protocol_factory, host, port, *args, **kwargs)

    create_server.openflare_reuse_port = True
    base.create_server = create_server


def worker_main(argv: list[str]) -> int:
    if os.environ.get(ENV_SUPERVISOR, "").isdigit():
        _pdeathsig(int(os.environ[ENV_SUPERVISOR]))
    reuse_port()
    from mitmproxy.tools import main

    sys.argv = [str(Path(sys.executable).with_name("mitmdump")), *argv]  # as mitmdump's own (addons/startup.py reads it)
    main.mitmdump(argv)
    return 0


# This module loaded by mitmproxy (-s addons/workers.py): tag each flow with the worker's id. Module-level
# hook, no `addons` list: the cheapest thing mitmproxy can call.
_WORKER_ID = os.environ.get(ENV_WORKER)


def requestheaders(flow) -> None:
    if _WORKER_ID is not None:
        flow.metadata[WORKER_KEY] = _WORKER_ID


# --- the supervisor ---


def _set_option(args: list[str], name: str) -> str | None:
    """The last `--set name=value` in a mitmdump command line (which wins over the config file)."""
    value = None
    for i, a in enumerate(args):
        if a == "--set" and i + 1 < len(args) and args[i + 1].startswith(name + "="):
            value = args[i + 1].split("=", 1)[1]
        elif a.startswith(f"--set={name}="):
            value = a.split("=", 2)[2]
    return value


def _conf_option(args: list[str], name: str) -> object | None:
    """The option in the config file mitmdump reads (<confdir>/config.yaml), if set there."""
    confdir = _set_option(args, "confdir") or "~/.mitmproxy"
    for fname in ("config.yaml", "config.yml"):
        path = Path(os.path.expanduser(confdir)) / fname
        if path.is_file():
            try:
                import ruamel.yaml

                data = ruamel.yaml.YAML(typ="safe", pure=True).load(path.read_text()) or {}
            except Exception:  # noqa: BLE001 - mitmdump itself will report a bad file
                return None
            return data.get(name) if isinstance(data, dict) else None
    return None


def option(args: list[str], name: str, default: object = None) -> object:
    value = _set_option(args, name)
    if value is None:
        value = _conf_option(args, name)
    return default if value is None else value


def worker_args(args: list[str], k: int, n: int) -> tuple[list[str], dict[str, str]]:
    """Worker k's (1-based) mitmdump arguments and environment, from the shared command line."""
    base = option(args, "openflare_instance") or os.environ.get("OPENFLARE_INSTANCE") or socket.gethostname()
    extra = ["--set", f"openflare_instance={base}-w{k}"]
    mongo = option(args, "openflare_mongo_uri") or os.environ.get("OPENFLARE_MONGO_URI")
    if not mongo and k > 1:  # the embedded record store has one writer: a store (and spill file) of its own
        rdir = str(option(args, "openflare_record_dir", RECORD_DIR)).rstrip("/")
        spill = Path(str(option(args, "openflare_record_spill", RECORD_SPILL)))
        extra += ["--set", f"openflare_record_dir={rdir}-w{k}", "--set", f"openflare_record_spill={spill.with_name(f'{spill.stem}-w{k}{spill.suffix}')}"]
    metrics = str(option(args, "openflare_metrics_port", 0))
    if metrics.isdigit() and int(metrics) and k > 1:  # each process serves its own endpoint: worker K on port + K - 1
        extra += ["--set", f"openflare_metrics_port={int(metrics) + k - 1}"]
    tag = ["-s", str(Path(__file__).resolve())]
    return [*_without(args, {extra[i + 1].split("=", 1)[0] for i in range(0, len(extra), 2)}), *extra, *tag], {ENV_WORKER: str(k), ENV_WORKERS: str(n)}


def _without(args: list[str], names: set[str]) -> list[str]:
    """`args` less every `--set name=...` of these names: mitmproxy refuses an option set twice on its
    command line ("Received multiple values"), and the worker's own value must win."""
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a == "--set" and i + 1 < len(args) and args[i + 1].split("=", 1)[0] in names:
            skip = True
        elif not (a.startswith("--set=") and a[6:].split("=", 1)[0] in names):
            out.append(a)
    return out


def _pdeathsig(parent: int) -> None:
    """A worker gets SIGKILL when its supervisor dies (Linux); gone already: stop now. SIGKILL, not SIGTERM:
    a supervisor that did not stop its workers was itself killed (a SIGTERM to it stops them first), and a
    worker whose shutdown hangs ignores a further SIGTERM (seen here: a task that swallows its cancellation
    keeps asyncio.run from returning). The recorder's journal loses no acknowledged record to a kill -9."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        sys.exit(0)


class Worker:
    def __init__(self, k: int, args: list[str], env: dict[str, str]) -> None:
        self.k, self.args, self.env = k, args, env
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.listening = False  # this run of it logged that it listens
        self.ever_listened = False
        self.delay = RESTART_MIN
        self.restart_at: float | None = None
        self.restarts = 0


class Supervisor:
    def __init__(self, n: int, args: list[str], out=None, command: list[str] | None = None) -> None:
        self.n = n
        # A worker runs this file by path, not `-m addons.workers`: the `addons` package must first be imported
        # inside mitmproxy (addons/__init__.py then runs addons/startup.py: --set wins, bad keys stop startup).
        self.command = command or [sys.executable, str(Path(__file__).resolve()), "--worker", "--"]  # then a worker's args
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.workers = []
        for k in range(1, n + 1):
            wargs, env = worker_args(args, k, n)
            self.workers.append(Worker(k, wargs, env))
        self.stopping = False
        self.exit_code = 0

    def log(self, text: str) -> None:
        with self.lock:
            self.out.write(text if text.endswith("\n") else text + "\n")
            self.out.flush()

    def start(self, w: Worker) -> None:
        cmd = [*self.command, *w.args]
        w.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, **w.env, ENV_SUPERVISOR: str(os.getpid())}, start_new_session=True,
        )  # fmt: skip
        w.started, w.listening, w.restart_at = time.monotonic(), False, None
        self.log(f"[supervisor] worker {w.k} started, pid {w.proc.pid}")
        threading.Thread(target=self._pump, args=(w, w.proc), daemon=True, name=f"openflare-w{w.k}-log").start()

    def _pump(self, w: Worker, proc: subprocess.Popen) -> None:
        prefix = f"[w{w.k}] "
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not w.listening and LISTENING in line and proc is w.proc:
                w.listening = w.ever_listened = True
            self.log(prefix + line)

    def poll(self) -> bool:
        """One supervision step; False once the supervisor should stop (a worker failed at its first start)."""
        now = time.monotonic()
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                code = w.proc.returncode
                time.sleep(0.05)  # its last lines
                if not w.ever_listened:
                    self.log(f"[supervisor] worker {w.k} exited with code {code} before it listened: stopping all")
                    self.exit_code = code or 1
                    return False
                w.delay = RESTART_MIN if now - w.started >= STABLE_S else min(w.delay * 2, RESTART_MAX) if w.restarts else RESTART_MIN
                self.log(f"[supervisor] worker {w.k} (pid {w.proc.pid}) exited with code {code}: restarting in {w.delay:g} s")
                w.proc, w.restart_at = None, now + w.delay
                w.restarts += 1
            if w.proc is None and w.restart_at is not None and now >= w.restart_at:
                self.start(w)
        return True

    def stop(self) -> None:
        live = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for w in live:
            try:
                os.kill(w.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_WAIT_S
        for w in live:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"[supervisor] worker {w.k} did not stop in {STOP_WAIT_S:g} s: SIGKILL")
                w.proc.kill()
                w.proc.wait()
        time.sleep(0.05)

    def run(self) -> int:
        def on_signal(signum, _frame):
            self.stopping = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        return self.run_loop()

    def run_loop(self) -> int:
        """Start every worker, supervise them until `stopping` is set (or one fails at its first start), stop them."""
        self.log(f"[supervisor] {self.n} workers on one port (SO_REUSEPORT): {shlex.join(self.workers[0].args)}")
        for w in self.workers:
            self.start(w)
        try:
            while not self.stopping and self.poll():
                time.sleep(0.1)
        finally:
            self.log("[supervisor] stopping every worker")
            self.stop()
        return self.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m addons.workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", "-n", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPU cores)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # run as one worker
    parser.add_argument("mitmdump_args", nargs=argparse.REMAINDER, help="-- then mitmdump's arguments")
    ns = parser.parse_args(argv)
    args = ns.mitmdump_args[1:] if ns.mitmdump_args[:1] == ["--"] else ns.mitmdump_args
    if ns.worker:
        return worker_main(args)
    if ns.workers < 1:
        parser.error("--workers must be at least 1")
    return Supervisor(ns.workers, args).run()


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # run by path: addons/ itself is no import root (its modules are `addons.x`)
    sys.exit(main())
