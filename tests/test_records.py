"""addons/records.py: record shape, masking, hash chain, stores, spill and replay, export."""

import base64
import datetime
import json
import time

import mongomock
import pytest

from addons import records

T0 = int(time.time()) - 3600 + 0.123456  # an hour ago: inside any retention window


def brief(i=0, verdict="pass", score=2, ip="203.0.113.7"):
    return {"time": T0 + i, "client_ip": ip, "verdict": verdict, "score": score, "full": False}


def full(i=0, method=b"GET", target=b"/?id=1%27%20OR%20%271%27=%271", headers=((b"Host", b"app"),), body=b"", **kw):
    cap = {
        "time": T0 + i,
        "client_ip": "198.51.100.9",
        "verdict": "block",
        "score": 9,
        "full": True,
        "method": method,
        "target": target,
        "headers": headers,
        "body": body,
        "body_size": len(body),
        "local_score": 9,
        "llm_score": None,
        "category": "sqli",
        "model_version": "m-1",
        "refused_by": "score",
        "status": 403,
        "error": None,
    }
    cap.update(kw)
    return cap


def mem_store():
    return records.Store(mongomock.MongoClient().openflare.records, "mongomock")


def writer(store, tmp_path, **kw):
    return records.Writer(store, tmp_path / "spill.jsonl", "test-instance", **kw)


# --- record shape and masking ----------------------------------------------------------------------


def test_brief_record_holds_time_ip_verdict_score_only():
    rec = records.build(brief(), records.Masker())
    assert rec == {
        "tier": "brief",
        "time": datetime.datetime.fromtimestamp(int(T0), datetime.timezone.utc).replace(tzinfo=None, microsecond=123000),
        "client_ip": "203.0.113.7",
        "verdict": "pass",
        "score": 2,
        "label": None,
    }


def test_full_record_fields():
    rec = records.build(full(body=b"a=1", headers=((b"Host", b"app"), (b"Content-Type", b"application/x-www-form-urlencoded"))), records.Masker())
    assert rec["tier"] == "full"
    assert rec["method"] == "GET" and rec["target"] == "/?id=1%27%20OR%20%271%27=%271"
    assert rec["headers"] == [["Host", "app"], ["Content-Type", "application/x-www-form-urlencoded"]]
    assert rec["body"] == "a=1" and rec["body_b64"] is False and rec["body_truncated"] is False
    assert (rec["local_score"], rec["llm_score"], rec["score"], rec["verdict"]) == (9, None, 9, "block")
    assert (rec["category"], rec["model_version"], rec["refused_by"], rec["status"]) == ("sqli", "m-1", "score", 403)
    assert rec["label"] is None


def test_masking_headers_cookies_and_fields():
    m = records.Masker()
    headers = (
        (b"Authorization", b"Bearer abc.def"),
        (b"proxy-authorization", b"Basic eA=="),
        (b"Cookie", b"session=s3cr3t; theme=dark"),
        (b"Set-Cookie", b"sid=xyz; Path=/; HttpOnly"),
        (b"User-Agent", b"curl"),
        (b"Content-Type", b"application/json"),
    )
    body = b'{"user": "alice", "Password": "hunter2", "nested": {"api_key": 12345, "q": "x"}}'
    rec = records.build(full(target=b"/login?user=bob&pass_word=p1&pwd=p2&q=ok", headers=headers, body=body), m)
    h = dict(rec["headers"])
    assert h["Authorization"] == records.MASK and h["proxy-authorization"] == records.MASK
    assert h["Cookie"] == "session=*masked*; theme=*masked*"
    assert h["Set-Cookie"] == "sid=*masked*; Path=/; HttpOnly"
    assert h["User-Agent"] == "curl"
    assert rec["target"] == "/login?user=bob&pass_word=*masked*&pwd=*masked*&q=ok"
    doc = json.loads(rec["body"])
    assert doc == {"user": "alice", "Password": "*masked*", "nested": {"api_key": "*masked*", "q": "x"}}
    for secret in ("abc.def", "s3cr3t", "xyz", "hunter2", "12345", "p1", "p2"):
        assert secret not in json.dumps(rec, default=str)


