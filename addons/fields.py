"""Turn one HTTP request into its fields: every part of it, each with a location and a name.

Detection v2 scores each part of a request on its own (issue 14): `extract` is the "parse → fields" step
of that pipeline. A plain module (no mitmproxy import), so serving, training and the benchmarks share it.

What becomes a field: the method; each path segment; every query pair; every header (names that are
not standard are inspected too), and the parts of structured ones (Content-Type parameters, the items
of Accept-style and Sec-CH-UA lists, Forwarded pairs); cookie pairs; the path and query of URL-valued
headers (Referer, Origin, ...); and the body, by its declared type *and* by sniffing (a JSON body
declared text/plain is still JSON): JSON keys and string values at any depth, NDJSON, forms, XML/SOAP
text, attributes and declarations, multipart names, filenames and values, GraphQL (and its string
arguments), plain text, and the printable runs of binary data. A value that is a base64 or hex encoding
of text also yields the decoded text; a JSON string, query or form value that is itself a JSON document
yields its keys and values; a form declared in a charset other than UTF-8 (`charset=ibm037`) also
yields its pairs percent-decoded to bytes and read in that charset, as a server honouring it reads them.

Values stay raw: nothing is percent-decoded or normalised here (the normaliser runs later; the layers
above are added beside the raw value, not instead of it), but bytes become text losslessly: UTF-8,
with each byte that is not valid UTF-8 kept as the character of the same latin-1 value. So one bad
byte never hides a value, and no field holds a lone surrogate (a JSON `"\\ud800"` is U+FFFD): every
value encodes as UTF-8. Content-Encodings are undone with a bounded output and charsets come from
`charset=` or a BOM.

No blind spot hides behind a limit: a request beyond `Limits` raises `TooLarge`, and the caller refuses
it (413, or 431 for headers) instead of passing it uninspected. Every step is linear in the input:
no regular expression here can backtrack over attacker text, and no XML parser (entities are never
expanded, nothing is fetched).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote, unquote_plus, unquote_to_bytes

import numpy as np

try:  # brotli comes with mitmproxy
    import brotli
except ImportError:  # pragma: no cover - depends on the install
    brotli = None
try:  # zstd: the standard library from 3.14 on, backports.zstd (a mitmproxy dependency) before
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the Python version
    try:
        from backports import zstd  # type: ignore[import-not-found,no-redef]
    except ImportError:  # pragma: no cover - depends on the install
        zstd = None

LOCATIONS = ("method", "path", "query", "header", "cookie", "form", "json", "xml", "multipart", "text")


class Field(NamedTuple):
    """One part of a request. A named tuple (not a dataclass): a request has dozens, made on every request."""

    loc: str  # one of LOCATIONS
    name: str  # parameter / header / cookie / JSON key path ("a.b.0.c") / multipart part name / path segment index
    value: str  # the raw text (not percent-decoded or normalised), bytes decoded losslessly
    via: str = ""  # "" normally; "name" for a NAME; "base64"/"hex" for a decoded layer; "referer"/... for a URL
    # inside a header; "filename" for multipart filenames; "strings" for the printable runs of binary data;
    # "json" for a JSON document inside a value; "graphql" for a GraphQL string argument; "part" for a part
    # of a structured header; "charset" for a form value read in its declared charset


@dataclass(frozen=True, slots=True)
class Limits:
    body_bytes: int = 8 * 2**20  # body size, raw and after each Content-Encoding
    fields: int = 20000
    depth: int = 64  # JSON/XML nesting
    header_bytes: int = 64 * 2**10  # all header names and values together


class TooLarge(Exception):
    """A request beyond a limit: the caller refuses it with `status` (never passes it uninspected)."""

    def __init__(self, status: int, what: str):
        super().__init__(f"request {what} beyond the inspection limit ({status})")
        self.status = status  # 413 (body, fields, depth, decompression bomb) or 431 (headers)
        self.what = what  # "body", "fields", "depth" or "headers"


@dataclass(slots=True)
class Request:
    fields: list[Field]
    signals: list[str]  # request-level: "scanner-ua:sqlmap", "unknown-method:FOO", "bad-encoding:gzip", ...


# --- lossless bytes -> str ---------------------------------------------------------------------------

LOSSLESS = "openflare.lossless"


def _lossless(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: each undecodable byte becomes the character with its latin-1 value."""
    if isinstance(exc, UnicodeDecodeError):
        return "".join(map(chr, exc.object[exc.start : exc.end])), exc.end
    raise exc


codecs.register_error(LOSSLESS, _lossless)
# surrogateescape's mark of an undecodable byte (U+DC80-U+DCFF) -> that byte's latin-1 character: what
# LOSSLESS gives, without a Python call per bad byte (base64 of random bytes has dozens).
_UNESCAPE = {0xDC00 + i: i for i in range(0x80, 0x100)}


def text_of(b: bytes) -> str:
    """UTF-8 where the bytes are UTF-8, latin-1 for each byte that is not: never fails, never drops.

    The same text as `b.decode("utf-8", LOSSLESS)`, at C speed (one Python call per bad byte takes
    seconds on 8 MB of binary data): surrogateescape marks each byte that is not UTF-8 as U+DC80-U+DCFF
    (strict UTF-8 never yields those itself), then numpy turns each mark into its byte's latin-1 character.
    """
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        if len(b) < 512:  # numpy's fixed cost is more than a translate's on a short text
            return b.decode("utf-8", "surrogateescape").translate(_UNESCAPE)
    marked = np.array(b.decode("utf-8", "surrogateescape")).reshape(1).view(np.uint32).copy()  # UCS-4
    marked[(marked >= 0xDC80) & (marked <= 0xDCFF)] -= 0xDC00
    return marked.tobytes().decode("utf-32-le")


