"""The week in one HTML file: `openflare report --since 7d --out report.html` (`make report`).

A plain module (no mitmproxy): reads the record store (MongoDB, or the embedded store straight from its
SQLite file) once, as a stream, into bounded aggregates (`Aggregate`), then writes one self-contained HTML
page: no script, style sheet, font or image from anywhere else, the plots inline SVG (matplotlib).

What it shows: traffic over time (passed and refused, per hour, or per day past eight days), refusals by
reason and by attack category, the top refused client IPs and paths, the score distribution, refusals of
banned clients over time, the model versions (their cards, and the records each one scored), and the review
queue: the passed requests nearest the threshold and the refused ones nearest it, each with the field and
signal that decided and the `openflare label ...` commands to confirm or correct it.

Privacy as in the recorder: a passed flow's brief record (time, IP, verdict, score) is only counted; requests
are shown only from full records (refused ones, and passed ones sampled by openflare_record_benign_one_in),
and only their method and target, masked as recorded; never headers or bodies.

Memory is bounded whatever the store holds: counts per hour (the retention window's hours), per score, per
reason; client IPs, paths, categories and model versions in capped counters (`TopCounter`: past the cap,
the rarest are dropped and the table says its counts are approximate); the review queue in two heaps.
"""

from __future__ import annotations

import dataclasses
import datetime
import heapq
import html
import io
import json
import os
import struct
import time
from collections.abc import Iterable, Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any

from addons import records

EPOCH = datetime.datetime(1970, 1, 1)
HOUR = 3600
TOP = 20  # rows of the top-N tables
QUEUE = 25  # requests on each side of the threshold in the review queue
TOP_CAP = 20_000  # distinct keys a TopCounter keeps (twice that before it prunes)
DAILY_AFTER_H = 200  # past this many hours of span (8 days), traffic is plotted per day
TARGET_SHOWN = 300  # characters of a request target shown
PROG = "openflare"
PARALLEL_MIN_ROWS = 10_000  # a smaller embedded store is read by one process
LABEL_KEY, STORE_KEY = "openflare.report.label", "openflare.report.store"  # set on a queued record by `build`


class TopCounter:
    """Counts per key with bounded memory: past 2 x cap keys, only the cap most frequent are kept.

    Exact while a run sees at most 2 x cap distinct keys; after a prune (`approximate`), a kept key's count may
    miss what it had before it was last dropped, at most `floor` (the largest count ever dropped).
    """

    def __init__(self, cap: int = TOP_CAP) -> None:
        self.cap = cap
        self.counts: dict[Any, int] = {}
        self.floor = 0
        self.approximate = False

    def add(self, key: Any, n: int = 1) -> None:
        c = self.counts
        c[key] = c.get(key, 0) + n
        if len(c) > 2 * self.cap:
            keep = heapq.nlargest(self.cap, c.items(), key=itemgetter(1))
            self.floor = max(self.floor, max(v for k, v in c.items() if k not in dict(keep)) if len(keep) < len(c) else 0)
            self.counts = dict(keep)
            self.approximate = True

    def merge(self, other: "TopCounter") -> None:
        for key, n in other.counts.items():
            self.add(key, n)
        self.floor = max(self.floor, other.floor)
        self.approximate = self.approximate or other.approximate

    def top(self, n: int) -> list[tuple[Any, int]]:
        return heapq.nlargest(n, self.counts.items(), key=lambda kv: (kv[1], str(kv[0])))

    def total(self) -> int:
        return sum(self.counts.values())


@dataclasses.dataclass
class Entry:
    """One request of the review queue (from a full record)."""

    id: str
    time: datetime.datetime | None
    client_ip: str | None
    method: str | None
    target: str
    verdict: str | None
    refused_by: str | None
    score: int | None
    local_score: int | None
    llm_score: int | None
    category: str | None
    field: list | None
    signal: str | None
    explanation: str | None
    model_version: str | None
    label: str | None = None  # the operator's label, if it has one
    store_args: str = ""  # the `openflare` flags naming its store (`--record-dir ...`), for the label commands

    @classmethod
    def of(cls, rec: dict) -> "Entry":
        target = "(binary target)" if rec.get("target_b64") else str(rec.get("target") or "")
        if len(target) > TARGET_SHOWN:
            target = target[:TARGET_SHOWN] + "…"
        return cls(str(rec.get("_id")), rec.get("time"), rec.get("client_ip"), rec.get("method"), target, rec.get("verdict"),
                   rec.get("refused_by"), rec.get("score"), rec.get("local_score"), rec.get("llm_score"), rec.get("category"),
                   rec.get("field"), rec.get("signal"), rec.get("explanation"), rec.get("model_version"), rec.get(LABEL_KEY),
                   rec.get(STORE_KEY) or "")  # fmt: skip


