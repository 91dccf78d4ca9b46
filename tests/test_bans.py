"""The IpBans addon (addons/bans.py) in a taddons context, against the real Redis at 127.0.0.1:6379."""

import asyncio
import contextlib
import os
import time
import uuid
from pathlib import Path

import models
import pytest
import redis.asyncio as aioredis
from mitmproxy import eventsequence
from mitmproxy import exceptions
from mitmproxy import http
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons import bans as bans_addon
from addons import common
from addons import model
from addons.bans import IpBans
from addons.features import FeatureExtractor
from addons.scorer import Scorer
from conftest import REPO, free_port

REDIS_URL = os.environ.get("OPENFLARE_TEST_REDIS", "redis://127.0.0.1:6379/0")
SQLI = b"/?id=1%27%20OR%20%271%27=%271"
MY_OPTIONS = {
    "openflare_redis_url": None,
    "openflare_redis_prefix": "openflare:",
    "openflare_ban_socket": "data/bans.sock",
    "openflare_redis_fail": "open",
    "openflare_ban_action": "refuse",
    "openflare_strikes": 3,
    "openflare_strike_window": 600,
    "openflare_ban_seconds": 3600,
    "openflare_ban_max_seconds": 604800,
    "openflare_ban_memory": 2592000,
    "openflare_allowlist": [],
    "openflare_ipv6_prefix": 64,
    "openflare_rate_limit": 100,
}


def build_model(path: Path) -> Path:
    """A tiny throwaway field model (with a verified card) that scores obvious SQLi/XSS 10 and plain pages 1:
    `path` names the .npz to write (tests/models.py)."""
    return models.save(models.attack_model(), path.parent, path.name.removesuffix(model.MODEL_SUFFIX), "bans-test")


@pytest.fixture(scope="module")
def attack_model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "bans-test.npz")


