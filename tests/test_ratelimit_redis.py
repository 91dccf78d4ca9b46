"""The cluster-wide rate limit (banstore.SharedRateLimiter, RATE_LUA): one sliding window per IP in the shared
Redis (its own key prefix per test), counted across processes (here: several BanStores, each a process's
view), the fast path that asks nobody, the per-process fallback while Redis is down, and IpBans using it.
A window of 60 s in most tests: what is counted must not depend on how fast this loaded machine runs."""

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from mitmproxy.test import taddons
from mitmproxy.test import tflow

from addons import banstore
from addons import common
from addons.bans import IpBans
from conftest import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
MINUTE = 60_000  # ms: a window no test outlasts


@pytest.fixture
async def prefix():
    p = f"oftest-rate17-{uuid.uuid4().hex[:10]}:"
    yield p
    r = aioredis.from_url(REDIS_URL)
    await banstore.delete_prefix(r, p)
    await r.aclose()


async def open_store(prefix: str, url: str = REDIS_URL) -> banstore.BanStore:
    store = banstore.BanStore(banstore.make_client(url), prefix, timeout=2.0)  # a generous budget: a loaded machine
    store.start()
    return store


async def hit(lim: banstore.SharedRateLimiter, store: banstore.BanStore, key: str) -> bool:
    res = lim.fast(key)
    return (res if res is not None else await lim.ask(store, key))[0]


async def test_two_processes_admit_the_limit_between_them(prefix):
    stores = [await open_store(prefix) for _ in range(2)]
    try:
        assert all([await s.wait_synced() for s in stores]), "Redis not reachable on 127.0.0.1:6379"
        lims = [banstore.SharedRateLimiter(40, window_ms=MINUTE) for _ in stores]
        got = [await hit(lims[i % 2], stores[i % 2], "198.51.100.70") for i in range(80)]  # 2 x limit, alternating
        assert sum(got) == 40 and got[:40] == [True] * 40 and not any(got[40:])
        # another IP is counted apart; Redis holds the whole count once each process has delivered
        assert await hit(lims[0], stores[0], "198.51.100.71")
        await asyncio.gather(*(lim.deliver() for lim in lims))
        r = aioredis.from_url(REDIS_URL)
        counts = await r.hgetall(f"{prefix}rate:198.51.100.70")
        assert sum(int(v) for v in counts.values()) == 40
        assert 0 < await r.pttl(f"{prefix}rate:198.51.100.70") <= MINUTE + banstore.RATE_BUCKET_MS
        await r.aclose()
        assert sum(s.stats.get("rate_asks", 0) for s in stores) >= 40 - 2 * lims[0].fast_limit
    finally:
        for s in stores:
            await s.close()


async def test_a_client_far_below_the_limit_asks_nobody_and_is_counted_later(prefix):
    store = await open_store(prefix)
    try:
        assert await store.wait_synced()
        lim = banstore.SharedRateLimiter(100, window_ms=MINUTE)
        for _ in range(9):  # under RATE_FAST_PERCENT (10 %) of 100
            assert lim.fast("198.51.100.72") == (True, False)
        assert store.stats.get("rate_asks", 0) == 0
        lim.store = store
        assert await lim.deliver() == 9  # one pipeline (the flush timer does this within RATE_FLUSH_S)
        r = aioredis.from_url(REDIS_URL)
        assert sum(int(v) for v in (await r.hgetall(f"{prefix}rate:198.51.100.72")).values()) == 9
        await r.aclose()
        assert lim.fast("198.51.100.72") is None  # 9 here + 9 known in the store: past the fast share, ask
        assert await lim.ask(store, "198.51.100.72") == (True, False) and store.stats["rate_asks"] == 1
    finally:
        await store.close()


