"""addons/retraining.py: label precedence, bounded dedupe, streaming from both stores, gate, threshold, versions."""

import datetime
import json
import time

import joblib
import mongomock
import numpy as np
import pytest

from addons import detector
from addons import model
from addons import records
from addons import retraining

NOW = datetime.datetime(2026, 11, 21, 12, 0, 0)


def cap(i, target=b"/app?q=hello", verdict="pass", local=2, llm=None, label=None, body=b"", t=None):
    c = {"time": t if t is not None else time.time() - 60 + i * 0.001, "client_ip": "198.51.100.9", "verdict": verdict,
         "score": local, "full": True, "method": b"GET", "target": target, "headers": ((b"Host", b"app"),), "body": body,
         "body_size": len(body), "local_score": local, "llm_score": llm, "category": None, "model_version": "m-1",
         "refused_by": "score" if verdict == "block" else None, "status": 200, "error": None, "sampled": verdict == "pass"}
    return c


def rec(**kw):
    r = records.build(cap(0, **kw), records.Masker())
    if kw.get("label"):
        r["label"] = kw["label"]
    return r


def test_label_precedence_and_confidence():
    pol = retraining.Policy()
    assert retraining.label_of(rec(label="benign", verdict="block", local=10, llm=9), pol) == ("benign", "operator")
    assert retraining.label_of(rec(verdict="block", local=10, llm=2), pol) == ("benign", "llm")
    assert retraining.label_of(rec(verdict="block", local=5, llm=8), pol) == ("attack", "llm")
    assert retraining.label_of(rec(verdict="pass", local=5, llm=5), pol) is None  # the LLM was unsure
    assert retraining.label_of(rec(verdict="block", local=9), pol) == ("attack", "local")
    assert retraining.label_of(rec(verdict="block", local=7), pol) is None  # not confident
    assert retraining.label_of(rec(verdict="pass", local=2), pol) == ("benign", "local")
    assert retraining.label_of(rec(verdict="pass", local=4), pol) is None
    brief = records.build({"time": 1.0, "client_ip": "x", "verdict": "pass", "score": 1, "full": False}, records.Masker())
    col = retraining.Collector(pol)
    col.add_record(brief)
    assert col.stats["full"] == 0 and len(col) == 0


def test_operator_wins_and_duplicates_merge():
    pol = retraining.Policy(now=NOW)
    col = retraining.Collector(pol)
    for _ in range(1000):
        col.add("get /a ?q=select a size", "attack", "local", NOW)
    col.add("get /a ?q=select a size", "benign", "operator", NOW)
    col.add("get /b ?q=x", "attack", "llm", NOW)
    col.add("get /b ?q=x", "benign", "local", NOW)  # weaker: ignored
    for _ in range(1000):
        col.add("get /c ?q=y", "benign", "local", NOW)
    ex = {f: (lab, src, w) for f, lab, src, w in col.examples()}
    assert ex["get /a ?q=select a size"] == ("benign", "operator", 10.0)
    assert ex["get /b ?q=x"][:2] == ("attack", "llm")
    lab, src, w = ex["get /c ?q=y"]
    assert (lab, src) == ("benign", "local") and 0.5 < w < 0.5 * 9  # damped: 1000 copies weigh ~8x one copy
    # Operator relabels replace; recency halves per half-life.
    col.add("get /a ?q=select a size", "attack", "operator", NOW)
    assert dict((f, lab) for f, lab, *_ in col.examples())["get /a ?q=select a size"] == "attack"
    assert pol.recency(NOW - datetime.timedelta(days=7)) == pytest.approx(0.5)


def test_cap_is_a_deterministic_reservoir():
    def run(order):
        col = retraining.Collector(retraining.Policy(now=NOW), cap=50)
        for i in order:
            col.add(f"get /p{i}", "benign", "local", NOW)
            col.add(f"get /p{i}", "benign", "local", NOW)  # a kept string keeps its copies
        return {f: w for f, _, _, w in col.examples()}, col.stats["dropped_by_cap"]

    a, dropped = run(range(500))
    b, _ = run(reversed(range(500)))
    assert len(a) == 50 and a == b and dropped >= 450
    keep = sorted(range(500), key=lambda i: retraining._priority(f"get /p{i}"))[:50]
    assert set(a) == {f"get /p{i}" for i in keep}


