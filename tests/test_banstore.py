"""addons/banstore.py against the real Redis at 127.0.0.1:6379 (OPENFLARE_TEST_REDIS to change it).

Each test works under its own key prefix and deletes only its own keys. A private redis-server, started
on a free port, is killed, paused and restarted to check the outage behaviour.
"""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from addons import banstore
from conftest import REPO, free_port, wait_listening

REDIS_URL = os.environ.get("OPENFLARE_TEST_REDIS", "redis://127.0.0.1:6379/0")


async def _delete_prefix(url: str, prefix: str) -> None:
    r = aioredis.from_url(url)
    try:
        keys = [k async for k in r.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@pytest.fixture
async def prefix():
    p = f"oftest:{uuid.uuid4().hex[:12]}:"
    yield p
    await _delete_prefix(REDIS_URL, p)


@pytest.fixture
async def stores(prefix):
    """Factory: a started BanStore on the shared Redis under this test's prefix; all closed at the end."""
    made = []

    async def make(policy=None, url=REDIS_URL, client=None, **kw):
        store = banstore.BanStore(client or banstore.make_client(url), prefix, policy or banstore.Policy(), **kw)
        store.start()
        made.append(store)
        assert await store.wait_synced(), "Redis not reachable: .ci/run starts redis-server on 127.0.0.1:6379"
        return store

    yield make
    for store in made:
        await store.close()


async def until(pred, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


# --- pure helpers ---


def test_ip_key_normalises_and_groups_ipv6():
    assert banstore.ip_key("203.0.113.7") == "203.0.113.7"
    assert banstore.ip_key(" 2001:DB8:0:0::1 ", 128) == "2001:db8::1"
    assert banstore.ip_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"  # the default: one client per /64
    assert banstore.ip_key("::ffff:198.51.100.1") == "198.51.100.1"
    assert banstore.ip_key("2001:db8:1:2:3:4:5:6", 64) == "2001:db8:1:2::/64"
    assert banstore.ip_key("2001:db8:1:2:ffff::9", 64) == "2001:db8:1:2::/64"
    assert banstore.ip_key("203.0.113.7", 64) == "203.0.113.7"
    assert banstore.ip_key("not-an-ip") is None
    assert banstore.ip_key("") is None


def test_parse_key_accepts_ips_and_the_grouping_network_only():
    assert banstore.parse_key("198.51.100.4") == "198.51.100.4"
    assert banstore.parse_key("198.51.100.4/32") == "198.51.100.4"
    assert banstore.parse_key("2001:db8:1:2::/64", 64) == "2001:db8:1:2::/64"
    assert banstore.parse_key("2001:db8:1:2::77", 64) == "2001:db8:1:2::/64"
    with pytest.raises(ValueError, match="not an IP"):
        banstore.parse_key("example.com")
    with pytest.raises(ValueError, match="per IP"):
        banstore.parse_key("10.0.0.0/8")


def test_sanitise_removes_controls_and_quotes():
    assert banstore.sanitise('a\tb\nc"d\x1b[31m') == "a_b_c_d_[31m"
    assert banstore.sanitise("x" * 500, 10) == "x" * 10
    assert banstore.sanitise("") == "-"


def test_allowlist_cidr_ipv4_ipv6_and_expiry():
    allow = banstore.Allowlist()
    allow.set_static(["10.0.0.0/8", "2001:db8:abcd::/48", "192.0.2.5"])
    assert allow.allowed("10.200.3.4")
    assert not allow.allowed("11.0.0.1")
    assert allow.allowed("2001:db8:abcd:12::1")
    assert not allow.allowed("2001:db8:abce::1")
    assert allow.allowed("192.0.2.5") and not allow.allowed("192.0.2.6")
    assert allow.allowed("::ffff:10.1.1.1")
    assert allow.allowed("2001:db8:abcd:1::/64")  # a grouped key inside the range
    assert not allow.allowed("garbage")
    now = time.monotonic()
    allow.add("198.51.100.0/24", now + 10)
    assert allow.allowed("198.51.100.9", now)
    assert not allow.allowed("198.51.100.9", now + 11)
    allow.add("198.51.100.0/24")  # re-added without expiry
    assert allow.allowed("198.51.100.9", now + 11)
    assert allow.remove("198.51.100.0/24") and not allow.allowed("198.51.100.9")
    with pytest.raises(ValueError, match="not an IP"):
        allow.set_static(["10.0.0.0/33"])


def admitted(rl: banstore.RateLimiter, key: str, times) -> list[float]:
    return [t for t in times if rl.hit(key, t)[0]]


def test_rate_limiter_never_admits_more_than_the_limit_in_any_one_second_span():
    """100 at the end of one second and 100 at the start of the next: a fixed window admitted all 200."""
    rl = banstore.RateLimiter(100)
    ms = 1 / 1024  # times in binary fractions of a second: exact arithmetic at the span's edges
    burst = [0.875 + i * ms for i in range(100)] + [1.0 + i * ms for i in range(100)]
    assert admitted(rl, "a", burst) == burst[:100]
    assert admitted(rl, "a", [1.5, 1.875 - ms]) == []  # 0.875 is less than a second ago
    # One at a time as the oldest leave the span: 0.875 at 1.875, 0.875 + ms at 1.875 + ms.
    assert admitted(rl, "a", [1.875, 1.875 + ms / 2, 1.875 + ms]) == [1.875, 1.875 + ms]
    assert admitted(rl, "b", [1.5]) == [1.5]  # per IP


def test_rate_limiter_admits_a_steady_client_at_the_limit_and_the_limit_of_a_faster_one():
    rl = banstore.RateLimiter(64)
    steady = [i / 64 for i in range(640)]  # 64 a second, evenly, for 10 s
    assert admitted(rl, "steady", steady) == steady
    fast = [i / 256 for i in range(2560)]  # 256 a second for 10 s
    got = admitted(rl, "fast", fast)
    assert len(got) == 640 and got[:64] == fast[:64]


def test_rate_limiter_strikes_once_a_second_of_refusals():
    rl = banstore.RateLimiter(2)
    got = [rl.hit("a", t) for t in (0.0, 0.125, 0.25, 0.375, 0.875, 1.125, 1.25, 1.375, 2.0, 2.25)]
    assert got == [(True, False), (True, False), (False, True), (False, False), (False, False),  # struck at 0.25
                   (True, False), (True, False), (False, True), (False, False), (True, False)]  # struck at 1.375


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 4096), max_size=200))
def test_rate_limiter_property_no_one_second_span_over_the_limit(limit, ticks):
    """Any arrivals (in 1/1024 s): every half-open one-second span holds at most `limit` admitted requests,
    and a request is refused only when `limit` were admitted in the second before it."""
    rl = banstore.RateLimiter(limit)
    got: list[int] = []
    for t in sorted(ticks):
        ok, _ = rl.hit("a", t / 1024)
        assert ok == (sum(1 for a in got if t - 1024 < a <= t) < limit)
        if ok:
            got.append(t)
    for a in got:
        assert sum(1 for b in got if a <= b < a + 1024) <= limit


