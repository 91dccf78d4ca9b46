"""Metrics: a Prometheus endpoint (`/metrics`) served by the running proxy; off unless `openflare_metrics_port` is set.

Two sources. What each flow ended as (verdict, why it was refused, attack category and field location of a
refusal, scoring time, local score, LLM status and latency) is counted in the `response` and `error` hooks
from the flow's metadata (`addons.common` keys): a few dict and list increments per request, no lock (the
event loop is the only writer). Everything the other addons already count (the LLM's calls, failures,
tokens and cost; bans in force, strikes, the ban store's health and outages; the recorder's queue, stored,
spilled, overflowed and lost records; the model's version and file age) is read from their objects at
scrape time by a custom collector, in the server's thread: nothing of that touches the request path.

Served by prometheus_client's own HTTP server in a daemon thread on `openflare_metrics_host` (127.0.0.1:
only this machine) : `openflare_metrics_port`. Each proxy process serves its own (give each its own port;
Prometheus adds `instance`). Labels take a few fixed values each, never an IP, a path or a header.

In the bundle (addons/openflare.py) this addon gets the other addons' instances; loaded alone with `-s`, it
finds them through mitmproxy's addon manager (`scorer`, `ipbans`, `recorder`).
"""

from __future__ import annotations

import bisect
import datetime
import logging
import os
import time

from mitmproxy import ctx
from mitmproxy import exceptions
from mitmproxy import flow as mflow
from mitmproxy import http

from addons import common
from addons import fields as fieldsmod

logger = logging.getLogger(__name__)

COUNTED = "openflare.metrics_counted"  # bool: this flow is counted (response, then error, count it once)
RATE_STATUS = 429
RATE_BODY = b"Too Many Requests\n"

# Label values: fixed sets; anything else is "other", so no client can grow a label's cardinality.
REASONS = ("model", "ban", "rate_limit", "oversize", "fail_policy")
VERDICT_LABELS = (common.VERDICT_PASS, common.VERDICT_BLOCK, common.VERDICT_ERROR, "unscored")
CATEGORIES = frozenset((
    "sqli", "xss", "cmdi", "path_traversal", "lfi", "rfi", "ssrf", "xxe", "ssti", "nosqli", "ldapi", "crlf",
    "scanner", "protocol", "prompt_injection", "jndi", "other",
))  # fmt: skip  # llm.CATEGORIES (less benign) and what fieldmodel.category_of names
LOCATIONS = frozenset(fieldsmod.LOCATIONS)
LLM_STATUSES = frozenset((
    "skipped", "cached", "ok", "shared", "timeout", "error", "invalid", "breaker-open", "busy", "rate-limited",
    "ip-quota", "ip-share",
))  # fmt: skip  # addons/llm.py's statuses but "off" (no LLM configured)
LLM_CALLED = frozenset(("ok", "timeout", "error", "invalid"))  # statuses of a call that went out

# Histogram bucket bounds (seconds; the local score 1-10).
SCORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
LOCAL_BUCKETS = tuple(float(i) for i in range(1, 11))


