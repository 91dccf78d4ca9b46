"""Retraining end to end: a simulated app's traffic through a real mitmdump, labels by command, retrain,
promotion picked up by the running proxy while traffic flows; and a poisoned candidate refused.

Small on purpose (seconds, not minutes): a base corpus of a few hundred records sampled from the shared
HttpParams corpus, a "current" field model fitted on it (tests/models.py's tiny model refitted on the
corpus with the retraining code itself), and tests/appsim.py traffic.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import appsim
import models
from addons import dataset
from addons import model
from addons import records
from addons import retraining
from conftest import REPO
from conftest import http_request

pytestmark = pytest.mark.e2e

SHARED = REPO.parent / "shared" / "datasets" / "httpparams.jsonl.gz"
# The tiny corpus whole, and 300 of the classic attacks of tests/models.py (with as many everyday texts) placed
# as train.py places them: what the base model below learnt too, so the refit keeps it.
RETRAIN_ARGS = ["--placed", "300", "--base-sample", "0"]
LABEL_HEADER = "x-sim-label"

# Loaded after addons/labels.py: an operator at work. Flows whose request says so are labelled through
# the command manager, as mitmweb's command bar calls `openflare.label @marked benign force`: with force,
# since correcting the model's false positives (refused benign flows) is what this operator does.
OPERATOR_SCRIPT = f'''
from mitmproxy import ctx


class SimOperator:
    def response(self, flow):
        label = flow.request.headers.get("{LABEL_HEADER}")
        if label:
            ctx.master.commands.call("openflare.label", [flow], label, "force")


addons = [SimOperator()]
'''


def _script(name):
    spec = importlib.util.spec_from_file_location(f"openflare_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(tiny corpus path, models dir with a current model trained on it)."""
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} not found")
    d = tmp_path_factory.mktemp("base")
    recs = list(dataset.read(SHARED))
    rng = random.Random(0)
    lines = []
    for split, k in (("train", 300), ("test", 150)):
        for lab in dataset.LABELS:
            pool = [r for r in recs if r.split == split and r.label == lab]
            for r in rng.sample(pool, k):
                lines.append({"method": r.method, "target": r.target, "headers": [list(h) for h in r.headers],
                              "body": r.body.decode("utf-8", "replace"), "label": lab, "split": split,
                              "source": "httpparams", "category": r.category})
    corpus = d / "tiny.jsonl"
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines))
    train = [r for r in dataset.read(corpus) if r.split == "train"]
    payloads = d / "payloads.jsonl.gz"
    with gzip.open(payloads, "wt") as fh:
        fh.writelines(json.dumps({"payload": a, "category": "other", "split": "train"}) + "\n" for a in models.ATTACKS)
    placed = _script("retrain").placed_fields(argparse.Namespace(placed=300, payloads=str(payloads)), random.Random(1))
    fm, _ = retraining.refit(models.attack_model(), [], retraining.base_rows(train), placed=placed)
    current = models.save(fm, d / "models", version="base-1", threshold=6)
    return corpus, current, payloads


def send(port: int, req: dict, label: str | None = None) -> int:
    headers = {k: v for k, v in req["headers"]}
    if label:
        headers[LABEL_HEADER] = label
    # A generous timeout: a slow answer on a loaded 2-core machine is not a failed request.
    return http_request(port, req["method"], req["target"], headers, req["body"].encode(), timeout=60)[0]


def samples(reqs):
    return [retraining.sample_of_record(dataset.parse_record(r, "appsim", appsim.SOURCE)) for r in reqs]


def rates(lm: model.LocalModel, benign: list, attacks: list) -> tuple[float, float]:
    t = retraining.threshold_of(lm)
    refused = [model.proba_to_score(p, lm.operating_point) > t for p in retraining.proba(lm, benign + attacks)]
    return sum(refused[: len(benign)]) / len(benign), sum(refused[len(benign) :]) / len(attacks)


