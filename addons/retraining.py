"""Retraining from recorded flows: labels, bounded collection, the refit, promotion gate, threshold, versions.

A plain module (no mitmproxy import), used by scripts/retrain.py, scripts/rollback.py and the tests.

Labels, strongest first (one label per request: the strongest source wins, ties by weight):

* operator: `openflare.label` (addons/labels.py) writes a full, masked record with `label` into the
  `labels` collection; a `label` on a record in `records` counts the same;
* llm: the LLM's score on a recorded flow (>= `llm_attack` attack, <= `llm_benign` benign);
* local: the local model's own score when confident (<= `local_benign` benign; >= `local_attack` attack only
  when asked for: by default its own refusals are never taken as attack labels, or its false positives on the
  app would be learnt again).

Only full records hold a request: refused flows, flows sampled by `openflare_record_benign_one_in`,
and operator-labelled flows. Brief records are skipped without being decoded further.

A collected example is the request itself (`Sample`: method, target, headers and body, as the record's
dataset line gives them), turned into fields (`addons.fields.extract`, as the addons do) only when it
is used. Memory stays bounded however many records there are: records are streamed from the store;
identical requests are merged (their count and recency weight add up); past `cap` distinct requests
the collector keeps the `cap` requests of lowest hash (a deterministic reservoir: the same store gives
the same sample, and a request is kept or dropped with all its copies). Operator labels have their own
cap and are never pushed out by machine labels.

The candidate is a refit of the current field model (`refit`): one `learn.Table` of the app's examples
(weighted by source and recency), a bounded sample of the base corpora's training split (and of
scripts/train.py's placed payloads and everyday text), and base attack payloads carried into one field
of the app's benign requests (`carry`), fitted by `learn.fit` warm-started at the current weights, in
the current model's hashed n-gram space (its bits). A benign
request gives all its windows; an attack request only its best one (multiple-instance learning: a
label says the request is an attack, not which field is): the window the current model scores highest
among those the table does not hold as benign. The app's benign requests also refit the application
profile (`refresh_profile`) where enough of them share a root. The candidate's memory is bounded by the
caps (collector, base sample, carried payloads), not by the number of recorded flows.

The promotion gate compares candidate and current model on held-out data (`evaluate`, `gate`) and on
the fixed probe set of `addons.probes` (`probe_gate`): a candidate that lets through an attack probe
the current model refuses is refused, whatever the operator's labels say. Every score there is the
addons' own (`LocalModel.proba` on the extracted fields; a request beyond the inspection limits counts
as refused, as the proxy refuses it).
"""

from __future__ import annotations

import datetime
import hashlib
import heapq
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from addons import dataset
from addons import fieldmodel
from addons import fields as fieldsmod
from addons import learn
from addons import model
from addons import probes
from addons import records

LABELS_COLLECTION = "labels"
OPERATOR, LLM, LOCAL = "operator", "llm", "local"
RANK = {OPERATOR: 3, LLM: 2, LOCAL: 1}
HISTORY_DIR = "history"


class RetrainError(Exception):
    """Retraining cannot go on: no labelled data, a broken registry, a missing parent version."""


@dataclass
class Policy:
    """How records become weighted labels."""

    # local score at or above this, with no LLM verdict: attack. 11 (the default): never. A model's own refusals
    # are not evidence: taken as attack labels, its false positives on the app are learnt again (self-training).
    local_attack: int = 11
    local_benign: int = 2  # local score at or below this on a passed flow: benign
    llm_attack: int = 7
    llm_benign: int = 3
    weight_operator: float = 10.0
    weight_llm: float = 3.0
    weight_local: float = 0.5
    half_life_days: float = 7.0  # recency: a label this many days old counts half
    now: datetime.datetime | None = None

    def recency(self, t: datetime.datetime | None) -> float:
        if t is None or self.half_life_days <= 0:
            return 1.0
        now = self.now or records.utcnow()
        age = max((now - t).total_seconds() / 86400.0, 0.0)
        return 0.5 ** (age / self.half_life_days)

    def source_weight(self, source: str) -> float:
        return {OPERATOR: self.weight_operator, LLM: self.weight_llm, LOCAL: self.weight_local}[source]


def label_of(rec: dict, policy: Policy) -> tuple[str, str] | None:
    """(label, source) of one record, or None when no source is sure enough."""
    lab = rec.get("label")
    if lab in dataset.LABELS:
        return lab, OPERATOR
    llm_score = rec.get("llm_score")
    if isinstance(llm_score, int):
        if llm_score >= policy.llm_attack:
            return "attack", LLM
        if llm_score <= policy.llm_benign:
            return "benign", LLM
        return None
    local = rec.get("local_score")
    if not isinstance(local, int):
        return None
    if local >= policy.local_attack:
        return "attack", LOCAL
    if local <= policy.local_benign and rec.get("verdict") == "pass":
        return "benign", LOCAL
    return None