# --- small helpers -----------------------------------------------------------------------------------

KNOWN_METHODS = frozenset(
    "GET HEAD POST PUT DELETE PATCH OPTIONS CONNECT TRACE "
    # WebDAV (RFC 4918, 3253, 3648, 3744, 4437, 4791, 5323, 5842)
    "PROPFIND PROPPATCH MKCOL COPY MOVE LOCK UNLOCK SEARCH REPORT MKACTIVITY CHECKOUT CHECKIN UNCHECKOUT "
    "MERGE MKCALENDAR MKWORKSPACE VERSION-CONTROL BASELINE-CONTROL LABEL UPDATE ORDERPATCH ACL BIND UNBIND "
    "REBIND MKREDIRECTREF UPDATEREDIRECTREF".split()
)

# Header names a browser or an ordinary API client sends: only the names of other headers are inspected.
COMMON_HEADERS = frozenset(
    """host user-agent accept accept-language accept-encoding accept-charset connection keep-alive
    content-type content-length content-encoding content-language content-disposition cookie referer origin
    cache-control pragma expires upgrade-insecure-requests dnt te trailer transfer-encoding upgrade via
    forwarded if-none-match if-modified-since if-match if-unmodified-since if-range range authorization
    proxy-authorization proxy-connection priority expect x-requested-with x-forwarded-for x-forwarded-proto
    x-forwarded-host x-forwarded-port x-real-ip x-csrf-token x-xsrf-token x-request-id x-correlation-id
    purpose sec-purpose sec-fetch-site sec-fetch-mode sec-fetch-dest sec-fetch-user sec-gpc
    sec-ch-ua sec-ch-ua-mobile sec-ch-ua-platform sec-ch-ua-platform-version sec-ch-ua-arch
    sec-ch-ua-bitness sec-ch-ua-full-version sec-ch-ua-full-version-list sec-ch-ua-model sec-ch-ua-wow64
    sec-ch-prefers-color-scheme sec-websocket-key sec-websocket-version sec-websocket-extensions
    sec-websocket-protocol access-control-request-method access-control-request-headers
    access-control-request-private-network""".split()
)

# Headers whose value is a URL: its path segments and query pairs become fields too (via the header name).
URL_HEADERS = frozenset(
    "referer origin location content-location destination x-original-url x-rewrite-url "
    "x-original-uri x-forwarded-uri".split()
)

# (substring of the lower-cased User-Agent, tool): first match wins, so longer names come first.
SCANNER_UAS = (
    ("sqlmap", "sqlmap"),
    ("nikto", "nikto"),
    ("nuclei", "nuclei"),
    ("feroxbuster", "feroxbuster"),
    ("ffuf", "ffuf"),
    ("fuzz faster u fool", "ffuf"),  # ffuf's default User-Agent
    ("gobuster", "gobuster"),
    ("dirbuster", "dirbuster"),
    ("dirb", "dirb"),
    ("wfuzz", "wfuzz"),
    ("openvas", "openvas"),
    ("nessus", "nessus"),
    ("masscan", "masscan"),
    ("zgrab", "zgrab"),
    ("wpscan", "wpscan"),
    ("acunetix", "acunetix"),
    ("netsparker", "netsparker"),
    ("w3af", "w3af"),
    ("arachni", "arachni"),
    ("skipfish", "skipfish"),
    ("burpsuite", "burp"),
    ("burp collaborator", "burp"),
    ("owasp zap", "zap"),
    ("zaproxy", "zap"),
    ("nmap scripting engine", "nmap"),
    ("jaeles", "jaeles"),
    ("commix", "commix"),
    ("hydra", "hydra"),
    ("havij", "havij"),
    ("whatweb", "whatweb"),
    ("interactsh", "interactsh"),
)

_SCHEME_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")
_SIGNAL_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-]")
_B64 = re.compile(r"[A-Za-z0-9+/\-_]+={0,2}")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_ASCII_LETTER = re.compile(r"[A-Za-z]")
# Characters that make text "not printable": C0 controls but tab/CR/LF, DEL, C1 (bytes 0x80-0x9f kept
# losslessly land here), U+FFFD and unpaired surrogates.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_STRINGS = re.compile(rb"[\x20-\x7e\t]{8,}")
_FORMISH = re.compile(r"[A-Za-z0-9_.\-\[\]%+]{1,256}=")


def _no_surrogates(s: str) -> str:
    """Surrogates out (a JSON "\\ud800", UTF-7, a caller's surrogateescape): a pair becomes its character, a
    lone half U+FFFD, as the normaliser does. Every field then encodes as UTF-8."""
    return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _signal_text(s: str) -> str:
    return _SIGNAL_UNSAFE.sub("?", s[:32])


def mostly_printable(s: str, share: float = 0.9) -> bool:
    """At least `share` of the characters are printable (tab, CR and LF count as printable)."""
    if not s:
        return False
    return len(_UNPRINTABLE.sub("", s)) >= share * len(s)


def strings_of(b: bytes) -> str:
    """The printable ASCII runs of >= 8 bytes that hold a letter, one per line (like `strings`)."""
    return "\n".join(r.decode("ascii") for r in _STRINGS.findall(b) if _ASCII_LETTER.search(r.decode("ascii")))


