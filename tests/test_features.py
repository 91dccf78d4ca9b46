"""addons/features.py: options, the fields it stores, oversize refusals, and the flows it leaves alone."""

import gzip
import logging

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.exceptions import OptionsError
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons import common
from addons import fields
from addons.features import FeatureExtractor


def flow(path=b"/x?q=1", content=b"", headers=(), peer="203.0.113.7", method=b"GET"):
    f = tflow.tflow(
        req=tutils.treq(method=method, path=path, content=content, headers=http.Headers(list(headers)))
    )
    f.client_conn.peername = (peer, 40000)
    return f


def got(f) -> list[tuple[str, str, str, str]]:
    return [tuple(x) for x in f.metadata[common.FIELDS]]


async def test_defaults_and_metadata():
    fx = FeatureExtractor()
    with taddons.context(fx) as tctx:
        tctx.configure(fx)
        f = flow(
            path=b"/search?q=%3Cscript%3E",
            headers=[(b"User-Agent", b"Mozilla/5.0"), (b"X-Secret", b"nope")],
            content=b"",
        )
        fx.requestheaders(f)
        assert f.metadata[common.CLIENT_IP] == "203.0.113.7"
        assert common.FIELDS not in f.metadata
        fx.request(f)
        fields_ = got(f)
        assert ("query", "q", "%3Cscript%3E", "") in fields_
        assert ("header", "x-secret", "nope", "") in fields_  # every header, not five chosen ones
        assert ("header", "user-agent", "Mozilla/5.0", "") in fields_
        assert f.metadata[common.SIGNALS] == []


async def test_fields_equal_extract():
    """Serving and training call the same function with the same inputs."""
    fx = FeatureExtractor()
    with taddons.context(fx):
        headers = [(b"Content-Type", b"application/x-www-form-urlencoded"), (b"Cookie", b"sid=1; a=%27")]
        f = flow(path=b"/login", content=b"user=admin%27--&pw=x", headers=headers, method=b"POST")
        fx.request(f)
        expected = fields.extract("POST", "/login", [(k.decode(), v.decode()) for k, v in headers], b"user=admin%27--&pw=x")
        assert got(f) == [(x.loc, x.name, x.value, x.via) for x in expected.fields]
        assert common.request_of(f.metadata) == expected
        assert ("form", "user", "admin%27--", "") in got(f)


_NAMES = st.sampled_from(
    [b"User-Agent", b"user-agent", b"COOKIE", b"Cookie", b"Referer", b"Content-Type", b"content-encoding",
     b"Content-Encoding", b"X-Other", b"Accept", b"COO\xe2\x84\xaaIE", b"\xff\xfeX", b"X-Forwarded-For"]
) | st.binary(min_size=1, max_size=12)
_BODIES = st.sampled_from([b"", b"q=%27+or+1=1--", gzip.compress(b'{"a": "<script>"}'), b"\x1f\x8b garbage"]) | st.binary(
    max_size=64
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.lists(st.tuples(_NAMES, st.binary(max_size=40)), max_size=8), body=_BODIES)
def test_any_headers_and_body_become_fields_or_a_refusal(headers, body):
    """Whatever the bytes: fields (every header value among them) or an oversize refusal, never an exception."""
    fx = FeatureExtractor()
    with taddons.context(fx):
        f = flow(content=body, headers=headers, method=b"POST")
        fx.request(f)
        if f.response is not None:
            assert f.response.status_code in (413, 431) and f.metadata[common.OVERSIZE]
            return
        values = {x[2] for x in got(f) if x[0] in ("header", "cookie")}
        for k, v in headers:
            if k.lower() not in (b"cookie", b"content-type", b"content-encoding") and v:
                assert v.decode("utf-8", fields.LOSSLESS) in values


async def test_request_alone_sets_client_ip():
    fx = FeatureExtractor()
    with taddons.context(fx):
        f = flow(peer="::ffff:198.51.100.4")
        fx.request(f)
        assert f.metadata[common.CLIENT_IP] == "198.51.100.4"
        assert common.FIELDS in f.metadata


async def test_options_parsed():
    fx = FeatureExtractor()
    with taddons.context(fx) as tctx:
        tctx.configure(
            fx,
            openflare_inspect_body_bytes=2048,
            openflare_inspect_fields=100,
            openflare_trusted_proxies=["10.0.0.0/8", "::1"],
        )
        assert fx.limits == fields.Limits(body_bytes=2048, fields=100)
        f = flow(headers=[(b"x-api", b"<B>"), (b"X-Forwarded-For", b"192.0.2.1")], peer="10.1.2.3")
        fx.requestheaders(f)
        fx.request(f)
        assert f.metadata[common.CLIENT_IP] == "192.0.2.1"
        assert ("header", "x-api", "<B>", "") in got(f)


