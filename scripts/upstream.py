"""A small local web app to put behind OpenFlare: for trying it out, the end-to-end tests and `make bench`.

    .venv/bin/python scripts/upstream.py --port 8000
    make run UPSTREAM=http://127.0.0.1:8000      # then open http://127.0.0.1:8080/

Standard library only, one asyncio HTTP/1.1 server with keep-alive, fast enough that the benchmark
measures mitmproxy and not this app. Every answer is a pure function of the request, so a test can
compute what the app must have sent:

    GET /               a small HTML page with forms to try (search, login, JSON, upload)
    GET /bytes/<n>      n fixed bytes (0 <= n <= 16 MiB): bytes(i % 256 for i in range(n))
    anything else       an echo: "<METHOD> <target>\\n" followed by the request body, byte for byte

Every answer carries `x-upstream: openflare-demo`, so a client can tell it reached the app.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024
MAX_BYTES = 16 * 1024 * 1024
UPSTREAM_HEADER = (b"x-upstream", b"openflare-demo")

INDEX = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>OpenFlare demo app</title></head>
<body>
<h1>OpenFlare demo app</h1>
<p>Every form below is echoed back by the app. Through OpenFlare, attacks get a plain 403.</p>
<form action="/search" method="get"><input name="q" value="blue shoes"> <button>GET search</button></form>
<form action="/login" method="post"><input name="user" value="alice">
<input name="password" type="password" value="secret"> <button>POST form</button></form>
<form action="/upload" method="post" enctype="multipart/form-data"><input name="title" value="holiday">
<input name="file" type="file"> <button>POST upload</button></form>
<p>Try <a href="/search?q=1%27%20OR%20%271%27=%271">/search?q=1' OR '1'='1</a> or
<a href="/search?q=%3Cscript%3Ealert(1)%3C/script%3E">/search?q=&lt;script&gt;alert(1)&lt;/script&gt;</a>.</p>
</body></html>
"""


def fixed_bytes(n: int) -> bytes:
    """The body of GET /bytes/<n>."""
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


def echo_body(method: str, target: str, body: bytes) -> bytes:
    """The body of an echo answer."""
    return f"{method} {target}\n".encode("latin-1", "replace") + body


def answer(method: str, target: str, body: bytes) -> tuple[int, bytes, bytes]:
    """(status, content type, body) for one request."""
    path = target.partition("?")[0]
    if method in ("GET", "HEAD") and path == "/":
        return 200, b"text/html; charset=utf-8", INDEX
    if method in ("GET", "HEAD") and path.startswith("/bytes/"):
        try:
            n = int(path[len("/bytes/") :])
        except ValueError:
            return 400, b"text/plain", b"bad length\n"
        if not 0 <= n <= MAX_BYTES:
            return 400, b"text/plain", b"length out of range\n"
        return 200, b"application/octet-stream", fixed_bytes(n)
    return 200, b"application/octet-stream", echo_body(method, target, body)


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        chunks = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            n = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if n == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            size += n
            if size > MAX_BODY:
                raise ValueError("body too large")
            chunks.append(await reader.readexactly(n))
            await reader.readexactly(2)
    length = int(headers.get(b"content-length", b"0") or b"0")
    if not 0 <= length <= MAX_BODY:
        raise ValueError("bad content-length")
    return await reader.readexactly(length) if length else b""


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head[:-4].split(b"\r\n")
            try:
                method, target, version = lines[0].decode("latin-1").split(" ", 2)
            except ValueError:
                writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                return
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if headers.get(b"expect", b"").lower() == b"100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                body = await _read_body(reader, headers)
            except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                return
            status, ctype, out = answer(method, target, body)
            close = headers.get(b"connection", b"").lower() == b"close" or version == "HTTP/1.0"
            reason = b"OK" if status == 200 else b"Bad Request"
            writer.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s: %s\r\n%s\r\n"
                % (status, reason, ctype, len(out), *UPSTREAM_HEADER, b"connection: close\r\n" if close else b"")
            )
            if method != "HEAD":
                writer.write(out)
            await writer.drain()
            if close:
                return
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, limit=MAX_HEAD, backlog=1024)
    addr = server.sockets[0].getsockname()
    print(f"upstream listening on http://{addr[0]}:{addr[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks one)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    try:
        asyncio.run(serve(args.host, args.port))
    except OSError as e:
        print(f"upstream: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
