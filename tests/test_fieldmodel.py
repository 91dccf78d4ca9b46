import numpy as np
import pytest
import models

from addons import fieldmodel
from addons import learn
from addons.fields import Field
from addons.fields import Request
from addons.fields import extract

BENIGN = ["hello world", "red running shoes", "page 2", "en-US,en;q=0.9", "Mozilla/5.0 (X11; Linux x86_64)",
          "select a size", "o'brien", "1", "true", "/api/v1/users", "order by price"]
ATTACKS = ["1' or '1'='1", "<script>alert(1)</script>", "../../../../etc/passwd", "1 union select password from users--",
           "<img src=x onerror=alert(1)>", "; cat /etc/passwd", "${jndi:ldap://x.example/a}", "' or 1=1--"]


@pytest.fixture(scope="module")
def tiny() -> fieldmodel.FieldModel:
    t = learn.Table()
    for loc in ("query", "json", "header", "cookie"):
        for v in BENIGN:
            t.add_fields([Field(loc, "q", v)], attack=False)
        for v in ATTACKS:
            t.add_fields([Field(loc, "q", v)], attack=True)
    return learn.fit(t, bits=14, c=10.0, max_iter=200)


def test_shapes_abstract_ids_and_tokens():
    assert fieldmodel.shapes("/static/app.8fcfc5ade8795163dd94.js") == "/static/app.\x01h.js"
    assert fieldmodel.shapes("id=123e4567-e89b-12d3-a456-426614174000") == "id=\x01u"
    assert fieldmodel.shapes("t=1733520000123") == "t=\x01d"
    assert fieldmodel.shapes("eyjhbgcioijiuzi1nij9.eyjzdwiioiixmjm0nty3odkwin0.sflkxwrjsmekkf2qt4") == "\x01j"
    assert fieldmodel.shapes("union select password") == "union select password"  # words stay words


def test_windows_cover_long_text_with_overlap():
    text = "ab" * 150
    ws, n_long = fieldmodel.windows(text)
    long, short = ws[:n_long], ws[n_long:]
    for size, stride, part in ((fieldmodel.WINDOW, fieldmodel.STRIDE, long), (fieldmodel.SHORT, fieldmodel.SHORT_STRIDE, short)):
        assert part[0].startswith("\x02") and part[-1].endswith("\x03")
        assert all(len(w.strip("\x02\x03")) == size for w in part)
        # every stretch of `stride` characters is inside one window whole: a payload up to size - stride long
        # is never cut by every window that touches it
        assert len(part) == len(range(0, 300 - size, stride)) + 1
    assert fieldmodel.windows("short") == (["\x02short\x03"], 1)


def test_repeats_collapse_so_padding_in_a_window_cannot_dilute(tiny):
    assert fieldmodel.collapse("z" * 100 + "' or 1=1--") == "zzzz' or 1=1--"
    assert fieldmodel.collapse("ababababab!") == "abababab!" and fieldmodel.collapse("aaaah") == "aaaah"
    plain = tiny.score(Request([Field("query", "q", "' or 1=1--")], [])).p
    for pad in ("z" * 100, "ab" * 60, "-" * 110):
        assert tiny.score(Request([Field("query", "q", pad + "' or 1=1--")], [])).p > 0.5, pad
    assert plain > 0.5


def test_libinjection_reads_every_long_window():
    """A payload past the first window still gets libinjection's signal (shape tokens read as 0)."""
    r = fieldmodel.rows([Field("query", "q", "a" * 16384 + " admin'--")])
    assert r.extra[:, -2].max() == 1.0 and any(r.fingerprint)
    long = fieldmodel.rows([Field("json", "q", "lorem ipsum " * 40 + "1' or '1'='1")])
    assert long.extra[:, -2].max() == 1.0


def test_ngram_keys_match_a_direct_count():
    texts, classes = ["abc", "xy"], [0, 3]
    row, col, val = fieldmodel.ngram_keys(texts, classes, 10)
    # abc: 3+2+1 n-grams, xy: 2+1, each in two blocks
    assert np.bincount(row).tolist() == [12, 6]
    assert (col[row == 0] < 1 << 10).sum() == 6
    np.testing.assert_allclose(val[(row == 0) & (col < 1 << 10)], 1 / np.sqrt(6), rtol=1e-6)
    np.testing.assert_allclose(val[(row == 0) & (col >= 1 << 10)], fieldmodel.CLASS_SCALE / np.sqrt(6), rtol=1e-6)
    # no n-gram across the two windows: hashing them apart gives the same keys
    r1 = fieldmodel.ngram_keys(["abc"], [0], 10)
    assert sorted(r1[1].tolist()) == sorted(col[row == 0].tolist())


def test_field_class():
    assert fieldmodel.CLASSES[fieldmodel.field_class(Field("header", "user-agent", "x"))] == "ua"
    assert fieldmodel.CLASSES[fieldmodel.field_class(Field("header", "accept", "x"))] == "header"
    assert fieldmodel.CLASSES[fieldmodel.field_class(Field("form", "a", "x"))] == "query"
    assert fieldmodel.CLASSES[fieldmodel.field_class(Field("query", "a", "a", "name"))] == "name"
    assert fieldmodel.CLASSES[fieldmodel.field_class(Field("multipart", "f", "x"))] == "text"


def test_libinjection_signal():
    sq, xs, fp = fieldmodel.injection("\x021' or '1'='1\x03")
    assert sq == 1.0 and fp
    assert fieldmodel.injection("<script>alert(1)</script>")[1] == 1.0
    assert fieldmodel.injection("hello world") == (0.0, 0.0, "")