@pytest.fixture
async def prefix():
    p = f"oftest:{uuid.uuid4().hex[:12]}:"
    yield p
    r = aioredis.from_url(REDIS_URL)
    keys = [k async for k in r.scan_iter(match=p + "*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


async def _stop(addon: IpBans) -> None:
    store, addon.store = addon.store, None
    if store is not None:
        await store.close()


@pytest.fixture
async def bans(prefix, monkeypatch):
    """(addon, tctx): IpBans on the shared Redis under this test's prefix, running."""
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    addon = IpBans()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, openflare_redis_url=REDIS_URL, openflare_redis_prefix=prefix)
        addon.running()
        assert await addon.store.wait_synced(), "Redis not reachable: .ci/run starts redis-server on 127.0.0.1:6379"
        yield addon, tctx
        await _stop(addon)


def flow(ip: str = "203.0.113.7", path: bytes = b"/", verdict: str | None = None, method: bytes = b"GET", headers=(), score=None):
    f = tflow.tflow(req=tutils.treq(path=path, method=method))
    for k, v in headers:
        f.request.headers[k] = v
    f.client_conn.peername = (ip, 40000)
    f.metadata[common.CLIENT_IP] = ip
    if verdict:
        f.metadata[common.VERDICT] = verdict
        f.metadata[common.REASON] = "local score 10 > threshold 6"
    if score is not None:
        f.metadata[common.SCORE] = score
    return f


# What a browser sends for <img src="https://us/?q=attack"> on another site (Chrome, Firefox, Safari 16.4+).
CROSS_SITE_IMAGE = [("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "no-cors"), ("Sec-Fetch-Dest", "image")]


async def until(pred, timeout: float = 3.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def attack(addon: IpBans, ip: str, headers=(), score=None):
    """One request refused by the Scorer: the 403 it set reaches IpBans.response."""
    f = flow(ip, SQLI, common.VERDICT_BLOCK, headers=headers, score=score)
    await addon.requestheaders(f)
    if f.response is None:
        f.response = tutils.tresp(status_code=403)
        await addon.response(f)
    return f


async def served(addon: IpBans, ip: str) -> bool:
    f = flow(ip)
    await addon.requestheaders(f)
    return f.response is None and f.error is None


# --- options ---


def test_every_option_has_its_documented_default():
    """The defaults live in the addon (mitm.conf only documents them: tests/test_config.py checks that)."""
    addon = IpBans()
    with taddons.context(addon, FeatureExtractor()) as tctx:
        for name, default in MY_OPTIONS.items():
            assert getattr(tctx.options, name) == default, name


@pytest.mark.parametrize(
    "bad",
    [
        {"openflare_strikes": 0},
        {"openflare_strike_window": 0},
        {"openflare_ban_seconds": -5},
        {"openflare_rate_limit": -1},
        {"openflare_ipv6_prefix": 129},
        {"openflare_redis_fail": "maybe"},
        {"openflare_ban_action": "tarpit"},
        {"openflare_allowlist": ["10.0.0.0/8", "not-a-net"]},
        {"openflare_redis_url": "http://127.0.0.1:6379"},
        {"openflare_redis_prefix": ""},
    ],
)
def test_bad_options_are_refused(bad):
    addon = IpBans()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, **bad)


async def test_without_redis_the_embedded_store_is_used_with_a_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    caplog.set_level("INFO")
    sock = str(tmp_path / "bans.sock")
    addon = IpBans()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, openflare_strikes=1, openflare_ban_socket=sock)
        addon.running()
        try:
            assert "using the in-process ban store; bans kept in " + str(tmp_path / "bans.json") in caplog.text
            assert await addon.store.wait_synced()
            # The messages say the store actually in use: no "Redis reachable", no "redis=up".
            assert f"in-process ban store ready (served on {sock}), 0 bans loaded" in caplog.text
            assert "Redis reachable" not in caplog.text
            assert tctx.command(addon.banstats)[-1] == f"store=in-process (served on {sock})"
            await attack(addon, "198.51.100.1")
            assert not await served(addon, "198.51.100.1")
        finally:
            await _stop(addon)
    assert not (tmp_path / "bans.sock").exists()


async def test_a_second_process_without_redis_shares_the_first_ones_store(monkeypatch, caplog, tmp_path):
    """Two proxies started in one directory (workers on one host): the second uses the first's store."""
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    caplog.set_level("INFO")
    sock = str(tmp_path / "bans.sock")
    class OtherIpBans(IpBans):  # one mitmproxy context holds one addon per name
        pass

    first, second = IpBans(), OtherIpBans()
    with taddons.context(first, second) as tctx:
        tctx.configure(first, openflare_strikes=1, openflare_ban_socket=sock)
        first.running()
        second.running()
        try:
            assert await first.store.wait_synced() and await second.store.wait_synced()
            assert f"sharing the in-process ban store of process {os.getpid()} through {sock}" in caplog.text
            assert f"shared ban store reachable (process {os.getpid()} through {sock})" in caplog.text
            assert tctx.command(second.banstats)[-1] == f"store=shared process {os.getpid()} through {sock} up"
            await attack(second, "198.51.100.2")  # struck and banned through the socket...
            deadline = time.monotonic() + 1
            while await served(first, "198.51.100.2") and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not await served(first, "198.51.100.2")  # ...and the owner refuses it too
        finally:
            await _stop(second)
            await _stop(first)


def test_a_socket_path_that_cannot_be_one_is_refused():
    addon = IpBans()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="openflare_ban_socket: socket path too long"):
            tctx.configure(addon, openflare_ban_socket="data/" + "x" * 200)


async def test_the_url_comes_from_the_environment(monkeypatch, prefix):
    monkeypatch.setenv("OPENFLARE_REDIS_URL", REDIS_URL)
    addon = IpBans()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, openflare_redis_prefix=prefix)
        assert addon.url == REDIS_URL
    monkeypatch.setenv("OPENFLARE_REDIS_URL", "redis://:secret@127.0.0.1:1/0")
    addon = IpBans()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, openflare_redis_url=REDIS_URL)
        assert addon.url == REDIS_URL  # the option wins over the environment


def test_the_script_loads_as_mitmdump_loads_it():
    with taddons.context() as tctx:
        module = tctx.script(str(REPO / "addons" / "bans.py"))
        assert [type(a).__name__ for a in module.addons] == ["IpBans"]


# --- bans and strikes ---


