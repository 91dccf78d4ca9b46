"""Retraining from recorded flows: labels, bounded collection, promotion gate, threshold, versions.

A plain module (no mitmproxy import), used by scripts/retrain.py, scripts/rollback.py and the tests.

Labels, strongest first (one label per feature string: the strongest source wins, ties by weight):

* operator: `openflare.label` (addons/labels.py) writes a full, masked record with `label` into the
  `labels` collection; a `label` on a record in `records` counts the same;
* llm: the LLM's score on a recorded flow (>= `llm_attack` attack, <= `llm_benign` benign);
* local: the local model's own score when confident (>= `local_attack` attack, <= `local_benign` benign).

Only full records hold a request: refused flows, flows sampled by `openflare_record_benign_one_in`,
and operator-labelled flows. Brief records are skipped without being decoded further.

Memory stays bounded however many records there are: records are streamed from the store; identical
feature strings are merged (their count and recency weight add up); past `cap` distinct strings the
collector keeps the `cap` strings of lowest hash (a deterministic reservoir: the same store gives the
same sample, and a string is kept or dropped with all its copies). Operator labels have their own cap
and are never pushed out by machine labels.
"""

from __future__ import annotations

import datetime
import hashlib
import heapq
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from addons import dataset
from addons import featurize
from addons import model
from addons import records

LABELS_COLLECTION = "labels"
OPERATOR, LLM, LOCAL = "operator", "llm", "local"
RANK = {OPERATOR: 3, LLM: 2, LOCAL: 1}
HISTORY_DIR = "history"
FEATURE_CACHE = 50_000  # requests whose feature string is remembered while streaming


class RetrainError(Exception):
    """Retraining cannot go on: no labelled data, a broken registry, a missing parent version."""


@dataclass
class Policy:
    """How records become weighted labels."""

    local_attack: int = 9  # local score at or above this, with no LLM verdict: attack
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


def feature_of(rec: dict) -> str:
    """The feature string of a full record: the exported dataset line through `dataset` (as training)."""
    line = records.to_dataset(rec)
    if line is None:
        raise ValueError("not a full record")
    return dataset.parse_record(line, f"record {str(rec.get('_id'))[:16]}", "openflare").feature()


