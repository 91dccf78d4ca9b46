"""The embedded ban store (no Redis configured), shared on one host through a Unix socket. A plain module.

Without Redis, bans live in memory, in a fakeredis server (the same Lua scripts, keys and events channel
as with Redis). The first OpenFlare process started in a directory *owns* it: it takes an exclusive lock
on `<socket>.lock` (its pid is written inside), keeps the store in its own memory and uses it in-process
(no socket on its request path), and serves it on the Unix socket `<socket>` (`openflare_ban_socket`,
default data/bans.sock; mode 0600, so only the same user connects), speaking the Redis protocol. The
`openflare` command line, `redis-cli -s data/bans.sock`, and every later proxy process in the same
directory (several workers on one host) connect to that socket as they would to a Redis.

The owner keeps the bans in force and the allowlist entries added at run time in `<socket stem>.json` beside
the socket (default data/bans.json; mode 0600): a thread wakes every SAVE_EVERY seconds and, only when an
event (ban, unban, allow, disallow) or a change to a ban or allow key was seen since, writes the file
whole (a temp file, then os.replace: a reader or a crash sees the old file or the new one, never half).
The owner writes it once more when it closes. The next owner (a restart, or a member taking over from an
owner that was killed) loads it before serving: each entry keeps the time it had left (wall clock), an
expired one is dropped. A file that cannot be read or parsed is logged, renamed `<file>.corrupt`, and the
store starts empty. Strikes and repeat-ban levels are not kept. Only the lock holder writes the file.
The socket is removed when the owner exits; a socket left by a killed owner is replaced by the next one. Serving costs one thread that
waits in `accept` and one per connected client, which waits in `select` (no polling) and runs each command
under the fakeredis server's lock, as the owner's event loop does: a command from outside holds the
owner's loop for as long as it runs (microseconds; a SCAN batch of 1000 keys, milliseconds).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import select
import socket
import socketserver
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_SOCKET = "data/bans.sock"
MAX_PATH = 107  # bytes of a Unix socket path (sun_path, with its NUL)
SAVE_EVERY = 1.0  # seconds between two checks for changes to write to the bans file
SAVE_VERSION = 1
# What the file keeps: ban hashes and allowlist strings, under any key prefix. The events channel (and a
# change to one of these keys, where fakeredis reports it) marks the store changed.
_SAVED = (("*ban:*", "hash"), ("*allow:*", "string"))
_WATCH = ("*events", "__keyspace@*__:*ban:*", "__keyspace@*__:*allow:*")


class Unavailable(Exception):
    """The embedded store cannot be served or reached (a bad socket path, nobody serving it)."""


def lock_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".lock")


def owner_pid(path: str | os.PathLike) -> int | None:
    """The pid written in the lock file by the process that owns (or last owned) the store at `path`."""
    try:
        return int(lock_path(path).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def data_path(path: str | os.PathLike) -> Path:
    """The file the owner of the store served at `path` keeps its bans in: `bans.sock` -> `bans.json`."""
    p = Path(path)
    return p.with_suffix(".json") if p.suffix != ".json" else Path(str(p) + ".json")


def dump(server) -> dict:
    """The bans and run-time allowlist entries of a fakeredis server, each with its deadline (epoch ms, or None)."""
    import fakeredis

    r = fakeredis.FakeRedis(server=server)
    now_ms = int(time.time() * 1000)
    keys = []
    for match, kind in _SAVED:
        for key in r.scan_iter(match=match, _type=kind, count=1000):
            with r.pipeline(transaction=False) as pipe:
                (pipe.hgetall(key) if kind == "hash" else pipe.get(key)).pttl(key)
                value, ttl = pipe.execute()
            if value is None or value == {} or ttl == -2:
                continue  # gone meanwhile
            if kind == "hash":
                value = {_text(k): _text(v) for k, v in value.items()}
            keys.append({"key": _text(key), "type": kind, "value": _text(value) if kind == "string" else value,
                         "deadline_ms": None if ttl < 0 else now_ms + ttl})
    return {"version": SAVE_VERSION, "saved_ms": now_ms, "keys": keys}


def save(server, path: Path) -> int:
    """Write `dump(server)` to `path` atomically (temp file in the same directory, then os.replace)."""
    data = dump(server)
    fd, tmp = tempfile.mkstemp(prefix=".bans-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data["keys"])


def restore(server, path: Path) -> int:
    """Load a file `save` wrote into `server`: entries keep their time left, expired ones are dropped.

    A file that cannot be read or parsed is logged, set aside as `<path>.corrupt`, and nothing is loaded.
    Returns how many entries were loaded.
    """
    import fakeredis

    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("version") != SAVE_VERSION or not isinstance(data.get("keys"), list):
            raise ValueError("not a bans file of version %d" % SAVE_VERSION)
        entries = []
        for e in data["keys"]:
            key, kind, value, deadline = e["key"], e["type"], e["value"], e["deadline_ms"]
            ok = isinstance(key, str) and (
                (kind == "hash" and isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()))
                or (kind == "string" and isinstance(value, str))
            ) and (deadline is None or isinstance(deadline, int))
            if not ok:
                raise ValueError(f"a bad entry: {str(e)[:80]}")
            entries.append((key, kind, value, deadline))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        aside = Path(str(path) + ".corrupt")
        try:
            os.replace(path, aside)
            where = f"set aside as {aside}"
        except OSError as e2:
            where = f"could not be set aside ({e2.strerror or e2})"
        logger.warning("openflare bans: cannot load %s (%s): %s; the ban store starts empty", path, str(e)[:200], where)
        return 0
    r = fakeredis.FakeRedis(server=server)
    now_ms = int(time.time() * 1000)
    n = 0
    with r.pipeline(transaction=False) as pipe:
        for key, kind, value, deadline in entries:
            if deadline is not None and deadline - now_ms <= 0:
                continue  # expired while no one owned the store
            pipe.delete(key)
            pipe.hset(key, mapping=value) if kind == "hash" else pipe.set(key, value)
            if deadline is not None:
                pipe.pexpire(key, deadline - now_ms)
            n += 1
        pipe.execute()
    logger.info("openflare bans: loaded %d bans and allowlist entries from %s (%d expired)", n, path, len(entries) - n)
    return n


def _text(x):
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else x


def check_path(path: str | os.PathLike) -> str:
    """The socket path as given, or Unavailable if a Unix socket cannot have it."""
    text = os.fspath(path)
    if not text:
        raise Unavailable("no socket path")
    if len(os.fsencode(text)) > MAX_PATH:
        raise Unavailable(f"socket path too long for a Unix socket ({len(os.fsencode(text))} > {MAX_PATH} bytes): {text}")
    return text


def client(path: str | os.PathLike, max_connections: int = 8):
    """A redis.asyncio client of the store served at `path` (for the CLI and for processes that join it).

    Like banstore.make_client's: no hidden retries, a few connections reused.
    """
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = aioredis.BlockingConnectionPool(
        connection_class=aioredis.UnixDomainSocketConnection,
        path=check_path(path),
        max_connections=max_connections,
        timeout=None,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=1,
    )
    return aioredis.Redis.from_pool(pool)


def _handler_class():
    # fakeredis's TCP server (fakeredis.TcpFakeServer, checked with fakeredis 2.41) gives the Redis protocol
    # encoding and the per-client connection; its handler polls each connection every 10 ms (about 7 ms of CPU
    # a second per idle client here), so this one waits in select() on the socket and on a pipe that the
    # client's fakeredis socket writes to when a reply is pushed to it (pub/sub messages).
    from fakeredis._clients._tcp_server import _INTERNAL_CONNECTION_KWARGS
    from fakeredis._clients._tcp_server import TCPFakeRequestHandler
    from fakeredis._clients._tcp_server import Writer
    from fakeredis._clients._sync import FakeRedisConnection
    from fakeredis._typing import RaiseErrorTypes

    class Handler(TCPFakeRequestHandler):
        def setup(self) -> None:
            socketserver.StreamRequestHandler.setup(self)  # blocking socket: select() says when to read
            self.client_address = ("unix", next(self.server.client_ids))  # a Unix peer has no address
            self.writer = Writer(self.client_address, self.wfile, self)
            self.current_client = FakeRedisConnection(
                server=self.server.fake_server,
                writer=self.writer,
                client_info={"laddr": "", "addr": f"unix:{self.client_address[1]}", "fd": self.connection.fileno()},
                **_INTERNAL_CONNECTION_KWARGS,
            )
            self.server.clients[self.client_address] = self.current_client

        def handle(self) -> None:
            fake = self.current_client.get_socket()
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)
            put = fake.put_response

            def put_and_wake(msg) -> None:
                put(msg)
                try:
                    os.write(wake_w, b"\0")
                except OSError:  # the pipe is full (a wake-up is pending anyway) or closed
                    pass

            fake.put_response = put_and_wake
            conn = self.connection
            try:
                while not self.server.stopping.is_set():
                    while self.current_client.can_read():
                        try:
                            reply = self.current_client.read_response()
                        except RaiseErrorTypes as e:  # an error reply: send it, keep serving
                            reply = e
                        self.writer.dump(reply)
                    readable, _, _ = select.select([conn, wake_r], [], [], 1.0)
                    if wake_r in readable:
                        while True:
                            try:
                                if not os.read(wake_r, 4096):
                                    break
                            except BlockingIOError:
                                break
                    if conn in readable:
                        data = conn.recv(65536)
                        if not data:
                            break
                        fake.sendall(data)
            except OSError:  # the client went away
                pass
            except Exception as e:  # noqa: BLE001 - a request fakeredis cannot parse: answer the error, hang up
                try:
                    self.writer.dump(e)
                except OSError:
                    pass
            finally:
                fake.put_response = put
                os.close(wake_r)
                os.close(wake_w)

        def finish(self) -> None:
            self.current_client.disconnect()
            self.server.clients.pop(self.client_address, None)
            socketserver.StreamRequestHandler.finish(self)

    return Handler


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # a stuck client never holds up the owner's exit
    block_on_close = False

    def __init__(self, path: str, fake_server) -> None:
        self.stopping = threading.Event()
        self.fake_server = fake_server
        self.client_ids = itertools.count(1)
        self.clients: dict = {}
        super().__init__(path, _handler_class(), bind_and_activate=False)

    def server_bind(self) -> None:
        # Bind in a private directory, make the socket 0600, then move it into place: no other user can
        # connect in between, and a half-made socket is never found by a client.
        path = Path(self.server_address)
        tmp = tempfile.mkdtemp(prefix=".bans-", dir=path.parent)
        try:
            tmp_sock = os.path.join(tmp, "s")
            self.socket.bind(tmp_sock)
            os.chmod(tmp_sock, 0o600)
            os.replace(tmp_sock, path)
        finally:
            try:
                os.rmdir(tmp)
            except OSError:
                pass
        self.server_address = str(path)


class Embedded:
    """The embedded store of one process: the owner's (server is a fakeredis FakeServer) or a member's.

    `open(path)` decides. `client()` gives the redis.asyncio-style client the BanStore uses: in-process for
    the owner, the socket for a member. `close()` stops serving, removes the socket and frees the lock.
    """

    def __init__(self, path: str | None, server=None, lock_fd: int | None = None, pid: int | None = None) -> None:
        self.path = path  # None: not served (openflare_ban_socket empty)
        self.server = server  # the fakeredis FakeServer when this process owns the store
        self.owner = server is not None
        self.pid = os.getpid() if self.owner else pid
        self._lock_fd = lock_fd
        self._unix: _Server | None = None
        self._thread: threading.Thread | None = None
        self._inode: int | None = None
        self._saving: threading.Event | None = None
        self._saver: threading.Thread | None = None

    @classmethod
    def open(cls, path: str | os.PathLike | None) -> Embedded:
        """Own the store (lock it, serve it on `path`) or, when another process owns it, join it.

        `path` None or empty: a private store, not served. Unavailable: the path cannot be used.
        """
        import fakeredis

        if not path:
            return cls(None, fakeredis.FakeServer())
        emb = cls(check_path(path))
        if not emb.take_over():
            emb.pid = owner_pid(emb.path)
        return emb

    def take_over(self) -> bool:
        """Own the store at `self.path` if no process does (its lock is free): serve a new, empty store.

        A member calls it when its owner has gone. Returns False while another process holds the lock.
        """
        import fakeredis

        if self.owner or not self.path:
            return False
        sock_path = Path(self.path)
        try:
            sock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise Unavailable(f"cannot create {lock_path(self.path)}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Unavailable(f"cannot lock {lock_path(self.path)}: {e.strerror or e}") from e
            return False
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            sock_path.unlink(missing_ok=True)  # left by an owner that was killed: the lock was free
            self.server = fakeredis.FakeServer()
            restore(self.server, data_path(self.path))
            self._serve()
        except OSError as e:
            os.close(fd)
            self.server = None
            raise Unavailable(f"cannot serve the ban store on {self.path}: {e.strerror or e}") from e
        self.owner, self.pid, self._lock_fd = True, os.getpid(), fd
        self._start_saver()
        return True

    def _start_saver(self) -> None:
        import fakeredis

        pubsub = fakeredis.FakeRedis(server=self.server).pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe(*_WATCH)
        self._saving = threading.Event()
        self._saver = threading.Thread(target=self._save_loop, args=(pubsub,), name="openflare-bans-save", daemon=True)
        self._saver.start()

    def _save_loop(self, pubsub) -> None:
        """Every SAVE_EVERY seconds: if a change was seen since the last write, write the file (off the loop)."""
        path = data_path(self.path)
        failing = False
        try:
            while not self._saving.wait(SAVE_EVERY):
                changed = False
                while pubsub.get_message(timeout=0) is not None:
                    changed = True
                if changed:
                    try:
                        save(self.server, path)
                        failing = False
                    except OSError as e:  # a full disk: kept in memory, tried again at the next change
                        if not failing:
                            logger.warning("openflare bans: cannot write %s: %s", path, e.strerror or e)
                        failing = True
        finally:
            pubsub.close()

    def _serve(self) -> None:
        unix = _Server(self.path, self.server)
        try:
            unix.server_bind()
            unix.server_activate()
        except OSError:
            unix.server_close()
            raise
        self._inode = os.stat(self.path).st_ino
        self._unix = unix
        self._thread = threading.Thread(target=unix.serve_forever, kwargs={"poll_interval": 0.2}, name="openflare-bans-socket", daemon=True)
        self._thread.start()

    def client(self):
        if self.owner:
            import fakeredis

            return fakeredis.FakeAsyncRedis(server=self.server)
        return client(self.path)

    @property
    def description(self) -> str:
        if self.owner:
            return "in-process ban store" + (f" (served on {self.path})" if self.path else "")
        return f"the ban store of process {self.pid or '?'} (through {self.path})"

    def close(self) -> None:
        unix, self._unix = self._unix, None
        if unix is not None:
            unix.stopping.set()
            unix.shutdown()  # returns once serve_forever has (within its 0.2 s poll)
            unix.server_close()
            try:  # remove the socket only if it is still ours
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
        saver, self._saver = self._saver, None
        if saver is not None:
            self._saving.set()
            saver.join()
            try:  # the last word, whatever the saver saw: written before the lock is freed
                save(self.server, data_path(self.path))
            except OSError as e:
                logger.warning("openflare bans: cannot write %s: %s", data_path(self.path), e.strerror or e)
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # frees the lock: the next process to start owns a new store


def reachable(path: str | os.PathLike, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the Unix socket at `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
