"""Detection v2's scorer: each field of a request on its own, the request's score the highest. A plain module.

    parse (addons.fields) -> fields -> normalise -> score each field -> decide -> explain

One field (a query value, a header, a JSON string, a path segment ...) is scored like this:

1. **prepare**: normalised (addons.normalise: decoding until stable, case, comments, invisible characters),
   then high-entropy tokens become shape tokens (`shapes`): a UUID, a JWT, a hex hash, a base64 blob or a long
   digit run reads as what it is, so ids and tokens look alike whatever their digits.
2. **windows**: a text longer than WINDOW characters is cut into overlapping windows (stride STRIDE), each
   scored on its own, so no amount of padding around a payload can dilute it.
3. **a linear model** over each window's hashed byte n-grams (1 to 5 bytes), counted twice: once in a block
   shared by all fields, once in a block of the field's class (`CLASSES`: a User-Agent is not a query
   value), each occurrence worth 1/sqrt(n-grams of the window). Plus a bias per class and two signals from
   libinjection (the SQLi/XSS tokenizer inside ModSecurity), for texts no longer than a window.
4. The request's probability is the highest window's, raised to SIGNAL_P by a request-level signal (a
   scanner's User-Agent) and to `violation_p` by the application profile (`AppProfile`: what one app's own
   traffic looks like, when one was learnt).

Training (scripts/train.py, addons/learn.py) builds the same rows with the same functions (`rows`), so
serving and training cannot drift apart. The model is a `.npz` of plain arrays (no pickle: loading it never
runs code).
"""

from __future__ import annotations

import json
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from addons import fields as fieldsmod
from addons import normalise as normalisemod

try:
    import libinjection
except ImportError:  # pragma: no cover - a dependency; without it the two signals stay 0
    libinjection = None

try:  # window_logits' n-gram sums in C (setup.py builds it where a compiler is present; the same sums)
    from addons import _fastscore
except ImportError:  # pragma: no cover - depends on the install
    _fastscore = None

FORMAT = "openflare-field-model/1"
WINDOW = 128
STRIDE = 64
SHORT = 32  # a text longer than WINDOW is also read in short windows: a payload after 100 characters of words
SHORT_STRIDE = 16  # in one window is diluted there, not in a window of its own size
NGRAMS = (1, 5)
BITS = 20
CLASS_SCALE = 0.5  # the class block's n-grams count half: a class block weight pays 4x the penalty
CLASSES = ("method", "path", "query", "json", "cookie", "header", "ua", "name", "text", "xml")
EXTRA = len(CLASSES) + 2  # class biases, libinjection sqli, libinjection xss
NO_PAYLOAD = -20.0  # the logit of a field with no room for a payload (a well-formed Host)
SIGNAL_P = 0.999  # a scanner's User-Agent: refused whatever its fields score
_LOC_CLASS = {"method": "method", "path": "path", "query": "query", "form": "query", "json": "json",
              "cookie": "cookie", "header": "header", "xml": "xml", "multipart": "text", "text": "text"}
_PLUS = frozenset(("query", "form"))  # `+` is a space there

_P = np.uint64(0x100000001B3)  # FNV prime: the rolling polynomial hash of an n-gram's bytes
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top `bits` bits of h * MIX
_SALT = [np.uint64((k * 0x2545F4914F6CDD1D) % (1 << 64)) for k in range(NGRAMS[1] + 1)]
_CLASS_SALT = [np.uint64(((c + 1) * 0x9FB21C651E98DF25) % (1 << 64)) for c in range(len(CLASSES))]

# Shape tokens. Control characters never survive normalisation, so request text cannot forge them.
_SHAPES = (
    (re.compile(r"eyj[a-z0-9_-]{8,}\.[a-z0-9_-]{8,}\.[a-z0-9_-]*"), "\x01j"),  # JWT (lower-cased)
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "\x01u"),  # UUID
    (re.compile(r"(?<![a-z0-9])[0-9a-f]{16,}(?![a-z0-9])"), "\x01h"),  # hex hash or id
    (re.compile(r"(?<![a-z0-9+/_-])(?=[a-z0-9+/_-]*[0-9][a-z0-9+/_-]*[0-9])(?=[a-z0-9+/_-]*[a-z][a-z0-9+/_-]*[a-z])"
                r"[a-z0-9+/_-]{20,}={0,2}"), "\x01b"),  # base64-ish blob: long, letters and digits mixed
    (re.compile(r"[0-9]{5,}"), "\x01d"),  # long digit run: timestamps, ids
)


