"""Recorder: record every live flow once its verdict is known, off the request path.

A refused or malicious flow is recorded in full (request, scores, verdict); a passed one as time,
client IP, verdict and score only (privacy). `openflare_record_benign_one_in` records one in N passed
flows in full for retraining. The hooks only take a capture and put it on a bounded queue; a
background task builds, masks, hash-chains and inserts the records in batches in a worker thread
(pymongo blocks). The record shape, masking, hash chain, store, spill and replay are `addons.records`.

One recording process per embedded store and spill file: `running` takes their locks
(`records.acquire_locks`); held by another process, it logs an error naming that process's pid and
records nothing, and mitmproxy, seeing an error at startup, exits. It logs the store it writes to.
"""

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import Optional

from mitmproxy import exceptions
from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.utils import asyncio_utils

from addons import common
from addons import records

logger = logging.getLogger(__name__)

ENV_URI = "OPENFLARE_MONGO_URI"
ENV_INSTANCE = "OPENFLARE_INSTANCE"
MAINTAIN_EVERY_S = 1.0
# After the first record of a batch, wait this long for more: one thread hand-off and one transaction
# per batch instead of per request (measured: batches of one cost mitmdump ~1 ms of CPU per request).
LINGER_S = 0.25
# Options read once, when the writer starts (in `running`).
STARTUP_OPTIONS = ("openflare_mongo_uri", "openflare_record_dir", "openflare_record_spill", "openflare_record_queue", "openflare_instance")


def _is_refusal(resp: http.Response | None) -> bool:
    return common.is_refusal(resp)


