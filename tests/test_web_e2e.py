"""End to end: `make web` is the dashboard. Its UI port and host, how to log in, the flows it keeps.

A real `make web` (mitmweb with the bundle) in reverse mode in front of the demo app: the UI listens on
WEB_HOST:WEB_PORT, answers only with the token mitmweb logs, logs the dashboard URL with the command bar
open, shows each flow's verdict in its comment and the client's address, and keeps at most
openflare_view_max_flows flows.
"""

import json
import re
import time
import urllib.error
import urllib.request

import pytest

from conftest import MAKE
from conftest import free_port
from conftest import http_request
from conftest import wait_listening

pytestmark = pytest.mark.e2e

SQLI = "/?id=1%27%20OR%20%271%27=%271"
CLEAN = {"OPENFLARE_REDIS_URL": "", "OPENFLARE_MONGO_URI": ""}


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_make_web(processes, upstream, model_path, tmp_path_factory):
    port, web_port = free_port(), free_port()
    records = tmp_path_factory.mktemp("records")
    args = " ".join([
        "--set web_open_browser=false", "--set openflare_view_max_flows=5", f"--set openflare_model={model_path}",
        "--set openflare_record=false", f"--set openflare_record_dir={records}",
        f"--set openflare_record_spill={records / 's.jsonl'}",
    ])  # fmt: skip
    proc = processes.start("make", [*MAKE, "web", f"PORT={port}", f"WEB_PORT={web_port}", "WEB_HOST=127.0.0.1",
                                    f"UPSTREAM={upstream.url}", f"ARGS={args}"], env=CLEAN)  # fmt: skip
    if not (wait_listening(web_port, proc.popen) and wait_listening(port, proc.popen)):
        proc.stop()
        pytest.fail("make web did not listen:\n" + "\n".join(proc.output()))
    deadline = time.monotonic() + 30
    while "OpenFlare dashboard" not in proc.output()[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    stdout, _ = proc.output()
    m = re.search(rf"Web server listening at http://127\.0\.0\.1:{web_port}/\?token=(\w+)", stdout)
    assert m, stdout
    token = m.group(1)
    assert f"OpenFlare dashboard (mitmweb, command bar open): http://127.0.0.1:{web_port}/?token={token}#/flows?c=true" in stdout

    base = f"http://127.0.0.1:{web_port}"
    assert get(f"{base}/flows")[0] == 403
    status, page = get(f"{base}/")
    assert status == 403 and b"Authentication Required" in page  # the login page: the token (or web_password)
    assert get(f"{base}/?token={token}")[0] == 200

    assert http_request(port, "GET", SQLI)[0] == 403
    for i in range(11):
        assert http_request(port, "GET", f"/search?q=shoes+{i}")[0] == 200
    time.sleep(2.5)  # the cap is applied once a second
    status, body = get(f"{base}/flows?token={token}")
    assert status == 200
    flows = json.loads(body)
    assert len(flows) == 5  # the newest five; the attack (the oldest) was dropped
    assert [f["request"]["path"] for f in flows] == [f"/search?q=shoes+{i}" for i in range(6, 11)]
    assert all(f["comment"].startswith("pass ") and " openflare (" in f["comment"] for f in flows)
    assert all(f["client_conn"]["peername"][0] == "127.0.0.1" for f in flows)
    proc.stop()
