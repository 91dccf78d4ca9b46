"""addons/recorder.py: options, which flows are recorded in which tier, queue, overflow, final flush."""

import asyncio
import logging
import time

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons import common
from addons import recorder
from addons import records


def configure(tctx, r, tmp_path, **kw):
    opts = dict(
        openflare_record_dir=str(tmp_path / "store"),
        openflare_record_spill=str(tmp_path / "spill.jsonl"),
        openflare_instance="test-proxy",
    )
    opts.update(kw)
    tctx.configure(r, **opts)


def stored(tmp_path) -> list[dict]:
    store = records.open_store(directory=tmp_path / "store")
    try:
        return list(store.find())
    finally:
        store.close()


def passed_flow(path=b"/search?q=shoes", ip="203.0.113.7"):
    f = tflow.tflow(req=tutils.treq(path=path), resp=True)
    f.request.timestamp_start = time.time()  # tflow's default (2000) is past any retention window
    f.client_conn.peername = (ip, 40000)
    f.metadata.update({common.CLIENT_IP: ip, common.VERDICT: "pass", common.SCORE: 2, common.LOCAL_SCORE: 2})
    return f


def refused_flow(ip="198.51.100.9"):
    f = tflow.tflow(
        req=tutils.treq(
            method=b"POST",
            path=b"/login?id=1%27%20OR%20%271%27=%271",
            headers=[(b"Authorization", b"Bearer t0ken"), (b"content-type", b"application/x-www-form-urlencoded")],
            content=b"user=admin&password=hunter2",
        )
    )
    f.response = tutils.tresp(status_code=common.BLOCK_STATUS, content=common.BLOCK_BODY)
    f.request.timestamp_start = time.time()
    f.client_conn.peername = (ip, 40000)
    f.metadata.update(
        {
            common.CLIENT_IP: ip,
            common.VERDICT: "block",
            common.SCORE: 9,
            common.LOCAL_SCORE: 8,
            common.LLM_SCORE: 9,
            common.CATEGORY: "sqli",
            common.MODEL_VERSION: "m-7",
        }
    )
    return f


def test_options_validated(tmp_path):
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        for bad in (
            {"openflare_record_benign_one_in": -1},
            {"openflare_record_days": -1},
            {"openflare_record_body_cap": records.BODY_CAP_MAX + 1},
            {"openflare_record_queue": 0},
            {"openflare_record_batch": 0},
            {"openflare_record_dir": " "},
            {"openflare_record_spill": ""},
            {"openflare_mongo_uri": "http://db:27017"},
        ):
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(r, **bad)
        tctx.configure(r, openflare_mongo_uri="mongodb://u:p@db:27017/x", openflare_record_mask=["X-Token", " "])
        assert r.uri == "mongodb://u:p@db:27017/x" and r.mask == ("X-Token",)


def test_recorder_defaults():
    """The defaults live in the addon (mitm.conf only documents them: tests/test_config.py checks that)."""
    r = recorder.Recorder()
    with taddons.context(r):
        assert (r.directory, r.one_in, r.days, r.body_cap, r.queue_size, r.batch, r.fsync) == ("data/records", 0, 30, 65536, 10000, 500, False)
        assert r.uri is None and r.instance is None


async def test_tiers_masking_and_once_only(tmp_path):
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        ok, bad = passed_flow(), refused_flow()
        await r.response(ok)
        await r.response(bad)
        await r.error(bad)  # a flow is recorded once, whatever fires after its response
        await r.response(ok)
        r.done()
    recs = stored(tmp_path)
    assert len(recs) == 2
    brief, full = recs
    assert {k: brief[k] for k in ("tier", "client_ip", "verdict", "score")} == {"tier": "brief", "client_ip": "203.0.113.7", "verdict": "pass", "score": 2}
    assert "target" not in brief and "headers" not in brief
    assert full["tier"] == "full" and full["method"] == "POST" and full["target"] == "/login?id=1%27%20OR%20%271%27=%271"
    assert (full["local_score"], full["llm_score"], full["score"], full["category"], full["model_version"]) == (8, 9, 9, "sqli", "m-7")
    assert full["refused_by"] == "score" and full["status"] == 403 and full["instance"] == "test-proxy"
    assert ["Authorization", records.MASK] in full["headers"]
    assert full["body"] == "user=admin&password=*masked*"
    assert records.verify(iter(recs))["broken"] is None