def normalise(value: str, plus: bool = False) -> str:
    """The canonical form of one field's text (addons/normalise.py)."""
    return normalisemod.normalise(value, plus)


_CLASS_OF = {loc: CLASSES.index(c) for loc, c in _LOC_CLASS.items()}
_NAME_CLASS, _UA_CLASS, _TEXT_CLASS = CLASSES.index("name"), CLASSES.index("ua"), CLASSES.index("text")


def field_class(f: fieldsmod.Field) -> int:
    """The index in CLASSES of the block a field's n-grams also count in."""
    if f.via == "name":
        return _NAME_CLASS
    if f.loc == "header" and f.name == "user-agent":
        return _UA_CLASS
    return _CLASS_OF.get(f.loc, _TEXT_CLASS)


_DIGIT = re.compile(r"[0-9]")


def shapes(text: str) -> str:
    """Abstract ids and tokens into shape tokens (see _SHAPES). Every shape but the JWT holds a digit
    (a hex id of letters only, `deadbeefcafebabe`, stays text): a text without one skips those patterns."""
    if not _DIGIT.search(text):
        return _SHAPES[0][0].sub(_SHAPES[0][1], text) if "eyj" in text else text
    for rx, token in _SHAPES:
        text = rx.sub(token, text)
    return text


_REPEAT = re.compile(r"(.{1,3}?)\1{4,}", re.S)  # a unit of 1-3 characters repeated 5 times or more


def collapse(text: str) -> str:
    """Runs of a repeated unit cut to four repeats: `zzzz...z` padding cannot dilute the n-grams beside it."""
    return _REPEAT.sub(r"\1\1\1\1", text)


def prepare(f: fieldsmod.Field) -> tuple[str, str]:
    """(normalised text, what the n-grams read) of one field."""
    norm = normalise(f.value, plus=f.loc in _PLUS)
    return norm, shapes(collapse(norm))


def _cut(text: str, size: int, stride: int) -> list[str]:
    starts = list(range(0, len(text) - size, stride)) + [len(text) - size]
    return [("\x02" if s == 0 else "") + text[s : s + size] + ("\x03" if s + size == len(text) else "") for s in starts]


def windows(text: str) -> tuple[list[str], int]:
    """(windows, how many are long): the text itself if short, else overlapping windows of WINDOW characters
    (stride STRIDE) and then of SHORT characters (stride SHORT_STRIDE), the last of each flush with the end.
    A window at the start or end of the text carries a marker there (\\x02, \\x03)."""
    if len(text) <= WINDOW:
        return ["\x02" + text + "\x03"], 1
    long = _cut(text, WINDOW, STRIDE)
    return long + _cut(text, SHORT, SHORT_STRIDE), len(long)


