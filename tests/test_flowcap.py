"""addons/flowcap.py: mitmweb's view keeps at most openflare_view_max_flows flows, the oldest finished dropped."""

import asyncio
import json
import logging

import pytest
from mitmproxy import exceptions
from mitmproxy.addons import view as view_addon
from mitmproxy.test import taddons
from mitmproxy.test import tflow

from addons import flowcap


def finished(n: int) -> list:
    flows = []
    for _ in range(n):
        f = tflow.tflow(resp=True)
        f.live = False
        flows.append(f)
    return flows


async def test_trim_drops_the_oldest_above_the_cap(caplog):
    caplog.set_level(logging.DEBUG)
    cap, view = flowcap.FlowCap(), view_addon.View()
    with taddons.context(cap, view) as tctx:
        tctx.configure(cap, openflare_view_max_flows=10)
        flows = finished(30)
        view.add(flows)
        assert await cap.trim(view) == 20
        assert [f.id for f in view] == [f.id for f in flows[-10:]]
        assert await cap.trim(view) == 0
        view.add(finished(5))
        assert await cap.trim(view) == 5
        assert json.loads(cap.stats()) == {"max_flows": 10, "kept": 10, "dropped": 25}
        cap.logged_at -= flowcap.LOG_EVERY
        view.add(finished(3))
        assert await cap.trim(view) == 3
    lines = [r.getMessage() for r in caplog.records if "flow cap" in r.getMessage()]
    assert lines == [  # one line a minute at most: the second trim went into the next line's count
        "OpenFlare flow cap: dropped 20 oldest flows since the last line (20 in all), 10 kept",
        "OpenFlare flow cap: dropped 8 oldest flows since the last line (28 in all), 10 kept",
    ]
    assert "Removed" not in caplog.text  # the View's own "Removed N flows" alert, one per trim, stays out


async def test_flows_in_flight_are_kept():
    cap, view = flowcap.FlowCap(), view_addon.View()
    with taddons.context(cap, view) as tctx:
        tctx.configure(cap, openflare_view_max_flows=2)
        live = tflow.tflow()  # still in flight: removing it would kill it
        assert live.live
        view.add([live, *finished(3)])
        assert await cap.trim(view) == 2
        assert live in view and live.error is None and view.store_count() == 2


async def test_zero_means_no_cap_and_negative_is_refused():
    cap, view = flowcap.FlowCap(), view_addon.View()
    with taddons.context(cap, view) as tctx:
        tctx.configure(cap, openflare_view_max_flows=0)
        view.add(finished(50))
        assert await cap.trim(view) == 0 and view.store_count() == 50
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(cap, openflare_view_max_flows=-1)


async def test_background_task_trims_once_running(monkeypatch):
    monkeypatch.setattr(flowcap, "INTERVAL", 0.01)
    cap, view = flowcap.FlowCap(), view_addon.View()
    with taddons.context(cap, view) as tctx:
        tctx.configure(cap, openflare_view_max_flows=5)
        cap.running()
        view.add(finished(40))
        for _ in range(200):
            if view.store_count() == 5:
                break
            await asyncio.sleep(0.01)
        assert view.store_count() == 5 and cap.dropped == 35
        cap.done()
        assert cap.task is None


def test_without_a_view_nothing_runs():
    """mitmdump keeps no flows: no task, and the stats say so."""
    cap = flowcap.FlowCap()
    with taddons.context(cap):
        cap.running()
        assert cap.task is None
        assert json.loads(cap.stats())["kept"] is None


def test_no_traffic_hooks():
    """Nothing on the request path: the bundle gets no forwarder from this addon."""
    from mitmproxy import hooks

    import mitmproxy.proxy.layers  # noqa: F401 - registers the traffic hooks

    assert sorted(h for h in hooks.all_hooks if hasattr(flowcap.FlowCap, h)) == ["configure", "done", "load", "running"]
