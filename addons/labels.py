"""Labeler: `openflare.label <flows> benign|attack` stores an operator's label for retraining.

In mitmweb: select or mark flows, then run `openflare.label @focus benign` (or `@marked attack`) in the
command bar; in mitmdump, through any command interface (e.g. a script calling the command). Passed
flows are recorded as IP and time only (privacy), so the label must carry the request: each labelled
flow becomes a full record built and masked by `addons.records` (the recorder's own functions: the
same masking, the same format), with `label` ("benign" or "attack"), `label_source: "operator"` and
`label_time`, stored in the `labels` collection next to `records` (MongoDB, or the embedded store).
The records' hash chains stay untouched: labels are annotations outside them. The document's `_id` is
the flow id, so labelling a flow again replaces its label. The store is the recorder's: it uses the
recorder's options when addons/recorder.py is loaded, and the same defaults otherwise. Writes run in a
worker thread; the command returns at once and the flow's comment says it was labelled.
"""

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence

from mitmproxy import command
from mitmproxy import exceptions
from mitmproxy import flow
from mitmproxy import hooks
from mitmproxy import http
from mitmproxy.utils import asyncio_utils

from addons import common
from addons import dataset
from addons import records

logger = logging.getLogger(__name__)

ENV_URI = "OPENFLARE_MONGO_URI"
COLLECTION = "labels"


def capture(f: http.HTTPFlow, body_cap: int) -> dict:
    """The recorder's capture shape (addons.records.build) for one flow, always full."""
    req = f.request
    meta = f.metadata
    body = req.get_content(strict=False) or b""
    return {
        "time": req.timestamp_start,
        "client_ip": meta.get(common.CLIENT_IP) or (f.client_conn.peername[0] if f.client_conn.peername else None),
        "verdict": meta.get(common.VERDICT),
        "score": meta.get(common.SCORE),
        "full": True,
        "method": req.data.method,
        "target": req.data.path,
        "headers": req.headers.fields,
        "body": body[:body_cap],
        "body_size": len(body),
        "local_score": meta.get(common.LOCAL_SCORE),
        "llm_score": meta.get(common.LLM_SCORE),
        "category": meta.get(common.CATEGORY) or meta.get(common.LLM_CATEGORY),
        "model_version": meta.get(common.MODEL_VERSION),
        "status": f.response.status_code if f.response else None,
    }


def label_doc(f: http.HTTPFlow, label: str, masker: records.Masker, body_cap: int, now: float) -> dict:
    doc = records.build(capture(f, body_cap), masker)
    doc["_id"] = f.id
    doc["label"] = label
    doc["label_source"] = "operator"
    doc["label_time"] = records.to_time(now)
    return doc


class Labeler:
    def __init__(self) -> None:
        self.store: records.Store | None = None
        self.tasks: set[asyncio.Task] = set()
        self.lock = threading.Lock()  # one write at a time: the embedded store is not thread-safe
        self.unwritten: dict[int, tuple] = {}  # labels not yet stored: written at exit by `done`
        self.stats = {"labelled": 0, "stored": 0, "failed": 0}

    def load(self, loader) -> None:
        loader.add_option(
            "openflare_label_body_cap",
            int,
            65536,
            "Bytes of a request body kept with an operator label (the request is stored so it can be learnt).",
        )

    def configure(self, updated) -> None:
        from mitmproxy import ctx

        if "openflare_label_body_cap" in updated and not 0 <= ctx.options.openflare_label_body_cap <= records.BODY_CAP_MAX:
            raise exceptions.OptionsError(f"openflare_label_body_cap must be between 0 and {records.BODY_CAP_MAX}")
        if any(k in updated for k in ("openflare_mongo_uri", "openflare_record_dir")) and self.store is not None:
            self._close()

    def _options(self):
        from mitmproxy import ctx

        opts = ctx.options
        uri = (opts.openflare_mongo_uri if "openflare_mongo_uri" in opts else None) or os.environ.get(ENV_URI) or None
        directory = opts.openflare_record_dir if "openflare_record_dir" in opts else "data/records"
        mask = opts.openflare_record_mask if "openflare_record_mask" in opts else []
        return uri, directory, records.Masker(mask), opts.openflare_label_body_cap

    def _labels(self, uri: str | None, directory: str) -> records.Store:
        if self.store is None:
            base = records.open_store(uri=uri, directory=None if uri else directory)
            self.store = records.Store(base.coll.database[COLLECTION], base.kind, base.client, base.description + " (labels)")
        return self.store

    def _write(self, docs: list[dict], uri: str | None, directory: str) -> None:
        with self.lock:
            docs = [d for d in docs if id(d) in self.unwritten]
            if not docs:
                return
            store = self._labels(uri, directory)
            for doc in docs:  # one upsert per flow: labelling again replaces the label
                store.coll.replace_one({"_id": doc["_id"]}, doc, upsert=True)
                self.unwritten.pop(id(doc), None)

    async def _run(self, docs: list[dict], uri: str | None, directory: str) -> None:
        try:
            await asyncio.to_thread(self._write, docs, uri, directory)
            self.stats["stored"] += len(docs)
            logger.info("OpenFlare: %d operator label(s) stored", len(docs))
        except Exception as e:  # noqa: BLE001 - pymongo/montydb errors: say so, keep running
            self.stats["failed"] += len(docs)
            logger.warning("OpenFlare could not store %d operator label(s): %s: %s", len(docs), type(e).__name__, e)

    @command.command("openflare.label")
    def label(self, flows: Sequence[flow.Flow], label: str) -> None:
        """Label flows benign or attack for retraining (e.g. openflare.label @focus benign)."""
        if label not in dataset.LABELS:
            raise exceptions.CommandError(f"label must be one of {', '.join(dataset.LABELS)}, not {label!r}")
        uri, directory, masker, body_cap = self._options()
        now = time.time()
        docs = []
        for f in flows:
            if not isinstance(f, http.HTTPFlow):
                continue
            docs.append(label_doc(f, label, masker, body_cap, now))
            f.metadata[common.LABEL] = label
            f.comment = (f.comment + " " if f.comment else "") + f"[labelled {label}]"
        if not docs:
            raise exceptions.CommandError("no HTTP flow to label")
        self.stats["labelled"] += len(docs)
        for d in docs:
            self.unwritten[id(d)] = (d, uri, directory)
        task = asyncio_utils.create_task(self._run(docs, uri, directory), name="openflare-label", keep_ref=True)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        from mitmproxy import ctx

        ctx.master.addons.trigger(hooks.UpdateHook(list(flows)))

    async def flush(self) -> None:
        """Wait for pending label writes (tests, shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks))

    def _close(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            store.close()

    def done(self) -> None:
        left = list(self.unwritten.values())
        if left:
            docs, uri, directory = [d for d, *_ in left], left[0][1], left[0][2]
            try:
                self._write(docs, uri, directory)
                self.stats["stored"] += len(docs)
            except Exception as e:  # noqa: BLE001 - at exit: say so
                logger.warning("OpenFlare could not store %d operator label(s) at exit: %s", len(docs), e)
        self._close()


addons = [Labeler()]
