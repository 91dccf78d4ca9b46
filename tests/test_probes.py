"""addons/probes.py and the retrain probe gate (retraining.probe_gate): a candidate that passes an attack
probe the current model refuses is refused; the issue's poisoning (six refused attacks labelled benign by
an operator, with force) replayed end to end, from the label command to `scripts/retrain.py --dry-run`."""

import importlib.util
import json
import random
from pathlib import Path

import joblib
import pytest
from mitmproxy import eventsequence
from mitmproxy import exceptions
from mitmproxy.addons import view
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils
from sklearn.dummy import DummyClassifier

from addons import common
from addons import dataset
from addons import labels
from addons import model
from addons import probes
from addons import recorder
from addons import retraining
from addons.features import FeatureExtractor
from addons.scorer import Scorer
from conftest import REPO

SHARED = Path("/work/shared/datasets/httpparams.jsonl.gz")


def test_the_probe_set():
    ps = probes.probes()
    n_sets = len(probes.all_headers())
    assert n_sets == 19
    benign = [p for p in ps if p.kind == probes.BENIGN]
    attacks = [p for p in ps if p.kind == probes.ATTACK]
    assert len(benign) == (len(probes.DEV_BENIGN) + len(probes.HELDOUT_BENIGN)) * n_sets == 80 * 19
    assert len(attacks) == len(probes.ATTACKS) * n_sets + len(probes.HEADER_ATTACKS) == 26 * 19 + 4


def test_probes_are_scored_as_the_addons_score_them(model_path):
    lm = model.load(str(model_path))
    p = next(p for p in probes.probes() if p.target == "/search?q=%3Bcat+%2Fetc%2Fpasswd" and p.header_set == "curl")
    from addons import featurize

    assert probes.feature(p) == featurize.featurize("GET", p.target, [("User-Agent", "curl/7.88.1"), ("Accept", "*/*")], b"")
    assert probes.score(lm, p) == lm.score(probes.feature(p))[0] > 6


class Shifted:
    """A model that scores like `lm`, except that feature strings containing every one of `needles` get
    probability `p`."""

    classes_ = [0, 1]

    def __init__(self, lm, p: float, *needles: str) -> None:
        self.lm, self.needles, self.p = lm, needles, p

    def predict_proba(self, X):
        import numpy as np

        out = [self.p if all(n in x for n in self.needles) else self.lm.proba([x])[0] for x in X]
        return np.array([[1 - v, v] for v in out])


def test_probe_gate_refuses_a_candidate_that_passes_an_attack_probe(model_path):
    cur = model.load(str(model_path))
    same = retraining.probe_gate(cur, cur)
    assert same.promote and same.reasons == [] and same.summary["attacks_refused"]["current"] == same.summary["attacks_refused"]["candidate"]
    # "cat /etc/passwd" passed by the candidate (score 1), everything else as before.
    cand = model.LocalModel(Shifted(cur, 0.0, "cat /etc/passwd"), dict(cur.card, version="shifted"), cur.path)
    pg = retraining.probe_gate(cur, cand)
    assert not pg.promote and len(pg.reasons) == 1 and "passes 19 attack probe(s)" in pg.reasons[0]
    assert {p.target for p, _, _ in pg.attacks_passed} == {"/search?q=%3Bcat+%2Fetc%2Fpasswd"}
    table = retraining.probe_table(pg)
    assert "/search?q=%3Bcat+%2Fetc%2Fpasswd: score 10 -> 1 (19 of 19 header sets)" in table, table
    # Everyday probes: a few more refused is within the slack, many more is not.
    cand = model.LocalModel(Shifted(cur, 1.0, "wget", "search"), dict(cur.card, version="fp"), cur.path)
    pg = retraining.probe_gate(cur, cand, benign_slack=80)
    assert pg.promote and 0 < len(pg.benign_refused) <= 80, pg.summary  # within the slack: passes
    assert "everyday probes the current model passes and the candidate refuses" in retraining.probe_table(pg)
    worse = model.LocalModel(Shifted(cur, 1.0, "search"), dict(cur.card, version="fp"), cur.path)
    pg = retraining.probe_gate(cur, worse, benign_slack=10)
    assert not pg.promote and "everyday probes" in pg.reasons[0] and "at most 10 more" in pg.reasons[0]


def test_each_model_is_judged_at_its_own_threshold(model_path):
    cur = model.load(str(model_path))
    lenient = model.LocalModel(cur.estimator, dict(cur.card, threshold=9, version="t9"), cur.path)
    pg = retraining.probe_gate(cur, lenient)
    assert not pg.promote and pg.summary["attacks_refused"]["candidate"] < pg.summary["attacks_refused"]["current"]


# ---- the poisoning, replayed -------------------------------------------------------------------

