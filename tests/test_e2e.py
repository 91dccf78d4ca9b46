"""End to end: a real mitmdump with our addons in reverse mode in front of the real demo upstream.

One mitmdump for the whole module (starting one loads the model: seconds). Real HTTP over loopback:
attacks get the fixed 403 without reaching the app; benign requests get the app's answer byte for byte.
"""

import json
import random
import shutil

import pytest

from addons import common
from addons import model
from conftest import http_request

pytestmark = pytest.mark.e2e

ADDONS = ["addons/features.py", "addons/scorer.py"]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}
UA = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"}


@pytest.fixture(scope="module")
def proxy(upstream, mitmdump, model_conf):
    return mitmdump(ADDONS, mode=f"reverse:{upstream.url}", conf=model_conf)


# Sent with a browser's User-Agent (except the header attack): the payload must be what gets refused.
ATTACKS = {
    "query": ("GET", "/?id=1%27%20OR%20%271%27=%271", UA, b""),
    "path": ("GET", "/static/..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", UA, b""),
    "header": ("GET", "/search?q=shoes", {"User-Agent": "<script>alert(document.cookie)</script>"}, b""),
    "form": ("POST", "/login", {**UA, **FORM}, b"user=admin%27%20OR%201%3D1--&password=x"),
    "json": ("POST", "/api/items", {**UA, **JSON}, json.dumps({"q": "1' UNION SELECT username, password FROM users--"}).encode()),
}

BINARY = random.Random(7).randbytes(200_000)
BENIGN = {
    "get": ("GET", "/search?q=blue+shoes&page=2", UA, b""),
    "index": ("GET", "/", UA, b""),
    "form": ("POST", "/login", {**UA, **FORM}, b"user=alice&password=correct+horse"),
    "json": ("POST", "/api/cart", {**UA, **JSON}, json.dumps({"item": "shoes", "qty": 2, "size": 42}).encode()),
    "binary upload": ("POST", "/upload", {**UA, "Content-Type": "application/octet-stream"}, BINARY),
    "binary download": ("GET", "/bytes/300000", UA, b""),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_refused(proxy, name):
    method, target, headers, body = ATTACKS[name]
    status, resp_headers, resp_body = http_request(proxy.port, method, target, headers, body)
    assert status == common.BLOCK_STATUS
    assert resp_body == common.BLOCK_BODY
    assert "x-upstream" not in resp_headers  # the app never saw it
    assert "server" not in resp_headers


@pytest.mark.parametrize("name", BENIGN)
def test_benign_passes_byte_for_byte(proxy, upstream, name):
    method, target, headers, body = BENIGN[name]
    direct = http_request(upstream.port, method, target, headers, body)
    via = http_request(proxy.port, method, target, headers, body)
    assert direct[0] == 200
    assert via[0] == direct[0]
    assert via[1]["x-upstream"] == "openflare-demo"
    assert via[2] == direct[2]
    if name not in ("index", "binary download"):
        assert via[2] == f"{method} {target}\n".encode() + body  # the app got the request as sent


def test_make_run_bundle(upstream, mitmdump, model_conf, tmp_path_factory):
    """What `make run` loads: every addon as one script (addons/openflare.py), on embedded defaults."""
    records = tmp_path_factory.mktemp("records")
    conf = {**model_conf, "openflare_record_dir": str(records / "store"), "openflare_record_spill": str(records / "spill")}
    proc = mitmdump(["addons/openflare.py"], mode=f"reverse:{upstream.url}", conf=conf,
                    env={"OPENFLARE_REDIS_URL": "", "OPENFLARE_MONGO_URI": ""})  # fmt: skip
    method, target, headers, body = ATTACKS["query"]
    status, resp_headers, resp_body = http_request(proc.port, method, target, headers, body)
    assert (status, resp_body) == (common.BLOCK_STATUS, common.BLOCK_BODY)
    assert "x-upstream" not in resp_headers
    method, target, headers, body = BENIGN["form"]
    via = http_request(proc.port, method, target, headers, body)
    direct = http_request(upstream.port, method, target, headers, body)
    assert (via[0], via[1]["x-upstream"], via[2]) == (200, "openflare-demo", direct[2])


def test_wrong_model_sha256_stops_startup(mitmdump, model_path, tmp_path):
    copy = tmp_path / "tampered.npz"
    shutil.copyfile(model_path, copy)
    card = json.loads(model.card_path(model_path).read_text())
    card["sha256"] = "0" * 64
    model.card_path(copy).write_text(json.dumps(card))
    proc = mitmdump(ADDONS, mode="reverse:http://127.0.0.1:9", conf={"openflare_model": str(copy)}, wait=False)
    assert proc.wait(timeout=60) != 0
    stdout, stderr = proc.output()
    assert "Error logged during startup" in stderr
    assert "does not match its card" in stdout


@pytest.mark.parametrize("kind", ["always benign", "scoring raises"])
def test_a_model_failing_the_probe_check_stops_startup(mitmdump, tmp_path, kind):
    from test_scorer import TAMPERS, tampered_model

    path = tampered_model(kind, tmp_path)
    proc = mitmdump(ADDONS, mode="reverse:http://127.0.0.1:9", conf={"openflare_model": str(path)}, wait=False)
    assert proc.wait(timeout=60) != 0
    stdout, stderr = proc.output()
    assert "Error logged during startup" in stderr
    assert "refused by the probe check: " in stdout and TAMPERS[kind] in stdout

