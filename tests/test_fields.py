"""addons/fields.py: one HTTP request as its fields, as a user of the WAF expects to see them."""

import base64
import gzip
import json
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons import fields

FORM = "application/x-www-form-urlencoded"


def extract(method="GET", target="/", headers=(), body=b"", **kw):
    return fields.extract(method, target, list(headers), body, **kw)


def triples(req, loc=None):
    """(loc, name, value, via) of every field, or (name, value, via) of those at `loc`."""
    if loc is None:
        return [(f.loc, f.name, f.value, f.via) for f in req.fields]
    return [(f.name, f.value, f.via) for f in req.fields if f.loc == loc]


def values(req, loc=None, via=None):
    return [f.value for f in req.fields if (loc is None or f.loc == loc) and (via is None or f.via == via)]


def post(body, content_type=None, *more_headers, **kw):
    headers = [("Content-Type", content_type)] if content_type else []
    return extract("POST", "/submit", headers + list(more_headers), body, **kw)


def assert_utf8(req):
    for f in req.fields:
        f.loc.encode("utf-8")
        f.name.encode("utf-8")
        f.value.encode("utf-8")  # strict: a lone surrogate raises here


# --- method, path, query ----------------------------------------------------------------------------


def test_method_is_a_field_and_an_unknown_one_a_signal():
    assert triples(extract("GET"), "method") == [("method", "GET", "")]
    req = extract("PROPFIND")
    assert req.signals == []
    req = extract("G3T")
    assert triples(req, "method") == [("method", "G3T", "")]
    assert req.signals == ["unknown-method:G3T"]


def test_path_segments_and_the_whole_path():
    req = extract(target="/static/../../etc/passwd")
    assert triples(req, "path") == [
        ("0", "static", ""),
        ("1", "..", ""),
        ("2", "..", ""),
        ("3", "etc", ""),
        ("4", "passwd", ""),
        ("path", "/static/../../etc/passwd", ""),
    ]


def test_a_one_segment_path_is_not_repeated_as_the_whole_path():
    assert triples(extract(target="/login"), "path") == [("0", "login", "")]


def test_absolute_form_target_drops_scheme_and_authority():
    req = extract(target="http://evil.example:8080/a/b?x=1")
    assert triples(req, "path") == [("0", "a", ""), ("1", "b", ""), ("path", "/a/b", "")]
    assert ("x", "1", "") in triples(req, "query")


def test_query_pairs_are_raw_with_their_names():
    req = extract(target="/s?q=%27%20or%201%3D1&flag&a=b=c&=v&empty=")
    assert triples(req, "query") == [
        ("q", "%27%20or%201%3D1", ""),
        ("q", "q", "name"),
        ("", "flag", ""),
        ("a", "b=c", ""),
        ("a", "a", "name"),
        ("", "v", ""),
        ("empty", "", ""),
        ("empty", "empty", "name"),
    ]


# --- headers, cookies, URL headers ------------------------------------------------------------------


def test_every_header_is_a_field_and_odd_names_are_inspected():
    req = extract(headers=[("Host", "shop.example"), ("X-Api-Version", "2"), ("User-Agent", "curl/8")])
    assert triples(req, "header") == [
        ("host", "shop.example", "authority"),
        ("x-api-version", "2", ""),
        ("x-api-version", "x-api-version", "name"),
        ("user-agent", "curl/8", ""),
    ]


def test_cookies_are_split_into_pairs():
    req = extract(headers=[("Cookie", "session=abc; theme=dark;lang=en ; flag")])
    assert triples(req, "cookie") == [
        ("session", "abc", ""),
        ("session", "session", "name"),
        ("theme", "dark", ""),
        ("theme", "theme", "name"),
        ("lang", "en", ""),
        ("lang", "lang", "name"),
        ("", "flag", ""),
    ]


def test_referer_and_origin_urls_yield_their_path_and_query():
    req = extract(headers=[("Referer", "https://shop.example/cart/view?id=1%27--"), ("Origin", "https://shop.example")])
    assert ("path", "0", "cart", "referer") in triples(req)
    assert ("path", "path", "/cart/view", "referer") in triples(req)
    assert ("query", "id", "1%27--", "referer") in triples(req)
    assert [f for f in req.fields if f.via == "origin"] == []  # no path: nothing more than the header


def test_a_url_header_that_is_not_a_url_is_only_a_header():
    req = extract(headers=[("Referer", "<script>")])
    assert triples(req) == [("method", "method", "GET", ""), ("header", "referer", "<script>", "")]