def test_rate_limiter_forgets_idle_ips_and_a_new_limit_starts_afresh():
    now = [0.0]
    rl = banstore.RateLimiter(3, clock=lambda: now[0])
    for ip in ("a", "b", "c"):
        rl.hit(ip)
    now[0] = 0.5
    rl.hit("a")
    now[0] = 1.2
    rl.hit("a")
    assert len(rl) == 3  # b and c may still matter until a second after their last request
    now[0] = 2.3
    rl.hit("d")
    assert len(rl) == 2  # a (last at 1.2) and d
    assert [rl.hit("a")[0] for _ in range(4)] == [True, True, True, False]  # a: 0.0, 0.5, 1.2 all old
    rl.limit = 5
    assert len(rl) == 0 and rl.hit("a") == (True, False)


# --- strikes, bans, escalation, TTL expiry ---


async def test_three_strikes_ban_and_ttl_expiry(stores, prefix):
    store = await stores(banstore.Policy(strikes=3, window=60, ban_seconds=1, max_seconds=10))
    r1 = await store.strike("198.51.100.1", "sqli")
    r2 = await store.strike("198.51.100.1", "sqli")
    assert (r1.strikes, r1.status, r2.strikes) == (1, "counted", 2)
    assert store.check("198.51.100.1") is None
    r3 = await store.strike("198.51.100.1", "sqli")
    assert (r3.status, r3.strikes, r3.banned, r3.level) == ("banned", 3, 1, 1)
    ban = store.check("198.51.100.1")
    assert ban is not None and ban.reason == "sqli" and ban.strikes == 3
    assert (await store.strike("198.51.100.1", "sqli")).status == "already-banned"
    raw = await store.client.hgetall(prefix + "ban:198.51.100.1")
    assert raw[b"reason"] == b"sqli" and raw[b"seconds"] == b"1"
    assert 0 < await store.client.pttl(prefix + "ban:198.51.100.1") <= 1000
    assert await store.client.exists(prefix + "strikes:198.51.100.1") == 0
    assert store.stats["strikes"] == 3 and store.stats["bans"] == 1
    await asyncio.sleep(1.1)
    assert store.check("198.51.100.1") is None  # the local view expires by itself...
    assert await store.client.exists(prefix + "ban:198.51.100.1") == 0  # ...and so does Redis, by TTL


@pytest.mark.parametrize("score, thirds", [(10, 3), (9, 2), (8, 1), (7, 1), (3, 1), (None, 3), ("10", 3), (True, 3), (11, 3)])
def test_strike_weight_by_score(score, thirds):
    assert banstore.strike_thirds(score) == thirds