class Sample(NamedTuple):
    """One request as recorded: what the collector dedupes (identical requests are one example)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def request(self, limits: fieldsmod.Limits = fieldsmod.Limits()) -> fieldsmod.Request | None:
        """Its fields and signals as the addons extract them; None beyond the inspection limits (the
        proxy refuses such a request whatever a model says)."""
        try:
            return fieldsmod.extract(self.method, self.target, list(self.headers), self.body, limits)
        except fieldsmod.TooLarge:
            return None


def sample(method: str, target: str, headers: Iterable[Sequence[str]] = (), body: bytes = b"") -> Sample:
    return Sample(method, target, tuple((str(k), str(v)) for k, v in headers), bytes(body))


def sample_of(rec: dict) -> Sample:
    """The request of a full record, through its exported dataset line (as `make export` writes it).

    The recorder keeps the body decoded, so a Content-Encoding header no longer describes it: dropped."""
    line = records.to_dataset(rec)
    if line is None:
        raise ValueError("not a full record")
    r = dataset.parse_record(line, f"record {str(rec.get('_id'))[:16]}", "openflare")
    return sample(r.method, r.target, [h for h in r.headers if h[0].lower() != "content-encoding"], r.body)


def sample_of_record(r: dataset.Record) -> Sample:
    """A corpus record's request."""
    return sample(r.method, r.target, r.headers, r.body)


def _priority(s: Sample) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([s.method, s.target, s.headers], ensure_ascii=False).encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(s.body)
    return int.from_bytes(h.digest(), "big")


def held_slice(s: Sample) -> str:
    """"train", "calibrate" or "gate": a fixed split of the app's labelled requests by hash (80/10/10)."""
    k = _priority(s) % 10
    return "gate" if k == 0 else "calibrate" if k == 1 else "train"


@dataclass
class Entry:
    label: str
    source: str
    count: int = 0
    recency: float = 0.0  # sum of the recency weights of the copies

    def weight(self, policy: Policy) -> float:
        """Source weight x damped copy weight: 1 copy counts 1, 1000 copies about 7.9, never thousands."""
        r = self.recency
        return policy.source_weight(self.source) * (r if r <= 1.0 else 1.0 + math.log(r))