@pytest.mark.parametrize("kind", ["embedded", "mongomock"])
def test_collect_streams_records_and_labels(kind, tmp_path):
    if kind == "embedded":
        store = records.open_store(directory=tmp_path / "store")
    else:
        store = records.Store(mongomock.MongoClient().openflare.records, "mongomock")
    w = records.Writer(store, tmp_path / "spill.jsonl", "t")
    caps = [cap(i, target=b"/app?q=one") for i in range(20)]
    caps += [cap(i, target=b"/app?q=%27%20or%201=1--", verdict="block", local=10) for i in range(5)]
    caps += [{"time": time.time(), "client_ip": "x", "verdict": "pass", "score": 1, "full": False} for _ in range(30)]
    w.write(caps)
    labelled = records.build(cap(0, target=b"/app?q=union+square", verdict="block", local=10), records.Masker())
    labelled.update(_id="flow-1", label="benign", label_source="operator", label_time=records.utcnow())
    retraining.labels_store(store).coll.insert_one(labelled)
    seen = []
    col = retraining.collect(store, retraining.Policy(), progress=seen.append)
    assert col.stats["full"] == 26 and col.stats["operator"] == 1  # brief records are skipped unread
    ex = {f: (lab, src) for f, lab, src, _ in col.examples()}
    assert len(ex) == 3 and sum(seen) >= 26
    assert ex[next(f for f in ex if "union square" in f)] == ("benign", "operator")
    assert ex[next(f for f in ex if "one" in f)] == ("benign", "local")
    assert sorted(lab for lab, _ in ex.values()) == ["attack", "benign", "benign"]
    store.close()


def _det(weight_on: str) -> detector.Detector:
    """A Detector whose only weight is on the n-grams of `weight_on` (attack when present)."""
    idf = np.ones(1 << 12, dtype=np.float32)
    coef = np.zeros(1 << 12, dtype=np.float32)
    idx, _ = detector.term_counts(weight_on, 12)
    neutral, _ = detector.term_counts("get /x /app ?q=tea hello world recipe", 12)
    coef[np.setdiff1d(idx, neutral)] = 40.0
    return detector.Detector(idf, coef, -4.0, bits=12)


def _save(det, path, **card):
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(det, path)
    model.write_card(path, {"operating_point": 0.5, **card})
    return model.load(str(path))


def test_gate_calibration_and_table(tmp_path):
    cur = _save(_det("zzqq"), tmp_path / "cur.joblib", version="a", threshold=6)
    base = [("get /x ?q=zzqq", 1), ("get /x ?q=hello", 0), ("get /x ?q=zzqq zzqq", 1), ("get /x ?q=world", 0)]
    app = [("get /app ?q=zzqq recipe", 0), ("get /app ?q=tea", 0)]
    m = retraining.evaluate(cur, base, app, 0.01)
    assert m["base_tpr_at_fpr"] == 1.0 and m["app"]["fpr"] == 0.5
    worse = dict(m, base_tpr_at_fpr=0.5)
    assert not retraining.gate(m, worse).promote
    assert "drops" in retraining.gate(m, worse).reasons[0]
    higher_fpr = json.loads(json.dumps(m))
    higher_fpr["app"]["fpr"] = 0.9
    assert not retraining.gate(m, higher_fpr).promote
    assert retraining.gate(m, m).promote
    assert "app benign FPR" in retraining.table(m, m)
    # Calibration: the lowest threshold meeting the target FPR on the app's benign strings.
    t, fpr = retraining.calibrate_threshold(cur, ["get /app ?q=zzqq"] + ["get /app ?q=tea"] * 9, 0.2)
    assert (t, fpr) == (6, 0.1)
    t, fpr = retraining.calibrate_threshold(cur, ["get /app ?q=zzqq"] * 5 + ["get /app ?q=tea"] * 5, 0.01)
    assert t == 9 and fpr == 0.5  # never reached: the highest threshold, and its FPR said


