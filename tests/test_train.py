import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from addons import dataset
from addons import detector
from addons import featurize
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


ARGS = ["--bits", "16", "--synthetic", "40", "--everyday", "40", "--shaped-attacks", "20", "--generated-attacks", "20", "--min-df", "1", "--profile-sources", "app", "--version", "t1"]


def test_train_end_to_end_and_deterministic(tmp_path, capsys):
    data = _corpus(tmp_path / "toy.jsonl")
    out1 = tmp_path / "a" / "m.joblib"
    out2 = tmp_path / "b" / "m.joblib"
    assert train.main(["--data", str(data), "--out", str(out1), *ARGS]) == 0
    assert train.main(["--data", str(data), "--out", str(out2), *ARGS]) == 0
    assert "operating point" in capsys.readouterr().err  # progress goes to stderr

    assert out1.read_bytes() == out2.read_bytes()
    card = json.loads(model.card_path(out1).read_text())
    assert card["sha256"] == model.sha256_file(out1)
    assert card["version"] == "t1" and 0 < card["operating_point"] < 1
    assert card["train_counts"]["toy"] == {"attack": 48, "benign": 48}
    assert card["profile"]["roots"] == ["/shop"] and card["data_sources"][0]["file"] == str(data)

    lm = model.load(str(out1))
    assert isinstance(lm.estimator, detector.Detector)
    score, p = lm.score(featurize.featurize("GET", "/p9?q=%27+or+1%3D1--"))
    assert score > 6 and p >= lm.operating_point
    assert lm.score(featurize.featurize("GET", "/p9?q=red+shoes"))[0] <= 6
    # The profile: an unknown parameter under /shop is an anomaly, a known one is not.
    assert lm.score(featurize.featurize("GET", "/shop/item.jsp?id=3&name=item2"))[0] <= 6
    assert lm.score(featurize.featurize("GET", "/shop/item.jsp?id=3&debug=1"))[0] > 6

    recs = [r for r in dataset.read(data) if r.split == "test"]
    result = evalscript.evaluate(recs, lm)
    assert result["sources"]["toy"]["n"] == len(recs)
    assert "toy" in evalscript.report(result)


def test_train_refuses_one_label_and_bad_data(tmp_path, capsys):
    data = tmp_path / "benign.jsonl"
    data.write_text(json.dumps({"method": "GET", "target": "/", "label": "benign"}) + "\n")
    assert train.main(["--data", str(data), "--out", str(tmp_path / "m.joblib")]) == 2
    assert "both attack and benign" in capsys.readouterr().err
    data.write_text("oops\n")
    assert train.main(["--data", str(data), "--out", str(tmp_path / "m.joblib")]) == 2
    assert f"{data}:1: not valid JSON" in capsys.readouterr().err


def test_hashed_tfidf_matches_prediction():
    feats = ["get /a ?q=1", "get /b ?q=<script>", "get /a ?q=2"]
    X, idf = detector.tfidf_matrix(feats)
    det = detector.Detector(idf, [0.5] * (1 << detector.BITS), -1.0)
    for i, f in enumerate(feats):
        z = float(X[i].sum()) * 0.5 - 1.0
        assert det.supervised_proba(f) == pytest.approx(1 / (1 + pytest.importorskip("math").exp(-z)), rel=1e-5)


def _reference_ngrams(s: str, bits: int, headers: bool = False) -> list[int]:
    """The documented hash, one n-gram at a time in plain Python (slow, obviously right)."""
    b = s.encode("utf-8", "surrogatepass")
    mask = (1 << 64) - 1
    out = []
    for k in range(detector.NGRAMS[0], detector.NGRAMS[1] + 1):
        for i in range(len(b) - k + 1):
            h = 0
            for byte in b[i : i + k]:
                h = (h * int(detector._P) + byte) & mask
            salt = int((detector._SALT_HEADERS if headers else detector._SALT)[k])
            out.append((((h + salt) & mask) * int(detector._MIX) & mask) >> (64 - bits))
    return sorted(out)


