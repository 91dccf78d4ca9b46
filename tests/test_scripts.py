"""scripts/*.py on bad input: a clear message and exit code 2, never a traceback, and nothing created.

Each script's `main(argv)` is called in-process (as `python scripts/x.py` does), except where the exit
code of the real command is the point."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from addons import dataset
from addons import model
from addons import records
from conftest import REPO


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"openflare_script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def rec(label="benign", split="train", target="/a?q=1"):
    return {"method": "GET", "target": target, "headers": [], "body": "", "label": label, "split": split}


@pytest.fixture
def corpus(tmp_path):
    lines = [rec(target=f"/search?q=shoes+{i}") for i in range(10)] + [rec("attack", target=f"/?id={i}%27+or+1=1--") for i in range(10)]
    lines += [rec(split="test", target="/search?q=socks"), rec("attack", split="test", target="/?id=1%27--")]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def bad_corpus(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec()) + "\n{not json\n")
    return path


@pytest.fixture
def truncated(tmp_path, model_path):
    """A copy of the model whose card was cut in half (a copy interrupted, a full disk)."""
    path = tmp_path / "cut.npz"
    path.write_bytes(model_path.read_bytes())
    card = model.card_path(model_path).read_text()
    model.card_path(path).write_text(card[: len(card) // 2])
    return path


def assert_clean(capsys, *needles: str) -> str:
    out, err = capsys.readouterr()
    text = out + err
    assert "Traceback" not in text
    for n in needles:
        assert n in text, text
    return text


# ---- verify_log.py: a typo'd --dir is an error, not an intact empty log ---------------------------------


def test_verify_log_on_a_missing_store_is_an_error_and_creates_nothing(tmp_path):
    typo = tmp_path / "data" / "recrods"
    res = subprocess.run([sys.executable, "scripts/verify_log.py", "--dir", str(typo)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res
    assert f"no record store at {typo}: the directory does not exist" in res.stderr
    assert "OK" not in res.stdout and "intact" not in res.stdout and "Traceback" not in res.stderr
    assert not typo.exists() and not typo.parent.exists()


def test_verify_log_on_a_directory_that_is_no_store(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert script("verify_log").main(["--dir", str(tmp_path / "x")]) == 2
    assert_clean(capsys, "is not an OpenFlare record store")
    assert list((tmp_path / "x").iterdir()) == []


def test_verify_log_with_a_corrupt_spill_file(tmp_path, capsys):
    records.open_store(directory=tmp_path / "store").close()
    spill = tmp_path / "spill.jsonl"
    spill.write_text('{"_id": \n{}\n')
    # A torn or corrupt line is reported and skipped, never a crash; the rest of the journal is still read.
    assert script("verify_log").main(["--dir", str(tmp_path / "store"), "--spill", str(spill)]) == 0
    assert_clean(capsys, f"BAD LINE: {spill} line 1", "1 bad journal line(s) skipped")


# ---- export_records.py -----------------------------------------------------------------------------------


def test_export_on_a_missing_store_and_an_unwritable_out(tmp_path, capsys):
    assert script("export_records").main(["--dir", str(tmp_path / "typo")]) == 2
    assert_clean(capsys, "no record store at")
    assert not (tmp_path / "typo").exists()
    records.open_store(directory=tmp_path / "store").close()
    assert script("export_records").main(["--dir", str(tmp_path / "store"), "--out", str(tmp_path / "no" / "such" / "x.jsonl")]) == 2
    assert_clean(capsys, "cannot write --out")


# ---- train.py / eval.py: corpora and model cards ------------------------------------------------------------


def test_train_without_the_shared_datasets_explains_where_they_come_from(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dataset, "DEFAULT_DATA_DIR", tmp_path / "shared" / "datasets")
    assert script("train").main(["--out", str(tmp_path / "m.npz")]) == 2
    assert_clean(capsys, f"no training data: {tmp_path / 'shared' / 'datasets'} does not exist", "README.md",
                 "build_datasets.py", "make train DATA=")
    assert script("retrain").main(["--dir", str(tmp_path / "typo")]) == 2  # the store is checked first
    records.open_store(directory=tmp_path / "store").close()
    assert script("retrain").main(["--dir", str(tmp_path / "store")]) == 2
    assert_clean(capsys, "no training data", "README.md")


def test_train_and_eval_on_a_bad_corpus_line(bad_corpus, capsys):
    assert script("train").main(["--data", str(bad_corpus)]) == 2
    assert_clean(capsys, f"{bad_corpus}:2: not valid JSON")
    assert script("eval").main(["--data", str(bad_corpus)]) == 2
    assert_clean(capsys, f"{bad_corpus}:2: not valid JSON")


def test_data_given_as_a_directory(tmp_path, corpus, capsys):
    # A directory of corpora is read as its *.jsonl[.gz] files; one without any says so.
    assert script("eval").main(["--data", str(corpus.parent)]) == 0
    assert_clean(capsys, "ALL")
    (tmp_path / "empty").mkdir()
    for name in ("train", "eval"):
        assert script(name).main(["--data", str(tmp_path / "empty")]) == 2
        assert_clean(capsys, f"{tmp_path / 'empty'} is a directory without *.jsonl or *.jsonl.gz files")


def test_a_truncated_model_card(truncated, corpus, model_path, capsys):
    assert script("eval").main(["--model", str(truncated), "--data", str(corpus)]) == 2
    assert_clean(capsys, "model card unreadable", str(model.card_path(truncated)))
    assert script("rollback").main(["--model", str(truncated)]) == 2
    assert_clean(capsys, "model card unreadable")
    assert script("rollback").main(["--model", str(truncated), "--list"]) == 2
    assert_clean(capsys, "model card unreadable")
    # A truncated card in the history is listed as such, not left out.
    good = truncated.with_name("good.npz")
    good.write_bytes(truncated.read_bytes())
    model.card_path(good).write_text(model.card_path(model_path).read_text())
    (good.parent / "history").mkdir()
    (good.parent / "history" / "good-old.card.json").write_text('{"version": "old", "crea')
    assert script("rollback").main(["--model", str(good), "--list"]) == 0
    assert_clean(capsys, "(unreadable card good-old.card.json: JSONDecodeError)")


def test_unwritable_outputs(tmp_path, corpus, capsys):
    nowhere = tmp_path / "file"
    nowhere.write_text("a file, not a directory")
    assert script("eval").main(["--data", str(corpus), "--json", str(nowhere / "x.json")]) == 2
    assert_clean(capsys, "cannot write --json")
    args = ["--data", str(corpus), "--out", str(nowhere / "m.npz"), "--bits", "12", "--everyday", "10", "--generated", "5",
            "--binary", "0", "--payloads", "", "--profile-sources", ""]
    assert script("train").main(args) == 2
    assert_clean(capsys, f"train: cannot write {nowhere / 'm.npz'}")


def test_bench_and_soak_without_the_shared_data_stop_and_name_the_smoke_run(tmp_path, capsys):
    """No dataset: no figures from a 10-request mix unless asked for (--builtin-mix)."""
    for name in ("bench", "soak"):
        assert script(name).main(["--data", str(tmp_path / "none.jsonl")]) == 2
        err = capsys.readouterr().err
        assert "--builtin-mix" in err and "none.jsonl" in err, name


@pytest.mark.parametrize("name, argv", [
    ("upstream", ["--port", "99999"]),
    ("bench", ["--rounds", "0"]),
    ("bench", ["--attack-share", "2"]),
    ("soak", ["--window", "0"]),
    ("bench_retrain", ["--flows", "0"]),
    ("bench_recorder", ["--concurrency", "0"]),
    ("eval", ["--threshold", "11"]),
    ("verify_log", ["--days", "-1"]),
])
def test_bad_arguments_are_usage_errors(name, argv, capsys):
    with pytest.raises(SystemExit) as e:
        script(name).main(argv)
    assert e.value.code == 2
    assert_clean(capsys, "error:")