class Histogram:
    """Bucket counts and a sum, written by the event loop alone; read whole (copies) by the scrape thread."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """(cumulative buckets as prometheus_client wants them, sum)."""
        counts, total = list(self.counts), self.sum
        out, acc = [], 0
        for bound, n in zip(self.bounds, counts):
            acc += n
            out.append((_float(bound), acc))
        out.append(("+Inf", acc + counts[-1]))
        return out, total


def _float(x: float) -> str:
    return repr(float(x))


def refusal_reason(flow: http.HTTPFlow) -> str | None:
    """Why OpenFlare refused this flow (one of REASONS), or None when it did not (an app's own 403 included)."""
    md = flow.metadata
    if md.get(common.BANNED):
        return "ban"
    if md.get(common.RATE_LIMITED):
        return "rate_limit"
    if md.get(common.OVERSIZE):
        return "oversize"
    if not common.is_refusal(flow.response):
        return None
    verdict = md.get(common.VERDICT)
    if verdict == common.VERDICT_BLOCK:
        return "fail_policy" if "openflare_llm_fail" in str(md.get(common.REASON) or "") else "model"
    if verdict == common.VERDICT_ERROR or (verdict is None and md.get(common.REASON)):
        return "fail_policy"  # unscored and openflare_fail closed; the ban store down and openflare_redis_fail closed
    return None


class Metrics:
    def __init__(self, peers: list | None = None) -> None:
        self.peers = peers  # the bundle's addon instances; None: found through ctx.master.addons
        self.port = 0
        self.host = "127.0.0.1"
        self.server = None  # prometheus_client's WSGI server, while serving
        self.thread = None
        self.started = False
        self.counting = False  # while the endpoint is configured (a port): off, the hooks return at once
        self.requests: dict[str, int] = {}  # verdict -> flows
        self.refusals: dict[str, int] = {}  # reason -> flows
        self.categories: dict[str, int] = {}  # category -> flows refused by the model
        self.locations: dict[str, int] = {}  # location of the deciding field -> flows refused by the model
        self.llm_status: dict[str, int] = {}  # the LLM's status per flow (skipped, ok, timeout, busy, ...)
        self.detect_only = 0  # flows scored above the threshold and forwarded (openflare_detect_only)
        self.score_seconds = Histogram(SCORE_BUCKETS)
        self.local_score = Histogram(LOCAL_BUCKETS)
        self.llm_seconds = Histogram(LLM_BUCKETS)

    def load(self, loader) -> None:
        loader.add_option(
            "openflare_metrics_port",
            int,
            0,
            "Port of the Prometheus endpoint (/metrics) this proxy serves. 0: off. Each proxy process needs its own.",
        )
        loader.add_option(
            "openflare_metrics_host",
            str,
            "127.0.0.1",
            "Address the Prometheus endpoint listens on: 127.0.0.1 (only this machine; default), 0.0.0.0 for "
            "every interface (then firewall it: the metrics say what is refused and why).",
        )

    def configure(self, updated) -> None:
        opts = ctx.options
        if "openflare_metrics_port" in updated and not 0 <= opts.openflare_metrics_port <= 65535:
            raise exceptions.OptionsError(f"openflare_metrics_port must be between 0 and 65535, not {opts.openflare_metrics_port}")
        if "openflare_metrics_host" in updated and not opts.openflare_metrics_host.strip():
            raise exceptions.OptionsError("openflare_metrics_host must not be empty (127.0.0.1: only this machine)")
        if updated & {"openflare_metrics_port", "openflare_metrics_host"}:
            wanted = (opts.openflare_metrics_port, opts.openflare_metrics_host.strip())
            self.counting = bool(wanted[0])
            if wanted != (self.port, self.host) or (self.started and self.port and self.server is None):
                self.port, self.host = wanted
                if self.started:
                    self._stop()
                    self._start()

    def running(self) -> None:
        self.started = True
        self._start()

    def done(self) -> None:
        self.started = False
        self._stop()

    def _start(self) -> None:
        if not self.port or self.server is not None:
            return
        import prometheus_client

        registry = prometheus_client.CollectorRegistry(auto_describe=False)
        registry.register(Collector(self))
        prometheus_client.ProcessCollector(registry=registry)
        try:
            self.server, self.thread = prometheus_client.start_http_server(self.port, self.host, registry)
        except OSError as e:
            logger.error("OpenFlare metrics: cannot listen on %s:%d: %s (openflare_metrics_port, openflare_metrics_host)",
                         self.host, self.port, e.strerror or e)  # fmt: skip
            return
        logger.info("OpenFlare metrics: Prometheus endpoint on http://%s:%d/metrics", _url_host(self.host), self.port)

    def _stop(self) -> None:
        server, self.server, self.thread = self.server, None, None
        if server is not None:
            server.shutdown()
            server.server_close()

    # ---- the request path: a few increments per flow ----

    def response(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if not self.counting:
            return
        if flow.error is not None and flow.error.msg == mflow.Error.KILLED_MESSAGE and flow.metadata.get(common.BANNED):
            self._count(flow, killed=True)  # openflare_ban_action drop: killed, not live any more
        else:
            self._count(flow)

    def _count(self, flow: http.HTTPFlow, killed: bool = False) -> None:
        if not self.counting:
            return
        md = flow.metadata
        if md.get(COUNTED) or not (flow.live or killed):
            return
        md[COUNTED] = True
        reason = refusal_reason(flow)
        verdict = md.get(common.VERDICT)
        if reason is not None:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
            verdict = common.VERDICT_BLOCK
            if reason == "model":
                cat = md.get(common.CATEGORY)
                cat = "unknown" if cat is None else cat if cat in CATEGORIES else "other"
                self.categories[cat] = self.categories.get(cat, 0) + 1
                fld = md.get(common.FIELD)
                loc = "none" if not fld else fld[0] if fld[0] in LOCATIONS else "other"
                self.locations[loc] = self.locations.get(loc, 0) + 1
        elif verdict == common.VERDICT_BLOCK:
            self.detect_only += 1
        elif verdict is None:
            verdict = "unscored"
        elif verdict not in VERDICT_LABELS:
            verdict = "unscored"
        self.requests[verdict] = self.requests.get(verdict, 0) + 1
        ms = md.get(common.SCORE_MS)
        if ms is not None:
            self.score_seconds.observe(ms / 1000.0)
            local = md.get(common.LOCAL_SCORE)
            if local is not None:
                self.local_score.observe(local)
            status = md.get(common.LLM_STATUS)
            if status in LLM_STATUSES:
                self.llm_status[status] = self.llm_status.get(status, 0) + 1
                if status in LLM_CALLED and md.get(common.LLM_MS):
                    self.llm_seconds.observe(md[common.LLM_MS] / 1000.0)

    # ---- the other addons, at scrape time ----

    def peer(self, class_name: str):
        """The bundle's (or the addon manager's) instance of that addon class, or None."""
        if self.peers is not None:
            return next((a for a in self.peers if type(a).__name__ == class_name), None)
        try:
            return ctx.master.addons.get(class_name.lower())
        except Exception:  # noqa: BLE001 - no master (a test harness without one)
            return None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _card_time(card: dict) -> float | None:
    try:
        t = datetime.datetime.fromisoformat(str(card.get("created")))
    except (TypeError, ValueError):
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


class Collector:
    """A prometheus_client collector: the flow counters, then what the other addons count, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self):
        from prometheus_client.core import CounterMetricFamily as C
        from prometheus_client.core import GaugeMetricFamily as G
        from prometheus_client.core import HistogramMetricFamily as H

        m = self.m
        requests = C("openflare_requests", "Requests by verdict: pass, block (refused for any reason, or scored "
                     "above the threshold in detect-only mode), error (unscored, fail policy decided), unscored", labels=["verdict"])
        seen = dict(m.requests)
        for v in VERDICT_LABELS:
            requests.add_metric([v], seen.get(v, 0))
        yield requests
        refusals = C("openflare_refusals", "Requests OpenFlare refused, by reason: model (the score), ban, rate_limit, "
                     "oversize (413/431), fail_policy (openflare_fail, openflare_llm_fail or openflare_redis_fail closed)", labels=["reason"])
        seen = dict(m.refusals)
        for r in REASONS:
            refusals.add_metric([r], seen.get(r, 0))
        yield refusals
        yield _labelled(C, "openflare_refusals_by_category", "Requests refused by the model, by the attack category the "
                        "deciding field looks like (unknown: none said)", "category", m.categories)
        yield _labelled(C, "openflare_refusals_by_location", "Requests refused by the model, by the location of the "
                        "deciding field (query, header, json, ...; none: a request-level signal)", "location", m.locations)
        yield C("openflare_detect_only_forwarded", "Requests scored above the threshold and forwarded (openflare_detect_only)", value=m.detect_only)
        yield _histogram(H, "openflare_scoring_duration_seconds", "Time the scorer spent on a request (the LLM's wait included)", m.score_seconds)
        yield _histogram(H, "openflare_local_score", "The local model's score (1-10) of each scored request", m.local_score)
        yield _labelled(C, "openflare_llm_requests", "Scored requests by the LLM's part in them: skipped (outside the band), "
                        "ok, cached, shared, a failure (timeout, error, invalid, breaker-open) or a cap (busy, rate-limited, "
                        "ip-quota, ip-share)", "status", m.llm_status)
        yield _histogram(H, "openflare_llm_request_duration_seconds", "Latency of the LLM calls requests waited for", m.llm_seconds)
        yield from self._scorer(C, G)
        yield from self._bans(C, G)
        yield from self._recorder(C, G)

    def _scorer(self, C, G):
        scorer = self.m.peer("Scorer")
        mdl = getattr(scorer, "model", None)
        if mdl is not None:
            info = G("openflare_model_info", "The local model serving (its version as a label; always 1)", labels=["version"])
            info.add_metric([str(mdl.version)[:64]], 1)
            yield info
            yield G("openflare_model_threshold", "Scores above this are refused", value=scorer.threshold)
            try:
                age = time.time() - os.stat(mdl.path).st_mtime
            except OSError:
                age = None
            if age is not None:
                yield G("openflare_model_file_age_seconds", "Seconds since the model file was last written", value=max(0.0, age))
            created = _card_time(getattr(mdl, "card", {}) or {})
            if created is not None:
                yield G("openflare_model_created_timestamp_seconds", "When the serving model was trained (its card)", value=created)
        judge = getattr(scorer, "judge", None)
        yield G("openflare_llm_enabled", "1 when an LLM second opinion is configured", value=0 if judge is None else 1)
        if judge is None:
            return
        s = judge.stats
        yield C("openflare_llm_calls", "LLM calls made (each one the endpoint was asked)", value=s.calls)
        yield C("openflare_llm_answers", "LLM calls answered with a valid verdict", value=s.ok)
        yield C("openflare_llm_cache_hits", "Band requests answered from the verdict cache", value=s.cache_hits)
        yield C("openflare_llm_shared", "Band requests that waited on an identical call in flight", value=s.shared)
        yield _labelled(C, "openflare_llm_failures", "LLM failures and refusals to call, by kind", "kind", dict(s.failures), cap=32)
        tokens = C("openflare_llm_tokens", "Tokens the LLM endpoint reported, by direction", labels=["direction"])
        tokens.add_metric(["input"], s.tokens_in)
        tokens.add_metric(["output"], s.tokens_out)
        yield tokens
        yield C("openflare_llm_estimated_cost_dollars", "Estimated LLM cost in US dollars (openflare_llm_price_in/out)",
                value=s.cost_micro_usd / 1e6)  # fmt: skip
        yield C("openflare_llm_call_seconds", "Seconds spent in LLM calls, all together", value=s.latency_ms_total / 1000.0)

    def _bans(self, C, G):
        bans = self.m.peer("IpBans")
        store = getattr(bans, "store", None)
        if store is None:
            return
        now = time.monotonic()
        active = sum(1 for b in list(store.bans.values()) if b.deadline > now)
        yield G("openflare_bans_active", "Bans in force in this process's view", value=active)
        stats = dict(store.stats)
        up = G("openflare_ban_store_up", "1 while the ban store (Redis, or the in-process or shared embedded store) answers",
               labels=["store"])  # fmt: skip
        up.add_metric([str(store.kind)], 1 if store.healthy else 0)
        yield up
        outages = stats.get("redis_outages", 0)
        yield C("openflare_ban_store_outages", "Times the ban store became unreachable", value=outages)
        yield C("openflare_ban_store_reconnects", "Times the ban store answered again after an outage",
                value=max(0, outages - (0 if store.healthy else 1)))  # fmt: skip
        yield C("openflare_strikes", "Strikes counted by the ban store (delivered to Redis)", value=stats.get("strikes", 0))
        yield C("openflare_bans_made", "Bans made on this process's strikes, as the ban store counted them (the ban "
                "events' bans_local: this process banned on its own count first, before the store answered)",
                value=stats.get("bans", 0))  # fmt: skip
        yield _labelled(C, "openflare_ban_events", "Every counter of the ban store (addons/banstore.py; openflare.banstats)",
                        "event", stats, cap=64)  # fmt: skip

    def _recorder(self, C, G):
        rec = self.m.peer("Recorder")
        writer = getattr(rec, "writer", None)
        if writer is None:
            return
        queue = getattr(rec, "queue", None)
        yield G("openflare_recorder_queue_depth", "Records waiting for the journal", value=len(queue) if queue is not None else 0)
        yield G("openflare_recorder_unstored_records", "Records journaled and not yet in the store", value=len(getattr(writer, "ready", ()) or ()))
        stats = dict(writer.stats)
        for key, what in (("stored", "Records inserted into the store"), ("spilled", "Records kept in the journal while the store was unreachable"),
                          ("overflowed", "Records written to the overflow file (the queue was full)"), ("lost", "Records lost"),
                          ("unacknowledged", "Records whose response went before their journal write"), ("replayed", "Records replayed from the journal")):  # fmt: skip
            yield C(f"openflare_recorder_{key}_records", what, value=stats.get(key, 0))
        yield _labelled(C, "openflare_recorder_events", "Every counter of the record writer (addons/records.py)", "event", stats, cap=64)


def _labelled(C, name: str, doc: str, label: str, counts: dict, cap: int = 64):
    fam = C(name, doc, labels=[label])
    for key, n in sorted(dict(counts).items())[:cap]:
        fam.add_metric([str(key)], n)
    return fam


def _histogram(H, name: str, doc: str, hist: Histogram):
    buckets, total = hist.snapshot()
    fam = H(name, doc)
    fam.add_metric([], buckets, total)
    return fam


addons = [Metrics()]
