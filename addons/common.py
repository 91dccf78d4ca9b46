"""What the OpenFlare addons share: flow metadata keys, the refusal body, the addon order and bundle.

Addons never import each other; they talk only through these `flow.metadata` keys.
Values stored under them are plain Python (str, int, float, bool, None, list, dict) so flows can be saved.
"""

import inspect
import time

from mitmproxy import http

from addons import fields as fieldsmod

# Written by FeatureExtractor (addons/features.py).
CLIENT_IP = "openflare.client_ip"  # str: the client address after trusted-proxy resolution
FIELDS = "openflare.fields"  # list of [location, name, value, via]: every part of the request (addons.fields)
SIGNALS = "openflare.signals"  # list of str: request-level signals ("scanner-ua:sqlmap", "bad-encoding:gzip", ...)
OVERSIZE = "openflare.oversize"  # str: what was beyond the inspection limits ("body", "headers", ...); refused 413/431

# Written by Scorer (addons/scorer.py).
LOCAL_SCORE = "openflare.local_score"  # int 1-10: the local model's score
SCORE = "openflare.score"  # int 1-10: the final (ensemble) score
VERDICT = "openflare.verdict"  # str: one of VERDICTS
MODEL_VERSION = "openflare.model_version"  # str
SCORE_MS = "openflare.score_ms"  # float: time spent scoring, milliseconds
REASON = "openflare.reason"  # str: why the verdict is what it is (never sent to the client)
FIELD = "openflare.field"  # [location, name] of the field that decided the score, or None
SIGNAL = "openflare.signal"  # str: what in it decided ("sqli (libinjection s&sos)", "scanner-ua:sqlmap", ...), or None
EXPLANATION = "openflare.explanation"  # str: field and signal in words, as in the flow comment
SIGNAL_CATEGORY = "openflare.signal_category"  # str: the category the deciding field looks like, or None

# Written by the Scorer's LLM half (issue 5: addons/llm.py, called from addons/scorer.py).
LLM_SCORE = "openflare.llm_score"  # int 1-10 or None
LLM_CATEGORY = "openflare.llm_category"  # str or None
LLM_REASON = "openflare.llm_reason"  # str (sanitised) or None
LLM_STATUS = "openflare.llm_status"  # str: skipped / cached / ok / timeout / error / breaker-open / ...
LLM_MS = "openflare.llm_ms"  # float: LLM latency, milliseconds
CATEGORY = "openflare.category"  # str: attack category when known (sqli, xss, ...), else None

# Written by IpBans (issue 3: addons/bans.py).
BANNED = "openflare.banned"  # bool: refused because the client IP is banned
RATE_LIMITED = "openflare.rate_limited"  # bool: refused by the per-IP rate limit

# Written by Recorder (issue 4: addons/recorder.py).
RECORDED = "openflare.recorded"  # bool: this flow's record is queued (a flow is recorded once)

# Written by Labeler (issue 6: addons/labels.py).
LABEL = "openflare.label"  # str: the operator's label of this flow ("benign" or "attack"), once labelled

VERDICT_PASS = "pass"
VERDICT_BLOCK = "block"
VERDICT_ERROR = "error"  # scoring failed; the fail policy decided
VERDICTS = (VERDICT_PASS, VERDICT_BLOCK, VERDICT_ERROR)

# The one refusal every addon sends: it reveals neither score nor reason.
BLOCK_STATUS = 403
BLOCK_BODY = b"Forbidden\n"
BLOCK_HEADERS = {"content-type": "text/plain; charset=utf-8", "cache-control": "no-store"}
# A request OpenFlare cannot inspect whole is refused with its own status (never the 403 of an attack).
OVERSIZE_BODY = {413: b"Request Entity Too Large\n", 431: b"Request Header Fields Too Large\n"}
_REFUSALS: dict[tuple[int, bytes, bool], http.Response] = {}


