"""addons/retraining.py: label precedence, bounded dedupe, streaming from both stores, carry, the refit, gate,
threshold, versions."""

import datetime
import json
import time

import mongomock
import pytest

import models
from addons import fields as fieldsmod
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
    assert retraining.label_of(rec(verdict="block", local=10), pol) is None  # its own refusal is no evidence
    opt_in = retraining.Policy(local_attack=9)
    assert retraining.label_of(rec(verdict="block", local=9), opt_in) == ("attack", "local")
    assert retraining.label_of(rec(verdict="block", local=7), opt_in) is None  # not confident
    assert retraining.label_of(rec(verdict="pass", local=2), pol) == ("benign", "local")
    assert retraining.label_of(rec(verdict="pass", local=4), pol) is None
    brief = records.build({"time": 1.0, "client_ip": "x", "verdict": "pass", "score": 1, "full": False}, records.Masker())
    col = retraining.Collector(pol)
    col.add_record(brief)
    assert col.stats["full"] == 0 and len(col) == 0


def req(target, method="GET", headers=(("Host", "app"),), body=b""):
    return retraining.sample(method, target, headers, body)


def test_operator_wins_and_duplicates_merge():
    pol = retraining.Policy(now=NOW)
    col = retraining.Collector(pol)
    a, b, c = req("/a?q=select+a+size"), req("/b?q=x"), req("/c?q=y")
    for _ in range(1000):
        col.add(a, "attack", "local", NOW)
    col.add(a, "benign", "operator", NOW)
    col.add(b, "attack", "llm", NOW)
    col.add(b, "benign", "local", NOW)  # weaker: ignored
    for _ in range(1000):
        col.add(c, "benign", "local", NOW)
    ex = {s: (lab, src, w) for s, lab, src, w in col.examples()}
    assert ex[a] == ("benign", "operator", 10.0)
    assert ex[b][:2] == ("attack", "llm")
    lab, src, w = ex[c]
    assert (lab, src) == ("benign", "local") and 0.5 < w < 0.5 * 9  # damped: 1000 copies weigh ~8x one copy
    # Operator relabels replace; recency halves per half-life.
    col.add(a, "attack", "operator", NOW)
    assert dict((s, lab) for s, lab, *_ in col.examples())[a] == "attack"
    assert pol.recency(NOW - datetime.timedelta(days=7)) == pytest.approx(0.5)
    # The request itself is the key: another header or body is another example.
    col.add(req("/c?q=y", headers=(("Host", "app"), ("Accept", "*/*"))), "benign", "local", NOW)
    col.add(req("/c?q=y", method="POST", body=b"x=1"), "benign", "local", NOW)
    assert len(list(col.examples())) == 5


def test_cap_is_a_deterministic_reservoir():
    def run(order):
        col = retraining.Collector(retraining.Policy(now=NOW), cap=50)
        for i in order:
            col.add(req(f"/p{i}"), "benign", "local", NOW)
            col.add(req(f"/p{i}"), "benign", "local", NOW)  # a kept request keeps its copies
        return {s: w for s, _, _, w in col.examples()}, col.stats["dropped_by_cap"]

    a, dropped = run(range(500))
    b, _ = run(reversed(range(500)))
    assert len(a) == 50 and a == b and dropped >= 450
    keep = sorted(range(500), key=lambda i: retraining._priority(req(f"/p{i}")))[:50]
    assert set(a) == {req(f"/p{i}") for i in keep}


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
    col = retraining.collect(store, retraining.Policy(local_attack=9), progress=seen.append)
    assert col.stats["full"] == 26 and col.stats["operator"] == 1  # brief records are skipped unread
    ex = {s: (lab, src) for s, lab, src, _ in col.examples()}
    assert len(ex) == 3 and sum(seen) >= 26
    # The example is the recorded request itself (20 identical flows: one example).
    assert ex[req("/app?q=union+square")] == ("benign", "operator")
    assert ex[req("/app?q=one")] == ("benign", "local")
    assert col.entries[False][req("/app?q=one")].count == 20
    assert ex[req("/app?q=%27%20or%201=1--")] == ("attack", "local")
    store.close()