class Collector:
    """Merges labelled requests in bounded memory (see the module docstring)."""

    def __init__(self, policy: Policy, cap: int = 50_000, operator_cap: int = 50_000) -> None:
        self.policy = policy
        self.caps = {False: cap, True: operator_cap}
        self.entries: dict[bool, dict[Sample, Entry]] = {False: {}, True: {}}
        self._heaps: dict[bool, list[tuple[int, Sample]]] = {False: [], True: []}  # (-priority, request)
        self._limit: dict[bool, int | None] = {False: None, True: None}  # requests above this priority are out
        self.stats = {"records": 0, "full": 0, "labelled": 0, "unlabelled": 0, "bad": 0, "dropped_by_cap": 0,
                      OPERATOR: 0, LLM: 0, LOCAL: 0}

    def add_record(self, rec: dict) -> None:
        self.stats["records"] += 1
        if rec.get("tier") != records.TIER_FULL:
            return
        self.stats["full"] += 1
        got = label_of(rec, self.policy)
        if got is None:
            self.stats["unlabelled"] += 1
            return
        try:
            s = sample_of(rec)
        except (ValueError, dataset.DatasetError, TypeError, KeyError):
            self.stats["bad"] += 1
            return
        # An operator label is as fresh as the labelling, however old the flow.
        self.add(s, got[0], got[1], rec.get("label_time") or rec.get("time"))

    def add(self, s: Sample, label: str, source: str, t: datetime.datetime | None = None) -> None:
        self.stats["labelled"] += 1
        self.stats[source] += 1
        op = source == OPERATOR
        entries, heap = self.entries[op], self._heaps[op]
        prio = _priority(s)
        e = entries.get(s)
        if e is None:
            limit = self._limit[op]
            if limit is not None and prio >= limit:
                self.stats["dropped_by_cap"] += 1
                return
            e = entries[s] = Entry(label, source)
            heapq.heappush(heap, (-prio, s))
            if len(entries) > self.caps[op]:
                neg, gone = heapq.heappop(heap)
                del entries[gone]
                self._limit[op] = -neg
                self.stats["dropped_by_cap"] += 1
                if gone == s:
                    return
        elif RANK[source] > RANK[e.source] or (RANK[source] == RANK[e.source] and label != e.label and source == OPERATOR):
            # A stronger source replaces the label; a later operator label replaces an earlier one.
            e.label, e.source, e.count, e.recency = label, source, 0, 0.0
        elif RANK[source] < RANK[e.source] or label != e.label:
            if label != e.label and RANK[source] == RANK[e.source]:
                e.recency -= self.policy.recency(t)  # machine labels that disagree cancel out
            return
        e.count += 1
        e.recency += self.policy.recency(t)

    def examples(self) -> Iterator[tuple[Sample, str, str, float]]:
        """(request, label, source, weight), operator labels winning over machine labels of the same request."""
        ops = self.entries[True]
        for s in sorted(ops):
            e = ops[s]
            yield s, e.label, e.source, e.weight(self.policy)
        mach = self.entries[False]
        for s in sorted(mach):
            e = mach[s]
            if s in ops or e.recency <= 0:
                continue
            yield s, e.label, e.source, e.weight(self.policy)

    def merge(self, other: Collector) -> None:
        """Add another collector's requests (as if its records had been added here), then re-apply the cap."""
        for k, v in other.stats.items():
            self.stats[k] += v
        for op in (False, True):
            mine = self.entries[op]
            for s, e in other.entries[op].items():
                m = mine.get(s)
                if m is None:
                    mine[s] = e
                elif RANK[e.source] > RANK[m.source]:
                    mine[s] = e
                elif RANK[e.source] == RANK[m.source]:
                    if e.label == m.label:
                        m.count += e.count
                        m.recency += e.recency
                    elif op:  # two operator labels disagree across parts: the one with more weight
                        if e.recency > m.recency:
                            mine[s] = e
                    else:
                        m.recency -= e.recency
            limit = min(x for x in (self._limit[op], other._limit[op]) if x is not None) if (
                self._limit[op] is not None or other._limit[op] is not None) else None
            prio = {s: _priority(s) for s in mine}
            keep = sorted(mine, key=prio.__getitem__)
            if limit is not None:
                keep = [s for s in keep if prio[s] < limit]
            if len(keep) > self.caps[op]:
                limit = prio[keep[self.caps[op]]]
                keep = keep[: self.caps[op]]
            dropped = len(mine) - len(keep)
            self.stats["dropped_by_cap"] += dropped
            self.entries[op] = {s: mine[s] for s in keep}
            self._heaps[op] = [(-prio[s], s) for s in keep]
            heapq.heapify(self._heaps[op])
            self._limit[op] = limit

    def __len__(self) -> int:
        return len(self.entries[True]) + len(self.entries[False])


def collect(store: records.Store, policy: Policy, cap: int = 50_000, progress=None, workers: int = 1) -> Collector:
    """Stream labels out of a store's `records` and `labels` collections (full records only).

    With `workers` > 1 and the embedded store, that many processes each read every workers-th row and
    collect on their own; the results are merged (same rules, same cap), so the labels are the same.
    """
    if workers > 1 and store.kind == "embedded":
        return _collect_parallel(store, policy, cap, progress, workers)
    col = Collector(policy, cap=cap)
    for rec in iter_records(store, progress):
        col.add_record(rec)
    return col


def _collect_part(args) -> Collector:
    paths, policy, cap, part, workers, queue = args
    col = Collector(policy, cap=cap)
    for path in paths:
        for rec in _iter_sqlite(path, queue.put, part, workers):
            col.add_record(rec)
    return col


def _collect_parallel(store: records.Store, policy: Policy, cap: int, progress, workers: int) -> Collector:
    import multiprocessing
    import queue as queuemod

    paths = [_embedded_path(store), _embedded_path(labels_store(store))]
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as mgr, ctx.Pool(workers) as pool:
        q = mgr.Queue()
        res = pool.map_async(_collect_part, [(paths, policy, cap, k, workers, q) for k in range(workers)])
        while not res.ready() or not q.empty():
            try:
                n = q.get(timeout=0.2)
            except queuemod.Empty:
                continue
            if progress:
                progress(n)
        parts = res.get()
    col = parts[0]
    for other in parts[1:]:
        col.merge(other)
    return col


def labels_store(store: records.Store) -> records.Store:
    """The `labels` collection next to a store's `records` collection."""
    return records.Store(store.coll.database[LABELS_COLLECTION], store.kind, None, store.description + " (labels)")


def iter_records(store: records.Store, progress=None) -> Iterator[dict]:
    """Every full record of `records` then of `labels`, streamed (no sort: no index needed, no memory).

    The embedded store is read straight from its SQLite file (montydb's row format, BSON values) in
    batches: montydb's own cursor loads every key first; MongoDB uses a cursor with a projection-free
    filter on `tier`.
    """
    for st in (store, labels_store(store)):
        if st.kind == "embedded":
            yield from _iter_embedded(st, progress)
        else:
            for rec in st.coll.find({"tier": records.TIER_FULL}, batch_size=1000):
                if progress:
                    progress(1)
                yield rec