class Queue:
    """The `size` requests nearest the threshold (smallest distance, then the most recent), in a heap."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.heap: list[tuple[int, float, int, dict]] = []  # (-distance, time, n, record): the root is the worst kept
        self.n = 0
        self.seen = 0

    def offer(self, distance: int, ts: float, rec: dict) -> None:
        self.seen += 1
        self.n += 1
        item = (-distance, ts, self.n, rec)
        if len(self.heap) < self.size:
            heapq.heappush(self.heap, item)
        elif item[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, item)

    def merge(self, other: "Queue") -> None:
        for d, ts, _, rec in other.heap:
            self.offer(-d, ts, rec)
        self.seen += other.seen - len(other.heap)

    def entries(self) -> list[tuple[int, Entry]]:
        """(distance, entry), nearest first, then the most recent."""
        return [(-d, Entry.of(rec)) for d, _, _, rec in sorted(self.heap, key=lambda x: (-x[0], -x[1]))]


class Aggregate:
    """Everything the report shows, added one record at a time."""

    def __init__(self, threshold: int, queue: int = QUEUE, cap: int = TOP_CAP) -> None:
        self.threshold = threshold
        self.records = 0
        self.verdicts: dict[str, int] = {}
        self.tiers: dict[str, int] = {}
        self.passed = 0
        self.refused = 0
        self.detect_only = 0  # scored above the threshold, forwarded (openflare_detect_only)
        self.hours: dict[int, list[int]] = {}  # hour -> [passed, refused, refused for a ban]
        self.reasons: dict[str, int] = {}
        self.categories = TopCounter(cap)
        self.ips = TopCounter(cap)
        self.paths = TopCounter(cap)
        self.versions = TopCounter(cap)
        self.version_times: dict[str, list[float]] = {}  # version -> [first, last] (only for kept versions)
        self.scores = {"passed": [0] * 11, "refused": [0] * 11}  # index 0: unscored
        self.gaps = 0
        self.lost = 0
        self.first: float | None = None
        self.last: float | None = None
        self.near_pass = Queue(queue)
        self.near_refused = Queue(queue)

    def add(self, rec: dict) -> None:
        tier = rec.get("tier")
        if tier == records.TIER_GAP:
            self.gaps += 1
            self.lost += int(rec.get("lost") or 0)
            return
        self.records += 1
        t = rec.get("time")
        ts = (t - EPOCH).total_seconds() if isinstance(t, datetime.datetime) else 0.0
        if self.first is None or ts < self.first:
            self.first = ts
        if self.last is None or ts > self.last:
            self.last = ts
        verdict = rec.get("verdict") or "unscored"
        self.verdicts[verdict] = self.verdicts.get(verdict, 0) + 1
        self.tiers[tier] = self.tiers.get(tier, 0) + 1
        refused_by = rec.get("refused_by")
        refused = refused_by is not None and tier == records.TIER_FULL
        hour = self.hours.get(int(ts) // HOUR)
        if hour is None:
            hour = self.hours[int(ts) // HOUR] = [0, 0, 0]
        score = rec.get("score")
        s = score if isinstance(score, int) and 1 <= score <= 10 else 0
        if refused:
            self.refused += 1
            hour[1] += 1
            if refused_by == "ban":
                hour[2] += 1
            self.reasons[refused_by] = self.reasons.get(refused_by, 0) + 1
            self.scores["refused"][s] += 1
            self.ips.add(rec.get("client_ip") or "(none)")
            self.paths.add("(binary target)" if rec.get("target_b64") else str(rec.get("target") or "").split("?", 1)[0][:TARGET_SHOWN])
            if refused_by == "score":
                self.categories.add(rec.get("category") or "(none named)")
        else:
            self.passed += 1
            hour[0] += 1
            self.scores["passed"][s] += 1
            if verdict == "block":
                self.detect_only += 1
        if tier == records.TIER_FULL:
            v = rec.get("model_version")
            if v:
                self.versions.add(v)
                span = self.version_times.get(v)
                if span is None:
                    self.version_times[v] = [ts, ts]
                else:
                    span[0], span[1] = min(span[0], ts), max(span[1], ts)
                if len(self.version_times) > 2 * self.versions.cap:
                    self.version_times = {k: self.version_times[k] for k in self.versions.counts if k in self.version_times}
            if s:
                if refused_by == "score" and s > self.threshold:
                    self.near_refused.offer(s - self.threshold - 1, ts, _slim(rec))
                elif refused_by is None and verdict == "pass" and s <= self.threshold:
                    self.near_pass.offer(self.threshold - s, ts, _slim(rec))


    def merge(self, other: "Aggregate") -> None:
        """Add another aggregate of other records (a worker's share of the store) to this one."""
        for name in ("records", "passed", "refused", "detect_only", "gaps", "lost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.verdicts, other.verdicts), (self.tiers, other.tiers), (self.reasons, other.reasons)):
            for k, n in theirs.items():
                mine[k] = mine.get(k, 0) + n
        for h, counts in other.hours.items():
            row = self.hours.setdefault(h, [0, 0, 0])
            for i, n in enumerate(counts):
                row[i] += n
        for side in ("passed", "refused"):
            self.scores[side] = [a + b for a, b in zip(self.scores[side], other.scores[side])]
        for mine, theirs in ((self.categories, other.categories), (self.ips, other.ips), (self.paths, other.paths),
                             (self.versions, other.versions)):  # fmt: skip
            mine.merge(theirs)
        for v, (lo, hi) in other.version_times.items():
            span = self.version_times.get(v)
            self.version_times[v] = [lo, hi] if span is None else [min(span[0], lo), max(span[1], hi)]
        self.first = min((x for x in (self.first, other.first) if x is not None), default=None)
        self.last = max((x for x in (self.last, other.last) if x is not None), default=None)
        self.near_pass.merge(other.near_pass)
        self.near_refused.merge(other.near_refused)


_KEPT = ("_id", "time", "client_ip", "method", "target", "target_b64", "verdict", "refused_by", "score", "local_score",
         "llm_score", "category", "field", "signal", "explanation", "model_version")  # fmt: skip


def _slim(rec: dict) -> dict:
    """What the review queue keeps of a record (never headers or body)."""
    out = {k: rec.get(k) for k in _KEPT}
    if isinstance(out["target"], str) and len(out["target"]) > TARGET_SHOWN + 1:
        out["target"] = out["target"][: TARGET_SHOWN + 1]
    return out


# ---- reading the store: one stream -------------------------------------------------------------------


def iter_records(store: records.Store, since: datetime.datetime | None = None) -> Iterator[dict]:
    """Every record (time >= since) without headers and body, streamed: MongoDB with a projection and its
    time index; the embedded store straight from montydb's SQLite rows (its own cursor loads every key first)."""
    if store.kind == "embedded":
        yield from _iter_embedded(store, since)
        return
    query = {"time": {"$gte": since}} if since is not None else {}
    yield from store.coll.find(query, {"headers": 0, "body": 0}, batch_size=5000)


def embedded_path(store: records.Store) -> str:
    """The SQLite file montydb keeps a collection in."""
    sub = store.coll._storage
    for inst in store.coll._components:
        sub = sub.contractor_cls(sub, inst)
    return sub._database._col_path(sub._name)


def _iter_embedded(store: records.Store, since: datetime.datetime | None) -> Iterator[dict]:
    path = embedded_path(store)
    if os.path.isfile(path):
        yield from _iter_sqlite(path, since)


def _rowid_range(path: str) -> tuple[int, int] | None:
    import sqlite3

    from montydb.storage import sqlite as monty_sqlite

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        lo, hi = conn.execute(f"SELECT min(rowid), max(rowid) FROM [{monty_sqlite.SQLITE_RECORD_TABLE}]").fetchone()
    finally:
        conn.close()
    return None if lo is None else (lo, hi)


def _iter_sqlite(path: str, since: datetime.datetime | None, rows_from: int | None = None, rows_to: int | None = None) -> Iterator[dict]:
    """The records of montydb's SQLite file (rowids rows_from..rows_to when given), decoded but those older than `since`."""
    import sqlite3

    import bson
    from montydb.storage import sqlite as monty_sqlite

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    opts = bson.CodecOptions(tz_aware=False)
    decode = bson.decode
    since_ms = None if since is None else int((since - EPOCH).total_seconds() * 1000)
    try:
        sql = f"SELECT v FROM [{monty_sqlite.SQLITE_RECORD_TABLE}]"
        if rows_from is not None:
            sql += f" WHERE rowid BETWEEN {int(rows_from)} AND {int(rows_to)}"
        cur = conn.execute(sql)
        while rows := cur.fetchmany(5000):
            for (v,) in rows:
                if since_ms is not None:
                    ms = bson_time_ms(v)
                    if ms is not None and ms < since_ms:
                        continue  # older: not decoded at all
                rec = decode(v, codec_options=opts)
                if since is None or (rec.get("time") is not None and rec["time"] >= since):
                    yield rec
    finally:
        conn.close()


_I32 = struct.Struct("<i").unpack_from
_I64 = struct.Struct("<q").unpack_from


def bson_time_ms(doc: bytes, within: int = 4) -> int | None:
    """The `time` field (a BSON datetime, ms since the epoch) of a record's BSON, read without decoding it, when
    it is among the first `within` elements (the recorder writes _id, tier, time first); else None."""
    pos, end = 4, len(doc) - 1
    for _ in range(within):
        if pos >= end:
            return None
        kind = doc[pos]
        nul = doc.find(b"\x00", pos + 1)
        if nul < 0:
            return None
        name, p = doc[pos + 1 : nul], nul + 1
        if kind == 0x09:
            if name == b"time":
                return _I64(doc, p)[0]
            p += 8
        elif kind == 0x02:
            p += 4 + _I32(doc, p)[0]
        elif kind in (0x10,):
            p += 4
        elif kind in (0x01, 0x12, 0x11):
            p += 8
        elif kind == 0x08:
            p += 1
        elif kind == 0x0A:
            pass
        else:
            return None
        pos = p
    return None


def labels_of(store: records.Store, ids: list[str]) -> dict[str, str]:
    """The operator labels (`labels` collection) of these record ids."""
    if not ids:
        return {}
    coll = store.coll.database["labels"]
    if store.kind == "embedded" and "labels" not in store.coll.database.list_collection_names():
        return {}
    return {d["_id"]: d.get("label") for d in coll.find({"_id": {"$in": ids}})}


# ---- model cards -------------------------------------------------------------------------------------


def model_cards(current: Path | None) -> list[dict]:
    """The serving model's card and the history's (models/history/, kept by `make retrain`), oldest first;
    each with `serving` true for the current one."""
    if current is None:
        return []
    from addons import model

    cards: dict[str, dict] = {}
    for p in sorted((current.parent / "history").glob("*" + model.CARD_SUFFIX)):
        try:
            card = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(card, dict):
            cards[str(card.get("version"))] = {**card, "serving": False}
    try:
        card = json.loads(model.card_path(current).read_text())
        if isinstance(card, dict):
            cards[str(card.get("version"))] = {**card, "serving": True}
    except (OSError, ValueError):
        pass
    return sorted(cards.values(), key=lambda c: str(c.get("created", "")))


# ---- plots -------------------------------------------------------------------------------------------

PASS_COLOUR = "#4c78a8"
REFUSED_COLOUR = "#e45756"
BAN_COLOUR = "#b279a2"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "openflare", "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "figure.dpi": 96})  # fmt: skip
    return plt


def _compact(ax, axis: str = "y") -> None:
    """Few ticks, numbers as 12k / 1.2M: readable at any count."""
    from matplotlib import ticker

    def fmt(v, _pos):
        v = abs(v)
        return f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(ticker.FuncFormatter(fmt))
    if not (axis == "y" and ax.get_yscale() != "linear"):
        target.set_major_locator(ticker.MaxNLocator(4, integer=True))


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _plt().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def traffic_series(agg: Aggregate) -> tuple[str, list[datetime.datetime], list[int], list[int], list[int]]:
    """(unit, bucket starts, passed, refused, refused for a ban): per hour, per day past DAILY_AFTER_H hours."""
    if not agg.hours:
        return "hour", [], [], [], []
    lo, hi = min(agg.hours), max(agg.hours)
    step = 24 if hi - lo + 1 > DAILY_AFTER_H else 1
    start = lo - lo % step
    n = (hi - start) // step + 1
    passed, refused, banned = [0] * n, [0] * n, [0] * n
    for h, (p, r, b) in agg.hours.items():
        i = (h - start) // step
        passed[i] += p
        refused[i] += r
        banned[i] += b
    times = [EPOCH + datetime.timedelta(hours=start + i * step) for i in range(n)]
    return ("day" if step == 24 else "hour"), times, passed, refused, banned


def plot_traffic(agg: Aggregate) -> str:
    plt = _plt()
    unit, times, passed, refused, banned = traffic_series(agg)
    fig, ax = plt.subplots(figsize=(9, 2.8))
    width = (1.0 if unit == "day" else 1 / 24) * 0.9
    ax.bar(times, passed, width=width, color=PASS_COLOUR, label="passed", align="edge")
    ax.bar(times, refused, width=width, bottom=passed, color=REFUSED_COLOUR, label="refused", align="edge")
    ax.set_ylabel(f"requests per {unit}")
    _compact(ax)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1), frameon=False, ncols=2)
    fig.autofmt_xdate()
    return _svg(fig)