def decode_layer(value: str) -> tuple[str, str] | None:
    """The text a base64 or hex value encodes, as (via, text), or None if it is not such a value.

    The value is percent-decoded once first (a `%3D` padding); the decoded text must be mostly
    printable (>= 90 %) and hold a letter, so random ids and hashes yield nothing. A value of hex digits
    only is read as hex or not at all (an MD5 read as base64 is latin-1 noise that looks printable). A short value
    (8 to 15 characters: `YWRtaW4nLS0` is `admin'--`) must decode to printable ASCII only, with a
    character that is not a letter or digit or two letters in a row, and be encoded as an encoder writes
    it (the unused low bits of the last character zero): a word or an id of that length fails one of
    these far more often than not (about 1 in 3000 random letters-and-digits ids passes).
    """
    if len(value) < 8:
        return None
    if "%" in value:
        value = unquote(value, "utf-8", LOSSLESS)
    raw = None
    if _HEX.fullmatch(value):  # a hash or a number: hex if anything (as base64 it reads as latin-1 noise)
        if len(value) >= 16 and len(value) % 2 == 0:
            text = text_of(binascii.unhexlify(value))
            if mostly_printable(text) and _ASCII_LETTER.search(text):
                return "hex", text
        return None
    if _B64.fullmatch(value):
        s = value.rstrip("=").replace("-", "+").replace("_", "/")
        if len(s) % 4 == 1:
            return None
        try:
            raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(value) < 16:  # and the unused bits of the last character are zero, as an encoder leaves them
            if (
                _SHORT_TEXT.fullmatch(raw)
                and _WORDISH.search(raw)
                and base64.b64encode(raw).rstrip(b"=") == s.encode("ascii")
            ):
                return "base64", raw.decode("ascii")
            return None
        text = text_of(raw)
        if mostly_printable(text) and _ASCII_LETTER.search(text):
            return "base64", text
    return None


_SHORT_TEXT = re.compile(rb"[\x20-\x7e]+")
_WORDISH = re.compile(rb"[A-Za-z]{2}|[^A-Za-z0-9]")


class _Out:
    """The fields of one request, counted against the field limit."""

    __slots__ = ("fields", "signals", "limits")

    def __init__(self, limits: Limits):
        self.fields: list[Field] = []
        self.signals: list[str] = []
        self.limits = limits

    def add(self, loc: str, name: str, value: str, via: str = "") -> None:
        if not value.isascii() and _SURROGATE.search(value):
            value = _no_surrogates(value)
        if not name.isascii() and _SURROGATE.search(name):
            name = _no_surrogates(name)
        self.fields.append(Field(loc, name, value, via))
        if len(self.fields) > self.limits.fields:
            raise TooLarge(413, "fields")

    def value(self, loc: str, name: str, value: str, via: str = "") -> None:
        """A value, plus its base64/hex layers (two at most: a base64 of a base64)."""
        self.add(loc, name, value, via)
        for _ in range(2):
            layer = decode_layer(value)
            if layer is None:
                break
            via, value = layer
            self.add(loc, name, value, via)

    def signal(self, s: str) -> None:
        if s not in self.signals:
            self.signals.append(s)


# --- method, target, headers -------------------------------------------------------------------------


def _pairs(out: _Out, loc: str, text: str, sep: str = "&", via: str = "") -> None:
    """`name=value` pairs as in a query, a form or a cookie header; a piece without `=` has name ""."""
    for piece in text.split(sep):
        if sep == ";":
            piece = piece.strip(" \t")
        if not piece:
            continue
        name, eq, val = piece.partition("=")
        if not eq:
            out.value(loc, "", piece, via)
            continue
        out.value(loc, name, val, via)
        if name:
            out.add(loc, name, name, "name")
        if loc in _PAIR_DOCS and val:
            _nested_json(out, name, val)
            if name == "query" and ("{" in val or "%7" in val):  # GraphQL over GET
                _graphql(out, "text", unquote_plus(val, "utf-8", LOSSLESS))


_PAIR_DOCS = frozenset(("query", "form", "cookie"))  # where a value may be a JSON document


def _target(out: _Out, target: str, via: str = "") -> None:
    """Path segments and query pairs of an origin-form or absolute-form target (or a URL in a header)."""
    m = _SCHEME_AUTHORITY.match(target)
    if m:
        target = target[m.end() :]
    path, q, query = target.partition("?")
    i = 0
    for seg in path.split("/"):
        if seg:
            out.value("path", str(i), seg, via)
            i += 1
    if i > 1:  # the whole path too: a traversal (../../etc/passwd) spans segments
        out.add("path", "path", path, via)
    if q:
        _pairs(out, "query", query, via=via)


# Structured headers: besides the whole value, each parameter or list item is a field (via "part").
_PARAM_HEADERS = frozenset(("content-type", "content-disposition"))
_LIST_HEADERS = frozenset(
    "accept accept-language accept-encoding accept-charset te sec-ch-ua sec-ch-ua-full-version-list".split()
)


