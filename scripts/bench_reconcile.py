"""What the bans' reconcile costs: one tick against N bans, in Redis and in the embedded store.

    .venv/bin/python scripts/bench_reconcile.py [--bans 100000] [--redis redis://127.0.0.1:6379/0] [--ticks 200]

Writes N bans under a prefix of its own (deleted at the end), loads them into a BanStore as a proxy does,
then times `BanStore.reconcile()` (one tick: RECONCILE_KEYS entries, one EXISTS; nothing is missing, the
common case): this process's CPU and wall time per tick, Redis's time per call (INFO commandstats), and how
long a round over the view takes. Then one tick that finds 10 keys gone (EXISTS, then the Lua check). Then
the same against the embedded store (fakeredis) with 1,000 bans.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid

from addons import banserver
from addons import banstore


async def fill(client, prefix: str, n: int) -> None:
    for start in range(0, n, 5000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 5000)):
            key = f"{prefix}ban:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            pipe.hset(key, mapping={"reason": "bench", "seconds": 3600, "level": 1, "strikes": 3})
            pipe.expire(key, 3600)
        await pipe.execute()


async def usec(client, command: str) -> tuple[int, float]:
    try:
        stats = await client.info("commandstats")
    except Exception:  # noqa: BLE001 - fakeredis has no commandstats
        return 0, 0.0
    s = stats.get(f"cmdstat_{command}") or {}
    return int(s.get("calls", 0)), float(s.get("usec", 0))


async def measure(name: str, store: banstore.BanStore, ticks: int) -> None:
    await store.resync()
    n = len(store.bans)
    cpu, wall = [], []
    calls0, usec0 = await usec(store.client, "exists")
    for _ in range(ticks):
        c, w = time.process_time(), time.perf_counter()
        await store.reconcile()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    calls1, usec1 = await usec(store.client, "exists")
    per_call = (usec1 - usec0) / (calls1 - calls0) / 1000 if calls1 > calls0 else None
    ticks_per_round = -(-n // store.reconcile_keys)
    print(f"{name}: {n} bans, {store.reconcile_keys} checked per tick every {banstore.RECONCILE_EVERY} s")
    print("  slowest ticks (index, ms):", sorted(((round(c * 1000, 1), i) for i, c in enumerate(cpu)), reverse=True)[:4])
    print(f"  per tick: our CPU median {statistics.median(cpu) * 1000:.1f} ms (max {max(cpu) * 1000:.1f}, the first "
          f"tick of a round copies the view), wall median {statistics.median(wall) * 1000:.1f} ms"
          + (f", Redis {per_call:.2f} ms" if per_call is not None else ""))
    share = statistics.median(cpu) / banstore.RECONCILE_EVERY * 100
    print(f"  {share:.1f} % of one core; each entry checked every {ticks_per_round * banstore.RECONCILE_EVERY:.1f} s "
          f"({ticks_per_round} ticks a round)")
    victims = list(store.bans)[:10]
    store._rot_bans, store._rot_allow = list(store.bans), []
    store._rot_bans.remove(victims[0])
    store._rot_bans[-9:] = victims[1:]  # in the next batch, with the first one
    store._rot_bans.append(victims[0])
    await store.client.delete(*(store.key("ban", v) for v in victims))
    e0, l0 = await usec(store.client, "exists"), await usec(store.client, "evalsha")
    c, w = time.process_time(), time.perf_counter()
    await store.reconcile()
    c, w = time.process_time() - c, time.perf_counter() - w
    e1, l1 = await usec(store.client, "exists"), await usec(store.client, "evalsha")
    redis_ms = ((e1[1] - e0[1]) + (l1[1] - l0[1])) / 1000
    assert not any(v in store.bans for v in victims), "the deleted keys were not dropped"
    print(f"  a tick that finds 10 keys gone: our CPU {c * 1000:.1f} ms, wall {w * 1000:.1f} ms"
          + (f", Redis {redis_ms:.2f} ms" if e1[0] else ""))


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bans", type=int, default=100_000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--ticks", type=int, default=200)
    args = ap.parse_args(argv)
    prefix = f"ofbench:{uuid.uuid4().hex[:8]}:"
    client = banstore.make_client(args.redis)
    try:
        await client.ping()
    except Exception as e:  # noqa: BLE001
        print(f"Redis at {args.redis} unreachable ({e}): only the embedded store is measured", file=sys.stderr)
        client = None
    if client is not None:
        try:
            await fill(client, prefix, args.bans)
            await measure("Redis", banstore.BanStore(client, prefix), args.ticks)
        finally:
            print(f"  (deleted {await banstore.delete_prefix(client, prefix)} bench keys)")
            await client.aclose()
    hub = banserver.Embedded.open(None)
    emb = hub.client()
    await fill(emb, prefix, 1000)
    await measure("embedded (fakeredis)", banstore.BanStore(emb, prefix, reconcile_keys=banstore.RECONCILE_KEYS_EMBEDDED), args.ticks)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
