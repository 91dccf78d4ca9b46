"""What a flow record is, and how it reaches the store. A plain module: no mitmproxy import.

The Recorder addon, `scripts/export_records.py`, `scripts/verify_log.py`, the retraining script and the
tests all use these functions, so what is written and what is read can never drift apart.

Two tiers. A refused (or malicious) flow becomes a *full* record: time, client IP, method, target,
headers as a list of [name, value] pairs, body up to a cap (base64 when it is not UTF-8), scores,
verdict, category, model version, proxy instance. A passed flow becomes a *brief* record: time, client
IP, verdict and score only. Secrets (Authorization, Cookie values, password-like fields...) are masked
in every record.

Tamper evidence: each proxy run writes one hash chain. Every record carries `chain` (instance name plus a
run id), `seq` (0, 1, 2, ... within the chain), `prev` (the previous record's hash; 64 zeros for seq 0),
`prev_time` (the previous record's time) and `hash`, the sha256 of the record's canonical BSON without
`_id`, `hash` and the operator's `label*` fields (labels live in their own collection; one found in a
record is reported by `verify`). With OPENFLARE_RECORD_KEY set the hash is an HMAC-SHA256 under that key
and records carry `keyed` (the key's id): a chain edited and re-hashed without the key is caught.
`_id` is the hash, so a replayed record can never be stored twice. Retention removes the oldest records
of a chain: a chain may start after seq 0 only where `prev_time` is older than the retention window.

Delivery: `Writer.journal` builds and chains records and appends them to the journal (the spill file,
framed RS + JSON + LF) before the Recorder releases their responses; `Writer.deliver` inserts them into
the store in batches and the journal is emptied of what the store took. While the store is unreachable
the journal keeps them (replayed, in order, when it is back, or by the next run). On a full disk records
are held in memory (bounded); what does not fit is lost, counted, and noted in the chain as a `gap`
record. Records that reach the proxy while the queue is full go to an overflow file (unchained) and are
chained by the writer later. Losses are counted and logged.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

import bson  # pymongo's BSON codec: the hash chain's canonical form

logger = logging.getLogger(__name__)

DB_NAME = "openflare"
COLLECTION = "records"
GENESIS = "0" * 64
MASK = "*masked*"
TIER_FULL = "full"
TIER_BRIEF = "brief"

# Caps on what one full record keeps (the body cap is an option).
TARGET_CAP = 64 * 1024
HEADERS_CAP = 1000  # header pairs
HEADER_BYTES_CAP = 256 * 1024  # total bytes of names and values
BODY_CAP_MAX = 8 * 1024 * 1024  # well under MongoDB's 16 MB document limit

# Headers whose values are masked: cookies keep their names, the others lose the whole value.
MASK_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token")
# Form, query and JSON fields whose values are masked: a field matches when its name, lower-cased and
# without `-` and `_`, contains one of these, or equals one of MASK_FIELDS_EXACT.
MASK_FIELDS = ("password", "passwd", "passphrase", "pwd", "secret", "token", "apikey", "credential", "cvv", "ssn", "cardnumber", "creditcard")
MASK_FIELDS_EXACT = ("pass", "pw", "pin", "auth")

STORE_TIMEOUT_MS = 2000
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
EXPIRE_EVERY_S = 3600.0


class StoreUnavailable(Exception):
    """The store could not be reached (or refused the write for a reason that may pass)."""


class StoreMissing(ValueError):
    """A reader was pointed at an embedded store that does not exist (a typo in --dir, another checkout)."""


class StoreBusy(Exception):
    """Another process holds the lock of an embedded store or a spill file."""


# --- operator labels ---------------------------------------------------------------------------------

LABEL_BENIGN = "benign"
LABEL_ATTACK = "attack"


def label_conflict(verdict: str | None, label: str) -> str | None:
    """Why an operator's `label` contradicts the verdict a flow got (None when it does not).

    The one rule for every way of labelling (`openflare.label` in mitmweb, the `openflare label` CLI):
    labelling a refused flow benign, or a passed one attack, teaches the model the opposite of what it
    did. That is what an operator correcting a false positive means to do, and what a slip (a flow list
    that holds more than the flows meant) does by accident; so it takes an explicit `force`, and the
    label is then stored with `label_override: true`. Flows without a verdict (`error`, unscored)
    contradict nothing.
    """
    if verdict == "block" and label == LABEL_BENIGN:
        return "OpenFlare refused it (verdict block): labelled benign, retraining learns to let such requests through"
    if verdict == "pass" and label == LABEL_ATTACK:
        return "OpenFlare passed it (verdict pass): labelled attack, retraining learns to refuse such requests"
    return None


# --- one writing process per embedded store and spill file --------------------------------------------

STORE_LOCK_NAME = "openflare.lock"
_LOCKS: dict[str, list] = {}  # resolved lock path -> [fd, count]: re-entrant within one process
_LOCKS_GUARD = threading.Lock()


def lock_paths(directory: str | os.PathLike | None, spill: str | os.PathLike) -> list[tuple[Path, str]]:
    """The lock files a recording process holds: (path, what it guards). The embedded store's lives in
    its directory; the spill file's (which also covers `.overflow` and `.rejected`) next to it."""
    out = []
    if directory is not None:
        d = Path(directory).resolve()
        out.append((d / STORE_LOCK_NAME, f"the embedded record store {d}"))
    sp = Path(spill).resolve()
    out.append((sp.with_name(sp.name + ".lock"), f"the spill file {sp}"))
    return out


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info.get("pid"):
        return "another process (its pid is not written yet)"
    what = f"pid {info['pid']}"
    if info.get("prog"):
        what += f", {info['prog']}"
    if info.get("host") and info["host"] != socket.gethostname():
        what += f" on {info['host']}"
    if info.get("since"):
        what += f", since {info['since']}"
    return f"another process ({what})"


def acquire_locks(paths: list[tuple[Path, str]]) -> list[Path]:
    """Take every lock in `paths` (fcntl.flock, exclusive, non-blocking) or none: raises StoreBusy
    naming the holder's pid. A lock goes with its process (a crash frees it); taking one again in the
    same process only counts. Release with `release_locks`."""
    import fcntl
    import sys

    taken: list[Path] = []
    try:
        for path, what in paths:
            key = str(path)
            with _LOCKS_GUARD:
                held = _LOCKS.get(key)
                if held is not None:
                    held[1] += 1
                    taken.append(path)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    raise StoreBusy(f"{what} is in use by {holder}; lock file {path}") from None
                except OSError:
                    os.close(fd)
                    raise
                info = {"pid": os.getpid(), "prog": os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "",
                        "host": socket.gethostname(), "since": time_text(utcnow())}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
                _LOCKS[key] = [fd, 1]
                taken.append(path)
    except BaseException:
        release_locks(taken)
        raise
    return taken


def release_locks(paths: list[Path]) -> None:
    for path in paths:
        with _LOCKS_GUARD:
            held = _LOCKS.get(str(path))
            if held is None:
                continue
            held[1] -= 1
            if held[1] <= 0:
                del _LOCKS[str(path)]
                with contextlib.suppress(OSError):
                    os.ftruncate(held[0], 0)  # the holder's pid leaves with it (the file stays: unlinking races)
                os.close(held[0])  # closing the last descriptor releases the flock


# --- time -----------------------------------------------------------------------------------------


def to_time(ts: float) -> datetime.datetime:
    """A Unix timestamp as the naive UTC datetime stored (BSON keeps milliseconds: cut to them here)."""
    ms = int(ts * 1000)
    return datetime.datetime(1970, 1, 1) + datetime.timedelta(milliseconds=ms)


