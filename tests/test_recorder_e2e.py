"""End to end: a real mitmdump (features, scorer, recorder) in front of the demo app records an attack in
full and a benign request in brief, in the embedded store, with an intact hash chain."""

import json
import subprocess
import sys

import pytest

from addons import records
from conftest import REPO
from conftest import http_request

pytestmark = pytest.mark.e2e

ATTACK = "/?id=1%27%20OR%20%271%27=%271"


def test_attack_in_full_benign_in_brief(mitmdump, upstream, model_conf, tmp_path):
    store_dir, spill = tmp_path / "records", tmp_path / "spill.jsonl"
    conf = dict(model_conf, openflare_record_dir=str(store_dir), openflare_record_spill=str(spill), openflare_instance="e2e-proxy")
    proxy = mitmdump(
        scripts=["addons/features.py", "addons/scorer.py", "addons/recorder.py"],
        mode=f"reverse:{upstream.url}",
        conf=conf,
        env={"OPENFLARE_MONGO_URI": ""},
    )
    # generous timeouts: a loaded CI machine, and the first request pays for lazy imports
    status, _, body = http_request(proxy.port, "GET", ATTACK, {"Authorization": "Bearer sekret", "Cookie": "sid=abc"}, timeout=60)
    assert status == 403
    status, headers, _ = http_request(proxy.port, "GET", "/search?q=blue+shoes", {"User-Agent": "Mozilla/5.0"}, timeout=60)
    assert status == 200 and headers.get("x-upstream") == "openflare-demo"
    proxy.stop()  # SIGTERM: mitmdump's done() flushes what is left
    out, err = proxy.output()
    assert "lost" not in err.replace("0 lost", "")

    store = records.open_store(directory=store_dir)
    recs = list(store.find())
    store.close()
    assert len(recs) == 2, (out, err)
    attack, benign = recs
    assert attack["tier"] == "full" and attack["verdict"] == "block" and attack["refused_by"] == "score"
    assert attack["target"] == ATTACK and attack["method"] == "GET" and attack["status"] == 403
    assert attack["score"] >= 7 and attack["local_score"] is not None and attack["model_version"]
    assert attack["client_ip"] == "127.0.0.1" and attack["instance"] == "e2e-proxy"
    h = dict((p[0].lower(), p[1]) for p in attack["headers"])
    assert h["authorization"] == records.MASK and h["cookie"] == "sid=*masked*"
    assert "sekret" not in json.dumps(attack, default=str)
    assert benign["tier"] == "brief" and benign["verdict"] == "pass" and benign["client_ip"] == "127.0.0.1"
    assert set(benign) == {"_id", "tier", "time", "client_ip", "verdict", "score", "label", "instance", "chain", "seq", "prev", "prev_time", "hash"}
    assert [r["seq"] for r in recs] == [0, 1] and benign["prev"] == attack["hash"]

    verify = subprocess.run(
        [sys.executable, "scripts/verify_log.py", "--dir", str(store_dir), "--spill", str(spill)],
        cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=120,
    )
    assert verify.returncode == 0 and "2 records in 1 chains" in verify.stdout, verify.stdout + verify.stderr
    export = subprocess.run(
        [sys.executable, "scripts/export_records.py", "--dir", str(store_dir)],
        cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=120,
    )
    assert export.returncode == 0, export.stderr
    (line,) = [json.loads(x) for x in export.stdout.splitlines()]
    assert (line["label"], line["target"], line["verdict"], line["label_source"]) == ("attack", ATTACK, "block", "verdict")


def test_a_second_mitmdump_on_the_same_store_stops_at_startup(mitmdump, upstream, model_conf, tmp_path):
    """Two proxies in one checkout (make run, then make web): the second one says which process holds
    the store and exits, instead of writing into the same SQLite files and replaying the first one's spill."""
    conf = dict(model_conf, openflare_record_dir=str(tmp_path / "records"), openflare_record_spill=str(tmp_path / "spill.jsonl"))
    first = mitmdump(scripts=["addons/openflare.py"], mode=f"reverse:{upstream.url}", conf=conf, env={"OPENFLARE_MONGO_URI": ""})
    second = mitmdump(scripts=["addons/openflare.py"], mode=f"reverse:{upstream.url}", conf=conf, env={"OPENFLARE_MONGO_URI": ""}, wait=False)
    assert second.wait() == 1
    out = "".join(second.output())
    assert f"is in use by another process (pid {first.popen.pid}, mitmdump" in out, out
    assert str((tmp_path / "records").resolve()) in out and "Not starting" in out and "Traceback" not in out
    # The first one still serves and records.
    assert http_request(first.port, "GET", ATTACK, timeout=60)[0] == 403
    first.stop()
    store = records.open_store(directory=tmp_path / "records")
    assert store.coll.count_documents({}) == 1
    store.close()
