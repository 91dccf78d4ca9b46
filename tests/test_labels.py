"""addons/labels.py: `openflare.label` stores masked, labelled requests next to the records; it acts on
exactly the flows named (`@marked`, `@focus`, ids, filters) and a label against OpenFlare's verdict needs
`force`."""

import json
import logging
import time
import urllib.request

import pytest
from mitmproxy import eventsequence
from mitmproxy import exceptions
from mitmproxy.addons import view
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons import common
from addons import labels
from addons import records
from addons import recorder
from addons import retraining
from addons.features import FeatureExtractor
from addons.scorer import Scorer


def flow(path=b"/notes?q=select+the+union&password=hunter2", body=b'{"text": "drop it", "token": "s3cret"}', verdict="block"):
    f = tflow.tflow(req=tutils.treq(path=path, content=body))
    f.request.headers["cookie"] = "sid=abc123; theme=dark"
    f.request.headers["content-type"] = "application/json"
    f.metadata[common.LOCAL_SCORE] = 8 if verdict == "block" else 2
    if verdict is not None:
        f.metadata[common.VERDICT] = verdict
    return f


def label_docs(directory) -> dict[str, dict]:
    store = records.open_store(directory=directory)
    try:
        return {d["_id"]: d for d in retraining.labels_store(store).coll.find({})}
    finally:
        store.close()


async def test_label_stores_a_masked_full_record_and_relabel_replaces(tmp_path):
    rec, lab = recorder.Recorder(), labels.Labeler()
    with taddons.context(rec, lab) as tctx:
        tctx.configure(rec, openflare_record_dir=str(tmp_path / "store"))
        f, g = flow(), flow(path=b"/img?file=a.jpg")
        tctx.master.commands.call("openflare.label", [f, g], "attack")  # a script passing flows: exactly those
        await lab.flush()
        assert f.metadata[common.LABEL] == "attack" and "[labelled attack]" in f.comment
        docs = label_docs(tmp_path / "store")
        assert set(docs) == {f.id, g.id}
        d = docs[f.id]
        assert d["label"] == "attack" and d["label_source"] == "operator" and d["tier"] == "full"
        assert d["label_override"] is False  # refused, labelled attack: no contradiction
        assert "hunter2" not in d["target"] and "password=*masked*" in d["target"]
        assert "s3cret" not in d["body"] and "drop it" in d["body"]
        assert ["cookie", "sid=*masked*; theme=*masked*"] in d["headers"]
        assert d["local_score"] == 8 and d["verdict"] == "block"
        # The records' collection (and its hash chains) is untouched.
        store = records.open_store(directory=tmp_path / "store")
        assert store.coll.count_documents({}) == 0
        store.close()

        lab.label([f], "benign", "force")
        await lab.flush()
        docs = label_docs(tmp_path / "store")
        assert len(docs) == 2 and docs[f.id]["label"] == "benign" and docs[f.id]["label_override"] is True
        # Retraining reads it as an operator label, winning over the block verdict's local score.
        store = records.open_store(directory=tmp_path / "store")
        col = retraining.collect(store, retraining.Policy())
        got = {lab_ for _, lab_, src, _ in col.examples() if src == "operator"}
        assert got == {"attack", "benign"} and col.stats["operator"] == 2
        store.close()


def test_label_conflict_is_one_rule():
    assert records.label_conflict("block", "benign") and "refused" in records.label_conflict("block", "benign")
    assert records.label_conflict("pass", "attack") and "passed" in records.label_conflict("pass", "attack")
    for verdict, label in (("block", "attack"), ("pass", "benign"), ("error", "benign"), ("error", "attack"),
                           (None, "benign"), (None, "attack")):
        assert records.label_conflict(verdict, label) is None, (verdict, label)


async def test_a_label_against_the_verdict_needs_force(tmp_path, caplog):
    rec, lab = recorder.Recorder(), labels.Labeler()
    with taddons.context(rec, lab) as tctx:
        tctx.configure(rec, openflare_record_dir=str(tmp_path / "store"))
        refused, passed = flow(verdict="block"), flow(path=b"/search?q=shoes", verdict="pass")
        banned = flow(path=b"/", verdict=None)
        banned.metadata[common.BANNED] = True
        for flows, label in (([refused, passed], "benign"), ([passed], "attack"), ([banned], "benign")):
            with pytest.raises(exceptions.CommandError, match="contradict OpenFlare's verdict.*Nothing labelled.*add force"):
                lab.label(flows, label)
        assert not any(common.LABEL in f.metadata for f in (refused, passed, banned))
        assert lab.stats["labelled"] == 0 and lab.unwritten == {}
        with pytest.raises(exceptions.CommandError, match="can only be 'force'"):
            lab.label([refused], "benign", "yes")

        unscored = flow(path=b"/x", verdict=None)  # no verdict: nothing to contradict
        with caplog.at_level(logging.WARNING):
            lab.label([refused, passed, unscored], "benign", "force")
        await lab.flush()
        docs = label_docs(tmp_path / "store")
        assert {k: d["label_override"] for k, d in docs.items()} == {refused.id: True, passed.id: False, unscored.id: False}
        assert "[labelled benign, override]" in refused.comment and "[labelled benign]" in passed.comment
        overrides = [r.getMessage() for r in caplog.records if "override" in r.getMessage()]
        assert len(overrides) == 1 and refused.id[:8] in overrides[0] and "verdict block" in overrides[0]
        assert lab.stats["overrides"] == 1


