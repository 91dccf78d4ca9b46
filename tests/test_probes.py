"""addons/probes.py and the retrain probe gate (retraining.probe_gate): a candidate that passes an attack
probe the current model refuses is refused; the issue's poisoning (six refused attacks labelled benign by
an operator, with force) replayed end to end, from the label command to `scripts/retrain.py --dry-run`."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
from mitmproxy import eventsequence
from mitmproxy import exceptions
from mitmproxy.addons import view
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils
import models
from addons import common
from addons import dataset
from addons import fieldmodel
from addons import fields as fieldsmod
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


@pytest.fixture(scope="module")
def attack_path(tmp_path_factory):
    """tests/models.py's attack model as a current model (threshold 6)."""
    return models.save(models.attack_model(), tmp_path_factory.mktemp("models"), version="attack", threshold=6)


async def test_probes_are_scored_as_the_addons_score_them(attack_path):
    lm = model.load(str(attack_path))
    p = next(p for p in probes.probes() if p.target == "/search?q=%3Bcat+%2Fetc%2Fpasswd" and p.header_set == "curl")
    assert p.headers == (("User-Agent", "curl/7.88.1"), ("Accept", "*/*"))
    got = probes.score(lm, p)
    assert got == lm.score(fieldsmod.extract("GET", p.target, list(p.headers), b""))[0] > 6
    # The same request through the addons (FeatureExtractor -> Scorer) gets the same score.
    sc = Scorer()
    with taddons.context(FeatureExtractor(), sc) as tctx:
        tctx.configure(sc, openflare_model=str(attack_path), openflare_llm_enabled=False)
        f = tflow.tflow(req=tutils.treq(path=p.target.encode(), headers=[(k.encode(), v.encode()) for k, v in p.headers], content=b""))
        for e in eventsequence.iterate(f):
            await tctx.master.addons.handle_lifecycle(e)
    assert f.metadata[common.LOCAL_SCORE] == got


class Shifted:
    """A field model that scores like `fm`, except requests whose (normalised) fields hold every one of
    `needles`: those get probability `p`."""

    def __init__(self, fm, p: float, *needles: str) -> None:
        self.fm, self.needles, self.p = fm, needles, p

    def score(self, req):
        text = " ".join(fieldmodel.normalise(f.value, plus=f.loc in ("query", "form")) for f in req.fields)
        if all(n in text for n in self.needles):
            return fieldmodel.Hit(self.p)
        return self.fm.score(req)


def _lm(fm, **card):
    return model.LocalModel(fm, {"operating_point": 0.5, "threshold": 6, "version": "x", **card}, Path("x.npz"))


def test_probe_gate_refuses_a_candidate_that_passes_an_attack_probe():
    base = models.attack_model()
    cur = _lm(Shifted(base, 1.0, "cat /etc/passwd"), version="cur")
    same = retraining.probe_gate(cur, cur)
    assert same.promote and same.reasons == [] and same.summary["attacks_refused"]["current"] == same.summary["attacks_refused"]["candidate"]
    # "cat /etc/passwd" passed by the candidate (score 1), everything else as before.
    cand = _lm(Shifted(base, 0.0, "cat /etc/passwd"), version="shifted")
    pg = retraining.probe_gate(cur, cand)
    assert not pg.promote and len(pg.reasons) == 1 and "passes 19 attack probe(s)" in pg.reasons[0]
    assert {p.target for p, _, _ in pg.attacks_passed} == {"/search?q=%3Bcat+%2Fetc%2Fpasswd"}
    table = retraining.probe_table(pg)
    assert "/search?q=%3Bcat+%2Fetc%2Fpasswd: score 10 -> 1 (19 of 19 header sets)" in table, table
    # Everyday probes: a few more refused is within the slack, many more is not.
    cand = _lm(Shifted(cur.fields, 1.0, "wget", "search"), version="fp")
    pg = retraining.probe_gate(cur, cand, benign_slack=80)
    assert pg.promote and 0 < len(pg.benign_refused) <= 80, pg.summary  # within the slack: passes
    assert "everyday probes the current model passes and the candidate refuses" in retraining.probe_table(pg)
    worse = _lm(Shifted(cur.fields, 1.0, "search"), version="fp")
    pg = retraining.probe_gate(cur, worse, benign_slack=10)
    assert not pg.promote and "everyday probes" in pg.reasons[0] and "at most 10 more" in pg.reasons[0]


def test_each_model_is_judged_at_its_own_threshold():
    fm = Shifted(models.attack_model(), 0.6, "/etc/")  # score 7: refused at 6, passed at 9
    cur, lenient = _lm(fm), _lm(fm, threshold=9, version="t9")
    pg = retraining.probe_gate(cur, lenient)
    assert not pg.promote and pg.summary["attacks_refused"]["candidate"] < pg.summary["attacks_refused"]["current"]
    assert any("etc" in p.target for p, _, _ in pg.attacks_passed)
    assert retraining.probe_gate(cur, _lm(fm, version="same")).promote


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


async def test_poisoned_labels_are_refused_by_the_probe_gate(tmp_path, attack_path, tiny_corpus, capsys, caplog):
    model_path = attack_path
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

    cur = tmp_path / "models" / "openflare-local.npz"
    cur.parent.mkdir()
    cur.write_bytes(model_path.read_bytes())
    model.card_path(cur).write_bytes(model.card_path(model_path).read_bytes())
    out_json = tmp_path / "retrain.json"
    rc = _retrain().main(["--dir", str(store_dir), "--data", str(tiny_corpus), "--model", str(cur), "--dry-run",
                          "--base-sample", "0", "--placed", "0", "--json", str(out_json)])
    out = capsys.readouterr().out
    print(out)
    res = json.loads(out_json.read_text())
    assert res["stats"]["operator"] == 7
    assert rc == 3 and "REFUSED: " in out and "PASSES" not in out, out
    assert any(r.startswith("probe gate: the candidate passes") for r in res["reasons"]), res["reasons"]
    assert "attack probes the current model refuses and the candidate passes" in out
    assert res["probes"]["attacks_refused"]["candidate"] < res["probes"]["attacks_refused"]["current"]
    # What it lets through is what the operator taught it: the poisoned kinds of attack.
    passed = " ".join(res["probes"]["attacks_passed"])
    assert any(k in passed for k in ("etc%2Fpasswd", "etc%2Fshadow", "admin%27--", "%60whoami%60", "or+%271%27%3D%271")), passed
    assert model.load(str(cur)).version == model.load(str(model_path)).version  # a dry run: nothing promoted


def test_retrain_refuses_cleanly_on_bad_input(tmp_path, attack_path, tiny_corpus, capsys):
    model_path = attack_path
    retrain = _retrain()
    store_dir = tmp_path / "records"
    st = recorder.records.open_store(directory=store_dir)
    st.close()
    cur = tmp_path / "m.npz"
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


def test_a_constant_candidate_is_refused(tmp_path, attack_path):
    # Whatever the candidate is inside: one that calls everything benign refuses only what the rules catch.
    path = models.save(models.constant_model(0.01), tmp_path, "constant", version="constant")
    pg = retraining.probe_gate(model.load(str(attack_path)), model.load(str(path)))
    refused = pg.summary["attacks_refused"]
    assert not pg.promote and refused["candidate"] < refused["current"]