def _embedded_path(st: records.Store) -> str:
    """The SQLite file montydb keeps one collection in."""
    sub = st.coll._storage
    for inst in st.coll._components:
        sub = sub.contractor_cls(sub, inst)
    return sub._database._col_path(sub._name)


def _iter_embedded(st: records.Store, progress=None) -> Iterator[dict]:
    yield from _iter_sqlite(_embedded_path(st), progress)


def _iter_sqlite(path: str, progress=None, part: int = 0, parts: int = 1) -> Iterator[dict]:
    """Full records straight from montydb's SQLite rows (BSON), in batches; brief rows are not decoded."""
    import sqlite3

    import bson
    from montydb.storage import sqlite as monty_sqlite

    if not os.path.isfile(path):
        return
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    opts = bson.CodecOptions(tz_aware=False)
    marker = b"\x02tier\x00\x05\x00\x00\x00full\x00"  # BSON of "tier": "full"
    try:
        where = f" WHERE rowid % {int(parts)} = {int(part)}" if parts > 1 else ""
        cur = conn.execute(f"SELECT v FROM [{monty_sqlite.SQLITE_RECORD_TABLE}]{where}")
        while True:
            rows = cur.fetchmany(2000)
            if not rows:
                break
            if progress:
                progress(len(rows))
            for (v,) in rows:
                if marker in v:
                    yield bson.decode(v, codec_options=opts)
    finally:
        conn.close()



# ---- the app's requests carrying attacks -----------------------------------------------------------------

CARRY_LOCS = ("query", "form", "json", "header")


def carry(flds: Sequence[fieldsmod.Field], payload: str, rng) -> tuple[list[fieldsmod.Field], int] | None:
    """These fields (one of the app's benign requests) with the value of one query, form, JSON or header
    field replaced by `payload` (percent-encoded in a query or form, as a client sends it): (the fields,
    the index of the one carrying it), or None when the request has no such field.

    The app's parameter names and words then occur in attacks too, so training on the app's benign
    flows teaches where an attack differs from the app, not that the app's fields are safe."""
    spots = [i for i, f in enumerate(flds) if f.loc in CARRY_LOCS and not f.via]
    if not spots:
        return None
    i = rng.choice(spots)
    f = flds[i]
    out = list(flds)
    out[i] = fieldsmod.Field(f.loc, f.name, quote(payload, safe="") if f.loc in ("query", "form") else payload)
    return out, i


# ---- the candidate as a refit of the current model ----------------------------------------------------


def training_table(parent: fieldmodel.FieldModel, app: Sequence[tuple[Sample, int, float]],
                   base: Iterable[tuple[Sample, int]], carried: int = 0, rng=None,
                   placed: Iterable[tuple[fieldsmod.Field, int]] = ()) -> tuple[learn.Table, dict]:
    """One table of the app's examples (request, 1 for attack, weight), the base rows (request, 1 for
    attack; weight 1), `placed` fields (field, 1 for attack; weight 1: scripts/train.py's payloads and
    everyday text, which the base corpora alone do not hold) and `carried` base attack payloads put into
    the app's benign requests (`carry`, drawn with `rng`).

    Benign requests first, all their windows; then each attack request's best window by the parent
    (`learn.best_windows`, skipping windows the table holds as benign: the app's own headers are not its
    attacks). The payloads carried are the fields that decided the base attacks. Returns (table, counts)."""
    table = learn.Table()
    info = {"app_benign": 0, "app_attack": 0, "base_benign": 0, "base_attack": 0, "carried": 0, "beyond_limits": 0}
    attacks: list[tuple[Sample, float, str]] = []
    app_benign: list[Sample] = []
    for who, rows in (("app", ((s, y, w) for s, y, w in app)), ("base", ((s, y, 1.0) for s, y in base))):
        for s, y, w in rows:
            if y:
                attacks.append((s, w, who))
                continue
            req = s.request()
            if req is None:
                info["beyond_limits"] += 1
                continue
            table.add_fields(req.fields, attack=False, weight=w)
            info[f"{who}_benign"] += 1
            if who == "app":
                app_benign.append(s)
    placed_attacks = []
    for f, y in placed:
        if y:
            placed_attacks.append(f)
        else:
            table.add_fields([f], attack=False)
    for f in placed_attacks:
        table.add_fields([f], attack=True)
    info["placed"] = len(placed_attacks)
    payloads: list[str] = []
    for who in ("base", "app"):  # base attacks first: their deciding fields are the payloads carried
        for s, w, src in attacks:
            if src != who:
                continue
            req = s.request()
            if req is None:
                info["beyond_limits"] += 1
                continue
            r, best = learn.best_windows(parent, req.fields, 1, benign=table)
            if not best:
                continue
            table.add(r, attack=True, weight=w, only=best)
            info[f"{who}_attack"] += 1
            if who == "base":
                norm = fieldmodel.prepare(req.fields[r.field[best[0]]])[0]
                if len(norm) <= fieldmodel.WINDOW:
                    payloads.append(norm)
        if who == "base" and carried > 0 and payloads and app_benign:
            for _ in range(carried):
                req = rng.choice(app_benign).request()
                got = carry(req.fields, rng.choice(payloads), rng) if req is not None else None
                if got is not None:
                    table.add_fields([got[0][got[1]]], attack=True)
                    info["carried"] += 1
    info["windows"] = len(table)
    return table, info


