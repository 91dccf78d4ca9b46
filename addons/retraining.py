"""Retraining from recorded flows: labels, bounded collection, the fine-tune, promotion gate, threshold, versions.

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

The candidate is a fine-tune of the current Detector (`finetune`): same hashed n-gram space and idf
(plus buckets it ignored that the new rows use), float32 TF-IDF rows built from int32 n-gram counts
(`term_rows`, `tfidf_rows`), and L-BFGS from the current weights with an L2 pull toward them, moving
only the weights of the n-grams the app's rows contain. Its memory is bounded by the row caps, not by
the number of recorded flows.

The promotion gate compares candidate and current model on held-out data (`evaluate`, `gate`) and on
the fixed probe set of `addons.probes` (`probe_gate`): a candidate that lets through an attack probe
the current model refuses is refused, whatever the operator's labels say.
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

import numpy as np

from addons import dataset
from addons import detector
from addons import featurize
from addons import model
from addons import probes
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


# ---- the candidate as a fine-tune of the current model ------------------------------------------------


def _terms(features: list[str], bits: int, header_block: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segment lengths, buckets, counts) of the hashed n-grams of `features`, two segments per string
    (`detector.segment_terms`: as Detector.supervised_proba weighs them). int32 buckets, uint16 counts
    (a count cannot pass 65535 within featurize's size caps; clipped if it ever did)."""
    rows = [seg for f in features for seg in detector.segment_terms(f, bits, header_block)]
    lens = np.fromiter((len(r[0]) for r in rows), dtype=np.int64, count=len(rows))
    if not rows:
        return lens, np.zeros(0, np.int32), np.zeros(0, np.uint16)
    return (lens, np.concatenate([r[0] for r in rows]).astype(np.int32),
            np.minimum(np.concatenate([r[1] for r in rows]), 65535).astype(np.uint16))


def _terms_job(job):
    return _terms(*job)


def term_rows(features: list[str], bits: int, workers: int = 1, progress=None, chunk: int = 2000,
              header_block: bool = False):
    """The hashed n-gram counts of every feature string as CSR parts over 2 segments per string
    (indptr of length 2n+1, buckets, counts; see `_terms`): 6 bytes per distinct n-gram of a segment.
    `header_block`: the model's (Detector.header_block). `workers` processes share the hashing."""
    jobs = [(features[i : i + chunk], bits, header_block) for i in range(0, len(features), chunk)]
    parts = []
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for (lens, idx, cnt), job in zip(pool.imap(_terms_job, jobs), jobs):
                parts.append((lens, idx, cnt))
                if progress:
                    progress(len(job[0]))
    else:
        for job in jobs:
            parts.append(_terms(*job))
            if progress:
                progress(len(job[0]))
    indptr = np.zeros(2 * len(features) + 1, dtype=np.int64)
    if parts:
        indptr[1:] = np.cumsum(np.concatenate([p[0] for p in parts]))
    idx = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    cnt = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.uint16)
    return indptr, idx, cnt


def extend_idf(idf: np.ndarray, indptr: np.ndarray, idx: np.ndarray, min_df: int) -> tuple[np.ndarray, int]:
    """The parent's idf, plus buckets it ignores (idf 0) that occur in at least `min_df` of these rows:
    the app's own n-grams join the feature space (idf from their document frequency here, as
    detector.tfidf_matrix computes it). Buckets the parent uses keep their idf, so the parent's weights
    keep their meaning. Returns (new idf, number of buckets added). A bucket found in both segments of
    one string (request and header n-grams hashed apart, colliding) counts twice here: rare, and only
    for deciding which new buckets join."""
    n = (len(indptr) - 1) // 2
    df = np.bincount(idx, minlength=len(idf))  # buckets are distinct within a segment
    new = (idf == 0) & (df >= max(min_df, 1))
    out = idf.astype(np.float32).copy()
    out[new] = (np.log((1.0 + n) / (1.0 + df[new])) + 1.0).astype(np.float32)
    return out, int(new.sum())