def ngram_keys(texts: Sequence[str], classes: Sequence[int], bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hashed n-grams of many windows at once: (row, column, value) triples, one per n-gram
    occurrence and block, rows in order. Columns < 2**bits: the shared block; 2**bits and up: the class
    block. Values: 1/sqrt(the window's n-grams), times CLASS_SCALE in the class block.

    All windows' bytes are hashed in one vectorised pass; an n-gram across two windows is left out.
    """
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    b = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64)
    n = len(b)
    row_of = np.repeat(np.arange(len(encoded)), lengths)
    end_of = np.repeat(np.cumsum(lengths), lengths)  # one past the last byte of each byte's window
    cls_salt = np.array([_CLASS_SALT[c] for c in classes], dtype=np.uint64)[row_of] if n else np.zeros(0, np.uint64)
    shift = np.uint64(64 - bits)
    h = np.zeros(n, dtype=np.uint64)
    rows, cols = [], []
    for k in range(1, NGRAMS[1] + 1):
        if n < k:
            break
        h = h[: n - k + 1] * _P + b[k - 1 :]
        ok = np.arange(n - k + 1) + k <= end_of[: n - k + 1]
        hk = h[ok] + _SALT[k]
        r = row_of[: n - k + 1][ok]
        rows += [r, r]
        cols += [(hk * _MIX) >> shift, (((hk + cls_salt[: n - k + 1][ok]) * _MIX) >> shift) + np.uint64(1 << bits)]
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    row = np.concatenate(rows)
    col = np.concatenate(cols).astype(np.int64)
    per_row = np.bincount(row, minlength=len(encoded)) / 2  # n-grams per window (each counted in both blocks)
    val = (1.0 / np.sqrt(np.maximum(per_row, 1)))[row].astype(np.float32)
    val[col >= (1 << bits)] *= CLASS_SCALE
    order = np.argsort(row, kind="stable")
    return row[order], col[order], val[order]


def ngram_sums(texts: Sequence[str], classes: Sequence[int], weights: np.ndarray, bits: int) -> np.ndarray:
    """Per window, the sum of weights[column] * value over `ngram_keys`' triples: in C when
    addons._fastscore is built (the same sums, in the same order), else with numpy."""
    if _fastscore is not None and _fastscore.CONSTANTS == (int(_P), int(_MIX)):  # else a stale build
        encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
        salts, class_salts = tuple(int(s) for s in _SALT), tuple(int(s) for s in _CLASS_SALT)
        return np.array(_fastscore.window_sums(encoded, classes, weights, bits, CLASS_SCALE, salts, class_salts))
    row, col, val = ngram_keys(texts, classes, bits)
    return np.bincount(row, weights=weights[col] * val, minlength=len(texts))


_BARE = re.compile(r"[a-z0-9_.]*")  # one bare token: never SQLi or XSS to libinjection (checked on 1.8M values)


_UNSHAPE = re.compile("\x01.|[\x02\x03]", re.S)


def injection(window: str) -> tuple[float, float, str]:
    """libinjection's opinion of one window: (sqli 0/1, xss 0/1, fingerprint or ""); a shape token reads as 0."""
    norm = _UNSHAPE.sub(lambda m: "0" if len(m.group()) == 2 else "", window) if "\x01" in window else window.strip("\x02\x03")
    if libinjection is None or not norm or _BARE.fullmatch(norm):
        return 0.0, 0.0, ""
    sq = libinjection.is_sql_injection(norm)
    if sq["is_sqli"]:
        return 1.0, float(libinjection.is_xss(norm)["is_xss"]), sq["fingerprint"]
    return 0.0, float(libinjection.is_xss(norm)["is_xss"]), ""


# High-precision rules, as a CRS install has them: what no benign field of the shared train splits (4.6 M
# fields) matches, refused whatever the model says. Checked on each field's normalised text.
RULE_P = 0.999
RULES = (  # (name, category, pattern)
    ("ssrf-metadata", "ssrf", r"169\.254\.169\.254|metadata\.google\.internal|100\.100\.100\.200|fd00:ec2::254|a9fe:a9fe"),
    ("ldap-filter", "ldapi", r"\*\s*\)\s*\(\s*[|&!]?\s*\(?\s*[a-z][a-z0-9-]*\s*[=~<>]|\)\s*\(\s*[|&]\s*\(\s*[a-z][a-z0-9-]*\s*="),
    ("sql-stacked", "sqli", r";\s*(drop|truncate|alter)\s+(table|database|schema)\b|;\s*(shutdown|exec(ute)?\s+(master\.)?xp_)"),
    ("sql-union", "sqli", r"\bunion(\s+all|\s+distinct)?\s+select\s+(null\b|\d|[@'\"(*]|[a-z_][\w.]*\s*,)"),
    ("sql-quote-comment", "sqli", r"[a-z0-9]'\s*(--|#|/\*)"),
)
_RULE_ANY = re.compile("|".join(f"(?P<r{i}>{rx})" for i, (_n, _c, rx) in enumerate(RULES)))
RULE_CATEGORY = {name: cat for name, cat, _rx in RULES}


def rule_of(norm: str) -> str:
    """The first RULES entry this normalised text matches, or ""."""
    m = _RULE_ANY.search(norm)
    return RULES[int(m.lastgroup[1:])][0] if m else ""


@dataclass(slots=True)
class Rows:
    """Windows as the model reads them: one per row, with the field each came from."""

    texts: list[str]
    classes: list[int]
    extra: np.ndarray  # (rows, EXTRA) float32: class one-hot, libinjection sqli, xss
    field: list[int]  # index of the field (in the list given to `rows`) of each window
    window: list[int]  # the window's number within its field
    fingerprint: list[str]  # libinjection's SQLi fingerprint of the window, or ""
    rule: list[str]  # the RULES entry the window's field matches, or ""


def rows(fields: Sequence[fieldsmod.Field]) -> Rows:
    """Every window of every field, ready for `ngram_keys`; libinjection reads each long window (a short
    text is one)."""
    texts, classes, field, window, fps, signals, rules = [], [], [], [], [], [], []
    for i, f in enumerate(fields):
        if f.via == fieldsmod.AUTHORITY:  # a well-formed Host: the rules read it, the model does not
            continue
        c = field_class(f)
        norm, text = prepare(f)
        ws, n_long = windows(text)
        rules += [rule_of(norm)] * len(ws)
        texts += ws
        classes += [c] * len(ws)
        field += [i] * len(ws)
        window += range(1, len(ws) + 1)
        for w in ws[:n_long]:
            sq, xs, fp = injection(w)
            signals.append((sq, xs))
            fps.append(fp)
        signals += [(0.0, 0.0)] * (len(ws) - n_long)
        fps += [""] * (len(ws) - n_long)
    n = len(texts)
    extra = np.zeros((n, EXTRA), dtype=np.float32)
    extra[np.arange(n), classes] = 1.0
    extra[:, -2:] = np.array(signals, dtype=np.float32).reshape(-1, 2)
    return Rows(texts, classes, extra, field, window, fps, rules)


@dataclass(frozen=True, slots=True)
class Hit:
    """What decided a request's probability: the field and window, or a request-level signal."""

    p: float
    field: fieldsmod.Field | None = None
    window: int = 0
    fingerprint: str = ""  # libinjection's SQLi fingerprint of the field
    xss: bool = False
    signal: str = ""


def _sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))


