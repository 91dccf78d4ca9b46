import gzip
import json

import pytest

from addons import dataset


def _rec(**kw):
    r = {"method": "GET", "target": "/a?q=1", "headers": [["User-Agent", "x"]], "body": "", "label": "benign", "split": "train", "source": "s"}
    r.update(kw)
    return r


def _write(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_plain_and_gzip(tmp_path, gz):
    path = _write(tmp_path / ("c.jsonl.gz" if gz else "c.jsonl"), [_rec(), _rec(label="attack", target="/a?q=%27or+1=1")], gz)
    recs = list(dataset.read(path))
    assert [r.label for r in recs] == ["benign", "attack"]
    assert recs[0].headers == [("User-Agent", "x")]
    assert recs[1].key() == ("GET", "/a?q=%27or+1=1", (("User-Agent", "x"),), b"")


def test_defaults_and_base64_body(tmp_path):
    path = _write(tmp_path / "flows.jsonl", [{"method": "POST", "target": "/u", "label": "attack", "body": "YT0x", "body_b64": True}])
    (r,) = dataset.read(path)
    assert r.body == b"a=1"
    assert r.split == "train" and r.source == "flows" and r.category == "other" and r.headers == []


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps(_rec(label="evil")), "'label' must be one of"),
        (json.dumps(_rec(split="dev")), "'split' must be one of"),
        (json.dumps(_rec(method="")), "'method' must be a non-empty string"),
        (json.dumps(_rec(headers=[["a"]])), "'headers' must be a list"),
        (json.dumps(_rec(body=3)), "'body' must be a string"),
        (json.dumps(_rec(body="!!", body_b64=True)), "not valid base64"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_rec()) + "\n\n" + line + "\n")
    with pytest.raises(dataset.DatasetError, match=message) as e:
        list(dataset.read(path))
    assert f"{path}:3:" in str(e.value)


def test_missing_file_and_bad_gzip(tmp_path):
    with pytest.raises(dataset.DatasetError, match="not found"):
        list(dataset.read(tmp_path / "nope.jsonl"))
    bad = tmp_path / "x.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(dataset.DatasetError, match="cannot read"):
        list(dataset.read(bad))
    with pytest.raises(dataset.DatasetError, match="not found"):
        dataset.parse_data_arg(f"{tmp_path / 'nope.jsonl'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dataset.DatasetError, match="no \\*.jsonl"):
        dataset.default_files(tmp_path / "empty")


def test_missing_datasets_directory_says_where_the_data_comes_from(tmp_path):
    with pytest.raises(dataset.DatasetError) as e:
        dataset.default_files(tmp_path / "shared" / "datasets")
    msg = str(e.value)
    assert f"no training data: {tmp_path / 'shared' / 'datasets'} does not exist" in msg
    assert "README.md" in msg and "build_datasets.py" in msg and "make train DATA=" in msg


def test_a_directory_stands_for_its_corpora(tmp_path):
    (tmp_path / "d").mkdir()
    a = _write(tmp_path / "d" / "a.jsonl.gz", [_rec()], gz=True)
    b = _write(tmp_path / "d" / "b.jsonl", [_rec()])
    (tmp_path / "d" / "notes.txt").write_text("not a corpus")
    c = _write(tmp_path / "c.jsonl", [_rec()])
    assert dataset.parse_data_arg(f"{tmp_path / 'd'},{c}") == [a, b, c]
    (tmp_path / "e").mkdir()
    with pytest.raises(dataset.DatasetError, match="is a directory without \\*.jsonl or \\*.jsonl.gz files"):
        dataset.parse_data_arg(str(tmp_path / "e"))


def test_parse_data_arg(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_rec()])
    b = _write(tmp_path / "b.jsonl.gz", [_rec()], gz=True)
    assert dataset.parse_data_arg(f"{a}, {b}") == [a, b]
    assert dataset.parse_data_arg(None, tmp_path) == [a, b]


def test_honest_split_drops_train_copies_of_test_requests(tmp_path):
    recs = [
        dataset.parse_record(_rec(target="/a?q=1"), "t:1", "s"),
        # Same request after normalisation (%41 -> a): dropped from train.
        dataset.parse_record(_rec(target="/%41?q=1", split="test"), "t:2", "s"),
        dataset.parse_record(_rec(target="/b", label="attack", source="o"), "t:3", "s"),
        dataset.parse_record(_rec(target="/c", split="test", label="attack"), "t:4", "s"),
    ]
    s = dataset.honest_split(recs)
    assert [r.target for r in s.train] == ["/b"]
    assert [r.target for r in s.test] == ["/%41?q=1", "/c"]
    assert s.dropped == 1 and s.dropped_by_source == {"s": 1}
    assert not {r.normal_key() for r in s.train} & {r.normal_key() for r in s.test}
    assert dataset.counts(recs) == {"o": {"attack": 1, "benign": 0}, "s": {"attack": 1, "benign": 2}}


def test_metrics_on_a_hand_made_case():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.4, 0.2, 0.7, 0.3, 0.1, 0.1, 0.05, 0.0]
    flagged = [x >= 0.5 for x in p]
    m = dataset.metrics(y, p, flagged)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 2, 1, 5)
    assert m["tpr"] == 0.5 and m["fpr"] == pytest.approx(1 / 6) and m["precision"] == pytest.approx(2 / 3)
    # FPR 0 allows thresholds above 0.7 only: 0.9 and 0.8 -> TPR 0.5.
    assert m["tpr_at_fpr_1pct"] == 0.5 and m["tpr_at_fpr_0.1pct"] == 0.5
    # AUC: of 24 attack/benign pairs, the attack wins 19 (0.4 beats 4, 0.2 beats 3 and 0.9/0.8 beat 6 each... )
    wins = sum((a > b) + 0.5 * (a == b) for a, ya in zip(p, y) if ya for b, yb in zip(p, y) if not yb)
    assert m["roc_auc"] == pytest.approx(wins / 24)
    assert dataset.tpr_at_fpr(y, p, 1 / 6) == 0.75  # one false positive allowed: threshold 0.4
    assert dataset.tpr_at_fpr([1, 1], [0.5, 0.6], 0.01) is None
    assert dataset.metrics([0, 0], [0.1, 0.9], [False, True])["tpr"] is None
