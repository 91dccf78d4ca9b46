"""Refusals are framed right on a keep-alive connection: a real mitmdump (features, bans, scorer) in reverse
mode in front of the demo app, one raw TCP connection per test, every response read by a strict parser.

A refusal to HEAD carries no body (RFC 9110 9.3.2): a client reads any bytes after a HEAD response's headers
as the start of the next response, so a 10-byte "Forbidden\\n" there corrupts whatever follows it.
"""

import http.client
import socket

import pytest

from addons import bans
from addons import common
from conftest import http_request

pytestmark = pytest.mark.e2e

SCRIPTS = ["addons/features.py", "addons/bans.py", "addons/scorer.py"]
SQLI = "/?q=1%27%20or%201%3D1--"  # 1' or 1=1--
XSS = "/?q=%3Cscript%3Ealert(1)%3C/script%3E"  # <script>alert(1)</script>
RATE_LIMIT = 5


@pytest.fixture(scope="module")
def proxy(upstream, mitmdump, model_conf):
    """Client addresses come from X-Forwarded-For (loopback is trusted): each test is its own client."""
    conf = {
        **model_conf,
        "openflare_trusted_proxies": ["127.0.0.1"],
        "openflare_llm_enabled": False,
        "openflare_rate_limit": RATE_LIMIT,
    }
    return mitmdump(SCRIPTS, mode=f"reverse:{upstream.url}", conf=conf, env={"OPENFLARE_REDIS_URL": ""})


class Connection:
    """One keep-alive HTTP/1.1 connection: requests written as is, responses read one by one, strictly."""

    def __init__(self, port: int, client: str) -> None:
        self.client = client
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.file = self.sock.makefile("rb")  # one buffer for every response: none may read past its own

    def makefile(self, mode: str):
        """What http.client.HTTPResponse reads from: the one shared buffer, not a new one per response."""
        return _Unclosable(self.file)

    def exchange(self, method: str, target: str, close: bool = False) -> tuple[http.client.HTTPResponse, bytes]:
        """Send one request, read its response: status line, headers and exactly the body they frame."""
        head = f"{method} {target} HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: {self.client}\r\n"
        head += "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
        if close:
            head += "Connection: close\r\n"
        self.sock.sendall((head + "\r\n").encode())
        resp = http.client.HTTPResponse(self, method=method)
        resp.begin()  # raises BadStatusLine on stray bytes where a status line must be
        body = resp.read()
        assert resp.isclosed()  # the body ended where its headers say
        return resp, body

    def assert_closed_cleanly(self) -> None:
        """After a `Connection: close` exchange: the server closed, with no byte left over."""
        assert self.file.read() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class _Unclosable:
    """The shared buffer as one response sees it: closing the response leaves the connection open."""

    def __init__(self, file) -> None:
        self.file = file

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def close(self) -> None:
        pass


@pytest.fixture
def connect(proxy):
    conns = []

    def open_(client: str) -> Connection:
        conns.append(Connection(proxy.port, client))
        return conns[-1]

    yield open_
    for c in conns:
        c.close()


def assert_refused(resp: http.client.HTTPResponse, body: bytes, method: str, status: int = common.BLOCK_STATUS) -> None:
    assert resp.status == status
    assert resp.getheader("content-length") == str(len(common.BLOCK_BODY if status == common.BLOCK_STATUS else bans.RATE_BODY))
    assert resp.getheader("x-upstream") is None  # the app never saw it
    assert body == (b"" if method == "HEAD" else common.BLOCK_BODY if status == common.BLOCK_STATUS else bans.RATE_BODY)


def test_head_then_get_refused_on_one_connection(connect):
    conn = connect("198.51.100.31")
    resp, body = conn.exchange("HEAD", SQLI)
    assert_refused(resp, body, "HEAD")
    resp, body = conn.exchange("GET", XSS)
    assert_refused(resp, body, "GET")
    assert body == common.BLOCK_BODY
    resp, body = conn.exchange("HEAD", "/", close=True)  # a benign HEAD still passes, framed by the app
    assert (resp.status, resp.getheader("x-upstream"), body) == (200, "openflare-demo", b"")
    conn.assert_closed_cleanly()


def test_banned_ip_head_then_get_on_one_connection(proxy, connect):
    client = "198.51.100.32"
    for _ in range(3):  # openflare_strikes: 3 refusals ban the address
        status, _, _ = http_request(proxy.port, "GET", SQLI, {"X-Forwarded-For": client})
        assert status == common.BLOCK_STATUS
    conn = connect(client)
    resp, body = conn.exchange("HEAD", "/")  # benign, but the address is banned
    assert_refused(resp, body, "HEAD")
    resp, body = conn.exchange("GET", "/")
    assert_refused(resp, body, "GET")
    resp, body = conn.exchange("HEAD", "/", close=True)
    assert_refused(resp, body, "HEAD")
    conn.assert_closed_cleanly()


def test_rate_limited_heads_on_one_connection(connect):
    """HEADs over the rate limit get 429 without a body; every response on the connection parses."""
    conn = connect("198.51.100.33")
    statuses = []
    for _ in range(10 * RATE_LIMIT):
        resp, body = conn.exchange("HEAD", "/")
        statuses.append(resp.status)
        if resp.status == 200:
            assert resp.getheader("x-upstream") == "openflare-demo" and body == b""
        else:
            assert_refused(resp, body, "HEAD", bans.RATE_STATUS)
            break
    assert statuses[-1] == bans.RATE_STATUS, statuses  # the limit is per second: 50 HEADs take far less
    resp, body = conn.exchange("GET", "/", close=True)  # 429 within the same second, else the app's page
    if resp.status == bans.RATE_STATUS:
        assert_refused(resp, body, "GET", bans.RATE_STATUS)
    else:
        assert resp.status == 200 and resp.getheader("x-upstream") == "openflare-demo" and body
    conn.assert_closed_cleanly()
