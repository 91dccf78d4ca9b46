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


# --- kill -9 and a full disk: no acknowledged record lost ---------------------------------------------------
#
# Acknowledged: the client received its whole response. The recorder releases a response only once its
# record is in the journal (the spill file), so a record of every acknowledged request must be in the store
# once a restarted proxy has replayed the journal.


class Burst:
    """`n` keep-alive clients sending unique GETs (/search?q=<tag><i>) until stopped or refused a connection;
    `acked` holds the targets whose response was read in full."""

    def __init__(self, port: int, tag: str, clients: int = 6) -> None:
        import threading

        self.port, self.tag = port, tag
        self.acked: set[str] = set()
        self.sent = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, c: int) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        i = 0
        try:
            while not self.stop.is_set():
                target = f"/search?q={self.tag}{c}x{i}"
                i += 1
                with self.lock:
                    self.sent += 1
                conn.request("GET", target, headers={"User-Agent": "Mozilla/5.0"})
                resp = conn.getresponse()
                resp.read()
                with self.lock:
                    self.acked.add(target)
        except (OSError, http.client.HTTPException):
            return  # the proxy died under us
        finally:
            conn.close()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def stored_targets(store_dir) -> tuple[list[dict], set[str]]:
    store = records.open_store(directory=store_dir)
    try:
        recs = list(store.find())
    finally:
        store.close()
    return recs, {r["target"] for r in recs if r.get("target")}


def verify_log(store_dir, spill) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/verify_log.py", "--dir", str(store_dir), "--spill", str(spill)],
        cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=120,
    )


def test_kill_9_mid_burst_loses_no_acknowledged_record(mitmdump, upstream, model_conf, tmp_path):
    import os
    import signal
    import time

    store_dir, spill = tmp_path / "records", tmp_path / "spill.jsonl"
    # every passed flow in full: the target names the request whose record it is
    conf = dict(model_conf, openflare_record_dir=str(store_dir), openflare_record_spill=str(spill), openflare_record_benign_one_in=1)
    scripts = ["addons/features.py", "addons/scorer.py", "addons/recorder.py"]
    proxy = mitmdump(scripts=scripts, mode=f"reverse:{upstream.url}", conf=conf, env={"OPENFLARE_MONGO_URI": ""})
    burst = Burst(proxy.port, "burst")
    deadline = time.monotonic() + 120
    while len(burst.acked) < 400 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proxy.popen.pid, signal.SIGKILL)  # mid-burst: the clients are still sending
    proxy.popen.wait(10)
    burst.join()
    acked = set(burst.acked)
    assert len(acked) >= 400 and burst.sent > len(acked)  # requests were in flight when it died

    # the restarted proxy replays what the killed one journaled but did not store
    again = mitmdump(scripts=scripts, mode=f"reverse:{upstream.url}", conf=conf, env={"OPENFLARE_MONGO_URI": ""})
    again.stop()
    out, err = again.output()
    recs, targets = stored_targets(store_dir)
    assert acked - targets == set(), (len(acked - targets), err[-3000:])
    assert len(recs) == len(targets)  # and none twice
    verify = verify_log(store_dir, spill)
    assert verify.returncode == 0 and "every link intact" in verify.stdout, verify.stdout + verify.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (root only): the store and the spill file on one disk, as in the default layout."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({mounted.stderr.strip()}): test_records.py simulates ENOSPC instead")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk) -> None:
    """Fill the disk to the last byte (a file named filler)."""
    import os

    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (65536, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


def test_a_full_disk_is_reported_as_such_and_loses_nothing_acknowledged(mitmdump, upstream, model_conf, small_disk):
    from conftest import http_request

    store_dir, spill = small_disk / "records", small_disk / "records-spill.jsonl"
    conf = dict(model_conf, openflare_record_dir=str(store_dir), openflare_record_spill=str(spill), openflare_record_benign_one_in=1,
                openflare_record_queue=20)
    proxy = mitmdump(scripts=["addons/features.py", "addons/scorer.py", "addons/recorder.py"], mode=f"reverse:{upstream.url}",
                     conf=conf, env={"OPENFLARE_MONGO_URI": ""})
    before = [f"/search?q=before{i}" for i in range(30)]
    for t in before:
        assert http_request(proxy.port, "GET", t, timeout=60)[0] == 200
    fill(small_disk)
    # the disk is full: traffic is still served, 20 records wait in memory (the queue), the rest are lost
    during = [f"/search?q=during{i}" for i in range(50)]
    for t in during:
        assert http_request(proxy.port, "GET", t, timeout=60)[0] == 200
    (small_disk / "filler").unlink()  # the operator frees space
    after = [f"/search?q=after{i}" for i in range(5)]
    for t in after:
        assert http_request(proxy.port, "GET", t, timeout=60)[0] == 200
    proxy.stop()
    out, err = proxy.output()
    log = out + err
    assert "DISK FULL writing the journal" in log and "Free space there" in log, log[-3000:]

    recs, targets = stored_targets(store_dir)
    assert set(before) | set(after) <= targets  # acknowledged before the disk filled, or after it had room again
    gaps = [r for r in recs if r["tier"] == "gap"]
    assert len(gaps) == 1 and "disk full" in gaps[0]["reason"]
    held = targets & set(during)
    # the queue's 20, and on a busy machine the few the writer had already taken when the disk filled
    assert 20 <= len(held) < len(during) and len(held) + gaps[0]["lost"] == len(during)  # every one stored, or counted lost
    verify = verify_log(store_dir, spill)
    assert verify.returncode == 0 and "BROKEN" not in verify.stdout, verify.stdout + verify.stderr
    assert f"GAP: chain {gaps[0]['chain']}" in verify.stdout and f"{gaps[0]['lost']} records lost to 1 recorded gap(s) (full disk)" in verify.stdout