def test_labels_retrain_promote_reload(base, tmp_path, upstream, mitmdump, capsys):
    corpus, current, payloads = base
    models = tmp_path / "models"
    models.mkdir()
    for p in (current, model.card_path(current)):
        (models / p.name).write_bytes(p.read_bytes())
    cur_path = models / current.name
    parent = model.load(str(cur_path))
    store_dir = tmp_path / "records"
    op_script = tmp_path / "sim_operator.py"
    op_script.write_text(OPERATOR_SCRIPT)
    proxy = mitmdump(
        ["addons/features.py", "addons/scorer.py", "addons/recorder.py", "addons/labels.py", str(op_script)],
        mode=f"reverse:{upstream.url}",
        conf={"openflare_model": str(cur_path), "openflare_record_dir": str(store_dir),
              "openflare_record_spill": str(tmp_path / "spill.jsonl"), "openflare_record_benign_one_in": 1,
              "openflare_llm_enabled": False, "openflare_model_watch": 1},
    )

    # 1. The app's traffic through the proxy; the operator labels one flow in six (its true label).
    app = appsim.App(7)
    rng = random.Random(1)
    traffic = app.traffic(420, attack_share=0.1)
    jobs = [(r, r["label"] if rng.random() < 1 / 6 else None) for r in traffic]
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda j: send(proxy.port, *j), jobs))
    assert set(statuses) <= {200, 403}
    fp_before = sum(1 for (r, _), s in zip(jobs, statuses) if r["label"] == "benign" and s == 403)
    assert fp_before > 20, "the current model should refuse some of the app's benign requests"
    n_labels = sum(1 for _, lab in jobs if lab)
    store = records.open_store(directory=store_dir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if store.coll.count_documents({}) >= len(jobs) and retraining.labels_store(store).coll.count_documents({}) >= n_labels:
            break
        time.sleep(0.5)
    labelled = list(retraining.labels_store(store).coll.find({}))
    store.close()
    assert len(labelled) == n_labels and all(d["label_source"] == "operator" for d in labelled)

    # 2. Retrain while traffic keeps flowing; the promoted model is picked up without a restart.
    failures, answered, stop = [], [], threading.Event()

    def keep_sending():
        sim = appsim.App(1234)
        while not stop.is_set():
            try:
                answered.append(send(proxy.port, sim.benign()))
            except Exception as e:  # noqa: BLE001 - any failed request fails the test
                failures.append(repr(e))

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        rc = _script("retrain").main(["--dir", str(store_dir), "--data", str(corpus), "--model", str(cur_path),
                                      "--tolerance", "0.01", "--app-carried", "0.5", *RETRAIN_ARGS, "--payloads", str(payloads)])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "PROMOTED" in out and "app benign FPR" in out
        promoted = model.load(str(cur_path))
        assert promoted.card["parent_version"] == "base-1" and promoted.version != "base-1"
        deadline = time.monotonic() + 30
        while promoted.version not in proxy.output()[1] + proxy.output()[0] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join()
    log = "".join(proxy.output())
    assert f"base-1 -> {promoted.version}" in log
    assert failures == [], failures
    assert len(answered) > 10 and set(answered) <= {200, 403}

    # 3. Fresh traffic from the same app: FPR drops at least 5x; TPR on the shared test data does not drop.
    fresh = appsim.App(99)
    fresh_benign = [fresh.benign() for _ in range(300)]
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda r: send(proxy.port, r), fresh_benign))
    fpr_proxy = after.count(403) / len(after)
    fpr_old, _ = rates(parent, samples(fresh_benign), samples([fresh.attack() for _ in range(10)]))
    print(f"fresh app FPR: {fpr_old:.3f} (parent) -> {fpr_proxy:.3f} (promoted, through the proxy)")
    assert fpr_old >= 0.05 and fpr_proxy * 5 <= fpr_old
    test = [r for r in dataset.read(corpus) if r.split == "test"]
    rows = retraining.base_rows(test)
    before_m = retraining.evaluate(parent, rows, [], 0.01)
    after_m = retraining.evaluate(promoted, rows, [], 0.01)
    print(f"shared test data TPR@1%FPR {before_m['base_tpr_at_fpr']:.4f} -> {after_m['base_tpr_at_fpr']:.4f}, "
          f"TPR at threshold {before_m['base']['tpr']:.4f} -> {after_m['base']['tpr']:.4f}")
    assert after_m["base_tpr_at_fpr"] >= before_m["base_tpr_at_fpr"] - 0.01
    assert after_m["base"]["tpr"] >= before_m["base"]["tpr"] - 0.01

    # 4. Rollback returns to the parent; the running proxy follows.
    assert _script("rollback").main(["--model", str(cur_path)]) == 0
    assert model.load(str(cur_path)).version == "base-1"
    deadline = time.monotonic() + 30
    while f"{promoted.version} -> base-1" not in "".join(proxy.output()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"{promoted.version} -> base-1" in "".join(proxy.output())


def test_poisoned_labels_are_refused(base, tmp_path, capsys):
    corpus, current, payloads = base
    cur_path = tmp_path / "models" / current.name
    cur_path.parent.mkdir()
    for p in (current, model.card_path(current)):
        (cur_path.parent / p.name).write_bytes(p.read_bytes())
    store = records.open_store(directory=tmp_path / "records")
    app = appsim.App(3)
    docs = []
    for i in range(400):
        req = app.attack() if i % 2 else app.benign()
        cap = {"time": time.time() - 60, "client_ip": "198.51.100.4", "verdict": "pass", "score": 3, "full": True,
               "method": req["method"].encode(), "target": req["target"].encode(),
               "headers": [(k.encode(), v.encode()) for k, v in req["headers"]], "body": req["body"].encode(),
               "body_size": len(req["body"]), "local_score": 3}
        doc = records.build(cap, records.Masker())
        doc.update(_id=f"poison-{i}", label="benign", label_source="operator", label_time=records.utcnow())  # attacks too
        docs.append(doc)
    retraining.labels_store(store).coll.insert_many(docs)
    store.close()
    before = model.sha256_file(cur_path)
    rc = _script("retrain").main(["--dir", str(tmp_path / "records"), "--data", str(corpus), "--model", str(cur_path),
                                  "--app-carried", "0", *RETRAIN_ARGS, "--payloads", str(payloads)])
    out = capsys.readouterr().out
    assert rc == 3 and "REFUSED" in out and "base TPR" in out, out
    assert model.sha256_file(cur_path) == before and model.load(str(cur_path)).version == "base-1"
