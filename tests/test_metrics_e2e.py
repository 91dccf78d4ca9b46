"""/metrics of a real mitmdump running the bundle (`make run`'s addons/openflare.py) after a known mix of requests."""

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from conftest import http_request

pytestmark = pytest.mark.e2e

ATTACK = "/search?id=1%27%20OR%20%271%27=%271"  # the shipped model scores it 10: one whole strike


def scrape(port: int) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):  # raises on an exposition it cannot parse
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_after_a_known_mix(mitmdump, upstream, model_conf, tmp_path):
    port = free_port()
    conf = {
        **model_conf,
        "openflare_metrics_port": port,
        "openflare_trusted_proxies": ["127.0.0.1"],
        "openflare_strikes": 1,  # an attack scored 10 bans its client at once
        "openflare_inspect_body_bytes": 1024,
        "openflare_llm_enabled": False,
        "openflare_record_dir": str(tmp_path / "records"),
        "openflare_record_spill": str(tmp_path / "spill.jsonl"),
    }
    proxy = mitmdump(["addons/openflare.py"], mode=f"reverse:{upstream.url}", conf=conf, env={"OPENFLARE_REDIS_URL": ""})
    get = lambda target, ip, **kw: http_request(proxy.port, "GET", target, {"X-Forwarded-For": ip}, **kw)[0]  # noqa: E731
    assert [get("/hello", f"192.0.2.{i}") for i in range(1, 6)] == [200] * 5
    # 10 refused by the model, each from its own address (each is then banned), then 3 from one banned address
    assert [get(ATTACK, f"198.51.100.{i}") for i in range(1, 11)] == [403] * 10
    assert [get("/hello", "198.51.100.1") for _ in range(3)] == [403] * 3
    status, _, _ = http_request(proxy.port, "POST", "/upload", {"X-Forwarded-For": "192.0.2.50"}, body=b"x" * 2000)
    assert status == 413
    deadline = time.monotonic() + 30
    s = scrape(port)
    while s.get(("openflare_recorder_stored_records_total", ())) != 19 and time.monotonic() < deadline:
        time.sleep(0.2)  # the recorder stores in batches, off the request path
        s = scrape(port)
    assert s[("openflare_requests_total", (("verdict", "pass"),))] == 5
    assert s[("openflare_requests_total", (("verdict", "block"),))] == 14
    assert s[("openflare_requests_total", (("verdict", "error"),))] == 0
    assert s[("openflare_refusals_total", (("reason", "model"),))] == 10
    assert s[("openflare_refusals_total", (("reason", "ban"),))] == 3
    assert s[("openflare_refusals_total", (("reason", "oversize"),))] == 1
    assert s[("openflare_refusals_total", (("reason", "rate_limit"),))] == 0
    assert s[("openflare_refusals_by_category_total", (("category", "sqli"),))] == 10
    assert s[("openflare_refusals_by_location_total", (("location", "query"),))] == 10
    assert s[("openflare_local_score_count", ())] == 15  # the banned and the oversize requests are never scored
    assert s[("openflare_local_score_bucket", (("le", "9.0"),))] == 5
    assert s[("openflare_scoring_duration_seconds_count", ())] == 15
    assert s[("openflare_bans_active", ())] == 10
    assert s[("openflare_bans_made_total", ())] == 10
    assert s[("openflare_ban_events_total", (("event", "refused_banned"),))] == 3
    assert s[("openflare_ban_store_up", (("store", "in-process"),))] == 1
    assert s[("openflare_recorder_stored_records_total", ())] == 19
    assert s[("openflare_recorder_lost_records_total", ())] == 0
    assert s[("openflare_model_threshold", ())] == 6
    assert [k for k in s if k[0] == "openflare_model_info"]
    assert s[("openflare_llm_enabled", ())] == 0
    assert s[("process_resident_memory_bytes", ())] > 0
    labels = {v for (_, lab) in s for _, v in lab}
    assert not any(v.startswith(("192.0.2.", "198.51.100.", "/")) for v in labels)  # never an IP or a path
    assert f"Prometheus endpoint on http://127.0.0.1:{port}/metrics" in "".join(proxy.output())
