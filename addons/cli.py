"""openflare: the operator's command line. Works on the stores directly, so it works while proxies run.

    openflare bans [list] [--json]            the bans in force (IP, reason, seconds left, strikes, bans)
    openflare bans add IP [SECONDS]           ban now (no SECONDS: openflare_ban_seconds, doubled per repeat)
    openflare bans remove IP                  lift a ban, clear its strikes and escalation
    openflare allow [list] [--json]           the allowlist (the options file's and the run-time one)
    openflare allow add CIDR [SECONDS]        allowlist an IP or range (no SECONDS: until removed)
    openflare allow remove CIDR
    openflare label ID benign|attack [--force]   label a recorded flow for retraining
    openflare records [--since 1h] [--verdict block] [--ip IP] [--limit 50] [--json]
    openflare verify-log [--days 30] [--spill FILE]   walk the records' hash chains
    openflare report [--since 7d] [--out report.html]   the week in one HTML file: plots, top lists, review queue
    openflare check-config [...]              check the options file (addons/configcheck.py)

Running proxies follow a change to bans or the allowlist within a second. Bans and the allowlist live in
Redis (--redis-url, else openflare_redis_url in the options file, else OPENFLARE_REDIS_URL), else in the
embedded store of the proxy running in this directory, reached through its socket (--ban-socket, else
openflare_ban_socket, default data/bans.sock). Records: MongoDB (--mongo-uri, openflare_mongo_uri,
OPENFLARE_MONGO_URI), else the embedded store (--record-dir, openflare_record_dir, default data/records).
Other settings (key prefix, ban durations, IPv6 grouping, retention) come from the options file the proxies
read (--conf; default .mitmproxy/config.yaml, which `make run` links to mitm.conf, else mitm.conf).
Exit status: 0 done, 1 failed (a store unreachable or unreadable), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from addons import banserver
from addons import banstore

PROG = "openflare"
REDIS_ENV = "OPENFLARE_REDIS_URL"
MONGO_ENV = "OPENFLARE_MONGO_URI"
CONF_FILES = (".mitmproxy/config.yaml", "mitm.conf")
TIMEOUT = 10.0  # seconds for one store operation
LABELS = ("benign", "attack")
VERDICTS = ("block", "pass", "error")


class Failure(Exception):
    """A store could not be reached or read: exit status 1."""


class BadInput(Exception):
    """The operator's input cannot be acted on: exit status 2."""


# --- settings: flags, then the options file, then the environment (as the proxy takes them) ---


@dataclass
class Settings:
    conf: dict = field(default_factory=dict)
    conf_path: str | None = None
    redis_url: str | None = None
    prefix: str = banstore.DEFAULT_PREFIX
    ban_socket: str = banserver.DEFAULT_SOCKET
    mongo_uri: str | None = None
    record_dir: str = "data/records"

    def opt(self, name: str, default, kind: type):
        value = self.conf.get(name, default)
        if value is None:
            return default
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise BadInput(f"{self.conf_path}: {name} must be an integer, not {value!r}")
        if kind is str and not isinstance(value, str):
            raise BadInput(f"{self.conf_path}: {name} must be a string, not {value!r}")
        if kind is list and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
            raise BadInput(f"{self.conf_path}: {name} must be a list of strings, not {value!r}")
        return value

    def policy(self) -> banstore.Policy:
        d = banstore.Policy()
        return banstore.Policy(
            strikes=self.opt("openflare_strikes", d.strikes, int),
            window=self.opt("openflare_strike_window", d.window, int),
            ban_seconds=self.opt("openflare_ban_seconds", d.ban_seconds, int),
            max_seconds=max(self.opt("openflare_ban_max_seconds", d.max_seconds, int), self.opt("openflare_ban_seconds", d.ban_seconds, int)),
            memory=self.opt("openflare_ban_memory", d.memory, int),
        )