def tfidf_rows(indptr: np.ndarray, idx: np.ndarray, cnt: np.ndarray, idf: np.ndarray, block: int = 4096,
               header_scale: float = 1.0):
    """Sublinear-tf TF-IDF rows (what Detector.supervised_proba computes): each segment l2-normalised on
    its own, header segments times `header_scale` (the model's), a string's two segments one row.
    float32 CSR over the compact columns in use: (matrix, the bucket of each column). Written `block`
    strings at a time into arrays of the final size (8 bytes per non-zero), so the temporaries stay
    small. A bucket in both segments of a string appears twice in its row (products sum them)."""
    from scipy import sparse

    nseg = len(indptr) - 1
    n = nseg // 2
    blocks = [(r0, min(r0 + 2 * block, nseg)) for r0 in range(0, nseg, 2 * block)]
    nnz = sum(int(np.count_nonzero(idf[idx[indptr[r0] : indptr[r1]]])) for r0, r1 in blocks)
    data = np.empty(nnz, dtype=np.float32)
    ind = np.empty(nnz, dtype=np.int32)
    seglen = np.zeros(nseg, dtype=np.int64)
    used = np.zeros(len(idf), dtype=bool)
    scale = np.ones(2 * block, dtype=np.float32)
    scale[1::2] = header_scale
    at = 0
    for r0, r1 in blocks:
        lo, hi = indptr[r0], indptr[r1]
        bi = idx[lo:hi]
        v = (1.0 + np.log(cnt[lo:hi].astype(np.float32))) * idf[bi]
        segid = np.repeat(np.arange(r1 - r0), np.diff(indptr[r0 : r1 + 1]))
        norms = np.sqrt(np.bincount(segid, weights=v * v, minlength=r1 - r0)).astype(np.float32)
        norms[norms == 0] = 1.0
        v *= (scale[: r1 - r0] / norms)[segid]
        keep = v != 0
        seglen[r0:r1] = np.bincount(segid[keep], minlength=r1 - r0)
        k = int(keep.sum())
        data[at : at + k] = v[keep]
        ind[at : at + k] = bi[keep]
        at += k
    used[ind] = True
    cols = np.flatnonzero(used)
    remap = np.zeros(len(idf), dtype=np.int32)
    remap[cols] = np.arange(len(cols), dtype=np.int32)
    for lo in range(0, nnz, 1 << 22):
        ind[lo : lo + (1 << 22)] = remap[ind[lo : lo + (1 << 22)]]
    new_ptr = np.zeros(n + 1, dtype=np.int32 if nnz < 2**31 else np.int64)  # as scipy would make it: no copy
    new_ptr[1:] = np.cumsum(seglen.reshape(n, 2).sum(axis=1))
    return sparse.csr_matrix((data, ind, new_ptr), shape=(n, len(cols)), copy=False), cols


def request_buckets(indptr: np.ndarray, idx: np.ndarray, first_row: int, end_row: int | None = None) -> np.ndarray:
    """The distinct buckets of the request segments (not the header sections) of the strings
    `first_row` .. `end_row` (default: the last), in `term_rows` parts: what a fine-tune lets the app's
    rows move."""
    n = (len(indptr) - 1) // 2 if end_row is None else end_row
    parts = [idx[indptr[2 * r] : indptr[2 * r + 1]] for r in range(first_row, n)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=idx.dtype)