async def test_three_refusals_ban_the_ip_and_the_ban_refuses_at_once(bans, prefix):
    addon, tctx = bans
    for i in range(3):
        f = await attack(addon, "198.51.100.10")
    assert "banned for 3600 s" in f.comment
    f = flow("198.51.100.10")
    await addon.requestheaders(f)
    assert f.response.status_code == common.BLOCK_STATUS
    assert f.response.content == common.BLOCK_BODY
    assert dict(f.response.headers) == common.BLOCK_HEADERS | {"content-length": str(len(common.BLOCK_BODY))}
    assert f.metadata[common.BANNED] is True and not f.marked and f.comment.startswith("banned openflare (")
    assert "banned" in f.comment and "local score" in f.metadata[common.REASON]
    assert await served(addon, "198.51.100.11")
    # A refused banned request does not strike again (no response hook work for BANNED flows).
    f.metadata[common.VERDICT] = None
    await addon.response(f)
    # The strikes went to Redis in the background (the requests did not wait): Redis counted three and banned.
    assert await until(lambda: addon.store.stats.get("strikes_delivered") == 3)
    assert addon.store.stats["strikes"] == 3 and addon.store.stats["bans"] == 1


async def test_a_refusal_never_waits_for_the_store(bans, prefix):
    """The strike path of a refused request: counted here at once, delivered later; the request does not wait
    for Redis however slow it is (here it never answers until delivery resumes). The third strike bans here."""
    addon, tctx = bans
    store = addon.store
    store.timeout = 3600  # what a request could have waited on a store that does not answer
    store._delivery.cancel()  # the delivery stalls: Redis answers nothing
    with contextlib.suppress(asyncio.CancelledError):
        await store._delivery
    store._delivery = None
    firsts = [await asyncio.wait_for(attack(addon, "198.51.100.20"), 10) for _ in range(2)]  # a hang check only
    assert [f.comment.rsplit("; ", 1)[-1] for f in firsts] == ["strike 1/3", "strike 2/3"]
    assert len(store._outbox) == 2 and "strikes_delivered" not in store.stats
    f = await asyncio.wait_for(attack(addon, "198.51.100.20"), 10)
    assert "banned for 3600 s" in f.comment and store.check("198.51.100.20") is not None  # on this process's count
    assert store.stats["strikes_queued"] == 3 and store.stats["bans_local"] == 1
    store.start()  # delivery resumes: Redis counts the three strikes and bans there too
    assert await until(lambda: store.stats.get("strikes_delivered") == 3)
    assert store.stats["strikes"] == 3 and "strikes_lost" not in store.stats
    r = aioredis.from_url(REDIS_URL)
    try:
        assert await r.exists(f"{prefix}ban:198.51.100.20") == 1
    finally:
        await r.aclose()


async def test_drop_action_kills_the_connection(bans):
    addon, tctx = bans
    tctx.configure(addon, openflare_ban_action="drop", openflare_strikes=1)
    await attack(addon, "198.51.100.12")
    f = flow("198.51.100.12")
    await addon.requestheaders(f)
    assert f.response is None and f.error is not None and f.error.msg == "Connection killed."


async def test_passed_errored_and_detect_only_flows_do_not_strike(bans):
    addon, tctx = bans
    tctx.configure(addon, openflare_strikes=1)
    f = flow("198.51.100.13", verdict=common.VERDICT_PASS)
    f.response = tutils.tresp()
    await addon.response(f)
    f = flow("198.51.100.13", verdict=common.VERDICT_ERROR)
    f.response = tutils.tresp(status_code=403)
    await addon.response(f)
    assert await served(addon, "198.51.100.13")
    f = flow("unknown-peer", verdict=common.VERDICT_BLOCK)
    f.response = tutils.tresp(status_code=403)
    await addon.response(f)  # an unparsable client address is never struck
    assert addon.store.stats.get("strikes", 0) == 0


