"""addons/scorer.py (and addons/model.py): verdicts, options, fail policy, model verification, the chain."""

import gzip
import json
import logging
import re
import shutil
from pathlib import Path

import models
import pytest
from mitmproxy import eventsequence
from mitmproxy import http
from mitmproxy.exceptions import OptionsError
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons import common
from addons import fieldmodel
from addons import fields
from addons import llm
from addons import model
from addons.features import FeatureExtractor
from addons.scorer import Scorer

SQLI = b"/?id=1%27%20OR%20%271%27=%271"
BENIGN = b"/search?q=blue+shoes&page=2"


def flow(path=BENIGN, content=b"", headers=(), method=b"GET"):
    f = tflow.tflow(req=tutils.treq(method=method, path=path, content=content, headers=http.Headers(list(headers))))
    f.client_conn.peername = ("203.0.113.7", 40000)
    return f


# Constant models refuse all or nothing: tests of other things switch the probe check off for them.
NO_PROBES = {"openflare_model_probe_attacks": 0, "openflare_model_probe_benign": 0}


def constant_model(tmp_path, p_attack: float, name="const", **card) -> str:
    """A real field model (.npz with its card) whose attack probability is always `p_attack`."""
    return str(models.save(models.constant_model(p_attack), tmp_path, name, f"{name}-1", **card))


class Raises(fieldmodel.FieldModel):
    """A field model whose scoring raises."""

    def __init__(self):
        super().__init__(models.constant_model(0.5).weights, models.constant_model(0.5).extra, 0.0, 8)

    def score(self, req):
        raise ValueError("boom")


async def run_chain(tctx, f):
    for e in eventsequence.iterate(f):
        await tctx.master.addons.handle_lifecycle(e)


def assert_refused(f):
    assert f.response is not None
    assert f.response.status_code == common.BLOCK_STATUS
    assert f.response.content == common.BLOCK_BODY
    # Nothing but the fixed headers: no score, reason, model or Server header.
    assert dict(f.response.headers) == {**common.BLOCK_HEADERS, "content-length": str(len(common.BLOCK_BODY))}


# --- real verdicts with the shipped model ---


@pytest.fixture(scope="module")
def real_model(model_path):
    """The shipped model, loaded (and verified) once for the module: loading takes a second or two."""
    return model.load(str(model_path))


async def test_attack_refused_benign_passes(real_model, tmp_path):
    sc = Scorer()
    with taddons.context(FeatureExtractor(), sc) as tctx:
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.5), **NO_PROBES)
        sc.model = real_model
        f = flow(SQLI, headers=[(b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64)")])
        await run_chain(tctx, f)
        assert_refused(f)
        assert f.metadata[common.VERDICT] == common.VERDICT_BLOCK
        assert 7 <= f.metadata[common.SCORE] <= 10
        assert type(f.metadata[common.SCORE]) is int and type(f.metadata[common.LOCAL_SCORE]) is int
        assert f.metadata[common.MODEL_VERSION] == sc.model.version
        assert isinstance(f.metadata[common.SCORE_MS], float)
        assert "threshold 6" in f.metadata[common.REASON]
        assert not f.marked  # refusals are not marked: @marked holds only what the operator marked
        assert f.comment.startswith("block ") and " openflare (" in f.comment

        g = flow(BENIGN, headers=[(b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64)")])
        await run_chain(tctx, g)
        assert g.response is None
        assert g.metadata[common.VERDICT] == common.VERDICT_PASS
        assert 1 <= g.metadata[common.SCORE] <= 6
        assert not g.marked
        assert g.comment.startswith("pass ") and " openflare (" in g.comment


async def test_chain_in_real_order_through_response(real_model, tmp_path):
    """features then scorer, every hook in order: the 403 set in `request` still reaches `response`."""
    sc = Scorer()
    with taddons.context(FeatureExtractor(), sc) as tctx:
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.5), **NO_PROBES)
        sc.model = real_model
        f = flow(b"/search?q=%3Cscript%3Ealert(document.cookie)%3C/script%3E", headers=[(b"User-Agent", b"Mozilla/5.0")])
        await run_chain(tctx, f)
        assert ["query", "q", "%3Cscript%3Ealert(document.cookie)%3C/script%3E", ""] in f.metadata[common.FIELDS]
        assert f.metadata[common.FIELD] == ["query", "q"]
        assert f.metadata[common.CLIENT_IP] == "203.0.113.7"
        assert_refused(f)


@pytest.mark.parametrize("method", [b"HEAD", b"head"])
async def test_refusal_to_head_has_no_body(real_model, tmp_path, method):
    """RFC 9110 9.3.2: a HEAD response has no content; its content-length is the GET refusal's."""
    sc = Scorer()
    with taddons.context(FeatureExtractor(), sc) as tctx:
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.5), **NO_PROBES)
        sc.model = real_model
        f = flow(SQLI, headers=[(b"User-Agent", b"Mozilla/5.0")], method=method)
        await run_chain(tctx, f)
        assert f.metadata[common.VERDICT] == common.VERDICT_BLOCK
        assert f.response.status_code == common.BLOCK_STATUS and f.response.raw_content == b""
        assert dict(f.response.headers) == {**common.BLOCK_HEADERS, "content-length": str(len(common.BLOCK_BODY))}
        assert common.is_refusal(f.response)
        g = flow(SQLI, headers=[(b"User-Agent", b"Mozilla/5.0")])  # the GET refusal after it keeps its body
        await run_chain(tctx, g)
        assert_refused(g)


