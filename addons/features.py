"""FeatureExtractor: turn each request into its fields for the later addons.

Sets `openflare.client_ip` in `requestheaders` (so an IP ban can refuse before the body is read) and, in
`request`, `openflare.fields` and `openflare.signals`: every part of the request, each with its location
and name (`addons.fields.extract`, shared with training and evaluation).

Nothing goes uninspected: a request beyond the inspection limits (`openflare_inspect_*`) is refused here
with 413 (body, fields, nesting, a decompression bomb) or 431 (headers), and so is a body mitmproxy was
told to stream (it cannot be read before it is forwarded).
"""

import logging
from collections.abc import Sequence

from mitmproxy import exceptions
from mitmproxy import http

from addons import clientip
from addons import common
from addons import fields

logger = logging.getLogger(__name__)

_DEFAULT = fields.Limits()
CLIENT_IP_HEADERS = ("auto", "forwarded", "x-forwarded-for", "x-real-ip")
# (option, Limits field, default, lowest, help)
LIMIT_OPTIONS = (
    ("openflare_inspect_body_bytes", "body_bytes", _DEFAULT.body_bytes, 1024,
     "Largest request body inspected, raw and after each Content-Encoding (bytes). A larger one is refused "
     "with 413: never forwarded uninspected."),
    ("openflare_inspect_fields", "fields", _DEFAULT.fields, 64,
     "Most fields (parameters, headers, JSON values, ...) inspected in one request; more: 413."),
    ("openflare_inspect_depth", "depth", _DEFAULT.depth, 4,
     "Deepest JSON/XML nesting inspected; deeper: 413."),
    ("openflare_inspect_header_bytes", "header_bytes", _DEFAULT.header_bytes, 1024,
     "Largest total of header names and values inspected (bytes); more: 431."),
)


class FeatureExtractor:
    def __init__(self) -> None:
        self.limits = fields.Limits()
        self.trusted: tuple = ()
        self.ip_header = "auto"

    def load(self, loader) -> None:
        for name, _attr, default, _low, help_ in LIMIT_OPTIONS:
            loader.add_option(name, int, default, help_)
        loader.add_option(
            "openflare_trusted_proxies",
            Sequence[str],
            [],
            "IPs or CIDR ranges of proxies in front of OpenFlare. Only from these peers are "
            "Forwarded, X-Forwarded-For and X-Real-IP believed when finding the client IP.",
        )
        loader.add_option(
            "openflare_client_ip_header",
            str,
            "auto",
            "Which header a trusted proxy writes: auto (Forwarded if present, else X-Forwarded-For, else "
            "X-Real-IP), or that one alone. Name yours if it passes a client's own Forwarded through.",
            choices=CLIENT_IP_HEADERS,
        )

    def configure(self, updated) -> None:
        from mitmproxy import ctx

        if any(name in updated for name, *_ in LIMIT_OPTIONS):
            values = {}
            for name, attr, _default, low, _help in LIMIT_OPTIONS:
                v = getattr(ctx.options, name)
                if v < low:
                    raise exceptions.OptionsError(f"{name} must be at least {low}, not {v}")
                values[attr] = v
            self.limits = fields.Limits(**values)
        if "openflare_trusted_proxies" in updated:
            try:
                self.trusted = clientip.parse_networks(ctx.options.openflare_trusted_proxies)
            except ValueError as e:
                raise exceptions.OptionsError(f"openflare_trusted_proxies: {e}") from e
        if "openflare_client_ip_header" in updated:
            if ctx.options.openflare_client_ip_header not in CLIENT_IP_HEADERS:
                raise exceptions.OptionsError(f"openflare_client_ip_header must be one of {', '.join(CLIENT_IP_HEADERS)}")
            self.ip_header = ctx.options.openflare_client_ip_header

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        headers = flow.request.headers.items(multi=True) if self.trusted else ()  # read only behind a trusted proxy
        flow.metadata[common.CLIENT_IP] = clientip.client_ip(peer, headers, self.trusted, self.ip_header)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.request
        if common.CLIENT_IP not in flow.metadata:
            self.requestheaders(flow)
        if req.stream:
            self._oversize(flow, fields.TooLarge(413, "body (streamed)"))
            return
        headers = [(k.decode("utf-8", fields.LOSSLESS), v.decode("utf-8", fields.LOSSLESS)) for k, v in req.headers.fields]
        # raw_content, not get_content(): that inflates a compressed body without bound; extract undoes
        # Content-Encodings with a bounded output.
        try:
            got = fields.extract(req.method, req.path, headers, req.raw_content or b"", self.limits)
        except fields.TooLarge as e:
            self._oversize(flow, e)
            return
        flow.metadata[common.FIELDS] = [[f.loc, f.name, f.value, f.via] for f in got.fields]
        flow.metadata[common.SIGNALS] = got.signals

    def _oversize(self, flow: http.HTTPFlow, e: fields.TooLarge) -> None:
        """Refuse a request that cannot be inspected whole: 413/431, not the 403 of an attack."""
        flow.metadata[common.OVERSIZE] = e.what
        flow.metadata[common.VERDICT] = common.VERDICT_BLOCK
        flow.metadata[common.REASON] = f"oversize: {e}"
        flow.comment = f"block {e.status} openflare (oversize: {e})"
        flow.response = common.refusal(e.status, common.OVERSIZE_BODY[e.status], method=flow.request.method)


addons = [FeatureExtractor()]