def read_conf(path: str | None) -> tuple[dict, str | None]:
    """The options file as a dict (YAML, as mitmproxy reads it); ({}, None) when there is none to read."""
    if path is None:
        path = next((p for p in CONF_FILES if Path(p).is_file()), None)
        if path is None:
            return {}, None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise BadInput(f"cannot read the options file {path}: {e.strerror or e}") from e
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError as e:
        raise BadInput(f"the options file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if data is None:
        return {}, path
    if not isinstance(data, dict):
        raise BadInput(f"the options file {path} is not a mapping of option names to values")
    return data, path


def settings(args: argparse.Namespace) -> Settings:
    conf, path = read_conf(getattr(args, "conf", None))
    s = Settings(conf=conf, conf_path=path)
    s.redis_url = args.redis_url or s.opt("openflare_redis_url", None, str) or os.environ.get(REDIS_ENV) or None
    s.prefix = args.prefix or s.opt("openflare_redis_prefix", banstore.DEFAULT_PREFIX, str)
    s.ban_socket = args.ban_socket if args.ban_socket is not None else s.opt("openflare_ban_socket", banserver.DEFAULT_SOCKET, str)
    s.mongo_uri = args.mongo_uri or s.opt("openflare_mongo_uri", None, str) or os.environ.get(MONGO_ENV) or None
    s.record_dir = args.record_dir or s.opt("openflare_record_dir", "data/records", str)
    if not s.prefix:
        raise BadInput("the key prefix must not be empty")
    return s


# --- output ---


def table(headers: Sequence[str], rows: list[Sequence[object]]) -> str:
    """A plain text table, columns as wide as their widest cell (like `cscli decisions list -o raw`)."""
    cells = [[str(h) for h in headers]] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def dump_json(data) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)


def seconds_left(deadline: float | None, now: float) -> int | None:
    """Whole seconds left before a monotonic deadline; None for no expiry."""
    if deadline is None or deadline == float("inf"):
        return None
    return max(0, int(deadline - now + 0.5))


# --- the ban store ---


async def _operator(s: Settings) -> tuple[banstore.Operator, str]:
    """An Operator on the store the proxies use, and its name for messages."""
    if s.redis_url:
        if not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise BadInput("the Redis URL must start with redis://, rediss:// or unix://")
        where = f"Redis {banstore.redis_where(s.redis_url)}"
        client = banstore.make_client(s.redis_url)
    else:
        if not s.ban_socket:
            raise Failure("no Redis configured and openflare_ban_socket is empty: the proxies' in-process ban "
                          "store is not served, so no other process can reach it")  # fmt: skip
        try:
            banserver.check_path(s.ban_socket)
        except banserver.Unavailable as e:
            raise BadInput(f"--ban-socket: {e}") from e
        if not banserver.reachable(s.ban_socket):
            raise Failure(
                f"no Redis configured ({REDIS_ENV}, openflare_redis_url or --redis-url), and no OpenFlare proxy "
                f"serves its in-process ban store at {s.ban_socket}: start one in this directory (`make run`), or "
                "name its socket with --ban-socket. Without Redis, bans live only as long as that proxy runs."
            )
        pid = banserver.owner_pid(s.ban_socket)
        where = f"the in-process ban store of process {pid or '?'} ({s.ban_socket})"
        client = banserver.client(s.ban_socket, max_connections=2)
    op = banstore.Operator(client, s.prefix, s.policy())
    try:
        async with asyncio.timeout(TIMEOUT):
            await client.ping()
    except Exception as e:  # noqa: BLE001 - any connection failure is reported the same way
        await op.close()
        raise Failure(f"cannot reach {where}: {type(e).__name__}: {e or 'no answer'}") from e
    return op, where


def _on_store(s: Settings, work: Callable):
    """Run `await work(op, where)` against the ban store; store failures become Failure."""

    async def run():
        op, where = await _operator(s)
        try:
            async with asyncio.timeout(TIMEOUT):
                return await work(op, where)
        except (BadInput, Failure):
            raise
        except Exception as e:  # noqa: BLE001 - redis errors, timeouts
            raise Failure(f"{where}: {type(e).__name__}: {e or 'no answer in time'}") from e
        finally:
            await op.close()

    return asyncio.run(run())


def _ban_key(s: Settings, text: str) -> str:
    try:
        return banstore.parse_key(text, s.opt("openflare_ipv6_prefix", banstore.DEFAULT_V6_PREFIX, int))
    except ValueError as e:
        raise BadInput(str(e)) from e