# --- options and policies with constant models ---


async def test_threshold_honoured(tmp_path, caplog):
    sc = Scorer()
    path = constant_model(tmp_path, 0.7)  # operating point 0.5: p 0.7 scores 8
    with taddons.context(FeatureExtractor(), sc) as tctx:
        tctx.configure(sc, openflare_model=path, **NO_PROBES)
        caplog.set_level("INFO")
        sc.running()
        assert "OpenFlare refuses scores above 6 (the model card's threshold)" in caplog.text
        f = flow()
        await run_chain(tctx, f)
        assert f.metadata[common.SCORE] == 8
        assert_refused(f)
        tctx.configure(sc, openflare_threshold=8)
        assert "OpenFlare refuses scores above 8 (openflare_threshold threshold)" in caplog.text
        f = flow()
        await run_chain(tctx, f)
        assert f.metadata[common.SCORE] == 8
        assert f.response is None
        assert f.metadata[common.VERDICT] == common.VERDICT_PASS
        tctx.configure(sc, openflare_threshold=7)
        f = flow()
        await run_chain(tctx, f)
        assert_refused(f)
        sc.done()


async def test_detect_only_marks_but_forwards(tmp_path):
    sc = Scorer()
    with taddons.context(FeatureExtractor(), sc) as tctx:
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.99), openflare_detect_only=True, **NO_PROBES)
        f = flow(SQLI)
        await run_chain(tctx, f)
        assert f.response is None
        assert f.metadata[common.VERDICT] == common.VERDICT_BLOCK
        assert f.metadata[common.SCORE] == 10
        assert not f.marked
        assert "detect-only" in f.comment


@pytest.mark.parametrize("detect_only", [False, True])
async def test_local_verdicts_from_the_table_are_what_decide_gives(tmp_path, detect_only):
    """The table behind most requests' verdicts (_decide_local) against the full _decide, every score, both
    statuses, first and later uses; a new model or threshold makes a new table."""
    sc = Scorer()
    with taddons.context(sc) as tctx:
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.5), openflare_detect_only=detect_only, **NO_PROBES)
        for status in (llm.OFF, llm.SKIPPED):
            for score in [*range(1, 11)] * 2:
                fast, slow = flow(), flow()
                sc._decide_local(fast, score, 0.00125, status, "query \"q\": learnt n-grams, window 1")
                sc._decide(slow, score, 0.00125, llm_result=llm.Result(status),
                           explanation="query \"q\": learnt n-grams, window 1")
                assert list(fast.metadata.items()) == list(slow.metadata.items())
                assert (fast.comment, fast.marked) == (slow.comment, slow.marked)
                assert (fast.response is None) == (slow.response is None) == (detect_only or score <= 6)
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.5, name="other"), openflare_threshold=9, **NO_PROBES)
        f = flow()
        sc._decide_local(f, 8, 0.001, llm.OFF, 'query "q": learnt n-grams, window 1, score 8')
        assert f.metadata[common.MODEL_VERSION] == "other-1" and f.response is None
        assert f.comment == ('pass 8/10 openflare (local score 8 <= threshold 9; model other-1; '
                             'query "q": learnt n-grams, window 1, score 8; 1.0 ms)')