def refit(parent: fieldmodel.FieldModel, app: Sequence[tuple[Sample, int, float]], base: Iterable[tuple[Sample, int]],
          c: float = 8.0, max_iter: int = 100, carried: int = 0, rng=None, placed: Iterable[tuple[fieldsmod.Field, int]] = (),
          log=lambda msg: None) -> tuple[fieldmodel.FieldModel, dict]:
    """The candidate: `parent` refitted on `training_table(...)` by `learn.fit`, starting at the parent's
    weights, in its bits; the parent's profile and violation probability are kept (see `refresh_profile`).
    Returns (candidate, the table's counts)."""
    table, info = training_table(parent, app, base, carried, rng, placed)
    log(f"refit table: {info}")
    try:
        m = learn.fit(table, parent.bits, c, max_iter=max_iter, start=parent, log=log)
    except ValueError as e:
        raise RetrainError(f"cannot refit: {e}") from e
    m.profile, m.violation_p = parent.profile, parent.violation_p
    return m, info


def _root(path: str) -> str:
    return "/" + path.split("/")[1] if path.count("/") >= 1 else path


def refresh_profile(parent: fieldmodel.AppProfile | None, app_benign: Iterable[Sequence[fieldsmod.Field]],
                    min_root: int = 50) -> fieldmodel.AppProfile | None:
    """The parent's application profile plus what the app's benign requests say: `AppProfile.fit` on them
    (a root is learnt from `min_root` requests under it); a root the app's traffic speaks for replaces the
    parent's paths under it. None when no root has enough of the app's requests (nothing to refresh)."""
    new = fieldmodel.AppProfile(min_root=min_root).fit(app_benign)
    if not new.roots:
        return None
    if parent is None:
        return new
    merged = fieldmodel.AppProfile(parent.min_root, parent.length_slack, parent.max_shapes)
    merged.roots = tuple(sorted(set(parent.roots) | set(new.roots)))
    merged.paths = {p: v for p, v in parent.paths.items() if _root(p) not in new.roots}
    merged.paths.update(new.paths)
    merged.paths = dict(sorted(merged.paths.items()))
    return merged


def profile_summary(p: fieldmodel.AppProfile | None) -> dict | None:
    return None if p is None else {"roots": list(p.roots), "paths": len(p.paths)}


def operating_point(current: model.LocalModel, candidate: fieldmodel.FieldModel, benign: Sequence[Sample],
                    min_benign: int = 100) -> float:
    """The candidate's operating point: the probability that refuses the same share of these held-out
    benign requests as the current model does at its own, so a refit keeps the false-positive rate the
    current card stands for. The current operating point with fewer than `min_benign` of them."""
    if len(benign) < min_benign:
        return current.operating_point
    fpr = sum(p >= current.operating_point for p in proba_many(current, benign)) / len(benign)
    probe = model.LocalModel(candidate, {"operating_point": current.operating_point}, current.path)
    return min(max(learn.threshold_at(proba_many(probe, benign), fpr), 1e-6), 1 - 1e-6)


# ---- evaluation and the promotion gate ----------------------------------------------------------------


def threshold_of(lm: model.LocalModel, default: int = 6) -> int:
    t = lm.card.get("threshold", default)
    return t if isinstance(t, int) and 1 <= t <= 10 else default


def proba(lm: model.LocalModel, samples: Sequence[Sample]) -> list[float]:
    """lm's attack probability of each request, its fields extracted as the addons extract them; a
    request beyond the inspection limits is refused by the proxy: probability 1."""
    reqs = [s.request() for s in samples]
    got = iter(lm.proba([r for r in reqs if r is not None]))
    return [1.0 if r is None else next(got) for r in reqs]


_SCORING: tuple | None = None  # (model, requests) for forked scoring processes


def _score_chunk(bounds: tuple[int, int]) -> list[float]:
    lm, samples = _SCORING
    return proba(lm, samples[bounds[0] : bounds[1]])


