"""Export full records as JSON Lines in the format of ../shared/datasets (for retraining).

    .venv/bin/python scripts/export_records.py [--uri URI | --dir data/records] [--out FILE] [--since 2026-01-01]

Only full records hold a request (refused flows, and passed ones sampled by
openflare_record_benign_one_in); brief records are counted and skipped. Operator labels (the `labels`
collection written by `openflare.label`, full masked records) come first, with label_source "operator";
a record of the same request (method, target, body) is then left out: the operator's label wins, as in
`make retrain`. Other records are labelled "attack" for a block verdict and "benign" otherwise.
`--no-labels` exports the `records` collection alone.
Extra fields: verdict, score, local_score, llm_score, model_version, time, client_ip, label_source, meta.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys

from addons import records
from addons import retraining


def request_key(line: dict) -> bytes:
    """The request of one exported line (method, target, body): how a label finds its flow's record."""
    return hashlib.sha256(json.dumps([line["method"], line["target"], line["body"]]).encode()).digest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", help="MongoDB URI (default: the OPENFLARE_MONGO_URI environment variable)")
    ap.add_argument("--dir", default="data/records", help="embedded store directory (without a URI)")
    ap.add_argument("--out", default="-", help="output file (default: standard output)")
    ap.add_argument("--since", help="only records at or after this UTC date/time (ISO 8601)")
    ap.add_argument("--split", default="train", choices=("train", "test"), help="the split field of every line")
    ap.add_argument("--no-labels", action="store_true", help="leave out the operator labels (the `labels` collection)")
    args = ap.parse_args(argv)
    query: dict = {"tier": records.TIER_FULL}
    if args.since:
        try:
            since = datetime.datetime.fromisoformat(args.since)
        except ValueError:
            ap.error(f"--since: not an ISO date/time: {args.since!r}")
        if since.tzinfo is not None:
            since = since.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        query["time"] = {"$gte": since}
    try:
        store = records.store_from_args(args.uri, args.dir)
    except (ValueError, OSError) as e:
        print(f"export: cannot open the store: {e}", file=sys.stderr)
        return 2
    try:
        out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
    except OSError as e:
        store.close()
        print(f"export: cannot write --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"export: reading {store.description}", file=sys.stderr)
    n = n_labels = n_labelled = 0
    labelled: set[bytes] = set()  # requests an operator labelled: one 32-byte key per label
    try:
        if not args.no_labels:
            for rec in retraining.labels_store(store).find(query):
                line = records.to_dataset(rec, split=args.split)
                if line is not None:
                    out.write(json.dumps(line, ensure_ascii=False) + "\n")
                    labelled.add(request_key(line))
                    n_labels += 1
        for rec in store.find(query):
            line = records.to_dataset(rec, split=args.split)
            if line is None:
                continue
            if labelled and request_key(line) in labelled:
                n_labelled += 1
                continue
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
        brief = store.coll.count_documents({"tier": records.TIER_BRIEF})
    except Exception as e:  # noqa: BLE001 - pymongo errors, unreadable store
        print(f"export: cannot read {store.description}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()
        store.close()
    if not args.no_labels:
        print(f"export: {n_labels} operator labels written; {n_labelled} records of labelled requests left out "
              "(the label wins)", file=sys.stderr)
    print(f"export: {n} full records written to {args.out}; {brief} brief records (no request) skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