def test_install_history_and_rollback(tmp_path):
    cur_path = tmp_path / "models" / "openflare-local.joblib"
    _save(_det("aaa"), cur_path, version="v1")
    cand = tmp_path / "models" / "candidate.joblib"
    _save(_det("bbb"), cand, version="v2", parent_version="v1")
    retraining.install(cand, cur_path)
    assert model.load(str(cur_path)).version == "v2"
    assert retraining.archived(cur_path, "v1").is_file() and retraining.archived(cur_path, "v2").is_file()
    assert [c["version"] for c in retraining.versions(cur_path)] == ["v1", "v2"] or len(retraining.versions(cur_path)) == 2
    restored = retraining.rollback(cur_path)
    assert restored["version"] == "v1" and model.load(str(cur_path)).version == "v1"
    with pytest.raises(retraining.RetrainError, match="no parent"):
        retraining.rollback(cur_path)
    # A tampered archive is refused.
    _save(_det("ccc"), cand, version="v3", parent_version="v1")
    retraining.install(cand, cur_path)
    old = retraining.archived(cur_path, "v1")
    old.write_bytes(old.read_bytes() + b"x")
    with pytest.raises(retraining.RetrainError, match="does not match"):
        retraining.rollback(cur_path)
    assert model.load(str(cur_path)).version == "v3"


async def test_scorer_reload_verifies_and_swaps_and_uses_the_card_threshold(tmp_path, caplog):
    from mitmproxy.test import taddons

    from addons import scorer

    cur_path = tmp_path / "models" / "openflare-local.joblib"
    _save(_det("aaa"), cur_path, version="v1", threshold=6)
    sc = scorer.Scorer()
    with taddons.context(sc) as tctx:
        tctx.configure(sc, openflare_model=str(cur_path), openflare_llm_enabled=False)
        assert sc.model.version == "v1" and sc.threshold == 6
        cand = tmp_path / "models" / "candidate.joblib"
        _save(_det("bbb"), cand, version="v2", parent_version="v1", threshold=8)
        retraining.install(cand, cur_path)
        taken = sc.model
        assert await sc.reload() is True
        assert sc.model.version == "v2" and sc.threshold == 8  # the card's calibrated threshold
        assert taken.version == "v1"  # a request holding the old model finishes on it
        tctx.configure(sc, openflare_threshold=7)  # pinned by the user: wins over the card
        assert sc.threshold == 7
        tctx.configure(sc, openflare_threshold=None)
        assert sc.threshold == 8
        # A model file that does not match its card is never swapped in.
        cur_path.write_bytes(cur_path.read_bytes() + b"tampered")
        assert await sc.reload() is False
        assert sc.model.version == "v2"
        assert any(r.levelname == "WARNING" and "kept model v2" in r.getMessage() for r in caplog.records)
        assert not any(r.levelname == "ERROR" for r in caplog.records)


async def test_scorer_file_watch_picks_up_a_promotion(tmp_path):
    import asyncio

    from mitmproxy.test import taddons

    from addons import scorer

    cur_path = tmp_path / "models" / "openflare-local.joblib"
    _save(_det("aaa"), cur_path, version="v1")
    sc = scorer.Scorer()
    with taddons.context(sc) as tctx:
        tctx.configure(sc, openflare_model=str(cur_path), openflare_llm_enabled=False, openflare_model_watch=1)
        sc.running()
        try:
            cand = tmp_path / "models" / "candidate.joblib"
            _save(_det("bbb"), cand, version="v2", parent_version="v1")
            retraining.install(cand, cur_path)
            for _ in range(100):
                if sc.model.version == "v2":
                    break
                await asyncio.sleep(0.1)
            assert sc.model.version == "v2"
        finally:
            sc.done()


