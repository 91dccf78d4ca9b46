"""The Redis side of IP bans: strikes, escalating bans, allowlist, rate limit. A plain module (no mitmproxy).

Key layout under a prefix P (default "openflare:"); every expiry is a Redis TTL, so nothing sweeps:

    P ban:<ip>      hash reason/seconds/level/strikes   TTL = the ban's duration
    P strikes:<ip>  int, strikes in the current window  TTL = the strike window, set by the first strike
    P level:<ip>    int, how many bans so far           TTL = how long repeat bans are remembered
    P unban:<ip>    int ms, time of the last unban      TTL = the strike window
    P allow:<cidr>  str note                            TTL = optional
    P events        pub/sub channel: one line per ban, unban, allow, disallow

Strikes and bans are Lua scripts, so counting is exact across any number of processes sharing one Redis.
Each process keeps a local view of the bans and the allowlist (`BanStore.check` is a dict lookup) that
follows Redis through the events channel. Pub/sub was chosen over keyspace notifications (they need
`CONFIG SET notify-keyspace-events`, often refused on managed Redis, and expired events come late) and over
RESP3 client-side caching (it only tracks keys this process has read, while we must learn of bans on IPs
it has never seen; redis.asyncio and fakeredis lack it). Expiry needs no event: each local entry carries its
deadline. Pub/sub drops messages while disconnected, so every (re)connect re-reads the bans with SCAN.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "openflare:"
OP_TIMEOUT = 0.05  # seconds: the most a Redis call may hold a request
PROBE_TIMEOUT = 1.0  # seconds: a PING after a timed-out call; no answer means reconnect
SYNC_TIMEOUT = 5.0  # seconds: one batch of the resync
SYNC_BATCH = 200  # keys per batch of the resync
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
POOL_SIZE = 8  # Redis connections per process, the events subscriber's one included

# A ban's duration, shared by the two scripts that ban. Doubling per repeat ban up to the cap.
_BAN_BODY = """
local level = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[6])
local secs = tonumber(ARGV[4])
local cap = tonumber(ARGV[5])
if secs <= 0 then
  secs = tonumber(ARGV[10])
  for i = 2, level do
    secs = secs * 2
    if secs >= cap then break end
  end
  if secs > cap then secs = cap end
end
redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'reason', ARGV[7], 'seconds', secs, 'level', level, 'strikes', n)
redis.call('EXPIRE', KEYS[2], secs)
redis.call('PUBLISH', ARGV[9], 'ban\\t' .. ARGV[8] .. '\\t' .. (secs * 1000) .. '\\t' .. level .. '\\t' .. n .. '\\t' .. ARGV[7])
return {n, secs, level}
"""

# KEYS: strikes, ban, level, unban.
# ARGV: seen_ms, window, threshold, (unused), cap, memory, reason, ip, channel, base.
# Returns {strikes, ban seconds (0 = no ban), level}; {-1, ttl ms, 0} if already banned;
# {-2, 0, 0} if the strike was seen before the last unban.
STRIKE_LUA = (
    """