def test_tiny_model_separates_and_names_the_field(tiny):
    benign = Request([Field("query", "q", "red running shoes"), Field("header", "accept", "en-US,en;q=0.9")], [])
    attack = Request([Field("query", "q", "red running shoes"), Field("header", "x-api", "' or 1=1--")], [])
    assert tiny.score(benign).p < 0.5
    hit = tiny.score(attack)
    assert hit.p > 0.5
    assert hit.field == Field("header", "x-api", "' or 1=1--")


def test_confidence_weighs_a_picked_window_by_the_model(tiny):
    # A corpus attack the model sees nothing in (a mislabelled `/linus's_law/`) is worth less in training.
    r, best = learn.best_windows(tiny, [Field("query", "q", "red running shoes"), Field("query", "id", "' or 1=1--")])
    assert r.field[best[0]] == 1
    attack = learn.confidence(tiny, r, best[0])
    r2, best2 = learn.best_windows(tiny, [Field("query", "q", "red running shoes")])
    assert attack > 0.5 > learn.confidence(tiny, r2, best2[0])


def test_a_well_formed_host_is_read_by_the_rules_alone(tiny):
    def score(host):
        return tiny.score(extract("GET", "/", [("Host", host)], b""))

    host = extract("GET", "/", [("Host", "127.0.0.1:41234")], b"")
    assert [lg[0] for f, lg in zip(host.fields, tiny.field_logits(host.fields)) if f.loc == "header"] == [fieldmodel.NO_PAYLOAD]
    assert score("169.254.169.254").signal == "rule: ssrf-metadata"
    assert score("x' or 1=1--").p > 0.5  # not an authority: the model reads it


def test_padding_cannot_dilute_a_window(tiny):
    """However much text comes before it, a payload is scored with at most one window of context."""
    def p(pad: int) -> float:
        return tiny.score(Request([Field("json", "q", "lorem ipsum " * pad + "<script>alert(1)</script>")], [])).p

    assert p(0) > 0.5
    assert p(20) == pytest.approx(p(2000), rel=1e-6) == pytest.approx(p(20000), rel=1e-6)


def test_scanner_signal_decides(tiny):
    hit = tiny.score(Request([Field("query", "q", "hello world")], ["scanner-ua:sqlmap"]))
    assert hit.p == fieldmodel.SIGNAL_P and hit.signal == "scanner-ua:sqlmap"


def test_cache_gives_the_same_answer(tiny):
    req = extract("GET", "/search?q=%27%20or%201%3D1--", [("User-Agent", "curl/8.5.0")], b"")
    first = tiny.score(req)
    assert tiny.score(req) == first


def test_save_and_load_round_trip(tiny, tmp_path):
    tiny.profile = fieldmodel.AppProfile(min_root=1).fit(
        [extract("GET", "/shop/item?id=12", [], b"").fields, extract("GET", "/shop/item?id=7", [], b"").fields])
    path = tmp_path / "m.npz"
    try:
        tiny.save(path)
    finally:
        profile, tiny.profile = tiny.profile, None
    back = fieldmodel.FieldModel.load(path)
    req = extract("GET", "/search?q=%3Cscript%3Ealert(1)%3C/script%3E", [], b"")
    assert back.score(req).p == pytest.approx(tiny.score(req).p, rel=1e-6)
    assert back.profile.to_json() == profile.to_json()
    assert back.profile.check(extract("GET", "/shop/item?id=99", [], b"").fields) == []
    assert "unseen characters in a value" in back.profile.check(extract("GET", "/shop/item?id=9'9", [], b"").fields)
    assert back.profile.check(extract("GET", "/other", [], b"").fields) is None


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, format=np.array("something else"))
    with pytest.raises(ValueError, match="format .something else., but this OpenFlare reads"):
        fieldmodel.FieldModel.load(path)
    bad = tmp_path / "obj.npz"
    np.savez(bad, format=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):  # an object array needs pickle: refused, never unpickled
        fieldmodel.FieldModel.load(bad)


def test_threshold_at():
    assert learn.threshold_at([0.1, 0.2, 0.9, 0.3], 0.0) > 0.9
    assert 0.3 < learn.threshold_at([0.1, 0.2, 0.9, 0.3], 0.25) <= 0.9


def test_the_whole_path_is_a_field_too():
    flds = extract("GET", "/static/../../etc/passwd?x=1", [], b"").fields
    assert Field("path", "path", "/static/../../etc/passwd") in flds
    assert Field("path", "0", "static") in flds


@pytest.mark.parametrize("text, rule", [
    ("http://169.254.169.254/latest/meta-data/", "ssrf-metadata"),
    ("*)(uid=*))(|(uid=*", "ldap-filter"),
    ("1; drop table users--", "sql-stacked"),
    ("1 union select null,password from users", "sql-union"),
    ("admin'--", "sql-quote-comment"),
])
def test_a_rule_decides_a_field_the_model_is_unsure_of(text, rule):
    assert fieldmodel.rule_of(text) == rule
    benign = models.constant_model(0.01)
    req = Request([Field("query", "q", "shoes"), Field("header", "x-forwarded-for", "203.0.113.9, " + text)], [])
    hit = benign.score(req)
    assert hit.p == fieldmodel.RULE_P and hit.signal == "rule: " + rule and hit.field.name == "x-forwarded-for"
    assert fieldmodel.category_of(hit) == fieldmodel.RULE_CATEGORY[rule]
    assert fieldmodel.explain(hit, 10) == f'header "x-forwarded-for": rule: {rule}, window 1, score 10'


@pytest.mark.parametrize("text", ["select a size", "european union selection", "rock'n'roll", "o'brien - the best",
                                  "lunch; then drop by the table", "169.254.1.1", "(uid)", "the union select committee",
                                  "5 union select flour from pantry"])
def test_rules_leave_everyday_text_alone(text):
    assert fieldmodel.rule_of(text) == ""