def test_parallel_collection_equals_serial(tmp_path):
    store = records.open_store(directory=tmp_path / "store")
    w = records.Writer(store, tmp_path / "spill.jsonl", "t")
    caps = []
    for i in range(300):
        caps.append(cap(i, target=f"/app?q=item{i % 40}".encode()))
        caps.append(cap(i, target=f"/app?id={i % 25}%27%20or%201=1--".encode(), verdict="block", local=10))
    w.write(caps)
    labelled = records.build(cap(0, target=b"/app?q=item3"), records.Masker())
    labelled.update(_id="op-1", label="attack", label_source="operator", label_time=NOW)
    retraining.labels_store(store).coll.insert_one(labelled)
    pol = retraining.Policy(now=NOW)
    serial = retraining.collect(store, pol, cap=30)
    parallel = retraining.collect(store, pol, cap=30, workers=2)
    assert [e[:3] for e in serial.examples()] == [e[:3] for e in parallel.examples()]
    assert [e[3] for e in serial.examples()] == pytest.approx([e[3] for e in parallel.examples()])
    assert len(serial) == 31 and serial.stats["operator"] == parallel.stats["operator"] == 1
    store.close()


def test_carry_puts_a_payload_into_one_value():
    import random

    f = "post /pantry/comments ‖h user-agent: x ‖b comment=select a pan name=zoë recipe=12"
    out = {retraining.carry(f, "1' OR '1'='1", random.Random(s)) for s in range(20)}
    assert "post /pantry/comments ‖h user-agent: x ‖b comment=1' or '1'='1 name=zoë recipe=12" in out
    assert "post /pantry/comments ‖h user-agent: x ‖b comment=select a pan name=zoë recipe=1' or '1'='1" in out
    assert retraining.carry("get /pantry/img ‖h user-agent: x", "x", random.Random(0)) is None


BASE = [f"get /shop/item ?id={i} ‖h user-agent: x" for i in range(40)] + [
    f"get /shop/item ?id={i}' union select password from users-- ‖h user-agent: x" for i in range(40)]
APP = [f"post /pantry/notes ‖h user-agent: x ‖b note=select the union of flour {i}" for i in range(30)]


def parent_detector(bits=12):
    """A small Detector fitted on BASE, as train.py fits one."""
    from sklearn.linear_model import LogisticRegression

    X, idf = detector.tfidf_matrix(BASE, bits=bits, min_df=2)
    y = [0] * 40 + [1] * 40
    clf = LogisticRegression(C=8.0, class_weight="balanced", solver="liblinear").fit(X, y)
    coef = clf.coef_[0].astype(np.float32)
    coef[idf == 0] = 0.0
    return detector.Detector(idf, coef, float(clf.intercept_[0]), bits=bits)


@pytest.mark.parametrize("header_block", [True, False])
def test_tfidf_rows_are_what_the_detector_computes(header_block):
    det = parent_detector()
    det.header_block = header_block  # False: a model pickled before the header block (one block)
    feats = BASE[::7] + APP[:5] + ["get /x ?q=1", "get /y ‖h user-agent: mozilla/5.0 (x11) cookie: a=1"]
    parts = retraining.term_rows(feats, det.bits, header_block=header_block)
    assert all(np.array_equal(a, b) for a, b in zip(parts, retraining.term_rows(feats, det.bits, workers=2, chunk=3, header_block=header_block)))
    X, cols = retraining.tfidf_rows(*parts, det.idf, header_scale=det.header_scale)
    Xb, colsb = retraining.tfidf_rows(*parts, det.idf, block=3, header_scale=det.header_scale)
    assert np.array_equal(cols, colsb) and (X != Xb).nnz == 0
    if header_block:
        dense, _ = detector.tfidf_matrix(feats, bits=det.bits, idf=det.idf)
        assert np.allclose(X.toarray(), dense.toarray()[:, cols], atol=1e-6)
        assert (dense.toarray()[:, np.setdiff1d(np.arange(1 << det.bits), cols)] == 0).all()
    z = X @ det.coef[cols] + det.intercept
    assert np.allclose(1 / (1 + np.exp(-z)), [det.supervised_proba(f) for f in feats], atol=1e-5)


def test_extend_idf_adds_only_buckets_the_parent_ignores():
    det = parent_detector()
    indptr, idx, _ = retraining.term_rows(APP, det.bits, header_block=True)
    idf, added = retraining.extend_idf(det.idf, indptr, idx, min_df=3)
    used = det.idf > 0
    assert np.array_equal(idf[used], det.idf[used])
    assert added == int(((idf > 0) & ~used).sum()) > 0
    assert retraining.extend_idf(det.idf, indptr, idx, min_df=len(APP) + 1)[1] == 0


