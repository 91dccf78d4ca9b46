"""The estimator classes inside models/openflare-local.joblib. A plain module: no mitmproxy import.

`Detector` combines two opinions on one feature string (from `addons.featurize.featurize`):

* a supervised part: TF-IDF over hashed byte n-grams (1-5, 2**20 buckets) and a logistic regression, trained on
  labelled attacks and benign requests. Prediction does not go through scikit-learn: n-grams are
  hashed with a few vectorised numpy passes and dotted with float32 idf and weight arrays
  (a Pipeline's per-call validation would cost more than the model itself);
* an `AppProfile`: a positive-security profile learned from one application's benign traffic. Under
  the path roots it learned (e.g. `/tienda1`), a request is an anomaly if its path, method, a
  parameter name, or a value's characters or length were never seen there. Elsewhere it has no
  opinion, and the supervised part decides alone.

The attack probability is the supervised one, raised to `violation_p` when the profile finds an
anomaly. Pickles refer to these classes as `addons.detector.*`: keep the names and attributes.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from addons import featurize

NGRAMS = (1, 5)
BITS = 20  # 2**20 hashed n-gram buckets
SEP = featurize.SEP

_P = np.uint64(0x100000001B3)  # FNV-1a prime: the rolling polynomial hash of an n-gram's bytes
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top BITS bits of h * MIX
_SALT_STEP = 0x2545F4914F6CDD1D
_HEADER_SALT_OFFSET = 16
_SALT = [np.uint64(k * _SALT_STEP) for k in range(NGRAMS[1] + 1)]  # n-grams of each length apart
# The header section's n-grams hash with other salts: "(" or ";" in a User-Agent gets its own weight,
# apart from the same bytes in a query.
_SALT_HEADERS = [np.uint64((k + _HEADER_SALT_OFFSET) * _SALT_STEP % (1 << 64)) for k in range(NGRAMS[1] + 1)]
_HSEC = SEP + "h "
# The header section's normalised vector is scaled by this before the weights: under the same L2
# penalty, header weights pay 1/HEADER_SCALE**2 more, so headers (the same pool for both labels in
# training) move a score less, while a payload in a header still stands out.
HEADER_SCALE = 0.5

try:  # the C kernel (setup.py builds it where a compiler is present); the numpy path below is the reference
    from addons import _fastscore
except ImportError:  # pragma: no cover - depends on the install
    _fastscore = None


HUGE_PAGE = 2 << 20


def huge_page_aligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` that starts on a 2 MiB boundary. numpy asks Linux for transparent huge
    pages for large arrays; aligned, all of the kernel's weights sit in them (8 MiB: four pages, not
    2048), so a request's hundreds of random bucket reads miss the TLB far less often."""
    buf = np.empty(a.nbytes + HUGE_PAGE, dtype=np.uint8)
    start = -buf.ctypes.data % HUGE_PAGE
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _powers() -> np.ndarray:
    """M[j, k-1] = P**(k-1-j) (mod 2**64) for j < k: a window of bytes @ M = its 1..5-gram hashes."""
    k_max = NGRAMS[1]
    m = np.zeros((k_max, k_max), dtype=np.uint64)
    for k in range(1, k_max + 1):
        for j in range(k):
            m[j, k - 1] = pow(int(_P), k - 1 - j, 1 << 64)
    return m


_POW = _powers()
_SALTS = np.array([int(_SALT[k]) for k in range(1, NGRAMS[1] + 1)], dtype=np.uint64)
_SALTS_HEADERS = np.array([int(_SALT_HEADERS[k]) for k in range(1, NGRAMS[1] + 1)], dtype=np.uint64)
# The kernel hashes as block_keys does only if it was built with these constants.
if _fastscore is not None and (
    _fastscore.CONSTANTS != (*NGRAMS, int(_P), int(_MIX), _SALT_STEP, _HEADER_SALT_OFFSET)
    or _fastscore.HEADER_MARK != _HSEC.encode("utf-8")  # proba splits the header section off at this marker
):
    _fastscore = None  # pragma: no cover - a stale build
# Of the last K-1 windows (start n-K+1+i), the n-gram of length k+1 fits in the text iff i + k < K-1.
_TAIL = np.array([[i + k < NGRAMS[1] - 1 for k in range(NGRAMS[1])] for i in range(NGRAMS[1] - 1)])
_SHORT = 768  # bytes: below this one matrix product beats a pass per n-gram length (fewer numpy calls)


