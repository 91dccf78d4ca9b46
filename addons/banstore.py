"""The Redis side of IP bans: strikes, escalating bans, allowlist, rate limit. A plain module (no mitmproxy).

Key layout under a prefix P (default "openflare:"); every expiry is a Redis TTL, so nothing sweeps:

    P ban:<ip>      hash reason/seconds/level/strikes   TTL = the ban's duration
    P strikes:<ip>  int, thirds of a strike this window TTL = the strike window, set by the first strike
    P level:<ip>    int, how many bans so far           TTL = how long repeat bans are remembered
    P unban:<ip>    int ms, time of the last unban      TTL = the strike window
    P rate:<ip>     hash bucket -> requests admitted    TTL = the rate window and one bucket (SharedRateLimiter)
    P allow:<cidr>  str note                            TTL = optional
    P events        pub/sub channel: one line per ban, unban, allow, disallow

Strikes and bans are Lua scripts, so counting is exact across any number of processes sharing one Redis.
A strike never waits on Redis to count: `BanStore.strike` counts it in this process (which bans on its own
count at once: a ban marked `local`) and queues it; a background task delivers the queue to Redis in
pipelines of up to FLUSH_BATCH, retried until Redis answers, so a flood is banned faster, not dropped. Redis's
answer (the count of every process) then replaces the local one, and its ban event reaches every process.
A strike weighs one to three thirds (`strike_thirds`: a score just over the threshold counts less than a 10),
so the strikes key counts thirds; a ban's `strikes` field and its event give whole strikes (rounded down).
Each process keeps a local view of the bans and the allowlist (`BanStore.check` is a dict lookup) that
follows Redis through the events channel. Pub/sub was chosen over keyspace notifications (they need
`CONFIG SET notify-keyspace-events`, often refused on managed Redis, and expired events come late) and over
RESP3 client-side caching (it only tracks keys this process has read, while we must learn of bans on IPs
it has never seen; redis.asyncio and fakeredis lack it). Expiry needs no event: each local entry carries its
deadline. Pub/sub drops messages while disconnected, so every (re)connect re-reads the bans with SCAN,
and writes back the bans in force this process knows and the store lacks (a Redis restarted without
persistence comes back empty): `BanStore.republish` says which side wins, and why.

A key deleted behind the channel's back (`redis-cli del P ban:IP`, publishing nothing) is followed by the
reconcile: every RECONCILE_EVERY seconds one EXISTS asks for up to `reconcile_keys` entries of the local
view (bans, then run-time allowlist entries, in rotation); only when some are gone does a Lua script say
which (RECONCILE_LUA; it also gives their batch's changed TTLs), and those are dropped or updated. Bounded
work per tick, none when the view is empty. A TTL shortened by hand is followed when it runs out; a key
made or lengthened by hand without an event (`redis-cli hset`, `expire`) counts from the next (re)connect
(or, for a ban, the IP's next strike). Without Redis the store is a fakeredis server (`addons.banserver`),
run by the same code.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "openflare:"
DEFAULT_V6_PREFIX = 64  # IPv6 clients are one client per /64: a host usually owns a whole /64 and picks addresses in it
OP_TIMEOUT = 0.05  # seconds: the most a Redis call may hold a request
PROBE_TIMEOUT = 1.0  # seconds: a PING after a timed-out call; no answer means reconnect
SYNC_TIMEOUT = 5.0  # seconds: one batch of the resync
SYNC_BATCH = 2000  # keys per batch of the resync (one LOAD_LUA call: a few ms of Redis time)
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
POOL_SIZE = 8  # Redis connections per process, the events subscriber's one included
RECONCILE_EVERY = 0.5  # seconds between two reconcile ticks
FOLLOW_QUIET_S = 30.0  # with no ban or run-time allowlist entry here, the follower waits this long for an event
RECONCILE_KEYS = 1000  # local entries checked per tick (scripts/bench_reconcile.py measures a tick)
RECONCILE_KEYS_EMBEDDED = 250  # the same against the embedded store (fakeredis: about 7 us a key)
OUTBOX_MAX = 200_000  # strikes waiting for Redis; past this the oldest are dropped (counted strikes_lost)
FLUSH_BATCH = 1000  # strikes per pipeline of the delivery
FLUSH_TIMEOUT = 2.0  # seconds: one pipeline of the delivery; no answer: kept, retried

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
local whole = math.floor(n / 3)
redis.call('HSET', KEYS[2], 'reason', ARGV[7], 'seconds', secs, 'level', level, 'strikes', whole)
redis.call('EXPIRE', KEYS[2], secs)
redis.call('PUBLISH', ARGV[9], 'ban\\t' .. ARGV[8] .. '\\t' .. (secs * 1000) .. '\\t' .. level .. '\\t' .. whole .. '\\t' .. ARGV[7])
return {n, secs, level}
"""

# KEYS: strikes, ban, level, unban.
# ARGV: seen_ms, window, threshold (whole strikes), (unused), cap, memory, reason, ip, channel, base, thirds.
# Returns {thirds counted, ban seconds (0 = no ban), level}; {-1, ttl ms, 0} if already banned;
# {-2, 0, 0} if the strike was seen before the last unban.
STRIKE_LUA = (
    """
local unban = tonumber(redis.call('GET', KEYS[4]) or '0')
if tonumber(ARGV[1]) <= unban then return {-2, 0, 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, redis.call('PTTL', KEYS[2]), 0} end
local n = redis.call('INCRBY', KEYS[1], ARGV[11])
if n == tonumber(ARGV[11]) then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if n < 3 * tonumber(ARGV[3]) then return {n, 0, 0} end
"""
    + _BAN_BODY
)

# STRIKE_LUA for many strikes in one call, in order: KEYS are each strike's four, ARGV each one's eleven.
# Returns the three numbers STRIKE_LUA returns, for each strike in turn; a strike that fails in Redis (a key
# of the wrong type) gives {-3, the error, 0} and the others go on, as in calls of their own. (Inside the
# function, KEYS and ARGV are its parameters: the body of STRIKE_LUA unchanged.)
STRIKES_LUA = (
    "local function strike(KEYS, ARGV)\n"
    + STRIKE_LUA
    + """
end
local out = {}
for i = 0, #KEYS / 4 - 1 do
  local k, a = {}, {}
  for j = 1, 4 do k[j] = KEYS[i * 4 + j] end
  for j = 1, 11 do a[j] = ARGV[i * 11 + j] end
  local ok, r = pcall(strike, k, a)
  if not ok then r = {-3, type(r) == 'table' and (r.err or 'error') or tostring(r), 0} end
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
  out[#out + 1] = r[3]
end
return out
"""
)
STRIKES_PER_CALL = 100  # strikes per STRIKES_LUA call (a call runs atomically: Redis serves nothing else meanwhile)

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