@given(st.text(max_size=1200) | st.binary(max_size=1200).map(lambda b: b.decode("latin-1")), st.sampled_from([12, 20]),
       st.booleans())
@settings(max_examples=60, deadline=None)
def test_hashed_ngrams_both_paths_match_the_reference(s, bits, headers):
    # Short texts take the matrix path, long ones (>= detector._SHORT bytes) one pass per n-gram length.
    assert sorted(detector.hashed_ngrams(s, bits, headers).tolist()) == _reference_ngrams(s, bits, headers)


@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, detector._SHORT - 1, detector._SHORT, detector._SHORT + 3])
def test_hashed_ngrams_at_the_path_boundaries(n):
    s = "".join(chr(97 + (i * 7) % 26) for i in range(n))
    assert sorted(detector.hashed_ngrams(s).tolist()) == _reference_ngrams(s, detector.BITS)
    assert sorted(detector.hashed_ngrams(s, headers=True).tolist()) == _reference_ngrams(s, detector.BITS, True)


def test_hashed_tfidf_matches_prediction_with_headers():
    import numpy as np

    feats = [featurize.featurize("GET", "/s?q=red+shoes", [("User-Agent", "curl/8.4.0"), ("Cookie", "a=1; b=2")]),
             featurize.featurize("POST", "/c?x=1", [("User-Agent", "Mozilla/5.0 (X11)"), ("Content-Type", "application/json")], b'{"t": "hi"}'),
             featurize.featurize("GET", "/")]
    X, idf = detector.tfidf_matrix(feats)
    coef = np.random.default_rng(0).normal(size=1 << detector.BITS).astype(np.float32)
    det = detector.Detector(idf, coef, 0.25)
    for i, f in enumerate(feats):
        z = float((X[i] @ coef)[0]) + 0.25
        assert det.supervised_proba(f) == pytest.approx(1 / (1 + pytest.importorskip("math").exp(-z)), rel=1e-5)


def test_header_section_cannot_dilute_the_request():
    import numpy as np

    f = featurize.featurize("GET", "/search?q=select+a+size")
    long_ua = featurize.featurize("GET", "/search?q=select+a+size", [("User-Agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) "
                                  "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"), ("Cookie", "sid=" + "ab" * 20)])
    assert detector.split_headers(long_ua) == (f, long_ua[len(f) + 1:])
    idx, _ = detector.term_counts(f)
    coef = np.zeros(1 << detector.BITS, dtype=np.float32)
    coef[idx] = 3.0  # weights on the request's own n-grams only
    det = detector.Detector(np.ones(1 << detector.BITS), coef, -2.0)
    assert det.supervised_proba(long_ua) == pytest.approx(det.supervised_proba(f), rel=1e-6)
    # A model pickled before the split scores the whole string as one block: headers dilute it.
    det.header_block = False
    assert det.supervised_proba(long_ua) < det.supervised_proba(f)


@given(st.text(max_size=400), st.text(max_size=400))
@settings(max_examples=80, deadline=None)
def test_block_keys_matrix_and_passes_agree(req, hdr):
    br, bh = req.encode("utf-8", "surrogatepass"), hdr.encode("utf-8", "surrogatepass")
    fast = detector.block_keys(br, bh)
    slow = detector.block_keys(br, bh, matrix=False)
    assert sorted(fast.tolist()) == sorted(slow.tolist())
    flag = 1 << detector.BITS
    # The request's keys are its own n-grams; the header section's are its header-salted ones, flagged.
    assert sorted(k for k in slow.tolist() if k < flag) == sorted(detector.hashed_ngrams(req).tolist())
    assert sorted(k - flag for k in slow.tolist() if k >= flag) == sorted(detector.hashed_ngrams(hdr, headers=True).tolist())