@pytest.mark.parametrize("policy, refused", [("open", False), ("closed", True)])
async def test_fail_policy_when_scoring_raises(tmp_path, caplog, policy, refused):
    sc = Scorer()
    with taddons.context(FeatureExtractor(), sc) as tctx:
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.1), openflare_fail=policy, **NO_PROBES)
        sc.model = model.LocalModel(Raises(), {"version": "broken"}, tmp_path / "broken.npz")
        f = flow(SQLI)
        with caplog.at_level(logging.WARNING):
            await run_chain(tctx, f)
        assert f.metadata[common.VERDICT] == common.VERDICT_ERROR
        assert f.metadata[common.SCORE] is None
        assert f.metadata[common.REASON] == "error: ValueError"
        assert "could not score" in caplog.text and f"failing {policy}" in caplog.text
        if refused:
            assert_refused(f)
            assert not f.marked and f.comment.startswith("error unscored openflare (")
        else:
            assert f.response is None
            assert not f.marked


async def test_without_features_addon_fail_policy_applies(tmp_path):
    sc = Scorer()
    with taddons.context(sc) as tctx:
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.1), openflare_fail="closed", **NO_PROBES)
        f = flow()
        await run_chain(tctx, f)
        assert f.metadata[common.VERDICT] == common.VERDICT_ERROR
        assert_refused(f)


@pytest.mark.parametrize(
    "opts, message",
    [
        ({"openflare_threshold": 0}, "between 1 and 10"),
        ({"openflare_threshold": 11}, "between 1 and 10"),
        ({"openflare_fail": "maybe"}, "open, closed"),
        ({"openflare_model": "/nonexistent/x.npz"}, "model file not found"),
    ],
)
async def test_bad_options(tmp_path, opts, message):
    sc = Scorer()
    with taddons.context(sc) as tctx:
        # A good value first: a failed configure rolls back to it (and reloads it).
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.1), **NO_PROBES)
        with pytest.raises(OptionsError, match=message):
            tctx.configure(sc, **opts)


async def test_wrong_sha256_refused_before_loading(tmp_path):
    path = constant_model(tmp_path, 0.1)
    card = model.card_path(model.resolve(path))
    data = json.loads(card.read_text())
    data["sha256"] = "0" * 64
    card.write_text(json.dumps(data))
    sc = Scorer()
    with taddons.context(sc) as tctx:
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.1, name="good"), **NO_PROBES)
        with pytest.raises(OptionsError, match="does not match its card"):
            tctx.configure(sc, openflare_model=path)
        assert sc.model.version == "good-1"  # rolled back


async def test_missing_or_broken_card(tmp_path):
    path = constant_model(tmp_path, 0.1)
    card = model.card_path(model.resolve(path))
    sc = Scorer()
    with taddons.context(sc) as tctx:
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.1, name="good"), **NO_PROBES)
        card.write_text("{not json")
        with pytest.raises(OptionsError, match="model card unreadable"):
            tctx.configure(sc, openflare_model=path)
        card.write_text("{}")
        with pytest.raises(OptionsError, match="has no sha256"):
            tctx.configure(sc, openflare_model=path)
        card.unlink()
        with pytest.raises(OptionsError, match="model card not found"):
            tctx.configure(sc, openflare_model=path)


async def test_model_name_resolves_in_models_dir(tmp_path):
    constant_model(tmp_path, 0.3, name="mini")
    m = model.load("mini", models_dir=tmp_path)
    assert m.version == "mini-1" and m.operating_point == 0.5
    assert model.resolve("mini", tmp_path) == tmp_path / "mini.npz"
    assert model.resolve("a/b.npz") == model.resolve("a/b")


