"""The C scoring kernel (addons/_fastscore.c) against the detector's numpy path, which stays the reference."""

import math
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from addons import probes
from addons import detector
from addons import featurize
from addons import model


def test_the_kernel_is_built():
    # `make install` compiles it; without it every request pays the numpy path (several times slower in mitmdump).
    assert detector._fastscore is not None, "addons._fastscore is not built: is a C compiler installed?"


def _kernel(det: detector.Detector, feature: str) -> float:
    req, hdr = detector.split_headers(feature) if det.header_block else (feature, "")
    raw, raw_hdr = req.encode("utf-8", "surrogatepass"), hdr.encode("utf-8", "surrogatepass")
    return detector._fastscore.z(raw, raw_hdr, det._weights(), det.bits, det.header_scale)


def _numpy(det: detector.Detector, feature: str) -> float:
    req, hdr = detector.split_headers(feature) if det.header_block else (feature, "")
    return det.logit_numpy(req, hdr)


def _random_detector(bits: int, seed: int) -> detector.Detector:
    rng = np.random.default_rng(seed)
    idf = rng.uniform(0.5, 8.0, 1 << bits) * (rng.random(1 << bits) < 0.7)  # 0: a bucket too rare in training
    return detector.Detector(idf, rng.normal(size=1 << bits), -0.5, bits=bits)


@given(st.text(max_size=900), st.text(max_size=900), st.sampled_from([12, 16, 20]), st.booleans())
@settings(max_examples=120, deadline=None)
def test_kernel_matches_numpy_on_any_text(req, hdr, bits, header_block):
    det = _random_detector(bits, bits)
    det.header_block = header_block
    feature = req + (detector._HSEC + hdr if hdr else "")
    assert _kernel(det, feature) == pytest.approx(_numpy(det, feature), rel=1e-9, abs=1e-12)


def _shipped_strings() -> list[str]:
    out = []
    for headers in list(probes.DEV_HEADERS.values()) + list(probes.HELDOUT_HEADERS.values()):
        for method, target, extra, body in probes.DEV_BENIGN + probes.HELDOUT_BENIGN + probes.ATTACKS:
            out.append(featurize.featurize(method, target, headers + extra, body))
    # Past the kernel's stack table (its slots hold 2 per n-gram), up to the feature cap; empty parts.
    out += ["", "a", "get / " + "x" * 409, "get / " + "y" * 410, featurize.featurize("POST", "/u", [], b"q=" + b"%27or+1%3D1" * 4000)]
    out += [detector._HSEC + "ua curl", "get / " + detector._HSEC]
    return out


def test_kernel_matches_numpy_on_the_shipped_model():
    det = model.load(model.DEFAULT_MODEL).estimator
    strings = _shipped_strings()
    assert len(strings) > 1000
    for f in strings:
        assert _kernel(det, f) == pytest.approx(_numpy(det, f), rel=1e-9, abs=1e-12), f[:200]


def test_supervised_proba_is_the_same_on_either_path(monkeypatch):
    det = model.load(model.DEFAULT_MODEL).estimator
    strings = _shipped_strings()[::7]
    fast = [det.supervised_proba(f) for f in strings]
    monkeypatch.setattr(detector, "_fastscore", None)
    slow = [det.supervised_proba(f) for f in strings]
    assert fast == pytest.approx(slow, rel=1e-9, abs=1e-12)


def test_the_side_by_side_weights_are_never_pickled_and_follow_new_arrays():
    det = _random_detector(12, 1)
    det.intercept = 0.0
    det.supervised_proba("get /?q=1")
    assert "_pairs" in det.__dict__
    again = pickle.loads(pickle.dumps(det))
    assert "_pairs" not in again.__dict__
    assert again.supervised_proba("get /?q=1") == det.supervised_proba("get /?q=1")
    before = det.supervised_proba("get /?q=<script>")
    det.coef = -det.coef  # a new array: the side-by-side copy is rebuilt
    assert det.supervised_proba("get /?q=<script>") == pytest.approx(1.0 - before)


def _proba_by_parts(det: detector.Detector, feature: str) -> float:
    """supervised_proba as it was before _fastscore.proba: split and encode in Python, then the kernel."""
    z = det.intercept + _kernel(det, feature)
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


# Text with the section markers where split_headers looks for them, non-ASCII and lone surrogates.
_MARKED = st.lists(
    st.sampled_from([detector._HSEC, featurize.SEP, featurize.SEP + "b ", " ", "  ", "h ", "\ud800", "é", "‖"])
    | st.text(max_size=40), max_size=12
).map("".join)


@given(_MARKED, st.sampled_from([12, 16]), st.booleans())
@settings(max_examples=300, deadline=None)
def test_proba_in_one_call_is_split_encode_and_kernel(feature, bits, header_block):
    det = _random_detector(bits, bits)
    det.header_block = header_block
    got = detector._fastscore.proba(feature, det._weights(), det.bits, det.header_scale, det.intercept, det.header_block)
    try:
        feature.encode("utf-8")
    except UnicodeEncodeError:
        assert got is None  # the caller's own path (surrogatepass) takes it
    else:
        assert got == _proba_by_parts(det, feature)
    assert det.supervised_proba(feature) == pytest.approx(_proba_by_parts(det, feature), rel=1e-12)


def test_proba_in_one_call_on_the_shipped_model():
    det = model.load(model.DEFAULT_MODEL).estimator
    for f in _shipped_strings():
        assert det.supervised_proba(f) == _proba_by_parts(det, f), f[:200]


