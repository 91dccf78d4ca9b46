"""The evasion suite (issue 14): every family of tests/evasion.py x every classic attack, refused.

1. Each classic attack is refused when sent plainly (its query parameter) by the shipped model.
2. In process: every family x every attack through the real addons (FeatureExtractor + Scorer in one
   module-scoped taddons context, the shipped model): refused with 403, or 413/431 where the request is
   beyond the inspection limits (never forwarded uninspected, so not a bypass either).
3. End to end: one attack per family through a real mitmdump in front of the demo app, refused without
   reaching the app.

Today's model lets some pairs through. They are listed in KNOWN_BYPASSES, which is asserted exactly: a new
bypass fails, and so does a listed pair that is now refused (remove it: the list can only shrink). The
families are never weakened to make a model pass. `scripts/evasion_report.py --pairs` shows each bypass
with its score and the field that scored highest.
"""

from __future__ import annotations

import http.client as httpclient

import evasion
import pytest
import pytest_asyncio
from mitmproxy import http
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons import common
from addons import model
from addons.features import FeatureExtractor
from addons.scorer import Scorer

REFUSED = (common.BLOCK_STATUS, 413, 431)

# Why pairs pass today (model m1, "local-m1", at the card's threshold 6). The file and function named are
# where the fault is; none of them is this suite's to fix.
PADDED = ("fieldmodel.injection skips libinjection on a normalised text over 128 characters, though the n-grams read "
          "only '\\x01h <payload>' (the A-padding is one hex shape token): short payloads lose the signal, score 6")
PADDED_Z = ("fieldmodel.ngram_keys counts every occurrence of an n-gram (term frequency, not presence): the ~120 "
            "z's sharing the payload's 128-character window add up one benign n-gram's weight and outweigh it")
WORDS = ("model: the payload shares its 128-character window with 4 KB of words (n-grams diluted), and "
         "fieldmodel.injection skips libinjection on texts over 128 characters: 5-6; the json class more than query")
LDAP = "model: the LDAP filter is marginal plainly (8/10: p 0.958, operating point 0.928); as a header value it scores 6"
WRAPPED = "model: a short SQLi in the header's syntax (for=\"..\", Bearer .., an ETag's quotes) scores 5-6"
STRUCTURED = ("fields._headers keeps a structured header (Sec-CH-UA, Content-Type) whole: its items are no fields of "
              "their own; the wrapped payload scores 5-6")


def invisible(ch: str) -> str:
    return (f"normaliser: fieldmodel.normalise (featurize.normalise) keeps {ch} (NFKC and _CTRL leave it), so the "
            "payload's n-grams stay split; only attacks whose n-grams survive are caught")


IBM037 = ("fields._body: a form's percent-escapes are never decoded in its declared charset (IBM037): the body reads as "
          "IBM037 noise, then as UTF-8 pairs whose %XX normalise to Latin-1 noise")
B64_PATH = ("model: the decoded path segment (path base64) of a URL payload scores 6; admin'-- in base64 is 11 "
            "characters, under fields.decode_layer's 12")
GRAPHQL = ("fields: a GraphQL string argument is no field of its own (the whole query is one value); the query around "
           "it scores 5-6")
PATH = "model: the path class scores URL-shaped payloads (SSRF, php://filter), percent-encoded in a segment, 4-6"
NAME = "model: the name class scores a payload used as a parameter name or JSON key 5-6"
NESTED_JSON = ("fields._Out.value decodes base64/hex layers only: a JSON document inside a value is not parsed, so the "
               "payload is scored inside its JSON syntax (4-6)")