def _window_hashes(b: np.ndarray, n: int) -> np.ndarray:
    """h[i, k-1]: the rolling hash of the k bytes from i, for the first n windows of b (uint64,
    zero-padded by K-1 at the end), as one product of the byte windows with powers of P."""
    windows = np.ndarray((n, NGRAMS[1]), dtype=np.uint64, buffer=b, strides=(8, 8))
    return windows @ _POW


def _valid(h: np.ndarray, n: int) -> np.ndarray:
    """The n-grams of h (one text of n >= K bytes) that fit in it, flattened."""
    k_max = NGRAMS[1]
    return np.concatenate((h[: n - k_max + 1].ravel(), h[n - k_max + 1 : n][_TAIL]))


def hashed_ngrams(s: str, bits: int = BITS, headers: bool = False) -> np.ndarray:
    """The bucket (0 .. 2**bits-1) of every byte n-gram (NGRAMS) of the UTF-8 text, as int64, in no
    particular order. `headers`: the text is a header section (other salts). See `block_keys`;
    training and prediction both use this function.
    """
    raw = s.encode("utf-8", "surrogatepass")
    if headers:
        return (block_keys(b"", raw, bits) & np.uint64((1 << bits) - 1)).astype(np.int64)
    return block_keys(raw, b"", bits).astype(np.int64)


def _matrix_ok(lr: int, n: int) -> bool:
    """Both parts of a text of n bytes (request lr, headers n - lr) empty or at least K bytes long."""
    k_max = NGRAMS[1]
    return 0 < n < _SHORT and NGRAMS[0] == 1 and (lr == 0 or lr >= k_max) and (n == lr or n - lr >= k_max)


def block_keys(br: bytes, bh: bytes, bits: int = BITS, matrix: bool = True) -> np.ndarray:
    """The buckets of the n-grams of a request (bytes br) and of its header section (bh, header salts,
    bucket + 2**bits as a flag), as uint64 in no particular order; n-grams across the seam left out.

    Vectorised with numpy, no Python loop over characters, one hashing pass over both: short texts
    (most requests) as one product of the byte windows with a matrix of powers of P (`matrix`),
    longer ones with one pass per n-gram length. Both give the same keys (a test checks).
    """
    b = np.frombuffer(br + bh, dtype=np.uint8).astype(np.uint64)
    n, lr = len(b), len(br)
    k_max = NGRAMS[1]
    shift = np.uint64(64 - bits)
    flag = np.uint64(1 << bits)
    if matrix and _matrix_ok(lr, n):
        padded = np.zeros(n + k_max - 1, dtype=np.uint64)
        padded[:n] = b
        h = _window_hashes(padded, n)
        h[:lr] += _SALTS
        h[lr:] += _SALTS_HEADERS
        h *= _MIX
        h >>= shift
        parts = [_valid(h[:lr], lr)] if lr else []
        if n > lr:
            hh = _valid(h[lr:], n - lr)
            hh |= flag
            parts.append(hh)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    h = np.zeros(n, dtype=np.uint64)
    keys = []
    for k in range(1, k_max + 1):
        if n < k:
            break
        h = h[: n - k + 1] * _P + b[k - 1 :]
        if k >= NGRAMS[0]:
            if lr >= k:
                keys.append(((h[: lr - k + 1] + _SALT[k]) * _MIX) >> shift)
            if n - lr >= k:
                keys.append((((h[lr:] + _SALT_HEADERS[k]) * _MIX) >> shift) | flag)
    return np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)