def test_proba_to_score_bands():
    assert [model.proba_to_score(p) for p in (0.0, 0.08, 0.49, 0.5, 0.62, 0.99, 1.0)] == [1, 1, 6, 7, 7, 10, 10]
    assert model.proba_to_score(0.3, operating_point=0.2) == 7
    assert model.proba_to_score(0.19, operating_point=0.2) == 6
    assert model.proba_to_score(float("nan")) == 10
    assert all(type(model.proba_to_score(p / 100)) is int for p in range(101))


@pytest.mark.parametrize(
    "card, message",
    [
        ({"operating_point": float("nan")}, "operating_point must be a number strictly between 0 and 1"),
        ({"operating_point": 1.0}, "operating_point must be"),
        ({"operating_point": "0.5"}, "operating_point must be"),
        ({"threshold": 10}, "threshold must be an integer from 1 to 9"),
        ({"threshold": 0}, "threshold must be"),
        ({"threshold": 6.5}, "threshold must be"),
    ],
)
def test_card_that_would_refuse_all_or_nothing_is_refused(tmp_path, card, message):
    path = models.save(models.constant_model(0.1), tmp_path, "m")
    model.write_card(path, {"version": "x", "operating_point": 0.5, **card})
    with pytest.raises(model.ModelError, match=message):
        model.load(str(path))


def test_a_pickle_is_never_loaded(tmp_path):
    """A model file is read with allow_pickle=False: a pickle (code) with a matching card is refused."""
    import pickle

    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps({"format": fieldmodel.FORMAT}))
    model.write_card(path, {"version": "evil", "operating_point": 0.5})
    with pytest.raises(model.ModelError, match="could not be loaded"):
        model.load(str(path))


EXPLAINED = [  # (target, location, name, what the signal says)
    (b"/item?id=1%27%20or%201%3D1--", "query", "id", "sqli (libinjection"),
    (b"/p?x=%3Cscript%3Ealert(1)%3C/script%3E", "query", "x", "xss (libinjection)"),
    (b"/f?file=../../../../etc/passwd", "query", "file", "learnt n-grams"),
]


