"""End to end: what `make run UPSTREAM=...` serves to a public client, and what a wrong UPSTREAM says.

The public client is a real one: a network namespace holding 45.33.32.156 (a global address, as
mitmproxy's block addon sees it), joined to this namespace by a veth pair; mitmdump (the Makefile's bundle,
in reverse mode, with the default options: mitm.conf ships none set) and the demo app run here. Needs root
and iproute2; skipped with the reason otherwise. The namespace and the veth pair are removed even when a
test fails.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from addons import common
from conftest import MAKE
from conftest import REPO
from conftest import free_port
from conftest import http_request
from conftest import make_confdir
from conftest import mitmdump_args

pytestmark = pytest.mark.e2e

CLIENT_IP = "45.33.32.156"  # global (ipaddress.is_global), as mitmproxy's block_global sees it
HOST_IP = "45.33.32.1"
NET = 24
CLEAN = {"OPENFLARE_REDIS_URL": "", "OPENFLARE_MONGO_URI": ""}

# Run inside the namespace: one HTTP/1.1 request, the answer as "status\nx-upstream\nbody" (or the error).
CLIENT = r"""
import http.client, sys
host, port, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    c = http.client.HTTPConnection(host, port, timeout=20)
    c.request("GET", target, headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"})
    r = c.getresponse()
    sys.stdout.write(f"{r.status}\n{r.getheader('x-upstream')}\n" + r.read().decode("latin-1"))
except (OSError, http.client.HTTPException) as e:
    sys.stdout.write(f"error\n{type(e).__name__}\n{e}")
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture(scope="module")
def public_net():
    """A namespace holding CLIENT_IP, reachable from here at HOST_IP; removed afterwards, whatever happened."""
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip("a public client needs a network namespace, and creating one needs root")
    if shutil.which("ip") is None:
        pytest.skip("a public client needs a network namespace: iproute2's `ip` is not installed")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"ofwaf{tag}", f"ofh{tag}", f"ofc{tag}"
    made = _ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        for step in (
            ["link", "add", host_if, "type", "veth", "peer", "name", ns_if],
            ["link", "set", ns_if, "netns", ns],
            ["addr", "add", f"{HOST_IP}/{NET}", "dev", host_if],
            ["link", "set", host_if, "up"],
            ["-n", ns, "addr", "add", f"{CLIENT_IP}/{NET}", "dev", ns_if],
            ["-n", ns, "link", "set", ns_if, "up"],
            ["-n", ns, "link", "set", "lo", "up"],
        ):
            _ip(*step)
        yield ns
    finally:
        _ip("netns", "del", ns, check=False)  # takes the namespace's end of the pair, and so the pair
        _ip("link", "del", host_if, check=False)  # in case the pair never moved into the namespace


def from_public(ns: str, port: int, target: str) -> tuple[str, str, str]:
    """(status or 'error', x-upstream header or the error's type, body or message) of a request from CLIENT_IP."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, HOST_IP, str(port), target],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    status, header, body = (out.stdout.split("\n", 2) + ["", ""])[:3]
    return status, header, body


def wait_listening_on(host: str, port: int, proc, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            break
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    proc.stop()
    raise RuntimeError("mitmdump did not listen:\n" + "\n".join(proc.output()))


def makefile_addons() -> list[str]:
    """The scripts `make run` loads (the Makefile's ADDONS line)."""
    line = next(ln for ln in (REPO / "Makefile").read_text().splitlines() if ln.startswith("ADDONS :="))
    words = line.split()[2:]
    return [w for w, prev in zip(words, ["", *words]) if prev == "-s"]


def start_reverse(processes, tmp_path_factory, upstream_url: str, model_conf: dict, options: dict | None = None,
                  listen: str = HOST_IP, wait: bool = True):  # fmt: skip
    """mitmdump as `make run UPSTREAM=...` starts it, on the default options, listening on `listen`."""
    port = free_port()
    records = tmp_path_factory.mktemp("records")
    opts = {**model_conf, "openflare_record_dir": str(records / "store"),
            "openflare_record_spill": str(records / "spill.jsonl"), **(options or {})}  # fmt: skip
    args = mitmdump_args(port, make_confdir(tmp_path_factory.mktemp("confdir")), makefile_addons(),
                         mode=f"reverse:{upstream_url}", options=opts)  # fmt: skip
    args[args.index("--listen-host") + 1] = listen
    proc = processes.start("mitmdump", args, env=CLEAN)
    proc.port = port
    if wait:
        wait_listening_on(listen, port, proc)
    return proc


def test_public_client_is_served_in_reverse_mode(public_net, upstream, processes, tmp_path_factory, model_conf):
    """The issue's case: 45.33.32.156 was reset by block_global while 127.0.0.1 got 200."""
    proc = start_reverse(processes, tmp_path_factory, upstream.url, model_conf)
    status, header, body = from_public(public_net, proc.port, "/search?q=blue+shoes")
    assert (status, header) == ("200", "openflare-demo"), (status, header, body)
    assert body == "GET /search?q=blue+shoes\n"
    status, header, body = from_public(public_net, proc.port, "/?id=1%27%20OR%20%271%27=%271")
    assert (status, body) == (str(common.BLOCK_STATUS), common.BLOCK_BODY.decode()), (status, header, body)
    assert header == "None"  # the app never saw it
    stdout, _ = proc.output()
    assert "clients with public addresses are served" in stdout
    assert "killed by block_global" not in stdout
    assert f"{CLIENT_IP}:" in stdout  # mitmdump saw the public address itself


def test_block_global_true_keeps_public_clients_out(public_net, upstream, processes, tmp_path_factory, model_conf):
    """`--set block_global=true` survives: the user keeps mitmproxy's protection in reverse mode."""
    proc = start_reverse(processes, tmp_path_factory, upstream.url, model_conf, {"block_global": True})
    status, header, body = from_public(public_net, proc.port, "/search?q=blue+shoes")
    assert status == "error", (status, header, body)
    stdout, _ = proc.output()
    assert f"Client connection from {CLIENT_IP} killed by block_global option." in stdout
    assert "public addresses get a connection reset" in stdout


def test_regular_mode_keeps_block_global(public_net, processes, tmp_path_factory, model_conf):
    """A regular proxy must not become an open proxy on the internet: public clients stay refused."""
    port = free_port()
    records = tmp_path_factory.mktemp("records")
    opts = {**model_conf, "openflare_record_dir": str(records / "store"), "openflare_record_spill": str(records / "s")}
    args = mitmdump_args(port, make_confdir(tmp_path_factory.mktemp("confdir")), makefile_addons(), options=opts)
    args[args.index("--listen-host") + 1] = HOST_IP
    proc = processes.start("mitmdump", args, env=CLEAN)
    wait_listening_on(HOST_IP, port, proc)
    status, _, _ = from_public(public_net, port, "http://127.0.0.1:9/")
    assert status == "error"
    assert f"Client connection from {CLIENT_IP} killed by block_global option." in proc.output()[0]


def test_upstream_without_scheme_stops_mitmdump(processes, tmp_path_factory, model_conf):
    proc = start_reverse(processes, tmp_path_factory, "127.0.0.1:8000", model_conf, listen="127.0.0.1", wait=False)
    assert proc.wait(timeout=90) != 0
    stdout, stderr = proc.output()
    assert "Error logged during startup" in stderr
    assert "--mode reverse:127.0.0.1:8000: the upstream has no scheme" in stdout
    assert "Write reverse:http://127.0.0.1:8000" in stdout
    assert "Traceback" not in stdout + stderr


def test_make_run_upstream_without_scheme_fails_before_starting():
    out = subprocess.run([*MAKE, "run", "UPSTREAM=127.0.0.1:8000", f"PORT={free_port()}"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode != 0
    assert "UPSTREAM=127.0.0.1:8000: give the scheme, e.g. UPSTREAM=http://127.0.0.1:8000" in out.stderr
    assert "mitmdump" not in out.stdout  # the recipe never ran


def test_unreachable_upstream_is_warned_about_and_rechecked(processes, tmp_path_factory, model_conf):
    """Warn loudly at startup, keep trying, and say so once the app answers (then requests are served)."""
    dead = free_port()
    proc = start_reverse(processes, tmp_path_factory, f"http://127.0.0.1:{dead}", model_conf,
                         {"openflare_upstream_check": 1}, listen="127.0.0.1")  # fmt: skip
    deadline = time.monotonic() + 30
    while "is unreachable" not in proc.output()[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    stdout, _ = proc.output()
    assert f"upstream http://127.0.0.1:{dead} is unreachable (connection refused)" in stdout
    assert "requests get no answer (mitmproxy closes the connection, refusals too) until it accepts connections; " \
           "checking again every 1 s" in stdout
    with pytest.raises(http.client.RemoteDisconnected):  # what the warning says: no answer at all
        http_request(proc.port, "GET", "/search?q=shoes")
    app = processes.start("upstream", [sys.executable, str(REPO / "scripts" / "upstream.py"), "--port", str(dead)], dead)
    deadline = time.monotonic() + 30
    while "answers now" not in proc.output()[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"upstream http://127.0.0.1:{dead} answers now" in proc.output()[0]
    assert http_request(proc.port, "GET", "/search?q=shoes")[0] == 200
    app.stop()