def plot_bans(agg: Aggregate) -> str:
    plt = _plt()
    unit, times, _, _, banned = traffic_series(agg)
    fig, ax = plt.subplots(figsize=(9, 1.8))
    ax.step(times, banned, where="post", color=BAN_COLOUR)
    ax.fill_between(times, banned, step="post", color=BAN_COLOUR, alpha=0.3)
    ax.set_ylabel(f"refused (banned)\nper {unit}")
    ax.set_ylim(bottom=0, top=max(1, max(banned, default=0)) * 1.1)
    _compact(ax)
    fig.autofmt_xdate()
    return _svg(fig)


def plot_bars(items: list[tuple[str, int]], colour: str, xlabel: str) -> str:
    plt = _plt()
    items = list(reversed(items))
    fig, ax = plt.subplots(figsize=(4.4, 0.3 * max(3, len(items)) + 0.6))
    ax.barh([str(k)[:40] for k, _ in items], [v for _, v in items], color=colour)
    ax.set_xlabel(xlabel)
    _compact(ax, "x")
    ax.set_xlim(right=max((v for _, v in items), default=1) * 1.18)
    for i, (_, v) in enumerate(items):
        ax.annotate(f"{v:,}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    return _svg(fig)


def plot_scores(agg: Aggregate) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.6))
    xs = list(range(1, 11))
    p = agg.scores["passed"][1:]
    r = agg.scores["refused"][1:]
    ax.bar(xs, p, color=PASS_COLOUR, label="passed")
    ax.bar(xs, r, bottom=p, color=REFUSED_COLOUR, label="refused")
    log = max((a + b for a, b in zip(p, r)), default=0) > 200
    if log:  # a few refusals next to a million passes stay visible
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
    ax.axvline(agg.threshold + 0.5, color="#333", linestyle="--", linewidth=1)
    ax.annotate(f"threshold {agg.threshold}: refused above", (agg.threshold + 0.5, 1), xycoords=("data", "axes fraction"),
                xytext=(4, 2), textcoords="offset points", fontsize=8)  # fmt: skip
    ax.set_xticks(xs)
    ax.set_xlabel("score (1-10)")
    ax.set_ylabel("requests")
    _compact(ax)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1), frameon=False, ncols=2)
    return _svg(fig)