async def test_the_flush_timer_delivers_what_the_fast_path_admitted(prefix):
    store = await open_store(prefix)
    try:
        assert await store.wait_synced()
        lim = banstore.SharedRateLimiter(1000, window_ms=MINUTE)
        lim.store = store
        for _ in range(5):
            lim.fast("198.51.100.73")
        r = aioredis.from_url(REDIS_URL)
        for _ in range(200):  # the timer fires after RATE_FLUSH_S; wait for its pipeline, not for a time
            if store.stats.get("rate_delivered"):
                break
            await asyncio.sleep(0.05)
        assert store.stats.get("rate_delivered") == 5
        assert sum(int(v) for v in (await r.hgetall(f"{prefix}rate:198.51.100.73")).values()) == 5
        await r.aclose()
    finally:
        await store.close()


async def test_a_refused_ip_is_refused_here_for_a_bucket_without_asking_and_strikes_once_a_second(prefix):
    store = await open_store(prefix)
    try:
        assert await store.wait_synced()
        now = [100.0]
        lim = banstore.SharedRateLimiter(2, window_ms=MINUTE, clock=lambda: now[0])
        assert [await hit(lim, store, "198.51.100.74") for _ in range(2)] == [True, True]
        assert await lim.ask(store, "198.51.100.74") == (False, True)  # refused by Redis: a strike
        asks = store.stats["rate_asks"]
        assert lim.fast("198.51.100.74") == (False, False)  # within the bucket: refused here, no strike
        assert store.stats["rate_asks"] == asks
        now[0] += banstore.RATE_BUCKET_MS / 1000
        assert lim.fast("198.51.100.74") is None  # the bucket is over: Redis decides again
        assert await lim.ask(store, "198.51.100.74") == (False, False)  # refused; struck less than 1 s ago
        now[0] += 1.0
        assert await lim.ask(store, "198.51.100.74") == (False, True)
    finally:
        await store.close()


async def test_while_redis_is_down_each_process_limits_on_its_own():
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    store = await open_store("oftest-rate17-down:", dead)
    try:
        assert not await store.wait_synced(0.5)
        lims = [banstore.SharedRateLimiter(5, window_ms=MINUTE) for _ in range(2)]
        got = [[await lim.ask(store, "198.51.100.75") for _ in range(8)] for lim in lims]
        assert [sum(a for a, _ in g) for g in got] == [5, 5]  # the limit per process: 2 x the limit in all
        assert store.stats["rate_local"] == 16
    finally:
        await store.close()


def test_the_window_in_redis_slides_in_buckets():
    """RATE_LUA on its own: a window of 3 buckets of 100 ms forgets what is older (and deletes it)."""

    async def run(prefix):
        r = aioredis.from_url(REDIS_URL)
        script = r.register_script(banstore.RATE_LUA)
        key = f"{prefix}rate:198.51.100.76"
        try:
            old = int((await r.time())[0]) * 10 - 100  # a bucket of ten seconds ago (buckets of 100 ms)
            await r.hset(key, mapping={str(old): 7})
            assert [int(x) for x in await script(keys=[key], args=[10, 0, 1, 100, 3])] == [1, 1]  # the old 7 are out
            assert str(old).encode() not in await r.hkeys(key)
            assert [int(x) for x in await script(keys=[key], args=[10, 8, 1, 100, 3])] == [1, 10]  # 8 delivered + 1
            assert [int(x) for x in await script(keys=[key], args=[10, 0, 1, 100, 3])] == [0, 10]  # full
            assert [int(x) for x in await script(keys=[key], args=[10, 2, 0, 100, 3])] == [0, 12]  # a delivery counts
        finally:
            await banstore.delete_prefix(r, prefix)
            await r.aclose()

    asyncio.run(run(f"oftest-rate17-{uuid.uuid4().hex[:10]}:"))


def rate_flow(ip: str):
    f = tflow.tflow()
    f.client_conn.peername = (ip, 40000)
    f.metadata[common.CLIENT_IP] = ip
    return f


