import importlib.util
import json
from pathlib import Path


import models as tests_models

from addons import dataset
from addons import fieldmodel
from addons import fields
from addons import model

ROOT = Path(__file__).resolve().parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(f"openflare_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train = _script("train")
evalscript = _script("eval")

ATTACKS = ["' or 1=1--", "<script>alert(1)</script>", "../../../etc/passwd", "1 union select null,version()--",
           "; cat /etc/passwd", "<img src=x onerror=alert(1)>", "admin'--", "1; drop table users"]
BENIGN = ["shoes", "red dress", "laptop bag", "coffee", "paris hotels", "blue jacket", "garden chair", "birthday cake"]


def _corpus(path: Path) -> Path:
    lines = []
    n = 0
    for split in ("train", "test"):
        for i in range(6):
            for a in ATTACKS:
                n += 1
                lines.append({"method": "GET", "target": f"/p{i}?s={split}&q=" + a.replace(" ", "+"), "headers": [["Host", "x"]],
                              "label": "attack", "split": split, "source": "toy", "category": "sqli"})
            for b in BENIGN:
                n += 1
                lines.append({"method": "GET", "target": f"/p{i}?s={split}&q={b.replace(' ', '+')}&page={i}", "headers": [["Host", "x"]],
                              "label": "benign", "split": split, "source": "toy"})
    # An app's own benign traffic, for the profile.
    for i in range(60):
        lines.append({"method": "GET", "target": f"/shop/item.jsp?id={i}&name=item{i % 7}", "label": "benign", "split": "train", "source": "app"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


ARGS = ["--bits", "14", "--everyday", "200", "--generated", "40", "--binary", "5", "--placements", "1", "--payloads", "",
        "--profile-sources", "app", "--version", "t1", "--max-iter", "200"]


def test_train_end_to_end_and_deterministic(tmp_path, capsys):
    data = _corpus(tmp_path / "toy.jsonl")
    out1 = tmp_path / "a" / "m.npz"
    out2 = tmp_path / "b" / "m.npz"
    assert train.main(["--data", str(data), "--out", str(out1), *ARGS]) == 0
    assert train.main(["--data", str(data), "--out", str(out2), *ARGS]) == 0
    assert "operating point" in capsys.readouterr().err  # progress goes to stderr

    assert out1.read_bytes() == out2.read_bytes()
    card = json.loads(model.card_path(out1).read_text())
    assert card["sha256"] == model.sha256_file(out1)
    assert card["version"] == "t1" and 0 < card["operating_point"] < 1 and card["threshold"] == 6
    fit = card["train_counts"]["toy"]
    assert 0 < fit["attack"] <= 48 and 0 < fit["benign"] <= 48  # a tenth held out for validation
    assert card["profile"]["roots"] == ["/shop"] and card["data_sources"][0]["file"] == str(data)

    lm = model.load(str(out1))
    assert isinstance(lm.fields, fieldmodel.FieldModel)
    score, p, hit = lm.score_request("GET", "/p9?q=%27+or+1%3D1--", [], b"")
    assert score > 6 and p >= lm.operating_point and hit.field.name == "q"
    assert lm.score_request("GET", "/p9?q=red+shoes", [], b"")[0] <= 6
    # The profile: an unknown parameter under /shop is an anomaly, a known one is not.
    assert lm.score_request("GET", "/shop/item.jsp?id=3&name=item2", [], b"")[0] <= 6
    score, _, hit = lm.score_request("GET", "/shop/item.jsp?id=3&debug=1", [], b"")
    assert score > 6 and hit.signal == "profile: unknown parameter"

    recs = [r for r in dataset.read(data) if r.split == "test"]
    result = evalscript.evaluate(recs, lm)
    assert result["sources"]["toy"]["n"] == len(recs)
    assert "toy" in evalscript.report(result)


def test_train_refuses_one_label_and_bad_data(tmp_path, capsys):
    data = tmp_path / "benign.jsonl"
    data.write_text(json.dumps({"method": "GET", "target": "/", "label": "benign"}) + "\n")
    assert train.main(["--data", str(data), "--out", str(tmp_path / "m.npz"), *ARGS[:-4]]) == 2
    assert "both attack and benign" in capsys.readouterr().err
    data.write_text("oops\n")
    assert train.main(["--data", str(data), "--out", str(tmp_path / "m.npz")]) == 2
    assert f"{data}:1: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()


def test_payloads_are_placed_where_requests_carry_them():
    """Every location a request has is among the placements, and a payload keeps its text there."""
    import random

    rng = random.Random(3)
    seen = {}
    for _ in range(400):
        f = train.place("<script>alert(1)</script>", rng)
        seen.setdefault(f.loc, f)
    assert set(seen) == {"query", "form", "json", "header", "cookie", "path", "multipart", "xml"}
    for f in seen.values():
        assert "script" in fieldmodel.normalise(f.value, plus=f.loc in ("query", "form"))


def test_everyday_words_pass_and_attacks_do_not_in_every_placement():
    """The trained toy model scores by text, not by location: the same field locations for both labels."""
    import random

    lm_fields = tests_models.tiny()
    rng = random.Random(5)
    for _ in range(60):
        benign = train.place("blue running shoes", rng)
        attack = train.place("<script>alert(1)</script>", rng)
        assert lm_fields.score(fields.Request([benign], [])).p < 0.5 < lm_fields.score(fields.Request([attack], [])).p