# family: (why, the attacks that pass through it)
_KNOWN: dict[str, tuple[str, str]] = {
    "pad16k_query_same": (PADDED, "sqli_login ldap_injection"),
    "pad70k_query_same": (PADDED, "sqli_login ldap_injection"),
    "pad16k_json_same": (PADDED, "sqli_stacked sqli_login ldap_injection"),
    "pad70k_json_same": (PADDED, "sqli_stacked sqli_login ldap_injection"),
    "pad16k_form_same": (PADDED, "sqli_login ldap_injection"),
    "pad70k_form_same": (PADDED, "sqli_login ldap_injection"),
    "pad16k_query_same_z": (PADDED_Z,
        "sqli_tautology sqli_union sqli_time sqli_stacked sqli_error sqli_login xss_script xss_img xss_svg "
        "xss_js_uri traversal_windows lfi_php_filter cmdi_semicolon cmdi_subshell cmdi_pipe log4shell "
        "ssti_spel ssrf_aws ssrf_gcp ssrf_file php_code ldap_injection"),
    "pad16k_json_same_z": (PADDED_Z,
        "sqli_tautology sqli_union sqli_time sqli_stacked sqli_error sqli_login xss_script xss_img xss_svg "
        "xss_js_uri traversal_windows lfi_php_filter cmdi_semicolon cmdi_subshell cmdi_pipe shellshock "
        "log4shell log4shell_nested ssti_spel ssrf_aws ssrf_gcp ssrf_file php_code ldap_injection"),
    "pad16k_form_same_z": (PADDED_Z,
        "sqli_tautology sqli_union sqli_time sqli_stacked sqli_error sqli_login xss_script xss_img xss_svg "
        "xss_js_uri traversal_windows lfi_php_filter cmdi_semicolon cmdi_subshell cmdi_pipe log4shell "
        "ssti_spel ssrf_aws ssrf_gcp ssrf_file php_code ldap_injection"),
    "pad70k_query_same_z": (PADDED_Z,
        "sqli_tautology sqli_union sqli_time sqli_stacked sqli_error sqli_login xss_script xss_img xss_svg "
        "xss_js_uri traversal_windows lfi_php_filter cmdi_semicolon cmdi_subshell cmdi_pipe log4shell "
        "ssti_spel ssrf_aws ssrf_gcp ssrf_file php_code ldap_injection"),
    "pad70k_json_same_z": (PADDED_Z,
        "sqli_tautology sqli_union sqli_time sqli_stacked sqli_error sqli_login xss_script xss_img xss_svg "
        "xss_js_uri traversal_windows lfi_php_filter cmdi_semicolon cmdi_subshell cmdi_pipe shellshock "
        "log4shell log4shell_nested ssti_spel ssrf_aws ssrf_gcp ssrf_file php_code ldap_injection"),
    "pad70k_form_same_z": (PADDED_Z,
        "sqli_tautology sqli_union sqli_time sqli_stacked sqli_error sqli_login xss_script xss_img xss_svg "
        "xss_js_uri traversal_windows lfi_php_filter cmdi_semicolon cmdi_subshell cmdi_pipe log4shell "
        "ssti_spel ssrf_aws ssrf_gcp ssrf_file php_code ldap_injection"),
    "words4k_query": (WORDS, "sqli_stacked sqli_login ldap_injection"),
    "words4k_json": (WORDS,
        "sqli_tautology sqli_union sqli_time sqli_stacked sqli_login xss_img xss_svg xss_js_uri cmdi_pipe "
        "ssrf_aws ldap_injection"),
    "words4k_form": (WORDS, "sqli_stacked sqli_login ldap_injection"),
    "header_x_api_version": (LDAP, "ldap_injection"),
    "header_accept_language": (LDAP, "ldap_injection"),
    "header_x_foo": (LDAP, "ldap_injection"),
    "header_origin": (LDAP, "ldap_injection"),
    "header_x_forwarded_host": (LDAP, "ldap_injection"),
    "header_x_forwarded_for": (WRAPPED, "sqli_stacked ldap_injection"),
    "header_x_real_ip": (LDAP, "ldap_injection"),
    "header_forwarded": (WRAPPED, "sqli_stacked sqli_login ldap_injection"),
    "header_authorization": (WRAPPED, "sqli_stacked ldap_injection"),
    "header_accept": (LDAP, "ldap_injection"),
    "header_x_requested_with": (LDAP, "ldap_injection"),
    "header_if_none_match": (WRAPPED, "sqli_stacked"),
    "header_cache_control": (LDAP, "ldap_injection"),
    "header_x_http_method_override": (LDAP, "ldap_injection"),
    "header_sec_ch_ua": (STRUCTURED, "sqli_union sqli_stacked sqli_login ssrf_aws ssrf_gcp ldap_injection"),
    "header_true_client_ip": (LDAP, "ldap_injection"),
    "header_x_client_data": (LDAP, "ldap_injection"),
    "content_type_param": (STRUCTURED, "sqli_union sqli_stacked sqli_login xss_js_uri ssrf_aws ldap_injection"),
    "content_type_whole": (LDAP, "ldap_injection"),
    "zwsp_json": (invisible("U+200B"), "sqli_time sqli_stacked sqli_login xss_js_uri"),
    "zwsp_json_escaped": (invisible("U+200B"), "sqli_time sqli_stacked sqli_login xss_js_uri"),
    "zwsp_query": (invisible("U+200B"), "sqli_time sqli_stacked sqli_login xss_js_uri ssrf_file"),
    "soft_hyphen_json": (invisible("U+00AD"),
        "sqli_tautology sqli_union sqli_time sqli_stacked sqli_error sqli_login xss_script xss_img xss_svg "
        "xss_js_uri xss_attr_break traversal_unix traversal_windows lfi_php_filter cmdi_semicolon "
        "cmdi_subshell cmdi_pipe shellshock log4shell log4shell_nested ssti_jinja ssti_spel ssrf_aws ssrf_gcp "
        "ssrf_file xxe php_code ldap_injection"),
    "bidi_rlo_json": (invisible("U+202E"), "sqli_stacked sqli_login"),
    "bidi_isolate_json": (invisible("U+2066"),
        "sqli_union sqli_time sqli_stacked sqli_error sqli_login xss_script xss_img xss_svg xss_js_uri "
        "xss_attr_break traversal_windows lfi_php_filter cmdi_semicolon cmdi_subshell cmdi_pipe log4shell "
        "log4shell_nested ssti_jinja ssti_spel ssrf_aws ssrf_gcp ssrf_file php_code ldap_injection"),
    "zwj_json": (invisible("U+200D"), "sqli_time sqli_stacked sqli_login xss_js_uri"),
    "bom_inside_json": (invisible("U+FEFF"),
        "sqli_union sqli_time sqli_stacked sqli_error sqli_login xss_script xss_img xss_svg xss_js_uri "
        "xss_attr_break traversal_windows lfi_php_filter cmdi_semicolon cmdi_subshell cmdi_pipe log4shell "
        "log4shell_nested ssti_jinja ssti_spel ssrf_aws ssrf_gcp ssrf_file php_code ldap_injection"),
    "invalid_utf8_inside": ("model: the marginal LDAP filter with a byte 0xff (kept as U+00FF) inside scores 6",
        "ldap_injection"),
    "ibm037_form_pct": (IBM037,
        "sqli_stacked sqli_login xss_script xss_img xss_svg xss_js_uri lfi_php_filter cmdi_subshell cmdi_pipe "
        "log4shell log4shell_nested ssrf_gcp ssrf_file"),
    "base64_path": (B64_PATH, "sqli_login lfi_php_filter ssrf_aws ssrf_gcp"),
    "null_byte": ("model: a short payload after shoes<NUL> in one value scores 6", "sqli_login ldap_injection"),
    "graphql": (GRAPHQL, "sqli_union sqli_stacked sqli_login ldap_injection"),
    "graphql_raw": (GRAPHQL, "sqli_stacked sqli_login"),
    "path_segment": (PATH, "ssrf_gcp"),
    "path_last": (PATH, "lfi_php_filter ssrf_aws ssrf_gcp"),
    "param_name": (NAME, "sqli_stacked xss_js_uri ssrf_aws ssrf_gcp ldap_injection"),
    "json_key": (NAME, "sqli_stacked xss_js_uri ssrf_aws ssrf_gcp ldap_injection"),
    "json_in_json": (NESTED_JSON,
        "sqli_union sqli_time sqli_stacked sqli_login xss_js_uri lfi_php_filter cmdi_pipe log4shell ssti_spel "
        "ssrf_aws ssrf_gcp ssrf_file php_code ldap_injection"),
    "json_in_query": (NESTED_JSON, "sqli_union sqli_stacked sqli_login ldap_injection"),
}

