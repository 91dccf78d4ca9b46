"""Scorer: score every request 1-10 with the local model and refuse those above the threshold.

Reads `openflare.fields` (FeatureExtractor), scores each field on its own (`addons.fieldmodel`: the
request's score is its highest field's), and writes score, verdict, the deciding field and signal, model
version and scoring time to flow metadata and `flow.comment` (never `flow.marked`: that is the operator's),
for mitmweb. The refusal is the one fixed 403 from `addons.common`: it never carries the score or the reason.

The ensemble's LLM half (`addons.llm`): when an endpoint is configured, requests whose local score
falls in the uncertain band get a second opinion within a hard budget; `llm.combine` merges the two.
Requests outside the band never wait for it. A band request the LLM is not asked about because of a
quota or cap has its local score raised by `openflare_llm_quota_raise` (a spent quota is no opt-out).

The threshold is `openflare_threshold` when set, else the model card's (calibrated by `make retrain`).
A promoted or rolled-back model is picked up without a restart: the model's directory is watched (inotify
on Linux, costing nothing between changes; elsewhere a poll every `openflare_model_watch` seconds), a change
settles for `openflare_model_watch` seconds (or `openflare.reload` now), is loaded in a worker thread, and
swapped in (one attribute) only if the file's sha256 matches the card and it passes the probe check
(`model.probe_check`: the fixed probe set scored without raising, enough attack probes refused and
everyday ones passed, and no more than a slack of attack probes passed that the serving model refuses);
otherwise the serving model keeps serving and a warning says why. At startup the same check without a
serving model to compare with: a model that fails it stops startup.
"""

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from mitmproxy import command
from mitmproxy import exceptions
from mitmproxy import http
from mitmproxy.utils import asyncio_utils

from addons import common
from addons import fieldmodel
from addons import llm
from addons import model

logger = logging.getLogger(__name__)

FAIL_POLICIES = ("open", "closed")
# With inotify watching the model's directory, the model file and card are still checked this often (seconds).
WATCH_SAFETY_S = 300


def model_signature(path) -> tuple:
    """(mtime, size) of a model file and its card: changes when either is replaced."""
    out = []
    for p in (path, model.card_path(path)):
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def explain(flow: http.HTTPFlow, hit: fieldmodel.Hit, score: int) -> str:
    """Write what decided the local score to the flow's metadata; returns it in words for the comment."""
    md = flow.metadata
    md[common.FIELD] = [hit.field.loc, hit.field.name] if hit.field is not None else None
    md[common.SIGNAL] = fieldmodel.signal_of(hit)
    md[common.SIGNAL_CATEGORY] = fieldmodel.category_of(hit)
    md[common.EXPLANATION] = text = fieldmodel.explain(hit, score)
    return text


def refuse(flow: http.HTTPFlow) -> None:
    flow.response = common.refusal(method=flow.request.method)