# A Host header that is a well-formed authority (a DNS name or an IP address, then an optional port) has no
# room for a payload: it is one field marked AUTHORITY, which the rules read (`Host: 169.254.169.254` is
# cloud-metadata SSRF) and the learnt model does not (an address and a port are not the `ip port` of a
# reverse shell). Anything else in Host is an ordinary field.
AUTHORITY = "authority"
_AUTHORITY = re.compile(r"(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?"
                        r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _headers(out: _Out, headers: Sequence[tuple[str, str]]) -> None:
    for name, value in headers:
        lname = name.lower()
        if lname == "host" and _AUTHORITY.fullmatch(value):
            out.add("header", lname, value, AUTHORITY)
            continue
        out.value("header", lname, value)
        if lname not in COMMON_HEADERS:
            out.add("header", lname, lname, "name")
        if lname in _PARAM_HEADERS:
            for k, v in _params(value)[1]:
                out.value("header", f"{lname}.{k}", v, "part")
        elif lname in _LIST_HEADERS:
            items = value.split(",")
            if len(items) > 1 or '"' in value:
                for i, item in enumerate(items):
                    item = item.replace('"', "").strip(" \t")
                    if item:
                        out.value("header", f"{lname}.{i}", item, "part")
        elif lname == "forwarded":
            for element in value.split(","):
                for pair in element.split(";"):
                    k, eq, v = pair.partition("=")
                    if eq:
                        out.value("header", "forwarded." + k.strip(" \t").lower(), v.strip(' \t"'), "part")
        if lname == "cookie":
            _pairs(out, "cookie", value, ";")
        elif lname in URL_HEADERS and ("://" in value or value.startswith("/")):
            _target(out, value, lname)
        elif lname == "user-agent":
            ua = value.lower()
            for needle, tool in SCANNER_UAS:
                if needle in ua:
                    out.signal(f"scanner-ua:{tool}")
                    break


def _params(value: str) -> tuple[str, list[tuple[str, str]]]:
    """A Content-Type-like header: (lower-cased type, [(lower-cased param, value without quotes)])."""
    kind, _, rest = value.partition(";")
    params = []
    for p in rest.split(";"):
        k, eq, v = p.partition("=")
        if eq:
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1]
            params.append((k.strip().lower(), v))
    return kind.strip().lower(), params


# --- Content-Encoding ----------------------------------------------------------------------------------


class _BadEncoding(Exception):
    def __init__(self, partial: bytes):
        self.partial = partial  # what decoded before the fault


def _zlib(data: bytes, wbits: int, limit: int, members: bool) -> bytes:
    """Bounded zlib/gzip/raw-deflate decoding; gzip takes every member (multi-member files)."""
    out = bytearray()
    while True:
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(data, limit + 1 - len(out))
        except zlib.error:
            raise _BadEncoding(bytes(out))
        if len(out) > limit:
            raise TooLarge(413, "body")
        if not d.eof:
            raise _BadEncoding(bytes(out))  # truncated
        data = d.unused_data
        if not members or not data.strip(b"\x00"):
            if data.strip(b"\x00"):
                raise _BadEncoding(bytes(out))  # garbage after the stream
            return bytes(out)


def _brotli(data: bytes, limit: int) -> bytes:
    if brotli is None:  # pragma: no cover - depends on the install
        raise _BadEncoding(b"")
    d = brotli.Decompressor()
    out = bytearray()
    try:
        out += d.process(data, output_buffer_limit=limit + 1)
        while len(out) <= limit and not d.can_accept_more_data():
            out += d.process(b"", output_buffer_limit=limit + 1 - len(out))
    except brotli.error:
        raise _BadEncoding(bytes(out))
    if len(out) > limit:
        raise TooLarge(413, "body")
    if not d.is_finished():
        raise _BadEncoding(bytes(out))
    return bytes(out)


def _zstd(data: bytes, limit: int) -> bytes:
    if zstd is None:  # pragma: no cover - depends on the install
        raise _BadEncoding(b"")
    out = bytearray()
    while data:
        d = zstd.ZstdDecompressor()
        try:
            out += d.decompress(data, max_length=limit + 1 - len(out))
        except zstd.ZstdError:
            raise _BadEncoding(bytes(out))
        if len(out) > limit:
            raise TooLarge(413, "body")
        if not d.eof:
            raise _BadEncoding(bytes(out))
        data = d.unused_data  # another frame
    return bytes(out)


def _decode_one(coding: str, data: bytes, limit: int) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return _zlib(data, 31, limit, members=True)
    if coding == "deflate":  # zlib-wrapped as the RFC says, raw deflate as some clients send
        try:
            return _zlib(data, 15, limit, members=False)
        except _BadEncoding as e:
            if e.partial:
                raise
            return _zlib(data, -15, limit, members=False)
    if coding == "br":
        return _brotli(data, limit)
    if coding == "zstd":
        return _zstd(data, limit)
    raise _BadEncoding(b"")


# --- charsets ----------------------------------------------------------------------------------------

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),  # before UTF-16 LE: the same first two bytes
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_ASCII_PROBE = b"a=b&c={}<>[]\"'/;:_-.%+ Z9"


def _charset(body: bytes, declared: str | None, out: _Out) -> tuple[str, bool]:
    """(text, ascii_compatible): the body decoded by its BOM, its declared charset, or as UTF-8.

    Without a BOM or charset, a body whose first bytes are ASCII with NULs between them (RFC 4627's
    detection) is UTF-16/32. `ascii_compatible` is False when the charset reads ASCII bytes as other
    characters (UTF-16, EBCDIC, ...): the caller then inspects the plain UTF-8 reading too, since the
    origin may ignore the charset.
    """
    for bom, enc in _BOMS:
        if body.startswith(bom):
            return body[len(bom) :].decode(enc, LOSSLESS), enc == "utf-8"
    if declared:
        try:
            info = codecs.lookup(declared)
            if not getattr(info, "_is_text_encoding", True):
                raise LookupError(declared)
            text = body.decode(info.name, LOSSLESS)
            try:
                compatible = _ASCII_PROBE.decode(info.name) == _ASCII_PROBE.decode("ascii")
            except (UnicodeError, ValueError):
                compatible = False
            return text, compatible
        except (LookupError, UnicodeError, ValueError, TypeError):
            out.signal(f"bad-charset:{_signal_text(declared)}")
    head = body[:4]
    if len(head) == 4 and b"\x00" in head:
        nul = tuple(c == 0 for c in head)
        enc = {
            (True, True, True, False): "utf-32-be",
            (False, True, True, True): "utf-32-le",
            (True, False, True, False): "utf-16-be",
            (False, True, False, True): "utf-16-le",
        }.get(nul)
        if enc:
            return body.decode(enc, LOSSLESS), False
    return text_of(body), True


