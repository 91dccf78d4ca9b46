"""Turn one HTTP request into one normalised feature string.

A plain module (no mitmproxy import): the FeatureExtractor addon, training, evaluation and the
benchmarks all call `featurize`, so serving and training can never drift apart.

Normalisation undoes what attackers use to hide payloads: repeated percent-encoding (bounded), `+`
in forms, `%uXXXX`, HTML entities, unicode compatibility forms (NFKC), case, SQL and HTML comments,
control characters and whitespace runs. Every input is capped first, so a huge request costs no
more than a capped one, and nothing in here raises on any input.
"""

from __future__ import annotations

import functools
import html
import ipaddress
import json
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import unquote_to_bytes

MAX_CHARS = 16 * 1024
DECODE_ROUNDS = 4
MAX_PAIRS = 512  # name=value pairs taken from one query, form body or cookie header
DEFAULT_HEADERS = ("user-agent", "referer", "cookie", "x-forwarded-for", "origin")

# Sections of the feature string. An attacker can type these too; they only help the model align.
SEP = "\u2016"  # DOUBLE VERTICAL LINE: `normalise` removes it from request text, so only sections carry it

_PCT_U = re.compile(r"%u([0-9a-fA-F]{4})")
_BACKSLASH_U = re.compile(r"\\u([0-9a-fA-F]{4})")  # JavaScript/JSON escapes outside a parsed JSON body
_PCT = re.compile(r"%[0-9a-fA-F]{2}")
_C_COMMENT = re.compile(r"/\*(!\d*)?(.*?)\*/", re.S)
_HTML_COMMENT = re.compile(r"<!--(.*?)-->", re.S)
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_WS = re.compile(r"\s+")
_JSON_HINT = re.compile(r"^\s*[\[{]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN = re.compile(r"[A-Za-z0-9_./,\-]*")  # text that normalise() would only lower-case (paths too)

try:  # _normalise and _pairs for plain ASCII text, in C (setup.py builds it where a compiler is present; the same result)
    from addons._fastscore import DECODE_ROUNDS as _C_ROUNDS
    from addons._fastscore import normalise_ascii as _ascii_normalise
    from addons._fastscore import pairs_ascii as _ascii_pairs
except ImportError:  # pragma: no cover - depends on the install
    _C_ROUNDS, _ascii_normalise, _ascii_pairs = None, None, None
if _C_ROUNDS != DECODE_ROUNDS:  # pragma: no cover - a build that decodes another number of rounds
    _ascii_normalise = _ascii_pairs = None


def _bytes_to_text(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("latin-1")


def _percent_decode(s: str, plus: bool) -> str:
    """Decode percent-escapes (and `%uXXXX`, and `+` in forms) until stable, at most DECODE_ROUNDS times."""
    for _ in range(DECODE_ROUNDS):
        before = s
        if plus:
            s = s.replace("+", " ")
        if "\\u" in s:
            s = _BACKSLASH_U.sub(lambda m: chr(int(m.group(1), 16)), s)
        if "%" in s:
            s = _PCT_U.sub(lambda m: chr(int(m.group(1), 16)), s)
            if _PCT.search(s):
                s = _bytes_to_text(unquote_to_bytes(s.encode("utf-8", "surrogatepass")))
        if "&" in s:
            s = html.unescape(s)
        if s == before:
            break
    return s


def _c_comment(m: re.Match) -> str:
    # MySQL runs the text of /*!50000 ... */ as code: keep it. Other comments act as whitespace;
    # a normalised marker keeps the signal that one was there.
    if m.group(1) is not None:
        return " " + m.group(2) + " "
    return " /**/ "


def normalise(s: str, plus: bool = False, limit: int = MAX_CHARS) -> str:
    """Return the canonical, lower-case form of one piece of request text."""
    if _ascii_normalise is not None:  # the C kernel takes ASCII text with only %XX and + in it (most)
        out = _ascii_normalise(s, plus, limit)
        if out is not None:
            return out
    if len(s) <= 256 and _PLAIN.fullmatch(s):  # the common case (names, numbers, words): same result, faster
        return s.lower()[:limit]
    return _normalise(s, plus, limit)


def _normalise(s: str, plus: bool, limit: int) -> str:
    s = s[: limit * 4]
    s = _percent_decode(s, plus)
    s = unicodedata.normalize("NFKC", s)
    # NFKC may reveal new escapes (full-width %): one more bounded pass.
    if "%" in s or "&" in s:
        s = unicodedata.normalize("NFKC", _percent_decode(s, plus))
    s = s.casefold()
    if "/*" in s:
        s = _C_COMMENT.sub(_c_comment, s)
    if "<!--" in s:
        s = _HTML_COMMENT.sub(lambda m: " <!-- " + m.group(1) + " --> ", s)
    s = s.replace("\x00", " <nul> ").replace(SEP, " ")
    s = _SURROGATE.sub("\ufffd", s)  # a lone surrogate (%uD800) cannot be encoded, e.g. into a record
    s = _CTRL.sub(" ", s)
    s = _WS.sub(" ", s).strip()
    return s[:limit]


# Pairs whose every character normalise() would only lower-case (see _PLAIN), plus `=` and the separator.
_PLAIN_PAIRS = {sep: re.compile(r"[A-Za-z0-9_./,\-=" + sep + "]*") for sep in "&;"}


def _pairs(raw: str, sep: str, limit: int) -> str:
    """Normalise a query string, a form body or a cookie header: `name=value` pairs, space separated."""
    if _ascii_pairs is not None:  # the C kernel: ASCII pairs whose names and values _ascii_normalise takes
        out = _ascii_pairs(raw, sep, limit, MAX_PAIRS)
        if out is not None:
            return out
    plain = _PLAIN_PAIRS.get(sep)
    if plain is not None and len(raw) <= limit // 2 and raw.count(sep) < MAX_PAIRS and plain.fullmatch(raw):
        return " ".join(p for p in raw.lower().split(sep) if p)  # the common case: same result, faster
    out = []
    size = 0
    for part in raw[: limit * 4].split(sep, MAX_PAIRS * 4)[: MAX_PAIRS * 4]:
        if not part:
            continue
        if len(out) >= MAX_PAIRS:
            break
        name, eq, value = part.partition("=")
        text = normalise(name, plus=True, limit=limit) + ("=" + normalise(value, plus=True, limit=limit) if eq else "")
        out.append(text)
        size += len(text) + 1
        if size >= limit:
            break
    return " ".join(out)[:limit]


def _json_text(value, limit: int) -> str:
    """Walk a parsed JSON document: keys and scalar values, depth-first, bounded."""
    out: list[str] = []
    size = 0
    stack = [(None, value)]
    while stack and size < limit:
        key, v = stack.pop()
        if isinstance(v, dict):
            stack.extend(reversed(list(v.items())[:1000]))
            continue
        if isinstance(v, list):
            stack.extend((key, x) for x in reversed(v[:1000]))
            continue
        if v is None or isinstance(v, bool):
            text = json.dumps(v)  # null, true, false
        else:
            text = str(v)
        piece = normalise(text, limit=limit)
        if key is not None:
            piece = normalise(str(key), limit=256) + "=" + piece
        out.append(piece)
        size += len(piece) + 1
    return " ".join(out)[:limit]


def _multipart_text(body: bytes, content_type: str, limit: int) -> str:
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        return ""
    out = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition") or ""
        filename = part.get_filename()
        payload = part.get_payload(decode=True) or b""
        piece = normalise(str(name), limit=256)
        if filename:
            piece += " filename=" + normalise(str(filename), limit=1024)
        if filename is None and not _looks_binary(payload):
            piece += "=" + normalise(_bytes_to_text(payload), limit=limit)
        elif filename:
            ptype = part.get_content_type()
            if ptype.startswith("text/") or (not _looks_binary(payload) and ptype in ("application/octet-stream", "text/plain")):
                piece += " " + normalise(_bytes_to_text(payload[:limit]), limit=limit)
        out.append(piece)
        if sum(len(x) for x in out) >= limit:
            break
    return " ".join(out)[:limit]


def _looks_binary(b: bytes) -> bool:
    sample = b[:1024]
    if not sample:
        return False
    if b"\x00" in sample:
        try:
            sample.decode("utf-8")
        except UnicodeDecodeError:
            return True
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start >= len(sample) - 3:  # a character cut by the sample's end
            text = sample[: e.start].decode("utf-8", "replace")
        else:
            return True
    printable = sum(1 for c in text if c.isprintable() or c in "\r\n\t")
    return printable < 0.9 * len(text)


_BINARY_TYPES = ("image/", "audio/", "video/", "font/")
_BINARY_APPS = ("octet-stream", "zip", "gzip", "pdf", "x-tar", "protobuf", "grpc", "wasm", "msgpack")


def body_text(body: bytes | str, content_type: str = "", limit: int = MAX_CHARS) -> str:
    """The normalised text of a request body, chosen by its content type; binary bodies give ''."""
    if not body:
        return ""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    ctype = content_type.split(";", 1)[0].strip().lower()
    try:
        if ctype.startswith("multipart/"):
            # Parse a bounded prefix: field names and values come first in practice.
            return _multipart_text(raw[: limit * 8], content_type, limit)
        if ctype.startswith(_BINARY_TYPES) or any(x in ctype for x in _BINARY_APPS):
            return ""
        raw = raw[: limit * 4]
        if ctype == "application/x-www-form-urlencoded":
            return _pairs(_bytes_to_text(raw), "&", limit)
        if _looks_binary(raw):
            return ""
        text = _bytes_to_text(raw)
        if ctype.endswith("json") or ctype.endswith("+json") or (not ctype and _JSON_HINT.match(text)):
            try:
                return _json_text(json.loads(text), limit)
            except (ValueError, RecursionError):
                pass  # not valid JSON (or cut by the cap): fall through to plain text
        if not ctype and "=" in text and "\n" not in text.strip() and " " not in text.strip():
            return _pairs(text, "&", limit)  # a form body sent without a content type
        return normalise(text, limit=limit)
    except Exception:  # noqa: BLE001 - whatever the bytes, a feature string comes out
        return normalise(_bytes_to_text(raw[:limit]), limit=limit)


def decode_body(raw: bytes, content_encoding: str = "", limit: int = MAX_CHARS) -> bytes:
    """Undo a request body's Content-Encoding (gzip, deflate), keeping at most `limit * 8` bytes.

    Bounded, unlike mitmproxy's `get_content()`, so a compression bomb costs no more than a capped
    body. Bodies in other encodings (br, zstd, unknown) come back as sent: binary, so not featurized.
    A body that is not what its header says comes back as sent too.
    """
    out = raw
    cap = limit * 8
    for coding in reversed([c.strip().lower() for c in content_encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        if coding not in ("gzip", "x-gzip", "deflate"):
            return raw
        # 47: zlib or gzip header, detected; -15: raw deflate (what some clients send as "deflate").
        for wbits in (47, -15):
            try:
                out = zlib.decompressobj(wbits).decompress(out[: cap * 4], cap)
                break
            except zlib.error:
                continue
        else:
            return raw
    return out


def featurize(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | str = b"",
    *,
    header_names: Sequence[str] = DEFAULT_HEADERS,
    limit: int = MAX_CHARS,
) -> str:
    """One normalised string for one request: method, path, query, chosen headers, body.

    `headers` are (name, value) pairs in wire order; `header_names` are the (lower-case) names whose
    values are included. `limit` caps the whole string (and every piece before decoding).
    """
    try:
        return _featurize(method, target, headers, body, header_names, limit)
    except Exception:  # noqa: BLE001 - a last line of defence: never raise on the request path
        return normalise(f"{method} {target}"[:limit], limit=limit)


def _featurize(method, target, headers, body, header_names, limit) -> str:
    target = target[: limit * 4]
    path, _, query = target.partition("?")
    path, _, fragment = path.partition("#")
    parts = [normalise(method, limit=32) or "-", normalise(path, limit=limit) or "/"]
    if query or fragment:
        parts.append("?" + _pairs(query + ("&" + fragment if fragment else ""), "&", limit))
    wanted = _wanted(tuple(header_names))
    content_type = ""
    hparts = []
    hsize = 0
    for name, value in headers:
        lname = name.lower()
        if lname == "content-type":
            content_type = value
        if lname not in wanted or hsize >= limit:
            continue
        cached = len(value) <= _CACHED_HEADER
        text = (_header_text if cached else _header_text.__wrapped__)(lname, value, limit)
        hparts.append(text)
        hsize += len(text) + 1
    if hparts:
        parts.append(SEP + "h " + " ".join(hparts))
    btext = body_text(body, content_type, limit)
    if btext:
        parts.append(SEP + "b " + btext)
    text = " ".join(parts)
    markers = ai_markers(text)
    if not markers and len(text) <= limit:
        return text  # what the lines below give when nothing is cut (most requests)
    if markers:
        parts.append(SEP + "ai " + " ".join(markers))
    return " ".join(_fit(parts, limit))[:limit]


@functools.lru_cache(maxsize=16)
def _wanted(header_names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(h.lower() for h in header_names)


_CACHED_HEADER = 1024  # characters: shorter header values (most) are normalised once per distinct value


@functools.lru_cache(maxsize=2048)  # the same User-Agent, Referer or session cookie comes with request after request
def _header_text(lname: str, value: str, limit: int) -> str:
    if lname == "cookie":
        return "cookie: " + _pairs(value.replace("; ", ";"), ";", limit)
    return lname + ": " + normalise(value, limit=limit)


# Text that addresses an AI (prompt injection aimed at the LLM half of the ensemble, or at an LLM app
# behind the proxy) is a signal in itself: each kind found adds one marker token to the string.
_AI_PATTERNS = (
    ("ai-override", re.compile(
        r"\b(ignore|disregard|forget|override|bypass)\b.{0,40}?\b(previous|prior|above|earlier|preceding|all|any|your|the|system)\b"
        r".{0,30}?\b(instructions?|prompts?|rules|directions|guidelines|messages?|context)\b")),
    ("ai-role", re.compile(
        r"\b(you are now|you're now|act as an?|pretend (to be|you are)|new instructions?|system prompt|jailbreak|"
        r"developer mode|do anything now)\b")),
    ("ai-template", re.compile(
        r"<\|(im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id)\|>|\[/?inst\]|<</?sys>>|"
        r"###\s*(instruction|system|response)|(^|\s)(system|assistant)\s*:\s")),
    ("ai-verdict", re.compile(
        r"[{,]\s*\"?(score|verdict|rating|risk|malicious)\"?\s*:\s*\"?(\d|true|false|benign|safe|clean|pass|allow)|"
        r"\b(rate|score|classify|mark) (this|it|the request) (as )?(1|benign|safe|harmless|clean)\b")),
)
# For each pattern, substrings of which every match contains at least one: most requests contain
# none, and a substring test costs far less than a regular-expression scan (same result either way).
_AI_LITERALS = {
    "ai-override": ("ignore", "disregard", "forget", "override", "bypass"),
    "ai-role": ("you are now", "you're now", "act as a", "pretend ", "new instruction", "system prompt", "jailbreak",
                "developer mode", "do anything now"),
    "ai-template": ("<|", "inst]", "sys>>", "###", "system", "assistant"),
    "ai-verdict": ("score", "verdict", "rat", "risk", "malicious", "classify", "mark"),
}


try:  # the substring prefilter in one pass, in C (the same hits as the loop below)
    from addons._fastscore import literal_hits as _literal_hits
    from addons._fastscore import set_literals as _set_literals

    _set_literals(tuple(_AI_LITERALS[name] for name, _ in _AI_PATTERNS))
except ImportError:  # pragma: no cover - depends on the install
    _literal_hits = None


def ai_markers(text: str) -> list[str]:
    """Marker tokens for the kinds of AI-addressing text in a normalised string (bounded scan)."""
    text = text[: 4 * MAX_CHARS]
    if _literal_hits is not None:
        hits = _literal_hits(text)
        return [name for k, (name, pattern) in enumerate(_AI_PATTERNS) if hits >> k & 1 and pattern.search(text)] if hits else []
    out = []
    for name, pattern in _AI_PATTERNS:
        for lit in _AI_LITERALS[name]:
            if lit in text:
                if pattern.search(text):
                    out.append(name)
                break
    return out


def _fit(parts: list[str], limit: int) -> list[str]:
    """Cut the sections so that, joined by spaces, they fit in `limit`, each keeping a fair share.

    A section shorter than its share keeps all of it and leaves the rest to the others, so a long
    path or query cannot push the headers and body out of the feature string.
    """
    total = sum(len(p) for p in parts) + len(parts) - 1
    if total <= limit:
        return parts
    budget = max(0, limit - (len(parts) - 1))
    sizes = [0] * len(parts)
    order = sorted(range(len(parts)), key=lambda i: len(parts[i]))
    for k, i in enumerate(order):
        sizes[i] = min(len(parts[i]), budget // (len(parts) - k))
        budget -= sizes[i]
    return [p[:n] for p, n in zip(parts, sizes)]


def parse_networks(specs: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse IPs and CIDR ranges; raises ValueError naming the bad entry."""
    nets = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        try:
            nets.append(ipaddress.ip_network(spec, strict=False))
        except ValueError as e:
            raise ValueError(f"not an IP address or CIDR range: {spec!r}") from e
    return tuple(nets)


@functools.lru_cache(maxsize=4096)  # a peer sends many requests: parse its address once
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("["):  # [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)
def _peer_text(peer: str) -> str:
    """client_ip without trusted proxies: the peer's address as text (the peer itself if unparsable)."""
    addr = _ip(peer)
    return peer if addr is None else str(addr)


def _in(addr, nets) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


def client_ip(peer: str, headers: Iterable[tuple[str, str]], trusted: Sequence = ()) -> str:
    """The client's address: the connection's peer, unless the peer is a trusted proxy.

    From a trusted peer, X-Forwarded-For (or, when there is none, Forwarded `for=`) is walked from
    the right, skipping trusted hops; the first untrusted hop is the client. Anything unparsable
    stops the walk. The two headers are never mixed: a proxy that sets one passes the other through
    from the client unchanged, so mixing them would let a client choose its address.
    """
    if not trusted:
        return _peer_text(peer)
    addr = _ip(peer)
    if addr is None:
        return peer
    if not _in(addr, trusted):
        return str(addr)
    xff: list[str] = []
    fwd: list[str] = []
    for name, value in headers:
        lname = name.lower()
        if lname == "x-forwarded-for":
            xff.extend(value.split(","))
        elif lname == "forwarded":
            for element in value.split(","):
                for pair in element.split(";"):
                    key, _, val = pair.strip().partition("=")
                    if key.strip().lower() == "for":
                        fwd.append(val)
    hops = xff or fwd
    for hop in reversed(hops):
        hop_addr = _ip(hop)
        if hop_addr is None:
            break
        addr = hop_addr
        if not _in(addr, trusted):
            break
    return str(addr)