def _lm(fm, **card):
    return model.LocalModel(fm, {"operating_point": 0.5, **card}, None)


def test_gate_calibration_and_table(tmp_path):
    cur = models.load(models.save(models.attack_model(), tmp_path, "cur", version="a", threshold=6))
    sqli, xss = req("/x?q=%27%20or%201%3D1--"), req("/x?q=%3Cscript%3Ealert(1)%3C/script%3E")
    base = [(sqli, 1), (req("/x?q=hello"), 0), (xss, 1), (req("/x?q=world"), 0)]
    app = [(req("/app?q=%27%20or%201%3D1--"), 0), (req("/app?q=tea"), 0)]
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
    # Calibration: the lowest threshold meeting the target FPR on the app's benign requests.
    attacky, tea = req("/app?q=%27%20or%201%3D1--"), req("/app?q=tea")
    t, fpr = retraining.calibrate_threshold(cur, [attacky] + [tea] * 9, 0.2)
    assert (t, fpr) == (6, 0.1)
    t, fpr = retraining.calibrate_threshold(cur, [attacky] * 5 + [tea] * 5, 0.01)
    assert t == 9 and fpr == 0.5  # never reached: the highest threshold, and its FPR said


def test_a_request_beyond_the_limits_counts_as_refused():
    huge = req("/x", method="POST", body=b"a" * (fieldsmod.Limits().body_bytes + 1))
    assert huge.request() is None
    assert retraining.proba(_lm(models.constant_model(0.01)), [req("/x?q=1"), huge]) == pytest.approx([0.01, 1.0])


def test_install_history_and_rollback(tmp_path):
    d = tmp_path / "models"
    cur_path = models.save(models.constant_model(0.1), d, version="v1")
    cand = models.save(models.constant_model(0.2), d, "candidate", version="v2", parent_version="v1")
    retraining.install(cand, cur_path)
    assert model.load(str(cur_path)).version == "v2"
    assert retraining.archived(cur_path, "v1").is_file() and retraining.archived(cur_path, "v2").is_file()
    assert sorted(c["version"] for c in retraining.versions(cur_path)) == ["v1", "v2"]
    restored = retraining.rollback(cur_path)
    assert restored["version"] == "v1" and model.load(str(cur_path)).version == "v1"
    assert model.load(str(cur_path)).proba([fieldsmod.extract("GET", "/", [], b"")]) == pytest.approx([0.1])
    with pytest.raises(retraining.RetrainError, match="no parent"):
        retraining.rollback(cur_path)
    # A tampered archive is refused.
    models.save(models.constant_model(0.3), d, "candidate", version="v3", parent_version="v1")
    retraining.install(cand, cur_path)
    old = retraining.archived(cur_path, "v1")
    old.write_bytes(old.read_bytes() + b"x")
    with pytest.raises(retraining.RetrainError, match="does not match"):
        retraining.rollback(cur_path)
    assert model.load(str(cur_path)).version == "v3"


async def test_scorer_reload_verifies_and_swaps_and_uses_the_card_threshold(tmp_path, caplog):
    from mitmproxy.test import taddons

    from addons import scorer

    d = tmp_path / "models"
    cur_path = models.save(models.constant_model(0.1), d, version="v1", threshold=6)
    sc = scorer.Scorer()
    with taddons.context(sc) as tctx:
        tctx.configure(sc, openflare_model=str(cur_path), openflare_llm_enabled=False,
                       openflare_model_probe_attacks=0, openflare_model_probe_benign=0)  # constant models: no probe check
        assert sc.model.version == "v1" and sc.threshold == 6
        cand = models.save(models.constant_model(0.2), d, "candidate", version="v2", parent_version="v1", threshold=8)
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

    d = tmp_path / "models"
    cur_path = models.save(models.constant_model(0.1), d, version="v1")
    sc = scorer.Scorer()
    with taddons.context(sc) as tctx:
        tctx.configure(sc, openflare_model=str(cur_path), openflare_llm_enabled=False, openflare_model_watch=1,
                       openflare_model_probe_attacks=0, openflare_model_probe_benign=0)  # constant models: no probe check
        sc.running()
        try:
            cand = models.save(models.constant_model(0.2), d, "candidate", version="v2", parent_version="v1")
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