async def test_marked_holds_only_the_flows_the_operator_marked(tmp_path, model_path):
    """The issue's sequence: three attacks refused, one benign flow passed; the operator marks the passed
    flow and labels @marked benign. Before, OpenFlare marked its refusals, so @marked swept them in too."""
    v, rec, lab = view.View(), recorder.Recorder(), labels.Labeler()
    sc = Scorer()
    with taddons.context(v, FeatureExtractor(), sc, rec, lab) as tctx:
        tctx.configure(sc, openflare_model=str(model_path), openflare_llm_enabled=False)
        tctx.configure(rec, openflare_record_dir=str(tmp_path / "store"))
        flows = [tflow.tflow(req=tutils.treq(path=p)) for p in
                 (b"/?id=1%27%20OR%20%271%27=%271", b"/ping?host=1%3Bcat+/etc/passwd", b"/f?file=../../../etc/shadow", b"/search?q=blue+shoes")]
        for f in flows:
            for e in eventsequence.iterate(f):
                await tctx.master.addons.handle_lifecycle(e)
        v.add(flows)
        assert [f.metadata[common.VERDICT] for f in flows] == ["block", "block", "block", "pass"]
        assert not any(f.marked for f in flows)  # OpenFlare marks nothing
        assert tctx.master.commands.call("view.flows.resolve", '~comment "^block "') == flows[:3]

        with pytest.raises(exceptions.CommandError, match="names no HTTP flow"):
            tctx.master.commands.call_strings("openflare.label", ["@marked", "benign"])
        flows[3].marked = ":default:"  # what mitmweb's marker toggle sets
        tctx.master.commands.call_strings("openflare.label", ["@marked", "benign"])  # as mitmweb's command bar
        await lab.flush()
        assert set(label_docs(tmp_path / "store")) == {flows[3].id}

        # Marking a refused flow too: the command names it, and stops without force.
        flows[0].marked = ":default:"
        with pytest.raises(exceptions.CommandError, match="1 of the 2 flows named contradict"):
            tctx.master.commands.call_strings("openflare.label", ["@marked", "benign"])
        # By id, as mitmweb shows it in the address bar.
        tctx.master.commands.call_strings("openflare.label", [f"@{flows[1].id}", "attack"])
        await lab.flush()
        assert set(label_docs(tmp_path / "store")) == {flows[3].id, flows[1].id}


async def test_focus_is_the_focused_flow_outside_mitmweb(tmp_path):
    v, rec, lab = view.View(), recorder.Recorder(), labels.Labeler()
    with taddons.context(v, rec, lab) as tctx:
        tctx.configure(rec, openflare_record_dir=str(tmp_path / "store"))
        a, b = flow(path=b"/a", verdict="pass"), flow(path=b"/b", verdict="pass")
        v.add([a, b])
        assert v.focus.flow is a  # mitmproxy's focus starts on the first flow
        v.focus.flow = b  # mitmproxy's console moves it with the cursor; mitmweb never does
        tctx.master.commands.call_strings("openflare.label", ["@focus", "benign"])
        await lab.flush()
        assert set(label_docs(tmp_path / "store")) == {b.id}


async def test_focus_is_refused_in_mitmweb(monkeypatch):
    lab = labels.Labeler()
    with taddons.context(view.View(), lab) as tctx:
        monkeypatch.setattr(labels, "_in_mitmweb", lambda master: True)
        with pytest.raises(exceptions.CommandError, match=r"#3213.*@marked.*@<flow id>"):
            tctx.master.commands.call_strings("openflare.label", ["@focus", "benign"])


async def test_without_a_flow_list_the_command_says_so():
    lab = labels.Labeler()
    with taddons.context(lab) as tctx:  # mitmdump: no view addon
        with pytest.raises(exceptions.CommandError, match="keeps no flow list"):
            tctx.master.commands.call_strings("openflare.label", ["@marked", "benign"])


async def test_label_without_the_recorder_uses_its_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENFLARE_MONGO_URI", raising=False)
    lab = labels.Labeler()
    with taddons.context(lab):
        lab.label([flow()], "attack")
        await lab.flush()
        assert lab.stats == {"labelled": 1, "overrides": 0, "stored": 1, "failed": 0}
    store = records.open_store(directory=tmp_path / "data" / "records")
    assert retraining.labels_store(store).coll.count_documents({"label": "attack"}) == 1
    store.close()


