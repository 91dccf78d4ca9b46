"""The evasion suite (issue 14): every family of tests/evasion.py x every classic attack, refused.

1. Each classic attack is refused when sent plainly (its query parameter) by the shipped model.
2. In process: every family x every attack through the real addons (FeatureExtractor + Scorer in one
   module-scoped taddons context, the shipped model): refused with 403, or 413/431 where the request is
   beyond the inspection limits (never forwarded uninspected, so not a bypass either).
3. End to end: every pair again through a real mitmdump in front of the demo app, refused without reaching
   the app.

The shipped model lets no pair through. KNOWN_BYPASSES (empty) is asserted exactly: a new bypass fails, and
so would a listed pair that is now refused (the list can only shrink). The
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

# Pairs the shipped model lets through, with why: none. A pair that starts passing fails the test; if one
# must be accepted for a while, list it here as (family, attack): "why", and the test holds the list exactly.
KNOWN_BYPASSES: dict[tuple[str, str], str] = {}


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
    """Every family x every attack but the known bypasses (about 35 s through mitmdump on a loaded machine)."""
    return [(f, a) for f in evasion.FAMILIES for a in evasion.CLASSIC if (f, a) not in KNOWN_BYPASSES]


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
    assert len(pairs) == len(evasion.FAMILIES) * len(evasion.CLASSIC) - len(KNOWN_BYPASSES)
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