def term_counts(s: str, bits: int = BITS, headers: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct buckets, their counts) of one feature string (or of its header section).

    What np.unique(return_counts=True) returns, in fewer numpy calls (it is on the request path).
    """
    srt = np.sort(hashed_ngrams(s, bits, headers))
    if not len(srt):
        return srt, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], srt[1:] != srt[:-1])))
    counts = np.diff(np.append(starts, len(srt)))
    return srt[starts], counts


def split_headers(feature: str) -> tuple[str, str]:
    """(the request: method, path, query, body and markers; its header section, "" if none).

    The supervised part weighs the two apart (each l2-normalised on its own), so a long User-Agent
    cannot dilute a short query, and a missing one cannot concentrate it.
    """
    i = feature.find(_HSEC)
    if i < 0:
        return feature, ""
    j = feature.find(SEP, i + 1)
    if j < 0:
        return feature[:i].rstrip(" "), feature[i:]
    return feature[:i] + feature[j:], feature[i:j].rstrip(" ")


_EMPTY = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


def segment_terms(feature: str, bits: int = BITS, header_block: bool = True):
    """The two segments `Detector.supervised_proba` weighs apart, as `term_counts` pairs: (request,
    header section with the header salts), or (the whole string, nothing) without `header_block`.
    The training side (`tfidf_matrix`, retraining's rows) builds its rows from this."""
    if not header_block:
        return term_counts(feature, bits), _EMPTY
    req, hdr = split_headers(feature)
    return term_counts(req, bits), (term_counts(hdr, bits, True) if hdr else _EMPTY)


# ---- the feature string, taken apart again ------------------------------------------------------


def parse(feature: str) -> tuple[str, str, list[tuple[str, str | None]]]:
    """`get /p ?a=1 b=x y ‖h ... ‖b c=2` -> ("get", "/p", [("a", "1"), ("b", "x y"), ("c", "2")]).

    Pairs come from the query and from a body section; a body that is not `name=value` pairs gives
    one pair named "" (its text). Values keep their spaces: a token without "=" continues the value.
    """
    head, *sections = feature.split(SEP)
    method, _, rest = head.partition(" ")
    path, sep, query = rest.partition(" ?")
    path = path.strip()
    pairs = _pairs(query) if sep else []
    for sec in sections:
        if sec.startswith("b "):
            body = sec[2:].strip()
            if "=" in body.split(" ", 1)[0]:
                pairs.extend(_pairs(body))
            elif body:
                pairs.append(("", body))
    return method, path, pairs


def parse_path(feature: str) -> str:
    """The path `parse` returns, without taking the rest apart."""
    i = feature.find(SEP)
    head = feature if i < 0 else feature[:i]
    return head.partition(" ")[2].partition(" ?")[0].strip()


def _pairs(text: str) -> list[tuple[str, str | None]]:
    out: list[list] = []
    for tok in text.strip().split(" "):
        if not tok:
            continue
        if "=" in tok:
            name, _, value = tok.partition("=")
            out.append([name, value])
        elif out and out[-1][1] is not None:
            out[-1][1] += " " + tok
        else:
            out.append([tok, None])
    return [(n, v) for n, v in out]


_DIGIT = re.compile(r"\d")


_ALNUM = re.compile(r"[^\W_]+")  # letters and digits (Unicode)
_LETTER = re.compile(r"[^\W\d_]")


# ASCII letters -> 'a', digits -> '0': char_classes of an ASCII value in one pass.
_ASCII_CLASSES = str.maketrans({**dict.fromkeys(string.ascii_letters, "a"), **dict.fromkeys(string.digits, "0")})


def char_classes(value: str) -> frozenset[str]:
    """Letters -> 'a', digits -> '0', everything else (space, punctuation) stays itself."""
    if value.isascii():  # the common case: same result, faster
        return frozenset(value.translate(_ASCII_CLASSES))
    out = set(_ALNUM.sub("", value))
    if _LETTER.search(value):
        out.add("a")
    if _DIGIT.search(value):
        out.add("0")
    return frozenset(out)


_LETTERS = re.compile(r"[^\W\d_]+")
_DIGITS = re.compile(r"\d+")


def shape(value: str) -> str:
    """`ab12@x-y.com` -> `a0@a-a.a`: character classes with runs collapsed."""
    return _DIGITS.sub("0", _LETTERS.sub("a", value))


def _root(path: str) -> str:
    seg = path.lstrip("/").split("/", 1)[0]
    return "/" + seg


class AppProfile:
    """What one application's benign traffic looks like, per path: methods, parameter names, values.

    `check(feature)` returns None (no opinion: the path is under no learned root) or a list of
    anomalies (empty: the request conforms).
    """

    def __init__(self, min_root: int = 50, length_slack: float = 1.5, max_enum: int = 16, min_enum_seen: int = 100,
                 max_shapes: int = 64) -> None:
        self.min_root = min_root
        self.length_slack = length_slack
        self.max_enum = max_enum
        self.min_enum_seen = min_enum_seen
        self.max_shapes = max_shapes
        self.roots: tuple[str, ...] = ()  # sorted, so the pickle is the same in every process
        self.paths: dict[str, dict] = {}
        self.n_requests = 0

    def fit(self, features: Iterable[str]) -> AppProfile:
        per_root: Counter = Counter()
        paths: dict[str, dict] = {}
        for f in features:
            method, path, pairs = parse(f)
            per_root[_root(path)] += 1
            p = paths.setdefault(path, {"methods": set(), "params": {}})
            p["methods"].add(method)
            for name, value in pairs:
                prm = p["params"].setdefault(
                    name, {"classes": set(), "max_len": 0, "min_len": 1 << 30, "valued": False, "bare": False,
                           "n": 0, "values": set(), "shapes": set()})
                if value is None:
                    prm["bare"] = True
                    continue
                prm["valued"] = True
                prm["n"] += 1
                prm["classes"] |= char_classes(value)
                prm["max_len"] = max(prm["max_len"], len(value))
                prm["min_len"] = min(prm["min_len"], len(value))
                if len(prm["values"]) <= self.max_enum:
                    prm["values"].add(value)
                if len(prm["shapes"]) <= self.max_shapes:
                    prm["shapes"].add(shape(value))
            self.n_requests += 1
        self.roots = tuple(sorted(r for r, n in per_root.items() if n >= self.min_root and r != "/"))
        self.paths = {
            path: {
                "methods": sorted(p["methods"]),
                "params": {
                    name: {
                        "classes": "".join(sorted(prm["classes"])),
                        "max_len": prm["max_len"],
                        "min_len": prm["min_len"] if prm["valued"] else 0,
                        "valued": prm["valued"],
                        "bare": prm["bare"],
                        # A closed set of values (seen often, few distinct): anything else is an anomaly.
                        "values": (tuple(sorted(prm["values"]))
                                   if len(prm["values"]) <= self.max_enum and prm["n"] >= self.min_enum_seen else None),
                        # Value shapes (runs of letters/digits collapsed): checked unless too varied.
                        "shapes": tuple(sorted(prm["shapes"])) if len(prm["shapes"]) <= self.max_shapes else None,
                    }
                    for name, prm in sorted(p["params"].items())
                },
            }
            for path, p in sorted(paths.items())
            if _root(path) in self.roots
        }
        return self

    def check(self, feature: str) -> list[str] | None:
        if not self.in_scope(parse_path(feature)):  # most requests: out of scope, nothing more to parse
            return None
        method, path, pairs = parse(feature)
        compiled = self.__dict__.get("_compiled")
        if compiled is None or compiled[0] is not self.paths:
            compiled = self._compiled = (self.paths, {})
        p = compiled[1].get(path)
        if p is None:
            learned = self.paths.get(path)
            if learned is None:
                return ["unknown path"]
            p = compiled[1][path] = self._compile(learned)
        methods, params = p
        problems = []
        if method not in methods:
            problems.append(f"method {method} never seen on this path")
        for name, value in pairs:
            prm = params.get(name)
            if prm is None:
                problems.append("unknown parameter")
                continue
            allowed, max_len, min_len, valued, bare, values, shapes = prm
            if value is None:
                if not bare:
                    problems.append("parameter without value")
                continue
            if not valued:
                problems.append("value on a bare parameter")
                continue
            if not char_classes(value) <= allowed:
                problems.append("unseen characters in a value")
            if len(value) > max_len:
                problems.append("value longer than ever seen")
            if len(value) < min_len:
                problems.append("value shorter than ever seen")
            if values is not None and value not in values:
                problems.append("value outside the closed set seen")
            elif shapes is not None and shape(value) not in shapes:
                problems.append("value shape never seen")
        return problems

    def _compile(self, learned: dict) -> tuple:
        """One learned path as `check` reads it: (methods, {name: (class set, longest allowed, shortest,
        valued, bare, closed set or None, shapes or None)}), sets for the lookups."""
        params = {}
        for name, prm in learned["params"].items():
            values, shapes = prm.get("values"), prm.get("shapes")
            params[name] = (
                frozenset(prm["classes"]),  # single characters (char_classes): the learned string as a set
                max(prm["max_len"] * self.length_slack, prm["max_len"] + 8),
                prm.get("min_len", 0),
                prm["valued"],
                prm["bare"],
                None if values is None else frozenset(values),
                None if shapes is None else frozenset(shapes),
            )
        return frozenset(learned["methods"]), params

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_compiled", None)  # derived from paths: rebuilt on first use, never pickled
        return state

    def in_scope(self, path: str) -> bool:
        """Under a learned root: `/tienda1/...`, and also `/tienda1.bak`, `/tienda1~` (same prefix)."""
        return path.startswith(self.roots)  # a learned root itself, or a path under (or beside) one

    def summary(self) -> dict:
        return {
            "requests": self.n_requests,
            "roots": list(self.roots),
            "paths": len(self.paths),
            "parameters": sum(len(p["params"]) for p in self.paths.values()),
        }


class Detector:
    """Supervised hashed-n-gram model plus an optional app profile; `predict_proba` like scikit-learn."""

    classes_ = np.array([0, 1])
    # True: the header section and the rest are l2-normalised apart (and headers hash with their own
    # salts). Models pickled before that load with the class default, False: one block, as trained.
    header_block = False
    header_scale = 1.0

    def __init__(self, idf: np.ndarray, coef: np.ndarray, intercept: float, bits: int = BITS,
                 profile: AppProfile | None = None, violation_p: float = 0.99) -> None:
        self.bits = bits
        self.idf = np.asarray(idf, dtype=np.float32)  # 0 for buckets ignored (too rare in training)
        self.coef = np.asarray(coef, dtype=np.float32)
        self.intercept = float(intercept)
        self.profile = profile
        self.violation_p = float(violation_p)
        self.header_block = True
        self.header_scale = HEADER_SCALE

    def _block(self, text: str, headers: bool) -> float:
        idx, counts = term_counts(text, self.bits, headers)
        v = (1.0 + np.log(counts)) * self.idf[idx]
        sq = float(v @ v)
        return float(v @ self.coef[idx]) / math.sqrt(sq) if sq > 0.0 else 0.0

    def _two_blocks(self, req: str, hdr: str) -> float:
        """`_block(req) + header_scale * _block(hdr)` in one hashing pass (it is on the request path).

        The two texts are hashed as one byte array; n-grams across the seam are left out, and a
        header n-gram's bucket carries a flag bit so that one sort counts both blocks apart.
        """
        flag = np.uint64(1 << self.bits)
        keys = block_keys(req.encode("utf-8", "surrogatepass"), hdr.encode("utf-8", "surrogatepass"), self.bits)
        srt = np.sort(keys)
        starts = np.flatnonzero(np.concatenate(([True], srt[1:] != srt[:-1])))
        counts = np.diff(np.append(starts, len(srt)))
        uniq = srt[starts]
        cut = int(np.searchsorted(uniq, flag))
        idx = (uniq & (flag - np.uint64(1))).astype(np.int64)
        v = (1.0 + np.log(counts)) * self.idf[idx]
        w = self.coef[idx]
        z = 0.0
        vr, vh = v[:cut], v[cut:]
        sq = float(vr @ vr)
        if sq > 0.0:
            z += float(vr @ w[:cut]) / math.sqrt(sq)
        sq = float(vh @ vh)
        if sq > 0.0:
            z += self.header_scale * float(vh @ w[cut:]) / math.sqrt(sq)
        return z

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_pairs", None)  # derived from idf and coef: rebuilt on first use, never pickled
        return state

    def _weights(self) -> np.ndarray:
        """idf and coef side by side, (2**bits, 2) float32: the C kernel reads both of a bucket from one
        cache line. Built once per (idf, coef) pair."""
        pairs = self.__dict__.get("_pairs")
        if pairs is None or pairs[0] is not self.idf or pairs[1] is not self.coef:
            both = huge_page_aligned(np.column_stack((self.idf, self.coef)).astype(np.float32))
            pairs = self._pairs = (self.idf, self.coef, both)
        return pairs[2]

    def logit_numpy(self, req: str, hdr: str) -> float:
        """The supervised logit without the intercept, with numpy: the reference for the C kernel
        (`addons._fastscore`), used when it is not built."""
        return self._two_blocks(req, hdr) if hdr else self._block(req, False)

    def supervised_proba(self, feature: str) -> float:
        """Sublinear-tf TF-IDF of the hashed n-grams, dotted with the weights: the request and its
        header section each l2-normalised on their own (`header_block`), or as one block."""
        if _fastscore is not None:  # the whole of it in one call; None for a string with a lone surrogate
            p = _fastscore.proba(feature, self._weights(), self.bits, self.header_scale, self.intercept, self.header_block)
            if p is not None:
                return p
        req, hdr = split_headers(feature) if self.header_block else (feature, "")
        if _fastscore is not None:
            raw, raw_hdr = req.encode("utf-8", "surrogatepass"), hdr.encode("utf-8", "surrogatepass")
            z = self.intercept + _fastscore.z(raw, raw_hdr, self._weights(), self.bits, self.header_scale)
        else:
            z = self.intercept + self.logit_numpy(req, hdr)
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)

    def explain(self, feature: str) -> dict:
        """Both opinions on one feature string (for eval and debugging)."""
        p = self.supervised_proba(feature)
        problems = self.profile.check(feature) if self.profile is not None else None
        return {"supervised": p, "profile": problems}

    def proba_one(self, feature: str) -> float:
        p = self.supervised_proba(feature)
        if self.profile is not None and p < self.violation_p:
            problems = self.profile.check(feature)
            if problems:
                return self.violation_p
        return p

    def predict_proba(self, features: Sequence[str]) -> np.ndarray:
        if len(features) == 1:  # the addon's case: one request, no per-call machinery
            p1 = self.proba_one(features[0])
            return np.array([[1.0 - p1, p1]])
        p = np.fromiter((self.proba_one(f) for f in features), dtype=float, count=len(features))
        return np.column_stack([1.0 - p, p])

    def predict(self, features: Sequence[str]) -> np.ndarray:
        return (self.predict_proba(features)[:, 1] >= 0.5).astype(int)


