"""The `openflare` console script against running mitmdump reverse proxies, which follow within a second.

Two stores: the shared Redis at 127.0.0.1:6379 under this module's own key prefix (only its keys are
deleted), and a proxy on embedded defaults (no Redis), whose in-process ban store the CLI reaches through
the proxy's socket. Client addresses are simulated with X-Forwarded-For from a trusted 127.0.0.1.
A key deleted behind the events channel's back (what `redis-cli del` does; redis-py's DEL here) is followed
by the proxies' reconcile.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from conftest import wait_listening
from test_bans import build_model
from test_bans_e2e import get
from test_bans_e2e import poll
from test_bans_e2e import wait_output

pytestmark = pytest.mark.e2e

REDIS_URL = os.environ.get("OPENFLARE_TEST_REDIS", "redis://127.0.0.1:6379/0")
SCRIPTS = ["addons/features.py", "addons/bans.py", "addons/scorer.py"]
OPENFLARE = Path(sys.executable).parent / "openflare"
FOLLOW = 1.0  # seconds: the most a running proxy may take to follow a change


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("model") / "cli-e2e.npz")


@pytest.fixture(scope="module")
def prefix():
    p = f"oftest:{uuid.uuid4().hex[:12]}:"
    yield p
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=p + "*"))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture(scope="module", params=["redis", "embedded"])
def target(request, mitmdump, upstream, model, prefix, tmp_path_factory):
    """(proxy, CLI store arguments, a raw Redis client of the same store) for each kind of store."""
    conf = {"openflare_model": str(model), "openflare_trusted_proxies": ["127.0.0.1"], "openflare_llm_enabled": False,
            "openflare_rate_limit": 0}  # fmt: skip
    if request.param == "redis":
        conf |= {"openflare_redis_url": REDIS_URL, "openflare_redis_prefix": prefix}
    proc = mitmdump(SCRIPTS, mode=f"reverse:{upstream.url}", conf=conf, env={"OPENFLARE_REDIS_URL": ""}, wait=False)
    assert wait_listening(proc.port, proc.popen), proc.output()
    if request.param == "redis":
        assert wait_output(proc, "Redis reachable"), proc.output()
        args, raw, key_prefix = ["--redis-url", REDIS_URL, "--prefix", prefix], redis.Redis.from_url(REDIS_URL), prefix
    else:
        sock = proc.extra["ban_socket"]
        assert wait_output(proc, f"in-process ban store ready (served on {sock})"), proc.output()
        args, raw, key_prefix = ["--ban-socket", sock], redis.Redis(unix_socket_path=sock), "openflare:"
    yield proc, args, raw, key_prefix, tmp_path_factory.mktemp("cwd")
    raw.close()


def openflare(target, *argv) -> subprocess.CompletedProcess:
    """The installed console script, run as an operator would, in a directory of its own (no mitm.conf)."""
    _, args, _, _, cwd = target
    env = {k: v for k, v in os.environ.items() if k not in ("OPENFLARE_REDIS_URL", "OPENFLARE_MONGO_URI")}
    res = subprocess.run([str(OPENFLARE), *argv, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def followed(proc, client: str, status: int) -> float:
    """Seconds until the proxy answers `client` with `status` (from now: the CLI has just returned)."""
    took = poll(lambda: get(proc, "/hello", client), status, 5.0)
    assert took is not None, f"{client} never got {status}: {proc.output()[1][-2000:]}"
    assert took < FOLLOW, f"{client} got {status} only after {took:.2f} s"
    return took


def test_bans_add_remove_are_followed_within_a_second(target):
    proc = target[0]
    assert get(proc, "/hello", "198.51.100.40") == 200
    res = openflare(target, "bans", "add", "198.51.100.40", "600", "--reason", "cli e2e")
    assert res.returncode == 0, res.stderr
    followed(proc, "198.51.100.40", 403)
    assert get(proc, "/hello", "198.51.100.41") == 200  # only that address
    rows = json.loads(openflare(target, "bans", "list", "--json").stdout)
    assert [(r["ip"], r["reason"]) for r in rows] == [("198.51.100.40", "cli e2e")] and 590 < rows[0]["seconds_left"] <= 600
    assert "198.51.100.40" in openflare(target, "bans").stdout
    assert openflare(target, "bans", "remove", "198.51.100.40").returncode == 0
    followed(proc, "198.51.100.40", 200)
    assert json.loads(openflare(target, "bans", "--json").stdout) == []


def test_allow_add_remove_are_followed_within_a_second(target):
    proc = target[0]
    assert openflare(target, "bans", "add", "198.51.100.42", "600").returncode == 0
    followed(proc, "198.51.100.42", 403)
    assert openflare(target, "allow", "add", "198.51.100.0/24", "600").returncode == 0
    followed(proc, "198.51.100.42", 200)  # allowlisted: served despite its ban
    assert "198.51.100.0/24" in openflare(target, "allow", "list").stdout
    assert openflare(target, "allow", "remove", "198.51.100.0/24").returncode == 0
    followed(proc, "198.51.100.42", 403)
    res = openflare(target, "allow", "add", "not-a-range")
    assert res.returncode == 2 and "not an IP address or CIDR range" in res.stderr
    assert openflare(target, "bans", "remove", "198.51.100.42").returncode == 0
    followed(proc, "198.51.100.42", 200)


def test_a_ban_key_deleted_behind_the_proxys_back_is_followed(target):
    proc, _, raw, key_prefix, _ = target
    assert openflare(target, "bans", "add", "198.51.100.43", "600").returncode == 0
    followed(proc, "198.51.100.43", 403)
    assert raw.delete(f"{key_prefix}ban:198.51.100.43") == 1  # what `redis-cli del` does: no event published
    started = time.monotonic()
    followed(proc, "198.51.100.43", 200)
    assert time.monotonic() - started < FOLLOW
    assert "changed in the store without an event: ban 198.51.100.43 removed" in "".join(proc.output())
