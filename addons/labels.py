"""Labeler: `openflare.label FLOWS benign|attack [force]` stores an operator's label for retraining.

It acts on exactly the flows named, and a label that contradicts OpenFlare's verdict needs `force`:

* `@marked`: the flows the operator marked. OpenFlare marks no flow itself (refusals are found with
  `~comment "^openflare (block|banned|rate-limited|refused)"` or `~meta "openflare.verdict: block"`),
  so `@marked` holds only what was marked by hand.
* `@focus`: in mitmproxy's console, the flow under the cursor. In mitmweb the flow selected in the
  browser never reaches mitmproxy, whose focus stays on the first flow (mitmproxy issue #3213):
  there `@focus` is refused, with what to use instead.
* `@<flow id>[,<flow id>...]`, `@all`, `@shown`, a filter such as `~u /search`: exactly what mitmproxy's
  `view.flows.resolve` gives. A script may also pass flow objects.
* Labelling a refused flow benign, or a passed one attack (`records.label_conflict`, the rule the
  `openflare` CLI applies too), raises a CommandError unless the third argument is `force`; with it,
  the label is stored with `label_override: true` and logged as an override. One contradicting flow
  without `force` stops the whole command: nothing is labelled.

Passed flows are recorded as IP and time only (privacy), so the label must carry the request: each
labelled flow becomes a full record built and masked by `addons.records` (the recorder's own functions:
the same masking, the same format), with `label` ("benign" or "attack"), `label_source: "operator"`,
`label_override` and `label_time`, stored in the `labels` collection next to `records` (MongoDB, or the
embedded store). The records' hash chains stay untouched: labels are annotations outside them. The
document's `_id` is the flow id, so labelling a flow again replaces its label. The store is the
recorder's: it uses the recorder's options when addons/recorder.py is loaded, and the same defaults
otherwise. Writes run in a worker thread; the command returns at once and the flow's comment says it
was labelled.
"""

import asyncio
import logging
import os
import threading
import time

from mitmproxy import command
from mitmproxy import exceptions
from mitmproxy import hooks
from mitmproxy import http
from mitmproxy.utils import asyncio_utils

from addons import common
from addons import dataset
from addons import records

logger = logging.getLogger(__name__)

ENV_URI = "OPENFLARE_MONGO_URI"
COLLECTION = "labels"
FORCE = "force"
FOCUS_IN_MITMWEB = (
    "@focus in mitmweb is not the flow selected in the browser: the selection never reaches mitmproxy, whose "
    "focus stays on the first flow (mitmproxy issue #3213). Mark the flows you mean and use @marked, or name a "
    "flow by its id: openflare.label @<flow id> ... (the id is in the address bar, #/flows/<id>/request)"
)


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


def label_doc(f: http.HTTPFlow, label: str, masker: records.Masker, body_cap: int, now: float, override: bool = False) -> dict:
    doc = records.operator_label(records.build(capture(f, body_cap), masker), label, now, override)
    doc["_id"] = f.id
    return doc


def verdict_of(f: http.HTTPFlow) -> str | None:
    """The verdict a flow got, as its record says it: the scorer's, or `block` for a ban or rate limit."""
    verdict = f.metadata.get(common.VERDICT)
    if verdict in (None, common.VERDICT_PASS) and (f.metadata.get(common.BANNED) or f.metadata.get(common.RATE_LIMITED)):
        return common.VERDICT_BLOCK
    return verdict


def _in_mitmweb(master) -> bool:
    return type(master).__name__ == "WebMaster" and type(master).__module__.startswith("mitmproxy.tools.web")


def resolve(spec) -> list:
    """The flows `spec` names: a flow spec string through mitmproxy's view, or flow objects as given."""
    from mitmproxy import ctx

    if not isinstance(spec, str):
        return list(spec)
    spec = spec.strip()
    if spec == "@focus" and _in_mitmweb(ctx.master):
        raise exceptions.CommandError(FOCUS_IN_MITMWEB)
    if ctx.master.addons.get("view") is None:
        raise exceptions.CommandError(
            "this process keeps no flow list (mitmdump): label from mitmweb, or a recorded flow with the openflare CLI"
        )
    return list(ctx.master.commands.call("view.flows.resolve", spec))


def _what(f: http.HTTPFlow) -> str:
    """A flow for a message: its id and request line, escaped (attacker-controlled text) and cut."""
    line = f"{f.request.method} {f.request.path}"
    shown = ascii(line[:100] + ("..." if len(line) > 100 else ""))
    return f"flow {f.id[:8]} {shown}"


class Labeler:
    def __init__(self) -> None:
        self.store: records.Store | None = None
        self.tasks: set[asyncio.Task] = set()
        self.lock = threading.Lock()  # one write at a time: the embedded store is not thread-safe
        self.unwritten: dict[int, tuple] = {}  # labels not yet stored: written at exit by `done`
        self.stats = {"labelled": 0, "overrides": 0, "stored": 0, "failed": 0}

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
            logger.info("OpenFlare: %d operator label(s) stored in %s", len(docs), self.store.description if self.store else "the label store")
        except Exception as e:  # noqa: BLE001 - pymongo/montydb errors: say so, keep running
            self.stats["failed"] += len(docs)
            logger.warning("OpenFlare could not store %d operator label(s): %s: %s", len(docs), type(e).__name__, e)

    @command.command("openflare.label")
    def label(self, flows: str, label: str, force: str = "") -> None:
        """Label flows benign or attack for retraining: openflare.label @marked benign. A label against
        OpenFlare's verdict (a refused flow benign, a passed one attack) needs force as third argument."""
        if label not in dataset.LABELS:
            raise exceptions.CommandError(f"label must be one of {', '.join(dataset.LABELS)}, not {label!r}")
        if force not in ("", FORCE):
            raise exceptions.CommandError(f"the third argument can only be {FORCE!r}, not {force!r}")
        named = resolve(flows)
        todo = [f for f in named if isinstance(f, http.HTTPFlow)]
        if not todo:
            raise exceptions.CommandError(f"{flows if isinstance(flows, str) else 'the flows given'} names no HTTP flow to label")
        conflicts = {f.id: why for f in todo if (why := records.label_conflict(verdict_of(f), label))}
        if conflicts and not force:
            first = next(f for f in todo if f.id in conflicts)
            spec = flows if isinstance(flows, str) else "FLOWS"
            raise exceptions.CommandError(
                f"{len(conflicts)} of the {len(todo)} flows named contradict OpenFlare's verdict, e.g. {_what(first)}: "
                f"{conflicts[first.id]}. Nothing labelled. If that is what you mean (a false positive or a missed "
                f"attack), add force: openflare.label {spec} {label} force; otherwise name only the flows you mean"
            )
        uri, directory, masker, body_cap = self._options()
        now = time.time()
        docs = []
        for f in todo:
            override = f.id in conflicts
            docs.append(label_doc(f, label, masker, body_cap, now, override))
            f.metadata[common.LABEL] = label
            f.comment = (f.comment + " " if f.comment else "") + (f"[labelled {label}, override]" if override else f"[labelled {label}]")
            if override:
                logger.warning("OpenFlare operator label override: %s labelled %s (%s)", _what(f), label, conflicts[f.id])
        self.stats["labelled"] += len(docs)
        self.stats["overrides"] += len(conflicts)
        for d in docs:
            self.unwritten[id(d)] = (d, uri, directory)
        task = asyncio_utils.create_task(self._run(docs, uri, directory), name="openflare-label", keep_ref=True)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        from mitmproxy import ctx

        ctx.master.addons.trigger(hooks.UpdateHook(todo))

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
