"""Shared test helpers: free ports, real processes (the demo upstream, mitmdump) and the model path.

Fixtures:
    upstream        module-scoped `Proc` running scripts/upstream.py on a free port (`.url`, `.port`)
    processes       module-scoped `Processes`: start real processes, all killed at module teardown
    mitmdump        module-scoped factory: `mitmdump(scripts=[...], options={...}, mode=..., env=...)`
                    starts a real mitmdump from the repo root, waits until it listens, returns a `Proc`
    model_path      the model tests with real verdicts use: models/openflare-local.npz (fails if absent)
    model_conf      option overrides selecting model_path ({} for the shipped model), for `mitmdump(conf=...)`

Plain helpers, importable from test modules as `from conftest import free_port, http_request` (pytest
puts tests/ on sys.path): `free_port()`, `wait_listening()`, `http_request()`, `make_confdir()`,
`mitmdump_args()`.

OPENFLARE_TEST_MODEL=/path/to/model.npz runs the tests that need real verdicts against another model
(default: the shipped models/openflare-local.npz).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MITMDUMP = VENV_BIN / "mitmdump"
if not MITMDUMP.exists():
    MITMDUMP = REPO / ".venv" / "bin" / "mitmdump"
UPSTREAM_SCRIPT = REPO / "scripts" / "upstream.py"
MITM_CONF = REPO / "mitm.conf"
SHIPPED_MODEL = REPO / "models" / "openflare-local.npz"
# `make` for the tests that run a Makefile target: never rebuilds .venv (the tests already run in it; a
# pyproject.toml newer than the venv would otherwise reinstall it inside a test).
MAKE = ["make", "-o", ".venv/.installed"]
STARTUP_TIMEOUT = 90.0  # a loaded 2-core machine takes many seconds to import scikit-learn and load the model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen | None = None, timeout: float = STARTUP_TIMEOUT) -> bool:
    """Poll until 127.0.0.1:port accepts a connection. False if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def http_request(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request to 127.0.0.1:port, sent as is (the target is not re-encoded).

    Returns (status, lower-cased headers, body).
    """
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body or method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body if body else None)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@dataclass
class Proc:
    """A process started by `Processes.start`; stdout and stderr go to files (read them with `.output()`)."""

    name: str
    args: list[str]
    popen: subprocess.Popen
    port: int | None
    stdout_path: Path
    stderr_path: Path
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) so far."""
        return (
            self.stdout_path.read_text(errors="replace"),
            self.stderr_path.read_text(errors="replace"),
        )

    def wait(self, timeout: float = STARTUP_TIMEOUT) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        """Terminate the process (its whole process group), then kill it if it lingers."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)


class Processes:
    """Start real processes from the repo root; `stop_all()` ends every one of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        args: list[str],
        port: int | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Proc:
        """Start `args` in the repo root; if `port` and `wait`, return once it listens there.

        Raises RuntimeError with the process's output if it exits or does not listen in time.
        """
        n = len(self.procs)
        out = self.workdir / f"{name}-{n}.out"
        err = self.workdir / f"{name}-{n}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(
                args,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # own process group: stop() ends children too
            )
        proc = Proc(name, args, popen, port, out, err)
        self.procs.append(proc)
        if port is not None and wait and not wait_listening(port, popen):
            proc.stop()
            stdout, stderr = proc.output()
            raise RuntimeError(
                f"{name} did not listen on port {port} (exit code {popen.returncode}):\n"
                f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-4000:]}"
            )
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()


