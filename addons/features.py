"""FeatureExtractor: turn each request into one normalised feature string for the later addons.

Sets `openflare.client_ip` in `requestheaders` (so an IP ban can refuse before the body is read)
and `openflare.features` in `request`. The work itself is `addons.featurize`, shared with training.
"""

import logging
from collections.abc import Sequence

from mitmproxy import exceptions
from mitmproxy import http

from addons import common
from addons import featurize

logger = logging.getLogger(__name__)


def _wire_names(names) -> frozenset[bytes]:
    """The lower-case header names, as bytes, that featurize is given: the chosen ones plus the body's
    content-type and content-encoding."""
    return frozenset(n.encode("utf-8", "surrogateescape") for n in (*names, "content-type", "content-encoding"))


class FeatureExtractor:
    def __init__(self) -> None:
        self.header_names: tuple[str, ...] = featurize.DEFAULT_HEADERS
        self.header_bytes: frozenset[bytes] = _wire_names(featurize.DEFAULT_HEADERS)
        self.limit: int = featurize.MAX_CHARS
        self.trusted: tuple = ()

    def load(self, loader) -> None:
        loader.add_option(
            "openflare_headers",
            Sequence[str],
            list(featurize.DEFAULT_HEADERS),
            "Request headers whose values go into the feature string (case-insensitive). "
            "Cookies are split into name=value pairs.",
        )
        loader.add_option(
            "openflare_max_feature_bytes",
            int,
            featurize.MAX_CHARS,
            "Cap on the feature text of one request (characters). Longer input is cut before "
            "decoding, so a huge request costs no more than a capped one.",
        )
        loader.add_option(
            "openflare_trusted_proxies",
            Sequence[str],
            [],
            "IPs or CIDR ranges of proxies in front of OpenFlare. Only from these peers are "
            "X-Forwarded-For and Forwarded believed when finding the client IP.",
        )

    def configure(self, updated) -> None:
        from mitmproxy import ctx

        if "openflare_headers" in updated:
            self.header_names = tuple(h.strip().lower() for h in ctx.options.openflare_headers if h.strip())
            self.header_bytes = _wire_names(self.header_names)
        if "openflare_max_feature_bytes" in updated:
            if not 256 <= ctx.options.openflare_max_feature_bytes <= 1024 * 1024:
                raise exceptions.OptionsError("openflare_max_feature_bytes must be between 256 and 1048576")
            self.limit = ctx.options.openflare_max_feature_bytes
        if "openflare_trusted_proxies" in updated:
            try:
                self.trusted = featurize.parse_networks(ctx.options.openflare_trusted_proxies)
            except ValueError as e:
                raise exceptions.OptionsError(f"openflare_trusted_proxies: {e}") from e

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        headers = flow.request.headers.items(multi=True) if self.trusted else ()  # read only behind a trusted proxy
        flow.metadata[common.CLIENT_IP] = featurize.client_ip(peer, headers, self.trusted)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.request
        if common.CLIENT_IP not in flow.metadata:
            self.requestheaders(flow)
        # Only the headers featurize reads are decoded (mitmproxy's Headers decodes every field on each
        # access); a name that is not ASCII goes through, so featurize's own lower-casing decides.
        wanted = self.header_bytes
        headers = [
            (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for k, v in req.headers.fields
            if not k.isascii() or k.lower() in wanted
        ]
        body = req.raw_content or b""
        # Not get_content(): it inflates a compressed body without bound; decode_body stops at the cap.
        encoding = ", ".join(v for k, v in headers if k.lower() == "content-encoding") if body else ""
        if encoding:
            body = featurize.decode_body(body, encoding, self.limit)
        flow.metadata[common.FEATURES] = featurize.featurize(
            req.method,
            req.path,
            headers,
            body,
            header_names=self.header_names,
            limit=self.limit,
        )


addons = [FeatureExtractor()]