@pytest.mark.parametrize("target, loc, name, signal", EXPLAINED)
async def test_refusal_names_the_field_and_signal(tmp_path, target, loc, name, signal):
    sc = Scorer()
    with taddons.context(FeatureExtractor(), sc) as tctx:
        tctx.configure(sc, openflare_model=str(models.save(models.attack_model(), tmp_path, "attack")))
        f = flow(target, headers=[(b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0")])
        await run_chain(tctx, f)
        assert_refused(f)
        md = f.metadata
        assert md[common.FIELD] == [loc, name]
        assert md[common.SIGNAL].startswith(signal)
        assert md[common.EXPLANATION].startswith(f'{loc} "{name}": {signal}')
        assert md[common.EXPLANATION] in f.comment
        assert md[common.CATEGORY] in ("sqli", "xss", "path_traversal")
        ok = flow(b"/search?q=blue+running+shoes")
        await run_chain(tctx, ok)
        assert ok.response is None and ok.metadata[common.VERDICT] == common.VERDICT_PASS


def test_score_request_refuses_what_it_cannot_inspect():
    lm = model.LocalModel(models.constant_model(0.01), {"version": "c", "operating_point": 0.5}, None)
    assert lm.score_request("GET", "/", [("X", "y" * 100)], b"", fields.Limits(header_bytes=50))[:2] == (10, 1.0)
    score, p, hit = lm.score_request("GET", "/", [], b"")
    assert score == 1 and p == pytest.approx(0.01) and hit.signal == ""


async def test_leaves_finished_flows_alone(tmp_path):
    sc = Scorer()
    with taddons.context(sc) as tctx:
        tctx.configure(sc, openflare_model=constant_model(tmp_path, 0.99), **NO_PROBES)
        for f in (tflow.tflow(resp=True), tflow.tflow(err=True), tflow.tflow(live=False)):
            f.metadata[common.FIELDS] = [["method", "method", "GET", ""]]
            before = f.response
            await sc.request(f)
            assert common.VERDICT not in f.metadata
            assert f.response is before


async def test_loads_as_a_script(model_conf, caplog):
    with taddons.context() as tctx:
        tctx.options.update_defer(**model_conf)
        with caplog.at_level(logging.INFO):
            ns = tctx.script("addons/scorer.py")
        assert [type(a).__name__ for a in ns.addons] == ["Scorer"]
        assert ns.addons[0].model is not None
        assert "local model" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_tampered_copy_of_real_model_refused(model_path, tmp_path):
    copy = tmp_path / "copy.npz"
    shutil.copyfile(model_path, copy)
    shutil.copyfile(model.card_path(model_path), model.card_path(copy))
    assert model.sha256_file(copy) == model.read_card(copy)["sha256"]
    with open(copy, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(model.ModelError, match="does not match its card"):
        model.load(str(copy))


def test_shipped_model_scores_real_requests_without_raising(real_model):
    """Every request a user may send must get a score: a raise means fail-open (or closed) for it.

    Takes every 97th line of the shared datasets (outside the repo: skipped without them).
    """
    from addons import dataset

    files = sorted(dataset.DEFAULT_DATA_DIR.glob("*.jsonl.gz"))
    if not files:
        pytest.skip(f"no shared datasets in {dataset.DEFAULT_DATA_DIR}")
    reqs = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i % 97 == 0:
                    r = dataset.parse_record(json.loads(line), f"{path}:{i}", path.stem)
                    reqs.append((r.method, r.target, r.headers, r.body))
    failed = []
    for r in reqs:
        try:
            real_model.score_request(*r)
        except Exception as e:  # noqa: BLE001 - collected and shown
            failed.append((r[1][:120], repr(e)))
    assert failed == [], f"{len(failed)} of {len(reqs)} requests could not be scored, e.g. {failed[:3]}"


def test_refusal_is_what_response_make_gives_and_each_is_its_own():
    for status, body in ((common.BLOCK_STATUS, common.BLOCK_BODY), (429, b"Too Many Requests\n")):
        made = http.Response.make(status, body, common.BLOCK_HEADERS)
        first = common.refusal(status, body)
        assert first.timestamp_start >= made.timestamp_start and first.timestamp_end == first.timestamp_start
        ignore = {"timestamp_start": 0, "timestamp_end": 0}
        assert {**first.get_state(), **ignore} == {**made.get_state(), **ignore}
        first.headers["x-changed"] = "1"  # a later addon edits one refusal: the next is untouched
        first.status_code = 500
        second = common.refusal(status, body)
        assert "x-changed" not in second.headers and second.status_code == status
        assert second.content == body
        head = common.refusal(status, body, "HEAD")
        assert head.raw_content == b"" and head.headers["content-length"] == str(len(body))
        assert {**head.get_state(), **ignore, "content": b""} == {**made.get_state(), **ignore, "content": b""}
        assert common.refusal(status, body).content == body  # the HEAD refusal shares nothing with the GET one
        assert common.is_refusal(second, status, body) and common.is_refusal(head, status, body)
        assert not common.is_refusal(http.Response.make(status, b"", common.BLOCK_HEADERS), status, body)
        assert not common.is_refusal(http.Response.make(200, body), status, body) and not common.is_refusal(None)


# --- the probe check: a model must score the fixed probe set sanely before it serves ---


class Booby:
    """Unpickling this creates `path`: proof that loading ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def raising_model() -> fieldmodel.FieldModel:
    """The attack model with an application profile whose `paths` is a list: every request's scoring raises."""
    am = models.attack_model()
    profile = fieldmodel.AppProfile()
    profile.roots, profile.paths = ("",), []
    return fieldmodel.FieldModel(am.weights, am.extra, am.intercept, am.bits, profile)


TAMPERS = {  # kind -> (what the refusal says)
    "always benign": "of 498 attack probes (at least 70 % needed)",  # refuses only what the rules catch
    "scoring raises": "scoring raised AttributeError",
    "threshold 10": "threshold must be an integer from 1 to 9, not 10",
    "operating point NaN": "operating_point must be a number strictly between 0 and 1, not nan",
    "pickle": "could not be loaded",
}


def tampered_model(kind: str, directory, name: str = "openflare-local") -> Path:
    """Write model `name` (file and card, the card's sha256 matching) tampered as `kind` in TAMPERS."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "always benign":
        return models.save(models.constant_model(0.01), directory, name, "benign")
    if kind == "scoring raises":
        return models.save(raising_model(), directory, name, "raises")
    if kind == "threshold 10":
        return models.save(models.attack_model(), directory, name, "th10", threshold=10)
    if kind == "operating point NaN":
        return models.save(models.attack_model(), directory, name, "nan", operating_point=float("nan"))
    assert kind == "pickle"
    import pickle

    path = directory / (name + model.MODEL_SUFFIX)
    path.write_bytes(pickle.dumps(Booby(directory / "pwned")))
    model.write_card(path, {"version": "evil", "operating_point": 0.5})
    return path


def test_the_shipped_model_passes_the_probe_check(real_model):
    check = model.probe_check(real_model)
    assert check.ok, check.reasons
    assert check.attacks == 498 and check.benign == 1520 and len(check.scores) == 498 + 1520
    assert check.summary().startswith(f"{check.attacks_refused}/498 attack probes refused, ")


def test_probe_check_bounds():
    lm = model.LocalModel(models.attack_model(), {"version": "a", "operating_point": 0.5}, None)
    check = model.probe_check(lm)
    assert check.ok and 0.7 * 498 <= check.attacks_refused < 498 and 0.7 * 1520 <= check.benign_passed < 1520
    strict = model.probe_check(lm, min_refused=100, min_passed=100)
    assert strict.reasons == [f"refuses {check.attacks_refused} of 498 attack probes (at least 100 % needed)",
                              f"passes {check.benign_passed} of 1520 everyday probes (at least 100 % needed)"]
    # Judged at the card's threshold: at 9 the tiny model refuses fewer attack probes.
    lenient = model.probe_check(model.LocalModel(lm.fields, {**lm.card, "threshold": 9}, None))
    assert lenient.threshold == 9 and lenient.attacks_refused < check.attacks_refused


@pytest.mark.parametrize("kind", TAMPERS)
async def test_a_tampered_model_is_refused_at_startup(tmp_path, kind):
    path = tampered_model(kind, tmp_path / "models")
    sc = Scorer()
    with taddons.context(sc) as tctx:
        with pytest.raises(OptionsError, match=re.escape(TAMPERS[kind])):
            tctx.configure(sc, openflare_model=str(path))
        assert sc.model.path != path  # rolled back to the default
    assert not (tmp_path / "models" / "pwned").exists()  # the pickle never ran


async def test_startup_probe_check_logs_its_figures(tmp_path, caplog):
    path = models.save(models.attack_model(), tmp_path, "attack", "attack-1")
    sc = Scorer()
    with taddons.context(sc) as tctx, caplog.at_level(logging.INFO):
        tctx.configure(sc, openflare_model=str(path))
        assert sc.probe.ok and sc.probe.scores is not None
        assert f"OpenFlare local model attack-1 loaded from {path} (probe check: {sc.probe.attacks_refused}/498" in caplog.text
        with pytest.raises(OptionsError, match="openflare_model_probe_attacks"):
            tctx.configure(sc, openflare_model_probe_attacks=101)


@pytest.fixture
async def serving(tmp_path):
    """A Scorer serving the attack model v1 from tmp_path/models/openflare-local.npz."""
    d = tmp_path / "models"
    path = models.save(models.attack_model(), d, version="v1")
    sc = Scorer()
    with taddons.context(FeatureExtractor(), sc) as tctx:
        tctx.configure(sc, openflare_model=str(path), openflare_llm_enabled=False, openflare_model_watch=0)
        yield sc, tctx, d


async def test_a_tampered_model_is_never_hot_swapped_in(serving, caplog):
    sc, tctx, d = serving
    for kind, says in TAMPERS.items():
        tampered_model(kind, d)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert await sc.reload() is False, kind
        assert sc.model.version == "v1" and sc.threshold == 6
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and warnings[0].startswith("OpenFlare kept model v1: the new ") and says in warnings[0]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        f = flow(SQLI)  # the old model keeps serving
        await run_chain(tctx, f)
        assert_refused(f)
        assert f.metadata[common.MODEL_VERSION] == "v1"
    assert not (d / "pwned").exists()
    models.save(models.attack_model(), d, version="v2")  # a sound model is swapped in
    assert await sc.reload() is True and sc.model.version == "v2"


async def test_hot_swap_refuses_a_model_that_passes_what_the_serving_one_refuses(serving, caplog):
    """Trained without the command injections: sound on its own (it passes the shares), but it passes 59
    attack probes the serving model refuses. Raising the slack lets it in."""
    sc, tctx, d = serving
    cmdi = ("| id", "; cat /etc/passwd", "`id`", "$(curl x.example)")
    fm = models.tiny(attack=[a for a in models.ATTACKS if a not in cmdi])
    models.save(fm, d, version="no-cmdi")
    assert model.probe_check(models.load(d / "openflare-local.npz")).ok  # fine at startup
    with caplog.at_level(logging.WARNING):
        assert await sc.reload() is False
    assert sc.model.version == "v1"
    assert "the new model no-cmdi failed the probe check: passes 59 attack probes the serving model refuses " \
           "(at most 10), e.g. GET /search?q=%3Bcat+%2Fetc%2Fpasswd" in caplog.text
    tctx.configure(sc, openflare_model_probe_slack=59)
    assert await sc.reload() is True and sc.model.version == "no-cmdi"


@pytest.mark.skipif(model.DirWatch.open(Path(".")) is None, reason="no inotify here: the watch polls")
async def test_the_watch_does_nothing_until_a_file_in_the_models_directory_changes(serving, monkeypatch):
    """Idle, the watch costs nothing: no stat of the model file between changes (inotify on its directory);
    a promotion is still picked up."""
    import asyncio

    from addons import scorer as scorer_mod

    sc, tctx, d = serving
    checks = []
    real = scorer_mod.model_signature
    monkeypatch.setattr(scorer_mod, "model_signature", lambda path: checks.append(path) or real(path))
    tctx.configure(sc, openflare_model_watch=1, openflare_model_probe_attacks=0, openflare_model_probe_benign=0)
    sc.running()
    try:
        for _ in range(50):  # the one check when the watch begins (a change before it would be missed)
            if checks:
                break
            await asyncio.sleep(0.1)
        assert len(checks) == 1
        await asyncio.sleep(2.5)  # what used to be two polls
        assert len(checks) == 1
        models.save(models.attack_model(), d, version="v2")  # a promotion: file and card replaced
        for _ in range(100):
            if sc.model.version == "v2":
                break
            await asyncio.sleep(0.1)
        assert sc.model.version == "v2" and len(checks) >= 3  # changed, then unchanged for one period, then loaded
    finally:
        sc.done()


def test_dirwatch_sees_a_file_replaced_in_its_directory(tmp_path):
    import os
    import select

    w = model.DirWatch.open(tmp_path)
    if w is None:
        pytest.skip("no inotify here")
    try:
        assert w.drain() == 0
        (tmp_path / "m.tmp").write_bytes(b"x")
        os.replace(tmp_path / "m.tmp", tmp_path / "m.npz")
        assert select.select([w.fd], [], [], 10)[0] == [w.fd]  # a hang check only
        assert w.drain() > 0 and w.drain() == 0
    finally:
        w.close()
    assert model.DirWatch.open(tmp_path / "missing") is None


async def test_watch_keeps_the_serving_model_on_a_failed_probe_check(serving, caplog):
    """The file watch (what a promotion or a tamper triggers), not the command: the same refusal."""
    import asyncio

    sc, tctx, d = serving
    tctx.configure(sc, openflare_model_watch=1)
    sc.running()
    try:
        with caplog.at_level(logging.WARNING):
            tampered_model("always benign", d)
            for _ in range(100):
                if "failed the probe check" in caplog.text:
                    break
                await asyncio.sleep(0.1)
        assert "OpenFlare kept model v1: the new model benign failed the probe check: refuses " in caplog.text
        assert sc.model.version == "v1"
    finally:
        sc.done()