async def test_ipv6_clients_grouped_by_64_by_default(bans, prefix):
    """A fresh address in a banned /64 is the same client (issue 15: it was served 20/20 at 128)."""
    addon, tctx = bans
    tctx.configure(addon, openflare_strikes=2)
    await attack(addon, "2001:db8:1:2::1")
    await attack(addon, "2001:db8:1:2:ffff::2")
    assert not any([await served(addon, f"2001:db8:1:2:{i:x}::{i:x}") for i in range(1, 21)])
    assert await served(addon, "2001:db8:1:3::1")
    assert addon.bans()[0].startswith("2001:db8:1:2::/64 ")
    r = aioredis.from_url(REDIS_URL)
    try:  # one key per range, not per address
        assert [k async for k in r.scan_iter(match=prefix + "ban:*")] == [f"{prefix}ban:2001:db8:1:2::/64".encode()]
    finally:
        await r.aclose()
    tctx.command(addon.ban, "2001:db8:7:7::1")  # a command's address bans its /64 too
    assert not await served(addon, "2001:db8:7:7::2")


async def test_ipv6_prefix_128_bans_one_address(bans):
    addon, tctx = bans
    tctx.configure(addon, openflare_ipv6_prefix=128, openflare_strikes=1)
    await attack(addon, "2001:db8:1:2::1")
    assert not await served(addon, "2001:db8:1:2::1")
    assert await served(addon, "2001:db8:1:2::3")