def make_confdir(path: Path, overrides: dict[str, object] | None = None, conf: Path | None = None) -> Path:
    """A mitmproxy confdir at `path` whose config.yaml holds `overrides` (after the text of `conf`, if given).

    Tests never read the user's mitm.conf (edit it freely: `make test` stays green): without `conf` the file
    holds the overrides only, and every other option is its addon's default, which is what the shipped
    mitm.conf gives too (it sets no openflare_* key). With `conf`, each `key: value` line of an overridden
    key is replaced (JSON is YAML), missing keys are appended.
    """
    path.mkdir(parents=True, exist_ok=True)
    lines = conf.read_text().splitlines() if conf is not None else []
    for key, value in (overrides or {}).items():
        line = f"{key}: {json.dumps(value)}"
        hits = [i for i, x in enumerate(lines) if x.startswith(f"{key}:")]
        for i in hits:
            lines[i] = line
        if not hits:
            lines.append(line)
    (path / "config.yaml").write_text("\n".join(lines) + "\n")
    return path


def mitmdump_args(
    port: int,
    confdir: Path,
    scripts: list[str],
    mode: str | None = None,
    options: dict[str, object] | None = None,
    quiet: bool = False,
) -> list[str]:
    """The command line of a mitmdump listening on 127.0.0.1:port with the given `-s` scripts and `--set`s."""
    args = [str(MITMDUMP), "--set", f"confdir={confdir}", "--listen-host", "127.0.0.1", "-p", str(port)]
    if mode:
        args += ["--mode", mode]
    if quiet:
        args.append("-q")
    for key, value in (options or {}).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        args += ["--set", f"{key}={value}"]
    for script in scripts:
        args += ["-s", script]
    return args


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("procs"))
    yield procs
    procs.stop_all()


@pytest.fixture(scope="module")
def upstream(processes) -> Proc:
    """The demo app (scripts/upstream.py) on a free port, for the whole test module."""
    port = free_port()
    return processes.start("upstream", [sys.executable, str(UPSTREAM_SCRIPT), "--port", str(port)], port)


@pytest.fixture(scope="module")
def mitmdump(processes, tmp_path_factory):
    """Factory: start a real mitmdump from the repo root and wait until it listens.

    mitmdump(scripts=["addons/features.py", ...], mode="reverse:http://...", options={"k": v},
             env={...}, conf={"k": v}, wait=True) -> Proc
    Its confdir is a fresh temporary directory whose config.yaml holds `conf` only (never the user's
    mitm.conf), with the embedded ban store's socket in that directory (`proc.extra["ban_socket"]`) unless
    `conf` names one; `options` go to `--set` (which wins over the file, as in `make run`).
    With wait=False it returns at once (to watch it fail at startup: `proc.wait()`, `proc.output()`).
    """

    def start(
        scripts: list[str],
        mode: str | None = None,
        options: dict[str, object] | None = None,
        env: dict[str, str] | None = None,
        conf: dict[str, object] | None = None,
        wait: bool = True,
    ) -> Proc:
        port = free_port()
        path = tmp_path_factory.mktemp("confdir")
        # Its own embedded ban store: never one shared with another test proxy or a `make run` in the repo.
        confdir = make_confdir(path, {"openflare_ban_socket": str(path / "bans.sock"), **(conf or {})})
        args = mitmdump_args(port, confdir, scripts, mode, options)
        proc = processes.start("mitmdump", args, port, env=env, wait=wait)
        proc.extra["confdir"] = confdir
        proc.extra["ban_socket"] = (conf or {}).get("openflare_ban_socket", str(path / "bans.sock"))
        return proc

    return start


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The model the tests with real verdicts use: models/openflare-local.npz (the default of
    openflare_model) unless OPENFLARE_TEST_MODEL names another. Fails if it is missing."""
    path = Path(os.environ.get("OPENFLARE_TEST_MODEL") or SHIPPED_MODEL)
    if not path.is_file():
        pytest.fail(f"model {path} not found: the shipped model is part of the repo (`make train` rebuilds it)")
    return path


@pytest.fixture(scope="session")
def model_conf(model_path) -> dict[str, object]:
    """Option overrides selecting `model_path`: empty for the shipped model (openflare_model's default)."""
    return {} if model_path == SHIPPED_MODEL else {"openflare_model": str(model_path)}
