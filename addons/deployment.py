"""Deployment: the proxy's own setup in front of an app. Public clients in reverse mode, the upstream checked.

- **Public clients in reverse mode.** mitmproxy's `block_global` (true by default, in every mode) resets
  every connection from a public address: right for a regular proxy (an open proxy on the internet gets
  abused), wrong for a WAF in front of an app, whose users are the public. When every listening mode is a
  reverse proxy and nobody set `block_global` (file, `--set`, or mitmweb's options), it is set to false
  here; leaving reverse mode (mitmweb can change modes) sets it back. `--set block_global=true` keeps
  mitmproxy's protection in reverse mode too.
- **The upstream.** `reverse:127.0.0.1:8000` (no scheme) makes mitmproxy speak HTTPS to the app: with a
  plain-HTTP app every request hangs. That stops startup with a clear message. An upstream that does not
  accept connections at startup is warned about loudly (clients would get no answer at all) and
  re-checked in the background (a TCP connect every `openflare_upstream_check` seconds, never on the request
  path) until it answers, which is logged too.
- **mitmweb.** The dashboard URL is logged with the command bar open (`#/flows?c=true`; mitmweb has no
  option for it).

No traffic hooks: this addon costs a request nothing.
"""

import asyncio
import logging
import time

from mitmproxy import ctx
from mitmproxy import exceptions
from mitmproxy import optmanager
from mitmproxy.proxy import mode_specs
from mitmproxy.utils import asyncio_utils

logger = logging.getLogger(__name__)

TCP_SCHEMES = ("http", "https", "tls", "tcp")  # upstreams a TCP connect can check (not UDP, QUIC, DNS)
CONNECT_TIMEOUT = 2.0
REPEAT_WARNING = 60.0  # seconds between warnings while an upstream stays unreachable
COMMAND_BAR = "#/flows?c=true"  # mitmweb's URL fragment that opens the command bar


def parse_modes(specs) -> list[mode_specs.ProxyMode]:
    return [mode_specs.ProxyMode.parse(s) for s in specs]


def scheme_problem(mode: mode_specs.ProxyMode) -> str | None:
    """A reverse mode whose upstream has no scheme: what to write instead."""
    if isinstance(mode, mode_specs.ReverseMode) and "://" not in mode.data:
        return (
            f"--mode {mode.full_spec}: the upstream has no scheme, so mitmproxy would speak HTTPS to it "
            f"(a plain-HTTP app then never answers). Write reverse:http://{mode.data} "
            f"(make run UPSTREAM=http://{mode.data}) or reverse:https://{mode.data}"
        )
    return None


async def reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """None if host:port accepts a TCP connection, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return None


class Deployment:
    def __init__(self) -> None:
        self.upstreams: list[tuple[str, str, int]] = []  # (spec as written, host, port) of TCP reverse modes
        self.interval: int = 5
        self.auto_global: bool | None = None  # the block_global value this addon set, if it set one
        self.task: asyncio.Task | None = None
        self.started = False

    def load(self, loader) -> None:
        loader.add_option(
            "openflare_upstream_check",
            int,
            5,
            "Seconds between connection checks of a reverse-mode upstream that did not accept one at startup "
            "(in the background, until it answers; a warning at startup and every minute meanwhile). 0: no check.",
        )

    def configure(self, updated) -> None:
        if "openflare_upstream_check" in updated:
            if not 0 <= ctx.options.openflare_upstream_check <= 3600:
                raise exceptions.OptionsError("openflare_upstream_check must be between 0 and 3600 seconds")
            self.interval = ctx.options.openflare_upstream_check
        if "mode" in updated:
            modes = parse_modes(ctx.options.mode)
            for m in modes:
                if problem := scheme_problem(m):
                    if self.started:
                        raise exceptions.OptionsError(problem)  # a change at run time (mitmweb) is refused
                    logger.error("OpenFlare: %s", problem)  # at startup: this stops mitmdump, without a traceback
                    return
            self.upstreams = [
                (m.data, *m.address) for m in modes if isinstance(m, mode_specs.ReverseMode) and m.scheme in TCP_SCHEMES
            ]
            self._public_clients(modes)
            if self.started:
                self._start_check()
        elif "block_global" in updated and ctx.options.block_global != self.auto_global:
            self.auto_global = None  # set by someone else (mitmweb's options): theirs from now on

    def _public_clients(self, modes: list[mode_specs.ProxyMode]) -> None:
        if "block_global" not in ctx.options:
            return  # no Block addon (a bare test harness): nothing blocks
        opt = ctx.options._options["block_global"]  # noqa: SLF001 - only there can "never set" be told from "set to true"
        ours = opt.value is optmanager.unset or (self.auto_global is not None and opt.value == self.auto_global)
        reverse = bool(modes) and all(isinstance(m, mode_specs.ReverseMode) for m in modes)
        if not ours:
            if reverse and ctx.options.block_global:
                logger.warning("OpenFlare: block_global is true: clients with public addresses get a connection "
                               "reset, never your app (set it false to serve them)")  # fmt: skip
            return
        want = not reverse
        if want and any(isinstance(m, mode_specs.ReverseMode) for m in modes):
            logger.warning("OpenFlare: a reverse mode beside another mode: block_global stays true (the other "
                           "listener must not serve the internet), so public clients of the reverse proxy get a "
                           "connection reset; --set block_global=false serves them on every listener")  # fmt: skip
        if ctx.options.block_global != want:
            self.auto_global = want
            ctx.options.update(block_global=want)
            if not want:
                logger.info("OpenFlare: reverse mode, so clients with public addresses are served "
                            "(block_global false: OpenFlare is the WAF in front of your app; "
                            "--set block_global=true to refuse them)")  # fmt: skip

    def running(self) -> None:
        self.started = True
        self._start_check()
        web_url = getattr(ctx.master, "web_url", None)
        if isinstance(web_url, str):
            logger.info("OpenFlare dashboard (mitmweb, command bar open): %s%s", web_url, COMMAND_BAR)

    def done(self) -> None:
        self.started = False
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def _start_check(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.upstreams:
            self.task = asyncio_utils.create_task(self._check(list(self.upstreams)), name="openflare-upstream-check", keep_ref=True)

    async def _check(self, upstreams: list[tuple[str, str, int]]) -> None:
        await asyncio.gather(*(self._check_one(*u) for u in upstreams))

    async def _check_one(self, spec: str, host: str, port: int) -> None:
        """One upstream now; if unreachable, again every `interval` s until it answers."""
        why = await reachable(host, port)
        if why is None:
            logger.info("OpenFlare: upstream %s accepts connections", spec)
            return
        every = f"checking again every {self.interval} s" if self.interval else "not checked again"
        logger.warning("OpenFlare: upstream %s is unreachable (%s): requests get no answer "
                       "(mitmproxy closes the connection, refusals too) until it accepts connections; %s", spec, why, every)  # fmt: skip
        if not self.interval:
            return
        start = last_warning = time.monotonic()
        while why is not None:
            await asyncio.sleep(self.interval)
            why = await reachable(host, port)
            now = time.monotonic()
            if why is not None and now - last_warning >= REPEAT_WARNING:
                last_warning = now
                logger.warning("OpenFlare: upstream %s still unreachable after %d s (%s)", spec, now - start, why)
        logger.info("OpenFlare: upstream %s answers now (after %d s)", spec, time.monotonic() - start)


addons = [Deployment()]