async def test_strikes_weigh_in_thirds_and_ban_at_the_threshold(stores, prefix):
    """Score 7 (just over the default threshold 6) is a third of a strike: three false positives are one
    strike, nine ban; one 10 and three 7s make two strikes."""
    store = await stores(banstore.Policy(strikes=2, window=60, ban_seconds=60))
    got = [await store.strike("198.51.100.6", "x", thirds=1) for _ in range(3)]
    assert [r.strikes for r in got] == [1 / 3, 2 / 3, 1] and [banstore.show_strikes(r.strikes) for r in got] == ["0.33", "0.67", "1"]
    assert int(await store.client.get(prefix + "strikes:198.51.100.6")) == 3
    r = await store.strike("198.51.100.6", "x", thirds=2)
    assert (r.status, banstore.show_strikes(r.strikes)) == ("counted", "1.67") and store.check("198.51.100.6") is None
    r = await store.strike("198.51.100.6", "x", thirds=3)
    assert (r.status, banstore.show_strikes(r.strikes)) == ("banned", "2.67")
    assert store.check("198.51.100.6").strikes == 2  # whole strikes, rounded down
    assert (await store.client.hgetall(prefix + "ban:198.51.100.6"))[b"strikes"] == b"2"
    assert 59_000 < await store.client.pttl(prefix + "ban:198.51.100.6") <= 60_000
    # The window's TTL was set by the first strike, whatever its weight.
    await store.strike("198.51.100.7", "x", thirds=2)
    await store.strike("198.51.100.7", "x", thirds=2)
    assert 0 < await store.client.ttl(prefix + "strikes:198.51.100.7") <= 60
    assert await store.strikes_of(["198.51.100.7", "198.51.100.8"]) == [4 / 3, 0]


async def test_strike_window_expires(stores, prefix):
    store = await stores(banstore.Policy(strikes=3, window=1, ban_seconds=60))
    await store.strike("198.51.100.2", "x")
    await store.strike("198.51.100.2", "x")
    assert 0 < await store.client.pttl(prefix + "strikes:198.51.100.2") <= 1000
    await asyncio.sleep(1.1)
    r = await store.strike("198.51.100.2", "x")
    assert (r.strikes, r.status) == (1, "counted")


async def test_repeat_bans_double_up_to_the_cap_and_are_remembered(stores, prefix):
    store = await stores(banstore.Policy(strikes=1, window=60, ban_seconds=1, max_seconds=3, memory=1000))
    assert (await store.strike("198.51.100.3", "x")).banned == 1
    assert 900_000 < await store.client.pttl(prefix + "level:198.51.100.3") <= 1_000_000
    await asyncio.sleep(1.1)
    second = await store.strike("198.51.100.3", "x")
    assert (second.banned, second.level) == (2, 2)
    assert 1000 < await store.client.pttl(prefix + "ban:198.51.100.3") <= 2000
    assert await store.ban("198.51.100.3") == 3  # 4 s, capped at 3
    assert await store.ban("198.51.100.3", 30) == 30  # an explicit duration is used as given
    assert store.check("198.51.100.3").level == 4


async def test_unban_clears_strikes_and_ignores_strikes_in_flight(stores, prefix):
    store = await stores(banstore.Policy(strikes=2, window=60, ban_seconds=60))
    before = int(time.time() * 1000)
    await store.strike("198.51.100.4", "x", seen_ms=before)
    await store.strike("198.51.100.4", "x", seen_ms=before)
    assert store.check("198.51.100.4")
    await asyncio.sleep(0.01)
    assert await store.unban("198.51.100.4") is True
    assert store.check("198.51.100.4") is None
    for kind in ("ban", "strikes", "level"):
        assert await store.client.exists(f"{prefix}{kind}:198.51.100.4") == 0
    # Requests that arrived before the unban and are answered after it do not strike again.
    for _ in range(3):
        assert (await store.strike("198.51.100.4", "x", seen_ms=before)).status == "after-unban"
    assert store.check("198.51.100.4") is None
    # New requests do.
    assert (await store.strike("198.51.100.4", "x")).strikes == 1
    assert (await store.strike("198.51.100.4", "x")).banned == 60  # escalation was forgotten too
    assert store.stats["unbans"] == 1


async def test_allowlisted_ips_are_never_struck_or_banned(stores, prefix):
    store = await stores(banstore.Policy(strikes=1, window=60, ban_seconds=60))
    store.allowlist.set_static(["203.0.113.0/24", "2001:db8:aaaa::/48"])
    assert (await store.strike("203.0.113.50", "x")).status == "allowed"
    assert (await store.strike("2001:db8:aaaa:1::/64", "x", addr="2001:db8:aaaa:1::5")).status == "allowed"
    with pytest.raises(ValueError, match="allowlisted"):
        await store.ban("203.0.113.50", 10)
    assert [k async for k in store.client.scan_iter(match=prefix + "*")] == []


async def test_redis_allowlist_with_expiry_reaches_other_processes(stores, prefix):
    a = await stores()
    b = await stores()
    assert await a.allow("192.0.2.0/24", 1) == "192.0.2.0/24"
    assert await until(lambda: b.allowlist.allowed("192.0.2.77"), 1.0)
    assert 0 < await a.client.pttl(prefix + "allow:192.0.2.0/24") <= 1000
    await a.allow("2001:db8:5::/48")
    assert await until(lambda: b.allowlist.allowed("2001:db8:5:1::1"), 1.0)
    await asyncio.sleep(1.1)
    assert not a.allowlist.allowed("192.0.2.77") and not b.allowlist.allowed("192.0.2.77")
    assert await a.client.exists(prefix + "allow:192.0.2.0/24") == 0
    # A process started later reads the allowlist from Redis.
    c = await stores()
    assert c.allowlist.allowed("2001:db8:5:ffff::1")
    assert await c.disallow("2001:db8:5::/48") is True
    assert await until(lambda: not a.allowlist.allowed("2001:db8:5:1::1"), 1.0)


