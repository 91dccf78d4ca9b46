"""FlowCap: keep at most `openflare_view_max_flows` flows in mitmweb's (or the console's) memory.

mitmweb and the mitmproxy console keep every flow in their view until someone clears it, so a long
session under load grows without bound (mitmproxy has no option for a cap). Once a second, a background
task drops the oldest finished flows above the cap (`view.flows.remove`, so mitmweb's browser list drops
them too), in slices that give the event loop back between them; the count is logged at debug (at most a
line a minute) and served by `openflare.flowcap.stats`. Flows still in flight are never dropped (removing one kills it).

Nothing on the request path: no traffic hooks at all. mitmdump has no view, so there it does nothing.
"""

import asyncio
import json
import logging
import time

from mitmproxy import command
from mitmproxy import ctx
from mitmproxy import exceptions
from mitmproxy.utils import asyncio_utils

logger = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between trims: at most one second of traffic above the cap
SLICE = 200  # flows removed before the event loop gets a turn
LOG_EVERY = 60.0  # seconds between debug lines about dropped flows


def oldest_finished(view, n: int) -> list:
    """Up to n of the view's oldest flows (store order is arrival order) that are no longer in flight."""
    out = []
    for f in view._store.values():  # noqa: SLF001 - the View's arrival-ordered store has no public iterator
        if len(out) >= n:
            break
        if not f.live:
            out.append(f)
    return out


class FlowCap:
    def __init__(self) -> None:
        self.limit: int = 5000
        self.dropped: int = 0
        self.logged_at: float = -LOG_EVERY  # when the last debug line was written
        self.logged_dropped: int = 0
        self.task: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "openflare_view_max_flows",
            int,
            5000,
            "Most flows mitmweb (or the mitmproxy console) keeps in memory; once a second the oldest finished "
            "ones above it are dropped from the view (counted, logged at debug). 0: keep every flow (memory "
            "grows with the session). mitmdump keeps no flows.",
        )

    def configure(self, updated) -> None:
        if "openflare_view_max_flows" in updated:
            if ctx.options.openflare_view_max_flows < 0:
                raise exceptions.OptionsError("openflare_view_max_flows must be 0 (no cap) or more")
            self.limit = ctx.options.openflare_view_max_flows

    def running(self) -> None:
        view = ctx.master.addons.get("view")
        if view is None:
            return  # mitmdump: no flows kept
        if self.task is None:
            self.task = asyncio_utils.create_task(self._trim_loop(view), name="openflare-flowcap", keep_ref=True)

    def done(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def _trim_loop(self, view) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            await self.trim(view)

    async def trim(self, view) -> int:
        """Drop the oldest finished flows above the cap; returns how many."""
        if not self.limit:
            return 0
        excess = view.store_count() - self.limit
        if excess <= 0:
            return 0
        removed = 0
        for f in oldest_finished(view, excess):
            view.remove([f])  # one at a time: a list of several makes the View log "Removed N flows"
            removed += 1
            if removed % SLICE == 0:
                await asyncio.sleep(0)
        self.dropped += removed
        now = time.monotonic()
        if now - self.logged_at >= LOG_EVERY:  # not every second: mitmweb keeps its log lines too
            logger.debug("OpenFlare flow cap: dropped %d oldest flows since the last line (%d in all), %d kept",
                         self.dropped - self.logged_dropped, self.dropped, view.store_count())  # fmt: skip
            self.logged_at, self.logged_dropped = now, self.dropped
        return removed

    @command.command("openflare.flowcap.stats")
    def stats(self) -> str:
        """The flow cap, the flows in the view now and the flows dropped so far, as JSON."""
        view = ctx.master.addons.get("view")
        kept = view.store_count() if view is not None else None
        return json.dumps({"max_flows": self.limit, "kept": kept, "dropped": self.dropped})


addons = [FlowCap()]