def finetune(parent: detector.Detector, X, cols: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, C: float,
             idf: np.ndarray, anchor_rows: int = 0, maxiter: int = 100, ftol: float = 1e-6,
             progress=None, free_buckets: np.ndarray | None = None) -> tuple[detector.Detector, dict]:
    """Logistic regression warm-started at the parent's weights and regularised toward them:

        minimise  C * sum_i s_i c_(y_i) log(1 + exp(-y_i (x_i . w + b)))  +  1/2 |w - w_parent|^2  +  1/2 (b - b_parent)^2

    (train.py's liblinear objective, class_weight="balanced" as c_y, with the L2 term centred on the
    parent instead of 0), by L-BFGS-B. Only the weights of the buckets that the rows after the first
    `anchor_rows` use (the app's rows) are free, with the intercept; every other weight stays the
    parent's (the anchor rows, a sample of the base training set, see them as a fixed offset). So the
    app's data moves what it speaks to, as far as the base rows that share those n-grams allow.
    `free_buckets` narrows the free weights further (scripts/retrain.py: the app's request n-grams,
    not its header sections: an app's few clients would otherwise teach "this browser is an attacker").
    Returns (the candidate Detector, without profile; fit figures)."""
    import scipy.optimize
    from scipy.special import expit

    ys = np.where(y > 0, 1.0, -1.0)
    counts = np.bincount(y.astype(np.int64), minlength=2)
    cw = len(y) / (2.0 * np.maximum(counts, 1))  # scikit-learn's "balanced"
    s = C * sample_weight * cw[y.astype(np.int64)]
    coef0 = np.asarray(parent.coef, dtype=np.float32)[cols]
    free = np.zeros(X.shape[1], dtype=bool)
    free[X.indices[X.indptr[anchor_rows] :]] = True
    if free_buckets is not None:
        free &= np.isin(cols, free_buckets)
    fixed_w = np.where(free, 0.0, coef0).astype(np.float32)
    offset = (X @ fixed_w).astype(np.float64)  # the fixed weights' part of every row's score
    free_cols = np.flatnonzero(free)
    Xf = X[:, free_cols]
    Xft = Xf.T  # a CSC view: no copy
    theta0 = np.append(coef0[free_cols].astype(np.float64), parent.intercept)
    evals = 0

    def fun(theta):
        nonlocal evals
        evals += 1
        z = (Xf @ theta[:-1].astype(np.float32)).astype(np.float64) + offset + theta[-1]
        m = ys * z
        d = theta - theta0
        f = float(s @ np.logaddexp(0.0, -m)) + 0.5 * float(d @ d)
        gz = -s * ys * expit(-m)
        gz[np.abs(gz) < 1e-30] = 0.0  # no float32 denormals in the product below
        g = np.empty_like(theta)
        g[:-1] = Xft @ gz.astype(np.float32)
        g[-1] = gz.sum()
        return f, g + d

    f0 = fun(theta0)[0]
    trace = []

    def step(intermediate_result):
        trace.append(float(intermediate_result.fun))
        if progress:
            progress(1)

    res = scipy.optimize.minimize(fun, theta0, jac=True, method="L-BFGS-B", callback=step,
                                  options={"maxiter": maxiter, "ftol": ftol})
    coef = np.asarray(parent.coef, dtype=np.float32).copy()
    coef[cols[free_cols]] = res.x[:-1].astype(np.float32)
    coef[idf == 0] = 0.0
    det = detector.Detector(idf, coef, float(res.x[-1]), bits=parent.bits, violation_p=parent.violation_p)
    det.header_block, det.header_scale = parent.header_block, parent.header_scale  # the parent's feature space
    moved = np.abs(res.x[:-1] - theta0[:-1])
    info = {"iterations": int(res.nit), "evaluations": evals, "converged": bool(res.success), "message": str(res.message),
            "objective": {"at_parent": f0, "final": float(res.fun)}, "rows": int(X.shape[0]), "anchor_rows": int(anchor_rows),
            "free_weights": int(len(free_cols)), "weights_moved_over_0.01": int((moved > 0.01).sum()),
            "objective_after": {str(k): trace[k - 1] for k in (10, 25, 50) if k <= len(trace)}}
    return det, info


# ---- evaluation and the promotion gate ----------------------------------------------------------------


def threshold_of(lm: model.LocalModel, default: int = 6) -> int:
    t = lm.card.get("threshold", default)
    return t if isinstance(t, int) and 1 <= t <= 10 else default


_SCORING: tuple | None = None  # (model, features) for forked scoring processes


def _score_chunk(bounds: tuple[int, int]) -> list[float]:
    lm, features = _SCORING
    return lm.proba(features[bounds[0] : bounds[1]])


def proba_many(lm: model.LocalModel, features: list[str], workers: int = 1, progress=None, chunk: int = 2000) -> list[float]:
    """lm.proba over many strings in chunks; with `workers` > 1, in that many forked processes."""
    global _SCORING
    bounds = [(i, min(i + chunk, len(features))) for i in range(0, len(features), chunk)]
    out: list[float] = []
    if workers > 1 and len(bounds) > 1:
        import multiprocessing

        _SCORING = (lm, features)
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
        out.extend(lm.proba(features[i:j]))
        if progress:
            progress(j - i)
    return out


def evaluate(lm: model.LocalModel, base: list[tuple[str, int]], app_gate: list[tuple[str, int]],
             max_fpr: float = 0.01, threshold: int | None = None, progress=None, workers: int = 1) -> dict:
    """Figures of one model: base test TPR at `max_fpr` and at its threshold, FPR; app slice FPR/TPR."""
    t = threshold if threshold is not None else threshold_of(lm)
    out: dict = {"threshold": t, "base": None, "app": None, "base_tpr_at_fpr": None}
    for name, rows in (("base", base), ("app", app_gate)):
        if not rows:
            continue
        y = [lab for _, lab in rows]
        p = proba_many(lm, [f for f, _ in rows], workers, progress)
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
    `benign_slack` more everyday probes than it. Each probe is featurized and scored as the addons do
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
            card = json.loads(p.read_text())
        except (OSError, ValueError) as e:  # listed, not hidden: `rollback --list` shows it
            card = {"version": f"(unreadable card {p.name}: {type(e).__name__})"}
        out.append(card if isinstance(card, dict) else {"version": f"(unreadable card {p.name}: not an object)"})
    return sorted(out, key=lambda c: str(c.get("created", "")))


def base_rows(recs: Iterable[dataset.Record]) -> list[tuple[str, int]]:
    return [(r.feature(), int(r.attack)) for r in recs]
