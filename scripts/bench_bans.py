"""Strikes at saturation: is any strike lost, is every attacker banned, here and in every process?

    .venv/bin/python scripts/bench_bans.py [--redis redis://127.0.0.1:6379/0] [--attackers 10] [--busy 40] [--seconds 5] [--load 100000]

One event loop plays a saturated proxy: `--busy` tasks each burn CPU in 2 ms slices without pause (the
flows of benign traffic), and `--attackers` IPs each send a refused request every 5 ms, struck as the
`IpBans` addon strikes it (`BanStore.strike`, 50 ms budget), until this process bans the IP; the IP's
later requests are refused by the local lookup, as in `requestheaders`. A second BanStore (another proxy
process) follows Redis. Reported: strikes made, answered by Redis within the budget, queued (answered
later), delivered, lost (must be 0); attackers banned here, banned in Redis and seen by the other process
(must be all); the time from an attacker's first strike to its local ban. Then (`--load`, 0 to skip) how
long a starting proxy takes to load N bans: a BanStore started against them, timed until it is synced.
Keys under a prefix of its own, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid

from addons import banstore


async def attacker(store: banstore.BanStore, ip: str, stop: float, out: dict) -> None:
    first = time.monotonic()
    while time.monotonic() < stop:
        if store.check(ip) is not None:
            out.setdefault(ip, time.monotonic() - first)
        else:
            res = await store.strike(ip, "bench")
            out.setdefault("results", []).append(res.status)
        await asyncio.sleep(0.005)


async def busy(stop: float) -> None:
    while time.monotonic() < stop:
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


async def load(args) -> None:
    prefix = f"ofbench:{uuid.uuid4().hex[:8]}:"
    client = banstore.make_client(args.redis)
    try:
        for start in range(0, args.load, 5000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(args.load, start + 5000)):
                key = f"{prefix}ban:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
                pipe.hset(key, mapping={"reason": "bench", "seconds": 3600, "level": 1, "strikes": 3})
                pipe.expire(key, 3600)
            await pipe.execute()
        store = banstore.BanStore(banstore.make_client(args.redis), prefix, banstore.Policy())
        wall, cpu = time.perf_counter(), time.process_time()
        store.start()
        synced = await store.wait_synced(60)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"start with {args.load} bans in Redis: {len(store.bans)} loaded in {wall:.2f} s ({cpu:.2f} s CPU)"
              f"{'' if synced else ', NOT synced within 60 s'}")  # fmt: skip
        await store.close()
    finally:
        await banstore.delete_prefix(client, prefix)
        await client.aclose()


async def main(args) -> int:
    prefix = f"ofbench:{uuid.uuid4().hex[:8]}:"
    policy = banstore.Policy(strikes=3, window=600, ban_seconds=600)
    store = banstore.BanStore(banstore.make_client(args.redis), prefix, policy)
    other = banstore.BanStore(banstore.make_client(args.redis), prefix, policy)
    store.start()
    other.start()
    try:
        if not (await store.wait_synced() and await other.wait_synced()):
            print(f"Redis not reachable at {args.redis}", file=sys.stderr)
            return 2
        ips = [f"198.18.0.{i + 1}" for i in range(args.attackers)]
        out: dict = {}
        stop = time.monotonic() + args.seconds
        lag: list[float] = []

        async def probe() -> None:  # how late the loop runs a 10 ms sleep: the saturation
            while time.monotonic() < stop:
                t = time.monotonic()
                await asyncio.sleep(0.01)
                lag.append(time.monotonic() - t - 0.01)

        await asyncio.gather(probe(), *(busy(stop) for _ in range(args.busy)), *(attacker(store, ip, stop, out) for ip in ips))
        deadline = time.monotonic() + 30
        while store._outbox and time.monotonic() < deadline:  # the queue drains once the load is gone
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        results = out.get("results", [])
        s = store.stats
        in_redis = await store.client.exists(*[f"{prefix}ban:{ip}" for ip in ips])
        seen = sum(other.check(ip) is not None for ip in ips)
        here = sum(ip in out for ip in ips)
        lost = s.get("strikes_lost", 0) + (len(results) - s.get("strikes_delivered", 0))
        times = sorted(out[ip] for ip in ips if ip in out)
        print(f"loop lag (10 ms sleep): median {statistics.median(lag) * 1000:.0f} ms, max {max(lag) * 1000:.0f} ms")
        print(f"strikes made {len(results)}: answered within the budget {len(results) - s.get('strikes_queued', 0)}, "
              f"queued {s.get('strikes_queued', 0)}, delivered {s.get('strikes_delivered', 0)}, lost {lost}, "
              f"retries {s.get('strike_retries', 0)}")  # fmt: skip
        print(f"attackers {len(ips)}: banned here {here}, bans in Redis {in_redis}, seen by the other process {seen}")
        if times:
            print(f"first strike to local ban: median {statistics.median(times) * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms")
        ok = lost == 0 and here == in_redis == seen == len(ips)
    finally:
        await store.close()
        await other.close()
        cleanup = banstore.make_client(args.redis)
        await banstore.delete_prefix(cleanup, prefix)
        await cleanup.aclose()
    if args.load:
        await load(args)
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--attackers", type=int, default=10)
    ap.add_argument("--busy", type=int, default=40, help="CPU-burning tasks on the loop (the saturation)")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--load", type=int, default=100_000, help="bans a starting proxy loads (0: skip)")
    sys.exit(asyncio.run(main(ap.parse_args())))