# ---- HTML ----------------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#1f2937;color:#fff;padding:14px 28px}header h1{margin:0;font-size:20px}header p{margin:2px 0 0;color:#cbd5e1}
main{padding:8px 28px 40px;max-width:1200px}section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;margin:16px 0;padding:12px 18px}
h2{font-size:16px;margin:4px 0 10px}.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #e5e7eb;
border-radius:8px;padding:10px 16px;min-width:130px}.card b{display:block;font-size:22px}.card span{color:#6b7280;font-size:12px}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.row>div{flex:1 1 420px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;vertical-align:top}
th{background:#f3f4f6;cursor:pointer;user-select:none}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f3f4f6;padding:1px 4px;border-radius:3px;word-break:break-all}
.note{color:#6b7280;font-size:12px}.pass{color:#2563eb}.block{color:#dc2626}svg{max-width:100%;height:auto}
"""
SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function(th,i){th.addEventListener("click",function(){
var tb=th.closest("table").tBodies[0],rows=Array.from(tb.rows),asc=th.dataset.asc!=="1";th.dataset.asc=asc?"1":"0";
rows.sort(function(a,b){var x=a.cells[i].dataset.v||a.cells[i].textContent,y=b.cells[i].dataset.v||b.cells[i].textContent;
var nx=parseFloat(x),ny=parseFloat(y);var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?c:-c;});
rows.forEach(function(r){tb.appendChild(r);});});});
"""


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _time(ts: float | datetime.datetime | None) -> str:
    if ts is None:
        return "-"
    t = ts if isinstance(ts, datetime.datetime) else EPOCH + datetime.timedelta(seconds=ts)
    return t.strftime("%Y-%m-%d %H:%M") + " UTC"


def _table(headers: list[str], rows: list[list[Any]], numeric: Iterable[int] = (), sortable: bool = True) -> str:
    num = set(numeric)
    head = "".join(f'<th class="n">{esc(h)}</th>' if i in num else f"<th>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            if i in num:
                cells.append(f'<td class="n" data-v="{esc(c)}">{esc(f"{c:,}" if isinstance(c, int) else c)}</td>')
            else:
                cells.append(f"<td>{c if isinstance(c, Raw) else esc(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Raw(str):
    """Already-escaped HTML for a table cell."""


def label_commands(e: Entry, side: str) -> tuple[str, str]:
    """(confirm, correct): the `openflare label` commands for a queue entry (`side` passed or refused)."""
    base = f"{PROG} label{e.store_args} {e.id}"
    if side == "passed":
        return f"{base} benign", f"{base} attack --force"
    return f"{base} attack", f"{base} benign --force"


def _queue_table(q: Queue, side: str, threshold: int) -> str:
    rows = []
    for dist, e in q.entries():
        fld = f"{e.field[0]} {e.field[1]!r}" if isinstance(e.field, list) and len(e.field) >= 2 else "-"
        scores = f"{e.score}" + (f" (local {e.local_score}" + (f", llm {e.llm_score}" if e.llm_score is not None else "") + ")"
                                 if e.local_score is not None and e.local_score != e.score or e.llm_score is not None else "")  # fmt: skip
        confirm, correct = label_commands(e, side)
        label = f"<br><span class=note>labelled {esc(e.label)}</span>" if e.label else ""
        rows.append([
            Raw(f"{esc(_time(e.time))}<br><span class=note>{esc(e.client_ip)}</span>"),
            Raw(f"<code>{esc(e.method)} {esc(e.target)}</code>"),
            Raw(f'<span data-v="{e.score or 0}">{esc(scores)}</span>'),
            Raw(f"{esc(fld)}<br><span class=note>{esc(e.signal)}</span>"),
            Raw(f"<span class=note>{esc(e.explanation)}</span>"),
            Raw(f"confirm: <code>{esc(confirm)}</code><br>correct: <code>{esc(correct)}</code>{label}"),
        ])  # fmt: skip
    if not rows:
        if side == "passed":
            return ("<p class=note>No passed request recorded in full in this period: passed flows are kept as time, IP "
                    "and score only, unless <code>openflare_record_benign_one_in</code> records one in N in full.</p>")  # fmt: skip
        return "<p class=note>No request refused by the model in this period.</p>"
    more = f"<p class=note>{q.seen:,} candidates; the {len(rows)} nearest threshold {threshold} shown, most recent first among equals.</p>"
    return _table(["time / client", "request", "score", "deciding field / signal", "explanation", "label it"], rows, sortable=False) + more


def render(agg: Aggregate, *, store: str, since: datetime.datetime | None, now: datetime.datetime, cards: list[dict],
           seconds: float = 0.0, top: int = TOP) -> str:  # fmt: skip
    """The report page (agg's queue entries should carry their labels already)."""
    period = f"{_time(since) if since else 'the first record'} – {_time(now)}"
    refused_pct = f"{100 * agg.refused / agg.records:.2f} %" if agg.records else "-"
    cards_html = "".join(
        f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>'
        for k, v in (("records", f"{agg.records:,}"), ("passed", f"{agg.passed:,}"), ("refused", f"{agg.refused:,}"),
                     ("refused share", refused_pct), ("refused IPs", f"{len(agg.ips.counts):,}" + ("+" if agg.ips.approximate else "")),
                     ("full records", f"{agg.tiers.get(records.TIER_FULL, 0):,}"), ("brief records", f"{agg.tiers.get(records.TIER_BRIEF, 0):,}"))
    )  # fmt: skip
    parts = [f'<section><h2>Summary</h2><div class="cards">{cards_html}</div>']
    notes = []
    if agg.detect_only:
        notes.append(f"{agg.detect_only:,} requests scored above the threshold were forwarded (detect-only mode).")
    if agg.gaps:
        notes.append(f"The recorder noted {agg.gaps} gap(s) in its chains: {agg.lost:,} records lost (a full disk; see verify-log).")
    if notes:
        parts.append("".join(f"<p class=note>{esc(n)}</p>" for n in notes))
    parts.append("</section>")
    if agg.records:
        unit = traffic_series(agg)[0]
        parts.append(f"<section><h2>Traffic over time (per {unit})</h2>{plot_traffic(agg)}</section>")
        reasons = sorted(agg.reasons.items(), key=lambda kv: -kv[1])
        cats = agg.categories.top(top)
        left = plot_bars(reasons, REFUSED_COLOUR, "requests refused") if reasons else "<p class=note>No refusals.</p>"
        right = plot_bars(cats, REFUSED_COLOUR, "refused by the model") if cats else "<p class=note>No refusal by the model.</p>"
        parts.append(f'<section><div class="row"><div><h2>Refusals by reason</h2>{left}</div>'
                     f"<div><h2>Refusals by the model, by attack category</h2>{right}</div></div></section>")  # fmt: skip
        parts.append(f"<section><h2>Score distribution</h2>{plot_scores(agg)}<p class=note>Every record's final score "
                     f"(a log scale past 200 requests a score); refused: refused for any reason after scoring.</p></section>")  # fmt: skip
        parts.append(f"<section><h2>Refusals of banned clients (per {unit})</h2>{plot_bans(agg)}</section>")

        def top_table(counter: TopCounter, what: str) -> str:
            rows = [[k, v, f"{100 * v / agg.refused:.1f} %" if agg.refused else "-"] for k, v in counter.top(top)]
            note = (f"<p class=note>Approximate: more distinct {what}s than the counter keeps ({counter.cap:,}); counts may "
                    f"miss up to {counter.floor:,} each.</p>" if counter.approximate else "")  # fmt: skip
            return _table([what, "refused", "share"], rows, numeric=[1]) + note if rows else "<p class=note>None.</p>"

        parts.append(f'<section><div class="row"><div><h2>Top refused client IPs</h2>{top_table(agg.ips, "client IP")}</div>'
                     f'<div><h2>Top refused paths</h2>{top_table(agg.paths, "path")}</div></div></section>')  # fmt: skip
    rows = []
    for c in cards:
        held = (c.get("metrics") or {}).get("held_out") or {}
        base, app = held.get("base") or {}, held.get("app") or {}

        def rate(d: dict, k: str) -> str:
            return f"{100 * d[k]:.2f} %" if isinstance(d.get(k), (int, float)) else "-"

        v = str(c.get("version"))
        seen = agg.versions.counts.get(v, 0)
        span = agg.version_times.get(v)
        rows.append([v + (" (serving)" if c.get("serving") else ""), str(c.get("created", "-"))[:19].replace("T", " "),
                     c.get("parent_version") or "-", c.get("threshold", "-"), rate(base, "tpr"), rate(base, "fpr"),
                     rate(app, "fpr"), seen, f"{_time(span[0])} – {_time(span[1])}" if span else "-"])  # fmt: skip
    known = {str(c.get("version")) for c in cards}
    for v, n in agg.versions.top(top):
        if v not in known:
            span = agg.version_times.get(v)
            rows.append([v, "-", "-", "-", "-", "-", "-", n, f"{_time(span[0])} – {_time(span[1])}" if span else "-"])
    parts.append("<section><h2>Model versions and promotions</h2>" + (
        _table(["version", "created (UTC)", "parent (promoted from)", "threshold", "held-out TPR", "held-out FPR", "app FPR",
                "full records scored", "seen"], rows, numeric=[7]) if rows else "<p class=note>No model card found.</p>")
        + "<p class=note>From the model cards (the serving one and models/history/, kept by <code>make retrain</code>); a "
          "card with a parent was promoted from it. Records scored: full records naming the version.</p></section>")  # fmt: skip
    parts.append(
        f"<section><h2>Review queue</h2><p>Requests nearest the threshold ({agg.threshold}: scores above it are refused). "
        "Confirm what OpenFlare did, or correct it; <code>make retrain</code> learns the labels.</p>"
        f"<h3>Passed, nearest the threshold</h3>{_queue_table(agg.near_pass, 'passed', agg.threshold)}"
        f"<h3>Refused by the model, nearest the threshold</h3>{_queue_table(agg.near_refused, 'refused', agg.threshold)}"
        "</section>"
    )
    title = f"OpenFlare report: {period}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
        f'<body data-records="{agg.records}" data-refused="{agg.refused}" data-passed="{agg.passed}">'
        f"<header><h1>OpenFlare report</h1><p>{esc(period)} · {esc(store)} · {agg.records:,} records · made in {seconds:.1f} s</p></header>"
        f"<main>{''.join(parts)}</main><script>{SORT_JS}</script></body></html>\n"
    )


def _scan_part(args: tuple) -> Aggregate:
    path, since, threshold, queue, cap, lo, hi = args
    agg = Aggregate(threshold, queue, cap)
    add = agg.add
    for rec in _iter_sqlite(path, since, lo, hi):
        add(rec)
    return agg


def scan(store: records.Store, since: datetime.datetime | None, threshold: int, queue: int = QUEUE, cap: int = TOP_CAP,
         workers: int = 1) -> Aggregate:  # fmt: skip
    """The aggregate of the store's records since `since`. The embedded store with `workers` > 1: that many
    processes each read a range of its rows (decoding is most of the time), their aggregates merged."""
    if workers > 1 and store.kind == "embedded":
        path = embedded_path(store)
        span = _rowid_range(path) if os.path.isfile(path) else None
        if span is not None and span[1] - span[0] >= PARALLEL_MIN_ROWS:
            import multiprocessing

            lo, hi = span
            step = (hi - lo) // workers + 1
            parts = [(path, since, threshold, queue, cap, lo + i * step, min(hi, lo + (i + 1) * step - 1)) for i in range(workers)]
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                aggs = pool.map(_scan_part, parts)
            agg = aggs[0]
            for other in aggs[1:]:
                agg.merge(other)
            return agg
    agg = Aggregate(threshold, queue, cap)
    add = agg.add
    for rec in iter_records(store, since):
        add(rec)
    return agg


def build(store: records.Store | list[tuple[records.Store, str]], since: datetime.datetime | None, threshold: int,
          model_path: Path | None = None, now: datetime.datetime | None = None, store_args: str = "", top: int = TOP,
          queue: int = QUEUE, cap: int = TOP_CAP, workers: int = 1) -> tuple[str, Aggregate]:  # fmt: skip
    """(the HTML page, its aggregate) of the records since `since` (None: all) of one store, or of several
    ([(store, the `openflare` flags naming it)]: the embedded stores of `make run WORKERS=N`), merged."""
    t0 = time.perf_counter()
    stores = [(store, store_args)] if isinstance(store, records.Store) else list(store)
    total: Aggregate | None = None
    for st, args in stores:
        agg = scan(st, since, threshold, queue, cap, workers)
        queued = [rec for q in (agg.near_pass, agg.near_refused) for _, _, _, rec in q.heap]
        labels = labels_of(st, [str(rec["_id"]) for rec in queued])
        for rec in queued:  # what the queue shows of it: its label, and the flags that reach its store
            rec[LABEL_KEY] = labels.get(str(rec["_id"]))
            rec[STORE_KEY] = args
        if total is None:
            total = agg
        else:
            total.merge(agg)
    assert total is not None, "no store given"
    where = stores[0][0].description + (f" + {len(stores) - 1} more store(s) ({', '.join(a.strip() for _, a in stores[1:])})"
                                        if len(stores) > 1 else "")  # fmt: skip
    page = render(total, store=where, since=since, now=now or records.utcnow(), cards=model_cards(model_path),
                  seconds=time.perf_counter() - t0, top=top)  # fmt: skip
    return page, total