def tfidf_matrix(features: Sequence[str], bits: int = BITS, min_df: int = 1, idf: np.ndarray | None = None):
    """Training side of `Detector.supervised_proba`: (CSR matrix, idf). idf is fitted unless given.

    Each row is the request's l2-normalised TF-IDF vector plus its header section's (hashed with
    the header salts, normalised on its own, times HEADER_SCALE), as `Detector.supervised_proba`
    computes them.
    idf = ln((1 + n) / (1 + df)) + 1 (scikit-learn's smooth idf); buckets in fewer than `min_df`
    documents get idf 0, so they count for nothing in training and prediction alike. Built in flat
    int32/float64 arrays (no per-row matrices): the training corpus runs to 10**8 non-zeros.
    """
    from scipy import sparse

    n = len(features)
    seg_len = np.zeros(2 * n, dtype=np.int64)  # row k: segment 2k (request), 2k+1 (headers)
    idx_parts: list[np.ndarray] = []
    cnt_parts: list[np.ndarray] = []
    dup_parts: list[np.ndarray] = []  # buckets in both sections of one request (df counts documents)
    buf_i: list[np.ndarray] = []
    buf_c: list[np.ndarray] = []

    def flush() -> None:
        if buf_i:
            idx_parts.append(np.concatenate(buf_i))
            cnt_parts.append(np.concatenate(buf_c))
            buf_i.clear()
            buf_c.clear()

    for k, f in enumerate(features):
        (ri, rc), (hi, hc) = segment_terms(f, bits)
        buf_i.append(ri.astype(np.int32))
        buf_c.append(rc.astype(np.int32))
        seg_len[2 * k] = len(ri)
        if len(hi):
            buf_i.append(hi.astype(np.int32))
            buf_c.append(hc.astype(np.int32))
            seg_len[2 * k + 1] = len(hi)
            if idf is None:
                dup = np.intersect1d(ri, hi, assume_unique=True)
                if len(dup):
                    dup_parts.append(dup)
        if len(buf_i) >= 8192:
            flush()
    flush()
    indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, dtype=np.int32)
    del idx_parts
    data = np.concatenate(cnt_parts).astype(np.float64) if cnt_parts else np.zeros(0)
    del cnt_parts
    if idf is None:
        df = np.bincount(indices, minlength=1 << bits)
        if dup_parts:
            df -= np.bincount(np.concatenate(dup_parts), minlength=1 << bits)
        idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        idf[df < min_df] = 0.0
    np.log(data, out=data)
    data += 1.0
    data *= idf[indices]
    seg = np.repeat(np.arange(2 * n, dtype=np.int32), seg_len)
    norms = np.sqrt(np.bincount(seg, weights=data * data, minlength=2 * n))
    norms[norms == 0] = 1.0
    scale = np.ones(2 * n)
    scale[1::2] = HEADER_SCALE
    data *= (scale / norms)[seg]
    del seg
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(seg_len.reshape(n, 2).sum(axis=1), out=indptr[1:])
    X = sparse.csr_matrix((data, indices, indptr), shape=(n, 1 << bits))
    X.sum_duplicates()
    X.eliminate_zeros()
    return X, idf