async def test_a_ban_by_one_process_reaches_the_other_within_a_second(stores):
    policy = banstore.Policy(strikes=2, window=60, ban_seconds=60)
    a = await stores(policy)
    b = await stores(policy)
    await a.strike("198.51.100.5", "x")
    await a.strike("198.51.100.5", "x")
    assert await until(lambda: b.check("198.51.100.5") is not None, 1.0)
    assert b.check("198.51.100.5").reason == "x"
    await b.unban("198.51.100.5")
    assert await until(lambda: a.check("198.51.100.5") is None, 1.0)
    await b.ban("198.51.100.6", 5)
    assert await until(lambda: a.check("198.51.100.6") is not None, 1.0)
    assert 4 < a.check("198.51.100.6").remaining() <= 5
    # A process started later loads the bans in force.
    c = await stores(policy)
    assert c.check("198.51.100.6") is not None and c.check("198.51.100.5") is None


async def test_malformed_events_are_ignored(stores, caplog):
    store = await stores()
    await store.client.publish(store.channel, "ban\tonly-two")
    await store.client.publish(store.channel, "ban\t198.51.100.9\tnot-a-number\t1\t1\tx")
    await store.client.publish(store.channel, "ban\t198.51.100.10\t5000\t1\t3\tok")
    assert await until(lambda: store.check("198.51.100.10") is not None, 1.0)
    assert store.check("198.51.100.9") is None
    assert "malformed event" in caplog.text


async def test_embedded_fakeredis_runs_the_same_code(prefix):
    store = banstore.BanStore(banstore.make_client(None), prefix, banstore.Policy(strikes=2, ban_seconds=60))
    store.start()
    try:
        assert await store.wait_synced()
        await store.strike("198.51.100.11", "x")
        assert (await store.strike("198.51.100.11", "x")).status == "banned"
        assert store.check("198.51.100.11") is not None
        await store.unban("198.51.100.11")
        assert store.check("198.51.100.11") is None
    finally:
        await store.close()


# --- following changes made behind the events channel's back (the reconcile) ---


@pytest.fixture(params=["redis", "embedded"])
async def followed(request, prefix, tmp_path):
    """(store, raw client): a started BanStore and a second client of the same store that publishes nothing
    (as redis-cli does): the shared Redis under this test's prefix, or the embedded store on a socket."""
    from addons import banserver

    if request.param == "redis":
        store = banstore.BanStore(banstore.make_client(REDIS_URL), prefix, banstore.Policy())
        raw = aioredis.from_url(REDIS_URL)
    else:
        hub = banserver.Embedded.open(str(tmp_path / "bans.sock"))
        store = banstore.BanStore(hub.client(), prefix, banstore.Policy(), kind=banstore.KIND_IN_PROCESS, where=hub.path,
                                  hub=hub, reconcile_keys=banstore.RECONCILE_KEYS_EMBEDDED)  # fmt: skip
        raw = banserver.client(hub.path)
    store.start()
    assert await store.wait_synced()
    yield store, raw
    await raw.aclose()
    await store.close()


async def test_a_ban_key_deleted_without_an_event_is_followed_within_a_second(followed):
    store, raw = followed
    await store.ban("198.51.100.60", 600)
    await store.ban("198.51.100.61", 600)
    await store.allow("203.0.113.0/24")
    assert store.check("198.51.100.60") and store.allowlist.allowed("203.0.113.9")
    await raw.delete(store.key("ban", "198.51.100.60"), store.key("allow", "203.0.113.0/24"))  # like `redis-cli del`
    assert await until(lambda: store.check("198.51.100.60") is None and not store.allowlist.allowed("203.0.113.9"), 1.0)
    assert store.check("198.51.100.61") is not None  # the others stay
    assert store.stats["reconciled"] == 2


async def test_a_ttl_shortened_without_an_event_is_followed_when_it_runs_out(followed):
    store, raw = followed
    await store.ban("198.51.100.62", 600)
    await raw.expire(store.key("ban", "198.51.100.62"), 1)  # like `redis-cli expire ... 1`
    assert await until(lambda: store.check("198.51.100.62") is None, 2.5)


@pytest.fixture
async def idle_store(prefix):
    """A BanStore on the shared Redis whose follow loop is not running: reconcile ticks only when called."""
    store = banstore.BanStore(banstore.make_client(REDIS_URL), prefix)
    yield store
    await store.close()


async def test_the_reconcile_checks_a_bounded_batch_per_tick(idle_store):
    store = idle_store
    store.reconcile_keys = 3
    calls = []
    exists = store.client.exists

    async def counted(*keys):
        calls.append(len(keys))
        return await exists(*keys)

    store.client.exists = counted
    for i in range(7):
        store.bans[f"198.51.100.{70 + i}"] = banstore.Ban(time.monotonic() + 60, "local only")  # no key in Redis
    assert await store.reconcile() == 3  # three keys, one EXISTS (then one Lua call: they are gone)
    assert len(store.bans) == 4 and calls == [3]
    assert await store.reconcile() == 3
    assert await store.reconcile() == 1  # the rest of the round
    assert store.bans == {} and calls == [3, 3, 1]
    assert await store.reconcile() == 0 and calls == [3, 3, 1]  # an empty view costs no call
    await store.client.hset(store.key("ban", "198.51.100.79"), mapping={"reason": "x"})  # present in Redis
    store.bans["198.51.100.79"] = banstore.Ban(time.monotonic() + 60, "x")
    assert await store.reconcile() == 1 and store.check("198.51.100.79") is not None  # EXISTS alone: kept