# --- bodies ------------------------------------------------------------------------------------------

_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"PK\x03\x04",  # ZIP (and docx, jar, apk ...)
    b"PK\x05\x06",
    b"\x1f\x8b",  # gzip
    b"7z\xbc\xaf\x27\x1c",
    b"Rar!\x1a\x07",
    b"\x7fELF",
    b"MZ",  # PE
    b"\xfd7zXZ\x00",
    b"\x28\xb5\x2f\xfd",  # zstd
    b"\x00asm",
    b"\x00\x00\x01\x00",  # ICO
)


def is_binary_magic(b: bytes) -> bool:
    """The bytes start like an image, archive or executable (PDF is not here: it can carry scripts)."""
    if b.startswith(_MAGIC):
        return True
    if b[:4] == b"RIFF" and b[8:12] in (b"WEBP", b"WAVE", b"AVI "):
        return True
    return b[4:8] == b"ftyp"  # MP4, MOV, HEIC, AVIF


def _json(out: _Out, text: str, loc: str = "json", prefix: str = "", via: str = "", depth: int = 0) -> bool:
    """JSON keys and string values at any depth (numbers, booleans and null carry no text). False if not JSON.

    A string value that is itself a JSON document (`"{\\"a\\":1}"`) yields its keys and values too (via
    "json", named under the value's path; `depth`, the arrays and objects around `text`, counts the
    nesting across these layers: `Limits.depth` of them are allowed in all), and a `query`
    value its GraphQL string arguments. Each layer's text is shorter than the one around it (its quotes
    are escaped), so re-reading them stays bounded by the depth limit times the body.
    """
    try:
        doc = json.loads(text, object_pairs_hook=_Obj, parse_int=_nothing, parse_float=_nothing, parse_constant=_nothing)
    except RecursionError:
        raise TooLarge(413, "depth")
    except ValueError:
        return False
    # A depth-first walk in document order (each key, then its value), with a stack of the containers
    # being read: (path, iterator over its children, its depth, whether it is an object). A node's depth is
    # the number of arrays and objects around it and itself (its own layer's and those of the layers around
    # it). out.add and out.value inlined for plain ASCII (a JSON body has dozens of fields): the same fields.
    root = depth + 1
    if type(doc) is str:
        _json_string(out, loc, prefix, doc, via, depth)
        return True
    if type(doc) is not _Obj and type(doc) is not list:
        return True  # a number, true, false or null: no text
    if root > out.limits.depth:
        raise TooLarge(413, "depth")
    fields, append, limit, max_depth = out.fields, out.fields.append, out.limits.fields, out.limits.depth
    stack: list = [(prefix, iter(doc) if type(doc) is _Obj else enumerate(doc), root, type(doc) is _Obj)]
    while stack:
        path, children, depth, is_obj = stack[-1]
        for key, child in children:  # (key, value) pairs of an object, (index, value) of an array
            kind = type(child)
            if is_obj:
                p = f"{path}.{key[:_LABEL]}" if path else key[:_LABEL]
                if key.isascii() and p.isascii():
                    append(Field(loc, p, key, "name"))
                    if len(fields) > limit:
                        raise TooLarge(413, "fields")
                else:
                    out.add(loc, p, key, "name")
            elif kind is str or kind is _Obj or kind is list:
                p = f"{path}.{key}" if path else str(key)
            else:
                continue  # a number, true, false or null in an array
            if kind is str:
                if len(child) < 8 and child.isascii() and p.isascii():  # no base64/hex layer below 8 characters
                    append(Field(loc, p, child, via))
                    if len(fields) > limit:
                        raise TooLarge(413, "fields")
                else:
                    out.value(loc, p, child, via)
                first = child[:1]
                if first in _JSON_START_SET or (first in _JSON_SPACE_SET and child.lstrip(_JSON_SPACE)[:1] in _JSON_START_SET):
                    _json(out, child.strip(_JSON_SPACE), "json", p, "json", depth)
                if p.endswith("query") and (len(p) == 5 or p.endswith(".query")) and "{" in child:
                    _graphql(out, loc, child)
            elif kind is _Obj or kind is list:
                if depth + 1 > max_depth:
                    raise TooLarge(413, "depth")
                stack.append((p, iter(child) if kind is _Obj else enumerate(child), depth + 1, kind is _Obj))
                break  # read the child now; this container's iterator goes on after it
        else:
            stack.pop()
    return True


