"""addons/report.py and `openflare report`: the numbers of a store of known records, privacy, the review queue,
bounded counters, and the page as a real headless browser (Debian's chromium) renders it."""

import datetime
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import mongomock
import pytest

from addons import cli
from addons import records
from addons import report

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "build" / "test-artifacts"  # git-ignored: the screenshot of the last run
NOW = time.time()
SECRET = "hunter2-very-secret"


def cap(ago_s: float, ip: str, verdict: str, score: int | None, full: bool = False, **more) -> dict:
    c = {"time": NOW - ago_s, "client_ip": ip, "verdict": verdict, "score": score, "full": full}
    if full:
        c.update(method=b"GET", target=b"/", headers=[(b"Authorization", f"Bearer {SECRET}".encode()), (b"X-Seen", b"yes")],
                 body=b"", body_size=0, local_score=score, model_version="local-test")  # fmt: skip
    c.update(more)
    return c


def known() -> list[dict]:
    """66 records in the last two days (plus one from ten days ago): 40 brief passes, 6 passes recorded in full
    (scores 2-6), 9 refusals by the model from 203.0.113.7 (sqli) and 3 from 203.0.113.8 (xss), 5 refusals of
    the banned 198.51.100.5, 2 oversize, one detect-only forward (scored 8, passed on)."""
    caps = [cap(3600 * (i % 40) + 60, f"192.0.2.{i}", "pass", 1 + i % 3) for i in range(40)]
    caps += [cap(600 + i, "192.0.2.200", "pass", s, full=True, sampled=True, target=f"/search?q=shoes{s}".encode())
             for i, s in enumerate((2, 3, 4, 5, 6, 6))]
    for i, s in enumerate((7, 7, 8, 9, 10, 10, 10, 10, 10)):
        caps.append(cap(7200 + i, "203.0.113.7", "block", s, full=True, refused_by="score", category="sqli", status=403,
                        target=f"/login?user=admin%27--&password={SECRET}&n={i}".encode(), field=["query", "user"],
                        signal="sqli (libinjection s&1c)", explanation=f'query "user": sqli (libinjection s&1c), score {s}'))
    for i in range(3):
        caps.append(cap(9000 + i, "203.0.113.8", "block", 9, full=True, refused_by="score", category="xss", status=403,
                        target=b"/comment", field=["form", "text"], signal="xss (libinjection)"))
    caps += [cap(86400 + i, "198.51.100.5", "block", None, full=True, refused_by="ban", status=403, target=b"/") for i in range(5)]
    caps += [cap(300 + i, "192.0.2.99", "block", None, full=True, refused_by="oversize", status=413, target=b"/upload") for i in range(2)]
    caps.append(cap(400, "192.0.2.10", "block", 8, full=True, refused_by=None, target=b"/detect-only"))
    caps.append(cap(10 * 86400, "192.0.2.250", "block", 10, full=True, refused_by="score", target=b"/too-old"))
    return caps


def fill(store: records.Store, tmp_path) -> records.Writer:
    writer = records.Writer(store, tmp_path / "spill.jsonl", "test-proxy", batch=50)
    writer.write(known())
    writer.close()
    return writer