FORM = ("Content-Type", "application/x-www-form-urlencoded")


def test_carry_puts_a_payload_into_one_value():
    import random

    from addons import fieldmodel

    flds = req("/pantry/comments?page=2", "POST", (FORM, ("User-Agent", "x")), b"comment=select+a+pan&name=zo%C3%AB").request().fields
    got = [retraining.carry(flds, "1' OR '1'='1", random.Random(s)) for s in range(40)]
    where = set()
    for out, i in got:
        assert [f for k, f in enumerate(out) if k != i] == [f for k, f in enumerate(flds) if k != i]  # one field changes
        old, new = flds[i], out[i]
        assert (new.loc, new.name, new.via) == (old.loc, old.name, "") and old.loc in retraining.CARRY_LOCS
        assert fieldmodel.prepare(new)[0] == "1' or '1'='1"  # encoded as a client would, read back as the payload
        if new.loc in ("query", "form"):
            assert "'" not in new.value and "%27" in new.value
        where.add((new.loc, new.name))
    assert {("query", "page"), ("form", "comment"), ("form", "name"), ("header", "user-agent")} <= where
    # A JSON value carries it as is; a request without such a field carries nothing.
    jflds = req("/pantry/notes", "POST", (("Content-Type", "application/json"),), b'{"note": "tea"}').request().fields
    out, i = retraining.carry([f for f in jflds if f.loc != "header"], "<script>x</script>", random.Random(0))
    assert out[i] == fieldsmod.Field("json", out[i].name, "<script>x</script>") and "note" in out[i].name
    bare = [f for f in req("/pantry/img", headers=()).request().fields if f.loc in ("method", "path")]
    assert retraining.carry(bare, "x", random.Random(0)) is None


def _key(f: fieldsmod.Field) -> tuple:
    from addons import fieldmodel

    r = fieldmodel.rows([f])
    return (r.classes[0], r.texts[0], float(r.extra[0][-2]), float(r.extra[0][-1]))


def test_an_attack_request_gives_only_its_best_window():
    # The operator labels one of the app's requests an attack: its query is the attack, not the app's own
    # header that every benign request of the app carries too.
    client = ("X-Pantry-Client", "ios-5.2")
    app = [(req(f"/pantry/notes?q=tea+{i}", headers=(client,)), 0, 1.0) for i in range(20)]
    app.append((req("/pantry/notes?q=%27%20or%201%3D1--", headers=(client,)), 1, 10.0))
    table, info = retraining.training_table(models.attack_model(), app, [])
    assert info["app_benign"] == 20 and info["app_attack"] == 1
    hdr = table.index[_key(fieldsmod.Field("header", "x-pantry-client", "ios-5.2"))]
    assert table.pos[hdr] == 0 and table.neg[hdr] == 20
    q = table.index[_key(fieldsmod.Field("query", "q", "%27%20or%201%3D1--"))]
    assert table.pos[q] == 10.0 and table.neg[q] == 0
    assert sum(1 for v in table.pos if v) == 1  # one window of the attack request, nothing else
    # Without the app's benign requests, the parent picks the window it scores highest: still the query.
    alone, _ = retraining.training_table(models.attack_model(), app[-1:], [])
    assert [alone.texts[k] for k, v in enumerate(alone.pos) if v] == [table.texts[q]]