def time_text(t: datetime.datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return t.isoformat(timespec="milliseconds") + "Z"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


# --- bytes as stored text ---------------------------------------------------------------------------


def _text(b: bytes) -> tuple[str, bool]:
    """(text, is_base64): UTF-8 text when the bytes are UTF-8, else base64."""
    try:
        return b.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(b).decode("ascii"), True


def _body_text(b: bytes) -> tuple[str, bool]:
    """Like `_text`, but a UTF-8 character cut by the cap is dropped rather than forcing base64."""
    try:
        return b.decode("utf-8"), False
    except UnicodeDecodeError as e:
        if e.start >= len(b) - 3 and e.reason == "unexpected end of data":
            return b[: e.start].decode("utf-8"), False
        return base64.b64encode(b).decode("ascii"), True


def raw(value: str, is_b64: bool) -> bytes:
    """The bytes a stored text stands for."""
    return base64.b64decode(value) if is_b64 else value.encode("utf-8")


def header_pairs(record: dict) -> list[tuple[bytes, bytes]]:
    """The stored headers of a full record as (name, value) bytes."""
    out = []
    for pair in record.get("headers") or []:
        b64 = len(pair) > 2 and pair[2] == "b64"
        out.append((raw(pair[0], b64), raw(pair[1], b64)))
    return out


# --- masking ----------------------------------------------------------------------------------------


def _field_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


class Masker:
    """Decides which header and field values are secrets. `extra` adds names to both lists."""

    def __init__(self, extra: Sequence[str] = ()) -> None:
        extra = [e.strip() for e in extra if e.strip()]
        self.headers = frozenset(MASK_HEADERS) | {e.lower() for e in extra}
        self.fields = tuple(MASK_FIELDS) + tuple(_field_key(e) for e in extra)
        self.exact = frozenset(MASK_FIELDS_EXACT)

    def field(self, name: str) -> bool:
        key = _field_key(name)
        return bool(key) and (key in self.exact or any(f in key for f in self.fields if f))

    def header(self, name: bytes, value: bytes) -> bytes:
        lname = name.decode("latin-1").strip().lower()
        if lname not in self.headers:
            return value
        if lname == "cookie":
            parts = []
            for part in value.split(b";"):
                cname, eq, _ = part.strip().partition(b"=")
                parts.append(cname + b"=" + MASK.encode() if eq else MASK.encode())
            return b"; ".join(parts)
        if lname == "set-cookie":  # the first pair is the cookie; attributes (Path, Expires...) stay
            first, semi, attrs = value.partition(b";")
            cname, eq, _ = first.partition(b"=")
            return (cname + b"=" + MASK.encode() if eq else MASK.encode()) + semi + attrs
        return MASK.encode()

    def pairs(self, data: bytes, sep: bytes = b"&") -> bytes:
        """Mask `name=value` pairs (query strings, form bodies); the rest stays byte for byte."""
        if b"=" not in data:
            return data
        parts = data.split(sep)
        changed = False
        for i, part in enumerate(parts):
            name, eq, _ = part.partition(b"=")
            if eq and self.field(unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace")):
                parts[i] = name + b"=" + MASK.encode()
                changed = True
        return sep.join(parts) if changed else data

    def target(self, target: bytes) -> bytes:
        path, q, query = target.partition(b"?")
        if not q:
            return target
        return path + b"?" + self.pairs(query)

    # "key": value, where value is a string (maybe cut by the cap) or a bare scalar; objects are walked into.
    _JSON_PAIR = re.compile(rb'"((?:[^"\\]|\\.)*)"(\s*:\s*)("(?:[^"\\]|\\.)*"?|[^\s,{}\[\]"]+)', re.S)

    def json(self, body: bytes) -> bytes:
        """Mask scalar values of matching keys in JSON text, even JSON cut by the body cap."""

        def sub(m: re.Match) -> bytes:
            try:
                key = json.loads(b'"' + m.group(1) + b'"')
            except ValueError:
                key = m.group(1).decode("utf-8", "replace")
            if self.field(key):
                return b'"' + m.group(1) + b'"' + m.group(2) + b'"' + MASK.encode() + b'"'
            return m.group(0)

        return self._JSON_PAIR.sub(sub, body)

    def multipart(self, body: bytes, content_type: str) -> bytes:
        m = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
        if not m:
            return body
        delim = b"--" + m.group(1).encode("latin-1", "replace")
        parts = body.split(delim)
        for i, part in enumerate(parts):
            head, sep, content = part.partition(b"\r\n\r\n")
            if not sep:
                continue
            name = re.search(rb'name="([^"]*)"', head, re.I)
            if name and self.field(name.group(1).decode("utf-8", "replace")):
                parts[i] = head + sep + MASK.encode() + (b"\r\n" if content.endswith(b"\r\n") else b"")
        return delim.join(parts)

    def body(self, body: bytes, content_type: str) -> bytes:
        if not body:
            return body
        ctype = content_type.split(";", 1)[0].strip().lower()
        if ctype.startswith("multipart/"):
            return self.multipart(body, content_type)
        if ctype == "application/x-www-form-urlencoded":
            return self.pairs(body)
        if ctype.endswith("json") or (not ctype and body.lstrip()[:1] in (b"{", b"[")):
            return self.json(body)
        if not ctype and b"=" in body and b" " not in body.strip() and b"\n" not in body.strip():
            return self.pairs(body)
        return body


# --- building records ---------------------------------------------------------------------------------


def _int(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _str(v: Any, cap: int = 256) -> str | None:
    if v is None:
        return None
    s = str(v)[:cap]
    return s.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates reach the store


def build(capture: dict, masker: Masker) -> dict:
    """A record (without its chain fields) from a capture made by the Recorder addon.

    A capture is a plain dict: `time` (Unix seconds), `client_ip`, `verdict`, `score`, `full` (bool),
    and for full records `method`, `target` (bytes), `headers` ((bytes, bytes) pairs), `body` (bytes,
    already cut to the cap), `body_size`, `local_score`, `llm_score`, `category`, `model_version`,
    `refused_by`, `field` ([location, name] that decided), `signal`, `explanation`, `status`, `error`, `sampled`.
    """
    rec: dict[str, Any] = {
        "tier": TIER_FULL if capture.get("full") else TIER_BRIEF,
        "time": to_time(float(capture["time"])),
        "client_ip": _str(capture.get("client_ip")),
        "verdict": _str(capture.get("verdict"), 32),
        "score": _int(capture.get("score")),
    }
    if not capture.get("full"):
        rec["label"] = None
        return rec
    target = bytes(capture.get("target") or b"")
    rec["method"] = _str((capture.get("method") or b"").decode("latin-1"), 64)
    target_truncated = len(target) > TARGET_CAP
    rec["target"], rec["target_b64"] = _text(masker.target(target[:TARGET_CAP]))
    headers = []
    size = 0
    content_type = ""
    pairs = list(capture.get("headers") or ())
    for name, value in pairs[:HEADERS_CAP]:
        name, value = bytes(name), bytes(value)
        size += len(name) + len(value)
        if size > HEADER_BYTES_CAP:
            break
        if name.lower() == b"content-type":
            content_type = value.decode("latin-1")
        value = masker.header(name, value)
        try:
            headers.append([name.decode("utf-8"), value.decode("utf-8")])
        except UnicodeDecodeError:
            headers.append([base64.b64encode(name).decode(), base64.b64encode(value).decode(), "b64"])
    rec["headers"] = headers
    rec["headers_truncated"] = len(headers) < len(pairs)
    body = masker.body(bytes(capture.get("body") or b""), content_type)
    rec["body"], rec["body_b64"] = _body_text(body)
    rec["body_size"] = _int(capture.get("body_size")) or 0
    rec["body_truncated"] = rec["body_size"] > len(capture.get("body") or b"")
    rec["target_truncated"] = target_truncated
    rec["local_score"] = _int(capture.get("local_score"))
    rec["llm_score"] = _int(capture.get("llm_score"))
    rec["category"] = _str(capture.get("category"), 64)
    rec["model_version"] = _str(capture.get("model_version"), 128)
    rec["refused_by"] = _str(capture.get("refused_by"), 32)
    fld = capture.get("field")
    rec["field"] = [_str(str(x), 256) for x in fld[:2]] if isinstance(fld, (list, tuple)) else None
    rec["signal"] = _str(capture.get("signal"), 256)
    rec["explanation"] = _str(capture.get("explanation"), 512)
    rec["status"] = _int(capture.get("status"))
    rec["error"] = _str(capture.get("error"), 512)
    rec["sampled"] = bool(capture.get("sampled"))
    rec["label"] = None
    return rec


# --- operator labels ----------------------------------------------------------------------------------

_CHAIN_FIELDS = frozenset(("chain", "seq", "prev", "prev_time", "hash", "instance"))


def operator_label(rec: dict, label: str, now: float, override: bool = False) -> dict:
    """The `labels` document of an operator label: a full record (`build`'s output, or a stored record, whose
    chain fields are left out: a label is outside the chains) with `label`, `label_source: "operator"`,
    `label_time`, and `label_override` (true when it contradicts the verdict on purpose: `label_conflict`)."""
    doc = {k: v for k, v in rec.items() if k not in _CHAIN_FIELDS}
    doc["label"] = label
    doc["label_source"] = "operator"
    doc["label_time"] = to_time(now)
    doc["label_override"] = override
    return doc


# --- the hash chain -----------------------------------------------------------------------------------


_UNHASHED = frozenset(("_id", "hash"))
TIER_GAP = "gap"
# The optional chain key (HMAC-SHA256 instead of SHA-256): from the environment only (mitmweb shows options).
ENV_KEY = "OPENFLARE_RECORD_KEY"
KEY_MIN_BYTES = 16
FROM_ENV: Any = object()  # `verify(key=FROM_ENV)`: the key in OPENFLARE_RECORD_KEY, if any


def _sorted(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _sorted(v[k]) for k in sorted(v)}
    return v


def env_key(environ: dict | None = None) -> bytes | None:
    """The chain key in OPENFLARE_RECORD_KEY (its UTF-8 bytes), None when unset or empty."""
    value = (os.environ if environ is None else environ).get(ENV_KEY) or ""
    return value.encode("utf-8") if value else None


def key_id(key: bytes) -> str:
    """Names a key without revealing it (an HMAC of a constant): stored in every keyed record as `keyed`."""
    return hmac.new(key, b"openflare record key id", hashlib.sha256).hexdigest()[:16]


def record_hash(rec: dict, key: bytes | None = None) -> str:
    """sha256 (HMAC-SHA256 with `key`) of the record's canonical form, without `_id`, `hash` and `label*`.

    Canonical form: the BSON encoding (what MongoDB stores) of the record with its keys sorted. BSON is
    exact for every value a record holds (str, int, bool, None, lists, datetimes in milliseconds), and
    three times faster to make than canonical JSON. Without the key nobody can re-hash a keyed chain
    after an edit.
    """
    body = {}
    for k in sorted(rec):
        if k in _UNHASHED or k[:5] == "label":
            continue
        v = rec[k]
        body[k] = _sorted(v) if type(v) is dict else v
    data = bson.encode(body)
    if key:
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def default_instance() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def gap_record(lost: int, first: datetime.datetime | None, last: datetime.datetime | None, reason: str) -> dict:
    """The chain's own note of records it lost (a full disk): `tier: "gap"`, how many, when, why. Chained
    (and keyed) like any record, so verify-log reports the loss instead of a broken link."""
    return {"tier": TIER_GAP, "time": to_time(time.time()), "lost": int(lost), "first_time": first, "last_time": last, "reason": _str(reason, 512)}


class Chain:
    """One run's hash chain. Not thread-safe: the one journal writer calls `link` in order."""

    def __init__(self, instance: str, key: bytes | None = None) -> None:
        self.instance = instance
        self.key = key or None
        self.key_id = key_id(key) if key else None
        run = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.id = f"{instance}/{run}-{uuid.uuid4().hex[:8]}"
        self.seq = 0
        self.prev = GENESIS
        self.prev_time: datetime.datetime | None = None

    def link(self, rec: dict) -> dict:
        rec["instance"] = self.instance
        rec["chain"] = self.id
        rec["seq"] = self.seq
        rec["prev"] = self.prev
        rec["prev_time"] = self.prev_time
        if self.key_id:
            rec["keyed"] = self.key_id
        h = record_hash(rec, self.key)
        rec["hash"] = h
        rec["_id"] = h
        self.seq += 1
        self.prev = h
        self.prev_time = rec["time"]
        return rec

    def state(self) -> tuple:
        return self.seq, self.prev, self.prev_time

    def restore(self, state: tuple) -> None:
        """Back to `state()`: the records linked since were not written (their links are made again)."""
        self.seq, self.prev, self.prev_time = state


def verify(records: Iterable[dict], days: int = 0, now: datetime.datetime | None = None, key: Any = FROM_ENV,
           allow_unkeyed: bool = False) -> dict:
    """Walk records sorted by (chain, seq). Returns {"chains", "records", "truncated", "broken", "gaps",
    "labelled", "unauthenticated"}.

    `broken` is None or the first broken link: {"chain", "seq", "id", "reason"}. A chain may start
    after seq 0 only when retention (`days`, 0 = none) explains it: its `prev_time` is older than the
    window (with an hour's slack for MongoDB's TTL monitor, which runs once a minute).
    `gaps` lists the chains' own notes of records lost to a full disk ({"chain", "seq", "lost", "reason",
    "first_time", "last_time"}): a loss, reported, never a broken link.
    `labelled` lists records with a label written into them ({"chain", "seq", "id", "fields"}): labels live
    in the `labels` collection, so one in `records` is an edit (the hash leaves labels out); when nothing
    is broken, the first one is `broken` too.
    `key` (default: OPENFLARE_RECORD_KEY from the environment) checks keyed records' HMACs; with a key,
    a record that is not keyed is broken (re-hashed by someone without the key) unless `allow_unkeyed`
    (chains written before the key was set). Without a key, keyed records are checked for their links
    only and counted in `unauthenticated`.
    """
    if key is FROM_ENV:
        key = env_key()
    kid = key_id(key) if key else None
    now = now or utcnow()
    cutoff = now - datetime.timedelta(days=days) + datetime.timedelta(hours=1) if days > 0 else None
    out: dict[str, Any] = {"chains": 0, "records": 0, "truncated": [], "broken": None, "gaps": [], "labelled": [],
                           "unauthenticated": 0}
    cur_chain = None
    expect_seq = 0
    expect_prev = GENESIS

    def broken(rec: dict, reason: str) -> dict:
        out["broken"] = {"chain": rec.get("chain"), "seq": rec.get("seq"), "id": rec.get("_id"), "reason": reason}
        return out

    for rec in records:
        out["records"] += 1
        keyed = rec.get("keyed")
        if keyed:
            if key is None:
                out["unauthenticated"] += 1
                h = rec.get("hash")
            elif keyed != kid:
                return broken(rec, f"keyed with another key (key id {keyed}; {ENV_KEY} has key id {kid})")
            else:
                h = record_hash(rec, key)
        else:
            if key is not None and not allow_unkeyed:
                return broken(rec, f"not keyed: re-hashed by someone without the key, or written before {ENV_KEY} "
                                   "was set (verify those chains with --allow-unkeyed)")
            h = record_hash(rec)
        if rec.get("hash") != h:
            return broken(rec, f"content changed: hash is {h}, record says {rec.get('hash')}")
        if rec.get("_id") != h:
            return broken(rec, "_id differs from the record's hash")
        labels = sorted(k for k in rec if k[:5] == "label" and rec[k] is not None)
        if labels:
            out["labelled"].append({"chain": rec.get("chain"), "seq": rec.get("seq"), "id": rec.get("_id"), "fields": labels,
                                    "label": rec.get("label")})
        if rec.get("tier") == TIER_GAP:
            out["gaps"].append({"chain": rec.get("chain"), "seq": rec.get("seq"), "lost": rec.get("lost"),
                                "reason": rec.get("reason"), "first_time": rec.get("first_time"), "last_time": rec.get("last_time")})
        seq = rec.get("seq")
        if rec.get("chain") != cur_chain:
            cur_chain = rec.get("chain")
            out["chains"] += 1
            if seq != 0:
                pt = rec.get("prev_time")
                if cutoff is None or pt is None or pt >= cutoff:
                    return broken(rec, f"records before seq {seq} are missing (deleted, not expired by retention)")
                out["truncated"].append({"chain": cur_chain, "first_seq": seq})
            elif rec.get("prev") != GENESIS:
                return broken(rec, "first record of the chain does not start from the genesis hash")
        else:
            if seq != expect_seq:
                if isinstance(seq, int) and seq > expect_seq:
                    return broken(rec, f"records {expect_seq}..{seq - 1} are missing")
                return broken(rec, f"seq {seq} out of order (expected {expect_seq})")
            if rec.get("prev") != expect_prev:
                return broken(rec, "prev does not match the previous record's hash")
        expect_seq = (seq if isinstance(seq, int) else 0) + 1
        expect_prev = h
    if out["labelled"] and out["broken"] is None:
        first = out["labelled"][0]
        out["broken"] = {"chain": first["chain"], "seq": first["seq"], "id": first["id"],
                         "reason": f"{', '.join(first['fields'])} written into the record (label {first['label']!r}): operator labels "
                                   "live in the labels collection, never in records"}
    return out


def walk_log(store: "Store", spill: str | os.PathLike | None = None, days: int = 0, key: Any = FROM_ENV,
             allow_unkeyed: bool = False) -> dict:
    """`verify` over the stored records merged with those still in the journal (spill) segments: the
    result plus "spilled" (records read from the journal) and "bad_lines" ((file, line, why): lines of the
    journal that are not whole records, skipped and reported, never a crash). Store errors raise."""
    import heapq

    def order(r: dict) -> tuple:
        return str(r.get("chain")), r.get("seq") if isinstance(r.get("seq"), int) else -1

    spilled: list[dict] = []
    sf = SpillFile(spill) if spill else None
    if sf is not None:
        for batch in sf.read(10000):
            spilled.extend(batch)
        spilled.sort(key=order)

    def merged() -> Iterator[dict]:
        seen_last = None
        for rec in heapq.merge(store.find(), spilled, key=order):
            if rec.get("_id") == seen_last:  # journaled and already stored
                continue
            seen_last = rec.get("_id")
            yield rec

    out = verify(merged(), days=days, key=key, allow_unkeyed=allow_unkeyed)
    out["spilled"] = len(spilled)
    out["bad_lines"] = list(sf.bad) if sf is not None else []
    return out


def log_report(result: dict, where: str) -> tuple[int, list[str]]:
    """verify-log's verdict on `walk_log`'s result: (exit status 0 intact / 1 broken, lines to print)."""
    lines = []
    for f, n, why in result.get("bad_lines", []):
        lines.append(f"BAD LINE: {f} line {n}: {why} (skipped; the records around it were read)")
    for g in result.get("gaps", []):
        lines.append(f"GAP: chain {g['chain']} seq {g['seq']}: {g['lost']} records lost between {time_text(g['first_time'])} and "
                     f"{time_text(g['last_time'])}: {g['reason']} (noted by the proxy itself, not an edit)")
    for lab in result.get("labelled", [])[:20]:
        lines.append(f"LABEL IN RECORD: chain {lab['chain']} seq {lab['seq']} id {lab['id']}: {', '.join(lab['fields'])} "
                     f"(label {lab['label']!r}); operator labels live in the labels collection")
    if result.get("unauthenticated"):
        lines.append(f"NOTE: {result['unauthenticated']} keyed records were checked for their links only: set {ENV_KEY} to check their HMACs")
    if result["broken"]:
        b = result["broken"]
        lines.append(f"BROKEN ({where}): first broken link: chain {b['chain']} seq {b['seq']} id {b['id']}: {b['reason']}")
        return 1, lines
    note = f"; {len(result['truncated'])} chains start after seq 0 (older records expired)" if result["truncated"] else ""
    if result.get("gaps"):
        note += f"; {sum(int(g['lost'] or 0) for g in result['gaps'])} records lost to {len(result['gaps'])} recorded gap(s) (full disk)"
    if result.get("bad_lines"):
        note += f"; {len(result['bad_lines'])} bad journal line(s) skipped"
    lines.append(f"OK ({where}): {result['records']} records in {result['chains']} chains, every link intact{note}")
    return 0, lines


# --- stores -------------------------------------------------------------------------------------------


class Store:
    """A pymongo-style collection plus what the recorder needs from it.

    kind: "mongodb" (pymongo), "embedded" (montydb on SQLite) or "mongomock" (tests).
    """

    def __init__(self, collection, kind: str = "mongodb", client=None, description: str = "") -> None:
        self.coll = collection
        self.kind = kind
        self.client = client
        self.description = description or kind
        self._sqlite: sqlite3.Connection | None = None

    # writing
    def insert(self, docs: list[dict]) -> tuple[int, int, list[dict]]:
        """Insert unordered; (inserted, duplicates, rejected docs). Raises StoreUnavailable."""
        if not docs:
            return 0, 0, []
        if self.kind == "embedded":
            return self._insert_embedded(docs)
        import pymongo.errors

        try:
            self.coll.insert_many(docs, ordered=False)
            return len(docs), 0, []
        except pymongo.errors.BulkWriteError as e:
            errors = e.details.get("writeErrors", [])
            dup = sum(1 for w in errors if w.get("code") == 11000)
            rejected = [docs[w["index"]] for w in errors if w.get("code") != 11000]
            return len(docs) - len(errors), dup, rejected
        except pymongo.errors.PyMongoError as e:
            raise StoreUnavailable(f"{type(e).__name__}: {e}") from e

    def _insert_embedded(self, docs: list[dict]) -> tuple[int, int, list[dict]]:
        # montydb 2.5.6's insert_many scans every stored key for every new document (O(stored x batch):
        # 3.8 s for 10,000 records in 500-record batches, worse as the store grows). Write montydb's own
        # row format (its id and BSON encoders) with INSERT OR IGNORE instead: one transaction per batch.
        from montydb.storage import sqlite as monty_sqlite
        from montydb.types import bson as monty_bson

        try:
            storage = self.coll._storage
            sub = storage
            for inst in self.coll._components:
                sub = sub.contractor_cls(sub, inst)
            if self._sqlite is None:
                if not sub._database.collection_exists(sub._name):
                    sub._database.collection_create(sub._name)
                self._sqlite = sqlite3.connect(sub._col_path, check_same_thread=False, timeout=5.0)
                self._sqlite.execute("PRAGMA journal_mode=WAL")
                self._sqlite.execute("PRAGMA synchronous=NORMAL")
                # montydb takes an existing file for a collection: one created on a full disk (empty, no table)
                # would refuse every insert, across restarts. Its own table, made here if missing.
                self._sqlite.execute(monty_sqlite.CREATE_TABLE.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1)
                                     .format(monty_sqlite.SQLITE_RECORD_TABLE))
            rows = [(monty_bson.id_encode(d["_id"]), sub._encode_doc(d, check_keys=True)) for d in docs]
            sql = f"INSERT OR IGNORE INTO [{monty_sqlite.SQLITE_RECORD_TABLE}](k, v) VALUES (?, ?)"
            with self._sqlite:
                before = self._sqlite.total_changes
                self._sqlite.executemany(sql, rows)
                inserted = self._sqlite.total_changes - before
        except (sqlite3.OperationalError, OSError) as e:
            self._close_sqlite()
            raise StoreUnavailable(f"{type(e).__name__}: {e}") from e
        return inserted, len(docs) - inserted, []

    def ensure_indexes(self, days: int) -> None:
        """Indexes on time, client IP, verdict, (chain, seq); retention as a TTL index on time.

        montydb has no indexes (its create_index does nothing): the embedded store is scanned, and
        retention there is `expire`, run by the writer hourly.
        """
        if self.kind == "embedded":
            return
        import pymongo.errors

        steps = (
            lambda: self.coll.create_index([("client_ip", 1)]),
            lambda: self.coll.create_index([("verdict", 1)]),
            lambda: self.coll.create_index([("chain", 1), ("seq", 1)], unique=True),
            lambda: self._ttl_index(days),
        )
        for step in steps:
            try:
                step()
            except pymongo.errors.ConnectionFailure as e:
                raise StoreUnavailable(f"{type(e).__name__}: {e}") from e
            except pymongo.errors.OperationFailure as e:  # e.g. an index made by hand with other options
                logger.warning("OpenFlare recorder: an index on %s could not be made: %s", self.description, e)

    def _ttl_index(self, days: int) -> None:
        import pymongo.errors

        name = "time_1"
        want = {"expireAfterSeconds": days * 86400} if days > 0 else {}
        info = self.coll.index_information().get(name)
        if info is not None and info.get("expireAfterSeconds") == want.get("expireAfterSeconds"):
            return
        if info is not None:
            try:
                if days > 0 and "expireAfterSeconds" in info:
                    cmd = {"collMod": self.coll.name, "index": {"keyPattern": {"time": 1}, "expireAfterSeconds": days * 86400}}
                    self.coll.database.command(cmd)
                    return
            except (pymongo.errors.OperationFailure, NotImplementedError):
                pass  # no collMod (old server, mongomock): rebuild the index
            self.coll.drop_index(name)
        self.coll.create_index([("time", 1)], name=name, **want)

    def expire(self, days: int, now: datetime.datetime | None = None) -> int:
        """Delete records older than `days` (the embedded store's retention). Returns how many."""
        if days <= 0:
            return 0
        cutoff = (now or utcnow()) - datetime.timedelta(days=days)
        self._close_sqlite()
        if self.kind == "embedded" and self.coll.name not in self.coll.database.list_collection_names():
            return 0  # nothing stored yet: montydb has no database file to open
        return self.coll.delete_many({"time": {"$lt": cutoff}}).deleted_count

    def ping(self) -> None:
        if self.kind != "mongodb":
            return
        import pymongo.errors

        try:
            self.client.admin.command("ping")
        except pymongo.errors.PyMongoError as e:
            raise StoreUnavailable(f"{type(e).__name__}: {e}") from e

    # reading
    def find(self, query: dict | None = None, sort: bool = True) -> Iterator[dict]:
        cur = self.coll.find(query or {})
        if sort:
            cur = cur.sort([("chain", 1), ("seq", 1)])
        return iter(cur)

    def _close_sqlite(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None

    def close(self) -> None:
        self._close_sqlite()
        if self.client is not None and hasattr(self.client, "close"):
            self.client.close()


def open_store(uri: str | None = None, directory: str | os.PathLike | None = None, create: bool = True) -> Store:
    """MongoDB through pymongo when `uri` is given, else the embedded montydb (SQLite) in `directory`.

    The description names the store in use: `MongoDB host:port/db` (never the URI's user or password)
    or `embedded store /absolute/path`. With `create=False` (readers: scripts, the CLI) a missing
    embedded store raises StoreMissing instead of being created empty.
    """
    if uri:
        import pymongo
        import pymongo.uri_parser

        try:
            parsed = pymongo.uri_parser.parse_uri(uri)
        except Exception as e:  # noqa: BLE001 - InvalidURI, ConfigurationError, ValueError
            raise ValueError(f"not a MongoDB URI: {type(e).__name__}") from e
        opts = {k.lower() for k in parsed.get("options", {})}
        # Short waits for an absent server (the writer then spills); a generous one for a big batch.
        wanted = {"serverSelectionTimeoutMS": STORE_TIMEOUT_MS, "connectTimeoutMS": STORE_TIMEOUT_MS, "socketTimeoutMS": 30_000}
        kwargs = {k: v for k, v in wanted.items() if k.lower() not in opts}
        client = pymongo.MongoClient(uri, **kwargs)
        db = client.get_default_database(default=DB_NAME)
        hosts = ",".join(f"{h}:{p}" for h, p in parsed.get("nodelist", []))
        return Store(db[COLLECTION], "mongodb", client, f"MongoDB {hosts}/{db.name}")
    if directory is None:
        raise ValueError("no MongoDB URI and no directory for the embedded store")
    from montydb import MontyClient, set_storage

    path = Path(directory).resolve()
    if not create:  # a reader: the store must be there, and its files are left as they are
        if not path.is_dir():
            raise StoreMissing(
                f"no record store at {path}: the directory does not exist. The proxy writes to openflare_record_dir "
                "(default data/records, relative to the directory mitmdump runs in); pass that with --dir, "
                "or a MongoDB URI with --uri / OPENFLARE_MONGO_URI"
            )
        if not (path / "monty.storage.cfg").is_file():
            raise StoreMissing(f"{path} is not an OpenFlare record store (no monty.storage.cfg in it); check --dir")
    else:
        path.mkdir(parents=True, exist_ok=True)
        set_storage(str(path), storage="sqlite", use_bson=True)
    client = MontyClient(str(path))
    return Store(client[DB_NAME][COLLECTION], "embedded", client, f"embedded store {path}")


# --- journal, spill and overflow files -----------------------------------------------------------------
#
# Framing (RFC 7464, JSON text sequences): each record is RS (0x1E), one line of JSON, LF. JSON never holds
# a raw RS or LF (dumps escapes control characters), so a record cut short by a failed write is seen as
# such (no LF before the next RS, or at the end of the file) and the records after it still read. Lines
# without RS (files written before the framing) are read as plain JSON Lines.

RS = b"\x1e"
# The journal starts a new segment past this size; segments whose records are all stored are deleted.
SEGMENT_BYTES = 8 * 1024 * 1024
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
LOG_EVERY_S = 10.0


def _json_default(o: Any) -> Any:
    if isinstance(o, datetime.datetime):
        return {"$date": time_text(o)}
    if isinstance(o, (bytes, bytearray)):
        return {"$b64": base64.b64encode(bytes(o)).decode("ascii")}
    raise TypeError(f"cannot serialise {type(o).__name__}")


def _json_hook(d: dict) -> Any:
    if len(d) == 1:
        if "$date" in d:
            return datetime.datetime.strptime(d["$date"], "%Y-%m-%dT%H:%M:%S.%fZ")
        if "$b64" in d:
            return base64.b64decode(d["$b64"])
    return d


def dumps_line(doc: dict) -> str:
    return json.dumps(doc, separators=(",", ":"), default=_json_default) + "\n"


def loads_line(line: str | bytes) -> dict:
    return json.loads(line, object_hook=_json_hook)


def frame(doc: dict) -> bytes:
    """One record as written to the journal, spill, overflow and rejected files: RS, JSON, LF."""
    return RS + dumps_line(doc).encode("ascii")


def _parse(data: bytes) -> dict | None:
    try:
        doc = loads_line(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def read_frames(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record, None) for each good record of a framed file, (line number, None, why) for
    each bad one; never raises on content. "torn last line" marks a record cut at the end of the file
    (a failed write, or one still being written)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            ended = line.endswith(b"\n")
            parts = (line[:-1] if ended else line).split(RS)
            head, frames = parts[0], parts[1:]
            if head.strip():
                if not frames and ended:  # a line written before the framing
                    doc = _parse(head)
                    yield (n, doc, None) if doc is not None else (n, None, "not a JSON object")
                    continue
                yield n, None, "torn record (cut short, the next record follows it)" if frames else "torn last line"
            for i, part in enumerate(frames):
                if i < len(frames) - 1:
                    yield n, None, "torn record (cut short, the next record follows it)"
                elif not ended:
                    yield n, None, "torn last line"
                else:
                    doc = _parse(part)
                    yield (n, doc, None) if doc is not None else (n, None, "not a JSON object")


def _set_aside(path: Path, why: str) -> Path | None:
    """Rename a file with bad lines out of the way (kept for inspection): <file>.torn, .torn.1, ..."""
    for i in range(1000):
        dest = path.with_name(path.name + ".torn" + (f".{i}" if i else ""))
        if not dest.exists():
            try:
                os.replace(path, dest)
            except OSError as e:
                logger.error("OpenFlare recorder: cannot set aside %s (%s): %s", path, why, e)
                return None
            return dest
    return None


class SpillFile:
    """The records not yet in the store: the journal's segments, `<file>.<n>` (older) then `<file>`, each
    framed; read back in order, bad lines skipped, logged and listed in `bad` ((file, line, why))."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.bad: list[tuple[str, int, str]] = []

    def segments(self) -> list[Path]:
        sealed = []
        for p in self.path.parent.glob(self.path.name + ".*"):
            n = p.name[len(self.path.name) + 1 :]
            if n.isdigit():
                sealed.append((int(n), p))
        out = [p for _, p in sorted(sealed)]
        if self.path.exists():
            out.append(self.path)
        return out

    def pending(self) -> bool:
        for p in self.segments():
            try:
                if p.stat().st_size > 0:
                    return True
            except FileNotFoundError:
                pass
        return False

    def append(self, docs: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(frame(d) for d in docs)
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def read(self, batch: int) -> Iterator[list[dict]]:
        """Batches in file order across the segments. A bad line is skipped with a warning."""
        out: list[dict] = []
        for seg in self.segments():
            try:
                for n, doc, why in read_frames(seg):
                    if doc is None:
                        self.bad.append((str(seg), n, why or "bad"))
                        logger.warning("OpenFlare recorder: %s at line %d of %s skipped", why, n, seg)
                        continue
                    out.append(doc)
                    if len(out) >= batch:
                        yield out
                        out = []
            except FileNotFoundError:
                continue
        if out:
            yield out

    def clear(self) -> None:
        for p in self.segments():
            p.unlink(missing_ok=True)


class Journal:
    """This run's write-ahead journal of chained records, owned by one writer thread at a time.

    `append` writes a batch with one write(2) (and fsync with `fsync`): once it returns, the records are
    in the kernel's page cache and survive the process being killed (-9); with fsync they survive a
    power cut too. A failed or short write (a full disk) is cut back off the file, so the file never
    keeps half a record; if even that fails, the reader sees a torn record and skips it. Segments whose
    records are all stored (`tidy(stored_seq)`) are deleted; the current one is emptied.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.fd: int | None = None
        self.size = 0
        self.last_seq: int | None = None  # of the current segment
        self.sealed: list[list] = []  # [path, last_seq, torn]
        self.torn = False  # a write of the current segment could not be cut back
        self.next_n = 1
        self.hold = 0  # > 0 while the store side reads the segments: no rotation, emptying or deletion

    def start(self) -> list[Path]:
        """Seal what a previous run left (it is replayed, not appended to) and return every leftover
        segment, oldest first."""
        spill = SpillFile(self.path)
        nums = [int(p.name[len(self.path.name) + 1 :]) for p in spill.segments() if p != self.path]
        self.next_n = max(nums, default=0) + 1
        if self.path.exists():
            if self.path.stat().st_size > 0:
                os.replace(self.path, self._sealed_name())
            else:
                self.path.unlink()
        return spill.segments()

    def _sealed_name(self) -> Path:
        p = self.path.with_name(f"{self.path.name}.{self.next_n}")
        self.next_n += 1
        return p

    def _open(self) -> int:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self.size = os.fstat(self.fd).st_size
        return self.fd

    def append(self, data: bytes, last_seq: int) -> None:
        """Write `data` (framed records up to seq `last_seq`) whole, or raise OSError leaving none of it."""
        fd = self._open()
        size = self.size
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "short write")
                view = view[n:]
            if self.fsync:
                os.fdatasync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                self.torn = True
                self.size = os.fstat(fd).st_size
            raise
        self.size = size + len(data)
        self.last_seq = last_seq

    def files(self) -> list[Path]:
        return [s[0] for s in self.sealed] + ([self.path] if self.fd is not None else [])

    def tidy(self, stored_seq: int) -> None:
        """Delete segments whose records are all stored, empty the current one if so, start a new one
        past SEGMENT_BYTES. A segment with a torn record is set aside instead of deleted."""
        if self.hold:
            return
        keep = []
        for seg in self.sealed:
            if seg[1] is None or seg[1] <= stored_seq:
                if seg[2]:
                    _set_aside(seg[0], "a torn record")
                else:
                    seg[0].unlink(missing_ok=True)
            else:
                keep.append(seg)
        self.sealed = keep
        if self.fd is None:
            return
        if self.size and (self.last_seq is None or self.last_seq <= stored_seq) and not self.torn:
            try:
                os.ftruncate(self.fd, 0)
                self.size = 0
                self.last_seq = None
            except OSError as e:
                logger.warning("OpenFlare recorder: cannot empty the journal %s: %s", self.path, e)
        elif self.size >= SEGMENT_BYTES or (self.torn and self.size):
            self.seal()

    def seal(self) -> None:
        if self.fd is None:
            return
        os.close(self.fd)
        self.fd = None
        if self.size:
            dest = self._sealed_name()
            os.replace(self.path, dest)
            self.sealed.append([dest, self.last_seq, self.torn])
        self.torn = False
        self.size = 0
        self.last_seq = None

    def close(self, stored_seq: int) -> None:
        self.tidy(stored_seq)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if self.size == 0:
                self.path.unlink(missing_ok=True)


# --- the writer ---------------------------------------------------------------------------------------


class Writer:
    """Builds, chains, journals and delivers records.

    Two sides, each run by one thread at a time:
    * `journal(captures)` (the journal side, lock `jlock`): build, mask, chain and append to the journal
      file; once it returns True the records survive a killed proxy: the Recorder releases the responses
      only then. On a full disk the records are held in memory (up to `hold`), the chain rolled back, and
      written when the disk has room again; what does not fit is lost, counted, logged, and noted in the
      chain by a gap record.
    * `deliver()` (the store side, lock `lock`): insert the journaled records (from memory; from the
      journal files when memory did not keep them or the store was down), replay leftovers of earlier
      runs, retry an unreachable store with backoff. The journal is the spill file: what the store has
      taken is deleted from it (`tidy`).
    `overflow` is called from the event loop when the Recorder's queue is full.
    """

    def __init__(
        self,
        store: Store,
        spill_path: str | os.PathLike,
        instance: str,
        masker: Masker | None = None,
        batch: int = 500,
        days: int = 30,
        key: bytes | None = None,
        fsync: bool = False,
        hold: int = 10000,
    ) -> None:
        self.store = store
        self.spill = SpillFile(spill_path)
        self.overflow_path = Path(str(spill_path) + ".overflow")
        self.rejected_path = Path(str(spill_path) + ".rejected")
        self.chain = Chain(instance, key)
        self.masker = masker or Masker()
        self.batch = batch
        self.days = days
        self.hold = hold
        self.lock = threading.Lock()  # the store side
        self.jlock = threading.Lock()  # the journal side: chain, journal file, held records
        self.file = Journal(spill_path, fsync)
        self.leftovers: list[Path] = self.file.start()  # earlier runs' segments, replayed first
        self.ready: collections.deque = collections.deque()  # journaled records for the store, in seq order
        self.journaled_seq = -1  # the last seq in the journal
        self.stored_seq = -1  # every seq up to this one is in the store (or set aside as rejected)
        self.held: list[dict] = []  # built records the journal could not take (full disk), oldest first
        self.gap: dict | None = None  # records dropped while held was full: {"lost", "first", "last", "reason"}
        self._journal_error_logged = 0.0
        self._overflow_lock = threading.Lock()
        self._overflow_file = None
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN_S
        self._down = False
        self._indexed = False
        self._expire_at = 0.0
        self.stats = {"records": 0, "journaled": 0, "stored": 0, "spilled": 0, "replayed": 0, "duplicates": 0, "overflowed": 0,
                      "rejected": 0, "lost": 0, "disk_full": 0, "torn": 0, "unacknowledged": 0}

    # the journal side ---------------------------------------------------------------------------------
    def journal(self, captures: list[dict], wait: bool = True) -> bool | None:
        """Build, chain and journal `captures`; empties the list. True when they are in the journal; None
        (and nothing done) when `wait` is false and the other side holds the journal lock."""
        if not self.jlock.acquire(blocking=wait):
            return None
        try:
            docs = []
            for cap in captures:
                try:
                    docs.append(build(cap, self.masker))
                except Exception as e:  # noqa: BLE001 - one bad capture must not stop the others
                    self.stats["lost"] += 1
                    logger.error("OpenFlare recorder lost a record it could not build: %s: %s", type(e).__name__, e)
            captures.clear()
            self.stats["records"] += len(docs)
            return self._journal(docs)
        finally:
            self.jlock.release()

    def _journal(self, docs: list[dict], hold: bool = True) -> bool:
        """Chain and append held records, the gap note, then `docs`. On failure the chain is rolled back
        and `docs` are held (`hold`) or left to the caller."""
        if not docs and not self.held and not self.gap:
            return True
        todo = list(self.held)
        if self.gap:
            g = self.gap
            todo.append(gap_record(g["lost"], g["first"], g["last"], g["reason"]))
        todo.extend(docs)
        state = self.chain.state()
        try:
            data = b"".join(frame(self.chain.link(d)) for d in todo)
            self.file.append(data, self.chain.seq - 1)
        except OSError as e:
            self.chain.restore(state)
            self._journal_failed(docs if hold else [], e)
            return False
        if self.held or self.gap:
            logger.warning("OpenFlare recorder: the journal %s takes records again: %d held records written%s", self.file.path,
                           len(self.held), f", {self.gap['lost']} lost records noted in the chain (gap)" if self.gap else "")
        self.held = []
        self.gap = None
        self._journal_error_logged = 0.0
        self.stats["journaled"] += len(todo)
        if len(self.ready) < self.hold:
            self.ready.extend(todo)  # else the store side reads them from the journal
        self.journaled_seq = self.chain.seq - 1
        self.file.tidy(self.stored_seq)
        return True

    def _journal_failed(self, docs: list[dict], e: OSError) -> None:
        full = e.errno in DISK_FULL_ERRNOS
        if full:
            self.stats["disk_full"] += 1
        room = max(0, self.hold - len(self.held))
        self.held.extend(docs[:room])
        dropped = docs[room:]
        first_loss = bool(dropped) and self.gap is None
        if dropped:
            self.stats["lost"] += len(dropped)
            g = self.gap or {"lost": 0, "first": dropped[0]["time"], "last": None,
                             "reason": f"disk full: {e.strerror or e} writing {self.file.path}" if full else f"journal write failed: {e}"}
            g["lost"] += len(dropped)
            g["last"] = dropped[-1]["time"]
            self.gap = g
        now = time.monotonic()
        if first_loss or now - self._journal_error_logged >= LOG_EVERY_S:
            self._journal_error_logged = now
            logger.error(
                "OpenFlare recorder: %s the journal %s (%s): %d records held in memory, %d lost so far (noted in the "
                "chain as a gap). Free space there.", "DISK FULL writing" if full else "cannot write", self.file.path,
                e.strerror or e, len(self.held), self.gap["lost"] if self.gap else 0,
            )

    # the store side ------------------------------------------------------------------------------------
    def deliver(self) -> None:
        """Insert what the journal holds that the store has not taken yet."""
        with self.lock:
            self._deliver()
        if self.jlock.acquire(blocking=False):  # empty the journal of what the store took (else the next append does)
            try:
                self.file.tidy(self.stored_seq)
            finally:
                self.jlock.release()

    def write(self, captures: list[dict]) -> None:
        """Journal then deliver `captures` in the calling thread (the final flush, tests)."""
        self.journal(captures)
        self.deliver()

    def _deliver(self, force: bool = False) -> None:
        if self._down or self.leftovers:
            if force or time.monotonic() >= self._retry_at:
                self._recover()
            if self._down:
                self._drop_ready()
                return
        budget = len(self.ready)  # what is there now: a steady flow of new records must not keep this call going
        while self.ready and budget > 0:
            docs = []
            while self.ready and budget > 0 and len(docs) < self.batch:
                budget -= 1
                d = self.ready.popleft()
                if d["seq"] > self.stored_seq:
                    docs.append(d)
            if not docs:
                continue
            if docs[0]["seq"] != self.stored_seq + 1:  # memory did not keep them: from the journal
                self._catch_up(docs[0]["seq"] - 1)
                if self._down:
                    self.stats["spilled"] += len(docs)
                    self._drop_ready()
                    return
            if not self._store(docs, "stored"):
                self.stats["spilled"] += len(docs)
                self._drop_ready()
                return
        if self.journaled_seq > self.stored_seq and not self.ready:
            self._catch_up(self.journaled_seq)

    def _store(self, docs: list[dict], counter: str) -> bool:
        """Insert one batch of this run's chain; False (and marked down) when the store is unreachable."""
        try:
            self._ensure_indexes()
            self._insert(docs, counter)
        except StoreUnavailable as e:
            self._mark_down(e)
            return False
        except Exception as e:  # noqa: BLE001 - a document the store cannot take: keep it aside
            logger.error("OpenFlare recorder: the store failed on a batch (%s: %s)", type(e).__name__, e)
            self._reject(docs)
        self.stored_seq = max(self.stored_seq, docs[-1]["seq"])
        return True

    def _drop_ready(self) -> None:
        """The store is down: what waits in memory is in the journal already; it is read back from there."""
        n = len(self.ready)
        self.ready.clear()
        self.stats["spilled"] += n

    def _catch_up(self, upto: int) -> None:
        """Store this run's journaled records after `stored_seq` up to `upto`, read from the journal files."""
        with self.jlock:
            self.file.hold += 1
            files = self.file.files()
        try:
            docs: list[dict] = []
            for path in files:
                try:
                    for _, doc, _why in read_frames(path):
                        if doc is None or doc.get("chain") != self.chain.id:
                            continue  # a torn record is counted where the journal failed; one being written is read later
                        seq = doc.get("seq")
                        if not isinstance(seq, int) or seq <= self.stored_seq or seq > upto:
                            continue
                        docs.append(doc)
                        if len(docs) >= self.batch:
                            if not self._store(docs, "replayed"):
                                return
                            docs = []
                except FileNotFoundError:
                    continue
            if docs and not self._store(docs, "replayed"):
                return
            self.stored_seq = max(self.stored_seq, upto)
        finally:
            with self.jlock:
                self.file.hold -= 1

    def _recover(self) -> None:
        """Ping the store; replay earlier runs' leftovers and this run's journal; back up when all went in."""
        try:
            self.store.ping()
            self._ensure_indexes()
        except StoreUnavailable as e:
            self._mark_down(e)
            return
        for path in list(self.leftovers):
            if not self._replay_file(path):
                return
            self.leftovers.remove(path)
        was_down = self._down
        self._down = False
        if was_down and self.journaled_seq > self.stored_seq:  # what memory dropped while the store was down
            self._catch_up(self.journaled_seq)
        if self._down:
            return
        if was_down:
            logger.info("OpenFlare recorder: %s is back; the journal's records are stored", self.store.description)
        self._retry_delay = RETRY_MIN_S

    def _replay_file(self, path: Path) -> bool:
        """Insert every good record of a leftover segment, then delete it (or set it aside when it had
        bad lines: counted, logged). False when the store went away meanwhile (the file stays)."""
        docs: list[dict] = []
        bad: list[tuple[int, str]] = []
        n = 0
        try:
            frames = list(read_frames(path))
        except FileNotFoundError:
            return True
        except OSError as e:
            logger.error("OpenFlare recorder: cannot read %s: %s", path, e)
            return True
        for line, doc, why in frames:
            if doc is None:
                bad.append((line, why or "bad"))
                continue
            docs.append(doc)
            if len(docs) >= self.batch:
                if not self._replay_batch(docs):
                    return False
                n += len(docs)
                docs = []
        if docs:
            if not self._replay_batch(docs):
                return False
            n += len(docs)
        if bad:
            self.stats["torn"] += len(bad)
            dest = _set_aside(path, "bad lines")
            logger.warning("OpenFlare recorder: %s had %d bad line(s) (%s); the other %d records are stored; the file is set "
                           "aside as %s", path, len(bad), "; ".join(f"line {ln}: {w}" for ln, w in bad[:5]), n, dest)
        else:
            path.unlink(missing_ok=True)
            if n:
                logger.info("OpenFlare recorder: replayed %d records from %s", n, path)
        return True

    def _replay_batch(self, docs: list[dict]) -> bool:
        try:
            self._insert(docs, "replayed")
        except StoreUnavailable as e:
            self._mark_down(e)
            return False
        except Exception as e:  # noqa: BLE001 - a batch the store cannot take: keep it aside
            logger.error("OpenFlare recorder: the store failed on a spilled batch (%s: %s)", type(e).__name__, e)
            self._reject(docs)
        return True

    def _insert(self, docs: list[dict], counter: str) -> None:
        inserted, dup, rejected = self.store.insert(docs)
        self.stats[counter] += inserted
        self.stats["duplicates"] += dup
        if rejected:
            self._reject(rejected)

    def _reject(self, docs: list[dict]) -> None:
        self.stats["rejected"] += len(docs)
        logger.error("OpenFlare recorder: the store rejected %d records; kept in %s", len(docs), self.rejected_path)
        try:
            SpillFile(self.rejected_path).append(docs)
        except (OSError, TypeError, ValueError) as e:
            self.stats["lost"] += len(docs)
            logger.error("OpenFlare recorder lost %d rejected records: %s", len(docs), e)

    def _mark_down(self, e: Exception) -> None:
        if not self._down:
            logger.warning("OpenFlare recorder: %s unreachable (%s); records wait in the journal %s", self.store.description, e, self.spill.path)
        self._down = True
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_S)

    def _ensure_indexes(self) -> None:
        if not self._indexed:
            self.store.ensure_indexes(self.days)
            self._indexed = True

    def maintain(self, force_replay: bool = False) -> None:
        """Chain what overflowed, retry held records, deliver, apply retention to the embedded store."""
        with self.jlock:
            self._take_overflow()
            if self.held or self.gap:
                self._journal([])
            self.file.tidy(self.stored_seq)
        with self.lock:
            self._deliver(force=force_replay)
            if self.store.kind == "embedded" and self.days > 0 and not self._down and time.monotonic() >= self._expire_at:
                self._expire_at = time.monotonic() + EXPIRE_EVERY_S
                try:
                    n = self.store.expire(self.days)
                    if n:
                        logger.info("OpenFlare recorder: retention removed %d records older than %d days", n, self.days)
                except Exception as e:  # noqa: BLE001 - retention is retried next hour
                    logger.warning("OpenFlare recorder: retention failed: %s", e)
        with self.jlock:
            self.file.tidy(self.stored_seq)

    def _take_overflow(self) -> None:
        taking = Path(str(self.overflow_path) + ".taking")
        with self._overflow_lock:
            if self._overflow_file is not None:
                self._overflow_file.close()
                self._overflow_file = None
            if not taking.exists() and self.overflow_path.exists():
                os.replace(self.overflow_path, taking)
        if not taking.exists():
            return
        docs = []
        for _, cap, why in read_frames(taking):
            if cap is None:
                self.stats["torn"] += 1
                logger.warning("OpenFlare recorder: %s in %s skipped", why, taking)
                continue
            try:
                docs.append(build(cap, self.masker))
            except Exception as e:  # noqa: BLE001
                self.stats["lost"] += 1
                logger.error("OpenFlare recorder lost a record it could not build: %s: %s", type(e).__name__, e)
        if self._journal(docs, hold=False):  # else the file stays, and is taken again next time
            self.stats["records"] += len(docs)
            taking.unlink()

    def close(self) -> None:
        """The final flush: overflow, one replay attempt, then close the journal and the store."""
        self.maintain(force_replay=True)
        with self.jlock:
            self.file.close(self.stored_seq)
        self.store.close()

    # called on the event loop --------------------------------------------------------------------------
    def overflow(self, capture: dict) -> None:
        """The queue is full: append the capture to the overflow file instead of blocking."""
        try:
            line = frame(capture)
            with self._overflow_lock:
                if self._overflow_file is None:
                    self.overflow_path.parent.mkdir(parents=True, exist_ok=True)
                    self._overflow_file = open(self.overflow_path, "ab")
                self._overflow_file.write(line)
                self._overflow_file.flush()
            self.stats["overflowed"] += 1
        except (OSError, TypeError, ValueError) as e:
            self.stats["lost"] += 1
            logger.error("OpenFlare recorder lost a record: queue full and overflow file failed: %s", e)


# --- export to the dataset format --------------------------------------------------------------------

_TARGET_SAFE = b"!$&'()*+,/:;=?@-._~%"


def wire_target(target: bytes) -> str:
    """A request-target with every byte RFC 3986 does not allow raw percent-encoded (as the datasets)."""
    out = quote_from_bytes(target, safe=_TARGET_SAFE)
    # a `%` not starting a valid escape becomes %25
    return re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", out)


def to_dataset(rec: dict, split: str = "train") -> dict | None:
    """A full record as one line of ../shared/datasets format, plus record fields; None for brief ones."""
    if rec.get("tier") != TIER_FULL:
        return None
    # An operator's label comes from the labels collection (its documents carry no chain); a label found
    # in a chained record was written into the records collection by someone else (verify-log reports it).
    label = None if "chain" in rec else rec.get("label")
    if label in ("attack", "benign"):
        source = "operator"
    else:
        label = "attack" if rec.get("verdict") == "block" else "benign"
        source = "verdict" if rec.get("local_score") is not None or rec.get("score") is not None else (rec.get("refused_by") or "verdict")
    category = (rec.get("category") or "other") if label == "attack" else "benign"
    target = wire_target(raw(rec.get("target") or "", bool(rec.get("target_b64"))))
    headers = []
    for name, value in header_pairs(rec):
        if name.lower() == b"content-length":
            continue
        headers.append([name.decode("utf-8", "replace") if _is_utf8(name) else name.decode("latin-1"),
                        value.decode("utf-8") if _is_utf8(value) else value.decode("latin-1")])
    out = {
        "id": f"openflare-{str(rec.get('_id'))[:20]}",
        "source": "openflare",
        "split": split,
        "label": label,
        "category": category,
        "method": rec.get("method") or "GET",
        "target": target or "/",
        "headers": headers,
        "body": rec.get("body") or "",
    }
    if rec.get("body_b64"):
        out["body_b64"] = True
    out.update(
        verdict=rec.get("verdict"),
        score=rec.get("score"),
        local_score=rec.get("local_score"),
        llm_score=rec.get("llm_score"),
        model_version=rec.get("model_version"),
        time=time_text(rec.get("time")),
        client_ip=rec.get("client_ip"),
        label_source=source,
        meta={
            "record_id": rec.get("_id"),
            "chain": rec.get("chain"),
            "seq": rec.get("seq"),
            "refused_by": rec.get("refused_by"),
            "sampled": rec.get("sampled"),
            "body_truncated": rec.get("body_truncated"),
        },
    )
    return out


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def store_from_args(uri: str | None, directory: str | None, create: bool = False) -> Store:
    """For scripts: --uri, else OPENFLARE_MONGO_URI, else the embedded store in --dir (which must exist
    unless `create`: a reader pointed at a typo says so instead of reading an empty store it made)."""
    uri = uri or os.environ.get("OPENFLARE_MONGO_URI") or None
    return open_store(uri=uri, directory=None if uri else (directory or "data/records"), create=create)
