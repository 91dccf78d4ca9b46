"""addons/features.py: options, the metadata it sets, and the flows it leaves alone."""

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
from addons import featurize
from addons.features import FeatureExtractor


def flow(path=b"/x?q=1", content=b"", headers=(), peer="203.0.113.7", method=b"GET"):
    f = tflow.tflow(
        req=tutils.treq(method=method, path=path, content=content, headers=http.Headers(list(headers)))
    )
    f.client_conn.peername = (peer, 40000)
    return f


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
        assert common.FEATURES not in f.metadata
        fx.request(f)
        assert f.metadata[common.FEATURES] == "get /search ?q=<script> ‖h user-agent: mozilla/5.0"
        assert isinstance(f.metadata[common.FEATURES], str)


async def test_features_equal_featurize():
    """Serving and training call the same function with the same inputs."""
    fx = FeatureExtractor()
    with taddons.context(fx):
        headers = [(b"Content-Type", b"application/x-www-form-urlencoded"), (b"Cookie", b"sid=1; a=%27")]
        f = flow(path=b"/login", content=b"user=admin%27--&pw=x", headers=headers, method=b"POST")
        fx.request(f)
        expected = featurize.featurize(
            "POST", "/login", [(k.decode(), v.decode()) for k, v in headers], b"user=admin%27--&pw=x"
        )
        assert f.metadata[common.FEATURES] == expected
        assert "user=admin'--" in expected


_NAMES = st.sampled_from(
    [b"User-Agent", b"user-agent", b"COOKIE", b"Cookie", b"Referer", b"Content-Type", b"content-encoding",
     b"Content-Encoding", b"X-Other", b"Accept", b"COO\xe2\x84\xaaIE", b"\xff\xfeX", b"X-Forwarded-For"]
) | st.binary(min_size=1, max_size=12)
_BODIES = st.sampled_from([b"", b"q=%27+or+1=1--", gzip.compress(b'{"a": "<script>"}'), b"\x1f\x8b garbage"]) | st.binary(
    max_size=64
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.lists(st.tuples(_NAMES, st.binary(max_size=40)), max_size=8), body=_BODIES)
def test_header_prefilter_changes_nothing(headers, body):
    """The addon decodes only the headers featurize reads: the same string as featurize over all of them."""
    fx = FeatureExtractor()
    with taddons.context(fx) as tctx:
        tctx.configure(fx, openflare_headers=["user-agent", "cookie", "referer", "x-forwarded-for"])
        f = flow(content=body, headers=headers, method=b"POST")
        fx.request(f)
        req = f.request
        expected = featurize.featurize(
            "POST",
            req.path,
            req.headers.items(multi=True),
            featurize.decode_body(body, req.headers.get("content-encoding", "")),
            header_names=fx.header_names,
        )
        assert f.metadata[common.FEATURES] == expected


async def test_request_alone_sets_client_ip():
    fx = FeatureExtractor()
    with taddons.context(fx):
        f = flow(peer="::ffff:198.51.100.4")
        fx.request(f)
        assert f.metadata[common.CLIENT_IP] == "198.51.100.4"
        assert common.FEATURES in f.metadata


async def test_options_parsed():
    fx = FeatureExtractor()
    with taddons.context(fx) as tctx:
        tctx.configure(
            fx,
            openflare_headers=[" X-Api ", "", "USER-AGENT"],
            openflare_max_feature_bytes=300,
            openflare_trusted_proxies=["10.0.0.0/8", "::1"],
        )
        assert fx.header_names == ("x-api", "user-agent")
        assert fx.limit == 300
        f = flow(
            path=b"/" + b"a" * 1000,
            headers=[(b"x-api", b"<B>"), (b"X-Forwarded-For", b"192.0.2.1")],
            peer="10.1.2.3",
        )
        fx.requestheaders(f)
        fx.request(f)
        assert f.metadata[common.CLIENT_IP] == "192.0.2.1"
        assert len(f.metadata[common.FEATURES]) <= 300
        assert "x-api: <b>" in f.metadata[common.FEATURES]


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
        ({"openflare_max_feature_bytes": 10}, "between 256 and 1048576"),
        ({"openflare_max_feature_bytes": 2_000_000}, "between 256 and 1048576"),
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
        assert f.metadata[common.FEATURES].endswith("‖b q=' or 1=1--")
        bomb = flow(content=gzip.compress(b"a" * 20_000_000), headers=headers, method=b"POST")
        fx.request(bomb)
        assert len(bomb.metadata[common.FEATURES]) <= featurize.MAX_CHARS


async def test_no_body_and_bad_encoding_do_not_raise(caplog):
    fx = FeatureExtractor()
    with taddons.context(fx):
        f = flow(content=b"\x00garbage", headers=[(b"Content-Encoding", b"gzip")], method=b"POST")
        fx.request(f)
        assert f.metadata[common.FEATURES] == "post /x ?q=1"
        f = flow()
        f.request.content = None
        fx.request(f)
        assert f.metadata[common.FEATURES] == "get /x ?q=1"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("kind", ["response", "error", "not live"])
async def test_leaves_finished_flows_alone(kind):
    fx = FeatureExtractor()
    with taddons.context(fx):
        f = tflow.tflow(resp=kind == "response", err=kind == "error", live=kind != "not live")
        fx.requestheaders(f)
        fx.request(f)
        assert common.CLIENT_IP not in f.metadata
        assert common.FEATURES not in f.metadata


async def test_loads_as_a_script():
    with taddons.context() as tctx:
        ns = tctx.script("addons/features.py")
        assert [type(a).__name__ for a in ns.addons] == ["FeatureExtractor"]
        assert "openflare_headers" in tctx.options