BASE = [(req(f"/shop/item?id={i}", headers=(("User-Agent", "x"),)), 0) for i in range(40)] + [
    (req(f"/shop/item?id={i}%27%20union%20select%20password%20from%20users--", headers=(("User-Agent", "x"),)), 1)
    for i in range(40)]
APP = [req("/pantry/notes", "POST", (("Content-Type", "application/json"),),
           json.dumps({"note": f"{i} union select flour from pantry"}).encode()) for i in range(30)]


def test_refit_learns_the_apps_benign_and_keeps_the_base_attacks():
    import random

    from addons import fieldmodel

    base_fm = models.attack_model()
    prof = fieldmodel.AppProfile(min_root=1).fit([req("/tienda/a?x=1").request().fields])
    parent = fieldmodel.FieldModel(base_fm.weights, base_fm.extra, base_fm.intercept, base_fm.bits, prof, 0.8)
    before = retraining.proba(_lm(parent), APP)
    assert min(before) > 0.5, "the parent should call the app's notes attacks"
    cand, info = retraining.refit(parent, [(s, 0, 10.0) for s in APP], BASE, carried=20, rng=random.Random(0))
    assert info["app_benign"] == 30 and info["base_benign"] == 40 and info["base_attack"] == 40 and info["carried"] == 20
    lm = _lm(cand)
    assert max(retraining.proba(lm, APP)) < 0.5
    assert min(retraining.proba(lm, [s for s, y in BASE if y])) > 0.5  # the base attacks are still attacks
    assert max(retraining.proba(lm, [s for s, y in BASE if not y])) < 0.5
    assert cand.bits == parent.bits and cand.profile is prof and cand.violation_p == 0.8
    # The carried payloads: the base attack's deciding field, put into the app's own notes.
    carried = APP[0]._replace(body=json.dumps({"note": "1' union select password from users--"}).encode())
    assert retraining.proba(lm, [carried])[0] > 0.5
    with pytest.raises(retraining.RetrainError, match="both attack and benign"):
        retraining.refit(parent, [(s, 0, 1.0) for s in APP], [])


def test_refresh_profile_adds_the_apps_roots():
    from addons import fieldmodel

    parent = fieldmodel.AppProfile(min_root=5).fit([req("/tienda/a?x=1").request().fields] * 5)
    app = [req(f"/pantry/notes?q=tea{i % 7}").request().fields for i in range(60)]
    assert retraining.refresh_profile(parent, app[:10]) is None  # too few under /pantry
    merged = retraining.refresh_profile(parent, app)
    assert merged.roots == ("/pantry", "/tienda") and len(merged.paths) == 2
    assert merged.check(req("/pantry/notes?q=tea3").request().fields) == []
    assert merged.check(req("/pantry/other").request().fields) == ["unknown path"]
    assert merged.check(req("/tienda/a?x=2").request().fields) == []
    assert retraining.refresh_profile(None, app).roots == ("/pantry",)
    assert parent.roots == ("/tienda",)  # the parent's own profile is not changed


def test_operating_point_keeps_the_current_false_positive_rate():
    cur = _lm(models.attack_model())
    benign = [req(f"/app?q=tea+{i}") for i in range(95)] + [req(f"/app?q=%27+or+{i}%3D{i}--") for i in range(5)]
    assert sum(p >= 0.5 for p in retraining.proba(cur, benign)) == 5
    shifted = models.attack_model()
    shifted = type(shifted)(shifted.weights, shifted.extra, shifted.intercept - 1.0, shifted.bits)  # less sure of all
    op = retraining.operating_point(cur, shifted, benign)
    assert op < 0.5
    assert sum(p >= op for p in retraining.proba(_lm(shifted, operating_point=op), benign)) == 5
    assert retraining.operating_point(cur, shifted, benign[:50]) == 0.5  # too few to measure: the current one