async def test_bans_rate_limits_and_kills_are_refusals(tmp_path):
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        banned = passed_flow(ip="192.0.2.1")
        banned.metadata = {common.CLIENT_IP: "192.0.2.1", common.BANNED: True}  # refused before scoring
        limited = passed_flow(ip="192.0.2.2")
        limited.metadata[common.RATE_LIMITED] = True
        killed = passed_flow(ip="192.0.2.3")
        killed.response = None
        killed.kill()
        assert not killed.live
        for f in (banned, limited):
            await r.response(f)
        await r.error(killed)
        r.done()
    recs = {x["client_ip"]: x for x in stored(tmp_path)}
    assert [(recs[ip]["tier"], recs[ip]["verdict"], recs[ip]["refused_by"]) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")] == [
        ("full", "block", "ban"),
        ("full", "block", "rate-limit"),
        ("full", "block", "killed"),
    ]


async def test_a_refusal_to_head_is_a_refusal_by_score(tmp_path):
    """A refusal to HEAD has no content (addons/common.py): still refused by the score."""
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        f = refused_flow()
        f.request.method = "HEAD"
        f.response = common.refusal(method="HEAD")
        await r.response(f)
        r.done()
    (rec,) = stored(tmp_path)
    assert (rec["tier"], rec["method"], rec["refused_by"], rec["status"]) == ("full", "HEAD", "score", 403)


async def test_flows_read_from_a_file_are_not_recorded(tmp_path):
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        old = refused_flow()
        old.live = False
        await r.response(old)
        old_killed = passed_flow()
        old_killed.request.timestamp_start = 1_000_000.0
        old_killed.kill()
        await r.error(old_killed)
        r.done()
    assert stored(tmp_path) == []


async def test_benign_one_in_n_recorded_in_full(tmp_path):
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path, openflare_record_benign_one_in=3)
        r.running()
        for i in range(9):
            await r.response(passed_flow(path=f"/p{i}?password=x".encode()))
        r.done()
    recs = stored(tmp_path)
    fulls = [x for x in recs if x["tier"] == "full"]
    assert len(recs) == 9 and len(fulls) == 3
    assert all(x["sampled"] and x["verdict"] == "pass" and x["target"].endswith("password=*masked*") for x in fulls)


async def test_body_cap(tmp_path):
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path, openflare_record_body_cap=100)
        r.running()
        f = refused_flow()
        f.request.headers["content-type"] = "text/plain"
        f.request.content = b"A" * 5000
        await r.response(f)
        r.done()
    (rec,) = stored(tmp_path)
    assert rec["body"] == "A" * 100 and rec["body_size"] == 5000 and rec["body_truncated"] is True


async def test_background_writer_stores_while_running(tmp_path):
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        for i in range(50):
            await r.response(passed_flow(ip=f"10.0.0.{i}"))
        for _ in range(200):  # the writer task drains the queue on its own
            await asyncio.sleep(0.05)
            if r.writer.stats["stored"] == 50:
                break
        assert r.writer.stats["stored"] == 50 and not r.queue
        r.done()
    assert len(stored(tmp_path)) == 50


async def test_a_response_waits_for_its_journal_write(tmp_path):
    """The hook returns (the response goes) only once the record is in the journal file."""
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        await r.response(refused_flow())
        journal = [x for batch in records.SpillFile(tmp_path / "spill.jsonl").read(10) for x in batch]
        assert [(x["seq"], x["tier"], x["client_ip"]) for x in journal] == [(0, "full", "198.51.100.9")]
        assert r.writer.stats["unacknowledged"] == 0
        r.done()
    assert len(stored(tmp_path)) == 1 and not (tmp_path / "spill.jsonl").exists()