async def test_the_reconcile_never_drops_a_ban_an_event_replaced(idle_store):
    store = idle_store
    store.bans["198.51.100.80"] = banstore.Ban(time.monotonic() + 60, "old")  # no key in Redis
    fresh = banstore.Ban(time.monotonic() + 60, "newer, from an event")
    exists = store.client.exists

    async def event_meanwhile(*keys):
        store.bans["198.51.100.80"] = fresh  # an event arrives while the check is on its way
        return await exists(*keys)

    store.client.exists = event_meanwhile
    await store.reconcile()  # the key is gone, but the entry it checked is no longer the one in the view
    assert store.check("198.51.100.80") is fresh


# --- the operator's tool (the openflare command line) and the store's name in messages ---


async def test_operator_changes_reach_running_stores(stores, prefix):
    store = await stores(banstore.Policy(ban_seconds=120))
    op = banstore.Operator(banstore.make_client(REDIS_URL), prefix, banstore.Policy(ban_seconds=120))
    try:
        assert await op.ban("198.51.100.90") == (120, 1)
        assert await until(lambda: store.check("198.51.100.90") is not None, 1.0)
        assert (await op.bans())["198.51.100.90"].reason == "manual"
        assert await op.unban("198.51.100.90") is True
        assert await until(lambda: store.check("198.51.100.90") is None, 1.0)
        assert await op.unban("198.51.100.90") is False
        assert await op.allow("2001:db8::1/64", 30) == "2001:db8::/64"
        assert await until(lambda: store.allowlist.allowed("2001:db8::5"), 1.0)
        assert 0 < (await op.allowlist())["2001:db8::/64"] - time.monotonic() <= 30
        assert await op.disallow("2001:db8::/64") is True
        assert await until(lambda: not store.allowlist.allowed("2001:db8::5"), 1.0)
    finally:
        await op.close()


async def test_messages_name_the_store_actually_in_use(prefix, tmp_path, caplog):
    from addons import banserver

    caplog.set_level("INFO")
    hub = banserver.Embedded.open(str(tmp_path / "bans.sock"))
    store = banstore.BanStore(hub.client(), prefix, kind=banstore.KIND_IN_PROCESS, where=hub.path, hub=hub)
    store.start()
    try:
        assert await store.wait_synced()
        assert "in-process ban store ready (served on " in caplog.text
        assert "Redis" not in caplog.text
        assert store.status() == f"in-process (served on {hub.path})"
    finally:
        await store.close()
    assert not (tmp_path / "bans.sock").exists()  # closing the store stops serving it
    caplog.clear()
    store = banstore.BanStore(banstore.make_client(REDIS_URL), prefix, where=banstore.redis_where(REDIS_URL))
    store.start()
    try:
        assert await store.wait_synced()
        assert "Redis reachable (127.0.0.1:6379/0), 0 bans loaded" in caplog.text
        assert store.status() == "redis 127.0.0.1:6379/0 up"
    finally:
        await store.close()


def test_redis_where_never_shows_a_password():
    assert banstore.redis_where("redis://:s3cret@db.example:6380/2") == "db.example:6380/2"
    assert banstore.redis_where("rediss://user:pw@[2001:db8::1]/0") == "[2001:db8::1]:6379/0"
    assert banstore.redis_where("unix:///run/redis.sock") == "/run/redis.sock"


async def test_a_member_takes_over_the_embedded_store_with_its_bans(prefix, tmp_path, caplog):
    """Two processes share the embedded store; the one keeping it exits: the other keeps it, bans and all."""
    from addons import banserver

    path = str(tmp_path / "bans.sock")
    owner_hub = banserver.Embedded.open(path)
    owner = banstore.BanStore(owner_hub.client(), prefix, kind=banstore.KIND_IN_PROCESS, where=path, hub=owner_hub)
    member_hub = banserver.Embedded.open(path)
    assert not member_hub.owner
    member = banstore.BanStore(member_hub.client(), prefix, kind=banstore.KIND_SHARED, where=f"process {member_hub.pid} through {path}",
                               hub=member_hub)  # fmt: skip
    owner.start()
    member.start()
    try:
        assert await owner.wait_synced() and await member.wait_synced()
        await owner.ban("198.51.100.95", 300)
        await member.allow("192.0.2.0/24", 300)
        assert await until(lambda: member.check("198.51.100.95") is not None and owner.allowlist.allowed("192.0.2.1"), 1.0)
        await owner.close()  # its process exits: socket gone, lock free
        assert await until(lambda: member.kind == banstore.KIND_IN_PROCESS and member.healthy, 5.0)
        assert "this one keeps it now" in caplog.text
        assert member.check("198.51.100.95") is not None and member.allowlist.allowed("192.0.2.1")
        op = banstore.Operator(banserver.client(path), prefix)  # a later process (or the CLI) finds them there
        try:
            assert "198.51.100.95" in await op.bans() and "192.0.2.0/24" in await op.allowlist()
        finally:
            await op.close()
    finally:
        await member.close()


# --- exact counting across processes ---