def test_masking_form_multipart_truncated_json_and_extra_names():
    m = records.Masker(["X-Secret-Header", "otp"])
    form = records.build(full(body=b"user=a&password=hunter2&otp_code=123456", headers=((b"content-type", b"application/x-www-form-urlencoded"), (b"X-Secret-Header", b"v"))), m)
    assert form["body"] == "user=a&password=*masked*&otp_code=*masked*"
    assert dict(form["headers"])["X-Secret-Header"] == records.MASK
    mp = b'--BB\r\nContent-Disposition: form-data; name="user"\r\n\r\nalice\r\n--BB\r\nContent-Disposition: form-data; name="password"\r\n\r\nhunter2\r\n--BB--\r\n'
    rec = records.build(full(body=mp, headers=((b"content-type", b"multipart/form-data; boundary=BB"),)), m)
    assert "hunter2" not in rec["body"] and "alice" in rec["body"] and "*masked*" in rec["body"]
    cut = records.build(full(body=b'{"a": "b", "token": "abcdefgh', headers=((b"content-type", b"application/json"),)), m)
    assert cut["body"] == '{"a": "b", "token": "*masked*"'
    # without extra names these are not secrets
    plain = records.build(full(body=b"otp=1"), records.Masker())
    assert plain["body"] == "otp=1"


# --- hostile input stays data -------------------------------------------------------------------------

HOSTILE_HEADERS = (
    (b"$where", b"function() { return true; }"),
    (b"a.b", b"c.d"),
    (b"$set", b"{\"$ne\": 1}"),
    (b"nul", b"a\x00b"),
    (b"bad-utf8", b"\xff\xfe\xc3("),
    (b"\xc3(name", b"v"),
)


