"""Recorder: record every live flow once its verdict is known; a record is journaled before its response goes.

A refused or malicious flow is recorded in full (request, scores, verdict); a passed one as time,
client IP, verdict and score only (privacy). `openflare_record_benign_one_in` records one in N passed
flows in full for retraining. The hooks take a capture and wait (without blocking the event loop) until a
background task has built, masked, hash-chained and appended it to the journal in a worker thread, many
flows per write (group commit): a response is released only once its record is in the journal, so a
killed proxy (kill -9) loses no record whose response a client received. Another task inserts the
journaled records into the store in batches (pymongo blocks: worker thread) and empties the journal of
what the store took. The record shape, masking, hash chain, journal, store and replay are `addons.records`.

Acknowledged: a record is acknowledged when its response was released after its journal write
succeeded. A journal that cannot be written (a full disk) does not hold traffic up: after the write
fails, or ACK_WAIT_S, the response goes and the record is counted `unacknowledged` (held in memory and
journaled when it can be; what does not fit is lost, counted, and noted in the chain as a gap).

One recording process per embedded store and spill file: `running` takes their locks
(`records.acquire_locks`); held by another process, it logs an error naming that process's pid and
records nothing, and mitmproxy, seeing an error at startup, exits. It logs the store it writes to.
"""

import asyncio
import collections
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
# With nothing to retry, chain or deliver (`_settled`), maintenance (retention, leftovers) runs this rarely.
IDLE_MAINTAIN_S = 60.0
# After the first record of a batch, wait this long for more: one thread hand-off and one transaction
# per batch instead of per request (measured: batches of one cost mitmdump ~1 ms of CPU per request).
LINGER_S = 0.25
# A response waits at most this long for a journal write in a worker thread (a stalled disk must not stall
# traffic); until that write returns, later responses do not wait either.
ACK_WAIT_S = 2.0
# Without fsync, a batch of up to this many captures is journaled on the event loop itself (build, chain, one
# write(2) to the page cache), not in a worker thread: the thread hand-off per batch cost more CPU than the
# write (scripts/bench_recorder.py). Larger batches, fsync, and a journal lock held by the store side go to a thread.
ON_LOOP_MAX = 32
# Options read once, when the writer starts (in `running`).
STARTUP_OPTIONS = ("openflare_mongo_uri", "openflare_record_dir", "openflare_record_spill", "openflare_record_queue", "openflare_instance",
                   "openflare_record_fsync")


def _is_refusal(resp: http.Response | None) -> bool:
    return common.is_refusal(resp)