# Six refused attacks the operator labels benign, and one passed request. All seven land in the training
# slice of the app's labels (retraining.held_slice, by hash), as an unlucky operator's would: the app's
# held-out slices then hold none of them, and only the probe gate stands between them and promotion.
ATTACKS = [
    b"/?id=1%27%20OR%20%271%27=%271",
    b"/products?id=1%20union%20select%20password%20from%20users--",
    b"/login?user=admin%27--",
    b"/ping?host=8.8.8.8%3Bcat+/etc/passwd",
    b"/static?f=..%2F..%2F..%2Fetc%2Fshadow",
    b"/ping?ip=%60id%60",
]
BENIGN = b"/search?q=blue+shoes"


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A few hundred records of the shared HttpParams corpus: the base corpora of a quick retrain."""
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} not found")
    recs = list(dataset.read(SHARED))
    rng = random.Random(0)
    lines = []
    for split, k in (("train", 300), ("test", 150)):
        for lab in dataset.LABELS:
            for r in rng.sample([r for r in recs if r.split == split and r.label == lab], k):
                lines.append({"method": r.method, "target": r.target, "headers": [list(h) for h in r.headers],
                              "body": r.body.decode("utf-8", "replace"), "label": lab, "split": split,
                              "source": "httpparams", "category": r.category})
    path = tmp_path_factory.mktemp("corpus") / "tiny.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _retrain():
    spec = importlib.util.spec_from_file_location("openflare_retrain", REPO / "scripts" / "retrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def test_poisoned_labels_are_refused_by_the_probe_gate(tmp_path, model_path, tiny_corpus, capsys, caplog):
    store_dir = tmp_path / "records"
    v, sc, rec, lab = view.View(), Scorer(), recorder.Recorder(), labels.Labeler()
    with taddons.context(v, FeatureExtractor(), sc, rec, lab) as tctx:
        tctx.configure(sc, openflare_model=str(model_path), openflare_llm_enabled=False)
        tctx.configure(rec, openflare_record_dir=str(store_dir))
        flows = []
        for path in ATTACKS + [BENIGN]:
            f = tflow.tflow(req=tutils.treq(path=path, headers=[(b"User-Agent", b"curl/8.4.0"), (b"Accept", b"*/*")], content=b""))
            for e in eventsequence.iterate(f):
                await tctx.master.addons.handle_lifecycle(e)
            flows.append(f)
        v.add(flows)
        assert [f.metadata[common.VERDICT] for f in flows] == ["block"] * 6 + ["pass"]
        # The operator marks everything and labels it benign: refused without force ...
        for f in flows:
            f.marked = ":default:"
        with pytest.raises(exceptions.CommandError, match="6 of the 7 flows named contradict"):
            tctx.master.commands.call_strings("openflare.label", ["@marked", "benign"])
        # ... and insists.
        tctx.master.commands.call_strings("openflare.label", ["@marked", "benign", "force"])
        await lab.flush()
    assert sum("override" in r.getMessage() for r in caplog.records) == 6

    cur = tmp_path / "models" / "openflare-local.joblib"
    cur.parent.mkdir()
    cur.write_bytes(model_path.read_bytes())
    model.card_path(cur).write_bytes(model.card_path(model_path).read_bytes())
    out_json = tmp_path / "retrain.json"
    rc = _retrain().main(["--dir", str(store_dir), "--data", str(tiny_corpus), "--model", str(cur), "--dry-run",
                          "--base-sample", "2000", "--synthetic", "300", "--everyday", "0", "--shaped-attacks", "0",
                          "--generated-attacks", "0", "--ai-attacks", "0", "--json", str(out_json)])
    out = capsys.readouterr().out
    print(out)
    res = json.loads(out_json.read_text())
    assert res["stats"]["operator"] == 7
    assert rc == 3 and "REFUSED: " in out and "PASSES" not in out, out
    assert any(r.startswith("probe gate: the candidate passes") for r in res["reasons"]), res["reasons"]
    assert "attack probes the current model refuses and the candidate passes" in out
    assert res["probes"]["attacks_refused"]["candidate"] < res["probes"]["attacks_refused"]["current"]
    assert model.load(str(cur)).version == model.load(str(model_path)).version  # a dry run: nothing promoted


def test_retrain_refuses_cleanly_on_bad_input(tmp_path, model_path, tiny_corpus, capsys):
    retrain = _retrain()
    store_dir = tmp_path / "records"
    st = recorder.records.open_store(directory=store_dir)
    st.close()
    cur = tmp_path / "m.joblib"
    cur.write_bytes(model_path.read_bytes())
    card = model.card_path(model_path).read_text()
    model.card_path(cur).write_text(card[: len(card) // 2])  # a truncated card
    assert retrain.main(["--dir", str(store_dir), "--data", str(tiny_corpus), "--model", str(cur)]) == 2
    err = capsys.readouterr().err
    assert "model card unreadable" in err and "Traceback" not in err
    model.card_path(cur).write_text(card)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(tiny_corpus.read_text().splitlines()[0] + "\n{not json\n")
    # The store holds a label, so retraining gets as far as the corpora.
    import time as _time

    from addons import records

    st = records.open_store(directory=store_dir)
    doc = records.build({"time": _time.time(), "client_ip": "192.0.2.1", "verdict": "pass", "full": True, "method": b"GET",
                         "target": b"/a", "headers": [], "body": b"", "body_size": 0}, records.Masker())
    retraining.labels_store(st).coll.insert_one(dict(doc, _id="x", label="benign", label_source="operator"))
    st.close()
    assert retrain.main(["--dir", str(store_dir), "--data", str(bad), "--model", str(cur)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not valid JSON" in err and "Traceback" not in err
    assert retrain.main(["--dir", str(store_dir), "--data", str(tmp_path / "empty-dir-xyz"), "--model", str(cur)]) == 2
    assert "dataset file not found" in capsys.readouterr().err
    assert retrain.main(["--dir", str(tmp_path / "typo"), "--data", str(tiny_corpus), "--model", str(cur)]) == 2
    err = capsys.readouterr().err
    assert "no record store at" in err and not (tmp_path / "typo").exists()


def test_a_constant_candidate_is_refused(tmp_path, model_path):
    # Any representation LocalModel serves: a scikit-learn estimator that calls everything benign.
    est = DummyClassifier(strategy="constant", constant=0).fit([[0], [1]], [0, 1])
    path = tmp_path / "dummy.joblib"
    joblib.dump(est, path)
    model.write_card(path, {"version": "dummy", "operating_point": 0.5})
    pg = retraining.probe_gate(model.load(str(model_path)), model.load(str(path)))
    assert not pg.promote and pg.summary["attacks_refused"]["candidate"] == 0
