"""addons/cli.py, the `openflare` command line, run in-process (`cli.main`).

Bans and the allowlist: the shared Redis at 127.0.0.1:6379 under this test's own key prefix (only its keys
are deleted), and the embedded ban store served on a socket in a temporary directory. Records, labels and
the hash chains: embedded record stores in temporary directories, and mongomock for MongoDB.
(tests/test_cli_e2e.py runs the installed console script against running mitmdump processes.)
"""

import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mongomock
import pytest
import redis

from addons import banserver
from addons import banstore
from addons import cli
from addons import records
from conftest import free_port

REDIS_URL = os.environ.get("OPENFLARE_TEST_REDIS", "redis://127.0.0.1:6379/0")
T0 = time.time() - 1800  # half an hour ago


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No settings from the user's environment or from the repo's mitm.conf."""
    monkeypatch.delenv("OPENFLARE_REDIS_URL", raising=False)
    monkeypatch.delenv("OPENFLARE_MONGO_URI", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def prefix():
    p = f"oftest:{uuid.uuid4().hex[:12]}:"
    yield p
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=p + "*"))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture
def run(capsys):
    """run(*argv) -> (exit status, stdout, stderr); never a traceback."""

    def call(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return call


# --- bans and the allowlist against Redis ---


def test_bans_add_list_remove(run, prefix):
    r = redis.Redis.from_url(REDIS_URL)
    try:
        code, out, _ = run("bans", "add", "198.51.100.7", "90", "--redis-url", REDIS_URL, "--prefix", prefix, "--reason", "probing /admin")
        assert code == 0 and "banned 198.51.100.7 for 90 s (1st ban) in Redis 127.0.0.1:6379/0" in out
        assert 0 < r.ttl(prefix + "ban:198.51.100.7") <= 90
        code, out, _ = run("--redis-url", REDIS_URL, "--prefix", prefix, "bans")  # options before the command too
        lines = out.splitlines()
        assert code == 0 and lines[0].split() == ["IP/NETWORK", "REASON", "SECONDS", "LEFT", "STRIKES", "BANS"]
        assert lines[2].split()[:3] == ["198.51.100.7", "probing", "/admin"] and lines[2].split()[-2:] == ["0", "1"]
        code, out, _ = run("bans", "list", "--json", "--redis-url", REDIS_URL, "--prefix", prefix)
        [row] = json.loads(out)
        assert row["ip"] == "198.51.100.7" and row["reason"] == "probing /admin" and 85 <= row["seconds_left"] <= 90
        assert row["strikes"] == 0 and row["bans"] == 1
        code, out, _ = run("bans", "remove", "198.51.100.7", "--redis-url", REDIS_URL, "--prefix", prefix)
        assert code == 0 and out.startswith("unbanned 198.51.100.7") and not r.exists(prefix + "ban:198.51.100.7")
        code, out, _ = run("bans", "remove", "198.51.100.7", "--redis-url", REDIS_URL, "--prefix", prefix)
        assert code == 0 and "was not banned" in out
        assert run("bans", "--redis-url", REDIS_URL, "--prefix", prefix)[1] == "No bans in force.\n"
    finally:
        r.close()


def test_settings_come_from_the_options_file_the_proxies_read(run, prefix, tmp_path, monkeypatch):
    conf = tmp_path / ".mitmproxy" / "config.yaml"  # where `make run` reads mitm.conf from
    conf.parent.mkdir()
    conf.write_text(f'openflare_redis_url: {REDIS_URL}\nopenflare_redis_prefix: "{prefix}"\nopenflare_ban_seconds: 120\n'
                    "openflare_ipv6_prefix: 64\nopenflare_allowlist: [192.0.2.0/24]\n")  # fmt: skip
    code, out, _ = run("bans", "add", "198.51.100.8")  # no SECONDS: the file's openflare_ban_seconds
    assert code == 0 and "for 120 s (1st ban)" in out
    code, out, _ = run("bans", "add", "198.51.100.8")
    assert code == 0 and "for 240 s (2nd ban)" in out  # a repeat ban doubles, as a strike-made one does
    code, out, _ = run("bans", "add", "2001:db8::7")
    assert code == 0 and "banned 2001:db8::/64" in out  # grouped as the proxies group IPv6 clients
    code, _, err = run("bans", "add", "192.0.2.9")
    assert code == 2 and "192.0.2.9 is allowlisted" in err
    # A flag beats the file, and the file beats the environment.
    monkeypatch.setenv("OPENFLARE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    args = cli.parser().parse_args(["bans", "--prefix", "other:"])
    s = cli.settings(args)
    assert s.redis_url == REDIS_URL and s.prefix == "other:" and s.conf_path == ".mitmproxy/config.yaml"
    conf.write_text("openflare_ban_seconds: soon\n")
    code, _, err = run("bans", "add", "198.51.100.9")
    assert code == 2 and "openflare_ban_seconds must be an integer" in err
    conf.write_text("openflare_ban_seconds: [\n")
    code, _, err = run("bans")
    assert code == 2 and "not valid YAML" in err


def test_allow_add_list_remove(run, prefix, tmp_path):
    conf = tmp_path / "of.yaml"
    conf.write_text(f'openflare_redis_prefix: "{prefix}"\nopenflare_allowlist: [10.0.0.0/8]\n')
    base = ["--conf", conf, "--redis-url", REDIS_URL]
    code, out, _ = run("allow", "add", "198.51.100.0/24", "60", *base)
    assert code == 0 and "allowlisted 198.51.100.0/24 for 60 s" in out
    assert run("allow", "add", "2001:db8::1", *base)[0] == 0
    code, out, _ = run("allow", "--json", *base)
    rows = json.loads(out)
    assert [r["network"] for r in rows] == ["10.0.0.0/8", "198.51.100.0/24", "2001:db8::1/128"]
    assert rows[0]["source"] == f"options file ({conf})" and rows[2]["seconds_left"] is None
    assert 55 <= rows[1]["seconds_left"] <= 60
    code, out, _ = run("allow", "list", *base)
    assert code == 0 and "added at run time" in out and "never ends" in out
    code, _, err = run("bans", "add", "198.51.100.77", *base)
    assert code == 2 and "allowlisted" in err
    assert run("allow", "remove", "198.51.100.0/24", *base)[0] == 0
    code, out, _ = run("allow", "remove", "198.51.100.0/24", *base)
    assert code == 0 and "was not in the run-time allowlist" in out
    code, _, err = run("allow", "remove", "10.0.0.0/8", *base)
    assert code == 2 and "remove it there" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bans", "add", "example.com"], "not an IP address"),
        (["bans", "add", "10.0.0.0/8"], "bans are per IP"),
        (["bans", "add", "198.51.100.1", "soon"], "whole number of seconds"),
        (["bans", "add", "198.51.100.1", "-5"], "between 0 and"),
        (["bans", "add"], "needs an IP"),
        (["bans", "remove", "198.51.100.1", "60"], "takes no SECONDS"),
        (["bans", "list", "198.51.100.1"], "takes no IP"),
        (["bans", "ban"], "invalid choice"),
        (["allow", "add", "10.0.0.0/33"], "not an IP address or CIDR range"),
        (["label", "abc", "maybe"], "invalid choice"),
        (["records", "--since", "yesterday"], "not a duration"),
        (["records", "--verdict", "blocked"], "invalid choice"),
        (["records", "--ip", "nope"], "not an IP address"),
        (["records", "--limit", "-1"], "--limit must be >= 0"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_a_clear_error_with_status_2(run, prefix, tmp_path, argv, message):
    (tmp_path / "data" / "records").mkdir(parents=True)
    code, out, err = run(*argv, "--redis-url", REDIS_URL, "--prefix", prefix) if argv[0] in ("bans", "allow") else run(*argv)
    assert code == 2 and message in err, err
    assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(match=prefix + "*"))  # nothing written


def test_an_unreachable_store_is_a_failure_with_status_1(run):
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, _, err = run("bans", "--redis-url", url)
    assert code == 1 and f"cannot reach Redis 127.0.0.1:{url.rsplit(':', 1)[1]}" in err
    code, _, err = run("bans", "add", "198.51.100.1")  # no Redis, and no proxy serving its in-process store here
    assert code == 1 and "no OpenFlare proxy serves its in-process ban store at data/bans.sock" in err
    assert not Path("data").exists()  # nothing created by looking


def test_against_the_embedded_store_of_a_running_proxy(run, tmp_path):
    sock = str(tmp_path / "bans.sock")
    hub = banserver.Embedded.open(sock)  # what a proxy on embedded defaults serves
    try:
        code, out, _ = run("bans", "add", "198.51.100.10", "30", "--ban-socket", sock)
        assert code == 0 and f"in the in-process ban store of process {os.getpid()} ({sock})" in out

        async def peek():
            c = hub.client()
            return await c.hgetall("openflare:ban:198.51.100.10"), await c.pttl("openflare:ban:198.51.100.10")

        fields, ttl = asyncio.run(peek())
        assert fields[b"reason"] == b"manual" and 0 < ttl <= 30_000
        assert "198.51.100.10" in run("bans", "--ban-socket", sock)[1]
        assert run("allow", "add", "203.0.113.0/24", "--ban-socket", sock)[0] == 0
        assert "203.0.113.0/24" in run("allow", "--ban-socket", sock)[1]
        assert run("bans", "remove", "198.51.100.10", "--ban-socket", sock)[0] == 0
        assert run("bans", "--ban-socket", sock)[1] == "No bans in force.\n"
    finally:
        hub.close()


# --- records, labels, the hash chains ---


def capture(i, verdict="block", score=9, ip="198.51.100.9", full=True, target=b"/?id=1%27%20OR%20%271%27=%271", **kw):
    cap = {"time": T0 + i, "client_ip": ip, "verdict": verdict, "score": score, "full": full}
    if full:
        cap.update(method=b"GET", target=target, headers=[(b"Host", b"app"), (b"Cookie", b"sid=abc")], body=b"",
                   body_size=0, local_score=score, category="sqli", model_version="m-1", refused_by="score", status=403)  # fmt: skip
    cap.update(kw)
    return cap


@pytest.fixture
def store_dir(tmp_path):
    """An embedded record store with five chained records: blocks, a passed brief one, a sampled pass."""
    d = tmp_path / "data" / "records"
    store = records.open_store(directory=d)
    chain, m = records.Chain("test"), records.Masker()
    caps = [
        capture(0),
        capture(1, ip="203.0.113.5", target=b"/search?q=%3Cscript%3E"),
        capture(2, verdict="pass", score=2, full=False),
        capture(3, verdict="pass", score=3, target=b"/notes?q=hello", refused_by=None, status=200, sampled=True),
        capture(4, verdict="block", score=None, refused_by="ban", target=b"/", local_score=None),
    ]
    docs = [chain.link(records.build(c, m)) for c in caps]
    store.insert(docs)
    store.close()
    return d, [d_["_id"] for d_ in docs]


def test_records_lists_and_filters(run, store_dir):
    d, ids = store_dir
    code, out, _ = run("records", "--record-dir", d)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["TIME", "(UTC)", "ID", "IP"] and len(lines) == 2 + 5
    assert lines[2].split()[2] == ids[4][:16]  # most recent first, ids shortened as `label` accepts them
    assert "(brief record)" in out and "GET /search?q=%3Cscript%3E" in out
    code, out, _ = run("records", "--record-dir", d, "--verdict", "block", "--json")
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [ids[4], ids[1], ids[0]] and rows[1]["client_ip"] == "203.0.113.5"
    assert rows[0]["refused_by"] == "ban" and rows[2]["score"] == 9
    rows = json.loads(run("records", "--record-dir", d, "--ip", "203.0.113.5", "--json")[1])
    assert [r["id"] for r in rows] == [ids[1]]
    since = datetime.datetime.fromtimestamp(T0 + 2.5, datetime.timezone.utc).isoformat()
    rows = json.loads(run("records", "--record-dir", d, "--since", since, "--json")[1])
    assert [r["id"] for r in rows] == [ids[4], ids[3]]
    assert json.loads(run("records", "--record-dir", d, "--since", "1m", "--json")[1]) == []  # all older
    assert len(json.loads(run("records", "--record-dir", d, "--since", "1h", "--json")[1])) == 5
    code, out, err = run("records", "--record-dir", d, "--limit", "2")
    assert len(out.splitlines()) == 4 and "the 2 most recent" in err


def test_parse_since():
    now = datetime.datetime(2026, 12, 5, 12, 0, 0)
    assert cli.parse_since("90s", now) == datetime.datetime(2026, 12, 5, 11, 58, 30)
    assert cli.parse_since("2d", now) == datetime.datetime(2026, 12, 3, 12, 0, 0)
    assert cli.parse_since("2026-12-01") == datetime.datetime(2026, 12, 1)
    assert cli.parse_since("2026-12-01T08:00+01:00") == datetime.datetime(2026, 12, 1, 7, 0)
    with pytest.raises(cli.BadInput):
        cli.parse_since("last week")


def labels_of(d):
    store = records.open_store(directory=d)
    try:
        return {x["_id"]: x for x in cli._labels_of(store).coll.find({})}
    finally:
        store.close()


def test_label_contradicting_the_model_needs_force_and_is_an_override(run, store_dir):
    d, ids = store_dir
    code, _, err = run("label", ids[0], "benign", "--record-dir", d)
    assert code == 2 and "OpenFlare refused it" in err and "--force" in err
    assert labels_of(d) == {}  # nothing stored
    code, out, _ = run("label", ids[0], "benign", "--force", "--record-dir", d)
    assert code == 0 and "(an override of the model's verdict)" in out
    doc = labels_of(d)[ids[0]]
    assert doc["label"] == "benign" and doc["label_source"] == "operator" and doc["label_override"] is True
    assert isinstance(doc["label_time"], datetime.datetime)
    # The shape addons/labels.py stores for a flow: the record without its chain fields, masked as recorded.
    assert not {"chain", "seq", "prev", "prev_time", "hash", "instance"} & set(doc)
    assert doc["tier"] == "full" and doc["verdict"] == "block" and ["Cookie", "sid=*masked*"] in doc["headers"]
    # Agreeing with the verdict: no force needed, no override. A ban is a refusal too (records.label_conflict,
    # the one rule for mitmweb and the CLI): labelling it benign needs force like any other.
    assert run("label", ids[1], "attack", "--record-dir", d)[0] == 0
    code, _, err = run("label", ids[4], "benign", "--record-dir", d)
    assert code == 2 and "OpenFlare refused it" in err
    code, _, err = run("label", ids[3], "attack", "--record-dir", d)
    assert code == 2 and "OpenFlare passed it" in err
    labels = labels_of(d)
    assert labels[ids[1]]["label_override"] is False and ids[4] not in labels
    assert ids[3] not in labels
    # Labelling again replaces; the records collection and its chains stay as they were.
    assert run("label", ids[0], "attack", "--record-dir", d)[0] == 0
    assert labels_of(d)[ids[0]]["label"] == "attack" and labels_of(d)[ids[0]]["label_override"] is False
    assert run("verify-log", "--record-dir", d)[0] == 0
    # `records` shows the labels.
    rows = {r["id"]: r for r in json.loads(run("records", "--record-dir", d, "--json")[1])}
    assert rows[ids[0]]["label"] == "attack" and rows[ids[4]]["label"] is None and rows[ids[2]]["label"] is None


def test_label_ids_brief_records_and_missing_stores(run, store_dir, tmp_path):
    d, ids = store_dir
    code, out, _ = run("label", ids[1][:10], "attack", "--record-dir", d)  # a prefix, as `records` shows it
    assert code == 0 and ids[1] in out
    code, _, err = run("label", ids[2], "benign", "--record-dir", d)
    assert code == 2 and "brief record" in err and "openflare_record_benign_one_in" in err
    code, _, err = run("label", "f" * 64, "benign", "--record-dir", d)
    assert code == 2 and "no record with ID" in err
    code, _, err = run("label", ids[0][:1], "benign", "--record-dir", d)
    assert code == 2 and "no record with ID" in err
    code, _, err = run("label", ids[0], "benign", "--record-dir", tmp_path / "typo")
    assert code == 2 and "no embedded record store in" in err and not (tmp_path / "typo").exists()


def test_label_against_mongodb(run, monkeypatch):
    client = mongomock.MongoClient()
    coll = client.openflare.records
    chain = records.Chain("test")
    doc = chain.link(records.build(capture(0, verdict="pass", score=4, refused_by=None, status=200, sampled=True), records.Masker()))
    coll.insert_one(doc)
    opened = []

    def open_store(uri=None, directory=None):
        opened.append(uri)
        return records.Store(coll, "mongomock", None, "MongoDB (mongomock)")

    monkeypatch.setattr(records, "open_store", open_store)
    monkeypatch.setenv("OPENFLARE_MONGO_URI", "mongodb://db.example:27017/openflare")
    code, out, _ = run("label", doc["_id"], "benign")
    assert code == 0 and opened == ["mongodb://db.example:27017/openflare"]
    stored = client.openflare.labels.find_one({"_id": doc["_id"]})
    assert stored["label"] == "benign" and stored["target"] == "/?id=1%27%20OR%20%271%27=%271"
    code, _, err = run("label", doc["_id"], "attack")
    assert code == 2 and "OpenFlare passed it" in err


def test_verify_log(run, store_dir, tmp_path):
    d, ids = store_dir
    code, out, _ = run("verify-log", "--record-dir", d, "--spill", tmp_path / "none.jsonl")
    assert code == 0 and out.startswith("OK (embedded store") and "5 records in 1 chains" in out
    s = records.open_store(directory=d)
    s.coll.update_one({"seq": 2}, {"$set": {"client_ip": "10.0.0.1"}})
    s.close()
    code, out, _ = run("verify-log", "--record-dir", d)
    assert code == 1 and "BROKEN" in out and "seq 2" in out
    code, _, err = run("verify-log", "--record-dir", tmp_path / "typo")
    assert code == 2 and "no embedded record store" in err and not (tmp_path / "typo").exists()


# --- check-config and the console script ---


def test_check_config_runs_configcheck(run, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("openflare_threshold: 8\n")
    code, out, _ = run("check-config", str(good))
    assert code == 0 and "openflare_threshold=8" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("openflare_treshold: 8\n")
    code, _, err = run("check-config", str(bad))
    assert code == 2 and "did you mean openflare_threshold" in err


def test_the_console_script_is_installed():
    exe = Path(sys.executable).parent / "openflare"
    assert exe.is_file(), "pip install -e . installs it from pyproject's [project.scripts]"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "openflare bans add IP [SECONDS]" in res.stdout
    res = subprocess.run([str(exe), "bans", "add", "not-an-ip", "--redis-url", "redis://127.0.0.1:1/0"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "not an IP address" in res.stderr