def _json_string(out: _Out, loc: str, path: str, node: str, via: str, depth: int) -> None:
    """A JSON string node at `path` (`depth`: the arrays and objects around it): its value and layers, a
    JSON document inside it, a GraphQL query's string arguments."""
    out.value(loc, path, node, via)
    first = node[:1]
    if first in _JSON_START_SET or (first in _JSON_SPACE_SET and node.lstrip(_JSON_SPACE)[:1] in _JSON_START_SET):
        _json(out, node.strip(_JSON_SPACE), "json", path, "json", depth)
    if path.endswith("query") and (len(path) == 5 or path.endswith(".query")) and "{" in node:
        _graphql(out, loc, node)


_JSON_START = ("{", "[")
_JSON_START_SET = frozenset(_JSON_START)
_JSON_SPACE = " \t\r\n"
_JSON_SPACE_SET = frozenset(_JSON_SPACE)


def _nested_json(out: _Out, name: str, value: str) -> None:
    """A query, form or cookie value that is a JSON document (`?data={"a":"..."}`, percent-encoded or not)."""
    head = value.lstrip(" +")
    if head[:1] not in _JSON_START and head[:3].upper() not in ("%7B", "%5B"):
        return
    if "%" in value or "+" in value:
        value = unquote_plus(value, "utf-8", LOSSLESS)
    value = value.strip(_JSON_SPACE)
    if value[:1] in _JSON_START:
        _json(out, value, "json", name, "json")


def _graphql(out: _Out, loc: str, text: str) -> None:
    """The string literals of a GraphQL document as fields "graphql.<argument>" (via "graphql").

    A linear scan: `"..."` with backslash escapes (ending at a newline if unclosed: nothing hides behind
    an open quote) and `\"\"\"block strings\"\"\"`. The name is the argument or variable before the `:`.
    """
    n = len(text)
    pos = 0
    while True:
        lo = pos
        q = text.find('"', pos)
        if q < 0:
            return
        if text.startswith('"""', q):
            end = text.find('"""', q + 3)
            while end > 0 and text[end - 1] == "\\":  # \""" is an escaped triple quote
                end = text.find('"""', end + 3)
            stop, pos = (n, n) if end < 0 else (end, end + 3)
            value = text[q + 3 : stop]
        else:
            j = q + 1
            while True:
                k = text.find('"', j)
                nl = text.find("\n", j, n if k < 0 else k)
                if k < 0 or nl >= 0:
                    stop = n if nl < 0 else nl
                    pos = stop
                    break
                b = k  # an odd run of backslashes before the quote escapes it
                while b > j and text[b - 1] == "\\":
                    b -= 1
                if (k - b) % 2 == 0:
                    stop, pos = k, k + 1
                    break
                j = k + 1
            value = text[q + 1 : stop]
        out.value(loc, _graphql_name(text, q, lo), value, "graphql")