def refusal(status: int = BLOCK_STATUS, body: bytes = BLOCK_BODY, method: str = "GET") -> http.Response:
    """A new refusal to a request of this method: `http.Response.make(status, body, BLOCK_HEADERS)`, about 20x cheaper.

    A refusal to HEAD has no content (RFC 9110 9.3.2) and keeps the content-length a GET would get (8.6):
    mitmproxy sends whatever content a response holds, and a body after a HEAD response is read by the
    client as the start of the next response on a keep-alive connection.

    Response.make type-checks every field on each call, which on the request path costs more than the
    local model. This copies a response made once: new message data and headers (the other fields are
    immutable), timestamps now.
    """
    head = method.upper() == "HEAD"  # as mitmproxy's HTTP/1 layer compares it
    made = _REFUSALS.get((status, body, head))
    if made is None:
        made = http.Response.make(status, body, BLOCK_HEADERS)
        if head:
            made.data.content = b""  # not `.content`: its setter would set content-length to 0
        _REFUSALS[(status, body, head)] = made
    resp = _shallow_copy(made)
    resp.data = data = _shallow_copy(made.data)
    data.headers = _shallow_copy(made.data.headers)  # its fields are a tuple: an edit replaces, never mutates
    data.timestamp_start = data.timestamp_end = time.time()
    return resp


def is_refusal(resp: http.Response | None, status: int = BLOCK_STATUS, body: bytes = BLOCK_BODY) -> bool:
    """Whether a response is `refusal(status, body)` to any method (a refusal to HEAD has no content)."""
    if resp is None or resp.status_code != status:
        return False
    content = resp.raw_content
    return content == body or (content == b"" and resp.headers.get("content-length") == str(len(body)))


def request_of(metadata: dict) -> fieldsmod.Request | None:
    """The request's fields as FeatureExtractor stored them (None when it did not run)."""
    got = metadata.get(FIELDS)
    if got is None:
        return None
    return fieldsmod.Request([fieldsmod.Field(*f) for f in got], list(metadata.get(SIGNALS) or ()))


def _shallow_copy(obj):
    """copy.copy for these plain objects (no __slots__, no __copy__), without its generic machinery."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


# The documented order of the addons: addons/openflare.py (what `make run` loads) lists them so, and
# loading them as separate scripts takes this `-s` order.
ADDON_ORDER = (
    "addons/deployment.py",  # no traffic hooks: public clients in reverse mode, the upstream checked
    "addons/features.py",
    "addons/bans.py",
    "addons/scorer.py",
    "addons/recorder.py",
    "addons/labels.py",
    "addons/flowcap.py",  # no traffic hooks: caps the flows mitmweb keeps in memory
    "addons/metrics.py",  # last: counts what each flow ended as; the Prometheus endpoint (off by default)
)


def bundle(*instances) -> dict[str, object]:
    """Module-level hooks and commands that serve these addons as one script, in the given order:
    `globals().update(common.bundle(a, b, c))` in a script that has no `addons` list (addons/openflare.py).

    mitmproxy walks every script's addon tree on every event of every flow, hooks or not (about ten
    events a request). A script's own functions end the walk at the module; an `addons` list adds a
    level and one more stop per addon. Each forwarder calls the addons' hooks one after the other, as
    mitmproxy's walk would: a sync hook directly, an async one awaited, and an exception stops the rest
    (mitmproxy catches it once for the whole script). Every command of every addon is exported too.
    """
    import mitmproxy.addonmanager  # noqa: F401 - registers the load hook
    import mitmproxy.proxy.layers  # noqa: F401 - registers the HTTP, TCP, TLS, ... hooks
    from mitmproxy import hooks

    out: dict[str, object] = {}
    for name in hooks.all_hooks:
        funcs = [f for f in (getattr(a, name, None) for a in instances) if callable(f)]
        if funcs:
            out[name] = _forwarder(name, funcs)
    for a in instances:
        for attr in dir(a):
            f = getattr(a, attr, None)
            if not attr.startswith("__") and isinstance(getattr(f, "command_name", None), str):
                out[f"{type(a).__name__}_{attr}"] = f
    return out


def _forwarder(name: str, funcs: list):
    if any(inspect.iscoroutinefunction(f) for f in funcs):

        async def forward(*args) -> None:
            for f in funcs:
                res = f(*args)
                if res is not None and inspect.isawaitable(res):
                    await res

    else:

        def forward(*args) -> None:
            for f in funcs:
                f(*args)

    forward.__name__ = forward.__qualname__ = name
    return forward