def _settled(writer: records.Writer) -> bool:
    """Nothing for maintenance to do but retention: every journaled record stored, none held (full disk), no
    gap to chain, no overflow file, the store not down, no earlier run's journal segment left."""
    return (
        writer.stored_seq >= writer.journaled_seq
        and not writer.held
        and writer.gap is None
        and not writer._down
        and writer._overflow_file is None
        and not writer.ready
        and not writer.leftovers
        and not writer.overflow_path.exists()
    )


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
        self.fsync: bool = False
        self.queue: collections.deque | None = None  # (capture, future or None) waiting for the journal
        self.stored_wake: asyncio.Event | None = None  # set when the journal took records
        self.kicked = False  # a `_journal_soon` callback is scheduled
        self.busy = False  # a batch is being journaled in a worker thread
        self.stalled = False  # that thread has not answered for ACK_WAIT_S: responses do not wait
        self.inflight_batch: list = []  # its (capture, future) pairs
        self.writer: records.Writer | None = None
        self.tasks: list[asyncio.Task] = []
        self.inflight: list[dict] = []  # the captures being journaled
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
            "openflare_record_fsync",
            bool,
            False,
            "fsync the record journal before releasing the responses of each batch: records then survive a power "
            "cut, not only a killed proxy (kill -9), at the cost of one fsync per batch.",
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
        if "openflare_record_fsync" in updated:
            self.fsync = opts.openflare_record_fsync
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
        key = records.env_key()
        if key and len(key) < records.KEY_MIN_BYTES:
            logger.warning("OpenFlare recorder: %s is shorter than %d bytes: a short key can be guessed", records.ENV_KEY, records.KEY_MIN_BYTES)
        self.started_at = time.time()
        try:
            self.writer = records.Writer(
                store, self.spill, self.instance or os.environ.get(ENV_INSTANCE) or records.default_instance(), records.Masker(self.mask),
                self.batch, self.days, key=key, fsync=self.fsync, hold=self.queue_size,
            )
        except OSError as e:
            store.close()
            records.release_locks(self.locks)
            self.locks = []
            logger.error("OpenFlare recorder cannot open its journal %s: %s", self.spill, e)
            return
        self.queue = collections.deque()
        self.stored_wake = asyncio.Event()
        self.kicked = self.busy = self.stalled = False
        self.tasks = [asyncio_utils.create_task(self._store_run(), name="openflare recorder store", keep_ref=True)]
        logger.info("OpenFlare recorder writing to %s (%s); spill file %s (the journal%s); chain %s%s",
                    store.description, where, self.writer.spill.path.resolve(), ", fsync per batch" if self.fsync else "", self.writer.chain.id,
                    f", keyed ({records.ENV_KEY}, key id {self.writer.chain.key_id})" if key else "")
        if self.writer.leftovers:
            logger.info("OpenFlare recorder: %d journal segment(s) left by an earlier run are replayed into the store",
                        len(self.writer.leftovers))

    def _kick(self) -> None:
        """Journal what is queued in a callback of this loop iteration (one per iteration: group commit)."""
        if not self.kicked and not self.busy:
            self.kicked = True
            asyncio.get_running_loop().call_soon(self._journal_soon)

    def _journal_soon(self) -> None:
        self.kicked = False
        writer, queue = self.writer, self.queue
        if writer is None or queue is None or self.busy or not queue:
            return
        batch = [queue.popleft() for _ in range(min(len(queue), self.batch))]
        self.inflight = [c for c, _ in batch]
        if not writer.file.fsync and len(batch) <= ON_LOOP_MAX:  # see ON_LOOP_MAX
            try:
                ok = writer.journal(self.inflight, wait=False)
            except Exception as e:  # noqa: BLE001 - the journal must outlive any one batch
                ok = self._failed(batch, e)
            if ok is not None:
                self._resolve(batch, ok)
                return
        self.busy = True
        self.tasks.append(asyncio_utils.create_task(self._journal_in_thread(batch), name="openflare recorder journal", keep_ref=True))

    async def _journal_in_thread(self, batch: list) -> None:
        assert self.writer is not None
        self.inflight_batch = batch
        timer = asyncio.get_running_loop().call_later(ACK_WAIT_S, self._stall)
        try:
            ok = await asyncio.to_thread(self.writer.journal, self.inflight)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            ok = self._failed(batch, e)
        finally:
            timer.cancel()
        self.inflight_batch = []
        self.stalled = self.busy = False
        self.tasks = [t for t in self.tasks if not t.done() and t is not asyncio.current_task()]
        self._resolve(batch, ok)

    def _failed(self, batch: list, e: Exception) -> bool:
        assert self.writer is not None
        self.writer.stats["lost"] += len(batch)
        logger.error("OpenFlare recorder lost %d records: %s: %s", len(batch), type(e).__name__, e)
        return False

    def _resolve(self, batch: list, ok: bool) -> None:
        """Release the batch's responses; wake the store side; go on with what queued meanwhile."""
        for _, fut in batch:
            if fut is not None and not fut.done():
                fut.set_result(ok)
        if self.stored_wake is not None:
            self.stored_wake.set()
        if self.queue:
            self._kick()

    def _stall(self) -> None:
        """The journal thread has not answered for ACK_WAIT_S (a stalled disk): release every waiting response."""
        self.stalled = True
        logger.warning("OpenFlare recorder: the journal %s has not answered for %.0f s; responses no longer wait for it",
                       self.spill, ACK_WAIT_S)
        for _, fut in list(self.inflight_batch) + list(self.queue or ()):
            if fut is not None and not fut.done():
                fut.set_result(False)

    async def _store_run(self) -> None:
        assert self.writer is not None and self.stored_wake is not None
        writer = self.writer
        next_maintain = time.monotonic()
        while True:
            try:
                try:
                    # Idle (everything journaled is stored, nothing held or overflowed, the store up): no
                    # maintenance every second, only every IDLE_MAINTAIN_S; a new record wakes this at once.
                    await asyncio.wait_for(self.stored_wake.wait(), IDLE_MAINTAIN_S if _settled(writer) else MAINTAIN_EVERY_S)
                    self.stored_wake.clear()
                    if len(writer.ready) < self.batch:
                        await asyncio.sleep(LINGER_S)  # one transaction for many records
                except TimeoutError:
                    pass
                if time.monotonic() >= next_maintain:
                    next_maintain = time.monotonic() + MAINTAIN_EVERY_S
                    await asyncio.to_thread(writer.maintain)
                else:
                    await asyncio.to_thread(writer.deliver)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the records stay in the journal and are tried again
                logger.error("OpenFlare recorder: storing failed (records stay in the journal): %s: %s", type(e).__name__, e)
                await asyncio.sleep(MAINTAIN_EVERY_S)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._record(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._record(flow)

    async def _record(self, flow: http.HTTPFlow) -> None:
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
        writer = self.writer
        if len(self.queue) >= self.queue_size:
            writer.overflow(capture)  # flushed at once: it survives a killed proxy too
            return
        if self.stalled:  # the journal is stuck: the record waits for it, the response does not
            self.queue.append((capture, None))
            writer.stats["unacknowledged"] += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((capture, fut))
        self._kick()
        if not await fut:
            writer.stats["unacknowledged"] += 1

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
        for task in self.tasks:
            task.cancel()
        self.tasks = []
        writer, queue = self.writer, self.queue
        if writer is None or queue is None:
            records.release_locks(self.locks)
            self.locks = []
            return
        self.writer = self.queue = None
        # What the journal task took but the thread did not write yet (`journal` empties the list it wrote),
        # then what is still queued: journaled and stored here, synchronously (bounded: a store that does
        # not answer leaves them in the journal, replayed at the next start).
        writer.journal(self.inflight)
        left = [c for c, _ in queue]
        queue.clear()
        for i in range(0, len(left), self.batch):
            writer.journal(left[i : i + self.batch])
        writer.close()
        records.release_locks(self.locks)
        self.locks = []
        s = writer.stats
        logger.info(
            "OpenFlare recorder: %d records this run: %d stored, %d spilled, %d replayed, %d overflowed, %d rejected, "
            "%d unacknowledged, %d torn lines set aside, %d lost",
            s["records"], s["stored"], s["spilled"], s["replayed"], s["overflowed"], s["rejected"], s["unacknowledged"], s["torn"], s["lost"],
        )
        if s["disk_full"]:
            logger.error("OpenFlare recorder: the disk was full %d times this run (the journal could not be written)", s["disk_full"])
        if s["lost"]:
            logger.error("OpenFlare recorder lost %d records this run", s["lost"])


addons = [Recorder()]