class Scorer:
    def __init__(self) -> None:
        self.model: model.LocalModel | None = None
        self.threshold: int = 6
        self.pinned_threshold: int | None = None  # openflare_threshold; None: the model card's threshold
        self.watch_seconds: int = 1
        self.watch_task: asyncio.Task | None = None
        self.model_sig: tuple = ()
        self.probe: model.ProbeCheck | None = None  # the serving model's probe check
        self.probe_bounds: tuple[int, int, int] = (model.PROBE_MIN_REFUSED, model.PROBE_MIN_PASSED, model.PROBE_SLACK)
        self.fail_closed: bool = False
        self.detect_only: bool = False
        self.llm_config: llm.Config | None = None
        self.judge: llm.Judge | None = None
        self.started: bool = False
        # _decide_local's table: (score, llm status) -> _verdict's (metadata, comment head and tail, refuse?)
        self._local_table: dict[tuple[int, str], tuple[dict, str, str, bool]] = {}

    def load(self, loader) -> None:
        loader.add_option(
            "openflare_model",
            str,
            model.DEFAULT_MODEL,
            "The local model: a name in models/ or a path to a .npz file. Its model card "
            "(<name>.card.json) must hold the file's sha256, checked on the bytes loaded.",
        )
        loader.add_option(
            "openflare_threshold",
            Optional[int],
            None,
            "Requests scoring above this (1-10) are refused with 403. 6 refuses scores 7-10. Unset (null): the "
            "model card's threshold (calibrated by `make retrain` on your app's benign flows; 6 without one).",
        )
        loader.add_option(
            "openflare_model_watch",
            int,
            1,
            "Seconds a changed model file and card must stay unchanged before the new (promoted or rolled back) "
            "model is loaded without a restart, once its sha256 matches the card. On Linux the model's directory "
            "is watched with inotify (no work between changes); elsewhere the files are checked this often. "
            "0: only the openflare.reload command.",
        )
        loader.add_option(
            "openflare_model_probe_attacks",
            int,
            model.PROBE_MIN_REFUSED,
            "Least share (percent) of the fixed attack probes (addons/probes.py) a model must refuse, at its "
            "card's threshold, before it serves: at startup and before a hot swap. 0: not checked.",
        )
        loader.add_option(
            "openflare_model_probe_benign",
            int,
            model.PROBE_MIN_PASSED,
            "Least share (percent) of the fixed everyday probes a model must pass, at its card's threshold, "
            "before it serves. 0: not checked.",
        )
        loader.add_option(
            "openflare_model_probe_slack",
            int,
            model.PROBE_SLACK,
            "How many attack probes the serving model refuses a hot-swapped model may pass (a rollback to an "
            "older model may need more: raise it, or restart, which checks only the two shares).",
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
        for name, typ, default, help_ in llm.OPTIONS:
            loader.add_option(name, typ, default, help_)

    def configure(self, updated) -> None:
        from mitmproxy import ctx

        if "openflare_threshold" in updated:
            if ctx.options.openflare_threshold is not None and not 1 <= ctx.options.openflare_threshold <= 10:
                raise exceptions.OptionsError(
                    f"openflare_threshold must be between 1 and 10, not {ctx.options.openflare_threshold}"
                )
            self.pinned_threshold = ctx.options.openflare_threshold
            self._set_threshold()
            if self.started:
                self._log_threshold()
        if "openflare_model_watch" in updated:
            if not 0 <= ctx.options.openflare_model_watch <= 3600:
                raise exceptions.OptionsError("openflare_model_watch must be between 0 and 3600 seconds")
            self.watch_seconds = ctx.options.openflare_model_watch
            if self.started and self.watch_seconds and self.watch_task is None:
                self.watch_task = asyncio_utils.create_task(self._watch(), name="openflare-model-watch", keep_ref=True)
        if "openflare_fail" in updated:
            if ctx.options.openflare_fail not in FAIL_POLICIES:
                raise exceptions.OptionsError(f"openflare_fail must be one of {', '.join(FAIL_POLICIES)}")
            self.fail_closed = ctx.options.openflare_fail == "closed"
        if "openflare_detect_only" in updated:
            self.detect_only = ctx.options.openflare_detect_only
        probe_opts = ("openflare_model_probe_attacks", "openflare_model_probe_benign", "openflare_model_probe_slack")
        if any(k in updated for k in probe_opts):
            bounds = tuple(getattr(ctx.options, k) for k in probe_opts)
            if not (0 <= bounds[0] <= 100 and 0 <= bounds[1] <= 100 and 0 <= bounds[2] <= 100000):
                raise exceptions.OptionsError("openflare_model_probe_attacks and _benign must be 0-100 (percent), "
                                              "openflare_model_probe_slack 0-100000")  # fmt: skip
            self.probe_bounds = bounds
        if "openflare_model" in updated:
            try:
                new = model.load(ctx.options.openflare_model)
            except model.ModelError as e:
                raise exceptions.OptionsError(f"openflare_model: {e}") from e
            check = model.probe_check(new, *self.probe_bounds[:2])
            if not check.ok:
                raise exceptions.OptionsError(
                    f"openflare_model: model {llm.sanitise(new.version, 80)} from {new.path} refused by the probe check: "
                    f"{'; '.join(check.reasons)} ({check.summary()})"
                )
            self.model, self.probe = new, check
            self._set_threshold()
            self.model_sig = model_signature(self.model.path)
            logger.info("OpenFlare local model %s loaded from %s (probe check: %s)", new.version, new.path,
                        check.summary())  # fmt: skip
        if any(k.startswith("openflare_llm_") for k in updated):
            values = {name: getattr(ctx.options, name) for name, *_ in llm.OPTIONS}
            try:
                self.llm_config = llm.config_from_options(values, os.environ)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e
            if self.started:
                self._start_judge()

    def _log_threshold(self) -> None:
        source = "openflare_threshold" if self.pinned_threshold else "the model card's"
        logger.info("OpenFlare refuses scores above %d (%s threshold)", self.threshold, source)

    def running(self) -> None:
        self.started = True
        self._log_threshold()
        self._start_judge()
        if self.watch_seconds and self.watch_task is None:
            self.watch_task = asyncio_utils.create_task(self._watch(), name="openflare-model-watch", keep_ref=True)

    def done(self) -> None:
        self.started = False
        self._stop_judge()
        if self.watch_task is not None:
            self.watch_task.cancel()
            self.watch_task = None

    # ---- model reload (a promoted or rolled-back model, without a restart) ----

    def _set_threshold(self) -> None:
        self.threshold = self.pinned_threshold or (model.card_threshold(self.model.card) if self.model else 6)
        self._local_table = {}  # made for the old model and threshold

    def _load_checked(self, path: str, serving: model.LocalModel, check: model.ProbeCheck | None):
        """(new model, its probe check, the serving model's check) in a worker thread; raises ModelError."""
        if check is None:  # a model set without configure (tests): check it now, to compare with
            check = model.probe_check(serving, 0, 0)
        new = model.load(path)
        return new, model.probe_check(new, *self.probe_bounds[:2], serving=check, slack=self.probe_bounds[2]), check

    async def reload(self) -> bool:
        """Load the model file again in a worker thread; swap only if its sha256 matches its card and it
        passes the probe check against the serving model."""
        if self.model is None:
            return False
        old, path = self.model, self.model.path
        try:
            new, check, old_check = await asyncio.to_thread(self._load_checked, str(path), old, self.probe)
        except model.ModelError as e:
            logger.warning("OpenFlare kept model %s: the new one was not loaded: %s", old.version, e)
            return False
        if not check.ok:
            logger.warning("OpenFlare kept model %s: the new model %s failed the probe check: %s (%s)",
                           old.version, llm.sanitise(new.version, 80), "; ".join(check.reasons), check.summary())  # fmt: skip
            self.probe = old_check
            return False
        self.model, self.probe = new, check  # one attribute: requests in flight finish on the model they took
        self._set_threshold()
        logger.info("OpenFlare local model %s -> %s (threshold %d) from %s (probe check: %s)", old.version,
                    new.version, self.threshold, path, check.summary())  # fmt: skip
        return True

    async def _watch(self) -> None:
        """Follow the model file and card; reload once a change has settled (the same for one whole
        `openflare_model_watch` period). On Linux the model's directory is watched with inotify: nothing
        runs between changes (a stat every WATCH_SAFETY_S anyway, for file systems whose changes inotify
        does not see); elsewhere the files are polled every `openflare_model_watch` seconds."""
        pending = None
        loop = asyncio.get_running_loop()
        watch: model.DirWatch | None = None
        watched = None
        changed = asyncio.Event()

        def woken() -> None:
            watch.drain()
            changed.set()

        try:
            while True:
                if not self.watch_seconds:
                    self.watch_task = None  # off: configure starts a new task when it is set again
                    return
                if self.model is not None and pending is None:
                    directory = Path(self.model.path).parent
                    if directory != watched:
                        if watch is not None:
                            loop.remove_reader(watch.fd)
                            watch.close()
                        watch, watched = model.DirWatch.open(directory), directory
                        if watch is not None:
                            loop.add_reader(watch.fd, woken)
                        changed.set()  # a change before the watch began: one check now
                    if watch is not None:
                        try:
                            await asyncio.wait_for(changed.wait(), WATCH_SAFETY_S)
                        except TimeoutError:
                            pass
                        changed.clear()
                await asyncio.sleep(self.watch_seconds)
                if not self.watch_seconds or self.model is None:
                    continue
                sig = model_signature(self.model.path)
                if sig == self.model_sig:
                    pending = None
                elif sig != pending:
                    pending = sig  # changed: wait one more period, the card may follow the model file
                else:
                    pending = None
                    self.model_sig = sig
                    await self.reload()
        finally:
            if watch is not None:
                with contextlib.suppress(Exception):  # the loop may be closing
                    loop.remove_reader(watch.fd)
                watch.close()

    @command.command("openflare.reload")
    def reload_command(self) -> None:
        """Load the model file again now (verified against its card's sha256 before the swap)."""
        if self.model is None:
            raise exceptions.CommandError("no model loaded")
        self.model_sig = model_signature(self.model.path)
        asyncio_utils.create_task(self.reload(), name="openflare-model-reload", keep_ref=True)

    def _start_judge(self) -> None:
        if self.judge is not None and self.judge.config == self.llm_config:
            return
        self._stop_judge()
        if self.llm_config is not None:
            self.judge = llm.Judge(self.llm_config)
            cfg = self.llm_config
            logger.info("OpenFlare LLM second opinion: model %s at %s for local scores %d-%d, budget %d ms",
                        cfg.model, cfg.base_url or "OpenAI", cfg.band_low, cfg.band_high, cfg.budget_ms)  # fmt: skip

    def _stop_judge(self) -> None:
        judge, self.judge = self.judge, None
        if judge is not None:
            logger.info("OpenFlare LLM counters: %s", json.dumps(judge.stats.as_dict()))
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # no event loop (a synchronous harness): the client never opened a connection here
            asyncio_utils.create_task(judge.aclose(), name="openflare-llm-close", keep_ref=True)

    @command.command("openflare.llm.stats")
    def llm_stats(self) -> str:
        """The LLM counters (calls, cache hits, failures by kind, latency, tokens, cost) as JSON."""
        return json.dumps(self.judge.stats.as_dict() if self.judge else {"llm": "off"})

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        start = time.perf_counter()
        req = common.request_of(flow.metadata)
        try:
            if req is None:
                raise RuntimeError("no fields: load addons/features.py before addons/scorer.py")
            if self.model is None:
                raise RuntimeError("no model loaded")
            score, _, hit = self.model.score(req)
            explanation = explain(flow, hit, score)
        except Exception as e:  # noqa: BLE001 - any scoring failure goes to the fail policy
            logger.warning("OpenFlare could not score a request (%s); failing %s", e, "closed" if self.fail_closed else "open")
            self._decide(flow, None, time.perf_counter() - start, reason=f"error: {type(e).__name__}")
            return
        judge = self.judge
        if judge is None or not judge.config.in_band(score):  # most requests: the local score decides
            self._decide_local(flow, score, time.perf_counter() - start, llm.OFF if judge is None else llm.SKIPPED,
                               explanation)
            return
        try:
            text = fieldmodel.describe(req, hit, judge.config.max_chars)
            result = await judge.judge(text, flow.metadata.get(common.CLIENT_IP) or "")
        except Exception as e:  # noqa: BLE001 - the judge catches its own failures; this is a last resort
            logger.warning("OpenFlare LLM judge failed: %s", llm.sanitise(repr(e)))
            result = llm.Result(llm.ERROR)
        if flow.response or flow.error or not flow.live:
            return  # killed or answered by someone else while we waited
        self._decide(flow, score, time.perf_counter() - start, llm_result=result, cfg=judge.config,
                     explanation=explanation)

    def _decide_local(self, flow: http.HTTPFlow, score: int, elapsed: float, status: str, explanation: str) -> None:
        """`_decide` for a local score the LLM had no say in (status off or skipped): its verdict is made
        once per score, status, model and threshold (`_set_threshold` empties the table)."""
        verdict = self._local_table.get((score, status))
        if verdict is None:
            verdict = self._local_table[(score, status)] = self._verdict(score, "", llm.Result(status), None)
        self._apply(flow, elapsed, *verdict, explanation)

    def _decide(
        self, flow: http.HTTPFlow, local: int | None, elapsed: float, reason: str = "",
        llm_result: llm.Result | None = None, cfg: llm.Config | None = None, explanation: str = "",
    ) -> None:  # fmt: skip
        self._apply(flow, elapsed, *self._verdict(local, reason, llm_result or llm.Result(llm.SKIPPED), cfg), explanation)

    def _verdict(
        self, local: int | None, reason: str, res: llm.Result, cfg: llm.Config | None
    ) -> tuple[dict, str, str, str, bool]:
        """(metadata, the comment's verdict and score, the rest before the time, after it, refuse?) of one scoring."""
        v = res.verdict if cfg else None
        score = local if local is None or v is None else llm.combine(local, v.score, self.threshold, cfg.max_lower)
        if score is None:
            verdict = common.VERDICT_ERROR
            blocked = self.fail_closed
        elif cfg and res.status in llm.FAILED and cfg.fail != "local":
            blocked = cfg.fail == "closed"
            verdict = common.VERDICT_BLOCK if blocked else common.VERDICT_PASS
            reason = f"llm {res.status}, openflare_llm_fail {cfg.fail} (local score {local})"
        elif cfg and res.status in llm.QUOTA and cfg.quota_raise:
            # Not asked because of a quota or cap: the stricter rule, so a spent quota is no opt-out.
            score = min(10, local + cfg.quota_raise)
            blocked = score > self.threshold
            verdict = common.VERDICT_BLOCK if blocked else common.VERDICT_PASS
            reason = (f"llm {res.status}: local score {local} raised by {cfg.quota_raise} to {score} "
                      f"{'>' if blocked else '<='} threshold {self.threshold}")
        else:
            blocked = score > self.threshold
            verdict = common.VERDICT_BLOCK if blocked else common.VERDICT_PASS
            what = "local score" if v is None else f"ensemble score (local {local}, llm {v.score})"
            reason = reason or f"{what} {score} {'>' if blocked else '<='} threshold {self.threshold}"
        version = self.model.version if self.model else None
        llm_reason = llm.sanitise(v.reason) if v else None
        meta = {
            common.LOCAL_SCORE: local,
            common.SCORE: score,
            common.LLM_SCORE: v.score if v else None,
            common.LLM_CATEGORY: v.category if v else None,
            common.LLM_REASON: llm_reason,
            common.LLM_STATUS: res.status,
            common.LLM_MS: res.ms,
            common.CATEGORY: v.category if v and v.category != "benign" else None,
            common.VERDICT: verdict,
            common.MODEL_VERSION: version,
            common.SCORE_MS: None,  # the time, set by _apply
            common.REASON: reason,
        }
        shown = f"{score}/10" if score is not None else "unscored"
        # verdict and score first: mitmweb's comment column is 150 px, about 16 characters ("block 10/10 open...")
        lead = f"{verdict} {shown}"
        head = f"openflare ({reason}; model {version}; "
        tail = ""
        if res.status not in (llm.OFF, llm.SKIPPED):
            said = f" {v.score}/10 {v.category}: {llm_reason}" if v else ""
            tail = f" [llm {res.status}{said}; {res.ms} ms]"
        return meta, lead, head, tail, blocked

    def _apply(self, flow: http.HTTPFlow, elapsed: float, meta: dict, lead: str, head: str, tail: str, blocked: bool,
               explanation: str = "") -> None:
        """Write one verdict to the flow: metadata, comment, and the refusal unless detect-only."""
        ms = round(elapsed * 1000, 3)
        md = flow.metadata
        md.update(meta)
        md[common.SCORE_MS] = ms
        if blocked and md.get(common.CATEGORY) is None:
            md[common.CATEGORY] = md.get(common.SIGNAL_CATEGORY)
        if blocked and explanation:  # what decided a refusal right after its score, where mitmweb's column shows it
            flow.comment = f"{lead} {explanation} {head}{ms} ms){tail}"
        else:
            flow.comment = f"{lead} {head}{explanation + '; ' if explanation else ''}{ms} ms){tail}"
        if blocked:  # not marked: @marked is the operator's alone (openflare.label); ~comment finds refusals
            if self.detect_only:
                flow.comment += " [detect-only: forwarded]"
            else:
                refuse(flow)


addons = [Scorer()]