async def test_ipbans_with_redis_counts_the_limit_across_two_proxies(prefix, monkeypatch):
    """Two IpBans (two proxies) on one Redis: 2 x the limit from one IP spread over both gives 429s."""
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    addons = [IpBans(), IpBans()]

    def start(a: IpBans, tctx) -> None:  # configured while its own master is mitmproxy's ctx
        tctx.configure(a, openflare_redis_url=REDIS_URL, openflare_redis_prefix=prefix, openflare_rate_limit=20, openflare_strikes=100)
        a.running()
        a.store.timeout = 2.0
        a.shared.window_ms = MINUTE

    statuses = []
    with taddons.context(addons[0]) as t0:
        start(addons[0], t0)
        with taddons.context(addons[1]) as t1:  # a second master: a second proxy
            start(addons[1], t1)
            try:
                assert all([await a.store.wait_synced() for a in addons]) and all(a.rate_shared for a in addons)
                for i in range(40):
                    f = rate_flow("198.51.100.77")
                    await addons[i % 2].requestheaders(f)
                    statuses.append(f.response.status_code if f.response else 200)
            finally:
                for a in addons:
                    store, a.store = a.store, None
                    a.shared.close()
                    await store.close()
    assert statuses.count(200) == 20 and statuses.count(429) == 20 and statuses[:20] == [200] * 20


async def test_ipbans_delivers_what_its_fast_path_admitted(prefix, monkeypatch):
    """A client far below the limit never asks; its requests still reach the window in Redis."""
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    addon = IpBans()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, openflare_redis_url=REDIS_URL, openflare_redis_prefix=prefix, openflare_rate_limit=100)
        addon.running()
        try:
            assert await addon.store.wait_synced()
            for _ in range(3):
                await addon.requestheaders(rate_flow("198.51.100.79"))
            assert addon.store.stats.get("rate_asks", 0) == 0
            for _ in range(200):  # the flush timer's pipeline, RATE_FLUSH_S after the first request
                if addon.store.stats.get("rate_delivered"):
                    break
                await asyncio.sleep(0.05)
            r = aioredis.from_url(REDIS_URL)
            assert sum(int(v) for v in (await r.hgetall(f"{prefix}rate:198.51.100.79")).values()) == 3
            await r.aclose()
        finally:
            store, addon.store = addon.store, None
            addon.shared.close()
            await store.close()


async def test_the_embedded_store_runs_the_same_window():
    """Without Redis, workers of `make run WORKERS=N` count in the embedded store (fakeredis, the same Lua)."""
    store = banstore.BanStore(banstore.make_client(None), "openflare:", kind=banstore.KIND_IN_PROCESS, timeout=2.0)
    store.start()
    try:
        assert await store.wait_synced()
        lims = [banstore.SharedRateLimiter(30, window_ms=MINUTE) for _ in range(2)]
        got = [await hit(lims[i % 2], store, "198.51.100.78") for i in range(60)]
        assert sum(got) == 30 and not any(got[30:])
    finally:
        await store.close()


async def test_one_delivery_counts_many_ips_in_chunks(prefix, monkeypatch):
    monkeypatch.setattr(banstore, "RATE_ADD_KEYS", 2)  # three IPs: two RATE_ADD_LUA calls in one pipeline
    store = await open_store(prefix)
    try:
        assert await store.wait_synced()
        lim = banstore.SharedRateLimiter(100, window_ms=MINUTE)
        lim.store = store
        ips = ["198.51.100.81", "198.51.100.82", "198.51.100.83"]
        for n, ip in enumerate(ips, 2):
            for _ in range(n):
                assert lim.fast(ip) == (True, False)
        assert lim.fast("198.51.100.84") == (True, False)  # one request: admitted, never delivered
        assert await lim.deliver() == 9
        r = aioredis.from_url(REDIS_URL)
        got = [sum(int(v) for v in (await r.hgetall(f"{prefix}rate:{ip}")).values()) for ip in [*ips, "198.51.100.84"]]
        await r.aclose()
        assert got == [2, 3, 4, 0] and [lim._ips[ip].remote for ip in ips] == [2, 3, 4]  # the window counts come back
    finally:
        await store.close()