def test_finetune_moves_what_the_app_speaks_to_and_keeps_the_rest():
    det = parent_detector()
    before = [det.supervised_proba(f) for f in APP]
    assert min(before) > 0.5, "the parent should call the app's notes attacks"
    feats = BASE + APP
    indptr, idx, cnt = retraining.term_rows(feats, det.bits, header_block=det.header_block)
    idf, _ = retraining.extend_idf(det.idf, indptr, idx, min_df=2)
    X, cols = retraining.tfidf_rows(indptr, idx, cnt, idf, header_scale=det.header_scale)
    y = np.array([0] * 40 + [1] * 40 + [0] * 30)
    tuned, info = retraining.finetune(det, X, cols, y, np.ones(len(y)), 8.0, idf, anchor_rows=len(BASE))
    assert max(tuned.supervised_proba(f) for f in APP) < 0.5
    assert min(tuned.supervised_proba(f) for f in BASE[40:]) > 0.5  # the base attacks are still attacks
    app_buckets = np.zeros(1 << det.bits, dtype=bool)
    app_buckets[idx[indptr[2 * len(BASE)] :]] = True  # two segments per string
    assert np.array_equal(tuned.coef[~app_buckets], det.coef[~app_buckets])  # untouched by the app: the parent's
    assert info["free_weights"] == int((app_buckets & (idf > 0)).sum()) and info["objective"]["final"] < info["objective"]["at_parent"]
    # Without a data term (C = 0) the candidate is the parent.
    same, _ = retraining.finetune(det, X, cols, y, np.ones(len(y)), 0.0, idf, anchor_rows=len(BASE))
    assert np.allclose(same.coef, np.where(idf > 0, det.coef, 0.0)) and same.intercept == pytest.approx(det.intercept)
    assert (same.header_block, same.header_scale) == (det.header_block, det.header_scale)


def test_finetune_with_request_buckets_leaves_header_weights_alone():
    # An app's few clients send the same headers with its benign and its attack traffic: the fine-tune
    # must not learn "this client is an attacker" from them. Only the app's request n-grams move.
    det = parent_detector()
    feats = BASE + APP
    indptr, idx, cnt = retraining.term_rows(feats, det.bits, header_block=True)
    idf, _ = retraining.extend_idf(det.idf, indptr, idx, min_df=2)
    X, cols = retraining.tfidf_rows(indptr, idx, cnt, idf, header_scale=det.header_scale)
    y = np.array([0] * 40 + [1] * 40 + [0] * 30)
    req = retraining.request_buckets(indptr, idx, len(BASE))
    hdr, _ = detector.term_counts("‖h user-agent: x".split(" ", 1)[1], det.bits, True)
    hdr = np.setdiff1d(hdr, req)  # header buckets that no request n-gram shares
    assert len(hdr) and len(req)
    tuned, info = retraining.finetune(det, X, cols, y, np.ones(len(y)), 8.0, idf, anchor_rows=len(BASE), free_buckets=req)
    assert np.array_equal(tuned.coef[hdr], np.where(idf[hdr] > 0, det.coef[hdr], 0.0))
    assert max(tuned.supervised_proba(f) for f in APP) < 0.5  # the app's notes still learnt as benign
    loose, _ = retraining.finetune(det, X, cols, y, np.ones(len(y)), 8.0, idf, anchor_rows=len(BASE))
    assert not np.array_equal(loose.coef[hdr], det.coef[hdr])  # without the restriction they would move


def test_request_buckets_take_only_the_requests_of_the_rows_asked():
    feats = ["get /a ?q=1 ‖h user-agent: x", "get /b ?q=2 ‖h user-agent: y", "get /c ?q=3"]
    indptr, idx, _ = retraining.term_rows(feats, 12, header_block=True)
    got = retraining.request_buckets(indptr, idx, 1, 2)
    assert np.array_equal(got, detector.term_counts("get /b ?q=2", 12)[0])
    assert np.array_equal(retraining.request_buckets(indptr, idx, 2), detector.term_counts("get /c ?q=3", 12)[0])