@pytest.fixture
def embedded(tmp_path):
    store = records.open_store(directory=tmp_path / "store")
    fill(store, tmp_path)
    yield store
    store.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(page, aggregate) of the known records in an embedded store, made once for the tests that only read it."""
    tmp = tmp_path_factory.mktemp("report")
    store = records.open_store(directory=tmp / "store")
    fill(store, tmp)
    try:
        yield report.build(store, since_days(7), threshold=6, store_args=" --record-dir data/x")
    finally:
        store.close()


def since_days(n: float) -> datetime.datetime:
    return records.utcnow() - datetime.timedelta(days=n)


def check_numbers(agg: report.Aggregate) -> None:
    assert agg.records == 66
    assert (agg.passed, agg.refused, agg.detect_only) == (47, 19, 1)  # the detect-only forward passed
    assert agg.reasons == {"score": 12, "ban": 5, "oversize": 2}
    assert agg.ips.top(3) == [("203.0.113.7", 9), ("198.51.100.5", 5), ("203.0.113.8", 3)]
    assert dict(agg.categories.top(5)) == {"sqli": 9, "xss": 3}
    assert dict(agg.paths.top(10)) == {"/login": 9, "/": 5, "/comment": 3, "/upload": 2}
    assert agg.scores["passed"][1:] == [14, 14, 14, 1, 1, 2, 0, 1, 0, 0]
    assert agg.scores["refused"][1:] == [0, 0, 0, 0, 0, 0, 2, 1, 4, 5]
    assert agg.scores["refused"][0] == 7  # banned and oversize: never scored
    assert sum(b for _, _, b in agg.hours.values()) == 5
    assert dict(agg.versions.top(3)) == {"local-test": 6 + 19 + 1}  # full records only


def test_report_numbers_from_the_embedded_store(built):
    page, agg = built
    check_numbers(agg)
    near_pass = [(d, e.score, e.target) for d, e in agg.near_pass.entries()]
    assert [d for d, *_ in near_pass] == [0, 0, 1, 2, 3, 4]  # scores 6, 6, 5, 4, 3, 2
    assert near_pass[0][2] == "/search?q=shoes6"
    near_ref = [(d, e.score) for d, e in agg.near_refused.entries()]
    assert near_ref == [(0, 7), (0, 7), (1, 8), (2, 9), (2, 9), (2, 9), (2, 9)] + [(3, 10)] * 5
    assert 'data-records="66"' in page and 'data-refused="19"' in page


def test_the_review_queue_names_the_deciding_field_and_the_exact_label_commands(built):
    page, agg = built
    d, e = agg.near_refused.entries()[0]
    assert (d, e.score, e.field, e.signal) == (0, 7, ["query", "user"], "sqli (libinjection s&1c)")
    assert re.fullmatch(r"[0-9a-f]{64}", e.id)
    assert f"confirm: <code>openflare label --record-dir data/x {e.id} attack</code>" in page
    assert f"correct: <code>openflare label --record-dir data/x {e.id} benign --force</code>" in page
    _, p = agg.near_pass.entries()[0]
    assert f"<code>openflare label --record-dir data/x {p.id} benign</code>" in page
    assert f"<code>openflare label --record-dir data/x {p.id} attack --force</code>" in page
    assert "query &#x27;user&#x27;" in page and "sqli (libinjection s&amp;1c)" in page


def test_labels_already_given_are_shown(embedded, tmp_path):
    _, agg = report.build(embedded, since_days(7), threshold=6)
    _, e = agg.near_refused.entries()[0]
    rec = embedded.coll.find_one({"_id": e.id})
    cli._labels_of(embedded).coll.insert_one(records.operator_label(rec, "attack", time.time()))
    _, agg = report.build(embedded, since_days(7), threshold=6)
    assert [x.label for _, x in agg.near_refused.entries() if x.id == e.id] == ["attack"]


def test_privacy_masked_stays_masked_and_no_headers_or_bodies(built):
    page, _ = built
    assert SECRET not in page
    assert "password=*masked*" in page  # as recorded: the target's secret masked
    assert "X-Seen" not in page and "Bearer" not in page
    for ip in (f"192.0.2.{i}" for i in range(40)):  # brief records: counted, never listed
        assert f">{ip}<" not in page


def test_the_page_is_self_contained(built):
    page, _ = built
    assert "<svg" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page
    assert not re.search(r"""url\(\s*["']?[^#"'\s]""", page)  # only the SVGs' own url(#clip) references


def test_mongodb_store_gives_the_same_numbers(tmp_path):
    client = mongomock.MongoClient()
    store = records.Store(client.openflare.records, "mongomock", client)
    fill(store, tmp_path)
    _, agg = report.build(store, since_days(7), threshold=6)
    check_numbers(agg)


def test_since_bounds_the_period(embedded):
    _, agg = report.build(embedded, since_days(0.5), threshold=6)
    assert agg.reasons.get("ban", 0) == 0  # a day ago
    _, agg = report.build(embedded, None, threshold=6)
    assert agg.records == 67


def test_top_counter_is_bounded_and_says_when_it_is_approximate():
    c = report.TopCounter(cap=10)
    for i in range(5000):
        c.add(f"10.0.{i // 256}.{i % 256}")
        c.add("203.0.113.7")
    assert len(c.counts) <= 20
    assert c.approximate and c.floor >= 1
    assert c.top(1)[0][0] == "203.0.113.7" and c.top(1)[0][1] > 5000 - c.floor


def test_cli_report_writes_the_file(embedded, tmp_path, capsys):
    out = tmp_path / "week.html"
    rc = cli.main(["report", "--record-dir", str(tmp_path / "store"), "--since", "7d", "--out", str(out), "--conf", os.devnull])
    assert rc == 0, capsys.readouterr()
    text = out.read_text()
    assert 'data-records="66"' in text
    assert f"openflare label --record-dir {tmp_path / 'store'} " in text
    said = capsys.readouterr().out
    assert "66 records" in said and "19 refused" in said
    assert cli.main(["report", "--record-dir", str(tmp_path / "store"), "--since", "yesterday", "--conf", os.devnull]) == 2
    assert cli.main(["report", "--record-dir", str(tmp_path / "nowhere"), "--conf", os.devnull]) == 2


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_rendered_in_headless_chromium_with_a_screenshot(built, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt-get where it can; "
                    "here it could not be): the report is not rendered in a browser")  # fmt: skip
    page, _ = built
    html_path = tmp_path / "report.html"
    html_path.write_text(page)
    shot = tmp_path / "report.png"
    args = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400"]  # fmt: skip
    res = subprocess.run(args + [f"--screenshot={shot}", html_path.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file(), res.stderr.decode(errors="replace")[-2000:]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report.png")
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2400)
    colours = img.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # text and plots, not a blank page
    refused = tuple(int(report.REFUSED_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    assert any(c == refused for _, c in colours)  # the SVG plots were drawn
    dom = subprocess.run(args + ["--dump-dom", html_path.as_uri()], capture_output=True, timeout=120).stdout.decode()
    assert 'data-records="66"' in dom and "Review queue" in dom


def test_the_time_of_an_embedded_row_is_read_without_decoding_it():
    import bson

    t = datetime.datetime(2026, 12, 7, 12, 0, 0, 123000)
    ms = int((t - report.EPOCH).total_seconds() * 1000)
    assert report.bson_time_ms(bson.encode({"_id": "a" * 64, "tier": "brief", "time": t, "score": 3})) == ms
    assert report.bson_time_ms(bson.encode({"n": 1, "f": 0.5, "b": True, "time": t})) == ms
    assert report.bson_time_ms(bson.encode({"a": 1, "b": 2, "c": 3, "d": 4, "time": t})) is None  # too far: decoded
    assert report.bson_time_ms(bson.encode({"_id": "x", "headers": [["a", "b"]], "time": t})) is None
    assert report.bson_time_ms(bson.encode({"_id": "x", "time": "not a date"})) is None


def test_workers_reading_shares_of_the_rows_give_the_same_report(embedded, monkeypatch):
    one = report.scan(embedded, since_days(7), 6)
    monkeypatch.setattr(report, "PARALLEL_MIN_ROWS", 10)
    three = report.scan(embedded, since_days(7), 6, workers=3)
    check_numbers(three)
    for name in ("records", "passed", "refused", "verdicts", "tiers", "reasons", "hours", "scores", "version_times", "first", "last"):
        assert getattr(three, name) == getattr(one, name), name
    for name in ("ips", "paths", "categories", "versions"):
        assert getattr(three, name).counts == getattr(one, name).counts, name
    for q in ("near_pass", "near_refused"):
        assert [e.id for _, e in getattr(three, q).entries()] == [e.id for _, e in getattr(one, q).entries()]
        assert getattr(three, q).seen == getattr(one, q).seen


def test_an_empty_period_still_makes_a_page():
    client = mongomock.MongoClient()
    store = records.Store(client.openflare.records, "mongomock", client)
    page, agg = report.build(store, since_days(7), threshold=6)
    assert agg.records == 0 and 'data-records="0"' in page
    assert "No passed request recorded in full" in page and "No request refused by the model" in page


def test_the_workers_stores_are_read_too_and_their_label_commands_name_them(embedded, tmp_path, capsys):
    """`make run WORKERS=N`: worker K > 1 writes <record_dir>-wK; the report reads them all, merged."""
    w2 = tmp_path / "store-w2"
    other = records.open_store(directory=w2)
    writer = records.Writer(other, tmp_path / "spill-w2.jsonl", "test-proxy-w2")
    writer.write([cap(5, "203.0.113.99", "block", 7, full=True, refused_by="score", category="sqli", status=403,
                      target=b"/from-worker-2", field=["query", "id"], signal="learnt n-grams")])  # fmt: skip
    writer.close()
    rid = other.coll.find_one({})["_id"]
    other.close()
    (tmp_path / "store-wx").mkdir()  # not a worker's store: ignored
    out = tmp_path / "all.html"
    rc = cli.main(["report", "--record-dir", str(tmp_path / "store"), "--since", "7d", "--out", str(out), "--conf", os.devnull])
    assert rc == 0, capsys.readouterr()
    page = out.read_text()
    assert 'data-records="67"' in page and 'data-refused="20"' in page
    assert f"<code>openflare label --record-dir {w2} {rid} attack</code>" in page
    assert "and 1 worker store(s)" in capsys.readouterr().out
