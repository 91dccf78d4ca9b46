"""addons/metrics.py: what each flow counts as, the collector over the other addons' counters, the endpoint."""

import collections
import time
import urllib.request

import pytest
from mitmproxy import exceptions
from mitmproxy import flow as mflow
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from addons import banstore
from addons import common
from addons import llm
from addons import metrics
from conftest import free_port


def flow(meta: dict, status: int = 200, body: bytes = b"ok", path: bytes = b"/"):
    f = tflow.tflow(req=tutils.treq(path=path), resp=tutils.tresp(status_code=status, content=body))
    f.metadata.update(meta)
    return f


def refused(meta: dict, status: int = common.BLOCK_STATUS, body: bytes = common.BLOCK_BODY):
    return flow(meta, status, body)


def scored(verdict: str, score: int, ms: float = 0.5, **more):
    return {common.VERDICT: verdict, common.SCORE: score, common.LOCAL_SCORE: score, common.SCORE_MS: ms,
            common.LLM_STATUS: llm.OFF, **more}  # fmt: skip


def counting(peers=()) -> metrics.Metrics:
    """A Metrics addon counting as with openflare_metrics_port set (no server: the tests read its collector)."""
    m = metrics.Metrics(peers=list(peers))
    m.counting = True
    return m


def samples(m: metrics.Metrics) -> dict[tuple, float]:
    """Every sample of a scrape, parsed back by prometheus_client.parser: (name, sorted labels) -> value."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics.Collector(m))
    text = generate_latest(reg).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_each_flow_counts_once_by_verdict_reason_category_and_location():
    m = counting()
    sqli = scored("block", 10, 0.8, **{common.CATEGORY: "sqli", common.FIELD: ["query", "id"]})
    flows = [flow(scored("pass", 2)) for _ in range(4)]
    flows += [refused(dict(sqli)) for _ in range(3)]
    flows += [refused(scored("block", 9, **{common.CATEGORY: "xss", common.FIELD: ["json", "q"]}))]
    flows += [refused({common.BANNED: True, common.REASON: "ip banned: x"}) for _ in range(2)]
    flows += [refused({common.RATE_LIMITED: True}, 429, b"Too Many Requests\n")]
    flows += [refused({common.OVERSIZE: "body"}, 413, common.OVERSIZE_BODY[413])]
    flows += [refused(scored("error", None, **{common.LOCAL_SCORE: None}))]  # unscored, openflare_fail closed
    flows += [refused({common.REASON: "ban store unreachable (openflare_redis_fail=closed)"})]
    flows += [refused(scored("block", 6, **{common.REASON: "llm timeout, openflare_llm_fail closed (local score 6)"}))]
    flows += [flow(scored("block", 8, **{common.CATEGORY: "cmdi", common.FIELD: ["header", "x"]}))]  # detect-only
    flows += [flow(scored("pass", 1), common.BLOCK_STATUS, common.BLOCK_BODY)]  # the app's own 403
    for f in flows:
        m.response(f)
        m.error(f)  # a flow with a response and then an error counts once
    s = samples(m)
    assert s[("openflare_requests_total", (("verdict", "pass"),))] == 5
    assert s[("openflare_requests_total", (("verdict", "block"),))] == 12  # 11 refused, 1 forwarded in detect-only
    assert s[("openflare_requests_total", (("verdict", "error"),))] == 0
    want = {"model": 4, "ban": 2, "rate_limit": 1, "oversize": 1, "fail_policy": 3}
    assert {r: s[("openflare_refusals_total", (("reason", r),))] for r in metrics.REASONS} == want
    assert s[("openflare_refusals_by_category_total", (("category", "sqli"),))] == 3
    assert s[("openflare_refusals_by_category_total", (("category", "xss"),))] == 1
    assert ("openflare_refusals_by_category_total", (("category", "cmdi"),)) not in s  # forwarded, not refused
    assert s[("openflare_refusals_by_location_total", (("location", "query"),))] == 3
    assert s[("openflare_refusals_by_location_total", (("location", "json"),))] == 1
    assert s[("openflare_detect_only_forwarded_total", ())] == 1
    # scored flows: 4 + 1 passes, 4 model refusals, the error, the llm-fail refusal, the detect-only one
    assert s[("openflare_scoring_duration_seconds_count", ())] == 12
    assert s[("openflare_local_score_count", ())] == 11  # the unscored error has no local score
    assert s[("openflare_local_score_bucket", (("le", "2.0"),))] == 5
    assert s[("openflare_local_score_bucket", (("le", "9.0"),))] == 8
    assert s[("openflare_local_score_bucket", (("le", "+Inf"),))] == 11
    assert s[("openflare_local_score_sum", ())] == 4 * 2 + 1 + 3 * 10 + 9 + 6 + 8
    assert s[("openflare_scoring_duration_seconds_bucket", (("le", "0.0005"),))] == 9  # all but the 0.8 ms ones


def test_labels_take_fixed_values_only():
    m = counting()
    for i in range(50):
        m.response(refused(scored("block", 10, **{common.CATEGORY: f"cat-{i}", common.FIELD: [f"loc-{i}", "/a/b"]})))
    m.response(refused(scored("block", 10, **{common.FIELD: None})))
    s = samples(m)
    cats = {dict(k[1])["category"]: v for k, v in s.items() if k[0] == "openflare_refusals_by_category_total"}
    locs = {dict(k[1])["location"]: v for k, v in s.items() if k[0] == "openflare_refusals_by_location_total"}
    assert cats == {"other": 50, "unknown": 1}
    assert locs == {"other": 50, "none": 1}
    for (name, labels), _ in s.items():
        for _, value in labels:
            assert "/" not in value and not value[:1].isdigit() or name.endswith("_bucket")


def test_a_dropped_banned_flow_counts_and_flows_from_a_file_do_not():
    m = counting()
    f = tflow.tflow()
    f.metadata[common.BANNED] = True
    f.error = mflow.Error(mflow.Error.KILLED_MESSAGE)
    f.live = False  # killed
    m.error(f)
    old = flow(scored("pass", 1))
    old.live = False  # read from a file
    m.response(old)
    s = samples(m)
    assert s[("openflare_refusals_total", (("reason", "ban"),))] == 1
    assert s[("openflare_requests_total", (("verdict", "pass"),))] == 0


def test_llm_status_and_latency_of_band_requests():
    m = counting()
    for status, ms in (("ok", 300.0), ("ok", 700.0), ("timeout", 1500.0), ("busy", 0.0), ("skipped", 0.0), ("off", 0.0)):
        m.response(flow(scored("pass", 5, **{common.LLM_STATUS: status, common.LLM_MS: ms})))
    s = samples(m)
    st = {dict(k[1])["status"]: v for k, v in s.items() if k[0] == "openflare_llm_requests_total"}
    assert st == {"ok": 2, "timeout": 1, "busy": 1, "skipped": 1}
    assert s[("openflare_llm_request_duration_seconds_count", ())] == 3
    assert s[("openflare_llm_request_duration_seconds_sum", ())] == pytest.approx(2.5)
    assert s[("openflare_llm_request_duration_seconds_bucket", (("le", "0.5"),))] == 1


class Scorer:  # the names the collector looks for: duck-typed, as addons never import each other
    def __init__(self, model_path):
        self.model = type("M", (), {"version": "local-test", "path": model_path, "card": {"created": "2026-12-01T00:00:00+00:00"}})()
        self.threshold = 6
        stats = llm.Counters(calls=7, ok=5, cache_hits=3, tokens_in=1000, tokens_out=200, cost_micro_usd=270.0, latency_ms_total=2100.0)
        stats.fail("timeout")
        stats.fail("timeout")
        self.judge = type("J", (), {"stats": stats})()


class IpBans:
    def __init__(self):
        self.store = type("S", (), {})()
        now = time.monotonic()
        self.store.bans = {"198.51.100.1": banstore.Ban(now + 60, "x"), "198.51.100.2": banstore.Ban(now - 1, "old")}
        self.store.stats = {"strikes": 9, "bans": 2, "bans_local": 1, "redis_outages": 2, "strikes_lost": 1}
        self.store.kind = "redis"
        self.store.healthy = False


class Recorder:
    def __init__(self):
        self.queue = collections.deque([1, 2, 3])
        self.writer = type("W", (), {"ready": [1], "stats": {"stored": 40, "spilled": 5, "overflowed": 2, "lost": 1, "records": 48}})()


def test_collector_reads_the_other_addons_counters_at_scrape_time(tmp_path):
    path = tmp_path / "m.npz"
    path.write_bytes(b"x")
    m = counting([Scorer(path), IpBans(), Recorder()])
    s = samples(m)
    assert s[("openflare_model_info", (("version", "local-test"),))] == 1
    assert s[("openflare_model_threshold", ())] == 6
    assert 0 <= s[("openflare_model_file_age_seconds", ())] < 3600
    assert s[("openflare_model_created_timestamp_seconds", ())] == 1796083200.0
    assert s[("openflare_llm_calls_total", ())] == 7
    assert s[("openflare_llm_answers_total", ())] == 5
    assert s[("openflare_llm_failures_total", (("kind", "timeout"),))] == 2
    assert s[("openflare_llm_tokens_total", (("direction", "input"),))] == 1000
    assert s[("openflare_llm_estimated_cost_dollars_total", ())] == pytest.approx(0.00027)
    assert s[("openflare_llm_call_seconds_total", ())] == pytest.approx(2.1)
    assert s[("openflare_bans_active", ())] == 1  # the expired one is not in force
    assert s[("openflare_ban_store_up", (("store", "redis"),))] == 0
    assert s[("openflare_ban_store_outages_total", ())] == 2
    assert s[("openflare_ban_store_reconnects_total", ())] == 1  # down now: the second outage has not ended
    assert s[("openflare_strikes_total", ())] == 9
    assert s[("openflare_bans_made_total", ())] == 2  # the store's count (bans_local: banned here first)
    assert s[("openflare_ban_events_total", (("event", "strikes_lost"),))] == 1
    assert s[("openflare_recorder_queue_depth", ())] == 3
    assert s[("openflare_recorder_unstored_records", ())] == 1
    assert s[("openflare_recorder_stored_records_total", ())] == 40
    assert s[("openflare_recorder_spilled_records_total", ())] == 5
    assert s[("openflare_recorder_overflowed_records_total", ())] == 2
    assert s[("openflare_recorder_lost_records_total", ())] == 1


def test_without_peers_only_the_flow_counters_and_llm_off():
    s = samples(metrics.Metrics(peers=[]))
    assert s[("openflare_llm_enabled", ())] == 0
    assert not any(k[0].startswith(("openflare_bans_", "openflare_recorder_", "openflare_model_")) for k in s)


def test_options_off_by_default_and_checked():
    m = metrics.Metrics(peers=[])
    with taddons.context(m) as tctx:
        assert tctx.options.openflare_metrics_port == 0
        assert tctx.options.openflare_metrics_host == "127.0.0.1"
        m.running()
        assert m.server is None
        m.response(flow(scored("pass", 1)))
        assert m.requests == {}  # off: nothing is counted either
        with pytest.raises(exceptions.OptionsError, match="openflare_metrics_port"):
            tctx.configure(m, openflare_metrics_port=70000)
        with pytest.raises(exceptions.OptionsError, match="openflare_metrics_host"):
            tctx.configure(m, openflare_metrics_host=" ")


def test_endpoint_serves_on_loopback_and_moves_with_its_option():
    m = metrics.Metrics(peers=[])
    port = free_port()
    with taddons.context(m) as tctx:
        tctx.configure(m, openflare_metrics_port=port)
        m.running()
        try:
            assert m.server.server_address[0] == "127.0.0.1"
            m.response(flow(scored("pass", 1)))
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert 'openflare_requests_total{verdict="pass"} 1.0' in text
            assert "process_resident_memory_bytes" in text
            other = free_port()
            tctx.configure(m, openflare_metrics_port=other)
            assert m.server.server_address[1] == other
            urllib.request.urlopen(f"http://127.0.0.1:{other}/metrics", timeout=10).read()
            tctx.configure(m, openflare_metrics_port=0)
            assert m.server is None
        finally:
            m.done()
        assert m.server is None