CHILD = r"""
import asyncio, json, sys, time
from addons import banstore

async def main(url, prefix, ip, n, threshold, start_at):
    store = banstore.BanStore(banstore.make_client(url), prefix,
                              banstore.Policy(strikes=threshold, window=60, ban_seconds=60), timeout=10)
    store.start()
    assert await store.wait_synced(10)
    await asyncio.sleep(max(0, start_at - time.time()))
    results = await asyncio.gather(*(store.strike(ip, "race") for _ in range(n)))
    print(json.dumps([[r.status, r.strikes] for r in results]))
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])))
"""


def _race(prefix: str, ip: str, procs: int, each: int, threshold: int) -> list[list]:
    start_at = time.time() + 2.5  # every child is connected by then, so they strike at the same time
    args = [sys.executable, "-c", CHILD, REDIS_URL, prefix, ip, str(each), str(threshold), str(start_at)]
    children = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(procs)]
    out = []
    for child in children:
        stdout, stderr = child.communicate(timeout=60)
        assert child.returncode == 0, stderr
        out.extend(json.loads(stdout.strip().splitlines()[-1]))
    return out


async def test_strikes_are_counted_exactly_across_processes(prefix):
    loop = asyncio.get_running_loop()
    counted = await loop.run_in_executor(None, _race, prefix, "198.51.100.20", 4, 50, 1_000_000)
    assert all(status == "counted" for status, _ in counted)
    assert sorted(n for _, n in counted) == list(range(1, 201))  # every number handed out exactly once
    r = aioredis.from_url(REDIS_URL)
    try:
        assert int(await r.get(prefix + "strikes:198.51.100.20")) == 600  # in thirds of a strike
    finally:
        await r.aclose()


async def test_the_threshold_bans_exactly_once_under_concurrency(prefix):
    loop = asyncio.get_running_loop()
    results = await loop.run_in_executor(None, _race, prefix, "198.51.100.21", 4, 10, 5)
    statuses = [s for s, _ in results]
    assert statuses.count("banned") == 1
    assert sorted(n for s, n in results if s in ("counted", "banned")) == [1, 2, 3, 4, 5]
    assert statuses.count("already-banned") == 35
    r = aioredis.from_url(REDIS_URL)
    try:
        assert int(await r.get(prefix + "level:198.51.100.21")) == 1
        assert await r.exists(prefix + "ban:198.51.100.21") == 1
    finally:
        await r.aclose()


# --- a private redis-server killed, paused and restarted ---