class FieldModel:
    """The trained weights and how they are applied. See the module docstring."""

    def __init__(self, weights: np.ndarray, extra: np.ndarray, intercept: float, bits: int = BITS,
                 profile: AppProfile | None = None, violation_p: float = 0.9, cache_size: int = 65536) -> None:
        if weights.shape != (2 << bits,) or extra.shape != (EXTRA,):
            raise ValueError(f"weights of shape {weights.shape}, extra {extra.shape}: not a {bits}-bit field model")
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        self.extra = np.asarray(extra, dtype=np.float32)
        self.intercept = float(intercept)
        self.bits = bits
        self.profile = profile
        self.violation_p = float(violation_p)
        self.cache_size = cache_size
        self._cache: dict[tuple[int, str], tuple[float, int, str, bool]] = {}

    def window_logits(self, r: Rows) -> np.ndarray:
        return ngram_sums(r.texts, r.classes, self.weights, self.bits) + r.extra @ self.extra + self.intercept

    def field_logits(self, flds: Sequence[fieldsmod.Field]) -> list[tuple[float, int, str, bool, str]]:
        """Per field: (highest window logit, that window's number, libinjection fingerprint, xss, rule).

        Fields seen before (a browser's headers, common parameters) come from a bounded cache."""
        out: list = [None] * len(flds)
        todo, keys = [], []
        for i, f in enumerate(flds):
            if f.via == fieldsmod.AUTHORITY:  # no windows (see rows): no payload fits, only a rule can match
                out[i] = (NO_PAYLOAD, 1, "", False, rule_of(normalise(f.value)))
                continue
            key = (field_class(f), f.value)
            hit = self._cache.get(key)
            if hit is None:
                todo.append(f)
                keys.append((i, key))
            else:
                out[i] = hit
        if todo:
            r = rows(todo)
            z = self.window_logits(r)
            best: dict[int, tuple[float, int, str, bool, str]] = {}
            for zi, fi, wi, fp, ex, ru in zip(z.tolist(), r.field, r.window, r.fingerprint, r.extra[:, -1].tolist(), r.rule):
                if fi not in best or zi > best[fi][0]:
                    best[fi] = (zi, wi, fp, ex > 0, ru)
            if len(self._cache) + len(todo) > self.cache_size:
                self._cache.clear()
            for j, (i, key) in enumerate(keys):
                out[i] = self._cache[key] = best[j]
        return out

    def score(self, req: fieldsmod.Request) -> Hit:
        """The request's attack probability and what decided it."""
        best = Hit(0.0)
        if req.fields:
            logits = self.field_logits(req.fields)
            i = max(range(len(logits)), key=lambda k: logits[k][0])
            z, w, fp, xss, _rule = logits[i]
            best = Hit(_sigmoid(z), req.fields[i], w, fp, xss)
            if best.p < RULE_P:
                ruled = next((k for k, lg in enumerate(logits) if lg[4]), None)
                if ruled is not None:
                    best = Hit(RULE_P, req.fields[ruled], 1, signal="rule: " + logits[ruled][4])
        for s in req.signals:
            if s.startswith("scanner-ua:") and best.p < SIGNAL_P:
                best = Hit(SIGNAL_P, signal=s)
        if self.profile is not None and best.p < self.violation_p:
            problems = self.profile.check(req.fields)
            if problems:
                best = Hit(self.violation_p, signal="profile: " + problems[0])
        return best

    def save(self, path) -> None:
        """An .npz of plain arrays, byte for byte the same for the same model (fixed zip timestamps)."""
        profile = json.dumps(self.profile.to_json() if self.profile else None, sort_keys=True)
        arrays = {"format": np.array(FORMAT), "weights": self.weights, "extra": self.extra,
                  "intercept": np.array(self.intercept), "bits": np.array(self.bits),
                  "violation_p": np.array(self.violation_p), "profile": np.array(profile)}
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)

    @classmethod
    def load(cls, path) -> FieldModel:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != FORMAT:
                raise ValueError(f"format {str(z['format'])!r}, but this OpenFlare reads {FORMAT!r}: retrain it (make train)")
            profile = json.loads(str(z["profile"]))
            return cls(z["weights"], z["extra"], float(z["intercept"]), int(z["bits"]),
                       AppProfile.from_json(profile) if profile else None, float(z["violation_p"]))