def proba_many(lm: model.LocalModel, samples: Sequence[Sample], workers: int = 1, progress=None,
               chunk: int = 2000) -> list[float]:
    """`proba` over many requests in chunks (the fields of one chunk at a time in memory); with
    `workers` > 1, in that many forked processes."""
    global _SCORING
    bounds = [(i, min(i + chunk, len(samples))) for i in range(0, len(samples), chunk)]
    out: list[float] = []
    if workers > 1 and len(bounds) > 1:
        import multiprocessing

        _SCORING = (lm, samples)
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for (i, j), p in zip(bounds, pool.imap(_score_chunk, bounds)):
                    out.extend(p)
                    if progress:
                        progress(j - i)
        finally:
            _SCORING = None
        return out
    for i, j in bounds:
        out.extend(proba(lm, samples[i:j]))
        if progress:
            progress(j - i)
    return out


def evaluate(lm: model.LocalModel, base: list[tuple[Sample, int]], app_gate: list[tuple[Sample, int]],
             max_fpr: float = 0.01, threshold: int | None = None, progress=None, workers: int = 1) -> dict:
    """Figures of one model: base test TPR at `max_fpr` and at its threshold, FPR; app slice FPR/TPR."""
    t = threshold if threshold is not None else threshold_of(lm)
    out: dict = {"threshold": t, "base": None, "app": None, "base_tpr_at_fpr": None}
    for name, rows in (("base", base), ("app", app_gate)):
        if not rows:
            continue
        y = [lab for _, lab in rows]
        p = proba_many(lm, [s for s, _ in rows], workers, progress)
        out[name] = dataset.metrics(y, p, [model.proba_to_score(pi, lm.operating_point) > t for pi in p])
        if name == "base":
            out["base_tpr_at_fpr"] = dataset.tpr_at_fpr(y, p, max_fpr)
    return out


@dataclass
class Gate:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def gate(current: dict, candidate: dict, tpr_tolerance: float = 0.005, fpr_tolerance: float = 0.0,
         min_app_attacks: int = 20) -> Gate:
    """Promote only if the candidate is not worse: base TPR at the fixed FPR, FPR on the app's benign
    held-out flows, and (with at least `min_app_attacks` of them) TPR on the app's held-out attacks."""
    reasons = []
    ct, nt = current.get("base_tpr_at_fpr"), candidate.get("base_tpr_at_fpr")
    if nt is None:
        reasons.append("no base test data with both labels: TPR at the fixed FPR cannot be measured")
    elif ct is not None and nt < ct - tpr_tolerance:
        reasons.append(f"base TPR at the fixed FPR drops: {nt:.4f} < {ct:.4f} - {tpr_tolerance}")
    ca, na = current.get("app"), candidate.get("app")
    if ca and na and ca.get("fpr") is not None and na.get("fpr") is not None and na["fpr"] > ca["fpr"] + fpr_tolerance:
        reasons.append(f"FPR on the app's held-out benign flows rises: {na['fpr']:.4f} > {ca['fpr']:.4f}")
    cb, nb = current.get("base"), candidate.get("base")
    if cb and nb and cb.get("tpr") is not None and nb.get("tpr") is not None and nb["tpr"] < cb["tpr"] - tpr_tolerance:
        reasons.append(f"base TPR at the threshold drops: {nb['tpr']:.4f} < {cb['tpr']:.4f} - {tpr_tolerance}")
    enough = na is not None and na["tp"] + na["fn"] >= min_app_attacks
    if enough and ca.get("tpr") is not None and na.get("tpr") is not None and na["tpr"] < ca["tpr"] - max(tpr_tolerance, 0.05):
        reasons.append(f"TPR on the app's held-out attacks drops: {na['tpr']:.4f} < {ca['tpr']:.4f}")
    return Gate(not reasons, reasons)


@dataclass
class ProbeGate:
    """The fixed probe set (addons/probes.py) scored by both models, each at its own threshold."""

    promote: bool
    reasons: list[str]
    summary: dict  # counts per model, and the flipped probes by name, for the card and --json
    attacks_passed: list[tuple[probes.Probe, int, int]]  # refused by the current model, passed by the candidate
    benign_refused: list[tuple[probes.Probe, int, int]]  # passed by the current model, refused by the candidate