KNOWN_BYPASSES: dict[tuple[str, str], str] = {
    (family, attack): why for family, (why, attacks) in _KNOWN.items() for attack in attacks.split()
}


def _tflow(method: str, target: str, headers: list[tuple[str, str]], body: bytes):
    hdrs = http.Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])
    f = tflow.tflow(req=tutils.treq(method=method.encode(), path=target.encode(), content=body, headers=hdrs))
    f.client_conn.peername = ("203.0.113.7", 40000)
    return f


@pytest.fixture(scope="module")
def shipped(model_path):
    return model.load(str(model_path))


async def run_pairs(model_path) -> dict[tuple[str, str], tuple[int | None, int | None, str]]:
    """{(family, attack): (status or None, score, comment)} of every pair, through the real addons."""
    fe, sc = FeatureExtractor(), Scorer()
    out = {}
    with taddons.context(fe, sc) as tctx:
        tctx.configure(sc, openflare_model=str(model_path), openflare_llm_enabled=False, openflare_model_watch=0)
        for family, attack, (method, target, headers, body) in evasion.requests():
            f = _tflow(method, target, headers, body)
            fe.requestheaders(f)
            fe.request(f)
            await sc.request(f)
            status = f.response.status_code if f.response is not None else None
            out[family, attack] = (status, f.metadata.get(common.SCORE), f.comment)
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def verdicts(model_path):
    return await run_pairs(model_path)