# The application profile: positive security for one application's own paths.

_CLASS_RX = ((re.compile(r"[a-z]"), "a"), (re.compile(r"[A-Z]"), "A"), (re.compile(r"[0-9]"), "9"))


def char_classes(value: str) -> frozenset[str]:
    """The characters of a value, letters and digits folded into a/A/9 (a value's alphabet)."""
    out = set(value)
    for rx, c in _CLASS_RX:
        if rx.search(value):
            out = {ch for ch in out if not rx.fullmatch(ch)} | {c}
    return frozenset(out)


_SHAPE_RX = re.compile(r"[A-Za-z]+|[0-9]+")


def shape(value: str) -> str:
    return _SHAPE_RX.sub(lambda m: "a" if m.group()[0].isalpha() else "9", value)


def request_outline(flds: Iterable[fieldsmod.Field]) -> tuple[str, str, list[tuple[str, str | None]]]:
    """(method, path, [(parameter name, value or None)]) of a request's fields, as the profile reads it:
    query and form parameters, values percent-decoded (normalise) but never shape-abstracted."""
    method, segs, pairs = "", [], []
    for f in flds:
        if f.via:
            continue
        if f.loc == "method":
            method = f.value
        elif f.loc == "path" and f.name != "path":  # the segments; the whole-path field would repeat them
            segs.append(f.value)
        elif f.loc in _PLUS:
            pairs.append((f.name, normalise(f.value, plus=True) if f.name else None))
    return method, "/" + "/".join(normalise(s) for s in segs), pairs