local unban = tonumber(redis.call('GET', KEYS[4]) or '0')
if tonumber(ARGV[1]) <= unban then return {-2, 0, 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, redis.call('PTTL', KEYS[2]), 0} end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if n < tonumber(ARGV[3]) then return {n, 0, 0} end
"""
    + _BAN_BODY
)

# KEYS: strikes, ban, level. ARGV as STRIKE_LUA; ARGV[4] = seconds (0 = escalate like strikes do).
BAN_LUA = "local n = tonumber(redis.call('GET', KEYS[1]) or '0')\n" + _BAN_BODY

# KEYS: strikes, ban, level, unban. ARGV: now_ms, window, ip, channel.
UNBAN_LUA = """
local had = redis.call('DEL', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', ARGV[4], 'unban\\t' .. ARGV[3])
return had
"""

_UNSAFE = re.compile(r"[^\x20-\x7e]+|\"")


def sanitise(text: object, limit: int = 120) -> str:
    """Attacker-controlled text made safe for one log line or one event field: printable ASCII, no quotes."""
    return _UNSAFE.sub("_", str(text))[:limit] or "-"


@functools.lru_cache(maxsize=65536)
def ip_key(text: str, v6_prefix: int = 128) -> str | None:
    """The key an address is struck and banned under: the normalised IP, or its IPv6 /v6_prefix network."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        if v6_prefix < 128:
            return str(ipaddress.IPv6Network((addr, v6_prefix), strict=False))
    return str(addr)


def parse_key(text: str, v6_prefix: int = 128) -> str:
    """An IP (or an IPv6 network of exactly v6_prefix bits) typed by a person -> its key; ValueError if bad."""
    text = text.strip()
    if "/" in text:
        net = ipaddress.ip_network(text, strict=False)
        if net.version == 6 and net.prefixlen == v6_prefix < 128:
            return str(net)
        if net.num_addresses == 1:
            return ip_key(str(net.network_address), v6_prefix) or ""
        raise ValueError(f"bans are per IP{' or IPv6 /%d' % v6_prefix if v6_prefix < 128 else ''}, not {text!r}")
    key = ip_key(text, v6_prefix)
    if key is None:
        raise ValueError(f"not an IP address: {text!r}")
    return key


@dataclass(frozen=True)
class Policy:
    strikes: int = 3
    window: int = 600
    ban_seconds: int = 3600
    max_seconds: int = 7 * 86400
    memory: int = 30 * 86400


@dataclass
class Ban:
    deadline: float  # time.monotonic() when the ban ends
    reason: str = ""
    level: int = 1
    strikes: int = 0

    def remaining(self, now: float | None = None) -> float:
        return self.deadline - (time.monotonic() if now is None else now)


@dataclass
class StrikeResult:
    strikes: int  # strikes counted in the window; 0 if the strike was not counted
    banned: int = 0  # the ban's seconds when this strike banned the IP
    level: int = 0
    status: str = "counted"  # counted / banned / already-banned / after-unban / allowed / skipped / redis-down


class Allowlist:
    """IPs and CIDR ranges, some with a deadline. Matching costs one set lookup per distinct prefix length."""

    def __init__(self) -> None:
        self.static: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.dynamic: dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, float | None]] = {}
        self._index: dict[tuple[int, int], dict[int, float | None]] = {}

    def set_static(self, specs: Iterable[str]) -> None:
        """Replace the entries from the option; ValueError names a bad one."""
        nets = []
        for spec in specs:
            if spec.strip():
                try:
                    nets.append(ipaddress.ip_network(spec.strip(), strict=False))
                except ValueError as e:
                    raise ValueError(f"not an IP address or CIDR range: {spec!r}") from e
        self.static = nets
        self._rebuild()

    def add(self, cidr: str, deadline: float | None = None) -> str:
        net = ipaddress.ip_network(cidr.strip(), strict=False)
        self.dynamic[str(net)] = (net, deadline)
        self._rebuild()
        return str(net)

    def remove(self, cidr: str) -> bool:
        net = ipaddress.ip_network(cidr.strip(), strict=False)
        found = self.dynamic.pop(str(net), None) is not None
        self._rebuild()
        return found

    def replace_dynamic(self, entries: dict[str, float | None]) -> None:
        dynamic = {}
        for cidr, deadline in entries.items():
            try:
                net = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                logger.warning("openflare allowlist: ignoring bad entry %s in Redis", sanitise(cidr))
                continue
            dynamic[str(net)] = (net, deadline)
        self.dynamic = dynamic
        self._rebuild()

    def _rebuild(self) -> None:
        """Index by (version, prefix length) -> {network as int: deadline or None (no expiry)}."""
        index: dict[tuple[int, int], dict[int, float | None]] = {}
        entries = [(n, None) for n in self.static] + list(self.dynamic.values())
        for net, deadline in entries:
            slot = index.setdefault((net.version, net.prefixlen), {})
            n = int(net.network_address)
            if n in slot and slot[n] is None:
                continue
            slot[n] = None if deadline is None else max(deadline, slot.get(n) or 0.0)
        self._index = index

    def allowed(self, ip: str, now: float | None = None) -> bool:
        if not self._index:
            return False
        try:
            addr = ipaddress.ip_address(ip.split("/", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        bits = 32 if addr.version == 4 else 128
        n = int(addr)
        now = time.monotonic() if now is None else now
        for (version, plen), slot in self._index.items():
            if version != addr.version:
                continue
            masked = n >> (bits - plen) << (bits - plen) if plen else 0
            if masked in slot:
                deadline = slot[masked]
                if deadline is None or deadline > now:
                    return True
        return False

    def entries(self) -> list[str]:
        now = time.monotonic()
        out = [f"{n} (option)" for n in self.static]
        for cidr, (_, deadline) in sorted(self.dynamic.items()):
            if deadline is None:
                out.append(f"{cidr} (redis, no expiry)")
            elif deadline > now:
                out.append(f"{cidr} (redis, {int(deadline - now)} s left)")
        return out


class RateLimiter:
    """Requests per IP in the current one-second window, in process: O(1), no network on the request path."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self.second = 0
        self.counts: dict[str, int] = {}

    def hit(self, key: str, now: float | None = None) -> int:
        """Count one request; returns the count in this second (over the limit when > limit)."""
        second = int(time.monotonic() if now is None else now)
        if second != self.second:
            self.second = second
            self.counts = {}
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        return n


@dataclass
class BanStore:
    """The Redis logic plus the local view. `client` is a redis.asyncio client (or fakeredis's)."""

    client: object
    prefix: str = DEFAULT_PREFIX
    policy: Policy = field(default_factory=Policy)
    on_health: Callable[[bool], None] | None = None
    timeout: float = OP_TIMEOUT  # seconds a request may wait on one Redis call
    bans: dict[str, Ban] = field(default_factory=dict)
    allowlist: Allowlist = field(default_factory=Allowlist)
    stats: dict[str, int] = field(default_factory=dict)
    _state: bool | None = None  # None until the first connect succeeds or fails

    def __post_init__(self) -> None:
        self.channel = self.prefix + "events"
        self._strike = self.client.register_script(STRIKE_LUA)
        self._ban = self.client.register_script(BAN_LUA)
        self._unban = self.client.register_script(UNBAN_LUA)
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._ever = False  # connected at least once
        self._probe: asyncio.Task | None = None

    # --- keys and counters ---
    def key(self, kind: str, ip: str) -> str:
        return f"{self.prefix}{kind}:{ip}"

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    # --- the fast path: no network ---
    def check(self, key: str, now: float | None = None) -> Ban | None:
        ban = self.bans.get(key)
        if ban is None:
            return None
        if ban.deadline <= (time.monotonic() if now is None else now):
            self.bans.pop(key, None)
            return None
        return ban

    # --- Redis writes, each bounded by OP_TIMEOUT ---
    async def _call(self, script, keys: list[str], args: list) -> list | int | None:
        if not self.healthy:
            if self._ever or not await self.wait_synced(self.timeout):  # at startup, wait out the first connect
                self.count("redis_skipped")
                return None
        try:
            async with asyncio.timeout(self.timeout):
                return await script(keys=keys, args=args)
        except TimeoutError:
            # Slow, maybe only busy: the events subscription may well be fine. Probe before tearing down.
            self.count("redis_timeouts")
            if self._probe is None or self._probe.done():
                self._probe = asyncio.create_task(self._check(), name="openflare-bans-probe")
            return None
        except Exception as e:  # noqa: BLE001 - any other Redis failure: fall back, reconnect in the background
            self.count("redis_errors")
            self._lost(e)
            return None

    async def _check(self) -> None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self.client.ping()
        except Exception as e:  # noqa: BLE001 - no answer in time: reconnect
            self._lost(e if str(e) else TimeoutError(f"no answer to PING in {PROBE_TIMEOUT} s"))

    def _args(self, ip: str, reason: str, seen_ms: int = 0, seconds: int = 0) -> list:
        p = self.policy
        return [seen_ms, p.window, p.strikes, seconds, p.max_seconds, p.memory, sanitise(reason), ip, self.channel, p.ban_seconds]

    async def strike(self, ip: str, reason: str, seen_ms: int | None = None, addr: str | None = None) -> StrikeResult:
        """Count one strike against `ip` (a key from `ip_key`; `addr` the address, if grouped); ban at the threshold.

        `seen_ms` is when the request arrived (wall clock): a strike seen before the IP's last unban is ignored.
        """
        if self.allowlist.allowed(addr or ip):
            return StrikeResult(0, status="allowed")
        if self.check(ip):
            return StrikeResult(0, status="already-banned")
        seen_ms = int(time.time() * 1000) if seen_ms is None else seen_ms
        keys = [self.key("strikes", ip), self.key("ban", ip), self.key("level", ip), self.key("unban", ip)]
        res = await self._call(self._strike, keys, self._args(ip, reason, seen_ms))
        if res is None:
            self.count("strikes_lost")
            return StrikeResult(0, status="redis-down")
        n, secs, level = (int(x) for x in res)
        if n == -2:
            return StrikeResult(0, status="after-unban")
        if n == -1:
            self.bans.setdefault(ip, Ban(time.monotonic() + secs / 1000, "already banned"))
            return StrikeResult(0, status="already-banned")
        self.count("strikes")
        logger.info('openflare strike ip=%s strikes=%d/%d reason="%s"', ip, n, self.policy.strikes, sanitise(reason))
        if secs:
            self._banned(ip, secs, level, n, reason)
            return StrikeResult(n, secs, level, "banned")
        return StrikeResult(n)

    def _banned(self, ip: str, secs: int, level: int, strikes: int, reason: str) -> None:
        self.bans[ip] = Ban(time.monotonic() + secs, sanitise(reason), level, strikes)
        self.count("bans")
        logger.info('openflare ban ip=%s seconds=%d level=%d strikes=%d reason="%s"', ip, secs, level, strikes, sanitise(reason))

    async def ban(self, ip: str, seconds: int = 0, reason: str = "manual") -> int:
        """Ban now, for `seconds` (0: the escalating duration); returns the seconds. Redis down: local only, ConnectionError."""
        if self.allowlist.allowed(ip):
            raise ValueError(f"{ip} is allowlisted")
        keys = [self.key("strikes", ip), self.key("ban", ip), self.key("level", ip)]
        res = await self._call(self._ban, keys, self._args(ip, reason, seconds=seconds))
        if res is None:
            self._banned(ip, seconds or self.policy.ban_seconds, 0, 0, reason)
            raise ConnectionError("Redis is unreachable: ban applied to this process only")
        n, secs, level = (int(x) for x in res)
        self._banned(ip, secs, level, n, reason)
        return secs

    async def unban(self, ip: str) -> bool:
        """Lift a ban, forget its strikes and escalation; strikes seen before now are ignored. True if it was banned."""
        self.bans.pop(ip, None)
        keys = [self.key("strikes", ip), self.key("ban", ip), self.key("level", ip), self.key("unban", ip)]
        res = await self._call(self._unban, keys, [int(time.time() * 1000), max(self.policy.window, 60), ip, self.channel])
        if res is None:
            raise ConnectionError("Redis is unreachable: unban applied to this process only")
        self.count("unbans")
        logger.info("openflare unban ip=%s was_banned=%s", ip, bool(res))
        return bool(res)

    async def allow(self, cidr: str, seconds: int = 0) -> str:
        """Allowlist an IP or CIDR range, for `seconds` (0: until removed)."""
        net = self.allowlist.add(cidr, time.monotonic() + seconds if seconds else None)
        if not self.healthy:
            raise ConnectionError("Redis is unreachable: allowlist entry applied to this process only")
        async with asyncio.timeout(1):
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.key("allow", net), "1", ex=seconds or None)
            pipe.publish(self.channel, f"allow\t{net}\t{seconds * 1000}")
            await pipe.execute()
        logger.info("openflare allow cidr=%s seconds=%d", net, seconds)
        return net

    async def disallow(self, cidr: str) -> bool:
        net = str(ipaddress.ip_network(cidr.strip(), strict=False))
        self.allowlist.remove(net)
        async with asyncio.timeout(1):
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.key("allow", net))
            pipe.publish(self.channel, f"disallow\t{net}")
            removed, _ = await pipe.execute()
        logger.info("openflare disallow cidr=%s", net)
        return bool(removed)

    async def strikes_of(self, ips: list[str]) -> list[int]:
        if not ips:
            return []
        async with asyncio.timeout(1):
            vals = await self.client.mget([self.key("strikes", ip) for ip in ips])
        return [int(v) if v else 0 for v in vals]

    # --- following Redis ---
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="openflare-bans-follow")

    async def close(self) -> None:
        if self._probe:
            self._probe.cancel()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
        await self.client.aclose()

    async def wait_synced(self, timeout: float = 5) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._synced.wait()
            return True
        except TimeoutError:
            return False

    @property
    def healthy(self) -> bool:
        return self._state is True

    def _set_health(self, ok: bool, why: object = "") -> None:
        if ok is self._state:
            return
        self._state = ok
        if ok:
            logger.info("openflare bans: Redis reachable, %d bans loaded", len(self.bans))
        else:
            self.count("redis_outages")
            logger.warning("openflare bans: Redis unreachable (%s); reconnecting with backoff", sanitise(why, 200))
        if self.on_health:
            self.on_health(ok)

    def _lost(self, e: BaseException) -> None:
        self._set_health(False, f"{type(e).__name__}: {e}")
        self._synced.clear()
        self._wake.set()

    async def _follow(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(2):
                    await pubsub.subscribe(self.channel)
                await self.resync()
                self._wake.clear()
                self._set_health(True)
                self._synced.set()
                self._ever = True
                backoff = BACKOFF_MIN
                while not self._wake.is_set():
                    msg = await pubsub.get_message(timeout=0.5)
                    if msg is not None:
                        self.apply(msg["data"])
                raise ConnectionError("a Redis call failed")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever broke, back off and reconnect
                self._lost(e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), 0.5)
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass

    def apply(self, data: bytes | str) -> None:
        """Apply one event from the channel to the local view."""
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        parts = text.split("\t")
        try:
            if parts[0] == "ban":
                ip, ms, level, strikes = parts[1], int(parts[2]), int(parts[3]), int(parts[4])
                self.bans[ip] = Ban(time.monotonic() + ms / 1000, parts[5] if len(parts) > 5 else "", level, strikes)
            elif parts[0] == "unban":
                self.bans.pop(parts[1], None)
            elif parts[0] == "allow":
                ms = int(parts[2])
                self.allowlist.add(parts[1], time.monotonic() + ms / 1000 if ms else None)
            elif parts[0] == "disallow":
                self.allowlist.remove(parts[1])
        except (IndexError, ValueError):
            logger.warning("openflare bans: ignoring a malformed event %s", sanitise(text, 200))

    async def resync(self) -> None:
        """Replace the local view with what Redis holds now."""
        now = time.monotonic()
        bans: dict[str, Ban] = {}
        prefix = self.key("ban", "")
        # Small batches: parsing the replies runs on the event loop, between requests.
        async for batch in scan_keys(self.client, prefix + "*", SYNC_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for k in batch:
                pipe.hgetall(k)
                pipe.pttl(k)
            async with asyncio.timeout(SYNC_TIMEOUT):
                res = await pipe.execute()
            for k, h, ttl in zip(batch, res[::2], res[1::2]):
                if ttl is None or ttl == -2 or not h:
                    continue
                h = {_s(a): _s(b) for a, b in h.items()}
                deadline = now + ttl / 1000 if ttl > 0 else float("inf")
                bans[_s(k)[len(prefix) :]] = Ban(deadline, h.get("reason", ""), int(h.get("level", 1)), int(h.get("strikes", 0)))
        allow: dict[str, float | None] = {}
        aprefix = self.key("allow", "")
        async for batch in scan_keys(self.client, aprefix + "*"):
            pipe = self.client.pipeline(transaction=False)
            for k in batch:
                pipe.pttl(k)
            async with asyncio.timeout(SYNC_TIMEOUT):
                ttls = await pipe.execute()
            for k, ttl in zip(batch, ttls):
                if ttl == -2:
                    continue
                allow[_s(k)[len(aprefix) :]] = now + ttl / 1000 if ttl > 0 else None
        self.bans = bans
        self.allowlist.replace_dynamic(allow)


async def scan_keys(client, pattern: str, count: int = 1000):
    """Batches of the keys matching `pattern` (SCAN: never blocks Redis the way KEYS does)."""
    cursor = 0
    while True:
        async with asyncio.timeout(SYNC_TIMEOUT):
            cursor, keys = await client.scan(cursor, match=pattern, count=count)
        if keys:
            yield keys
            await asyncio.sleep(0)  # let requests run between batches
        if int(cursor) == 0:
            return


async def delete_prefix(client, prefix: str) -> int:
    """Delete every key under `prefix` (tests and benchmarks clean up after themselves); returns how many."""
    n = 0
    async for batch in scan_keys(client, prefix + "*"):
        n += await client.delete(*batch)
    return n


def _s(x: bytes | str) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else x


def embedded_available() -> bool:
    """Whether the in-process store can run: fakeredis runs Lua scripts only with the lupa package."""
    import importlib.util

    return importlib.util.find_spec("fakeredis") is not None and importlib.util.find_spec("lupa") is not None


def make_client(url: str | None):
    """A redis.asyncio client for `url`, or an in-process fakeredis when url is None (same code path)."""
    if url is None:
        import fakeredis

        return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # No hidden retries: a failure must surface at once so the fail policy and our backoff apply.
    # A few connections, reused: a burst of strikes waits for one (within its budget) instead of opening
    # hundreds of sockets at once.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=None, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1
    )
    return aioredis.Redis.from_pool(pool)