async def test_a_key_in_the_environment_keys_the_chain(tmp_path, monkeypatch, caplog):
    key = "correct horse battery staple"
    monkeypatch.setenv(records.ENV_KEY, key)
    caplog.set_level(logging.INFO)
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        await r.response(refused_flow())
        await r.response(passed_flow())
        r.done()
    kid = records.key_id(key.encode())
    assert f"keyed ({records.ENV_KEY}, key id {kid})" in caplog.text and key not in caplog.text
    recs = stored(tmp_path)
    assert [x["keyed"] for x in recs] == [kid, kid]
    assert records.verify(recs)["broken"] is None  # the key from the environment
    assert records.verify(recs, key=b"another key, guessed")["broken"]["reason"].startswith("keyed with another key")
    assert records.verify(recs, key=None)["unauthenticated"] == 2


async def test_fsync_syncs_the_journal_before_the_response_goes(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(os.fstat(fd).st_size), real(fd))[1])
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path, openflare_record_fsync=True)
        r.running()
        await r.response(passed_flow())
        assert len(synced) == 1 and synced[0] == (tmp_path / "spill.jsonl").stat().st_size > 0
        r.done()
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)  # the default: no fsync (a killed proxy loses nothing; a power cut may)
        r.running()
        await r.response(passed_flow())
        r.done()
    assert len(synced) == 1


async def test_a_stalled_journal_does_not_hold_responses(tmp_path, monkeypatch, caplog):
    import os
    import threading

    monkeypatch.setattr(recorder, "ACK_WAIT_S", 0.2)
    disk = threading.Event()  # the disk answers when set
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (disk.wait(60), real(fd))[1])
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path, openflare_record_fsync=True)
        r.running()
        await asyncio.wait_for(r.response(passed_flow(ip="10.4.0.1")), 30)  # released by the stall
        assert r.stalled and "has not answered" in caplog.text
        await asyncio.wait_for(r.response(passed_flow(ip="10.4.0.2")), 30)  # does not wait at all
        assert r.writer.stats["unacknowledged"] == 2
        disk.set()
        for _ in range(600):
            await asyncio.sleep(0.05)
            if r.writer.stats["journaled"] == 2:
                break
        assert r.writer.stats["journaled"] == 2 and not r.stalled
        await r.response(passed_flow(ip="10.4.0.3"))  # waits again, and is acknowledged
        assert r.writer.stats["unacknowledged"] == 2
        r.done()
    assert sorted(x["client_ip"] for x in stored(tmp_path)) == ["10.4.0.1", "10.4.0.2", "10.4.0.3"]


async def test_full_queue_overflows_instead_of_blocking(tmp_path):
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path, openflare_record_queue=5)
        r.running()
        # 40 flows at once: the journal task cannot run before all of them have queued or overflowed
        await asyncio.gather(*(r.response(passed_flow(ip=f"10.1.0.{i}")) for i in range(40)))
        assert r.writer.stats["overflowed"] == 35 and r.writer.stats["journaled"] == 5
        r.done()
        stats = r.writer.stats if r.writer else None
    assert stats is None
    recs = stored(tmp_path)
    assert len(recs) == 40 and sorted(x["client_ip"] for x in recs) == sorted(f"10.1.0.{i}" for i in range(40))
    assert records.verify(iter(recs))["broken"] is None


async def test_done_flushes_to_spill_when_the_store_is_down(tmp_path, caplog):
    from conftest import free_port

    caplog.set_level(logging.INFO)
    r = recorder.Recorder()
    uri = f"mongodb://127.0.0.1:{free_port()}/openflare?serverSelectionTimeoutMS=200&connectTimeoutMS=200"
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path, openflare_mongo_uri=uri)
        r.running()
        for i in range(20):
            await r.response(passed_flow(ip=f"10.2.0.{i}"))
        await r.response(refused_flow())
        r.done()
    spilled = [x for batch in records.SpillFile(tmp_path / "spill.jsonl").read(100) for x in batch]
    assert len(spilled) == 21 and [x["seq"] for x in spilled] == list(range(21))
    assert "21 spilled" in caplog.text and "0 lost" in caplog.text
    # the next start with a working store replays them
    r2 = recorder.Recorder()
    with taddons.context(r2) as tctx:
        configure(tctx, r2, tmp_path)
        r2.running()
        r2.done()
    recs = stored(tmp_path)
    assert len(recs) == 21 and records.verify(iter(recs))["broken"] is None
    assert not (tmp_path / "spill.jsonl").exists()