async def test_bad_input():
    lab = labels.Labeler()
    with taddons.context(lab) as tctx:
        with pytest.raises(exceptions.CommandError, match="benign, attack|attack, benign"):
            lab.label([flow()], "malicious")
        with pytest.raises(exceptions.CommandError, match="no HTTP flow"):
            lab.label([tflow.ttcpflow()], "benign")
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(lab, openflare_label_body_cap=-1)


async def test_store_failure_is_a_warning(tmp_path, caplog, monkeypatch):
    lab = labels.Labeler()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rec = recorder.Recorder()
    with taddons.context(rec, lab) as tctx:
        tctx.configure(rec, openflare_record_dir=str(blocker / "store"))
        lab.label([flow()], "attack")
        await lab.flush()
    assert lab.stats["failed"] == 1
    assert any(r.levelname == "WARNING" and "could not store" in r.getMessage() for r in caplog.records)


async def test_labels_not_yet_written_are_stored_at_exit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENFLARE_MONGO_URI", raising=False)
    lab = labels.Labeler()
    with taddons.context(lab):
        lab.label([flow(), flow(path=b"/b")], "attack")
        lab.done()  # before the background write ran: done writes them itself
        await lab.flush()
    store = records.open_store(directory=tmp_path / "data" / "records")
    assert retraining.labels_store(store).coll.count_documents({}) == 2
    store.close()


# ---- mitmweb itself: its command bar's @focus and @marked -----------------------------------------------


class Web:
    """mitmweb's HTTP API as its browser UI calls it (the token as a bearer, tornado's XSRF double submit)."""

    XSRF = "openflaretestxsrf"

    def __init__(self, port: int, token: str) -> None:
        self.base, self.token = f"http://127.0.0.1:{port}", token

    def call(self, method: str, path: str, doc=None):
        req = urllib.request.Request(
            f"{self.base}{path}", method=method, data=None if doc is None else json.dumps(doc).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}",
                     "Cookie": f"_mitmproxy_xsrf={self.XSRF}", "X-XSRFToken": self.XSRF})
        body = urllib.request.urlopen(req, timeout=30).read()
        return json.loads(body) if body else None

    def command(self, *args: str) -> dict:
        return self.call("POST", "/commands/openflare.label", {"arguments": list(args)})


@pytest.mark.e2e
def test_mitmweb_focus_is_refused_and_marked_labels_exactly_the_marked_flow(processes, upstream, model_conf, tmp_path):
    from conftest import MITMDUMP
    from conftest import free_port
    from conftest import http_request
    from conftest import make_confdir
    from conftest import mitmdump_args
    from conftest import wait_listening

    port, web_port, token = free_port(), free_port(), "openflare-test-token"
    conf = dict(model_conf, openflare_record_dir=str(tmp_path / "records"), openflare_record_spill=str(tmp_path / "spill.jsonl"),
                openflare_llm_enabled=False, web_port=web_port, web_password=token, web_open_browser=False)
    args = mitmdump_args(port, make_confdir(tmp_path / "confdir", conf), ["addons/openflare.py"], f"reverse:{upstream.url}")
    args[0] = str(MITMDUMP.with_name("mitmweb"))
    proc = processes.start("mitmweb", args, port, env={"OPENFLARE_MONGO_URI": "", "OPENFLARE_REDIS_URL": ""})
    assert wait_listening(web_port, proc.popen), proc.output()
    assert http_request(port, "GET", "/?id=1%27%20OR%20%271%27=%271", timeout=60)[0] == 403
    assert http_request(port, "GET", "/search?q=blue+shoes", timeout=60)[0] == 200
    assert http_request(port, "GET", "/search?q=red+socks", timeout=60)[0] == 200
    web = Web(web_port, token)
    flows = web.call("GET", "/flows")
    refused, first, second = flows
    assert refused["comment"].startswith("block ") and first["comment"].startswith("pass ")
    assert not any(f["marked"] for f in flows)

    # The operator selects the second passed flow in the browser and types @focus: mitmproxy's focus is
    # the first flow (the refused one), so the command refuses instead of labelling the wrong flow.
    got = web.command("@focus", "benign")
    assert "#3213" in got["error"] and "@marked" in got["error"], got
    # Marking it (the UI's marker toggle) and @marked: exactly that flow.
    web.call("PUT", f"/flows/{second['id']}", {"marked": ":default:"})
    assert web.command("@marked", "benign") == {"value": None}
    # The refused flow by id: benign contradicts the verdict, so force is asked for.
    got = web.command(f"@{refused['id']}", "benign")
    assert "force" in got["error"] and "verdict block" in got["error"], got
    assert web.command(f"@{refused['id']}", "benign", "force") == {"value": None}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            docs = label_docs(tmp_path / "records")
        except Exception:  # noqa: BLE001 - the store is being written
            docs = {}
        if len(docs) >= 2:
            break
        time.sleep(0.3)
    assert {k: (d["label"], d["label_override"]) for k, d in docs.items()} == {
        second["id"]: ("benign", False), refused["id"]: ("benign", True)}
    proc.stop()
    assert "openflare operator label override" in "".join(proc.output()).lower()