def probe_gate(current: model.LocalModel, candidate: model.LocalModel, benign_slack: int = 10,
               items: list[probes.Probe] | None = None) -> ProbeGate:
    """Refuse a candidate that passes any attack probe the current model refuses, or refuses more than
    `benign_slack` more everyday probes than it. Each probe is scored as the addons score it
    (`probes.score`), so the gate holds whatever the models are inside.

    Why: the app's own held-out labels share the operator's mistakes (six attacks labelled benign are
    in the gate slice as benign too), and the base test splits are too large to move for a handful of
    flows; a fixed set of short, classic attacks is what such a mistake flips."""
    items = probes.probes() if items is None else items
    tc, tn = threshold_of(current), threshold_of(candidate)
    rows = [(p, probes.score(current, p), probes.score(candidate, p)) for p in items]
    attacks = [r for r in rows if r[0].kind == probes.ATTACK]
    benign = [r for r in rows if r[0].kind == probes.BENIGN]
    passed = [r for r in attacks if r[1] > tc and r[2] <= tn]
    refused = [r for r in benign if r[1] <= tc and r[2] > tn]
    fp_c, fp_n = sum(r[1] > tc for r in benign), sum(r[2] > tn for r in benign)
    reasons = []
    if passed:
        reasons.append(f"probe gate: the candidate passes {len(passed)} attack probe(s) the current model refuses "
                       f"({', '.join(sorted({f'{p.method} {p.target}' for p, _, _ in passed})[:3])}{', ...' if len({(p.method, p.target) for p, _, _ in passed}) > 3 else ''})")
    if fp_n > fp_c + benign_slack:
        reasons.append(f"probe gate: the candidate refuses {fp_n} everyday probes, the current model {fp_c} "
                       f"(at most {benign_slack} more allowed)")
    summary = {
        "attacks": len(attacks), "benign": len(benign), "benign_slack": benign_slack,
        "attacks_refused": {"current": sum(r[1] > tc for r in attacks), "candidate": sum(r[2] > tn for r in attacks)},
        "benign_refused": {"current": fp_c, "candidate": fp_n},
        "attacks_passed": [f"{p.name}: {c} -> {n}" for p, c, n in passed],
        "benign_newly_refused": [f"{p.name}: {c} -> {n}" for p, c, n in refused],
    }
    return ProbeGate(not reasons, reasons, summary, passed, refused)


def _flips(rows: list[tuple[probes.Probe, int, int]], limit: int) -> list[str]:
    """Flipped probes grouped by request: scores current -> candidate and under how many header sets."""
    groups: dict[tuple, list] = {}
    for p, c, n in rows:
        groups.setdefault((p.method, p.target, p.body), []).append((p, c, n))
    n_sets = len(probes.all_headers())
    out = []
    for (method, target, body), g in list(groups.items())[:limit]:
        cs, ns = sorted(c for _, c, _ in g), sorted(n for _, _, n in g)
        span = lambda v: f"{v[0]}" if v[0] == v[-1] else f"{v[0]}-{v[-1]}"  # noqa: E731
        where = "its header" if g[0][0].header_set == "-" else f"{len(g)} of {n_sets} header sets"
        req = f"{method} {target}" + (f" body {body[:40]!r}" if body else "")
        out.append(f"  {ascii(req)[1:-1][:90]}: score {span(cs)} -> {span(ns)} ({where})")
    if len(groups) > limit:
        out.append(f"  ... and {len(groups) - limit} more requests")
    return out


def probe_table(pg: ProbeGate, limit: int = 20) -> str:
    s = pg.summary
    lines = [f"{'probe set (addons/probes.py)':34} {'current':>9} {'candidate':>9}",
             f"{'attack probes refused (of ' + str(s['attacks']) + ')':34} {s['attacks_refused']['current']:>9} {s['attacks_refused']['candidate']:>9}",
             f"{'everyday probes refused (of ' + str(s['benign']) + ')':34} {s['benign_refused']['current']:>9} {s['benign_refused']['candidate']:>9}"]
    if pg.attacks_passed:
        lines.append(f"attack probes the current model refuses and the candidate passes ({len(pg.attacks_passed)}):")
        lines += _flips(pg.attacks_passed, limit)
    if pg.benign_refused:
        lines.append(f"everyday probes the current model passes and the candidate refuses ({len(pg.benign_refused)}):")
        lines += _flips(pg.benign_refused, limit)
    return "\n".join(lines)


def _pct(v) -> str:
    return "     -" if v is None else f"{100 * v:6.2f}"


def table(current: dict, candidate: dict) -> str:
    rows = [
        ("threshold (score >)", lambda m: f"{m['threshold']:>6}"),
        ("base test n", lambda m: f"{m['base']['n'] if m['base'] else 0:>6}"),
        ("base TPR @ fixed FPR %", lambda m: _pct(m["base_tpr_at_fpr"])),
        ("base TPR @ threshold %", lambda m: _pct(m["base"]["tpr"] if m["base"] else None)),
        ("base FPR @ threshold %", lambda m: _pct(m["base"]["fpr"] if m["base"] else None)),
        ("base ROC AUC %", lambda m: _pct(m["base"]["roc_auc"] if m["base"] else None)),
        ("app held-out n", lambda m: f"{m['app']['n'] if m['app'] else 0:>6}"),
        ("app benign FPR %", lambda m: _pct(m["app"]["fpr"] if m["app"] else None)),
        ("app attack TPR %", lambda m: _pct(m["app"]["tpr"] if m["app"] else None)),
    ]
    lines = [f"{'':26} {'current':>9} {'candidate':>9}"]
    for name, fmt in rows:
        lines.append(f"{name:26} {fmt(current):>9} {fmt(candidate):>9}")
    return "\n".join(lines)