class PrivateRedis:
    def __init__(self, workdir: Path, persist: bool = True) -> None:
        self.port = free_port()
        self.dir = workdir
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # appendfsync always: what a killed server had acknowledged is there after its restart.
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)]  # fmt: skip
        if not self.persist:  # a restart comes back empty
            args[args.index("--appendonly") + 1 : args.index("--dir")] = ["no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_listening(self.port, self.proc, 10), "private redis-server did not start"

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def private_redis(tmp_path, request):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    server = PrivateRedis(tmp_path, persist=getattr(request, "param", True))
    server.start()
    yield server
    server.kill()


async def test_outage_fail_fast_reconnect_and_bans_resume(private_redis, caplog):
    policy = banstore.Policy(strikes=2, window=60, ban_seconds=60)
    health = []
    store = banstore.BanStore(banstore.make_client(private_redis.url), "of:", policy, on_health=health.append)
    other = banstore.BanStore(banstore.make_client(private_redis.url), "of:", policy)
    store.start()
    other.start()
    try:
        assert await store.wait_synced() and await other.wait_synced()
        await store.strike("198.51.100.30", "x")
        await store.strike("198.51.100.30", "x")
        assert store.check("198.51.100.30")

        private_redis.kill()
        assert await until(lambda: not store.healthy, 3.0)
        start = time.monotonic()
        queued = await store.strike("198.51.100.31", "x")
        elapsed = time.monotonic() - start
        assert queued.status == "queued" and queued.strikes == 1 and elapsed < 1.0  # a hang check; the budget is benchmarked
        assert store.check("198.51.100.30") is not None  # known bans are still enforced during the outage
        with pytest.raises(ConnectionError):
            await store.unban("198.51.100.99")
        assert "Redis unreachable" in caplog.text

        private_redis.start()  # same port, same AOF: the ban was persisted
        assert await until(lambda: store.healthy and other.healthy, 10.0)
        assert store.check("198.51.100.30") is not None and other.check("198.51.100.30") is not None
        await store.strike("198.51.100.32", "x")
        assert (await store.strike("198.51.100.32", "x")).status == "banned"
        assert await until(lambda: other.check("198.51.100.32") is not None, 1.0)
        assert health[:3] == [True, False, True]
        assert store.stats["redis_outages"] == 1 and store.stats["strikes_queued"] >= 1
        assert await store.strikes_of(["198.51.100.31"]) == [1]  # the strike of the outage was delivered after it
        assert "strikes_lost" not in store.stats
    finally:
        await store.close()
        await other.close()


async def test_a_hung_redis_loses_no_strike_bans_at_once_here_and_everywhere_when_it_answers(private_redis):
    """Strikes are counted here at once and queued for Redis: a flood while Redis answers nothing bans each
    attacker in this process on its own count, and once Redis answers every strike reaches it, so every
    process bans them too."""
    policy = banstore.Policy(strikes=3, window=60, ban_seconds=60)
    store = banstore.BanStore(banstore.make_client(private_redis.url), "of:", policy)
    other = banstore.BanStore(banstore.make_client(private_redis.url), "of:", policy)
    store.start()
    other.start()
    attackers = [f"198.51.100.{40 + i}" for i in range(10)]
    try:
        assert await store.wait_synced() and await other.wait_synced()
        private_redis.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing: no RST, no EOF
        start = time.monotonic()
        first = await store.strike(attackers[0], "x")
        elapsed = time.monotonic() - start
        assert first.status == "queued" and first.strikes == 1 and elapsed < 1.0  # a hang check
        results = [await store.strike(ip, "x") for ip in attackers[1:] for _ in range(3)]
        results.append(await store.strike(attackers[0], "x"))
        results.append(await store.strike(attackers[0], "x"))
        assert sum(r.status == "banned" for r in results) == 10
        assert all(store.check(ip) is not None for ip in attackers)  # banned here, Redis still silent
        assert all(other.check(ip) is None for ip in attackers)
        assert (await store.strike(attackers[0], "x")).status == "already-banned"
        assert await until(lambda: not store.healthy, 3.0)  # the PING probe got no answer either
        private_redis.proc.send_signal(signal.SIGCONT)
        assert await until(lambda: all(other.check(ip) is not None for ip in attackers), 10.0)
        assert all(store.check(ip) is not None and not store.check(ip).local for ip in attackers)  # Redis's bans now
        assert await other.client.exists(*[f"of:ban:{ip}" for ip in attackers]) == 10
        assert store.stats["strikes"] == 30 and "strikes_lost" not in store.stats
        assert await until(lambda: store.healthy, 10.0)
        assert (await store.strike("198.51.100.60", "x")).status == "counted"  # Redis answers again in time
    finally:
        await store.close()
        await other.close()


@pytest.mark.parametrize("where", ["redis", "embedded"])
async def test_strikes_go_many_to_a_call_each_answered_as_alone_and_a_bad_key_fails_only_its_own(stores, prefix, where):
    """The delivery's STRIKES_LUA: 250 strikes in three calls; each gets STRIKE_LUA's answer, in order (a ban
    on the second strike of an IP in the same call); a strike whose key is of the wrong type fails alone."""
    from addons import banserver

    policy = banstore.Policy(strikes=2, window=60, ban_seconds=60)
    client = banserver.Embedded.open(None).client() if where == "embedded" else None
    store = await stores(policy, client=client)
    bad = "198.51.100.99"
    await store.client.hset(store.key("strikes", bad), "x", "1")  # INCRBY on a hash: WRONGTYPE
    ips = [f"203.0.113.{i % 120}" for i in range(240)] + [bad] + [f"192.0.2.{i}" for i in range(9)]
    batch = [banstore._Pending(ip, "x", int(time.time() * 1000), 3, None) for ip in ips]
    got = await store._send_strikes(batch)
    assert len(got) == 250
    for i, (ip, res) in enumerate(zip(ips, got)):
        if ip == bad:
            assert isinstance(res, Exception) and "WRONGTYPE" in str(res)
        elif i < 120 or i >= 241:
            assert [int(x) for x in res] == [3, 0, 0], (i, res)  # the first strike of each
        else:
            assert [int(x) for x in res] == [6, 60, 1], (i, res)  # the second: banned for 60 s, level 1
    assert await store.client.exists(store.key("ban", "203.0.113.7")) == 1
    assert await store.client.exists(store.key("ban", "192.0.2.3")) == 0


async def test_a_quiet_follower_does_not_tick_and_still_follows_at_once(stores, prefix):
    """No ban and no run-time allowlist entry here: nothing to reconcile, so the follower waits on the
    subscription (no wake-up every 0.5 s while idle); an event is applied at once, and the ticks resume."""
    a, b = await stores(), await stores()
    ticks = []
    real = a.reconcile

    async def counted() -> int:
        ticks.append(time.monotonic())
        return await real()

    a.reconcile = counted
    await asyncio.sleep(1.6)  # three ticks of RECONCILE_EVERY, had it ticked
    assert ticks == []
    outages = a.stats.get("redis_outages", 0)
    a._lost(ConnectionError("a call failed elsewhere"))  # the quiet follower reconnects at once
    assert a.stats["redis_outages"] == outages + 1 and await until(lambda: a.healthy, 5.0)
    await b.ban("198.51.100.77", 60, "x")
    assert await until(lambda: a.check("198.51.100.77") is not None, 2.0)
    assert await until(lambda: len(ticks) >= 2, 3.0)  # a ban to reconcile here: the ticks again


async def test_a_strike_queued_at_close_is_still_delivered(stores, prefix):
    store = await stores(banstore.Policy(strikes=3, window=60, ban_seconds=60))
    store.timeout = 0  # the request never waits: every strike is queued
    assert (await store.strike("198.51.100.70", "x")).status == "queued"
    await store.close()
    probe = aioredis.from_url(REDIS_URL)
    try:
        assert int(await probe.get(prefix + "strikes:198.51.100.70")) == 3
    finally:
        await probe.aclose()


@pytest.mark.parametrize("private_redis", [False], indirect=True)
async def test_bans_survive_a_redis_restart_without_persistence(private_redis, caplog):
    """Redis comes back empty; each proxy writes back the bans in force it knows, with their time left,
    and a proxy started afterwards loads them."""
    policy = banstore.Policy(strikes=1, window=60, ban_seconds=600)
    a = banstore.BanStore(banstore.make_client(private_redis.url), "of:", policy)
    b = banstore.BanStore(banstore.make_client(private_redis.url), "of:", policy)
    a.start()
    b.start()
    fresh = None
    try:
        assert await a.wait_synced() and await b.wait_synced()
        struck = [f"198.51.100.{80 + i}" for i in range(5)]
        for ip in struck:
            assert (await a.strike(ip, "sqli")).status == "banned"
        assert await b.ban("198.51.100.90", 30, "manual") == 30
        assert await until(lambda: all(s.check(ip) for s in (a, b) for ip in struck + ["198.51.100.90"]), 2.0)
        before = a.check("198.51.100.90").remaining()

        private_redis.kill()
        private_redis.start()  # same port, nothing kept
        assert await until(lambda: a.healthy and b.healthy, 15.0)
        probe = aioredis.from_url(private_redis.url)
        try:
            assert await until(lambda: a.stats.get("bans_republished", 0) + b.stats.get("bans_republished", 0) >= 6, 5.0)
            assert await probe.exists(*[f"of:ban:{ip}" for ip in struck + ["198.51.100.90"]]) == 6
            ttl = await probe.pttl("of:ban:198.51.100.90")
            assert 0 < ttl <= before * 1000 + 1000  # the time left, not a fresh 30 s or 600 s
            assert 500_000 < await probe.pttl(f"of:ban:{struck[0]}") <= 600_000
            assert (await probe.hgetall(f"of:ban:{struck[0]}"))[b"reason"] == b"sqli"
        finally:
            await probe.aclose()
        assert all(s.check(ip) for s in (a, b) for ip in struck + ["198.51.100.90"])
        assert "missing from" in caplog.text
        fresh = banstore.BanStore(banstore.make_client(private_redis.url), "of:", policy)
        fresh.start()
        assert await fresh.wait_synced()
        assert all(fresh.check(ip) for ip in struck + ["198.51.100.90"])
    finally:
        for s in (a, b, fresh):
            if s is not None:
                await s.close()


async def test_an_unban_in_the_store_wins_over_a_ban_this_process_still_knows(stores, prefix):
    """A ban missing from the store is written back, unless the store says it was unbanned (the unban
    marker lasts the strike window): then the operator's word wins."""
    store = await stores(banstore.Policy(strikes=1, window=60, ban_seconds=600))
    probe = aioredis.from_url(REDIS_URL)
    try:
        for ip in ("198.51.100.95", "198.51.100.96"):
            assert (await store.strike(ip, "x")).status == "banned"
        # As if this process had been away: one ban was lifted (marker left), the other lost with the store.
        await probe.delete(prefix + "ban:198.51.100.95", prefix + "ban:198.51.100.96")
        await probe.set(prefix + "unban:198.51.100.95", int(time.time() * 1000), ex=60)
        await store.resync()
        assert store.check("198.51.100.95") is None
        assert store.check("198.51.100.96") is not None
        assert 590_000 < await probe.pttl(prefix + "ban:198.51.100.96") <= 600_000
        assert store.stats["bans_republished"] == 1 and store.stats["bans_dropped_unbanned"] == 1
    finally:
        await probe.aclose()


@pytest.mark.parametrize("embedded", [False, True])
async def test_reading_the_bans_keeps_every_field_and_skips_what_is_not_a_ban(prefix, embedded):
    """One script call per SCAN step reads the bans; a reason with tabs and newlines stays one ban, a key
    without TTL never ends, a key of another type under ban: is left out, and a batch boundary loses none."""
    client = banstore.make_client(None if embedded else REDIS_URL)
    try:
        await client.hset(prefix + "ban:198.51.100.1", mapping={"reason": "a\tb\nc", "seconds": 60, "level": 3, "strikes": 4})
        await client.expire(prefix + "ban:198.51.100.1", 60)
        await client.hset(prefix + "ban:2001:db8::/64", mapping={"reason": "x"})  # no TTL, no level or strikes
        await client.set(prefix + "ban:198.51.100.2", "not a hash")
        pipe = client.pipeline(transaction=False)
        many = [f"10.9.{i >> 8}.{i & 255}" for i in range(2 * banstore.SYNC_BATCH + 7)]
        for ip in many:
            pipe.hset(f"{prefix}ban:{ip}", mapping={"reason": "bulk", "level": 1, "strikes": 3})
            pipe.expire(f"{prefix}ban:{ip}", 600)
        await pipe.execute()
        bans = await banstore.read_bans(client, prefix)
        one = bans["198.51.100.1"]
        assert (one.reason, one.level, one.strikes) == ("a_b_c", 3, 4) and 30 < one.remaining() <= 60  # its TTL, read back (a loaded machine is slow)
        assert bans["2001:db8::/64"].deadline == float("inf") and (bans["2001:db8::/64"].level, bans["2001:db8::/64"].strikes) == (1, 0)
        assert "198.51.100.2" not in bans
        assert set(many) <= set(bans) and len(bans) == len(many) + 2
    finally:
        await banstore.delete_prefix(client, prefix)
        await client.aclose()