def _path_of(flds: Iterable[fieldsmod.Field]) -> str:
    """The path as request_outline reads it (its segments, normalised)."""
    return "/" + "/".join(normalise(f.value) for f in flds if f.loc == "path" and f.name != "path" and not f.via)


def _root(path: str) -> str:
    return "/" + path.split("/")[1] if path.count("/") >= 1 else path


class AppProfile:
    """What one application's benign traffic looks like, per path: methods, parameter names, values.

    `check(fields)` returns None (no opinion: the path is under no learned root) or a list of anomalies
    (empty: the request conforms): unknown path or parameter, a method, characters, length or shape of
    value never seen there.
    """

    def __init__(self, min_root: int = 50, length_slack: float = 1.5, max_shapes: int = 64) -> None:
        self.min_root = min_root
        self.length_slack = length_slack
        self.max_shapes = max_shapes
        self.roots: tuple[str, ...] = ()
        self.paths: dict[str, dict] = {}

    def fit(self, requests: Iterable[Sequence[fieldsmod.Field]]) -> AppProfile:
        per_root: Counter = Counter()
        paths: dict[str, dict] = {}
        for flds in requests:
            method, path, pairs = request_outline(flds)
            per_root[_root(path)] += 1
            p = paths.setdefault(path, {"methods": set(), "params": {}})
            p["methods"].add(method)
            for name, value in pairs:
                prm = p["params"].setdefault(name, {"classes": set(), "max_len": 0, "shapes": set()})
                if value is None:
                    continue
                prm["classes"] |= char_classes(value)
                prm["max_len"] = max(prm["max_len"], len(value))
                if len(prm["shapes"]) <= self.max_shapes:
                    prm["shapes"].add(shape(value))
        self.roots = tuple(sorted(r for r, n in per_root.items() if n >= self.min_root and r != "/"))
        self.paths = {
            path: {"methods": sorted(p["methods"]),
                   "params": {name: {"classes": "".join(sorted(prm["classes"])), "max_len": prm["max_len"],
                                     "shapes": sorted(prm["shapes"]) if len(prm["shapes"]) <= self.max_shapes else None}
                              for name, prm in sorted(p["params"].items())}}
            for path, p in sorted(paths.items()) if _root(path) in self.roots
        }
        return self

    def check(self, flds: Sequence[fieldsmod.Field]) -> list[str] | None:
        if not self.roots or not _path_of(flds).startswith(self.roots):
            return None  # most requests: no learned root, no opinion (and no parameter decoded)
        method, path, pairs = request_outline(flds)
        learned = self.paths.get(path)
        if learned is None:
            return ["unknown path"]
        problems = []
        if method not in learned["methods"]:
            problems.append(f"method {method} never seen on this path")
        for name, value in pairs:
            prm = learned["params"].get(name)
            if prm is None:
                problems.append("unknown parameter")
            elif value is not None:
                if not char_classes(value) <= set(prm["classes"]):
                    problems.append("unseen characters in a value")
                if len(value) > max(prm["max_len"] * self.length_slack, prm["max_len"] + 8):
                    problems.append("value longer than ever seen")
                if prm["shapes"] is not None and shape(value) not in prm["shapes"]:
                    problems.append("value shape never seen")
        return problems

    def to_json(self) -> dict:
        return {"min_root": self.min_root, "length_slack": self.length_slack, "max_shapes": self.max_shapes,
                "roots": list(self.roots), "paths": self.paths}

    @classmethod
    def from_json(cls, d: dict) -> AppProfile:
        p = cls(d["min_root"], d["length_slack"], d["max_shapes"])
        p.roots, p.paths = tuple(d["roots"]), d["paths"]
        return p


# Explaining a verdict: which field decided, and what in it (for the flow comment, the records, the LLM).