def calibrate_threshold(lm: model.LocalModel, benign: Sequence[Sample], target_fpr: float,
                        low: int = 6, high: int = 9, min_benign: int = 1) -> tuple[int, float | None]:
    """The lowest threshold in low..high whose FPR on the app's benign flows is at most `target_fpr`.

    (threshold, its FPR); `high` when none reaches the target; (low, None) with fewer than `min_benign`
    benign flows (too few to measure an FPR of a few percent).
    """
    if not benign or len(benign) < min_benign:
        return low, None
    scores = [model.proba_to_score(p, lm.operating_point) for p in proba_many(lm, benign)]
    fpr = None
    for t in range(low, high + 1):
        fpr = sum(1 for s in scores if s > t) / len(scores)
        if fpr <= target_fpr:
            return t, fpr
    return high, fpr


# ---- the version registry -----------------------------------------------------------------------------


def history_dir(current: Path) -> Path:
    return current.parent / HISTORY_DIR


def archived(current: Path, version: str) -> Path:
    name = current.name[: -len(model.MODEL_SUFFIX)]
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in version)
    return history_dir(current) / f"{name}-{safe}{model.MODEL_SUFFIX}"


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + dst.name + ".", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(dst: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + dst.name + ".", dir=dst.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, dst)


def archive(current: Path) -> Path:
    """Keep the current model (and card) in the history under its version; returns the archived path."""
    card = model.read_card(current)
    dst = archived(current, str(card.get("version", "unknown")))
    if not dst.exists() or model.sha256_file(dst) != card["sha256"]:
        _atomic_copy(current, dst)
        _atomic_write(model.card_path(dst), json.dumps(card, indent=2, sort_keys=True) + "\n")
    return dst


def install(candidate: Path, current: Path) -> None:
    """Make `candidate` (verified against its card) the current model: archive both, then replace
    the model file and its card, each atomically (temp file + os.replace). A running proxy that sees
    the new model file before the new card fails the sha256 check, keeps its model and tries again."""
    card = model.read_card(candidate)
    if model.sha256_file(candidate) != card["sha256"]:
        raise RetrainError(f"{candidate} does not match its card")
    if current.exists():
        archive(current)
    dst = archived(current, str(card.get("version")))
    if candidate.resolve() != dst.resolve():
        _atomic_copy(candidate, dst)
        _atomic_write(model.card_path(dst), json.dumps(card, indent=2, sort_keys=True) + "\n")
    _atomic_copy(dst, current)
    _atomic_write(model.card_path(current), json.dumps(card, indent=2, sort_keys=True) + "\n")


def rollback(current: Path) -> dict:
    """Return to the current model's parent version (from the history). Returns the restored card."""
    card = model.read_card(current)
    parent = card.get("parent_version")
    if not parent:
        raise RetrainError(f"{current} (version {card.get('version')}) has no parent version to roll back to")
    src = archived(current, str(parent))
    if not src.is_file():
        raise RetrainError(f"parent version {parent} is not in {history_dir(current)}")
    pcard = model.read_card(src)
    if model.sha256_file(src) != pcard["sha256"]:
        raise RetrainError(f"{src} does not match its card: refusing to restore it")
    archive(current)
    _atomic_copy(src, current)
    _atomic_write(model.card_path(current), json.dumps(pcard, indent=2, sort_keys=True) + "\n")
    return pcard


def versions(current: Path) -> list[dict]:
    """Cards in the history, oldest first (by creation time in the card, else file time)."""
    out = []
    for p in sorted(history_dir(current).glob("*" + model.CARD_SUFFIX)):
        try:
            card = json.loads(p.read_text())
        except (OSError, ValueError) as e:  # listed, not hidden: `rollback --list` shows it
            card = {"version": f"(unreadable card {p.name}: {type(e).__name__})"}
        out.append(card if isinstance(card, dict) else {"version": f"(unreadable card {p.name}: not an object)"})
    return sorted(out, key=lambda c: str(c.get("created", "")))


def base_rows(recs: Iterable[dataset.Record]) -> list[tuple[Sample, int]]:
    """(request, 1 for attack) of corpus records: the gate's base test rows, the refit's base rows."""
    return [(sample_of_record(r), int(r.attack)) for r in recs]