def _bypasses(verdicts) -> set[tuple[str, str]]:
    return {pair for pair, (status, _, _) in verdicts.items() if status not in REFUSED}


def _listing(pairs, verdicts) -> str:
    return "\n".join(f"  {fam} x {att}: {verdicts[fam, att][2]}" for fam, att in sorted(pairs))


def test_suite_is_large_enough():
    assert len(evasion.CLASSIC) >= 24
    assert len(evasion.FAMILIES) >= 40
    kinds = {a.kind for a in evasion.CLASSIC.values()}
    assert {"sqli", "xss", "traversal", "cmdi", "jndi", "ssti", "ssrf", "xxe"} <= kinds
    for family in ("pad16k_query", "pad70k_json", "pad16k_form", "words4k_json", "header_x_api_version",
                   "ibm037_form", "utf16le_json", "utf32be_json", "ce_br", "ce_gzip_multimember",
                   "multipart_dup_boundary", "multipart_png", "base64_path"):
        assert family in evasion.FAMILIES


def test_every_classic_attack_refused_plainly(shipped):
    scores = {name: shipped.score_request(*evasion.plain(a))[0] for name, a in evasion.CLASSIC.items()}
    assert {name: s for name, s in scores.items() if s <= 6} == {}


def test_every_family_refused_in_process(verdicts):
    """One assertion for all pairs: the bypasses are exactly KNOWN_BYPASSES."""
    assert len(verdicts) == len(evasion.FAMILIES) * len(evasion.CLASSIC)
    got = _bypasses(verdicts)
    new = got - KNOWN_BYPASSES.keys()
    fixed = KNOWN_BYPASSES.keys() - got
    assert not new and not fixed, (
        f"{len(new)} new bypasses (not in KNOWN_BYPASSES):\n{_listing(new, verdicts)}\n"
        f"{len(fixed)} pairs in KNOWN_BYPASSES now refused (remove them):\n{_listing(fixed, verdicts)}"
    )


# --- end to end: a real mitmdump in front of the demo app ---


def e2e_pairs() -> list[tuple[str, str]]:
    """One attack per family, the attacks taken in turn (so every attack is sent), skipping known bypasses."""
    names = list(evasion.CLASSIC)
    pairs = []
    for i, family in enumerate(evasion.FAMILIES):
        turn = [names[(i + k) % len(names)] for k in range(len(names))]
        attack = next((a for a in turn if (family, a) not in KNOWN_BYPASSES), None)
        if attack is not None:
            pairs.append((family, attack))
    return pairs


def send(conn: httpclient.HTTPConnection, method: str, target: str, headers, body: bytes):
    """One request on a keep-alive connection, headers exactly as given (Host too): (status, headers, body)."""
    conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value)
    if body or method in ("POST", "PUT", "PATCH"):
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body if body else None)
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


@pytest.fixture(scope="module")
def proxy(upstream, mitmdump, model_conf):
    return mitmdump(["addons/features.py", "addons/scorer.py"], mode=f"reverse:{upstream.url}",
                    conf={**model_conf, "openflare_llm_enabled": False})


@pytest.mark.e2e
def test_every_family_refused_through_mitmdump(proxy):
    pairs = e2e_pairs()
    assert len(pairs) >= len(evasion.FAMILIES) - 3  # a family is left out only if every attack bypasses it
    passed = []
    conn = httpclient.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        for family, attack in pairs:
            status, headers, body = send(conn, *evasion.FAMILIES[family](evasion.CLASSIC[attack].payload))
            if status not in REFUSED or "x-upstream" in headers or headers.get("connection") == "close":
                passed.append(f"  {family} x {attack}: {status} {body[:60]!r}")
            if headers.get("connection") == "close" or status not in REFUSED:
                conn.close()
                conn = httpclient.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    finally:
        conn.close()
    assert not passed, f"{len(passed)} of {len(pairs)} pairs not refused by a real mitmdump:\n" + "\n".join(passed)
