"""Scorer: score every request 1-10 with the local model and refuse those above the threshold.

Reads `openflare.features` (FeatureExtractor) and writes score, verdict, model version and scoring
time to flow metadata, `flow.comment` and `flow.marked`, so mitmweb shows them. The refusal is the
one fixed 403 from `addons.common`: it never carries the score or the reason.
"""

import logging
import time

from mitmproxy import exceptions
from mitmproxy import http

from addons import common
from addons import model

logger = logging.getLogger(__name__)

FAIL_POLICIES = ("open", "closed")


def refuse(flow: http.HTTPFlow) -> None:
    flow.response = http.Response.make(common.BLOCK_STATUS, common.BLOCK_BODY, common.BLOCK_HEADERS)


class Scorer:
    def __init__(self) -> None:
        self.model: model.LocalModel | None = None
        self.threshold: int = 6
        self.fail_closed: bool = False
        self.detect_only: bool = False

    def load(self, loader) -> None:
        loader.add_option(
            "openflare_model",
            str,
            model.DEFAULT_MODEL,
            "The local model: a name in models/ or a path to a .joblib file. Its model card "
            "(<name>.card.json) must hold the file's sha256, checked before loading.",
        )
        loader.add_option(
            "openflare_threshold",
            int,
            6,
            "Requests scoring above this (1-10) are refused with 403. 6 refuses scores 7-10.",
        )
        loader.add_option(
            "openflare_fail",
            str,
            "open",
            "What happens when a request cannot be scored: 'open' forwards it, 'closed' refuses it.",
            choices=FAIL_POLICIES,
        )
        loader.add_option(
            "openflare_detect_only",
            bool,
            False,
            "Score and mark flows but never refuse (detection-only mode, for trying OpenFlare on live traffic).",
        )

    def configure(self, updated) -> None:
        from mitmproxy import ctx

        if "openflare_threshold" in updated:
            if not 1 <= ctx.options.openflare_threshold <= 10:
                raise exceptions.OptionsError(
                    f"openflare_threshold must be between 1 and 10, not {ctx.options.openflare_threshold}"
                )
            self.threshold = ctx.options.openflare_threshold
        if "openflare_fail" in updated:
            if ctx.options.openflare_fail not in FAIL_POLICIES:
                raise exceptions.OptionsError(f"openflare_fail must be one of {', '.join(FAIL_POLICIES)}")
            self.fail_closed = ctx.options.openflare_fail == "closed"
        if "openflare_detect_only" in updated:
            self.detect_only = ctx.options.openflare_detect_only
        if "openflare_model" in updated:
            try:
                self.model = model.load(ctx.options.openflare_model)
            except model.ModelError as e:
                raise exceptions.OptionsError(f"openflare_model: {e}") from e
            logger.info("OpenFlare local model %s loaded from %s", self.model.version, self.model.path)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        start = time.perf_counter()
        features = flow.metadata.get(common.FEATURES)
        try:
            if features is None:
                raise RuntimeError("no feature string: load addons/features.py before addons/scorer.py")
            if self.model is None:
                raise RuntimeError("no model loaded")
            score, _ = self.model.score(features)
        except Exception as e:  # noqa: BLE001 - any scoring failure goes to the fail policy
            logger.warning("OpenFlare could not score a request (%s); failing %s", e, "closed" if self.fail_closed else "open")
            self._decide(flow, None, time.perf_counter() - start, reason=f"error: {type(e).__name__}")
            return
        self._decide(flow, score, time.perf_counter() - start)

    def _decide(self, flow: http.HTTPFlow, score: int | None, elapsed: float, reason: str = "") -> None:
        ms = round(elapsed * 1000, 3)
        if score is None:
            verdict = common.VERDICT_ERROR
            blocked = self.fail_closed
        else:
            blocked = score > self.threshold
            verdict = common.VERDICT_BLOCK if blocked else common.VERDICT_PASS
            reason = reason or f"local score {score} {'>' if blocked else '<='} threshold {self.threshold}"
        version = self.model.version if self.model else None
        flow.metadata[common.LOCAL_SCORE] = score
        flow.metadata[common.SCORE] = score
        flow.metadata[common.VERDICT] = verdict
        flow.metadata[common.MODEL_VERSION] = version
        flow.metadata[common.SCORE_MS] = ms
        flow.metadata[common.REASON] = reason
        shown = f"{score}/10" if score is not None else "unscored"
        flow.comment = f"openflare {verdict} {shown} ({reason}; model {version}; {ms} ms)"
        if blocked:
            flow.marked = common.BLOCK_MARKER
            if self.detect_only:
                flow.comment += " [detect-only: forwarded]"
            else:
                refuse(flow)
        logger.debug("openflare %s score=%s ip=%s %.3f ms", verdict, score, flow.metadata.get(common.CLIENT_IP), ms)


addons = [Scorer()]