@pytest.mark.parametrize(
    "headers",
    [
        CROSS_SITE_IMAGE,
        [("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "no-cors"), ("Sec-Fetch-Dest", "script")],
        [("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "no-cors"), ("Sec-Fetch-Dest", "style")],
        [("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "cors"), ("Sec-Fetch-Dest", "font")],
        [("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "cors"), ("Sec-Fetch-Dest", "empty")],  # fetch()
        [("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "navigate"), ("Sec-Fetch-Dest", "iframe")],
        [("Sec-Fetch-Site", "Cross-Site"), ("Sec-Fetch-Mode", "navigate"), ("Sec-Fetch-Dest", "document")],  # script-driven
    ],
)
async def test_requests_another_site_makes_a_browser_send_are_refused_never_struck(bans, headers):
    """Three <img> links carrying an attack on some page banned every visitor for an hour (issue 15)."""
    addon, tctx = bans
    tctx.configure(addon, openflare_strikes=1)
    for _ in range(3):
        f = await attack(addon, "198.51.100.40", headers)
        assert "no strike (cross-site, no user action)" in f.comment
    assert await served(addon, "198.51.100.40")
    assert addon.store.stats.get("strikes", 0) == 0 and addon.store.stats["strikes_spared_cross_site"] == 3


@pytest.mark.parametrize(
    "headers",
    [
        [("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "navigate"), ("Sec-Fetch-User", "?1")],  # a click
        [("Sec-Fetch-Site", "same-origin"), ("Sec-Fetch-Mode", "no-cors"), ("Sec-Fetch-Dest", "image")],
        [("Sec-Fetch-Site", "same-site"), ("Sec-Fetch-Mode", "cors")],
        [("Sec-Fetch-Site", "none"), ("Sec-Fetch-Mode", "navigate")],  # typed in the address bar
        [],  # curl, sqlmap, an old browser
    ],
)
async def test_the_users_own_requests_strike(bans, headers):
    addon, tctx = bans
    tctx.configure(addon, openflare_strikes=1)
    await attack(addon, "198.51.100.41", headers)
    assert not await served(addon, "198.51.100.41")


async def test_strike_weight_follows_the_score(bans):
    """Score 7 is a third of a strike, 9 two thirds, 10 (or a refusal without a score) a whole one."""
    addon, tctx = bans
    tctx.configure(addon, openflare_strikes=1)
    f = await attack(addon, "198.51.100.42", score=7)
    assert f.comment.endswith("strike 0.33/1")
    f = await attack(addon, "198.51.100.42", score=7)
    assert f.comment.endswith("strike 0.67/1") and await served(addon, "198.51.100.42")
    f = await attack(addon, "198.51.100.42", score=7)
    assert "strike 1: 198.51.100.42 banned for 3600 s" in f.comment and not await served(addon, "198.51.100.42")
    f = await attack(addon, "198.51.100.43", score=9)
    assert f.comment.endswith("strike 0.67/1") and await served(addon, "198.51.100.43")
    await attack(addon, "198.51.100.44", score=10)
    assert not await served(addon, "198.51.100.44")


async def test_allowlist_option_never_strikes_bans_or_limits(bans):
    addon, tctx = bans
    tctx.configure(addon, openflare_allowlist=["10.0.0.0/8", "2001:db8:9::/48"], openflare_strikes=1, openflare_rate_limit=2)
    for ip in ("10.1.2.3", "2001:db8:9::5"):
        await attack(addon, ip)
        assert all([await served(addon, ip) for _ in range(5)])
    with pytest.raises(exceptions.CommandError, match="allowlisted"):
        tctx.command(addon.ban, "10.9.9.9")
    assert addon.store.stats.get("strikes", 0) == 0


async def statuses(addon: IpBans, ip: str, times, now: list[float], headers=()) -> list[int]:
    """The status each request from `ip` gets, sent at these times of the limiter's clock."""
    out = []
    for t in times:
        now[0] = t
        f = flow(ip, headers=headers)
        await addon.requestheaders(f)
        out.append(f.response.status_code if f.response else 200)
    return out


@pytest.fixture
def clock(bans):
    """The per-process rate limiter's clock, set by the test: now[0] (seconds). These tests drive the
    per-process sliding log (a lone proxy without Redis; every proxy while Redis is down); the shared window in
    Redis runs on Redis's clock: tests/test_ratelimit_redis.py."""
    now = [100.0]
    bans[0].limiter.clock = lambda: now[0]
    bans[0].rate_shared = False
    return now


async def test_rate_limit_answers_429_and_strikes_once_per_second(bans, clock):
    addon, tctx = bans
    tctx.configure(addon, openflare_rate_limit=3, openflare_strikes=5)
    got = await statuses(addon, "198.51.100.14", [100.0, 100.125, 100.25, 100.375, 100.5, 100.625], clock)
    assert got == [200, 200, 200, 429, 429, 429]
    f = flow("198.51.100.14")
    await addon.requestheaders(f)
    assert f.response.content == b"Too Many Requests\n" and f.metadata[common.RATE_LIMITED] is True
    assert await until(lambda: addon.store.stats.get("strikes_delivered") == 1)  # in the background
    assert addon.store.stats["strikes"] == 1 and addon.store.stats["rate_limited"] == 4
    assert await served(addon, "198.51.100.15")  # per IP
    # One admitted as each admitted one leaves the span (100.0 at 101.0, ...); refusals strike again from 101.375.
    got = await statuses(addon, "198.51.100.14", [101.0, 101.0625, 101.125, 101.25, 101.3125], clock)
    assert got == [200, 429, 200, 200, 429] and addon.store.stats["strikes"] == 1
    assert await statuses(addon, "198.51.100.14", [101.375], clock) == [429]
    assert await until(lambda: addon.store.stats.get("strikes_delivered") == 2) and addon.store.stats["strikes"] == 2
    tctx.configure(addon, openflare_rate_limit=0)
    assert all([await served(addon, "198.51.100.14") for _ in range(10)])


async def test_rate_limit_admits_the_limit_in_any_one_second_not_twice_it_across_a_boundary(bans, clock):
    """At a limit of 100 a fixed window let 200 requests through in one sliding second (issue 15)."""
    addon, tctx = bans
    tctx.configure(addon, openflare_rate_limit=100, openflare_strikes=50)
    ms = 1 / 1024
    end_of_one = [100.875 + i * ms for i in range(100)]
    start_of_next = [101.0 + i * ms for i in range(100)]
    assert await statuses(addon, "198.51.100.46", end_of_one + start_of_next, clock) == [200] * 100 + [429] * 100
    assert await statuses(addon, "198.51.100.46", [101.875 - ms, 101.875, 101.875 + ms / 2], clock) == [429, 200, 429]


async def test_a_cross_site_flood_is_rate_limited_but_never_struck(bans, clock):
    """A page can make its visitors' browsers flood us (hundreds of <img>): 429, but no strike, no ban."""
    addon, tctx = bans
    tctx.configure(addon, openflare_rate_limit=2, openflare_strikes=1)
    got = await statuses(addon, "198.51.100.45", [100.0, 100.25, 100.5, 100.75, 101.5, 101.75, 102.0], clock, CROSS_SITE_IMAGE)
    assert got == [200, 200, 429, 429, 200, 200, 429]
    assert addon.store.stats.get("strikes", 0) == 0 and addon.store.check("198.51.100.45") is None



def assert_head_refusal(resp: http.Response, status: int, body: bytes) -> None:
    """A refusal to HEAD: no content, the headers of the GET refusal (its content-length included)."""
    assert resp.status_code == status and resp.raw_content == b""
    assert dict(resp.headers) == common.BLOCK_HEADERS | {"content-length": str(len(body))}
    assert common.is_refusal(resp, status, body)


async def test_refusals_to_head_carry_no_body(bans):
    """A body after a HEAD response would be read as the next response on a keep-alive connection."""
    addon, tctx = bans
    tctx.configure(addon, openflare_rate_limit=1, openflare_strikes=5)
    tctx.command(addon.ban, "198.51.100.16")
    f = flow("198.51.100.16", method=b"HEAD")
    await addon.requestheaders(f)
    assert f.metadata[common.BANNED] is True
    assert_head_refusal(f.response, common.BLOCK_STATUS, common.BLOCK_BODY)
    statuses = []
    for method in (b"HEAD", b"HEAD", b"head"):
        f = flow("198.51.100.17", method=method)
        await addon.requestheaders(f)
        statuses.append(f.response.status_code if f.response else 200)
    assert statuses == [200, 429, 429] and f.metadata[common.RATE_LIMITED] is True
    assert_head_refusal(f.response, bans_addon.RATE_STATUS, bans_addon.RATE_BODY)
    f = flow("198.51.100.17")  # and a GET after them still gets the body
    await addon.requestheaders(f)
    assert f.response.status_code == 429 and f.response.content == bans_addon.RATE_BODY


# --- commands ---


async def test_commands_ban_list_unban_allow(bans, prefix):
    addon, tctx = bans
    tctx.command(addon.ban, "198.51.100.20", "60")
    assert not await served(addon, "198.51.100.20")  # at once, before Redis answers
    r = aioredis.from_url(REDIS_URL)
    try:
        deadline = time.monotonic() + 2
        while not await r.exists(prefix + "ban:198.51.100.20") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert 0 < await r.ttl(prefix + "ban:198.51.100.20") <= 60
        [line] = tctx.command(addon.bans)
        assert line.startswith("198.51.100.20 reason=manual ttl=") and "strikes=" in line
        await attack(addon, "198.51.100.21")
        tctx.command(addon.unban, "198.51.100.20")
        assert await served(addon, "198.51.100.20")
        tctx.command(addon.allow, "198.51.100.0/24", "60")
        deadline = time.monotonic() + 2
        while not await r.exists(prefix + "allow:198.51.100.0/24") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert 0 < await r.ttl(prefix + "allow:198.51.100.0/24") <= 60
        tctx.configure(addon, openflare_strikes=1)
        await attack(addon, "198.51.100.21")
        assert await served(addon, "198.51.100.21")
        assert tctx.command(addon.allowlist)[0].startswith("198.51.100.0/24 (added, ")
        tctx.command(addon.disallow, "198.51.100.0/24")
        assert tctx.command(addon.allowlist) == []
        tctx.configure(addon, openflare_allowlist=["10.0.0.0/8"])
        assert tctx.command(addon.allowlist) == ["10.0.0.0/8 (option)"]
        stats = tctx.command(addon.banstats)
        assert any(x.startswith("strikes=") for x in stats)
        assert stats[-1] == "store=redis 127.0.0.1:6379/0 up"
    finally:
        await r.aclose()
    for bad in (("ban", "example.com"), ("ban", "10.0.0.0/8"), ("unban", "x"), ("allow", "10.0.0.0/33"), ("ban", "1.2.3.4", "-1")):
        with pytest.raises(exceptions.CommandError):
            tctx.command(getattr(addon, bad[0]), *bad[1:])


async def test_commands_are_registered_under_their_names(bans):
    addon, tctx = bans
    names = set(tctx.master.commands.commands)
    assert {"openflare.ban", "openflare.unban", "openflare.bans", "openflare.allow", "openflare.disallow",
            "openflare.allowlist", "openflare.banstats"} <= names  # fmt: skip
    tctx.master.commands.call_strings("openflare.ban", ["198.51.100.22"])
    assert not await served(addon, "198.51.100.22")


# --- Redis unreachable ---


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_unreachable_redis_fail_policy(policy, monkeypatch, caplog):
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    addon = IpBans()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, openflare_redis_url=f"redis://127.0.0.1:{free_port()}/0", openflare_redis_fail=policy,
                       openflare_strikes=1)  # fmt: skip
        addon.running()
        try:
            deadline = time.monotonic() + 3
            while "Redis unreachable" not in caplog.text and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            f = flow("198.51.100.30")
            await addon.requestheaders(f)
            if policy == "open":
                assert f.response is None
                assert addon.store.stats["served_redis_down"] == 1
            else:
                assert f.response.status_code == 403 and f.response.content == common.BLOCK_BODY
                assert addon.store.stats["refused_redis_down"] == 1
            f = await attack(addon, "198.51.100.31")  # counted here, queued for Redis, never raised
            if policy == "open":
                assert addon.store.stats["strikes_queued"] == 1 and "strikes_lost" not in addon.store.stats
                assert addon.store.check("198.51.100.31") is not None  # one strike bans (openflare_strikes=1) at once
                assert "banned for" in f.comment
            else:
                assert f.response.status_code == 403 and addon.store.stats["refused_redis_down"] == 2
        finally:
            await _stop(addon)


# --- the whole chain in real order ---


async def test_chain_strikes_the_resolved_client_not_a_spoofed_one(prefix, attack_model, monkeypatch):
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    features, addon, scorer = FeatureExtractor(), IpBans(), Scorer()
    with taddons.context(features, addon, scorer) as tctx:
        tctx.configure(addon, openflare_redis_url=REDIS_URL, openflare_redis_prefix=prefix, openflare_strikes=2)
        tctx.configure(scorer, openflare_model=str(attack_model))
        addon.running()
        try:
            assert await addon.store.wait_synced()

            async def send(peer: str, xff: str, path: bytes = SQLI):
                f = tflow.tflow(req=tutils.treq(path=path, headers=[(b"x-forwarded-for", xff.encode())]), resp=False)
                f.client_conn.peername = (peer, 40000)
                for e in eventsequence.iterate(f):
                    await tctx.master.addons.handle_lifecycle(e)
                return f

            # Untrusted peer: its X-Forwarded-For is ignored, the strikes land on the peer.
            for xff in ("192.0.2.1", "192.0.2.2"):
                f = await send("203.0.113.50", xff)
                assert f.response.status_code == 403 and f.metadata[common.VERDICT] == common.VERDICT_BLOCK
            assert addon.store.check("203.0.113.50") is not None
            assert addon.store.check("192.0.2.1") is None and addon.store.check("192.0.2.2") is None
            f = await send("203.0.113.50", "192.0.2.3", b"/hello")
            assert f.metadata[common.BANNED] and common.VERDICT not in f.metadata  # refused before scoring
            # Trusted proxy: the forwarded client is struck, the proxy is not.
            tctx.configure(features, openflare_trusted_proxies=["127.0.0.1"])
            await send("127.0.0.1", "192.0.2.9")
            await send("127.0.0.1", "192.0.2.9")
            assert addon.store.check("192.0.2.9") is not None and addon.store.check("127.0.0.1") is None
            f = await send("127.0.0.1", "192.0.2.10", b"/hello")
            assert f.response is None and f.metadata[common.VERDICT] == common.VERDICT_PASS
            # Detect-only: the Scorer forwards, so nothing is struck.
            tctx.configure(scorer, openflare_detect_only=True)
            await send("127.0.0.1", "192.0.2.11")
            await send("127.0.0.1", "192.0.2.11")
            assert addon.store.check("192.0.2.11") is None
        finally:
            await _stop(addon)


def test_the_embedded_store_without_lupa_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    monkeypatch.setattr("addons.banstore.embedded_available", lambda: False)
    addon = IpBans()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="lupa"):
            tctx.configure(addon, openflare_redis_prefix="oftest:nolupa:")
        tctx.configure(addon, openflare_redis_url=REDIS_URL)  # a configured Redis needs no lupa


async def test_behind_a_proxy_writing_forwarded_the_clients_own_x_forwarded_for_is_not_believed(prefix, attack_model, monkeypatch):
    """The trusted proxy (127.0.0.1) appends the address it sees to Forwarded and passes the client's
    X-Forwarded-For through: an attacker cannot escape its ban, get an innocent IP banned, or claim an
    allowlisted IP with it (issue 15)."""
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    features, addon, scorer = FeatureExtractor(), IpBans(), Scorer()
    attacker, innocent, allowed = "203.0.113.60", "198.51.100.60", "192.0.2.60"
    with taddons.context(features, addon, scorer) as tctx:
        tctx.configure(features, openflare_trusted_proxies=["127.0.0.1"])
        tctx.configure(addon, openflare_redis_url=REDIS_URL, openflare_redis_prefix=prefix, openflare_strikes=2,
                       openflare_allowlist=[allowed])  # fmt: skip
        tctx.configure(scorer, openflare_model=str(attack_model))
        addon.running()
        try:
            assert await addon.store.wait_synced()

            async def send(xff: str, path: bytes = SQLI):
                headers = [(b"x-forwarded-for", xff.encode()), (b"forwarded", f"for={attacker};proto=https".encode())]
                f = tflow.tflow(req=tutils.treq(path=path, headers=headers), resp=False)
                f.client_conn.peername = ("127.0.0.1", 40000)
                for e in eventsequence.iterate(f):
                    await tctx.master.addons.handle_lifecycle(e)
                return f

            # Claiming an allowlisted IP, then an innocent one: the strikes land on the attacker.
            f = await send(allowed)
            assert f.metadata[common.CLIENT_IP] == attacker and f.response.status_code == 403
            await send(innocent)
            assert addon.store.check(attacker) is not None
            assert await until(lambda: addon.store.stats.get("strikes_delivered") == 2)  # in the background
            assert addon.store.check(innocent) is None and addon.store.stats["strikes"] == 2
            # Banned, it cannot escape with a fresh X-Forwarded-For: refused before scoring.
            f = await send("192.0.2.99", b"/hello")
            assert f.metadata[common.BANNED] and common.VERDICT not in f.metadata
            # The innocent IP, reaching the proxy itself, is served.
            f = tflow.tflow(req=tutils.treq(path=b"/hello", headers=[(b"forwarded", f"for={innocent}".encode())]), resp=False)
            f.client_conn.peername = ("127.0.0.1", 40000)
            for e in eventsequence.iterate(f):
                await tctx.master.addons.handle_lifecycle(e)
            assert f.response is None and f.metadata[common.VERDICT] == common.VERDICT_PASS
        finally:
            await _stop(addon)


async def test_chain_cross_site_image_attacks_are_refused_and_their_visitor_never_banned(prefix, attack_model, monkeypatch):
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    features, addon, scorer = FeatureExtractor(), IpBans(), Scorer()
    with taddons.context(features, addon, scorer) as tctx:
        tctx.configure(addon, openflare_redis_url=REDIS_URL, openflare_redis_prefix=prefix)
        tctx.configure(scorer, openflare_model=str(attack_model))
        addon.running()
        try:
            assert await addon.store.wait_synced()

            async def send(path: bytes, headers):
                f = tflow.tflow(req=tutils.treq(path=path, headers=[(k.encode(), v.encode()) for k, v in headers]), resp=False)
                f.client_conn.peername = ("198.51.100.70", 40000)
                for e in eventsequence.iterate(f):
                    await tctx.master.addons.handle_lifecycle(e)
                return f

            for _ in range(5):  # five <img> of a page the visitor opened: refused, never struck
                f = await send(SQLI, CROSS_SITE_IMAGE)
                assert f.response.status_code == 403 and f.metadata[common.SCORE] == 10
            assert addon.store.check("198.51.100.70") is None and addon.store.stats.get("strikes", 0) == 0
            f = await send(b"/hello", [("Sec-Fetch-Site", "none"), ("Sec-Fetch-Mode", "navigate"), ("Sec-Fetch-User", "?1")])
            assert f.response is None
            for _ in range(3):  # the same attack typed by the visitor: struck, banned at 3
                await send(SQLI, [("Sec-Fetch-Site", "none"), ("Sec-Fetch-Mode", "navigate"), ("Sec-Fetch-User", "?1")])
            assert addon.store.check("198.51.100.70") is not None
        finally:
            await _stop(addon)