class Recorder:
    def __init__(self) -> None:
        self.enabled: bool = True
        self.uri: str | None = None
        self.directory: str = "data/records"
        self.spill: str = "data/records-spill.jsonl"
        self.one_in: int = 0
        self.days: int = 30
        self.body_cap: int = 65536
        self.mask: tuple[str, ...] = ()
        self.queue_size: int = 10000
        self.batch: int = 500
        self.instance: str | None = None
        self.queue: asyncio.Queue | None = None
        self.writer: records.Writer | None = None
        self.task: asyncio.Task | None = None
        self.inflight: list[dict] = []
        self.benign_seen: int = 0
        self.started_at: float = 0.0
        self.locks: list = []  # records.acquire_locks: the store's and the spill file's, held while running

    def load(self, loader) -> None:
        loader.add_option("openflare_record", bool, True, "Record flows (MongoDB, or the embedded store without a URI).")
        loader.add_option(
            "openflare_mongo_uri",
            Optional[str],
            None,
            f"MongoDB URI for the records. Better set the {ENV_URI} environment variable (mitmweb shows options); "
            "without either, records go to the embedded store in openflare_record_dir.",
        )
        loader.add_option("openflare_record_dir", str, "data/records", "Directory of the embedded record store (used without a MongoDB URI).")
        loader.add_option(
            "openflare_record_benign_one_in",
            int,
            0,
            "Record one in N passed flows in full (for retraining) instead of IP, time, verdict and score only. "
            "0 never does. A privacy trade-off: those records keep the request (secrets masked).",
        )
        loader.add_option("openflare_record_days", int, 30, "Days records are kept (TTL index in MongoDB, hourly deletion in the embedded store). 0 keeps them forever.")
        loader.add_option("openflare_record_body_cap", int, 65536, "Bytes of a request body kept in a full record; longer bodies are cut (and marked so).")
        loader.add_option(
            "openflare_record_mask",
            Sequence[str],
            [],
            "More header names and form/query/JSON field names whose values are masked in records, on top of "
            "Authorization, Cookie, Set-Cookie and password-like fields.",
        )
        loader.add_option("openflare_record_queue", int, 10000, "Records waiting in memory for the writer; beyond this they go to the overflow file (never block).")
        loader.add_option("openflare_record_batch", int, 500, "Records per insert_many batch.")
        loader.add_option(
            "openflare_record_spill",
            str,
            "data/records-spill.jsonl",
            "Append-only file for records while the store is unreachable; replayed in order when it is back. "
            "Also names <file>.overflow (full queue) and <file>.rejected (refused by the store).",
        )
        loader.add_option(
            "openflare_instance",
            Optional[str],
            None,
            f"This proxy's name in records and in the hash chain (default: the {ENV_INSTANCE} environment variable, else hostname:pid).",
        )

    def configure(self, updated) -> None:
        from mitmproxy import ctx

        opts = ctx.options
        if "openflare_record" in updated:
            self.enabled = opts.openflare_record
        if "openflare_mongo_uri" in updated:
            uri = opts.openflare_mongo_uri or None
            if uri and not uri.startswith(("mongodb://", "mongodb+srv://")):
                raise exceptions.OptionsError("openflare_mongo_uri must start with mongodb:// or mongodb+srv://")
            self.uri = uri
        for name, attr, low, high in (
            ("openflare_record_benign_one_in", "one_in", 0, 1_000_000_000),
            ("openflare_record_days", "days", 0, 100 * 365),
            ("openflare_record_body_cap", "body_cap", 0, records.BODY_CAP_MAX),
            ("openflare_record_queue", "queue_size", 1, 10_000_000),
            ("openflare_record_batch", "batch", 1, 100_000),
        ):
            if name in updated:
                value = getattr(opts, name)
                if not low <= value <= high:
                    raise exceptions.OptionsError(f"{name} must be between {low} and {high}, not {value}")
                setattr(self, attr, value)
        if "openflare_record_dir" in updated:
            if not opts.openflare_record_dir.strip():
                raise exceptions.OptionsError("openflare_record_dir must not be empty")
            self.directory = opts.openflare_record_dir
        if "openflare_record_spill" in updated:
            if not opts.openflare_record_spill.strip():
                raise exceptions.OptionsError("openflare_record_spill must not be empty")
            self.spill = opts.openflare_record_spill
        if "openflare_record_mask" in updated:
            self.mask = tuple(m.strip() for m in opts.openflare_record_mask if m.strip())
        if "openflare_instance" in updated:
            self.instance = (opts.openflare_instance or "").strip() or None
        if self.writer is not None:
            self.writer.masker = records.Masker(self.mask)
            self.writer.batch = self.batch
            self.writer.days = self.days
            if any(k in updated for k in STARTUP_OPTIONS):
                logger.warning("OpenFlare recorder: store, spill, queue and instance options apply at the next start")

    def running(self) -> None:
        if not self.enabled or self.writer is not None:
            return
        env_uri = os.environ.get(ENV_URI) or None
        uri = self.uri or env_uri
        where = "openflare_mongo_uri" if self.uri else ENV_URI if uri else f"no MongoDB URI (openflare_mongo_uri, {ENV_URI})"
        # One recording process per embedded store and spill file: a second one would write the same
        # SQLite files and replay (and delete) the first one's spill. It does not start (see README).
        try:
            self.locks = records.acquire_locks(records.lock_paths(None if uri else self.directory, self.spill))
        except (records.StoreBusy, OSError) as e:
            logger.error(
                "OpenFlare recorder: %s. Two proxies must not share one record store and spill file: stop the other "
                "one, or give this one its own openflare_record_dir and openflare_record_spill (or openflare_record: "
                "false to run without recording). Not starting.", e,
            )
            return
        try:
            store = records.open_store(uri=uri, directory=None if uri else self.directory)
        except Exception as e:  # noqa: BLE001 - pymongo ConfigurationError, montydb errors, OSError
            records.release_locks(self.locks)
            self.locks = []
            logger.error("OpenFlare recorder cannot open its store (%s): %s: %s", where, type(e).__name__, e)
            return
        self.started_at = time.time()
        self.writer = records.Writer(
            store, self.spill, self.instance or os.environ.get(ENV_INSTANCE) or records.default_instance(), records.Masker(self.mask), self.batch, self.days
        )
        self.queue = asyncio.Queue(self.queue_size)
        self.task = asyncio_utils.create_task(self._run(), name="openflare recorder", keep_ref=True)
        logger.info("OpenFlare recorder writing to %s (%s); spill file %s; chain %s",
                    store.description, where, self.writer.spill.path.resolve(), self.writer.chain.id)

    async def _run(self) -> None:
        assert self.queue is not None and self.writer is not None
        queue, writer = self.queue, self.writer
        next_maintain = time.monotonic() + MAINTAIN_EVERY_S
        while True:
            # `inflight` is the batch from the moment it holds a record: `done` writes what is left in it.
            batch: list[dict] = []
            self.inflight = batch
            try:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), MAINTAIN_EVERY_S))
                except TimeoutError:
                    pass
                if batch and queue.qsize() < self.batch:
                    await asyncio.sleep(LINGER_S)
                while batch and len(batch) < self.batch and not queue.empty():
                    batch.append(queue.get_nowait())
                if batch:
                    await asyncio.to_thread(writer.write, batch)
                if time.monotonic() >= next_maintain:
                    next_maintain = time.monotonic() + MAINTAIN_EVERY_S
                    await asyncio.to_thread(writer.maintain)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the writer must outlive any one batch
                writer.stats["lost"] += len(batch)
                logger.error("OpenFlare recorder lost %d records: %s: %s", len(batch), type(e).__name__, e)
                batch.clear()

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def _record(self, flow: http.HTTPFlow) -> None:
        if not self.enabled or self.queue is None or self.writer is None:
            return
        killed = flow.error is not None and flow.error.msg == mflow.Error.KILLED_MESSAGE
        # Flows read from a file are not live; a flow killed now is not live either, but is new.
        if not flow.live and not (killed and flow.request.timestamp_start >= self.started_at):
            return
        if flow.metadata.get(common.RECORDED):
            return
        flow.metadata[common.RECORDED] = True
        try:
            capture = self._capture(flow, killed)
        except Exception as e:  # noqa: BLE001 - never break the flow for a record
            self.writer.stats["lost"] += 1
            logger.error("OpenFlare recorder lost a record: %s: %s", type(e).__name__, e)
            return
        try:
            self.queue.put_nowait(capture)
        except asyncio.QueueFull:
            self.writer.overflow(capture)

    def _capture(self, flow: http.HTTPFlow, killed: bool) -> dict:
        meta = flow.metadata
        req = flow.request
        verdict = meta.get(common.VERDICT)
        refused_by = None
        if meta.get(common.BANNED):
            refused_by = "ban"
        elif meta.get(common.RATE_LIMITED):
            refused_by = "rate-limit"
        elif meta.get(common.OVERSIZE):
            refused_by = "oversize"
        elif _is_refusal(flow.response) and verdict in (common.VERDICT_BLOCK, common.VERDICT_ERROR):
            refused_by = "score" if verdict == common.VERDICT_BLOCK else "fail-closed"
        elif killed:
            refused_by = "killed"
        if refused_by and verdict in (None, common.VERDICT_PASS):
            verdict = common.VERDICT_BLOCK
        client_ip = meta.get(common.CLIENT_IP) or (flow.client_conn.peername[0] if flow.client_conn.peername else None)
        capture = {
            "time": req.timestamp_start,
            "client_ip": client_ip,
            "verdict": verdict,
            "score": meta.get(common.SCORE),
            "full": verdict == common.VERDICT_BLOCK or refused_by is not None,
        }
        if not capture["full"] and self.one_in:
            self.benign_seen += 1
            if self.benign_seen % self.one_in == 0:
                capture["full"] = capture["sampled"] = True
        if capture["full"]:
            # An oversize request's body stays as sent: inflating it is what the limit refused.
            body = (req.raw_content if meta.get(common.OVERSIZE) else req.get_content(strict=False)) or b""
            capture.update(
                method=req.data.method,
                target=req.data.path,
                headers=req.headers.fields,
                body=body[: self.body_cap],
                body_size=len(body),
                local_score=meta.get(common.LOCAL_SCORE),
                llm_score=meta.get(common.LLM_SCORE),
                category=meta.get(common.CATEGORY) or meta.get(common.LLM_CATEGORY),
                model_version=meta.get(common.MODEL_VERSION),
                refused_by=refused_by,
                field=meta.get(common.FIELD),
                signal=meta.get(common.SIGNAL),
                explanation=meta.get(common.EXPLANATION),
                status=flow.response.status_code if flow.response else None,
                error=flow.error.msg if flow.error else None,
            )
        return capture

    def done(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        writer, queue = self.writer, self.queue
        if writer is None or queue is None:
            records.release_locks(self.locks)
            self.locks = []
            return
        self.writer = self.queue = None
        # Whatever the task took but did not hand to the thread, then what is still queued: written
        # here, synchronously (bounded: a store that does not answer sends it all to the spill file).
        with writer.lock:
            left = list(self.inflight)
            self.inflight.clear()
        while not queue.empty():
            left.append(queue.get_nowait())
        for i in range(0, len(left), self.batch):
            writer.write(left[i : i + self.batch])
        writer.close()
        records.release_locks(self.locks)
        self.locks = []
        s = writer.stats
        logger.info(
            "OpenFlare recorder: %d records this run: %d stored, %d spilled, %d replayed, %d overflowed, %d rejected, %d lost",
            s["records"], s["stored"], s["spilled"], s["replayed"], s["overflowed"], s["rejected"], s["lost"],
        )
        if s["lost"]:
            logger.error("OpenFlare recorder lost %d records this run", s["lost"])


addons = [Recorder()]