def _seconds(text: str | None) -> int:
    if text is None:
        return 0
    try:
        n = int(text)
    except ValueError:
        raise BadInput(f"SECONDS must be a whole number of seconds, not {text!r}") from None
    if not 0 <= n <= 365 * 86400:
        raise BadInput(f"SECONDS must be between 0 and {365 * 86400}, not {n}")
    return n


def _static_allowlist(s: Settings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    allow = banstore.Allowlist()
    try:
        allow.set_static(s.opt("openflare_allowlist", [], list))
    except ValueError as e:
        raise BadInput(f"{s.conf_path}: openflare_allowlist: {e}") from e
    return allow.static


def cmd_bans(args, s: Settings) -> int:
    action = args.action or "list"
    if action == "list":
        if args.target or args.seconds:
            raise BadInput("`bans list` takes no IP or SECONDS")

        async def work(op, where):
            return await op.bans()

        bans = _on_store(s, work)
        now = time.monotonic()
        rows = []
        for key, ban in sorted(bans.items(), key=lambda kv: _net_order(kv[0])):
            rows.append({"ip": key, "reason": banstore.sanitise(ban.reason or "-", 200), "seconds_left": seconds_left(ban.deadline, now),
                         "strikes": ban.strikes, "bans": ban.level})  # fmt: skip
        if args.json:
            print(dump_json(rows))
        elif not rows:
            print("No bans in force.")
        else:
            print(table(("IP/NETWORK", "REASON", "SECONDS LEFT", "STRIKES", "BANS"),
                        [(r["ip"], r["reason"], "never ends" if r["seconds_left"] is None else r["seconds_left"], r["strikes"], r["bans"]) for r in rows]))  # fmt: skip
        return 0
    if args.target is None:
        raise BadInput(f"`bans {action}` needs an IP")
    key = _ban_key(s, args.target)
    if action == "add":
        seconds = _seconds(args.seconds)
        reason = banstore.sanitise(args.reason or "manual", 120)
        static = _static_allowlist(s)

        async def work(op, where):
            allow = banstore.Allowlist()
            allow.static = static
            allow.replace_dynamic(await op.allowlist())
            if allow.allowed(key):
                raise BadInput(f"{key} is allowlisted: remove it first (`{PROG} allow list` shows the entry)")
            return (*await op.ban(key, seconds, reason), where)

        secs, level, where = _on_store(s, work)
        print(f"banned {key} for {secs} s ({_ordinal(level)} ban) in {where}; running proxies refuse it within a second")
        return 0
    if args.seconds is not None:
        raise BadInput("`bans remove` takes no SECONDS")

    async def work(op, where):
        return await op.unban(key), where

    was, where = _on_store(s, work)
    if was:
        print(f"unbanned {key} in {where} (strikes and escalation cleared); running proxies serve it within a second")
    else:
        print(f"{key} was not banned in {where} (its strikes and escalation are cleared)")
    return 0


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _net_order(text: str):
    try:
        net = ipaddress.ip_network(text, strict=False)
        return (net.version, int(net.network_address), net.prefixlen, "")
    except ValueError:
        return (9, 0, 0, text)


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise BadInput(f"not an IP address or CIDR range: {text!r}") from None


def cmd_allow(args, s: Settings) -> int:
    action = args.action or "list"
    static = _static_allowlist(s)
    if action == "list":
        if args.target or args.seconds:
            raise BadInput("`allow list` takes no CIDR or SECONDS")

        async def work(op, where):
            return await op.allowlist()

        dynamic = _on_store(s, work)
        now = time.monotonic()
        rows = [{"network": str(n), "source": f"options file ({s.conf_path})", "seconds_left": None} for n in static]
        for net, deadline in sorted(dynamic.items(), key=lambda kv: _net_order(kv[0])):
            rows.append({"network": net, "source": "added at run time", "seconds_left": seconds_left(deadline, now)})
        if args.json:
            print(dump_json(rows))
        elif not rows:
            print("The allowlist is empty.")
        else:
            print(table(("NETWORK", "SOURCE", "SECONDS LEFT"),
                        [(r["network"], r["source"], "never ends" if r["seconds_left"] is None else r["seconds_left"]) for r in rows]))  # fmt: skip
        return 0
    if args.target is None:
        raise BadInput(f"`allow {action}` needs an IP address or CIDR range")
    net = _network(args.target)
    if action == "add":
        seconds = _seconds(args.seconds)

        async def work(op, where):
            return await op.allow(net, seconds), where

        net, where = _on_store(s, work)
        span = f"for {seconds} s" if seconds else "until removed"
        print(f"allowlisted {net} {span} in {where}; running proxies never strike, ban or rate-limit it, within a second")
        return 0
    if args.seconds is not None:
        raise BadInput("`allow remove` takes no SECONDS")

    async def work(op, where):
        return await op.disallow(net), where

    removed, where = _on_store(s, work)
    if removed:
        print(f"removed {net} from the run-time allowlist in {where}; running proxies follow within a second")
        return 0
    if any(str(n) == net for n in static):
        raise BadInput(f"{net} is in openflare_allowlist in {s.conf_path}: remove it there and restart the proxies")
    print(f"{net} was not in the run-time allowlist in {where}")
    return 0


# --- records and labels ---


def _open_records(s: Settings):
    from addons import records

    if not s.mongo_uri and not Path(s.record_dir).is_dir():
        raise BadInput(f"no embedded record store in {s.record_dir} (--record-dir to name it, or a MongoDB URI in "
                       f"{MONGO_ENV} / --mongo-uri)")  # fmt: skip
    try:
        return records.open_store(uri=s.mongo_uri, directory=None if s.mongo_uri else s.record_dir)
    except ValueError as e:
        raise BadInput(f"cannot open the record store: {e}") from e
    except OSError as e:
        raise Failure(f"cannot open the record store: {e}") from e


def _labels_of(store):
    from addons import records

    return records.Store(store.coll.database["labels"], store.kind, None, store.description + " (labels)")


_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """`1h`, `30m`, `2d`, `90s`, `1w` before now, or an ISO date/time (UTC unless it names a zone): naive UTC."""
    from addons import records

    m = _RELATIVE.match(text.strip())
    if m:
        return (now or records.utcnow()) - datetime.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    try:
        t = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadInput(f"--since: not a duration (30m, 1h, 2d) or an ISO date/time (2026-12-01, 2026-12-01T08:00): {text!r}") from None
    if t.tzinfo is not None:
        t = t.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return t


def _find_record(store, rid: str) -> dict:
    rid = rid.strip()
    if not rid:
        raise BadInput("the record ID is empty")
    rec = store.coll.find_one({"_id": rid})
    if rec is not None:
        return rec
    if re.fullmatch(r"[0-9a-f]{4,63}", rid):  # a prefix of a record id, as `openflare records` shows them
        found = list(store.coll.find({"_id": {"$regex": "^" + rid}}).limit(2))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise BadInput(f"the record ID {rid} is ambiguous: give more of it (`{PROG} records --json` shows whole IDs)")
    raise BadInput(f"no record with ID {rid} in {store.description}")


def cmd_label(args, s: Settings) -> int:
    from addons import records

    store = _open_records(s)
    try:
        try:
            rec = _find_record(store, args.id)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - pymongo/montydb errors
            raise Failure(f"cannot read {store.description}: {type(e).__name__}: {e}") from e
        if rec.get("tier") != records.TIER_FULL:
            raise BadInput(
                f"record {rec['_id']} is a brief record (a passed flow: IP, time and score only), so it holds no "
                "request to learn from. Label the flow in mitmweb (openflare.label), or record passed flows in full "
                "with openflare_record_benign_one_in."
            )
        conflict = records.label_conflict(rec.get("verdict"), args.label)
        if conflict and not args.force:
            raise BadInput(
                f"record {rec['_id']}: {conflict}; labelling it {args.label} teaches the model the opposite. "
                "Check the request, then add --force to store it as an override (label_override: true)."
            )
        doc = records.operator_label(rec, args.label, time.time(), override=bool(conflict))
        labels = _labels_of(store)
        try:
            labels.coll.replace_one({"_id": doc["_id"]}, doc, upsert=True)
        except Exception as e:  # noqa: BLE001 - pymongo/montydb errors
            raise Failure(f"cannot write to {labels.description}: {type(e).__name__}: {e}") from e
    finally:
        store.close()
    note = " (an override of the model's verdict)" if conflict else ""
    print(f"labelled record {doc['_id']} {args.label}{note} in {labels.description}; `make retrain` learns it")
    return 0


def cmd_records(args, s: Settings) -> int:
    from addons import records

    query: dict = {}
    if args.since:
        query["time"] = {"$gte": parse_since(args.since)}
    if args.verdict:
        query["verdict"] = args.verdict
    if args.ip:
        try:
            query["client_ip"] = str(ipaddress.ip_address(args.ip.strip()))
        except ValueError:
            raise BadInput(f"--ip: not an IP address: {args.ip!r}") from None
    if args.limit < 0:
        raise BadInput("--limit must be >= 0 (0: no limit)")
    store = _open_records(s)
    try:
        cur = store.coll.find(query).sort("time", -1)
        if args.limit:
            cur = cur.limit(args.limit)
        recs = list(cur)
        labels = {}
        if recs:
            ids = [r["_id"] for r in recs]
            labels = {d["_id"]: d.get("label") for d in _labels_of(store).coll.find({"_id": {"$in": ids}})}
    except Exception as e:  # noqa: BLE001 - pymongo/montydb errors
        raise Failure(f"cannot read {store.description}: {type(e).__name__}: {e}") from e
    finally:
        store.close()
    rows = []
    for r in recs:
        target = r.get("target") if not r.get("target_b64") else "(binary)"
        rows.append({
            "id": r["_id"], "time": records.time_text(r.get("time")), "client_ip": r.get("client_ip"), "verdict": r.get("verdict"),
            "score": r.get("score"), "local_score": r.get("local_score"), "llm_score": r.get("llm_score"),
            "refused_by": r.get("refused_by"), "category": r.get("category"), "tier": r.get("tier"), "method": r.get("method"),
            "target": target, "status": r.get("status"), "label": labels.get(r["_id"]) or r.get("label"),
        })  # fmt: skip
    if args.json:
        print(dump_json(rows))
        return 0
    if not rows:
        print("No records match.")
        return 0
    out = []
    for r in rows:
        request = f"{r['method']} {banstore.sanitise(r['target'], 60)}" if r["method"] else "(brief record)"
        out.append((r["time"][:19].replace("T", " ") if r["time"] else None, r["id"][:16], r["client_ip"], r["verdict"], r["score"],
                    r["refused_by"], request, r["label"]))  # fmt: skip
    print(table(("TIME (UTC)", "ID", "IP", "VERDICT", "SCORE", "REFUSED BY", "REQUEST", "LABEL"), out))
    if args.limit and len(rows) == args.limit:
        print(f"(the {args.limit} most recent; --limit N for more, 0 for all)", file=sys.stderr)
    return 0


def verify_log(uri: str | None, directory: str, days: int, spill: str | None, allow_unkeyed: bool = False,
               out=None, err=None) -> int:
    """Walk the records' hash chains (stored + still in the journal) and report: broken links, gaps a proxy
    noted itself (a full disk), torn journal lines, labels written into records.

    Returns 0 intact, 1 broken (or a label in a record), 2 the store could not be read. `scripts/verify_log.py`
    and `openflare verify-log` both run this.
    """
    from addons import records

    out = out or sys.stdout
    err = err or sys.stderr
    if days < 0:
        print("verify-log: --days must be >= 0", file=err)
        return 2
    try:
        store = records.store_from_args(uri, directory)
    except (ValueError, OSError) as e:
        print(f"verify-log: cannot open the store: {e}", file=err)
        return 2
    try:
        result = records.walk_log(store, spill, days=days, allow_unkeyed=allow_unkeyed)
    except Exception as e:  # noqa: BLE001 - pymongo errors, an unreadable store or journal
        print(f"verify-log: cannot read the store {store.description}: {type(e).__name__}: {e}", file=err)
        return 2
    finally:
        store.close()
    where = store.description + (f" + {result['spilled']} spilled" if result["spilled"] else "")
    status, lines = records.log_report(result, where)
    for line in lines:
        print(line, file=out)
    return status


def cmd_verify_log(args, s: Settings) -> int:
    days = args.days if args.days is not None else s.opt("openflare_record_days", 30, int)
    spill = args.spill if args.spill is not None else s.opt("openflare_record_spill", "data/records-spill.jsonl", str)
    if not s.mongo_uri and not Path(s.record_dir).is_dir():
        raise BadInput(f"no embedded record store in {s.record_dir} (--record-dir to name it, or a MongoDB URI in "
                       f"{MONGO_ENV} / --mongo-uri)")  # fmt: skip
    return verify_log(s.mongo_uri, s.record_dir, days, spill)


def cmd_report(args, s: Settings) -> int:
    """`openflare report`: the records since --since as one self-contained HTML file (addons/report.py)."""
    from addons import model
    from addons import records
    from addons import report

    since = parse_since(args.since) if args.since not in ("", "all") else None
    if args.top < 1 or args.queue < 0 or args.workers < 1:
        raise BadInput("--top and --workers must be >= 1, --queue >= 0")
    name = args.model or s.opt("openflare_model", model.DEFAULT_MODEL, str)
    try:
        model_path = model.resolve(name)
    except model.ModelError as e:
        raise BadInput(f"--model: {e}") from e
    threshold = args.threshold if args.threshold is not None else s.opt("openflare_threshold", None, int)
    if threshold is None:
        try:
            threshold = model.card_threshold(model.read_card(model_path))
        except model.ModelError:
            threshold = 6
    if not 1 <= threshold <= 10:
        raise BadInput(f"--threshold must be between 1 and 10, not {threshold}")
    store = _open_records(s)
    stores = [(store, "" if s.mongo_uri or s.record_dir == "data/records" else f" --record-dir {_shell(s.record_dir)}")]
    if not s.mongo_uri:  # `make run WORKERS=N`: worker K (K > 1) writes its own embedded store, <dir>-wK
        base = Path(s.record_dir)
        for d in sorted(base.parent.glob(base.name + "-w*"), key=lambda p: (len(p.name), p.name)):
            if re.fullmatch(re.escape(base.name) + r"-w\d+", d.name) and (d / "monty.storage.cfg").is_file():
                stores.append((records.open_store(directory=d, create=False), f" --record-dir {_shell(str(d))}"))
    t0 = time.perf_counter()
    try:
        page, agg = report.build(stores, since, threshold, model_path, top=args.top, queue=args.queue, workers=args.workers)
    except Exception as e:  # noqa: BLE001 - pymongo/montydb/sqlite errors
        raise Failure(f"cannot read {store.description}: {type(e).__name__}: {e}") from e
    finally:
        for st, _ in stores:
            st.close()
    out = Path(args.out)
    try:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        raise Failure(f"cannot write {out}: {e.strerror or e}") from e
    print(f"wrote {out} ({len(page) / 1024:.0f} KB): {agg.records:,} records since {records.time_text(since) if since else 'the first'} "
          f"({agg.passed:,} passed, {agg.refused:,} refused; review queue {len(agg.near_pass.heap)} + {len(agg.near_refused.heap)}) "
          f"from {store.description}{f' and {len(stores) - 1} worker store(s)' if len(stores) > 1 else ''} in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    return 0


def _shell(text: str) -> str:
    import shlex

    return shlex.quote(text)


def check_config(argv: list[str]) -> int:
    """`openflare check-config ...`: addons/configcheck.py's main."""
    from addons import configcheck

    return int(configcheck.main(argv) or 0)


# --- the parser ---


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--conf", default=argparse.SUPPRESS, help="the options file to take settings from (default: .mitmproxy/config.yaml, else mitm.conf)")
    conn.add_argument("--redis-url", default=argparse.SUPPRESS, help=f"Redis of the bans (default: openflare_redis_url, else ${REDIS_ENV})")
    conn.add_argument("--prefix", default=argparse.SUPPRESS, help="prefix of the Redis keys (default: openflare_redis_prefix, else openflare:)")
    conn.add_argument("--ban-socket", default=argparse.SUPPRESS, help="without Redis: the socket of the proxy's in-process ban store (default: openflare_ban_socket, else data/bans.sock)")
    conn.add_argument("--mongo-uri", default=argparse.SUPPRESS, help=f"MongoDB of the records (default: openflare_mongo_uri, else ${MONGO_ENV})")
    conn.add_argument("--record-dir", default=argparse.SUPPRESS, help="without MongoDB: the embedded record store (default: openflare_record_dir, else data/records)")
    for a in conn._actions:  # the same options before the subcommand, with real defaults
        ap.add_argument(*a.option_strings, default=None, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def json_flag(p):
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("bans", parents=[conn], help="list, add or remove IP bans")
    p.add_argument("action", nargs="?", choices=("list", "add", "remove"), help="list (default), add, remove")
    p.add_argument("target", nargs="?", metavar="IP", help="the IP (or IPv6 network of openflare_ipv6_prefix bits)")
    p.add_argument("seconds", nargs="?", metavar="SECONDS", help="add: the ban's seconds (default: openflare_ban_seconds, doubled per repeat ban)")
    p.add_argument("--reason", help="add: the reason shown in lists and logs (default: manual)")
    json_flag(p)
    p.set_defaults(func=cmd_bans)

    p = sub.add_parser("allow", parents=[conn], help="list, add or remove allowlist entries")
    p.add_argument("action", nargs="?", choices=("list", "add", "remove"), help="list (default), add, remove")
    p.add_argument("target", nargs="?", metavar="CIDR", help="an IP address or CIDR range (IPv4 or IPv6)")
    p.add_argument("seconds", nargs="?", metavar="SECONDS", help="add: for this many seconds (default: until removed)")
    json_flag(p)
    p.set_defaults(func=cmd_allow)

    p = sub.add_parser("label", parents=[conn], help="label a recorded flow benign or attack for retraining")
    p.add_argument("id", metavar="ID", help="the record's ID (or its first characters, as `openflare records` shows them)")
    p.add_argument("label", choices=LABELS)
    p.add_argument("--force", action="store_true", help="store a label that contradicts the model's verdict (label_override: true)")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("records", parents=[conn], help="list recorded flows, most recent first")
    p.add_argument("--since", help="only records from then on: 30m, 1h, 2d, 1w, or an ISO date/time (UTC)")
    p.add_argument("--verdict", choices=VERDICTS, help="only records with this verdict")
    p.add_argument("--ip", help="only records of this client IP")
    p.add_argument("--limit", type=int, default=50, help="most records shown (default 50; 0: all)")
    json_flag(p)
    p.set_defaults(func=cmd_records)

    p = sub.add_parser("verify-log", parents=[conn], help="walk the records' hash chains and name the first broken link")
    p.add_argument("--days", type=int, help="retention in days (default: openflare_record_days, else 30; 0: none)")
    p.add_argument("--spill", help="spill file to include if it exists (default: openflare_record_spill)")
    p.set_defaults(func=cmd_verify_log)

    p = sub.add_parser("report", parents=[conn], help="write the records of a period as one HTML report (plots, top lists, review queue)")
    p.add_argument("--since", default="7d", help="records from then on: 30m, 1h, 2d, 1w, an ISO date/time (UTC), or all (default 7d)")
    p.add_argument("--out", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument("--threshold", type=int, help="the threshold the review queue is near (default: openflare_threshold, else the model card's)")
    p.add_argument("--model", help="the serving model, for its card and history (default: openflare_model, else openflare-local)")
    p.add_argument("--top", type=int, default=20, help="rows of the top IPs and paths tables (default 20)")
    p.add_argument("--queue", type=int, default=25, help="requests on each side of the threshold in the review queue (default 25)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes reading the embedded store, each a share of its rows (default: 2, or 1 on one CPU)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("check-config", help="check the options file: errors and unknown keys (addons/configcheck.py)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="its own arguments (openflare check-config --help)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check-config"]:
        return check_config(argv[1:])  # its arguments are its own
    ap = parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed)
        return int(e.code or 0)
    if args.command is None:
        ap.print_help()
        return 2
    if args.command == "check-config":
        return check_config(args.rest)
    try:
        return args.func(args, settings(args))
    except BadInput as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except Failure as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