def _priority(feature: str) -> int:
    return int.from_bytes(hashlib.blake2b(feature.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def held_slice(feature: str) -> str:
    """"train", "calibrate" or "gate": a fixed split of the app's labelled strings by hash (80/10/10)."""
    k = _priority(feature) % 10
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
    """Merges labelled feature strings in bounded memory (see the module docstring)."""

    def __init__(self, policy: Policy, cap: int = 50_000, operator_cap: int = 50_000) -> None:
        self.policy = policy
        self.caps = {False: cap, True: operator_cap}
        self.entries: dict[bool, dict[str, Entry]] = {False: {}, True: {}}
        self._heaps: dict[bool, list[tuple[int, str]]] = {False: [], True: []}  # (-priority, feature)
        self._limit: dict[bool, int | None] = {False: None, True: None}  # strings above this priority are out
        self._features: dict[tuple, str] = {}
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
        # Recorded traffic repeats itself: the same request (method, target, headers, body) is featurized
        # once while it stays in a bounded cache.
        key = (rec.get("method"), rec.get("target"), rec.get("body"), repr(rec.get("headers")))
        feature = self._features.get(key)
        if feature is None:
            try:
                feature = feature_of(rec)
            except (ValueError, dataset.DatasetError, TypeError, KeyError):
                self.stats["bad"] += 1
                return
            if len(self._features) >= FEATURE_CACHE:
                self._features.clear()
            self._features[key] = feature
        # An operator label is as fresh as the labelling, however old the flow.
        self.add(feature, got[0], got[1], rec.get("label_time") or rec.get("time"))

    def add(self, feature: str, label: str, source: str, t: datetime.datetime | None = None) -> None:
        self.stats["labelled"] += 1
        self.stats[source] += 1
        op = source == OPERATOR
        entries, heap = self.entries[op], self._heaps[op]
        prio = _priority(feature)
        e = entries.get(feature)
        if e is None:
            limit = self._limit[op]
            if limit is not None and prio >= limit:
                self.stats["dropped_by_cap"] += 1
                return
            e = entries[feature] = Entry(label, source)
            heapq.heappush(heap, (-prio, feature))
            if len(entries) > self.caps[op]:
                neg, gone = heapq.heappop(heap)
                del entries[gone]
                self._limit[op] = -neg
                self.stats["dropped_by_cap"] += 1
                if gone == feature:
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

    def examples(self) -> Iterator[tuple[str, str, str, float]]:
        """(feature, label, source, weight), operator labels winning over machine labels of the same string."""
        ops = self.entries[True]
        for f in sorted(ops):
            e = ops[f]
            yield f, e.label, e.source, e.weight(self.policy)
        mach = self.entries[False]
        for f in sorted(mach):
            e = mach[f]
            if f in ops or e.recency <= 0:
                continue
            yield f, e.label, e.source, e.weight(self.policy)

    def merge(self, other: Collector) -> None:
        """Add another collector's strings (as if its records had been added here), then re-apply the cap."""
        for k, v in other.stats.items():
            self.stats[k] += v
        for op in (False, True):
            mine = self.entries[op]
            for f, e in other.entries[op].items():
                m = mine.get(f)
                if m is None:
                    mine[f] = e
                elif RANK[e.source] > RANK[m.source]:
                    mine[f] = e
                elif RANK[e.source] == RANK[m.source]:
                    if e.label == m.label:
                        m.count += e.count
                        m.recency += e.recency
                    elif op:  # two operator labels disagree across parts: the one with more weight
                        if e.recency > m.recency:
                            mine[f] = e
                    else:
                        m.recency -= e.recency
            limit = min(x for x in (self._limit[op], other._limit[op]) if x is not None) if (
                self._limit[op] is not None or other._limit[op] is not None) else None
            keep = sorted(mine, key=_priority)
            if limit is not None:
                keep = [f for f in keep if _priority(f) < limit]
            if len(keep) > self.caps[op]:
                limit = _priority(keep[self.caps[op]])
                keep = keep[: self.caps[op]]
            dropped = len(mine) - len(keep)
            self.stats["dropped_by_cap"] += dropped
            self.entries[op] = {f: mine[f] for f in keep}
            self._heaps[op] = [(-_priority(f), f) for f in keep]
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
    col._features.clear()
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

_NAME = re.compile(r"(?:(?<=\s)|^)([^\s=]+)=")


def carry(feature: str, payload: str, rng) -> str | None:
    """`feature` (one of the app's benign strings) with one query or body value replaced by `payload`.

    The app's benign text (its parameter names, its words) then occurs in attacks too, so training on
    the app's benign flows teaches where an attack differs from the app, not that the app's words are
    safe. Works on feature strings (all the collector keeps); None when the string has no `name=value`.
    """
    parts = feature.split(featurize.SEP)
    spots = []
    q = parts[0].find(" ?")
    if q >= 0:
        spots.append((0, q + 2))
    spots += [(i, 2) for i, sec in enumerate(parts[1:], 1) if sec.startswith("b ")]
    rng.shuffle(spots)
    for i, start in spots:
        sec = parts[i]
        names = list(_NAME.finditer(sec, start))
        if not names:
            continue
        k = rng.randrange(len(names))
        end = names[k + 1].start() - 1 if k + 1 < len(names) else len(sec.rstrip())
        parts[i] = sec[: names[k].end()] + featurize.normalise(payload) + sec[end:]
        return featurize.SEP.join(parts)
    return None


# ---- evaluation and the promotion gate ----------------------------------------------------------------


def threshold_of(lm: model.LocalModel, default: int = 6) -> int:
    t = lm.card.get("threshold", default)
    return t if isinstance(t, int) and 1 <= t <= 10 else default


def evaluate(lm: model.LocalModel, base: list[tuple[str, int]], app_gate: list[tuple[str, int]],
             max_fpr: float = 0.01, threshold: int | None = None, progress=None) -> dict:
    """Figures of one model: base test TPR at `max_fpr` and at its threshold, FPR; app slice FPR/TPR."""
    t = threshold if threshold is not None else threshold_of(lm)
    out: dict = {"threshold": t, "base": None, "app": None, "base_tpr_at_fpr": None}
    for name, rows in (("base", base), ("app", app_gate)):
        if not rows:
            continue
        y = [lab for _, lab in rows]
        p = []
        for i in range(0, len(rows), 2000):
            p.extend(lm.proba([f for f, _ in rows[i : i + 2000]]))
            if progress:
                progress(min(2000, len(rows) - i))
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


def calibrate_threshold(lm: model.LocalModel, benign_features: list[str], target_fpr: float,
                        low: int = 6, high: int = 9, min_benign: int = 1) -> tuple[int, float | None]:
    """The lowest threshold in low..high whose FPR on the app's benign flows is at most `target_fpr`.

    (threshold, its FPR); `high` when none reaches the target; (low, None) with fewer than `min_benign`
    benign flows (too few to measure an FPR of a few percent).
    """
    if not benign_features or len(benign_features) < min_benign:
        return low, None
    scores = [model.proba_to_score(p, lm.operating_point) for p in lm.proba(benign_features)]
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
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda c: str(c.get("created", "")))


def base_rows(recs: Iterable[dataset.Record]) -> list[tuple[str, int]]:
    return [(r.feature(), int(r.attack)) for r in recs]