def test_weights_sit_on_a_huge_page_boundary():
    w = _random_detector(16, 3)._weights()
    assert w.ctypes.data % detector.HUGE_PAGE == 0 and w.flags.c_contiguous and w.dtype == np.float32


def test_kernel_refuses_weights_of_the_wrong_size():
    with pytest.raises(ValueError, match="2\\*\\*bits"):
        detector._fastscore.z(b"get /", b"", np.zeros((1 << 12, 2), dtype=np.float32), 13, 0.5)
    with pytest.raises(ValueError, match="2\\*\\*bits"):
        detector._fastscore.z(b"get /", b"", np.zeros((4, 2), dtype=np.float32), 32, 0.5)  # keys are 32-bit
    with pytest.raises(TypeError):
        detector._fastscore.z("get /", b"", np.zeros((1 << 12, 2), dtype=np.float32), 12, 0.5)
    with pytest.raises(ValueError, match="2\\*\\*bits"):
        detector._fastscore.proba("get /", np.zeros((1 << 12, 2), dtype=np.float32), 13, 0.5, 0.0, True)
    with pytest.raises(TypeError):
        detector._fastscore.proba(b"get /", np.zeros((1 << 12, 2), dtype=np.float32), 12, 0.5, 0.0, True)


@given(st.text(max_size=200) | st.builds(lambda m, t: featurize.featurize(m, t), st.sampled_from(["GET", "POST"]), st.text(max_size=80)))
@settings(max_examples=200, deadline=None)
def test_parse_path_is_the_path_parse_finds(feature):
    # AppProfile.check looks at the path first and parses the rest only under a learned root.
    assert detector.parse_path(feature) == detector.parse(feature)[1]


def _char_classes_in_full(value: str) -> frozenset[str]:
    """detector.char_classes by its regular expressions only (what the ASCII shortcut must agree with)."""
    out = set(detector._ALNUM.sub("", value))
    if detector._LETTER.search(value):
        out.add("a")
    if detector._DIGIT.search(value):
        out.add("0")
    return frozenset(out)


@given(st.text(max_size=40) | st.text(alphabet="aZ09_.-/,=&;%+*<! ", max_size=40))
@settings(max_examples=400)
def test_char_classes_ascii_shortcut_changes_nothing(value):
    assert detector.char_classes(value) == _char_classes_in_full(value)
    assert detector.char_classes("ab12@x-Y_.") == frozenset("a0@-_.")


def _check_in_full(prof: detector.AppProfile, feature: str) -> list[str] | None:
    """AppProfile.check read straight off the learned dicts (what its compiled view must agree with)."""
    method, path, pairs = detector.parse(feature)
    if not any(path.startswith(r) for r in prof.roots):
        return None
    p = prof.paths.get(path)
    if p is None:
        return ["unknown path"]
    problems = [f"method {method} never seen on this path"] if method not in p["methods"] else []
    for name, value in pairs:
        prm = p["params"].get(name)
        if prm is None:
            problems.append("unknown parameter")
        elif value is None:
            if not prm["bare"]:
                problems.append("parameter without value")
        elif not prm["valued"]:
            problems.append("value on a bare parameter")
        else:
            if detector.char_classes(value) - set(prm["classes"]):
                problems.append("unseen characters in a value")
            if len(value) > max(prm["max_len"] * prof.length_slack, prm["max_len"] + 8):
                problems.append("value longer than ever seen")
            if len(value) < prm.get("min_len", 0):
                problems.append("value shorter than ever seen")
            if prm.get("values") is not None and value not in prm["values"]:
                problems.append("value outside the closed set seen")
            elif prm.get("shapes") is not None and detector.shape(value) not in prm["shapes"]:
                problems.append("value shape never seen")
    return problems


_SHIPPED_PROFILE = model.load(model.DEFAULT_MODEL).estimator.profile


@st.composite
def _profile_features(draw):
    prof = _SHIPPED_PROFILE
    path = draw(st.sampled_from(sorted(prof.paths)) | st.sampled_from(["/tienda1", "/tienda1x/a.jsp", "/other", "/"]))
    names = sorted(prof.paths.get(path, {}).get("params", {})) or ["id"]
    pairs = draw(st.lists(st.tuples(st.sampled_from(names) | st.text("abz", min_size=1, max_size=3),
                                    st.none() | st.text("aZ09 .-@'%é", max_size=20)), max_size=5))
    text = " ".join(n if v is None else f"{n}={v}".lower() for n, v in pairs)
    method = draw(st.sampled_from(["get", "post", "put"]))
    where = draw(st.sampled_from(["query", "body"]))
    if where == "query" or not text:
        return f"{method} {path}" + (f" ?{text}" if text else "")
    return f"{method} {path} {featurize.SEP}b {text}"


@given(_profile_features())
@settings(max_examples=500, deadline=None)
def test_profile_check_is_what_the_learned_dicts_say(feature):
    assert _SHIPPED_PROFILE.check(feature) == _check_in_full(_SHIPPED_PROFILE, feature)


def test_profile_compiled_view_is_never_pickled():
    prof = pickle.loads(pickle.dumps(_SHIPPED_PROFILE))
    prof.check("get /tienda1/index.jsp")
    assert "_compiled" in prof.__dict__
    assert "_compiled" not in pickle.loads(pickle.dumps(prof)).__dict__
