"""The C n-gram sums (addons/_fastscore.c) against fieldmodel's numpy path, which stays the reference."""

import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from addons import fieldmodel
from addons.fields import Field
from addons.fields import Request

SALTS = tuple(int(s) for s in fieldmodel._SALT)
CLASS_SALTS = tuple(int(s) for s in fieldmodel._CLASS_SALT)


def test_the_kernel_is_built():
    # `make install` compiles it; without it every window pays the numpy path (about 20x slower on long texts).
    assert fieldmodel._fastscore is not None, "addons._fastscore is not built: is a C compiler installed?"


@functools.lru_cache(maxsize=8)
def _weights(bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=2 << bits) * (rng.random(2 << bits) < 0.8)).astype(np.float32)  # some buckets 0


def _numpy(texts: list[str], classes: list[int], weights: np.ndarray, bits: int) -> np.ndarray:
    row, col, val = fieldmodel.ngram_keys(texts, classes, bits)
    return np.bincount(row, weights=weights[col] * val, minlength=len(texts))


def _c(texts: list[str], classes: list[int], weights: np.ndarray, bits: int) -> np.ndarray:
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    return np.array(fieldmodel._fastscore.window_sums(encoded, classes, weights, bits, fieldmodel.CLASS_SCALE, SALTS,
                                                      CLASS_SALTS))


_char = st.one_of(st.characters(), st.sampled_from(["\ud800", "\udbff", "\udc80", "\udfff"]))  # lone surrogates
_text = st.one_of(
    st.text(_char, max_size=40),
    st.text(st.characters(max_codepoint=127), max_size=200),
    st.builds(lambda s, n: s * n, st.text(_char, min_size=1, max_size=12), st.integers(1, 300)),  # long texts
)
_windows = st.lists(st.tuples(_text, st.integers(0, len(fieldmodel.CLASSES) - 1)), max_size=12)


@settings(max_examples=150, deadline=None)
@given(_windows, st.integers(10, 20), st.integers(0, 3))
def test_c_sums_are_numpys(windows, bits, seed):
    texts, classes = [t for t, _ in windows], [c for _, c in windows]
    w = _weights(bits, seed)
    np.testing.assert_allclose(_c(texts, classes, w, bits), _numpy(texts, classes, w, bits), rtol=1e-9, atol=1e-9)


def test_c_sums_of_the_edge_cases():
    w = _weights(12, 0)
    texts = ["", "a", "ab", "abcd", "abcde", "\x02hello world\x03", "é", "\ud800", "日本語のテキスト", "x" * 5000]
    classes = [i % len(fieldmodel.CLASSES) for i in range(len(texts))]
    z = _c(texts, classes, w, 12)
    np.testing.assert_allclose(z, _numpy(texts, classes, w, 12), rtol=1e-9, atol=1e-9)
    assert z[0] == 0.0  # an empty window has no n-grams
    assert len(set(z[1:].tolist())) == len(texts) - 1


def test_the_class_changes_only_the_class_block():
    w = _weights(12, 1)
    shared_only = w.copy()
    shared_only[1 << 12 :] = 0  # the class block's weights away: the class no longer matters
    texts = ["' or 1=1--"] * len(fieldmodel.CLASSES)
    classes = list(range(len(fieldmodel.CLASSES)))
    assert len(set(_c(texts, classes, w, 12).tolist())) == len(texts)
    assert len(set(_c(texts, classes, shared_only, 12).tolist())) == 1


def test_bad_arguments_raise():
    ws = fieldmodel._fastscore.window_sums
    w = _weights(10, 0)
    with pytest.raises(ValueError, match="float32"):
        ws([b"a"], [0], w.astype(np.float64), 10, 0.5, SALTS, CLASS_SALTS)
    with pytest.raises(ValueError, match="float32"):
        ws([b"a"], [0], w, 11, 0.5, SALTS, CLASS_SALTS)  # weights of another size
    with pytest.raises(ValueError, match="not a class"):
        ws([b"a"], [len(CLASS_SALTS)], w, 10, 0.5, SALTS, CLASS_SALTS)
    with pytest.raises(ValueError, match="classes"):
        ws([b"a", b"b"], [0], w, 10, 0.5, SALTS, CLASS_SALTS)
    with pytest.raises(TypeError, match="bytes"):
        ws(["a"], [0], w, 10, 0.5, SALTS, CLASS_SALTS)


def _random_model(bits: int) -> fieldmodel.FieldModel:
    rng = np.random.default_rng(bits)
    return fieldmodel.FieldModel(_weights(bits, 2), rng.normal(size=fieldmodel.EXTRA), -1.5, bits=bits)


REQUEST = Request([Field("method", "", "POST"), Field("path", "1", "api"), Field("query", "q", "1' or '1'='1"),
                   Field("header", "user-agent", "Mozilla/5.0 (X11; Linux x86_64)"), Field("cookie", "sid", "é\ud800"),
                   Field("json", "a.0.b", "<script>alert(1)</script> " * 40), Field("text", "", ""),
                   Field("header", "x-a", "b", via="name")], [])


@pytest.mark.parametrize("bits", [10, 16, 20])
def test_window_logits_are_the_same_without_the_extension(monkeypatch, bits):
    fm = _random_model(bits)
    r = fieldmodel.rows(REQUEST.fields)
    with_c = fm.window_logits(r)
    hit = fm.score(REQUEST)
    monkeypatch.setattr(fieldmodel, "_fastscore", None)
    fm._cache.clear()
    np.testing.assert_allclose(with_c, fm.window_logits(r), rtol=1e-9, atol=1e-9)
    assert fm.score(REQUEST) == hit


def test_a_stale_build_is_not_used(monkeypatch):
    class Stale:  # a build of another hash: its sums would be wrong
        CONSTANTS = (1, 2)

        @staticmethod
        def window_sums(*args):
            raise AssertionError("a stale kernel was called")

    fm = _random_model(10)
    r = fieldmodel.rows(REQUEST.fields)
    expected = fm.window_logits(r)
    monkeypatch.setattr(fieldmodel, "_fastscore", Stale)
    np.testing.assert_allclose(fm.window_logits(r), expected, rtol=1e-9, atol=1e-9)


def test_rows_number_windows_per_field_and_carry_each_windows_signals():
    r = fieldmodel.rows(REQUEST.fields)
    assert r.texts[0] == "\x02post\x03" and len(r.texts) == len(r.extra) == len(r.classes) == len(r.field)
    assert r.field == sorted(r.field) and set(r.field) == set(range(len(REQUEST.fields)))
    for k, (i, w) in enumerate(zip(r.field, r.window)):
        f = REQUEST.fields[i]
        assert w == r.field[:k + 1].count(i)  # 1, 2, ... within the field
        _, text = fieldmodel.prepare(f)
        ws, n_long = fieldmodel.windows(text)
        assert r.texts[k] == ws[w - 1]
        sq, xs, fp = fieldmodel.injection(ws[w - 1]) if w <= n_long else (0.0, 0.0, "")  # long windows only
        c = fieldmodel.field_class(f)
        expected = np.zeros(fieldmodel.EXTRA, dtype=np.float32)
        expected[c], expected[-2], expected[-1] = 1.0, sq, xs
        assert r.classes[k] == c and r.fingerprint[k] == fp
        np.testing.assert_array_equal(r.extra[k], expected)
    assert r.extra[r.field.index(2), -2] == 1.0  # the query's SQL injection
    assert max(r.window) > 1  # the long JSON value has several windows
    assert fieldmodel.rows([]).extra.shape == (0, fieldmodel.EXTRA)
