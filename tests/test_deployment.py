"""addons/deployment.py: block_global follows the mode unless someone set it; the upstream's scheme and reachability."""

import asyncio
import logging

import pytest
from mitmproxy import exceptions
from mitmproxy.addons import block
from mitmproxy.test import taddons

from addons import deployment
from conftest import free_port


def context(*extra):
    d = deployment.Deployment()
    return d, taddons.context(block.Block(), d, *extra)


def test_reverse_mode_serves_public_clients_and_regular_mode_does_not(caplog):
    caplog.set_level(logging.INFO)
    d, ctx = context()
    with ctx as tctx:
        assert tctx.options.block_global is True
        tctx.configure(d, mode=["reverse:http://127.0.0.1:8000"])
        assert tctx.options.block_global is False
        assert "clients with public addresses are served" in caplog.text
        tctx.configure(d, mode=["regular"])  # mitmweb can change modes at run time
        assert tctx.options.block_global is True
        tctx.configure(d, mode=["reverse:http://127.0.0.1:8000", "reverse:https://example.com"])
        assert tctx.options.block_global is False
        tctx.configure(d, mode=["reverse:http://127.0.0.1:8000", "regular@8081"])  # one regular listener: protect
        assert tctx.options.block_global is True
        assert "a reverse mode beside another mode: block_global stays true" in caplog.text


@pytest.mark.parametrize("value", [True, False])
def test_block_global_set_by_the_user_is_kept(value, caplog):
    d, ctx = context()
    with ctx as tctx:
        tctx.options.update(block_global=value)  # --set block_global=..., or the file
        tctx.configure(d, mode=["reverse:http://127.0.0.1:8000"])
        assert tctx.options.block_global is value
        tctx.configure(d, mode=["regular"])
        assert tctx.options.block_global is value
    assert ("public addresses get a connection reset" in caplog.text) is value


def test_a_change_in_mitmweb_options_is_kept():
    d, ctx = context()
    with ctx as tctx:
        tctx.configure(d, mode=["reverse:http://127.0.0.1:8000"])
        assert tctx.options.block_global is False
        tctx.configure(d, block_global=True)  # the operator turns protection back on
        tctx.configure(d, mode=["reverse:http://127.0.0.1:9000"])
        assert tctx.options.block_global is True


async def test_no_scheme_is_an_error_at_startup_and_refused_at_run_time(caplog):
    d, ctx = context()
    with ctx as tctx:
        tctx.configure(d, mode=["reverse:127.0.0.1:8000"])
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and "reverse:127.0.0.1:8000: the upstream has no scheme" in errors[0]
        assert "Write reverse:http://127.0.0.1:8000" in errors[0]
        d.started = True
        with pytest.raises(exceptions.OptionsError, match="has no scheme"):
            tctx.configure(d, mode=["reverse:example.com:8443"])
        tctx.configure(d, mode=["reverse:https://example.com:8443", "reverse:dns://9.9.9.9", "regular"])
        assert d.upstreams == [("https://example.com:8443", "example.com", 8443)]  # DNS is not checked by TCP
        assert d.task is not None  # re-checked at once: the mode changed while running
        d.done()


def test_upstream_check_option_is_bounded():
    d, ctx = context()
    with ctx as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(d, openflare_upstream_check=-1)
        tctx.configure(d, openflare_upstream_check=0)
        assert d.interval == 0


async def test_reachable():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert await deployment.reachable("127.0.0.1", port) is None
    assert await deployment.reachable("127.0.0.1", free_port()) == "connection refused"


async def test_unreachable_upstream_warned_then_answers(caplog):
    caplog.set_level(logging.INFO)
    port = free_port()
    d = deployment.Deployment()
    d.interval = 1
    task = asyncio.create_task(d._check_one(f"http://127.0.0.1:{port}", "127.0.0.1", port))
    for _ in range(100):
        if "is unreachable" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert f"upstream http://127.0.0.1:{port} is unreachable (connection refused)" in caplog.text
    assert not task.done()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    async with server:
        await asyncio.wait_for(task, 10)
    assert f"upstream http://127.0.0.1:{port} answers now" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # loud once; again only every minute


def test_dashboard_url_logged_with_the_command_bar_open(caplog):
    caplog.set_level(logging.INFO)
    d, ctx = context()
    with ctx as tctx:
        tctx.master.web_url = "http://127.0.0.1:8081/?token=abc"
        d.running()
        d.done()
    assert "OpenFlare dashboard (mitmweb, command bar open): http://127.0.0.1:8081/?token=abc#/flows?c=true" in caplog.text


def test_no_traffic_hooks():
    """Nothing on the request path: the bundle gets no forwarder from this addon."""
    from mitmproxy import hooks

    import mitmproxy.proxy.layers  # noqa: F401 - registers the traffic hooks

    assert sorted(h for h in hooks.all_hooks if hasattr(deployment.Deployment, h)) == ["configure", "done", "load", "running"]
