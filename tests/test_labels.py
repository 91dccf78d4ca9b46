"""addons/labels.py: `openflare.label` stores masked, labelled requests next to the records."""

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons import common
from addons import labels
from addons import records
from addons import recorder
from addons import retraining


def flow(path=b"/notes?q=select+the+union&password=hunter2", body=b'{"text": "drop it", "token": "s3cret"}'):
    f = tflow.tflow(req=tutils.treq(path=path, content=body))
    f.request.headers["cookie"] = "sid=abc123; theme=dark"
    f.request.headers["content-type"] = "application/json"
    f.metadata[common.LOCAL_SCORE] = 8
    f.metadata[common.VERDICT] = common.VERDICT_BLOCK
    return f


async def test_label_stores_a_masked_full_record_and_relabel_replaces(tmp_path):
    rec, lab = recorder.Recorder(), labels.Labeler()
    with taddons.context(rec, lab) as tctx:
        tctx.configure(rec, openflare_record_dir=str(tmp_path / "store"))
        f, g = flow(), flow(path=b"/img?file=a.jpg")
        tctx.master.commands.call("openflare.label", [f, g], "benign")  # as mitmweb's command bar does
        await lab.flush()
        assert f.metadata[common.LABEL] == "benign" and "[labelled benign]" in f.comment
        store = records.open_store(directory=tmp_path / "store")
        docs = {d["_id"]: d for d in retraining.labels_store(store).coll.find({})}
        assert set(docs) == {f.id, g.id}
        d = docs[f.id]
        assert d["label"] == "benign" and d["label_source"] == "operator" and d["tier"] == "full"
        assert "hunter2" not in d["target"] and "password=*masked*" in d["target"]
        assert "s3cret" not in d["body"] and "drop it" in d["body"]
        assert ["cookie", "sid=*masked*; theme=*masked*"] in d["headers"]
        assert d["local_score"] == 8 and d["verdict"] == "block"
        # The records' collection (and its hash chains) is untouched.
        assert store.coll.count_documents({}) == 0
        store.close()

        lab.label([f], "attack")
        await lab.flush()
        store = records.open_store(directory=tmp_path / "store")
        docs = {d["_id"]: d for d in retraining.labels_store(store).coll.find({})}
        assert len(docs) == 2 and docs[f.id]["label"] == "attack"
        # Retraining reads it as an operator label, winning over the block verdict's local score.
        col = retraining.collect(store, retraining.Policy())
        got = {lab_ for _, lab_, src, _ in col.examples() if src == "operator"}
        assert got == {"attack", "benign"} and col.stats["operator"] == 2
        store.close()


async def test_label_without_the_recorder_uses_its_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENFLARE_MONGO_URI", raising=False)
    lab = labels.Labeler()
    with taddons.context(lab):
        lab.label([flow()], "attack")
        await lab.flush()
        assert lab.stats == {"labelled": 1, "stored": 1, "failed": 0}
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
        lab.label([flow()], "benign")
        await lab.flush()
    assert lab.stats["failed"] == 1
    assert any(r.levelname == "WARNING" and "could not store" in r.getMessage() for r in caplog.records)


async def test_labels_not_yet_written_are_stored_at_exit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENFLARE_MONGO_URI", raising=False)
    lab = labels.Labeler()
    with taddons.context(lab):
        lab.label([flow(), flow(path=b"/b")], "benign")
        lab.done()  # before the background write ran: done writes them itself
        await lab.flush()
    store = records.open_store(directory=tmp_path / "data" / "records")
    assert retraining.labels_store(store).coll.count_documents({}) == 2
    store.close()