_CATEGORY_RX = (  # checked in order on the deciding field's normalised text
    ("jndi", re.compile(r"\$\{[^}]*(jndi|lower:|upper:|::-|env:)")),
    ("ssti", re.compile(r"\{\{.*\}\}|\{%.*%\}|\$\{[^}]*[*(][^}]*\}|<%=|#\{[^}]*\}|__class__|__globals__")),
    ("xss", re.compile(r"<\s*/?\s*(script|svg|img|iframe|body|object|embed|a|math|details|video|audio|style|input|form)\b"
                       r"|\bon[a-z]{3,}\s*=|javascript\s*:|vbscript\s*:|\balert\s*\(|document\.(cookie|domain)")),
    ("xxe", re.compile(r"<!(doctype|entity)\b")),
    ("ssrf", re.compile(r"169\.254\.169\.254|metadata\.google|\b(gopher|dict|file)://|//(127\.0\.0\.1|localhost|0x7f|\[::)")),
    ("path_traversal", re.compile(r"\.\.[/\\]|/etc/(passwd|shadow|hosts)|win\.ini|boot\.ini|/proc/self")),
    ("cmdi", re.compile(r"(^|[;&|`\n]|\$\()\s*(id|cat|ls|wget|curl|nc|bash|sh|ping|whoami|uname|echo|rm|powershell)\b")),
    ("sqli", re.compile(r"\b(union\b.*\bselect|select\b.*\bfrom|insert\s+into|drop\s+table|sleep\s*\(|benchmark\s*\(|waitfor\s+delay"
                        r"|or\s+\S+\s*=\s*\S+|and\s+\S+\s*=\s*\S+|order\s+by\s+\d)|'\s*(or|and)\b|--\s*$|#\s*$")),
)


def signal_of(hit: Hit) -> str:
    """What in the deciding field made its score: a request-level signal, libinjection, or the n-grams."""
    if hit.signal:
        return hit.signal
    if hit.fingerprint:
        return f"sqli (libinjection {hit.fingerprint})"
    if hit.xss:
        return "xss (libinjection)"
    return "learnt n-grams"


def category_of(hit: Hit) -> str | None:
    """The attack category the deciding field looks like (sqli, xss, ...), or None when nothing says."""
    if hit.signal.startswith("scanner-ua:"):
        return "scanner"
    if hit.signal.startswith("rule: "):
        return RULE_CATEGORY.get(hit.signal[6:])
    if hit.fingerprint:
        return "sqli"
    if hit.xss:
        return "xss"
    if hit.field is None:
        return None
    text = normalise(hit.field.value, plus=hit.field.loc in _PLUS)
    return next((cat for cat, rx in _CATEGORY_RX if rx.search(text)), None)


def _quoted(text: str, limit: int = 60) -> str:
    """Printable ASCII, capped: safe for a flow comment and a log line (request text is untrusted)."""
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in text[:limit])
    return json.dumps(clean + ("..." if len(text) > limit else ""))


def explain(hit: Hit, score: int) -> str:
    """One line: the deciding field, what in it decided, its window and the score.

    `query "id": sqli (libinjection s&sos), window 1, score 9`; `request: scanner-ua:sqlmap, score 10`.
    """
    if hit.field is None:
        return f"request: {signal_of(hit)}, score {score}"
    f = hit.field
    where = f"{f.loc}{' ' + f.via if f.via else ''} {_quoted(f.name, 40)}"
    return f"{where}: {signal_of(hit)}, window {hit.window}, score {score}"


def describe(req: fieldsmod.Request, hit: Hit | None = None, limit: int = 4000) -> str:
    """The request as `location name: value` lines of normalised text, the deciding field first: what the
    LLM reads (every part it may need, in the order that matters, within `limit` characters)."""
    order = list(req.fields)
    if hit is not None and hit.field is not None and hit.field in order:
        order.remove(hit.field)
        order.insert(0, hit.field)
    lines = [f"signal: {s}" for s in req.signals]
    for f in order:
        lines.append(f"{f.loc}{' ' + f.via if f.via else ''} {f.name}: {normalise(f.value, plus=f.loc in _PLUS)}")
    return "\n".join(lines)[:limit]