_GQL_IDENT = frozenset("_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _graphql_name(text: str, q: int, lo: int) -> str:
    """ "graphql.<name>" for the `name:` just before the string at `q`, looked for back to `lo` (the end of
    the string before, so each character is looked at once)."""
    i = q - 1
    while i >= lo and text[i] in " \t\r\n,":
        i -= 1
    if i < lo or text[i] != ":":
        return "graphql"
    i -= 1
    while i >= lo and text[i] in " \t\r\n":
        i -= 1
    end = i + 1
    while i >= lo and text[i] in _GQL_IDENT:
        i -= 1
    name = text[i + 1 : end]
    return f"graphql.{name}" if name and not name[0].isdigit() else "graphql"


class _Obj(list):
    """A JSON object as its (key, value) pairs."""


def _nothing(_s: str) -> None:
    return None


def _ndjson(out: _Out, text: str) -> bool:
    """One JSON document per line; the line number leads each path. False unless every line is JSON."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        return False
    mark = len(out.fields)
    for i, ln in enumerate(lines):
        if not _json(out, ln, prefix=str(i)):
            del out.fields[mark:]
            return False
    return True


def _xml(out: _Out, text: str, strict_depth: bool) -> None:
    """XML/SOAP by a linear scan: text nodes, attribute values, and declarations/PIs as "doctype".

    No entity is expanded and nothing is fetched: the DOCTYPE and its <!ENTITY lines are fields, so XXE
    is seen. Text is named by its tag path ("Envelope.Body.login.user"). Each distinct start tag is a field
    too (via "tag", as written: `<img src=x onerror=alert(1)>`): a tag's name and its attribute names are
    text an attack is made of (`<script>alert(1)</script>` in a text body is not just `alert(1)`).
    """
    stack: list[str] = []  # tag names cut to _LABEL characters: a name is never copied at full length per field
    seen: set[str] = set()
    n = len(text)
    pos = 0
    while pos < n:
        lt = text.find("<", pos)
        end = n if lt < 0 else lt
        chunk = text[pos:end]
        if chunk.strip():
            out.value("xml", ".".join(stack) or "text", chunk)
        if lt < 0:
            return
        if text.startswith("<!--", lt):
            close = text.find("-->", lt + 4)
            if close < 0:  # unterminated: inspect the rest rather than hide it
                out.value("xml", "comment", text[lt:])
                return
            pos = close + 3
        elif text.startswith("<![CDATA[", lt):
            close = text.find("]]>", lt + 9)
            stop = n if close < 0 else close
            if text[lt + 9 : stop].strip():
                out.value("xml", ".".join(stack) or "text", text[lt + 9 : stop])
            pos = n if close < 0 else close + 3
        elif text.startswith("<!", lt) or text.startswith("<?", lt):
            gt = text.find(">", lt)
            bracket = text.find("[", lt, n if gt < 0 else gt)
            if bracket >= 0:  # DOCTYPE with an internal subset: up to "]>"
                close = text.find("]", bracket)
                close = -1 if close < 0 else text.find(">", close)
            elif text.startswith("<?", lt):
                close = text.find("?>", lt)
                close = -1 if close < 0 else close + 1
            else:
                close = gt
            stop = n if close < 0 else close + 1
            out.value("xml", "doctype", text[lt:stop])
            pos = stop
        elif text.startswith("</", lt):
            gt = text.find(">", lt)
            name = text[lt + 2 : n if gt < 0 else gt].strip()[:_LABEL]
            if name in stack:  # pop back to it (tolerates unclosed tags)
                while stack.pop() != name:
                    pass
            pos = n if gt < 0 else gt + 1
        else:
            m = _TAG.match(text, lt)
            if not m:
                out.value("xml", ".".join(stack) or "text", "<")
                pos = lt + 1
                continue
            tag = m.group(1)[:_LABEL]
            pos = m.end()
            while pos < n:
                a = _ATTR.match(text, pos)
                if a is None:
                    break
                attr, val = a.group(1), a.group(2)
                if val is not None:
                    if val[:1] in ('"', "'") and val[-1:] == val[:1] and len(val) >= 2:
                        val = val[1:-1]
                    out.value("xml", f"{tag}@{attr[:_LABEL]}", val)
                pos = a.end()
            rest = _TAG_END.match(text, pos)
            if rest is None:  # garbage inside the tag (`<svg/onload=...>`): the tag up to `>`, then scan on
                nxt = text.find("<", pos)  # `>` is looked for before the next `<` only: each text is read once
                gt = text.find(">", pos, n if nxt < 0 else nxt)
                raw = text[lt : (n if nxt < 0 else nxt) if gt < 0 else gt + 1]
                if raw not in seen:
                    seen.add(raw)
                    out.value("xml", tag, raw, "tag")
                pos += 1
                continue
            pos = rest.end()
            raw = text[lt:pos]
            if raw not in seen:
                seen.add(raw)
                out.value("xml", tag, raw, "tag")
            if not rest.group(1):  # not self-closing
                if len(stack) >= out.limits.depth:
                    if strict_depth:
                        raise TooLarge(413, "depth")
                    continue
                stack.append(tag)


_TAG = re.compile(r"<([^\s/>!?<]+)")
_LABEL = 64  # characters of a tag, attribute or JSON key kept in the name of the fields under it
# One attribute: each match is linear in what it consumes (the classes do not overlap across steps).
_ATTR = re.compile(r"\s*([^\s=/>]+)(?:\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s>]+))?")
_TAG_END = re.compile(r"\s*(/?)>")


def _multipart_part(out: _Out, chunk: bytes) -> None:
    """One part: its headers (Content-Disposition name and filename) and its content."""
    if chunk.startswith(b"\r\n"):
        chunk = chunk[2:]
    elif chunk.startswith(b"\n"):
        chunk = chunk[1:]
    if chunk.endswith(b"\r\n"):
        chunk = chunk[:-2]
    elif chunk.endswith(b"\n"):
        chunk = chunk[:-1]
    crlf, lf = chunk.find(b"\r\n\r\n"), chunk.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        head, content = chunk[:crlf], chunk[crlf + 4 :]
    elif lf >= 0:
        head, content = chunk[:lf], chunk[lf + 2 :]
    else:
        head, content = b"", chunk
    name, filename, charset = "", None, None
    for line in text_of(head).splitlines():
        hname, _, hvalue = line.partition(":")
        hname = hname.strip().lower()
        if hname == "content-disposition":
            for k, v in _DISPOSITION.findall(hvalue):
                k = k.lower()
                if len(v) >= 2 and v[0] == v[-1] == '"':
                    v = v[1:-1]
                if k == "name":
                    name = v
                elif k in ("filename", "filename*"):
                    filename = v
        elif hname == "content-type":
            charset = dict(_params(hvalue)[1]).get("charset")
    if name:
        out.add("multipart", name, name, "name")
    if filename is not None:
        out.value("multipart", name, filename, "filename")
    if not content:
        out.add("multipart", name, "")
        return
    if is_binary_magic(content):
        runs = strings_of(content)
        if runs:
            out.add("multipart", name, runs, "strings")
        return
    text, _ = _charset(content, charset, out)
    if mostly_printable(text):
        out.value("multipart", name, text)
        if text.lstrip(_JSON_SPACE)[:1] in _JSON_START:  # a JSON part (GraphQL uploads' "operations")
            _json(out, text.strip(_JSON_SPACE), "json", name, "json")
    else:
        runs = strings_of(content)
        if runs:
            out.add("multipart", name, runs, "strings")


_DISPOSITION = re.compile(r";\s*([^=;\s]+)\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^;]*)")


def _multipart(out: _Out, body: bytes, boundaries: list[str]) -> bool:
    """Parts under EVERY boundary the Content-Type names (a duplicate boundary must not hide a part)."""
    found = False
    for boundary in boundaries:
        if not boundary:
            continue
        chunks = body.split(b"--" + boundary.encode("utf-8", "surrogateescape"))
        for chunk in chunks[1:]:
            if chunk.startswith(b"--"):  # the close delimiter; what follows is the epilogue
                break
            found = True
            _multipart_part(out, chunk)
    return found


def _text_or_strings(out: _Out, loc: str, name: str, text: str, raw: bytes) -> None:
    if mostly_printable(text) and not is_binary_magic(raw):
        out.value(loc, name, text)
    else:
        runs = strings_of(raw)
        if runs:
            out.add(loc, name, runs, "strings")


def _body(out: _Out, body: bytes, mime: str, params: list[tuple[str, str]]) -> None:
    """The body by its declared type and by sniffing its content."""
    if not body:
        return
    if mime.startswith("multipart/"):
        boundaries = list(dict.fromkeys(v for k, v in params if k == "boundary"))
        if _multipart(out, body, boundaries):
            return
    charset = next((v for k, v in params if k == "charset"), None)
    text, compatible = _charset(body, charset, out)
    _text_body(out, text, body, mime)
    plain = text if compatible else text_of(body)
    if not compatible and plain != text:  # the origin may read the bytes as UTF-8, ignoring the charset
        _text_body(out, plain, body, mime)
    if charset and b"%" in body and (mime == "application/x-www-form-urlencoded" or _FORMISH.match(plain)):
        _charset_form(out, body, charset)


_UTF8_NAMES = frozenset(("utf-8", "ascii"))


def _charset_form(out: _Out, body: bytes, charset: str) -> None:
    """A form read as a server that honours its `charset=` reads it: each name and value percent-decoded
    to bytes, then decoded in that charset (`%4C%A2%83...` with `charset=ibm037` is `<sc...`), via
    "charset". UTF-8 needs none of this: the normaliser decodes `%XX` as UTF-8; nor does a pair of an
    ASCII-compatible charset (latin-1, Shift JIS, ...) whose bytes are all ASCII: it reads the same."""
    try:
        codec = codecs.lookup(charset)
    except (LookupError, ValueError, TypeError):
        return
    if codec.name in _UTF8_NAMES or not getattr(codec, "_is_text_encoding", True):
        return
    try:
        compatible = _ASCII_PROBE.decode(codec.name) == _ASCII_PROBE.decode("ascii")
    except (UnicodeError, ValueError, TypeError, LookupError):
        compatible = False
    for piece in body.split(b"&"):
        name, eq, val = piece.partition(b"=")
        if not eq:
            name, val = b"", name
        name, val = _unquote_bytes(name), _unquote_bytes(val)
        if compatible and name.isascii() and val.isascii():
            continue
        name_text = _charset_decode(name, codec.name)
        val_text = _charset_decode(val, codec.name)
        if name_text and not (compatible and name.isascii()):
            out.add("form", name_text, name_text, "name")
        if val_text:
            out.value("form", name_text, val_text, "charset")


def _unquote_bytes(b: bytes) -> bytes:
    return unquote_to_bytes(b.replace(b"+", b" ")) if b"%" in b or b"+" in b else b


def _charset_decode(b: bytes, codec: str) -> str:
    try:
        return b.decode(codec, LOSSLESS)
    except (UnicodeError, ValueError, TypeError, LookupError):  # a codec that fails in its own way
        return ""


def _text_body(out: _Out, text: str, raw: bytes, mime: str) -> None:
    if mime == "application/graphql":
        out.value("text", "graphql", text)
        _graphql(out, "text", text)
        return
    stripped = text.lstrip(" \t\r\n\ufeff")
    first = stripped[:1]
    if first in ("{", "[") and (_json(out, stripped) or _ndjson(out, stripped)):
        return
    if first == "<" or mime.endswith(("/xml", "+xml")):
        _xml(out, text, strict_depth=mime.endswith(("/xml", "+xml")))
        return
    if mime == "application/x-www-form-urlencoded" or (_FORMISH.match(stripped) and mostly_printable(text)):
        _pairs(out, "form", text)
        return
    _text_or_strings(out, "text", "body", text, raw)


def _content_encoding(out: _Out, body: bytes, headers: Sequence[tuple[str, str]], limit: int) -> list[bytes]:
    """The body with every Content-Encoding undone (last applied, first undone); bounded by `limit`.

    A coding that fails to decode adds "bad-encoding:<coding>"; then the raw bytes are inspected as they
    are, and so is what decoded before the fault.
    """
    codings = [
        c.strip().lower()
        for name, value in headers
        if name.lower() == "content-encoding"
        for c in value.split(",")
    ]
    data = body
    for coding in reversed(codings):
        if coding in ("", "identity"):
            continue
        try:
            data = _decode_one(coding, data, limit)
        except _BadEncoding as e:
            out.signal(f"bad-encoding:{_signal_text(coding)}")
            return [body, e.partial] if e.partial else [body]
    return [data]


def extract(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    limits: Limits = Limits(),
    content_decoded: bool = False,
) -> Request:
    """Every field of one request, and its request-level signals. Raises `TooLarge` beyond `limits`.

    `headers` are (name, value) pairs as on the wire; `body` is still Content-Encoded unless
    `content_decoded`. `target` is the request target in origin-form (/p?q) or absolute-form.
    """
    if sum(len(k) + len(v) for k, v in headers) > limits.header_bytes:
        raise TooLarge(431, "headers")
    if len(body) > limits.body_bytes:
        raise TooLarge(413, "body")
    out = _Out(limits)
    out.add("method", "method", method)
    if method not in KNOWN_METHODS:
        out.signal(f"unknown-method:{_signal_text(method)}")
    _target(out, target)
    _headers(out, headers)
    if body:
        mime, params = "", []
        for name, value in headers:
            if name.lower() == "content-type":
                kind, p = _params(value)
                mime = mime or kind
                params += p
        bodies = [body] if content_decoded else _content_encoding(out, body, headers, limits.body_bytes)
        for b in bodies:
            _body(out, b, mime, params)
    return Request(out.fields, out.signals)