@pytest.mark.parametrize(
    "ua, tool",
    [
        ("sqlmap/1.7.2#stable (https://sqlmap.org)", "sqlmap"),
        ("Mozilla/5.0 (compatible; Nmap Scripting Engine; https://nmap.org/book/nse.html)", "nmap"),
        ("Mozilla/5.00 (Nikto/2.1.6) (Evasions:None) (Test:000001)", "nikto"),
        ("Fuzz Faster U Fool v2.1.0-dev", "ffuf"),
        ("ffuf/2.1.0", "ffuf"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36", None),
    ],
)
def test_scanner_user_agents_are_signals(ua, tool):
    req = extract(headers=[("User-Agent", ua)])
    assert req.signals == ([f"scanner-ua:{tool}"] if tool else [])
    assert ("user-agent", ua, "") in triples(req, "header")


# --- structured headers: their parts ----------------------------------------------------------------


def test_content_type_parameters_are_parts():
    req = post(b"", 'multipart/form-data; boundary="xyz"; charset=utf-8; x=<svg onload=alert(1)>')
    assert triples(req, "header") == [
        ("content-type", 'multipart/form-data; boundary="xyz"; charset=utf-8; x=<svg onload=alert(1)>', ""),
        ("content-type.boundary", "xyz", "part"),
        ("content-type.charset", "utf-8", "part"),
        ("content-type.x", "<svg onload=alert(1)>", "part"),
    ]


def test_accept_and_client_hint_lists_are_items_without_quotes():
    req = extract(
        headers=[
            ("Accept", "text/html,application/xhtml+xml;q=0.9, */*;q=0.8"),
            ("Accept-Language", "en-US,en;q=0.5"),
            ("Sec-CH-UA", '"Chromium";v="124", "Not-A.Brand";v="99", "<script>"'),
        ]
    )
    parts = [(n, v) for n, v, via in triples(req, "header") if via == "part"]
    assert parts == [
        ("accept.0", "text/html"),
        ("accept.1", "application/xhtml+xml;q=0.9"),
        ("accept.2", "*/*;q=0.8"),
        ("accept-language.0", "en-US"),
        ("accept-language.1", "en;q=0.5"),
        ("sec-ch-ua.0", "Chromium;v=124"),
        ("sec-ch-ua.1", "Not-A.Brand;v=99"),
        ("sec-ch-ua.2", "<script>"),
    ]
    # the whole values are kept as they were
    assert ("accept", "text/html,application/xhtml+xml;q=0.9, */*;q=0.8", "") in triples(req, "header")


def test_a_one_item_list_adds_no_copy_of_itself():
    req = extract(headers=[("Accept", "*/*")])
    assert triples(req, "header") == [("accept", "*/*", "")]


def test_forwarded_pairs_are_parts():
    req = extract(headers=[("Forwarded", 'for=192.0.2.60;proto=http;by="1\' or 1=1--", For=198.51.100.17')])
    parts = [(n, v) for n, v, via in triples(req, "header") if via == "part"]
    assert parts == [
        ("forwarded.for", "192.0.2.60"),
        ("forwarded.proto", "http"),
        ("forwarded.by", "1' or 1=1--"),
        ("forwarded.for", "198.51.100.17"),
    ]


# --- bodies by declared type and by sniffing --------------------------------------------------------


def test_json_keys_and_string_values_at_any_depth():
    req = post(b'{"user": {"name": "bob", "tags": ["a", {"k": "v"}], "age": 3, "ok": true, "n": null}}', "application/json")
    assert triples(req, "json") == [
        ("user", "user", "name"),
        ("user.name", "name", "name"),
        ("user.name", "bob", ""),
        ("user.tags", "tags", "name"),
        ("user.tags.0", "a", ""),
        ("user.tags.1.k", "k", "name"),
        ("user.tags.1.k", "v", ""),
        ("user.age", "age", "name"),
        ("user.ok", "ok", "name"),
        ("user.n", "n", "name"),
    ]


def test_json_duplicate_keys_are_all_seen():
    req = post(b'{"id": "1", "id": "1 union select 1"}', "application/json")
    assert values(req, "json", "") == ["1", "1 union select 1"]


@pytest.mark.parametrize("declared", ["text/plain", "application/octet-stream", None])
def test_json_is_sniffed_whatever_the_declared_type(declared):
    req = post(b'  {"q": "<script>alert(1)</script>"}', declared)
    assert ("q", "<script>alert(1)</script>", "") in triples(req, "json")


def test_ndjson_lines_are_numbered():
    req = post(b'{"a": "x"}\n{"a": "y"}\n\n["z"]\n', "application/x-ndjson")
    assert [(n, v) for n, v, via in triples(req, "json") if via == ""] == [("0.a", "x"), ("1.a", "y"), ("2.0", "z")]


def test_a_body_that_is_not_json_after_all_is_text():
    req = post(b"{not json at all", "application/json")
    assert triples(req, "text") == [("body", "{not json at all", "")]


def test_form_declared_and_sniffed():
    declared = post(b"user=admin&pass=%27+or+%271%27%3D%271", FORM)
    sniffed = post(b"user=admin&pass=%27+or+%271%27%3D%271", "text/plain")
    for req in (declared, sniffed):
        assert triples(req, "form") == [
            ("user", "admin", ""),
            ("user", "user", "name"),
            ("pass", "%27+or+%271%27%3D%271", ""),
            ("pass", "pass", "name"),
        ]


MULTIPART = (
    b"--BOUND\r\n"
    b'Content-Disposition: form-data; name="title"\r\n\r\n'
    b"hello' or 1=1--\r\n"
    b"--BOUND\r\n"
    b'Content-Disposition: form-data; name="avatar"; filename="../../shell.php"\r\n'
    b"Content-Type: image/png\r\n\r\n"
    b"<?php system($_GET['c']); ?>\r\n"
    b"--BOUND\r\n"
    b'Content-Disposition: form-data; name="pic"; filename="a.png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR<script>alert(document.domain)</script>\x00\x01\r\n"
    b"--BOUND--\r\n"
    b"epilogue is not a part"
)


def test_multipart_names_filenames_values_and_a_png_that_is_text():
    req = post(MULTIPART, "multipart/form-data; boundary=BOUND")
    assert triples(req, "multipart") == [
        ("title", "title", "name"),
        ("title", "hello' or 1=1--", ""),
        ("avatar", "avatar", "name"),
        ("avatar", "../../shell.php", "filename"),
        ("avatar", "<?php system($_GET['c']); ?>", ""),  # declared image/png, but text: read as text
        ("pic", "pic", "name"),
        ("pic", "a.png", "filename"),
        ("pic", "IHDR<script>alert(document.domain)</script>", "strings"),  # a real PNG: its printable runs
    ]


def test_multipart_under_every_declared_boundary():
    body = (
        b'--A\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--A--\r\n'
        b'--B\r\nContent-Disposition: form-data; name="b"\r\n\r\n<x>\r\n--B--'
    )
    req = post(body, "multipart/form-data; boundary=A; boundary=B")
    assert ("b", "<x>", "") in triples(req, "multipart")


def test_multipart_json_part_yields_its_keys_and_values():
    body = b'--B\r\nContent-Disposition: form-data; name="operations"\r\n\r\n{"query": "{ a(id: \\"1 or 1=1\\") }"}\r\n--B--'
    req = post(body, "multipart/form-data; boundary=B")
    assert ("operations.query", "{ a(id: \"1 or 1=1\") }", "json") in triples(req, "json")
    assert ("graphql.id", "1 or 1=1", "graphql") in triples(req, "json")


SOAP = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">
  <soap:Body><login user="admin' --"><pass>&xxe;</pass><![CDATA[<script>]]></login></soap:Body>
</soap:Envelope>"""


def test_xml_soap_text_attributes_and_declarations_without_entity_expansion():
    req = post(SOAP, "text/xml")
    got = triples(req, "xml")
    assert ("doctype", '<?xml version="1.0"?>', "") in got
    assert ("doctype", '<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>', "") in got
    assert ("login@user", "admin' --", "") in got
    assert ("soap:Envelope.soap:Body.login.pass", "&xxe;", "") in got  # the entity reference, never its text
    assert ("soap:Envelope.soap:Body.login", "<script>", "") in got
    assert "root:" not in "".join(values(req))


def test_xml_is_sniffed_in_a_text_body_and_its_tags_are_fields():
    req = post(b"<a><b>1</b><b>2</b></a>", "text/plain")
    assert triples(req, "xml") == [("a", "<a>", "tag"), ("b", "<b>", "tag"), ("a.b", "1", ""), ("a.b", "2", "")]


def test_markup_in_a_body_keeps_its_tags():
    req = post(b"<p>hi</p><script>alert(1)</script><svg/onload=alert(2)>", "text/plain")
    got = triples(req, "xml")
    assert ("script", "<script>", "tag") in got
    assert ("p.script", "alert(1)", "") in got or ("script", "alert(1)", "") in got
    assert [v for n, v, via in got if via == "tag" and v.startswith("<svg")] == ["<svg/onload=alert(2)>"]


def test_long_names_are_cut_in_the_paths_under_them():
    req = post(b"<c><" + b"a" * 5000 + b">" + b"x<b/>" * 50 + b"</c>", "text/xml")
    assert max(len(f.name) for f in req.fields) <= 2 * 64 + 1
    key = "k" * 5000
    req = post(json.dumps({key: {"b": ["x", "y"]}}).encode(), "application/json")
    assert (key[:64] + ".b.1", "y", "") in triples(req, "json")
    assert (key[:64], key, "name") in triples(req, "json")  # the key itself is kept whole


def test_graphql_body_and_its_string_arguments():
    body = b'query Q($u: String = "guest") { user(name: "x\\" or 1=1--", bio: """<b>\nhi</b>""") { id } }'
    req = post(body, "application/graphql")
    assert triples(req, "text") == [
        ("graphql", body.decode(), ""),
        ("graphql", "guest", "graphql"),  # a variable's default: no `name:` before it
        ("graphql.name", 'x\\" or 1=1--', "graphql"),
        ("graphql.bio", "<b>\nhi</b>", "graphql"),
    ]


def test_graphql_in_a_json_query_key_and_in_a_get_query():
    req = post(json.dumps({"query": '{ user(name: "<img src=x onerror=alert(1)>") { id } }'}).encode(), "application/json")
    assert ("graphql.name", "<img src=x onerror=alert(1)>", "graphql") in triples(req, "json")
    req = extract(target='/graphql?query=%7Buser(name%3A%22%27%20or%201%3D1%22)%7Bid%7D%7D')
    assert ("graphql.name", "' or 1=1", "graphql") in triples(req, "text")


def test_graphql_unclosed_string_ends_at_the_newline_and_is_still_seen():
    req = post(b'{ a(x: "open\n<script>") }', "application/graphql")
    assert ("graphql.x", "open", "graphql") in triples(req, "text")


def test_plain_text_and_binary_bodies():
    assert triples(post(b"just some words", "text/plain"), "text") == [("body", "just some words", "")]
    elf = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 20 + b"/bin/sh -c id;cat /etc/passwd" + b"\x00\x01"
    req = post(elf, "application/octet-stream")
    assert triples(req, "text") == [("body", "/bin/sh -c id;cat /etc/passwd", "strings")]


# --- nested JSON ------------------------------------------------------------------------------------


def test_json_inside_a_json_string():
    doc = {"data": json.dumps({"a": "<script>", "b": [json.dumps({"c": "x"})]})}
    req = post(json.dumps(doc).encode(), "application/json")
    got = triples(req, "json")
    assert ("data.a", "a", "name") in got
    assert ("data.a", "<script>", "json") in got
    assert ("data.b.0.c", "x", "json") in got  # two layers down


def test_json_inside_a_query_or_form_value_percent_encoded_or_not():
    req = extract(target="/api?data=%7B%22a%22%3A%22%3Cscript%3E%22%7D&raw=[%22x%22,{%22k%22:%22v%22}]")
    got = triples(req, "json")
    assert ("data.a", "<script>", "json") in got
    assert ("raw.0", "x", "json") in got
    assert ("raw.1.k", "v", "json") in got
    req = post(b"payload=%7B%22q%22%3A%22union+select%22%7D", FORM)
    assert ("payload.q", "union select", "json") in triples(req, "json")
    req = extract(headers=[("Cookie", "prefs=%7B%22lang%22%3A%22en%27--%22%7D; sid=1")])
    assert ("prefs.lang", "en'--", "json") in triples(req, "json")


def test_a_value_that_only_looks_like_json_adds_nothing():
    req = extract(target="/s?q=%7Bnot+json&r=[1,2]")
    assert triples(req, "json") == []


def test_nesting_depth_counts_across_layers():
    limits = fields.Limits(depth=6)
    req = post(json.dumps({"a": "[" * 5 + '"x"' + "]" * 5}).encode(), "application/json", limits=limits)  # 1 + 5
    assert ("a.0.0.0.0.0", "x", "json") in triples(req, "json")
    with pytest.raises(fields.TooLarge) as e:  # 1 + 6
        post(json.dumps({"a": "[" * 6 + "]" * 6}).encode(), "application/json", limits=limits)
    assert (e.value.status, e.value.what) == (413, "depth")
    three_layers = {"a": json.dumps([json.dumps([[json.dumps([["x"]])]])])}  # 1 + 1 + 2 + 2
    req = post(json.dumps(three_layers).encode(), "application/json", limits=limits)
    assert ("a.0.0.0.0.0", "x", "json") in triples(req, "json")
    three_layers = {"a": json.dumps([json.dumps([[json.dumps([[[]]])]])])}  # 1 + 1 + 2 + 3
    with pytest.raises(fields.TooLarge):
        post(json.dumps(three_layers).encode(), "application/json", limits=limits)
    with pytest.raises(fields.TooLarge):  # a query value's JSON counts from 1
        extract(target="/?q=" + "[" * 7 + "]" * 7, limits=limits)
    req = extract(target="/?q=" + "[" * 6 + "%22x%22" + "]" * 6, limits=limits)
    assert ("q.0.0.0.0.0.0", "x", "json") in triples(req, "json")


def test_nested_fields_count_against_the_field_limit():
    doc = json.dumps({"x": json.dumps({f"k{i}": "v" for i in range(50)})}).encode()
    with pytest.raises(fields.TooLarge) as e:
        post(doc, "application/json", limits=fields.Limits(fields=60))
    assert e.value.what == "fields"


# --- charsets ---------------------------------------------------------------------------------------


def test_declared_charset():
    req = post("q=café".encode("latin-1"), "text/plain; charset=iso-8859-1")
    assert ("q", "café", "") in triples(req, "form")


@pytest.mark.parametrize("codec, bom", [("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"),
                                        ("utf-32-le", b"\xff\xfe\x00\x00"), ("utf-32-be", b"\x00\x00\xfe\xff")])
def test_boms(codec, bom):
    req = post(bom + '{"q": "<script>"}'.encode(codec), "application/json")
    assert ("q", "<script>", "") in triples(req, "json")


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_without_bom_are_detected(codec):
    req = post('{"q": "\' or 1=1"}'.encode(codec), "application/json")
    assert ("q", "' or 1=1", "") in triples(req, "json")


def test_utf7():
    req = post(b"+ADw-script+AD4-alert(1)+ADw-/script+AD4-", "text/plain; charset=utf-7")
    assert ("script", "<script>", "tag") in triples(req, "xml")  # decoded, it is markup
    assert ("script", "alert(1)", "") in triples(req, "xml")
    assert "+ADw-script+AD4-alert(1)+ADw-/script+AD4-" in values(req, "text")  # and as the bytes are


def test_ibm037_raw_body():
    req = post("user=<script>".encode("cp037"), "text/plain; charset=ibm037")
    assert ("user", "<script>", "") in triples(req, "form")


def test_ibm037_percent_encoded_form_is_decoded_as_bytes_of_that_charset():
    req = post(b"%89%A3%85%94=%4C%A2%83%99%89%97%A3%6E", FORM + "; charset=ibm037")
    got = triples(req, "form")
    assert ("item", "<script>", "charset") in got
    assert ("item", "item", "name") in got
    assert ("%89%A3%85%94", "%4C%A2%83%99%89%97%A3%6E", "") in got  # what it yielded before is still there


@pytest.mark.parametrize(
    "charset, codec, text",
    [("utf-16le", "utf-16-le", "' or 1=1"), ("cp875", "cp875", "' or 1=1"), ("shift_jis", "shift_jis", "\uff1cscript\uff1e")],
)
def test_percent_encoded_form_in_other_charsets(charset, codec, text):
    def pct(s):  # as a client of that charset sends it: every byte escaped (a literal `q` is byte 0x71 in cp875)
        return "".join(f"%{c:02X}" for c in s.encode(codec)).encode()

    req = post(pct("q") + b"=" + pct(text), f"{FORM}; charset={charset}")
    assert ("q", text, "charset") in triples(req, "form")


@pytest.mark.parametrize("charset", ["utf-8", "UTF8", "us-ascii", "iso-8859-1", "shift_jis"])
def test_forms_that_read_the_same_in_their_charset_add_no_charset_layer(charset):
    req = post(b"q=%3Cscript%3E&n=1+2", f"{FORM}; charset={charset}")
    assert [f for f in req.fields if f.via == "charset"] == []


def test_latin1_form_with_a_non_ascii_escape_is_read_in_latin1():
    req = post(b"id=1&q=%E9%27+or+1%3D1", FORM + "; charset=iso-8859-1")
    assert [(n, v, via) for n, v, via in triples(req, "form") if via == "charset"] == [("q", "\xe9' or 1=1", "charset")]


def test_unknown_charset_is_a_signal_and_utf8_is_read():
    req = post(b"q=<x>", "text/plain; charset=klingon")
    assert "bad-charset:klingon" in req.signals
    assert ("q", "<x>", "") in triples(req, "form")


# --- lossless bytes ---------------------------------------------------------------------------------


def test_an_invalid_utf8_byte_is_kept_as_its_latin1_character():
    assert fields.text_of(b"a\xffb") == "a\xffb"
    assert fields.text_of("é".encode() + b"\xc3") == "é\xc3"
    req = post(b"q=' or \xff1=1", FORM)
    assert ("q", "' or \xff1=1", "") in triples(req, "form")


def test_text_of_never_yields_a_surrogate():
    assert fields.text_of(b"ab\xed\xa0\x80c") == "ab\xed\xa0\x80c"  # an encoded surrogate is three bad bytes
    assert fields.text_of(b"\xed\xb2\x80") == "\xed\xb2\x80"


def test_text_of_is_the_lossless_decoding():
    samples = [b"", b"\x00", b"plain", b"\x80\x81", b"\xe2\x82", b"\xf0\x9f\x98\x80\xff\x00", bytes(range(256))]
    samples += [bytes(range(256)) * 8 + b"\x00", "é".encode() * 300 + b"\xed\xa0\x80" + b"\x00" * 3]  # long: numpy
    for b in samples:
        assert fields.text_of(b) == b.decode("utf-8", fields.LOSSLESS)


def test_lone_surrogates_from_json_and_utf7_become_replacement_characters():
    req = post(b'{"a\\udc00": "x\\ud800<script>", "pair": "\\ud83d\\ude00"}', "application/json")
    assert_utf8(req)
    assert ("a\ufffd", "x\ufffd<script>", "") in triples(req, "json")
    assert ("pair", "\U0001f600", "") in triples(req, "json")
    req = post(b"+2AA-", "text/plain; charset=utf-7")
    assert_utf8(req)


def test_header_strings_with_surrogates_from_a_caller_still_encode():
    assert_utf8(extract(target="/\udcff?q=\ud800", headers=[("X-A", "\udc80<x>"), ("Cookie", "a=\udcff")]))


# --- Content-Encodings ------------------------------------------------------------------------------


def test_gzip_multi_member():
    body = gzip.compress(b"a=1&b=") + gzip.compress(b"<script>")
    req = post(body, FORM, ("Content-Encoding", "gzip"))
    assert ("b", "<script>", "") in triples(req, "form")
    assert req.signals == []


def test_deflate_zlib_and_raw():
    wrapped = zlib.compress(b'{"q": "union select"}')
    raw = zlib.compressobj(wbits=-15)
    raw = raw.compress(b'{"q": "union select"}') + raw.flush()
    for body in (wrapped, raw):
        req = post(body, "application/json", ("Content-Encoding", "deflate"))
        assert ("q", "union select", "") in triples(req, "json")


def test_brotli_and_zstd():
    brotli = pytest.importorskip("brotli")
    req = post(brotli.compress(b"q=<svg/onload=alert(1)>"), FORM, ("Content-Encoding", "br"))
    assert ("q", "<svg/onload=alert(1)>", "") in triples(req, "form")
    if fields.zstd is None:
        pytest.skip("no zstd module")
    two_frames = fields.zstd.compress(b"q=../../") + fields.zstd.compress(b"etc/passwd")
    req = post(two_frames, FORM, ("Content-Encoding", "zstd"))
    assert ("q", "../../etc/passwd", "") in triples(req, "form")


def test_stacked_encodings_are_undone_last_first():
    body = gzip.compress(zlib.compress(b"q=<x>"))
    req = post(body, FORM, ("Content-Encoding", "deflate, gzip"))
    assert ("q", "<x>", "") in triples(req, "form")


def test_a_broken_encoding_is_a_signal_and_the_raw_bytes_are_inspected():
    req = post(b"q=<script>", FORM, ("Content-Encoding", "gzip"))
    assert req.signals == ["bad-encoding:gzip"]
    assert ("q", "<script>", "") in triples(req, "form")


def test_truncated_gzip_keeps_what_decoded():
    body = gzip.compress(b"q=<script>alert(1)</script>" + bytes(range(256)) * 40)[:-30]
    req = post(body, FORM, ("Content-Encoding", "gzip"))
    assert "bad-encoding:gzip" in req.signals
    assert any(v.startswith("<script>alert(1)</script>") for v in values(req, "form"))


def test_content_decoded_bodies_are_not_decoded_again():
    req = post(b"q=<x>", FORM, ("Content-Encoding", "gzip"), content_decoded=True)
    assert req.signals == []
    assert ("q", "<x>", "") in triples(req, "form")


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_decompression_bombs_are_too_large(coding):
    limits = fields.Limits(body_bytes=100_000)
    plain = b"\x00" * 1_000_000
    if coding == "gzip":
        body = gzip.compress(plain)
    elif coding == "deflate":
        body = zlib.compress(plain)
    elif coding == "br":
        body = pytest.importorskip("brotli").compress(plain)
    else:
        if fields.zstd is None:
            pytest.skip("no zstd module")
        body = fields.zstd.compress(plain)
    assert len(body) < limits.body_bytes
    with pytest.raises(fields.TooLarge) as e:
        post(body, FORM, ("Content-Encoding", coding), limits=limits)
    assert (e.value.status, e.value.what) == (413, "body")


def test_a_gzip_bomb_spread_over_members_is_too_large():
    limits = fields.Limits(body_bytes=100_000)
    body = gzip.compress(b"\x00" * 60_000) * 2
    with pytest.raises(fields.TooLarge):
        post(body, FORM, ("Content-Encoding", "gzip"), limits=limits)


# --- limits -----------------------------------------------------------------------------------------


def test_body_limit():
    with pytest.raises(fields.TooLarge) as e:
        post(b"a" * 101, "text/plain", limits=fields.Limits(body_bytes=100))
    assert (e.value.status, e.value.what) == (413, "body")
    post(b"a" * 100, "text/plain", limits=fields.Limits(body_bytes=100))


def test_field_limit():
    target = "/?" + "&".join(f"k{i}=v" for i in range(30))
    with pytest.raises(fields.TooLarge) as e:
        extract(target=target, limits=fields.Limits(fields=50))
    assert (e.value.status, e.value.what) == (413, "fields")
    assert len(extract(target=target, limits=fields.Limits(fields=61)).fields) == 61


def test_json_depth_limit():
    limits = fields.Limits(depth=10)
    post(b'{"a": ' + b"[" * 9 + b"]" * 9 + b"}", "application/json", limits=limits)
    with pytest.raises(fields.TooLarge) as e:
        post(b'{"a": ' + b"[" * 10 + b"]" * 10 + b"}", "application/json", limits=limits)
    assert e.value.what == "depth"
    with pytest.raises(fields.TooLarge):  # deeper than the interpreter can parse
        post(b"[" * 100_000 + b"]" * 100_000, "application/json")


def test_xml_depth_limit_when_declared_xml():
    deep = b"<a>" * 20 + b"x" + b"</a>" * 20
    with pytest.raises(fields.TooLarge):
        post(deep, "application/xml", limits=fields.Limits(depth=10))
    assert "x" in values(post(deep, "text/plain", limits=fields.Limits(depth=10)), "xml")


def test_header_bytes_limit_is_431():
    with pytest.raises(fields.TooLarge) as e:
        extract(headers=[("X-Big", "a" * 100)], limits=fields.Limits(header_bytes=100))
    assert (e.value.status, e.value.what) == (431, "headers")
    extract(headers=[("X-Big", "a" * 95)], limits=fields.Limits(header_bytes=100))


# --- base64 / hex layers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        ("YWRtaW4nLS0", "admin'--"),  # 11 characters
        ("YWRtaW4nLS0=", "admin'--"),
        ("YWRtaW4nLS0%3D", "admin'--"),
        ("PHNjcmlwdD4", "<script>"),
        ("Li4vLi4v", "../../"),  # 8 characters
        ("PHN2ZyBvbmxvYWQ9YWxlcnQoMSk-", "<svg onload=alert(1)>"),  # URL-safe alphabet
        (base64.b64encode(b"' union select password from users--").decode(), "' union select password from users--"),
    ],
)
def test_base64_layers(value, text):
    assert fields.decode_layer(value) == ("base64", text)
    req = extract(target=f"/?q={value}")
    assert ("q", text, "base64") in triples(req, "query")


def test_hex_layer_and_a_base64_of_a_base64():
    value = b"<script>alert(1)</script>".hex()
    assert fields.decode_layer(value) == ("hex", "<script>alert(1)</script>")
    twice = base64.b64encode(base64.b64encode(b"1' or '1'='1")).decode()
    req = extract(target=f"/?q={twice}")
    assert [v for n, v, via in triples(req, "query") if via == "base64"] == [
        base64.b64encode(b"1' or '1'='1").decode(),
        "1' or '1'='1",
    ]


@pytest.mark.parametrize(
    "value",
    ["abcdefgh", "password", "12345678", "deadbeef", "username", "firstname", "Password1", "download",
     "5f4dcc3b5aa765d61d8327deb882cf99", "d41d8cd98f00b204e9800998ecf8427e", "550e8400e29b41d4", "1700000000",
     "category", "checkout", "HelloWorld", "abc"],
)
def test_words_and_ids_are_not_decoded_into_garbage(value):
    assert fields.decode_layer(value) is None
    assert [f for f in extract(target=f"/?q={value}").fields if f.via in ("base64", "hex")] == []


def test_random_short_ids_rarely_decode():
    import random
    import string

    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits
    ids = ["".join(rng.choice(alphabet) for _ in range(rng.randint(8, 15))) for _ in range(5000)]
    assert sum(fields.decode_layer(i) is not None for i in ids) <= 10  # about 1 in 3000 on average


# --- never raises but TooLarge ----------------------------------------------------------------------

_HEADER_NAMES = st.sampled_from(
    ["Content-Type", "Content-Encoding", "Cookie", "Referer", "Accept", "Sec-CH-UA", "Forwarded", "User-Agent", "X-Odd"]
)
_HEADER_VALUES = st.one_of(
    st.text(max_size=40),
    st.text(max_size=12).map(lambda t: f"{FORM}; charset={t}"),
    st.sampled_from(
        [
            "gzip", "deflate, br", "zstd", "x-gzip", "application/json", "application/graphql", "text/xml",
            FORM + "; charset=ibm037", "text/plain; charset=utf-7", "multipart/form-data; boundary=b",
            "text/plain; charset=utf-16", "a; charset=unicode_escape", "a; charset=punycode", "a; charset=idna",
            "a; charset=rot13", "a; charset=hex", 'a; charset="', "https://x/a?b=c", 'for="x;by=', '"a", "b',
        ]
    ),
)
_BODY_ATOMS = st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"', b"\\", b"%", b"%7B", b"=", b"&", b"query", b":", b"\n", b'"""', b"\xed\xa0\x80",
     b"\\ud800", b"\\udc00", b"+2AA-", b"--b", b"\r\n\r\n", b"<", b"<!", b"<?", b">", b"a", b"\x00", b"\xff", b"YWRtaW4nLS0", b","]
)
_BODIES = st.one_of(st.binary(max_size=200), st.lists(_BODY_ATOMS, max_size=40).map(b"".join))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.text(max_size=8),
    target=st.text(max_size=40),
    headers=st.lists(st.tuples(st.one_of(_HEADER_NAMES, st.text(max_size=10)), _HEADER_VALUES), max_size=6),
    body=_BODIES,
)
def test_any_request_yields_fields_or_too_large(method, target, headers, body):
    try:
        req = fields.extract(method, target, headers, body, fields.Limits(fields=2000, depth=20))
    except fields.TooLarge as e:
        assert e.status in (413, 431)
        return
    assert_utf8(req)
    assert all(f.loc in fields.LOCATIONS for f in req.fields)


@pytest.mark.parametrize("host, via", [
    ("shop.example", "authority"),
    ("127.0.0.1:41234", "authority"),
    ("[2001:db8::1]:8443", "authority"),
    ("x' or 1=1-- ", ""),  # not an authority: an ordinary field
    ("a.example/../../etc/passwd", ""),
    ("a.example:99999999", ""),
])
def test_a_well_formed_host_is_marked_as_an_authority(host, via):
    got = [(f.name, f.value, f.via) for f in extract("GET", "/", [("Host", host)], b"").fields if f.loc == "header"]
    assert got == [("host", host, via)]