@pytest.mark.parametrize(
    "content, headers, path, status, what",
    [
        (b"a=1&" * 1000, [(b"Content-Type", b"application/x-www-form-urlencoded")], b"/", 413, "body"),
        (b"", [(b"X-Big", b"v" * 5000)], b"/", 431, "headers"),
        (b"", [], b"/?" + b"&".join(b"p%d=1" % i for i in range(200)), 413, "fields"),
        (b"[" * 50 + b"]" * 50, [(b"Content-Type", b"application/json")], b"/", 413, "depth"),
    ],
)
async def test_beyond_the_limits_refused_not_passed_uninspected(content, headers, path, status, what):
    fx = FeatureExtractor()
    with taddons.context(fx) as tctx:
        tctx.configure(fx, openflare_inspect_body_bytes=2048, openflare_inspect_fields=100,
                       openflare_inspect_depth=16, openflare_inspect_header_bytes=4096)
        for method in (b"POST", b"HEAD"):
            f = flow(path=path, content=content, headers=headers, method=method)
            fx.request(f)
            assert f.response.status_code == status
            assert f.metadata[common.OVERSIZE].startswith(what)
            assert f.metadata[common.VERDICT] == common.VERDICT_BLOCK
            assert common.FIELDS not in f.metadata
            assert f.comment.startswith(f"block {status} openflare (oversize")
            assert common.is_refusal(f.response, status, common.OVERSIZE_BODY[status])
            assert f.response.raw_content == (b"" if method == b"HEAD" else common.OVERSIZE_BODY[status])


async def test_streamed_body_refused():
    fx = FeatureExtractor()
    with taddons.context(fx):
        f = flow(method=b"POST")
        f.request.stream = True
        fx.request(f)
        assert f.response.status_code == 413 and f.metadata[common.OVERSIZE] == "body (streamed)"


async def test_untrusted_peer_cannot_claim_an_address():
    fx = FeatureExtractor()
    with taddons.context(fx) as tctx:
        tctx.configure(fx, openflare_trusted_proxies=["10.0.0.0/8"])
        f = flow(headers=[(b"X-Forwarded-For", b"192.0.2.1")], peer="203.0.113.9")
        fx.requestheaders(f)
        assert f.metadata[common.CLIENT_IP] == "203.0.113.9"


@pytest.mark.parametrize(
    "opts, message",
    [
        ({"openflare_inspect_body_bytes": 10}, "at least 1024"),
        ({"openflare_inspect_fields": 0}, "at least 64"),
        ({"openflare_trusted_proxies": ["10.0.0.0/8", "proxy.local"]}, "proxy.local"),
        ({"openflare_trusted_proxies": ["300.1.1.1"]}, "300.1.1.1"),
    ],
)
async def test_bad_options(opts, message):
    fx = FeatureExtractor()
    with taddons.context(fx) as tctx:
        with pytest.raises(OptionsError, match=message):
            tctx.configure(fx, **opts)


async def test_gzip_body_decoded_bounded():
    fx = FeatureExtractor()
    with taddons.context(fx):
        headers = [(b"Content-Type", b"application/x-www-form-urlencoded"), (b"Content-Encoding", b"gzip")]
        f = flow(content=gzip.compress(b"q=%27+or+1=1--"), headers=headers, method=b"POST")
        fx.request(f)
        assert ("form", "q", "%27+or+1=1--", "") in got(f)
        bomb = flow(content=gzip.compress(b"a" * 20_000_000), headers=headers, method=b"POST")
        fx.request(bomb)  # 20 MB inflated from 20 KB: beyond the 8 MiB limit, refused (not skipped)
        assert bomb.response.status_code == 413 and common.FIELDS not in bomb.metadata


async def test_no_body_and_bad_encoding_do_not_raise(caplog):
    fx = FeatureExtractor()
    with taddons.context(fx):
        f = flow(content=b"\x00garbage: drop table users", headers=[(b"Content-Encoding", b"gzip")], method=b"POST")
        fx.request(f)
        assert "bad-encoding:gzip" in f.metadata[common.SIGNALS]
        assert ("text", "body", "\x00garbage: drop table users", "") in got(f)  # the body as sent, inspected
        f = flow()
        f.request.content = None
        fx.request(f)
        assert ("query", "q", "1", "") in got(f)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("kind", ["response", "error", "not live"])
async def test_leaves_finished_flows_alone(kind):
    fx = FeatureExtractor()
    with taddons.context(fx):
        f = tflow.tflow(resp=kind == "response", err=kind == "error", live=kind != "not live")
        fx.requestheaders(f)
        fx.request(f)
        assert common.CLIENT_IP not in f.metadata
        assert common.FIELDS not in f.metadata


async def test_loads_as_a_script():
    with taddons.context() as tctx:
        ns = tctx.script("addons/features.py")
        assert [type(a).__name__ for a in ns.addons] == ["FeatureExtractor"]
        assert "openflare_inspect_body_bytes" in tctx.options


async def test_the_client_ip_header_can_be_named():
    """Behind a proxy that writes X-Forwarded-For but passes a client's own Forwarded through, name the header."""
    fx = FeatureExtractor()
    with taddons.context(fx) as tctx:
        tctx.configure(fx, openflare_trusted_proxies=["10.0.0.0/8"])
        headers = [(b"Forwarded", b"for=192.0.2.99"), (b"X-Forwarded-For", b"198.51.100.7")]
        f = flow(headers=headers, peer="10.0.0.2")
        fx.requestheaders(f)
        assert f.metadata[common.CLIENT_IP] == "192.0.2.99"  # auto: Forwarded wins
        tctx.configure(fx, openflare_client_ip_header="x-forwarded-for")
        f = flow(headers=headers, peer="10.0.0.2")
        fx.requestheaders(f)
        assert f.metadata[common.CLIENT_IP] == "198.51.100.7"
        with pytest.raises(OptionsError):
            tctx.configure(fx, openflare_client_ip_header="via")