# KEYS: ban, level, unban. ARGV: ms left (-1: no expiry), reason, level, strikes, ip, channel, memory, seconds.
# A ban this process knows and the store lacks, written back unless the store has a ban of its own for the IP
# or an unban newer than the strike window (the operator's word wins). Returns 1 if written.
REPUBLISH_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'reason', ARGV[2], 'seconds', ARGV[8], 'level', ARGV[3], 'strikes', ARGV[4])
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[2], ARGV[3], 'NX', 'EX', ARGV[7]) end
redis.call('PUBLISH', ARGV[6], 'ban\t' .. ARGV[5] .. '\t' .. math.max(tonumber(ARGV[1]), 0) .. '\t' .. ARGV[3] .. '\t' .. ARGV[4] .. '\t' .. ARGV[2])
return 1
"""

# No KEYS (it scans). ARGV: cursor, pattern, count, length of the key prefix before the IP.
# One SCAN step and every ban it found, as one string: a line `ip TAB pttl TAB level TAB strikes TAB reason`
# per ban (control characters in the reason made `_`), so reading 100k bans is 50 calls and a split.
# A key gone meanwhile or of another type is left out. Returns {next cursor, lines}.
LOAD_LUA = """
local r = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local plen = tonumber(ARGV[4])
local out = {}
for _, k in ipairs(r[2]) do
  local t = redis.call('PTTL', k)
  local h = redis.pcall('HMGET', k, 'reason', 'level', 'strikes')
  if t ~= -2 and type(h) == 'table' and not h.err then
    local reason = string.gsub(h[1] or '', '%c', '_')
    out[#out + 1] = string.sub(k, plen + 1) .. '\\t' .. t .. '\\t' .. (h[2] or '1') .. '\\t' .. (h[3] or '0') .. '\\t' .. reason
  end
end
return {r[1], table.concat(out, '\\n')}
"""

# KEYS: ban/allow keys. ARGV[i]: the ms left this process expects for KEYS[i] (-1: no expiry).
# Returns {i, pttl, ...} for each key that is gone (pttl -2) or whose TTL differs by more than a second.
RECONCILE_LUA = """
local out = {}
for i, k in ipairs(KEYS) do
  local t = redis.call('PTTL', k)
  local want = tonumber(ARGV[i])
  if t == -2 or (t == -1) ~= (want == -1) or (t >= 0 and math.abs(t - want) > 1000) then
    out[#out + 1] = i
    out[#out + 1] = t
  end
end
return out
"""

_UNSAFE = re.compile(r"[^\x20-\x7e]+|\"")


def sanitise(text: object, limit: int = 120) -> str:
    """Attacker-controlled text made safe for one log line or one event field: printable ASCII, no quotes."""
    return _UNSAFE.sub("_", str(text))[:limit] or "-"


@functools.lru_cache(maxsize=65536)
def ip_key(text: str, v6_prefix: int = DEFAULT_V6_PREFIX) -> str | None:
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


def parse_key(text: str, v6_prefix: int = DEFAULT_V6_PREFIX) -> str:
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


def strike_thirds(score: int | None) -> int:
    """A refusal's strike, in thirds, by the score that refused it: 10 a whole strike, 9 two thirds, 8 or
    less one third (a score just over the threshold is the likeliest false positive). No score: whole."""
    if not isinstance(score, int) or isinstance(score, bool):
        return 3
    return max(1, min(3, score - 7))


def show_strikes(strikes: float) -> str:
    """Strikes as a person reads them: 2, 1.33, 0.67."""
    return str(int(strikes)) if strikes == int(strikes) else f"{strikes:.2f}"


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
    local: bool = False  # banned on this process's own count, before Redis has said (its strikes are on their way)

    def remaining(self, now: float | None = None) -> float:
        return self.deadline - (time.monotonic() if now is None else now)


@dataclass
class StrikeResult:
    strikes: float  # strikes counted in the window (in thirds: 1/3, 2/3, 1, 4/3, ...); 0 if not counted
    banned: int = 0  # the ban's seconds when this strike banned the IP
    level: int = 0
    # counted / banned / already-banned / after-unban / allowed / skipped: Redis's answer (banned: or this
    # process's own count); queued: Redis has not answered within the budget, the strike is delivered later
    status: str = "counted"


class _Pending:
    """A strike on its way to Redis; `waiter` is the future its request may still be waiting on."""

    __slots__ = ("ip", "reason", "seen_ms", "thirds", "waiter")

    def __init__(self, ip: str, reason: str, seen_ms: int, thirds: int, waiter: asyncio.Future | None) -> None:
        self.ip, self.reason, self.seen_ms, self.thirds, self.waiter = ip, reason, seen_ms, thirds, waiter


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
        """One line per entry: `CIDR (option)`, `CIDR (added, no expiry)`, `CIDR (added, N s left)`."""
        now = time.monotonic()
        out = [f"{n} (option)" for n in self.static]
        for cidr, (_, deadline) in sorted(self.dynamic.items()):
            if deadline is None:
                out.append(f"{cidr} (added, no expiry)")
            elif deadline > now:
                out.append(f"{cidr} (added, {int(deadline - now)} s left)")
        return out


class _Log:
    """One IP's admitted requests: times while fewer than the limit, then a ring of the last `limit` of them."""

    __slots__ = ("times", "struck")

    def __init__(self) -> None:
        self.times: list[float] | collections.deque[float] = []
        self.struck = float("-inf")  # when a refusal last struck


class RateLimiter:
    """At most `limit` requests per IP admitted in any one-second span: a sliding log, in process, O(1).

    A request is admitted when the IP has had fewer than `limit` admitted requests, or when the oldest of
    its last `limit` admitted ones is at least a second old: then no span of one second (half-open) ever
    holds more than `limit` admitted requests, and an IP sending exactly `limit` a second, evenly, is never
    refused. (A fixed one-second window let 2x the limit through across its boundary.) Refused requests are
    not logged. A client below the limit costs a dict lookup and an append to a short list; only an IP at
    the limit holds a ring of `limit` times. IPs with nothing admitted for a second are forgotten (two
    generations of the table, swapped every second), so memory follows the IPs of the last two seconds.
    """

    def __init__(self, limit: int = 100, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self.clock = clock
        self._cur: dict[str, _Log] = {}
        self._old: dict[str, _Log] = {}
        self._swap_at = float("-inf")

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, limit: int) -> None:
        if limit != self._limit:
            self._limit = limit
            self._cur, self._old = {}, {}

    def __len__(self) -> int:
        """IPs remembered (those with a request in the last two seconds, at least)."""
        return len(self._cur) + len(self._old)

    def hit(self, key: str, now: float | None = None) -> tuple[bool, bool]:
        """One request from `key`: (admitted, strike): a refused one strikes at most once a second."""
        now = self.clock() if now is None else now
        if now >= self._swap_at:  # entries left in _old had nothing admitted since before the last swap
            self._old = self._cur if now < self._swap_at + 1 else {}
            self._cur = {}
            self._swap_at = now + 1
        log = self._cur.get(key)
        if log is None:
            log = self._cur[key] = self._old.pop(key, None) or _Log()
        times, limit = log.times, self._limit
        if len(times) < limit:
            times.append(now)
            return True, False
        if now - times[0] >= 1.0:  # the limit-th last admitted request left the one-second span
            if type(times) is list:
                times = log.times = collections.deque(times, maxlen=limit)
            times.append(now)  # the deque drops times[0]
            return True, False
        if now - log.struck >= 1.0:
            log.struck = now
            return False, True
        return False, False


# The cluster-wide rate limit. KEYS: P rate:<ip>, a hash {bucket number: requests admitted in it}, buckets of
# ARGV[4] ms on Redis's clock (TIME: one clock for every host). ARGV: limit, add (requests this process
# admitted without asking, not counted yet), ask (1: this request asks to be admitted; 0: a delivery only),
# bucket ms, buckets per window. The window is the current bucket and the buckets-1 before it; older
# buckets are deleted. Returns {1 if admitted else 0, requests in the window after this call}.
RATE_LUA = """
local t = redis.call('TIME')
local bms = tonumber(ARGV[4])
local nb = tonumber(ARGV[5])
local b = math.floor((tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) / bms)
local first = b - nb + 1
local h = redis.call('HGETALL', KEYS[1])
local total = 0
local old = {}
for i = 1, #h, 2 do
  if tonumber(h[i]) < first then old[#old + 1] = h[i] else total = total + tonumber(h[i + 1]) end
end
if #old > 0 then redis.call('HDEL', KEYS[1], unpack(old)) end
local add = tonumber(ARGV[2])
local admit = 0
if tonumber(ARGV[3]) == 1 and total + add < tonumber(ARGV[1]) then admit = 1 end
add = add + admit
if add > 0 then
  redis.call('HINCRBY', KEYS[1], string.format('%d', b), add)
  redis.call('PEXPIRE', KEYS[1], bms * (nb + 1))
end
return {admit, total + add}
"""
# The fast path's delivery: many IPs in one call (a script call has a fixed cost: about 1.3 ms in the embedded
# store, whose fakeredis starts a Lua runtime per call; 0.2 ms of client work with Redis). KEYS: rate keys;
# ARGV: bucket ms, buckets per window, then the requests to add to each key. Returns each key's window count.
RATE_ADD_LUA = """
local t = redis.call('TIME')
local bms = tonumber(ARGV[1])
local nb = tonumber(ARGV[2])
local b = math.floor((tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) / bms)
local first = b - nb + 1
local bs = string.format('%d', b)
local out = {}
for i, k in ipairs(KEYS) do
  local add = tonumber(ARGV[i + 2])
  local total = add
  local h = redis.call('HGETALL', k)
  local old = {}
  for j = 1, #h, 2 do
    if tonumber(h[j]) < first then old[#old + 1] = h[j] else total = total + tonumber(h[j + 1]) end
  end
  if #old > 0 then redis.call('HDEL', k, unpack(old)) end
  redis.call('HINCRBY', k, bs, add)
  redis.call('PEXPIRE', k, bms * (nb + 1))
  out[i] = total
end
return out
"""
RATE_ADD_KEYS = 500  # IPs per RATE_ADD_LUA call (a call of 500 keys holds Redis about a millisecond)
# An IP's fast-path requests are delivered once it has sent this many here in the current second: most
# clients of a busy site send one request and leave, and delivering each costs the store work (the embedded
# store: about a millisecond per IP). A client sending one request a second to each of many workers is
# undercounted by one a second per worker; from its second request on, everything is counted.
RATE_DELIVER_MIN = 2
RATE_BUCKET_MS = 100  # the shared window moves in steps of this many ms
RATE_FAST_PERCENT = 10  # an IP below this share of the limit (here + last known store count) asks nobody
RATE_FLUSH_S = 0.05  # requests admitted without asking reach the store within this (one call for all IPs)
# The most a request near the limit waits for the store's answer. Longer than OP_TIMEOUT: a busy event loop
# (a burst on this process) reads the answer late, and a decision made here on a timeout lets each process
# admit the whole limit. An unreachable Redis fails at once (refused connection) or is marked down by the probe.
RATE_TIMEOUT = 0.25


class _Rate:
    """One IP in the shared limiter: this process's requests in its current second, what the store said."""

    __slots__ = ("start", "n", "pending", "remote", "remote_at", "denied_until", "struck")

    def __init__(self, now: float) -> None:
        self.start = now  # this process's own one-second count starts here
        self.n = 0  # requests admitted here since `start`
        self.pending = 0  # admitted here without asking, not yet counted in the store
        self.remote = 0  # the store's count of the window at its last answer (every process's requests)
        self.remote_at = float("-inf")
        self.denied_until = float("-inf")  # refused by the store: refused here until then without asking
        self.struck = float("-inf")


class SharedRateLimiter:
    """At most `limit` requests per IP in any one second across every process sharing the store: one
    sliding window per IP in Redis (or the embedded store), `RATE_LUA`, atomic, one round trip at most.

    A request of an IP far below the limit asks nobody: while this process's count of it in the current
    second plus the store's last known count of the window stays below RATE_FAST_PERCENT of the limit, it is
    admitted here and counted in the store within RATE_FLUSH_S by a background call (RATE_ADD_LUA: every
    such IP in one), from its RATE_DELIVER_MIN-th request in this process's second on. Past that share, each request runs RATE_LUA (the requests admitted here and not yet delivered go
    with it) and the store decides; a refusal is kept here for one bucket (RATE_BUCKET_MS), so a flood
    costs the store at most ten calls a second per process. The sum over processes can pass the limit by
    what their fast paths admit before the store has counted it: under RATE_FAST_PERCENT of the limit per
    process, per RATE_FLUSH_S. The window is `buckets` buckets of RATE_BUCKET_MS on the store's clock, so
    it spans between 0.9 and 1 s: up to one bucket's requests more than an exact sliding log admits.

    While the store is unreachable (or an answer takes over RATE_TIMEOUT), each process limits on its own
    (`RateLimiter`, the per-process sliding log): the cluster then admits up to the limit per process.
    Refused requests are not counted. A refused IP strikes at most once a second in each process.
    """

    def __init__(self, limit: int = 100, window_ms: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.window_ms = window_ms
        self.local = RateLimiter(limit, clock)  # while the store is unreachable
        self._ips: dict[str, _Rate] = {}
        self._dirty: set[str] = set()
        self._flush: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._sweep_at = float("-inf")
        self._script = self._add = None
        self._client = None
        self.store: BanStore | None = None

    @property
    def limit(self) -> int:
        return self.local.limit

    @limit.setter
    def limit(self, limit: int) -> None:
        if limit != self.local.limit:
            self.local.limit = limit
            self._ips, self._dirty = {}, set()

    @property
    def buckets(self) -> int:
        return max(1, self.window_ms // RATE_BUCKET_MS)

    @property
    def fast_limit(self) -> int:
        return self.local.limit * RATE_FAST_PERCENT // 100

    def fast(self, key: str, now: float | None = None) -> tuple[bool, bool] | None:
        """(admitted, strike) decided here, with no network; None: ask the store (`ask`)."""
        now = self.clock() if now is None else now
        if now >= self._sweep_at:
            self._sweep(now)
        e = self._ips.get(key)
        if e is None:
            e = self._ips[key] = _Rate(now)
        elif now - e.start >= 1.0:
            if e.pending and key not in self._dirty:  # a lone request last second: never delivered (see above)
                e.pending = 0
            e.start, e.n = now, 0
        if e.denied_until > now:
            return self._refused(e, now)
        known = e.remote if now - e.remote_at < self.window_ms / 1000 else 0
        if e.n + known < self.fast_limit:
            e.n += 1
            e.pending += 1
            if e.n >= RATE_DELIVER_MIN:
                self._dirty.add(key)
                if self._flush is None:
                    self._flush = asyncio.get_running_loop().call_later(RATE_FLUSH_S, self._start_flush)
            return True, False
        return None

    def _refused(self, e: _Rate, now: float) -> tuple[bool, bool]:
        if now - e.struck >= 1.0:
            e.struck = now
            return False, True
        return False, False

    def _sweep(self, now: float) -> None:
        """Forget IPs with nothing here for two seconds (memory follows the IPs of the last seconds)."""
        self._sweep_at = now + 1.0
        if len(self._ips) > 1000:
            self._ips = {k: e for k, e in self._ips.items() if now - e.start < 2.0 or e.pending or e.denied_until > now}

    def _use(self, store: BanStore) -> None:
        if self._client is not store.client:  # a new store, or the embedded one taken over
            self._client = store.client
            self._script = store.client.register_script(RATE_LUA)
            self._add = store.client.register_script(RATE_ADD_LUA)
        self.store = store

    async def ask(self, store: BanStore, key: str) -> tuple[bool, bool]:
        """The store decides (one RATE_LUA call); unreachable or slow: this process's own limit."""
        now = self.clock()
        e = self._ips.get(key) or self._ips.setdefault(key, _Rate(now))
        if not store.healthy:
            store.count("rate_local")
            return self.local.hit(key, now)
        self._use(store)
        add, e.pending = e.pending, 0
        self._dirty.discard(key)
        store.count("rate_asks")
        try:
            async with asyncio.timeout(RATE_TIMEOUT):
                res = await self._script(keys=[store.key("rate", key)], args=[self.limit, add, 1, RATE_BUCKET_MS, self.buckets])
        except TimeoutError:  # slow, or a busy loop here: the script may have run; decided here this once
            store.count("rate_timeouts")
            res = None
        except Exception as err:  # noqa: BLE001 - Redis failed: decided here, reconnect in the background
            store.count("redis_errors")
            store._lost(err)
            res = None
        now = self.clock()
        if res is None:  # decided here; what was pending goes with the next delivery
            e.pending += add
            if add:
                self._dirty.add(key)
            store.count("rate_local")
            return self.local.hit(key, now)
        admitted, count = int(res[0]), int(res[1])
        e.remote, e.remote_at = count, now
        if admitted:
            e.n += 1
            return True, False
        e.denied_until = now + RATE_BUCKET_MS / 1000
        return self._refused(e, now)

    def _start_flush(self) -> None:
        self._flush = None
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._deliver_then_again(), name="openflare-rate-deliver")
        else:  # a delivery is under way: look again after it
            self._flush = asyncio.get_running_loop().call_later(RATE_FLUSH_S, self._start_flush)

    async def _deliver_then_again(self) -> None:
        await self.deliver()
        if self._dirty and self._flush is None:  # admitted while this delivery ran
            self._flush = asyncio.get_running_loop().call_later(RATE_FLUSH_S, self._start_flush)

    async def deliver(self) -> int:
        """Count the requests admitted without asking in the store: one pipeline for every such IP. Returns
        how many were delivered (lost: the store is unreachable; they were admitted, the count goes on)."""
        store = self.store
        dirty, self._dirty = self._dirty, set()
        items = [(k, e) for k in dirty if (e := self._ips.get(k)) is not None and e.pending]
        if not items or store is None:
            return 0
        sent = [(k, e, e.pending) for k, e in items]
        for _, e, _n in sent:
            e.pending = 0
        if not store.healthy:
            store.count("rate_unsent", sum(n for _, _, n in sent))
            return 0
        self._use(store)
        chunks = [sent[i : i + RATE_ADD_KEYS] for i in range(0, len(sent), RATE_ADD_KEYS)]
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT), store.client.pipeline(transaction=False) as pipe:
                for chunk in chunks:
                    await self._add(keys=[store.key("rate", k) for k, _, _ in chunk],
                                    args=[RATE_BUCKET_MS, self.buckets, *(n for _, _, n in chunk)], client=pipe)  # fmt: skip
                results = await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - admitted already: the store misses these, nothing else
            store.count("rate_unsent", sum(n for _, _, n in sent))
            logger.debug("openflare rate limit: a delivery failed: %s", sanitise(e, 200))
            return 0
        now = self.clock()
        for chunk, counts in zip(chunks, results):
            for (_k, e, _n), count in zip(chunk, counts):
                e.remote, e.remote_at = int(count), now
        store.count("rate_delivered", sum(n for _, _, n in sent))
        return sum(n for _, _, n in sent)

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._ips, self._dirty, self.store, self._client = {}, set(), None, None


# What a BanStore talks to (`kind`), for its messages: a Redis server, the embedded store this process keeps
# in memory, or the embedded store of another process on this host, reached through its Unix socket.
KIND_REDIS = "redis"
KIND_IN_PROCESS = "in-process"
KIND_SHARED = "shared"


@dataclass
class BanStore:
    """The Redis logic plus the local view. `client` is a redis.asyncio client (or fakeredis's).

    `kind` and `where` (an address without password, a socket path) only name the store in messages;
    `hub` (an `addons.banserver.Embedded`) is closed with the store.
    """

    client: object
    prefix: str = DEFAULT_PREFIX
    policy: Policy = field(default_factory=Policy)
    on_health: Callable[[bool], None] | None = None
    timeout: float = OP_TIMEOUT  # seconds a request may wait on one Redis call
    bans: dict[str, Ban] = field(default_factory=dict)
    allowlist: Allowlist = field(default_factory=Allowlist)
    stats: dict[str, int] = field(default_factory=dict)
    kind: str = KIND_REDIS
    where: str = ""
    hub: object | None = None
    reconcile_keys: int = RECONCILE_KEYS
    _state: bool | None = None  # None until the first connect succeeds or fails

    def __post_init__(self) -> None:
        self.channel = self.prefix + "events"
        self._register()
        self._rot_bans: list[str] = []  # local entries still to reconcile this round (banned IPs...
        self._rot_allow: list[str] = []  # ...then run-time allowlist entries)
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._ever = False  # connected at least once
        self._probe: asyncio.Task | None = None
        self._outbox: collections.deque[_Pending] = collections.deque()  # strikes not yet delivered to Redis
        self._deliver_wake = asyncio.Event()
        self._delivery: asyncio.Task | None = None
        self._counts: dict[str, list[float]] = {}  # ip -> [thirds this window, window end]: this process's own count
        self._unbans: dict[str, int] = {}  # ip -> wall ms of its last unban known here: older strikes count nowhere

    def _register(self) -> None:
        self._strike = self.client.register_script(STRIKE_LUA)
        self._strikes = self.client.register_script(STRIKES_LUA)
        self._ban = self.client.register_script(BAN_LUA)
        self._unban = self.client.register_script(UNBAN_LUA)
        self._reconcile = self.client.register_script(RECONCILE_LUA)
        self._republish = self.client.register_script(REPUBLISH_LUA)

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

    def _args(self, ip: str, reason: str, seen_ms: int = 0, seconds: int = 0, thirds: int = 3) -> list:
        return script_args(self.policy, self.channel, ip, reason, seen_ms, seconds, thirds)

    async def strike(
        self, ip: str, reason: str, seen_ms: int | None = None, addr: str | None = None, thirds: int = 3
    ) -> StrikeResult:  # fmt: skip
        """Count a strike of `thirds` thirds (1-3, `strike_thirds`) against `ip` (a key from `ip_key`; `addr`
        the address, if grouped); ban when the window's strikes reach the threshold.

        The strike is counted here at once (this process bans on its own count, with no network) and queued
        for Redis, where a background task delivers the queue in pipelines, with retry: Redis's count, across
        every process, decides the ban everyone sees. This waits for Redis's answer at most `timeout`;
        without it the result is this process's count, status "queued". The request path does not wait at
        all: it calls `strike_nowait`. A strike is lost only if more than OUTBOX_MAX wait at once. Delivery
        is at least once: a pipeline that timed out may have run and is sent again (a strike counted twice,
        never none).

        `seen_ms` is when the request arrived (wall clock): a strike seen before the IP's last unban is ignored.
        """
        wait = self.healthy or not self._ever  # at startup, wait out the first connect; in an outage, not at all
        done, local, waiter = self._strike_here(ip, reason, seen_ms, addr, thirds, wait)
        if done is not None:
            return done
        if waiter is not None:
            try:
                async with asyncio.timeout(self.timeout):
                    return await asyncio.shield(waiter)
            except TimeoutError:
                self.count("redis_timeouts")
        return self._queued(ip, local)

    def strike_nowait(
        self, ip: str, reason: str, seen_ms: int | None = None, addr: str | None = None, thirds: int = 3
    ) -> StrikeResult:  # fmt: skip
        """`strike` without waiting for Redis (the request path): counted here, queued for Redis; Redis's
        answer reaches the local view when it comes (a ban other processes' strikes completed, an unban).
        The result is this process's count: status "queued", or "banned" when that count bans the IP."""
        done, local, _ = self._strike_here(ip, reason, seen_ms, addr, thirds, False)
        return done if done is not None else self._queued(ip, local)

    def _strike_here(
        self, ip: str, reason: str, seen_ms: int | None, addr: str | None, thirds: int, wait: bool
    ) -> tuple[StrikeResult | None, int, asyncio.Future | None]:  # fmt: skip
        """Count the strike in this process and queue it: (a final result or None, the local count in
        thirds, the future Redis's answer will be set on when `wait`)."""
        if self.allowlist.allowed(addr or ip):
            return StrikeResult(0, status="allowed"), 0, None
        if self.check(ip):
            return StrikeResult(0, status="already-banned"), 0, None
        seen_ms = int(time.time() * 1000) if seen_ms is None else seen_ms
        now = time.monotonic()
        count = self._counts.get(ip)
        if seen_ms <= self._unbans.get(ip, -1):  # before the last unban: Redis will say so; not counted here
            count = [0, now]
        elif count is None or count[1] <= now:
            if len(self._counts) > OUTBOX_MAX:
                # Expired windows go; if a flood of new IPs leaves more than half, the oldest windows go too
                # (their local count only: Redis keeps counting them), so this runs once per OUTBOX_MAX/2 IPs.
                kept = [(k, v) for k, v in self._counts.items() if v[1] > now]
                self._counts = dict(kept[-(OUTBOX_MAX // 2):])
            count = self._counts[ip] = [0, now + self.policy.window]
        count[0] += thirds
        local = int(count[0])
        waiter = asyncio.get_running_loop().create_future() if wait else None
        self._queue(_Pending(ip, reason, seen_ms, thirds, waiter))
        if local >= 3 * self.policy.strikes:
            self._counts.pop(ip, None)
            self.bans[ip] = Ban(now + self.policy.ban_seconds, sanitise(reason), 0, local // 3, local=True)
            self.count("bans_local")
            logger.info('openflare ban ip=%s seconds=%d strikes=%d reason="%s" (this process\'s count; Redis follows)',
                        ip, self.policy.ban_seconds, local // 3, sanitise(reason))  # fmt: skip
        return None, local, waiter

    def _queued(self, ip: str, local: int) -> StrikeResult:
        self.count("strikes_queued")
        ban = self.bans.get(ip)
        if ban is not None and ban.local:
            return StrikeResult(local / 3, self.policy.ban_seconds, 0, "banned")
        return StrikeResult(local / 3, status="queued")

    def _forget(self, ip: str) -> None:
        """An unban: this process's count of `ip` starts again, and strikes seen before now never count."""
        self._counts.pop(ip, None)
        if len(self._unbans) > 10_000:
            cut = int(time.time() * 1000) - 1000 * max(self.policy.window, 60)
            self._unbans = {k: v for k, v in self._unbans.items() if v > cut}
        self._unbans[ip] = int(time.time() * 1000)

    def _queue(self, pending: _Pending) -> None:
        if len(self._outbox) >= OUTBOX_MAX:
            old = self._outbox.popleft()
            self.count("strikes_lost")
            if old.waiter is not None and not old.waiter.done():
                old.waiter.set_result(StrikeResult(0, status="skipped"))
        self._outbox.append(pending)
        self._deliver_wake.set()

    async def _deliver(self) -> None:
        """The strikes' way to Redis: whatever is queued, up to FLUSH_BATCH, in one pipeline; kept and sent
        again until Redis answers (after a reconnect the follower's resync has run first)."""
        backoff = BACKOFF_MIN
        while True:
            if not self._outbox:
                self._deliver_wake.clear()
                await self._deliver_wake.wait()
            if not self.healthy:
                await self._synced.wait()
                continue
            batch = [self._outbox[i] for i in range(min(FLUSH_BATCH, len(self._outbox)))]
            try:
                results = await self._send_strikes(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - kept for the next try; a dead connection means reconnect
                self.count("strike_retries")
                if isinstance(e, TimeoutError):
                    if self._probe is None or self._probe.done():
                        self._probe = asyncio.create_task(self._check(), name="openflare-bans-probe")
                else:
                    self.count("redis_errors")
                    self._lost(e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            for _ in batch:
                if self._outbox:
                    self._outbox.popleft()
            for p, res in zip(batch, results):
                out = self._delivered(p, res)
                if p.waiter is not None and not p.waiter.done():
                    p.waiter.set_result(out)
            await asyncio.sleep(0)  # let requests run between batches

    async def _send_strikes(self, batch: list[_Pending]) -> list:
        """Redis's answer to each strike of `batch` (an exception for one that failed there): STRIKES_LUA
        for up to STRIKES_PER_CALL strikes a call, in one pipeline (the per-call cost is most of a strike's,
        in the embedded store above all). Raises when the pipeline itself fails (nothing known)."""
        chunks = [batch[i : i + STRIKES_PER_CALL] for i in range(0, len(batch), STRIKES_PER_CALL)]
        async with asyncio.timeout(FLUSH_TIMEOUT), self.client.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                await self._strikes(keys=[k for p in chunk for k in script_keys(self.prefix, p.ip)], client=pipe,
                                    args=[a for p in chunk for a in self._args(p.ip, p.reason, p.seen_ms, thirds=p.thirds)])  # fmt: skip
            answers = await pipe.execute(raise_on_error=False)
        results: list = []
        for chunk, res in zip(chunks, answers, strict=True):
            if isinstance(res, Exception) or len(res) != 3 * len(chunk):  # the whole call failed: none counted
                results += [res if isinstance(res, Exception) else ValueError(f"a short answer: {res!r:.100}")] * len(chunk)
                continue
            for i in range(0, len(res), 3):
                one = res[i : i + 3]
                failed = not isinstance(one[0], int) or one[0] == -3
                results.append(RuntimeError(one[1].decode(errors="replace") if isinstance(one[1], bytes) else str(one[1])) if failed else one)
        return results

    def _delivered(self, p: _Pending, res) -> StrikeResult:
        """Apply Redis's answer to one strike to the local view."""
        if isinstance(res, Exception):
            self.count("redis_errors")
            self.count("strikes_lost")
            logger.warning("openflare bans: a strike on %s failed in Redis: %s", p.ip, sanitise(res, 200))
            return StrikeResult(0, status="skipped")
        self.count("strikes_delivered")
        n, secs, level = (int(x) for x in res)
        if n == -2:
            self._counts.pop(p.ip, None)
            return StrikeResult(0, status="after-unban")
        if n == -1:
            ban = self.bans.get(p.ip)
            if ban is None:
                self.bans[p.ip] = Ban(time.monotonic() + secs / 1000, "already banned")
            elif ban.local and secs > 0:
                ban.deadline = time.monotonic() + secs / 1000
            return StrikeResult(0, status="already-banned")
        self.count("strikes")
        strikes = n / 3
        logger.info('openflare strike ip=%s weight=%s strikes=%s/%d reason="%s"', p.ip, show_strikes(p.thirds / 3),
                    show_strikes(strikes), self.policy.strikes, sanitise(p.reason))  # fmt: skip
        if secs:
            self._counts.pop(p.ip, None)
            self._banned(p.ip, secs, level, n // 3, p.reason)
            return StrikeResult(strikes, secs, level, "banned")
        count = self._counts.get(p.ip)
        if count is not None and count[0] < n:  # strikes other processes counted: this one's count follows
            count[0] = n
        return StrikeResult(strikes)

    def _banned(self, ip: str, secs: int, level: int, strikes: int, reason: str) -> None:
        self.bans[ip] = Ban(time.monotonic() + secs, sanitise(reason), level, strikes)
        self.count("bans")
        logger.info('openflare ban ip=%s seconds=%d level=%d strikes=%d reason="%s"', ip, secs, level, strikes, sanitise(reason))

    async def ban(self, ip: str, seconds: int = 0, reason: str = "manual") -> int:
        """Ban now, for `seconds` (0: the escalating duration); returns the seconds. Redis down: local only, ConnectionError."""
        if self.allowlist.allowed(ip):
            raise ValueError(f"{ip} is allowlisted")
        res = await self._call(self._ban, script_keys(self.prefix, ip)[:3], self._args(ip, reason, seconds=seconds))
        if res is None:
            self._banned(ip, seconds or self.policy.ban_seconds, 0, 0, reason)
            raise ConnectionError("the ban store is unreachable: ban applied to this process only")
        n, secs, level = (int(x) for x in res)
        self._banned(ip, secs, level, n // 3, reason)
        return secs

    async def unban(self, ip: str) -> bool:
        """Lift a ban, forget its strikes and escalation; strikes seen before now are ignored. True if it was banned."""
        self.bans.pop(ip, None)
        self._forget(ip)
        res = await self._call(self._unban, script_keys(self.prefix, ip), unban_args(self.policy, self.channel, ip))
        if res is None:
            raise ConnectionError("the ban store is unreachable: unban applied to this process only")
        self.count("unbans")
        logger.info("openflare unban ip=%s was_banned=%s", ip, bool(res))
        return bool(res)

    async def allow(self, cidr: str, seconds: int = 0) -> str:
        """Allowlist an IP or CIDR range, for `seconds` (0: until removed)."""
        net = self.allowlist.add(cidr, time.monotonic() + seconds if seconds else None)
        if not self.healthy:
            raise ConnectionError("the ban store is unreachable: allowlist entry applied to this process only")
        async with asyncio.timeout(1):
            await write_allow(self.client, self.prefix, net, seconds)
        logger.info("openflare allow cidr=%s seconds=%d", net, seconds)
        return net

    async def disallow(self, cidr: str) -> bool:
        net = str(ipaddress.ip_network(cidr.strip(), strict=False))
        self.allowlist.remove(net)
        async with asyncio.timeout(1):
            removed = await write_disallow(self.client, self.prefix, net)
        logger.info("openflare disallow cidr=%s", net)
        return removed

    async def strikes_of(self, ips: list[str]) -> list[float]:
        """The strikes each IP has in its window (in thirds: 0.33, 0.67, 1, ...)."""
        if not ips:
            return []
        async with asyncio.timeout(1):
            vals = await self.client.mget([self.key("strikes", ip) for ip in ips])
        return [int(v) / 3 if v else 0 for v in vals]

    # --- following Redis ---
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="openflare-bans-follow")
        if self._delivery is None:
            self._delivery = asyncio.create_task(self._deliver(), name="openflare-bans-strikes")

    async def close(self) -> None:
        """Stop; strikes still queued get one last pipeline (FLUSH_TIMEOUT) if Redis is up."""
        if self._probe:
            self._probe.cancel()
        if self._delivery:
            if self._outbox and self.healthy:
                try:
                    async with asyncio.timeout(FLUSH_TIMEOUT):
                        while self._outbox and self.healthy and not self._delivery.done():
                            await asyncio.sleep(0.01)
                except TimeoutError:
                    pass
            self._delivery.cancel()
            try:
                await self._delivery
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._delivery = None
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
        await self.client.aclose()
        self.close_hub()

    def close_hub(self) -> None:
        """Stop serving the embedded store (if this store's process serves it); safe to call twice."""
        hub, self.hub = self.hub, None
        if hub is not None:
            hub.close()

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

    def status(self) -> str:
        """The store in use and its state, for `openflare.banstats`: e.g. `redis 127.0.0.1:6379/0 up`."""
        if self.kind == KIND_IN_PROCESS:
            return "in-process" + (f" (served on {self.where})" if self.where else "")
        state = {True: "up", False: "down", None: "connecting"}[self._state]
        name = "redis" if self.kind == KIND_REDIS else "shared"
        return f"{name} {self.where} {state}" if self.where else f"{name} {state}"

    def _set_health(self, ok: bool, why: object = "") -> None:
        if ok is self._state:
            return
        self._state = ok
        where = f" ({self.where})" if self.where else ""
        if self.kind == KIND_IN_PROCESS:
            name, up, where = "in-process ban store", "ready", f" (served on {self.where})" if self.where else " (not served)"
        else:
            name, up = ("Redis" if self.kind == KIND_REDIS else "shared ban store"), "reachable"
        if ok:
            logger.info("openflare bans: %s %s%s, %d bans loaded", name, up, where, len(self.bans))
        else:
            self.count("redis_outages")
            logger.warning("openflare bans: %s unreachable (%s%s); reconnecting with backoff", name,
                           f"{self.where}: " if self.where else "", sanitise(why, 200))  # fmt: skip
        if self.on_health:
            self.on_health(ok)

    def _lost(self, e: BaseException) -> None:
        self._set_health(False, f"{type(e).__name__}: {e}")
        self._synced.clear()
        self._wake.set()

    async def _quiet_message(self, pubsub):
        """The next event, waiting up to FOLLOW_QUIET_S on the subscription's socket (no wake-up before it
        unless an event comes), or None as soon as `_wake` is set (a connection lost elsewhere)."""
        get = asyncio.ensure_future(pubsub.get_message(timeout=FOLLOW_QUIET_S))
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait({get, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            if not get.done():
                get.cancel()  # the follower reconnects with a new subscription: a half-read one is not reused
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await get
        return get.result() if get in done else None

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
                tick = time.monotonic() + RECONCILE_EVERY
                while not self._wake.is_set():
                    if self.bans or self.allowlist.dynamic or self._rot_bans or self._rot_allow:
                        msg = await pubsub.get_message(timeout=max(0.0, min(0.5, tick - time.monotonic())))
                    else:  # nothing to reconcile: wait for an event (or a lost connection), no tick
                        msg = await self._quiet_message(pubsub)
                        tick = time.monotonic() + RECONCILE_EVERY
                    if msg is not None:
                        self.apply(msg["data"])
                    if time.monotonic() >= tick:
                        await self.reconcile()
                        tick = time.monotonic() + RECONCILE_EVERY
                raise ConnectionError("a Redis call failed")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever broke, back off and reconnect
                self._lost(e)
                if await self._take_over():
                    continue
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), 0.5)
                except Exception:  # noqa: BLE001 - a cancellation here must go on: swallowed, the loop ran forever
                    pass

    async def _take_over(self) -> bool:
        """A shared embedded store whose owner has gone: own it now if no other process has (the first one
        to try does), seeded with this process's view of the bans and the allowlist."""
        hub = self.hub
        if self.kind != KIND_SHARED or hub is None:
            return False
        try:
            if not hub.take_over():
                return False
        except Exception as e:  # noqa: BLE001 - cannot serve: stay a member, keep reconnecting
            logger.warning("openflare bans: cannot take over the shared ban store: %s", sanitise(e, 200))
            return False
        old, self.client = self.client, hub.client()
        self._register()
        self.kind, self.where = KIND_IN_PROCESS, hub.path or ""
        n = await seed(self.client, self.prefix, self.bans, self.allowlist.dynamic, self.policy)
        logger.warning("openflare bans: the process that kept the shared ban store is gone: this one keeps it now, "
                       "served on %s (%d bans carried over; strike counts start again)", self.where, n)  # fmt: skip
        try:
            await asyncio.wait_for(old.aclose(), 1)
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
        return True

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
                self._forget(parts[1])
            elif parts[0] == "allow":
                ms = int(parts[2])
                self.allowlist.add(parts[1], time.monotonic() + ms / 1000 if ms else None)
            elif parts[0] == "disallow":
                self.allowlist.remove(parts[1])
        except (IndexError, ValueError):
            logger.warning("openflare bans: ignoring a malformed event %s", sanitise(text, 200))

    async def resync(self) -> None:
        """Replace the local view with what Redis holds now, and write back the bans in force that this
        process knows and Redis lacks (`republish`)."""
        if not self.bans:  # nothing known yet (a start): enforce each batch as it is read
            self.bans = {}
            await read_bans(self.client, self.prefix, into=self.bans)
        else:
            await self._merge(await read_bans(self.client, self.prefix))
        self.allowlist.replace_dynamic(await read_allow(self.client, self.prefix))
        self._rot_bans, self._rot_allow = [], []

    async def _merge(self, bans: dict[str, Ban]) -> None:
        """The bans read from the store become the view, with those this process knows and the store lacks."""
        now = time.monotonic()
        queued = {p.ip for p in self._outbox}
        missing = {}
        for ip, ban in self.bans.items():
            if ip in bans or ban.deadline <= now + 1:
                continue
            if ban.local and ip in queued:  # its strikes, still queued, will ban it in Redis too
                bans[ip] = ban
            else:
                missing[ip] = ban
        if missing:
            bans.update(await self.republish(missing))
        self.bans = bans

    async def republish(self, missing: dict[str, Ban]) -> dict[str, Ban]:
        """Write back bans this process knows and the store lacks, with their remaining time; returns those
        written (kept here). Which side wins: a ban in the store wins over ours (read as it is); an unban in
        the store (its marker lasts the strike window, at least 60 s) wins over our ban, which is dropped: the
        operator lifted it while we were away; otherwise ours wins, because a ban can leave the store without
        an unban in only two ways, a Redis restart without persistence (or a flush, a failover to an empty
        replica) and a key deleted by hand, and losing every ban to the first is far worse than having to
        lift a hand-deleted one with `openflare unban` (which leaves the marker) instead of `redis-cli del`."""
        now = time.monotonic()
        items = list(missing.items())
        kept: dict[str, Ban] = {}
        for start in range(0, len(items), FLUSH_BATCH):
            part = items[start : start + FLUSH_BATCH]
            async with asyncio.timeout(SYNC_TIMEOUT), self.client.pipeline(transaction=False) as pipe:
                for ip, ban in part:
                    left = ban.remaining(now)
                    ms = -1 if left == float("inf") else max(1, int(left * 1000))
                    keys = script_keys(self.prefix, ip)
                    await self._republish(keys=[keys[1], keys[2], keys[3]], client=pipe, args=[
                        ms, sanitise(ban.reason or "-"), max(ban.level, 1), ban.strikes, ip, self.channel,
                        self.policy.memory, 0 if ms < 0 else ms // 1000 + 1])  # fmt: skip
                res = await pipe.execute()
            kept.update((ip, ban) for (ip, ban), r in zip(part, res) if int(r) == 1)
        if kept:
            self.count("bans_republished", len(kept))
        if len(kept) < len(items):
            self.count("bans_dropped_unbanned", len(items) - len(kept))
        logger.warning("openflare bans: %d bans in force here were missing from %s (restarted without persistence?): "
                       "%d written back with their time left, %d dropped (unbanned meanwhile)", len(items),
                       self.where or "the store", len(kept), len(items) - len(kept))  # fmt: skip
        return kept

    async def reconcile(self) -> int:
        """Check the next `reconcile_keys` entries of the local view against the store: one EXISTS for all
        of them; only when some are gone, one Lua call says which (and whose TTL changed), and those are
        dropped or updated. Returns how many entries were checked."""
        if not self._rot_bans and not self._rot_allow:
            self._rot_bans, self._rot_allow = list(self.bans), list(self.allowlist.dynamic)  # keys only: cheap
        now = time.monotonic()
        batch: list[tuple[str, str, object]] = []
        for kind, names, view in (("ban", self._rot_bans, self.bans), ("allow", self._rot_allow, self.allowlist.dynamic)):
            room = self.reconcile_keys - len(batch)
            if room <= 0 or not names:
                continue
            part = names[-room:]
            del names[-room:]
            for name in part:
                entry = view.get(name)
                deadline = None if entry is None else entry.deadline if kind == "ban" else entry[1]
                if entry is not None and (deadline is None or deadline > now + 1):  # ending anyway: leave it
                    batch.append((kind, name, entry))
        if not batch:
            return 0
        keys = [self.key(kind, name) for kind, name, _ in batch]
        async with asyncio.timeout(SYNC_TIMEOUT):
            if await self.client.exists(*keys) >= len(keys):
                return len(batch)  # the common case: every one is still there
            want = []
            for kind, _, entry in batch:
                deadline = entry.deadline if kind == "ban" else entry[1]
                want.append(-1 if deadline is None or deadline == float("inf") else max(0, int((deadline - now) * 1000)))
            res = await self._reconcile(keys=keys, args=want)
        now = time.monotonic()
        changed_allow = False
        changed: list[str] = []
        for i, ttl in zip(res[::2], res[1::2]):
            kind, name, entry = batch[int(i) - 1]
            ttl = int(ttl)
            if kind == "ban":
                if self.bans.get(name) is not entry:  # replaced by an event meanwhile: that one is newer
                    continue
                if ttl == -2:
                    del self.bans[name]
                else:
                    entry.deadline = float("inf") if ttl == -1 else now + ttl / 1000
            else:
                if self.allowlist.dynamic.get(name) is not entry:
                    continue
                if ttl == -2:
                    del self.allowlist.dynamic[name]
                else:
                    self.allowlist.dynamic[name] = (entry[0], None if ttl == -1 else now + ttl / 1000)
                changed_allow = True
            changed.append(f"{kind} {name} {'removed' if ttl == -2 else 'expiry changed'}")
        if changed_allow:
            self.allowlist.replace_dynamic({k: d for k, (_, d) in self.allowlist.dynamic.items()})
        if changed:
            self.count("reconciled", len(changed))
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            logger.info("openflare bans: changed in the store without an event: %s%s", ", ".join(changed[:5]), more)
        return len(batch)


# --- what every process does the same way: keys, script arguments, allowlist writes, reading the view ---


def script_keys(prefix: str, ip: str) -> list[str]:
    """KEYS of STRIKE_LUA and UNBAN_LUA (BAN_LUA takes the first three): strikes, ban, level, unban."""
    return [f"{prefix}strikes:{ip}", f"{prefix}ban:{ip}", f"{prefix}level:{ip}", f"{prefix}unban:{ip}"]


def script_args(policy: Policy, channel: str, ip: str, reason: str, seen_ms: int = 0, seconds: int = 0, thirds: int = 3) -> list:
    """ARGV of STRIKE_LUA and BAN_LUA."""
    p = policy
    return [seen_ms, p.window, p.strikes, seconds, p.max_seconds, p.memory, sanitise(reason), ip, channel, p.ban_seconds, thirds]


def unban_args(policy: Policy, channel: str, ip: str) -> list:
    return [int(time.time() * 1000), max(policy.window, 60), ip, channel]


async def write_allow(client, prefix: str, net: str, seconds: int = 0) -> None:
    """Allowlist `net` (a normalised network) for `seconds` (0: until removed), and tell every process."""
    pipe = client.pipeline(transaction=True)
    pipe.set(f"{prefix}allow:{net}", "1", ex=seconds or None)
    pipe.publish(prefix + "events", f"allow\t{net}\t{seconds * 1000}")
    await pipe.execute()


async def write_disallow(client, prefix: str, net: str) -> bool:
    """Remove `net` from the allowlist, and tell every process; True if it was there."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(f"{prefix}allow:{net}")
    pipe.publish(prefix + "events", f"disallow\t{net}")
    removed, _ = await pipe.execute()
    return bool(removed)


async def read_bans(client, prefix: str, into: dict[str, Ban] | None = None) -> dict[str, Ban]:
    """Every ban in the store, with its deadline on this process's monotonic clock, added to `into` (a new
    dict by default) batch by batch, so a caller that passes its live view enforces each batch as it comes.
    One LOAD_LUA call per SCAN step of SYNC_BATCH keys; the event loop runs requests between two."""
    bans: dict[str, Ban] = {} if into is None else into
    bprefix = f"{prefix}ban:"
    load = client.register_script(LOAD_LUA)
    cursor: bytes | str | int = 0
    while True:
        async with asyncio.timeout(SYNC_TIMEOUT):
            cursor, text = await load(args=[cursor, bprefix + "*", SYNC_BATCH, len(bprefix)])
        now = time.monotonic()
        for line in _s(text).split("\n") if text else ():
            parts = line.split("\t", 4)
            try:
                ip, ttl, level, strikes = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
                bans[ip] = Ban(now + ttl / 1000 if ttl > 0 else float("inf"), parts[4], level, strikes)
            except (IndexError, ValueError):
                logger.warning("openflare bans: ignoring a malformed ban %s in the store", sanitise(bprefix + parts[0], 200))
        if int(cursor) == 0:
            return bans
        await asyncio.sleep(0)  # let requests run between batches


async def read_allow(client, prefix: str) -> dict[str, float | None]:
    """Every run-time allowlist entry in the store: network -> deadline (monotonic) or None (no expiry)."""
    now = time.monotonic()
    allow: dict[str, float | None] = {}
    aprefix = f"{prefix}allow:"
    async for batch in scan_keys(client, aprefix + "*"):
        pipe = client.pipeline(transaction=False)
        for k in batch:
            pipe.pttl(k)
        async with asyncio.timeout(SYNC_TIMEOUT):
            ttls = await pipe.execute()
        for k, ttl in zip(batch, ttls):
            if ttl == -2:
                continue
            allow[_s(k)[len(aprefix) :]] = now + ttl / 1000 if ttl > 0 else None
    return allow


async def seed(client, prefix: str, bans: dict[str, Ban], allow: dict, policy: Policy) -> int:
    """Write a local view into an empty store (a process taking over the embedded store); returns the bans written."""
    now = time.monotonic()
    pipe = client.pipeline(transaction=False)
    n = 0
    for ip, ban in bans.items():
        left = ban.remaining(now)
        if left <= 0:
            continue
        key = f"{prefix}ban:{ip}"
        pipe.hset(key, mapping={"reason": ban.reason, "seconds": int(left) + 1, "level": ban.level, "strikes": ban.strikes})
        if left != float("inf"):
            pipe.pexpire(key, max(1, int(left * 1000)))
        pipe.set(f"{prefix}level:{ip}", ban.level, ex=policy.memory)
        n += 1
    for net, (_, deadline) in allow.items():
        if deadline is None:
            pipe.set(f"{prefix}allow:{net}", "1")
        elif deadline > now:
            pipe.set(f"{prefix}allow:{net}", "1", px=max(1, int((deadline - now) * 1000)))
    async with asyncio.timeout(SYNC_TIMEOUT):
        await pipe.execute()
    return n


class Operator:
    """What an operator's tool (the `openflare` command line) does to the store: the proxies' own scripts,
    keys and events, so every running proxy follows at once. No local view, no health tracking."""

    def __init__(self, client, prefix: str = DEFAULT_PREFIX, policy: Policy | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.policy = policy or Policy()
        self.channel = prefix + "events"
        self._ban = client.register_script(BAN_LUA)
        self._unban = client.register_script(UNBAN_LUA)

    async def ban(self, ip: str, seconds: int = 0, reason: str = "manual") -> tuple[int, int]:
        """Ban `ip` (a key from parse_key) for `seconds` (0: the policy's escalating duration); (seconds, level)."""
        res = await self._ban(keys=script_keys(self.prefix, ip)[:3], args=script_args(self.policy, self.channel, ip, reason, seconds=seconds))
        _, secs, level = (int(x) for x in res)
        return secs, level

    async def unban(self, ip: str) -> bool:
        """Lift the ban, clear strikes and escalation (as openflare.unban); True if a ban was in force."""
        return bool(await self._unban(keys=script_keys(self.prefix, ip), args=unban_args(self.policy, self.channel, ip)))

    async def allow(self, cidr: str, seconds: int = 0) -> str:
        net = str(ipaddress.ip_network(cidr.strip(), strict=False))
        await write_allow(self.client, self.prefix, net, seconds)
        return net

    async def disallow(self, cidr: str) -> bool:
        return await write_disallow(self.client, self.prefix, str(ipaddress.ip_network(cidr.strip(), strict=False)))

    async def bans(self) -> dict[str, Ban]:
        return await read_bans(self.client, self.prefix)

    async def allowlist(self) -> dict[str, float | None]:
        return await read_allow(self.client, self.prefix)

    async def close(self) -> None:
        await self.client.aclose()


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


def redis_where(url: str) -> str:
    """Where a Redis URL points, without user or password: `host:port/db`, or the socket path."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        if u.scheme == "unix":
            return u.path or "?"
        host = u.hostname or "localhost"
        return f"{'[' + host + ']' if ':' in host else host}:{u.port or 6379}/{(u.path or '/0').lstrip('/') or '0'}"
    except ValueError:
        return "?"


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