def hostile_captures(cap_bytes):
    big = (bytes(range(251)) * (10 * 1024 * 1024 // 251 + 1))[: 10 * 1024 * 1024]
    many = tuple((f"x-h{i}".encode(), f"v{i}".encode()) for i in range(500))
    return [
        full(0, headers=HOSTILE_HEADERS, body=b"nul\x00inside"),
        full(1, method=b"P\xffST", target=b"/p\xff\x00?$where=1&a.b=2", body=b"\xff\xfe\x00binary"),
        full(2, body=big[:cap_bytes], body_size=len(big)),
        full(3, headers=many),
        full(4, body="é".encode() * 10, headers=((b"content-type", b"text/plain"),)),
    ], big, many


@pytest.mark.parametrize("kind", ["embedded", "mongomock"])
def test_hostile_input_stored_and_read_back_identical(kind, tmp_path):
    cap = 65536
    store = records.open_store(directory=tmp_path / "store") if kind == "embedded" else mem_store()
    caps, big, many = hostile_captures(cap)
    w = writer(store, tmp_path)
    w.write(list(caps))
    assert w.stats["stored"] == 5 and w.stats["lost"] == 0
    if kind == "embedded":  # a fresh client reads what is on disk
        store.close()
        store = records.open_store(directory=tmp_path / "store")
    got = sorted(store.coll.find(), key=lambda r: r["seq"])
    assert len(got) == 5
    assert records.header_pairs(got[0]) == list(HOSTILE_HEADERS)
    assert records.raw(got[0]["body"], got[0]["body_b64"]) == b"nul\x00inside"
    assert got[1]["method"] == "P\xffST" and got[1]["target_b64"] is True
    assert records.raw(got[1]["target"], True) == b"/p\xff\x00?$where=1&a.b=2"
    assert got[1]["body_b64"] is True and base64.b64decode(got[1]["body"]) == b"\xff\xfe\x00binary"
    assert records.raw(got[2]["body"], got[2]["body_b64"]) == big[:cap]
    assert got[2]["body_size"] == len(big) and got[2]["body_truncated"] is True
    assert records.header_pairs(got[3]) == list(many) and got[3]["headers_truncated"] is False
    assert got[4]["body"] == "é" * 10 and got[4]["body_b64"] is False
    assert records.verify(iter(got))["broken"] is None


def test_body_cut_inside_a_character_stays_text():
    rec = records.build(full(body="é".encode() * 3 + b"\xc3", body_size=8), records.Masker())
    assert rec["body"] == "ééé" and rec["body_b64"] is False


def test_headers_capped():
    many = tuple((b"x", b"y") for _ in range(records.HEADERS_CAP + 5))
    rec = records.build(full(headers=many), records.Masker())
    assert len(rec["headers"]) == records.HEADERS_CAP and rec["headers_truncated"] is True


# --- hash chain -------------------------------------------------------------------------------------


INTACT = {"truncated": [], "broken": None, "gaps": [], "labelled": [], "unauthenticated": 0}


@pytest.fixture(autouse=True)
def no_record_key(monkeypatch):
    monkeypatch.delenv(records.ENV_KEY, raising=False)


def chained(n=5, instance="i1", key=None):
    ch = records.Chain(instance, key)
    m = records.Masker()
    return [ch.link(records.build(full(i) if i % 2 else brief(i), m)) for i in range(n)]


def test_chain_links_and_verifies():
    recs = chained()
    assert [r["seq"] for r in recs] == [0, 1, 2, 3, 4]
    assert recs[0]["prev"] == records.GENESIS and recs[0]["prev_time"] is None
    assert all(b["prev"] == a["hash"] and b["prev_time"] == a["time"] for a, b in zip(recs, recs[1:]))
    assert all(r["_id"] == r["hash"] == records.record_hash(r) for r in recs)
    assert records.verify(recs) == dict(INTACT, chains=1, records=5)


@pytest.mark.parametrize(
    "tamper, seq, reason",
    [
        (lambda rs: rs[2].__setitem__("score", 1), 2, "content changed"),
        (lambda rs: rs[3]["headers"].append(["x", "y"]), 3, "content changed"),
        (lambda rs: rs.pop(2), 3, "records 2..2 are missing"),
        (lambda rs: rs.pop(0), 1, "records before seq 1 are missing"),
        (lambda rs: rs.insert(4, rs.pop(1)), 2, "records 1..1 are missing"),
    ],
)
def test_verify_names_the_first_broken_link(tamper, seq, reason):
    recs = chained()
    tamper(recs)
    b = records.verify(recs)["broken"]
    assert b is not None and b["seq"] == seq and reason in b["reason"]


def test_rehashed_forgery_is_caught_by_the_next_link():
    recs = chained()
    recs[2]["score"] = 1
    recs[2]["hash"] = recs[2]["_id"] = records.record_hash(recs[2])
    b = records.verify(recs)["broken"]
    assert b["seq"] == 3 and "prev does not match" in b["reason"]


def test_a_label_written_into_a_record_is_reported():
    """Labels live in the labels collection: one written into a record (which the hash leaves out, so
    the chain still links) is an edit, and export must not take it for an operator's label."""
    recs = chained()
    recs[1]["label"] = "benign"
    recs[1]["label_by"] = "ops"
    v = records.verify(recs)
    assert v["records"] == 5 and v["labelled"] == [{"chain": recs[1]["chain"], "seq": 1, "id": recs[1]["_id"],
                                                    "fields": ["label", "label_by"], "label": "benign"}]
    assert v["broken"]["seq"] == 1 and "label, label_by written into the record (label 'benign')" in v["broken"]["reason"]
    assert records.to_dataset(recs[1])["label_source"] == "verdict" and records.to_dataset(recs[1])["label"] == "attack"
    recs[1]["label"] = recs[1]["label_by"] = None  # what build writes: no label
    assert records.verify(recs)["broken"] is None


def test_retention_may_cut_a_chain_start_only_when_expired():
    recs = chained(4)
    now = recs[-1]["time"] + datetime.timedelta(days=40)
    assert records.verify(recs[2:], days=30, now=now)["truncated"] == [{"chain": recs[0]["chain"], "first_seq": 2}]
    assert records.verify(recs[2:], days=30, now=recs[-1]["time"])["broken"]["seq"] == 2
    assert records.verify(recs[2:], days=0, now=now)["broken"]["seq"] == 2


def test_several_chains():
    a, b = chained(3, "proxy-a"), chained(3, "proxy-b")
    recs = sorted(a + b, key=lambda r: (r["chain"], r["seq"]))
    assert records.verify(recs) == dict(INTACT, chains=2, records=6)


# --- stores --------------------------------------------------------------------------------------------


def test_mongomock_insert_duplicates_and_indexes(tmp_path):
    store = mem_store()
    recs = chained(4)
    assert store.insert(recs[:3]) == (3, 0, [])
    assert store.insert(recs) == (1, 3, [])
    store.ensure_indexes(30)
    idx = store.coll.index_information()
    assert idx["time_1"]["expireAfterSeconds"] == 30 * 86400
    assert {"client_ip_1", "verdict_1", "chain_1_seq_1"} <= set(idx)
    assert idx["chain_1_seq_1"].get("unique") is True
    store.ensure_indexes(7)
    assert store.coll.index_information()["time_1"]["expireAfterSeconds"] == 7 * 86400
    store.ensure_indexes(0)
    assert "expireAfterSeconds" not in store.coll.index_information()["time_1"]


def test_embedded_store_persists_ignores_duplicates_and_expires(tmp_path):
    store = records.open_store(directory=tmp_path / "s")
    recs = chained(6)
    assert store.insert(recs[:4])[:2] == (4, 0)
    assert store.insert(recs)[:2] == (2, 4)
    store.close()
    again = records.open_store(directory=tmp_path / "s")
    assert again.coll.count_documents({}) == 6
    assert [r["seq"] for r in again.find()] == list(range(6))
    assert records.verify(again.find())["broken"] is None
    now = recs[2]["time"] + datetime.timedelta(days=30, milliseconds=500)
    assert again.expire(30, now=now) == 3  # seq 0..2 are older than 30 days at `now`
    assert again.coll.count_documents({}) == 3
    assert records.verify(again.find(), days=30, now=now)["truncated"][0]["first_seq"] == 3


def test_an_embedded_collection_file_left_empty_by_a_full_disk_still_takes_records(tmp_path):
    store = records.open_store(directory=tmp_path / "store")
    (tmp_path / "store" / "openflare").mkdir()
    (tmp_path / "store" / "openflare" / "records.collection").write_bytes(b"")  # created, its table never made
    assert store.insert(chained(2)) == (2, 0, [])
    assert len(list(store.find())) == 2
    store.close()


def test_retention_on_a_new_embedded_store_expires_nothing(tmp_path):
    # make run's first start: the store directory is new, montydb has no database file yet.
    store = records.open_store(directory=tmp_path / "new")
    assert store.expire(30) == 0
    assert store.insert(chained(2))[:2] == (2, 0)
    assert store.expire(30) == 0 and store.coll.count_documents({}) == 2


def test_open_store_rejects_nothing_and_bad_uri():
    with pytest.raises(ValueError):
        records.open_store()


# --- outage, spill, replay ------------------------------------------------------------------------------


def closed_port_store():
    from conftest import free_port

    return records.open_store(uri=f"mongodb://127.0.0.1:{free_port()}/openflare?serverSelectionTimeoutMS=200&connectTimeoutMS=200")


def test_outage_spills_then_replays_in_order_without_duplicates(tmp_path):
    down = closed_port_store()
    assert down.kind == "mongodb"
    w = writer(down, tmp_path, batch=50)
    w.write([brief(i) if i % 3 else full(i) for i in range(120)])
    assert w.stats["spilled"] == 120 and w.stats["stored"] == 0 and w.stats["lost"] == 0
    assert w.spill.pending()
    lines = (tmp_path / "spill.jsonl").read_bytes().splitlines()  # bytes: str.splitlines splits at RS too
    assert all(x.startswith(records.RS) for x in lines) and [json.loads(x[1:])["seq"] for x in lines] == list(range(120))
    # while down, new records go on appending (one failed attempt per retry interval, not per batch)
    w.write([brief(i) for i in range(120, 130)])
    assert w.stats["spilled"] == 130
    down.close()
    # the store comes back
    up = mem_store()
    w.store = up
    w.maintain(force_replay=True)
    assert not w.spill.pending()
    assert w.stats["replayed"] == 130 and up.coll.count_documents({}) == 130
    assert records.verify(up.find())["broken"] is None
    # later records are stored directly again, on the same chain
    w.write([brief(200)])
    assert w.stats["stored"] == 1 and up.coll.count_documents({}) == 131
    assert records.verify(up.find())["records"] == 131
    # a crash after inserting but before emptying the journal: the next run's replay is idempotent
    (tmp_path / "spill.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    w2 = writer(up, tmp_path)
    w2.maintain(force_replay=True)
    assert up.coll.count_documents({}) == 131 and w2.stats["duplicates"] == 120 and not w2.spill.pending()


def test_spill_replays_into_the_embedded_store(tmp_path):
    w = writer(closed_port_store(), tmp_path, batch=100)
    w.write([brief(i) for i in range(250)])
    assert w.stats["spilled"] == 250
    w.store.close()
    w.store = records.open_store(directory=tmp_path / "store")
    w.maintain(force_replay=True)
    assert w.store.coll.count_documents({}) == 250 and not w.spill.pending()
    assert records.verify(w.store.find()) == dict(INTACT, chains=1, records=250)


def test_torn_last_spill_line_is_skipped(tmp_path):
    spill = records.SpillFile(tmp_path / "s.jsonl")
    recs = chained(3)
    spill.append(recs)
    with open(spill.path, "a") as f:
        f.write('{"_id": "torn')
    got = [r for batch in spill.read(2) for r in batch]
    assert got == recs


def test_overflow_is_chained_later(tmp_path):
    store = mem_store()
    w = writer(store, tmp_path)
    w.write([brief(0)])
    for i in range(1, 4):
        w.overflow(full(i, body=b"\xff\x00"))
    assert w.stats["overflowed"] == 3 and store.coll.count_documents({}) == 1
    w.maintain()
    assert store.coll.count_documents({}) == 4
    assert records.verify(store.find())["broken"] is None
    assert not w.overflow_path.exists()


def test_rejected_documents_are_kept_aside(tmp_path):
    import pymongo.errors

    store = mem_store()
    w = writer(store, tmp_path)
    real = store.coll.insert_many

    def refuse_second(docs, ordered=True):  # a store whose validator refuses the second document
        real([docs[0]], ordered=ordered)
        raise pymongo.errors.BulkWriteError({"writeErrors": [{"index": 1, "code": 121, "errmsg": "validation"}], "nInserted": 1})

    store.coll.insert_many = refuse_second
    w.write([brief(0), brief(1)])
    assert w.stats["stored"] == 1 and w.stats["rejected"] == 1 and w.stats["lost"] == 0
    assert len((tmp_path / "spill.jsonl.rejected").read_bytes().splitlines()) == 1


def test_unbuildable_capture_is_counted_lost(tmp_path, caplog):
    w = writer(mem_store(), tmp_path)
    w.write([brief(0), {"client_ip": "x"}])
    assert w.stats["stored"] == 1 and w.stats["lost"] == 1
    assert "lost a record" in caplog.text


# --- export ------------------------------------------------------------------------------------------


def test_to_dataset_format():
    ch = records.Chain("i")
    m = records.Masker()
    attack = ch.link(records.build(full(0, target=b"/s?q=\xe9 x", headers=((b"Host", b"a"), (b"Content-Length", b"3")), body=b"\xff\x00\x01"), m))
    line = records.to_dataset(attack)
    assert {k: line[k] for k in ("source", "split", "label", "category", "method", "target")} == {
        "source": "openflare", "split": "train", "label": "attack", "category": "sqli", "method": "GET", "target": "/s?q=%E9%20x",
    }
    assert line["headers"] == [["Host", "a"]]  # no Content-Length, as in the datasets
    assert line["body_b64"] is True and base64.b64decode(line["body"]) == b"\xff\x00\x01"
    assert line["verdict"] == "block" and line["label_source"] == "verdict" and line["score"] == 9
    assert line["time"] == records.time_text(records.to_time(T0)) and line["time"].endswith(".123Z") and line["client_ip"] == "198.51.100.9"
    assert line["id"].startswith("openflare-") and line["meta"]["record_id"] == attack["_id"]
    sampled = ch.link(records.build(full(1, verdict="pass", score=2, sampled=True, refused_by=None, category=None), m))
    assert records.to_dataset(sampled)["label"] == "benign" and records.to_dataset(sampled)["category"] == "benign"
    label = records.operator_label(sampled, "attack", time.time())  # a labels document: outside the chains
    assert records.to_dataset(label)["label"] == "attack" and records.to_dataset(label)["label_source"] == "operator"
    sampled["label"] = "attack"  # written into the record itself: not an operator's label
    assert records.to_dataset(sampled)["label"] == "benign" and records.to_dataset(sampled)["label_source"] == "verdict"
    assert records.to_dataset(ch.link(records.build(brief(2), m))) is None


def load_script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_and_verify_scripts(tmp_path, capsys):
    export_records, verify_log = load_script("export_records"), load_script("verify_log")
    d = tmp_path / "store"
    w = writer(records.open_store(directory=d), tmp_path)
    w.write([full(0), brief(1), full(2, body=b"x=1")])
    w.store.close()
    out = tmp_path / "flows.jsonl"
    assert export_records.main(["--dir", str(d), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["label"] for x in lines] == ["attack", "attack"] and lines[1]["body"] == "x=1"
    assert verify_log.main(["--dir", str(d), "--spill", str(tmp_path / "none.jsonl")]) == 0
    assert "OK" in capsys.readouterr().out
    # tamper with one record on disk
    s = records.open_store(directory=d)
    s.coll.update_one({"seq": 1}, {"$set": {"client_ip": "10.0.0.1"}})
    s.close()
    assert verify_log.main(["--dir", str(d), "--spill", str(tmp_path / "none.jsonl")]) == 1
    text = capsys.readouterr().out
    assert "BROKEN" in text and "seq 1" in text and "content changed" in text


def test_export_puts_operator_labels_first_and_they_win(tmp_path, capsys):
    export_records = load_script("export_records")
    d = tmp_path / "store"
    st = records.open_store(directory=d)
    w = writer(st, tmp_path)
    w.write([full(0), full(2, body=b"x=1")])
    # An operator said the first request is benign (what addons/labels.py stores: a full masked record).
    doc = records.build(full(0, verdict="block"), records.Masker())
    doc.update(_id="flow-1", label="benign", label_source="operator")
    st.coll.database["labels"].insert_one(doc)
    st.close()
    out = tmp_path / "flows.jsonl"
    assert export_records.main(["--dir", str(d), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["label"], x["label_source"], x["body"]) for x in lines] == [("benign", "operator", ""), ("attack", "verdict", "x=1")]
    assert "1 operator labels written; 1 records of labelled requests left out" in capsys.readouterr().err
    assert export_records.main(["--dir", str(d), "--out", str(out), "--no-labels"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["label"], x["body"]) for x in lines] == [("attack", ""), ("attack", "x=1")]


# --- keyed chains (OPENFLARE_RECORD_KEY) --------------------------------------------------------------

KEY = b"k" * 32


def test_a_keyed_chain_rehashed_after_an_edit_is_caught_with_the_key():
    recs = chained(key=KEY)
    assert all(r["keyed"] == records.key_id(KEY) for r in recs)
    assert records.verify(recs, key=KEY) == dict(INTACT, chains=1, records=5)
    # an edit re-hashed down the whole chain, as someone without the key can do (plain sha256 or a guessed key)
    for forge_key in (None, b"guess" * 8):
        forged = [dict(r) for r in recs]
        forged[2]["score"] = 1
        prev = forged[1]["hash"]
        for r in forged[2:]:
            r["prev"] = prev
            r["hash"] = r["_id"] = prev = records.record_hash(r, forge_key)
        b = records.verify(forged, key=KEY)["broken"]
        assert b["seq"] == 2 and "content changed" in b["reason"]
        # without the key the walk can only check the links, and says so
        v = records.verify(forged, key=None)
        assert v["broken"] is None and v["unauthenticated"] == 5


def test_with_a_key_an_unkeyed_chain_is_broken_unless_allowed_and_another_key_is_named():
    plain = chained()
    b = records.verify(plain, key=KEY)["broken"]
    assert b["seq"] == 0 and "not keyed" in b["reason"]
    assert records.verify(plain, key=KEY, allow_unkeyed=True)["broken"] is None
    b = records.verify(chained(key=b"other" * 8), key=KEY)["broken"]
    assert "keyed with another key" in b["reason"]


def test_the_key_comes_from_the_environment(monkeypatch):
    recs = chained(key=KEY)
    recs[1]["score"] = 0
    recs[1]["hash"] = recs[1]["_id"] = records.record_hash(recs[1])  # re-hashed without the key
    monkeypatch.setenv(records.ENV_KEY, KEY.decode())
    assert records.env_key() == KEY and "content changed" in records.verify(recs)["broken"]["reason"]
    monkeypatch.delenv(records.ENV_KEY)
    b = records.verify(recs)["broken"]  # without the key only the next link shows the edit
    assert records.env_key() is None and b["seq"] == 2 and "prev does not match" in b["reason"]


# --- framing, torn lines ---------------------------------------------------------------------------------


def test_framed_files_survive_a_torn_record_in_the_middle_and_at_the_end(tmp_path):
    recs = chained(4)
    path = tmp_path / "s.jsonl"
    torn = records.frame(recs[1])[:40]  # a write cut short: no end of line, the next record appended after it
    legacy = records.dumps_line(recs[3]).encode()  # a line written before the framing
    path.write_bytes(records.frame(recs[0]) + torn + records.frame(recs[2]) + legacy + b"not json\n" + records.frame(recs[3])[:-9])
    got = list(records.read_frames(path))
    assert [(n, d["seq"] if d else None, why) for n, d, why in got] == [
        (1, 0, None),
        (2, None, "torn record (cut short, the next record follows it)"),
        (2, 2, None),
        (3, 3, None),
        (4, None, "not a JSON object"),
        (5, None, "torn last line"),
    ]
    spill = records.SpillFile(path)
    assert [d["seq"] for batch in spill.read(10) for d in batch] == [0, 2, 3]
    assert [(n, why) for _, n, why in spill.bad] == [(2, got[1][2]), (4, "not a JSON object"), (5, "torn last line")]


def test_a_torn_leftover_is_replayed_set_aside_and_recording_goes_on(tmp_path, caplog):
    recs = chained(3, "earlier-run")
    spill = tmp_path / "spill.jsonl"
    spill.write_bytes(b"".join(records.frame(r) for r in recs) + records.frame(chained(4, "earlier-run")[3])[:25])
    store = mem_store()
    w = writer(store, tmp_path)
    assert [p.name for p in w.leftovers] == ["spill.jsonl.1"]  # sealed: never appended to
    w.write([brief(10), brief(11)])
    assert store.coll.count_documents({}) == 5 and w.stats["torn"] == 1 and w.stats["replayed"] == 3
    assert w.stats["stored"] == 2 and not w.leftovers
    assert (tmp_path / "spill.jsonl.1.torn").exists() and not (tmp_path / "spill.jsonl.1").exists()
    assert "1 bad line(s) (line 4: torn last line); the other 3 records are stored; the file is set aside" in caplog.text
    w.write([brief(12)])  # nothing is stuck: later records go straight to the store
    assert w.stats["stored"] == 3 and not w.spill.pending()


def test_a_short_write_is_cut_back_off_the_journal(tmp_path, monkeypatch):
    import errno
    import os

    j = records.Journal(tmp_path / "j.jsonl")
    j.start()
    j.append(records.frame({"seq": 0}), 0)
    real = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of the write
        n = real(fd, bytes(data[: len(data) // 2]))
        monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        return n

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        j.append(records.frame({"seq": 1}) * 3, 1)
    monkeypatch.setattr(os, "write", real)
    assert (tmp_path / "j.jsonl").read_bytes() == records.frame({"seq": 0}) and not j.torn
    j.append(records.frame({"seq": 1}), 1)
    assert [d["seq"] for _, d, _ in records.read_frames(tmp_path / "j.jsonl")] == [0, 1]


# --- a full disk ---------------------------------------------------------------------------------------


def full_disk(monkeypatch):
    """os.write fails with ENOSPC until the returned function is called (space freed)."""
    import errno
    import os

    real = os.write

    def enospc(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", enospc)
    return lambda: monkeypatch.setattr(os, "write", real)


def test_a_full_disk_holds_records_then_notes_what_it_lost_as_a_gap(tmp_path, monkeypatch, caplog):
    store = mem_store()
    w = writer(store, tmp_path, hold=5)
    w.write([brief(i) for i in range(3)])
    freed = full_disk(monkeypatch)
    assert w.journal([brief(i) for i in range(3, 6)]) is False  # held: 3
    assert w.journal([brief(i) for i in range(6, 14)]) is False  # 2 more held, 6 lost
    assert w.stats["disk_full"] == 2 and w.stats["lost"] == 6 and len(w.held) == 5
    assert "DISK FULL writing the journal" in caplog.text and "5 records held in memory, 6 lost so far" in caplog.text
    w.deliver()
    assert store.coll.count_documents({}) == 3  # what was journaled before the disk filled is stored
    freed()
    w.write([brief(20)])
    recs = list(store.find())
    assert [(r["tier"], r["seq"]) for r in recs] == [("brief", i) for i in range(8)] + [("gap", 8), ("brief", 9)]
    gap = recs[8]
    assert gap["lost"] == 6 and "disk full" in gap["reason"] and gap["first_time"] == records.to_time(T0 + 8)
    assert gap["last_time"] == records.to_time(T0 + 13)
    v = records.verify(recs)
    assert v["broken"] is None and [(g["seq"], g["lost"]) for g in v["gaps"]] == [(8, 6)]
    code, lines = records.log_report(v, "test")
    assert code == 0 and "GAP: chain" in lines[0] and "6 records lost" in lines[0] and "every link intact" in lines[-1]


def test_verify_log_reports_bad_spill_lines_gaps_and_labels_without_crashing(tmp_path, capsys):
    verify_log = load_script("verify_log")
    store = records.open_store(directory=tmp_path / "store")
    recs = chained(4)
    store.insert(recs[:2])
    store.close()
    spill = tmp_path / "spill.jsonl"
    spill.write_bytes(records.frame(recs[2]) + b'{"_id": "torn\n' + records.frame(recs[3]) + b"\x1e{half")
    assert verify_log.main(["--dir", str(tmp_path / "store"), "--spill", str(spill)]) == 0
    out = capsys.readouterr().out
    assert out.count("BAD LINE") == 2 and "line 2: not a JSON object" in out and "line 4: torn last line" in out
    assert "4 records in 1 chains, every link intact; 2 bad journal line(s) skipped" in out
    store = records.open_store(directory=tmp_path / "store")
    store.coll.update_one({"seq": 1}, {"$set": {"label": "benign"}})
    store.close()
    assert verify_log.main(["--dir", str(tmp_path / "store"), "--spill", str(spill)]) == 1
    out = capsys.readouterr().out
    assert "LABEL IN RECORD: chain" in out and "seq 1" in out and "BROKEN" in out and "label 'benign'" in out
