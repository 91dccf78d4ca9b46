"""addons/banserver.py: the embedded ban store, owned by one process and served to others on a Unix socket."""

import os
import socket
import stat

import fakeredis
import pytest

from addons import banserver


@pytest.fixture
def sock(tmp_path):
    path = tmp_path / "bans.sock"
    made = []
    yield path, made
    for emb in made:
        emb.close()


def open_(path, made):
    emb = banserver.Embedded.open(str(path))
    made.append(emb)
    return emb


async def test_the_first_process_owns_and_serves_the_store_others_join(sock):
    path, made = sock
    owner = open_(path, made)
    assert owner.owner and owner.pid == os.getpid()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # only this user connects
    assert banserver.owner_pid(path) == os.getpid()
    assert banserver.reachable(path)
    local = owner.client()
    assert isinstance(local, fakeredis.FakeAsyncRedis)  # the owner's own requests never touch the socket
    await local.set("k", "from the owner")

    member = open_(path, made)  # the lock is taken: a second opener joins
    assert not member.owner and member.pid == os.getpid()
    assert "through" in member.description
    remote = member.client()
    try:
        assert await remote.get("k") == b"from the owner"
        await remote.hset("h", mapping={"a": "1"})
        await remote.expire("h", 30)
        assert await local.hgetall("h") == {b"a": b"1"}
        script = remote.register_script("return redis.call('INCR', KEYS[1])")  # Lua runs through the socket too
        assert await script(keys=["n"]) == 1 and await local.get("n") == b"1"
    finally:
        await remote.aclose()


async def test_events_cross_the_socket_both_ways(sock):
    path, made = sock
    owner = open_(path, made)
    local, remote = owner.client(), banserver.client(path)
    try:
        for channel, pub, sub_client in (("to-owner", remote, local), ("to-member", local, remote)):
            sub = sub_client.pubsub()
            await sub.subscribe(channel)
            confirmed = await sub.get_message(timeout=5)  # the subscription is in place before anything is published
            assert confirmed and confirmed["type"] == "subscribe"
            assert await pub.publish(channel, "ban\t198.51.100.1") == 1
            msg = None
            for _ in range(5):  # at once: a pushed message wakes the handler (its select() waits 1 s otherwise)
                msg = await sub.get_message(timeout=0.1)
                if msg:
                    break
            await sub.aclose()
            assert msg and msg["data"] == b"ban\t198.51.100.1"
    finally:
        await remote.aclose()


async def test_close_removes_the_socket_and_frees_the_lock(sock):
    path, made = sock
    owner = open_(path, made)
    owner.close()
    assert not path.exists() and not banserver.reachable(path)
    again = open_(path, made)  # the next process owns a new, empty store
    assert again.owner
    assert await again.client().get("anything") is None


def test_a_socket_left_by_a_killed_owner_is_replaced(sock):
    path, made = sock
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a socket file nobody listens on, as a killed owner leaves it
    dead.close()
    assert path.exists() and not banserver.reachable(path)
    owner = open_(path, made)
    assert owner.owner and banserver.reachable(path)


async def test_a_member_takes_over_when_the_owner_has_gone(sock):
    path, made = sock
    owner = open_(path, made)
    member = open_(path, made)
    assert not member.take_over()  # the owner still holds the lock
    owner.close()
    assert member.take_over() and member.owner and member.pid == os.getpid()
    assert banserver.reachable(path)
    remote = banserver.client(path)
    try:
        await remote.set("k", "v")
        assert await member.client().get("k") == b"v"
    finally:
        await remote.aclose()


def test_bad_socket_paths_are_clear_errors(tmp_path):
    with pytest.raises(banserver.Unavailable, match="too long"):
        banserver.check_path("x" * 200)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(banserver.Unavailable, match="cannot create"):
        banserver.Embedded.open(str(blocker / "bans.sock"))  # its directory is a file


def test_without_a_path_the_store_is_private():
    emb = banserver.Embedded.open(None)
    try:
        assert emb.owner and emb.path is None and "served" not in emb.description
    finally:
        emb.close()


async def test_bans_and_allowlist_survive_a_restart_with_their_time_left(sock):
    import json
    import time

    from addons import banstore

    path, made = sock
    owner = open_(path, made)
    op = banstore.Operator(owner.client())
    await op.ban("203.0.113.7", 3600, "sqli")
    await op.ban("203.0.113.8", 3600, "xss")
    await op.allow("198.51.100.0/24", 0)
    await op.client.aclose()
    owner.close()
    data = json.loads(banserver.data_path(path).read_text())
    for e in data["keys"]:  # as if the store stayed down: one ban has run out, one has 100 s left
        if e["key"].endswith("203.0.113.8"):
            e["deadline_ms"] = int(time.time() * 1000) - 1
        elif e["key"].endswith("203.0.113.7"):
            e["deadline_ms"] = int(time.time() * 1000) + 100_000
    banserver.data_path(path).write_text(json.dumps(data))

    again = open_(path, made)
    r = again.client()
    assert await r.hget("openflare:ban:203.0.113.7", "reason") == b"sqli"
    assert 0 < await r.pttl("openflare:ban:203.0.113.7") <= 100_000
    assert not await r.exists("openflare:ban:203.0.113.8")  # expired: dropped
    assert await r.exists("openflare:allow:198.51.100.0/24") and await r.pttl("openflare:allow:198.51.100.0/24") == -1


async def test_the_owner_writes_the_file_while_running(sock):
    import asyncio

    from addons import banstore

    path, made = sock
    owner = open_(path, made)
    op = banstore.Operator(owner.client())
    await op.ban("203.0.113.9", 3600, "rce")
    for _ in range(100):  # the saver's next tick (about a second), without closing: a kill -9 keeps this
        if banserver.data_path(path).exists() and "203.0.113.9" in banserver.data_path(path).read_text():
            break
        await asyncio.sleep(0.1)
    assert "203.0.113.9" in banserver.data_path(path).read_text()
    assert not open_(path, made).owner  # a member never writes it


def test_a_corrupt_file_is_set_aside_and_the_store_starts_empty(sock, caplog):
    path, made = sock
    banserver.data_path(path).write_text("{not json")
    owner = open_(path, made)
    assert owner.owner
    assert "cannot load" in caplog.text and ".corrupt" in caplog.text
    assert (path.parent / "bans.json.corrupt").read_text() == "{not json"
    assert not banserver.data_path(path).exists()