async def test_disabled_records_nothing(tmp_path):
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path, openflare_record=False)
        r.running()
        await r.response(refused_flow())
        r.done()
    assert not (tmp_path / "store").exists()


async def test_done_writes_what_the_journal_task_was_still_writing(tmp_path):
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        waiting = [asyncio.ensure_future(r.response(passed_flow(ip=f"10.3.0.{i}"))) for i in range(3)]
        await asyncio.sleep(0)  # the hooks queue their captures
        r.inflight = [r.queue.popleft()[0]]  # as if the journal task had taken one and not written it yet
        r.done()
        for w in waiting:
            w.cancel()
    assert len(stored(tmp_path)) == 3


# ---- one recording process per embedded store and spill file; messages name the store in use ---------

HOLD_LOCKS = """
import sys, time
from addons import records
records.acquire_locks(records.lock_paths(sys.argv[1], sys.argv[2]))
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def other_process(tmp_path):
    """Another process holding the store's and the spill file's locks (as a running proxy does)."""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCKS, str(tmp_path / "store"), str(tmp_path / "spill.jsonl")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait(10)


async def test_a_second_process_on_the_same_store_does_not_start(tmp_path, other_process, caplog):
    # The other process left a spilled record behind: this one must never replay (and delete) it.
    spill = tmp_path / "spill.jsonl"
    spill.write_text(records.dumps_line({"_id": "theirs", "chain": "other", "seq": 0}))
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        with caplog.at_level(logging.INFO):
            r.running()
        errors = [rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR"]
        assert len(errors) == 1, errors
        assert f"pid {other_process.pid}" in errors[0] and str((tmp_path / "store").resolve()) in errors[0]
        assert "own openflare_record_dir and openflare_record_spill" in errors[0] and "Not starting" in errors[0]
        assert r.writer is None and r.locks == []
        await r.response(refused_flow())  # a flow this process sees: not recorded, not spilled
        r.done()
    assert spill.read_text() == records.dumps_line({"_id": "theirs", "chain": "other", "seq": 0})
    assert not (tmp_path / "store" / "openflare").exists()  # nothing written to the store either


async def test_the_lock_goes_with_the_process(tmp_path, other_process, caplog):
    other_process.kill()
    other_process.wait(10)
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        assert r.writer is not None and len(r.locks) == 2
        r.done()
    assert r.locks == [] and not [rec for rec in caplog.records if rec.levelname == "ERROR"]


async def test_mongodb_takes_the_spill_lock_only(tmp_path, other_process, caplog, monkeypatch):
    # MongoDB is shared by design (one chain per process), the spill file never is.
    monkeypatch.setenv("OPENFLARE_MONGO_URI", "mongodb://openflare:s3cret@127.0.0.1:1/waf")
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        (error,) = [rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR"]
        assert "the spill file" in error and f"pid {other_process.pid}" in error and "record store" not in error.split(";")[0]
        r.done()


async def test_the_store_in_use_is_named_at_start(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("OPENFLARE_MONGO_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, openflare_instance="test-proxy")  # the defaults: data/records, data/records-spill.jsonl
        with caplog.at_level(logging.INFO):
            r.running()
        r.done()
    (line,) = [rec.getMessage() for rec in caplog.records if "writing to" in rec.getMessage()]
    assert f"embedded store {tmp_path / 'data' / 'records'} (no MongoDB URI (openflare_mongo_uri, OPENFLARE_MONGO_URI))" in line
    assert f"spill file {tmp_path / 'data' / 'records-spill.jsonl'}" in line

    caplog.clear()
    monkeypatch.setenv("OPENFLARE_MONGO_URI", "mongodb://openflare:s3cret@127.0.0.1:1/waf")
    r = recorder.Recorder()
    with taddons.context(r) as tctx:
        configure(tctx, r, tmp_path)
        with caplog.at_level(logging.INFO):
            r.running()
        r.writer.store.close()  # nothing listens there: no flush at exit
        r.writer = None
        r.done()
    (line,) = [rec.getMessage() for rec in caplog.records if "writing to" in rec.getMessage()]
    assert "MongoDB 127.0.0.1:1/waf (OPENFLARE_MONGO_URI)" in line and "s3cret" not in line


def test_readers_never_create_a_store(tmp_path):
    with pytest.raises(records.StoreMissing, match="no record store at .*typo.*does not exist"):
        records.store_from_args(None, str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()
    (tmp_path / "other").mkdir()
    with pytest.raises(records.StoreMissing, match="not an OpenFlare record store"):
        records.store_from_args(None, str(tmp_path / "other"))
    assert list((tmp_path / "other").iterdir()) == []


# --- every refusal is explained: the deciding field in the comment and in the record ------------------

FORM = (b"Content-Type", b"application/x-www-form-urlencoded")
BOUNDARY = b"x7MA4YWxkTrZu0gW"
EXPLAINED_AT = [  # (location, the field's name, method, path, headers, body)
    ("query", "id", b"GET", b"/item?id=1%27%20or%201%3D1--", [], b""),
    ("form", "comment", b"POST", b"/c", [FORM], b"name=ann&comment=%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
    ("json", "user.note", b"POST", b"/api", [(b"Content-Type", b"application/json")],
     b'{"user": {"name": "ann", "note": "<img src=x onerror=alert(1)>"}}'),
    ("header", "x-api-version", b"GET", b"/", [(b"X-Api-Version", b"' or 1=1--")], b""),
    ("cookie", "pref", b"GET", b"/", [(b"Cookie", b"theme=dark; pref=%27%20or%201%3D1--")], b""),
    ("path", "1", b"GET", b"/files/..%2F..%2F..%2Fetc%2Fpasswd", [], b""),
    ("multipart", "bio", b"POST", b"/upload", [(b"Content-Type", b"multipart/form-data; boundary=" + BOUNDARY)],
     b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="bio"\r\n\r\n<script>alert(1)</script>\r\n--'
     + BOUNDARY + b"--\r\n"),
]


@pytest.mark.parametrize("loc, name, method, path, headers, body", EXPLAINED_AT, ids=[e[0] for e in EXPLAINED_AT])
async def test_the_record_and_comment_name_the_deciding_field(tmp_path, loc, name, method, path, headers, body):
    import models

    from addons.features import FeatureExtractor
    from addons.scorer import Scorer

    fx, sc, r = FeatureExtractor(), Scorer(), recorder.Recorder()
    with taddons.context(fx, sc, r) as tctx:
        tctx.configure(sc, openflare_model=str(models.save(models.attack_model(), tmp_path / "model", "attack")))
        configure(tctx, r, tmp_path)
        r.running()
        f = tflow.tflow(req=tutils.treq(method=method, path=path, headers=[(b"Host", b"app"), *headers], content=body))
        f.request.timestamp_start = time.time()
        f.client_conn.peername = ("198.51.100.4", 40000)
        fx.request(f)
        await sc.request(f)
        assert f.response.status_code == common.BLOCK_STATUS
        assert f.metadata[common.FIELD] == [loc, name]
        assert f'{loc} "{name}": ' in f.comment
        await r.response(f)
        r.done()
    (rec,) = stored(tmp_path)
    assert rec["refused_by"] == "score" and rec["field"] == [loc, name]
    assert rec["explanation"] == f.metadata[common.EXPLANATION] and rec["explanation"].startswith(f'{loc} "{name}": ')
    assert rec["signal"] == f.metadata[common.SIGNAL]


async def test_an_oversize_refusal_is_recorded_as_such_with_its_body_as_sent(tmp_path):
    import gzip

    from addons.features import FeatureExtractor

    fx, r = FeatureExtractor(), recorder.Recorder()
    bomb = gzip.compress(b"a" * 20_000_000)
    with taddons.context(fx, r) as tctx:
        configure(tctx, r, tmp_path)
        r.running()
        f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/up", content=bomb,
                                        headers=[(b"Content-Encoding", b"gzip"), (b"Content-Type", b"text/plain")]))
        f.request.timestamp_start = time.time()
        fx.request(f)
        assert f.response.status_code == 413
        await r.response(f)
        r.done()
    (rec,) = stored(tmp_path)
    assert rec["refused_by"] == "oversize" and rec["verdict"] == "block" and rec["status"] == 413
    assert rec["body_size"] == len(bomb)  # as sent: the recorder never inflates what the limit refused
