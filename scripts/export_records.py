"""Export full records as JSON Lines in the format of ../shared/datasets (for retraining).

    .venv/bin/python scripts/export_records.py [--uri URI | --dir data/records] [--out FILE] [--since 2026-01-01]

Only full records hold a request (refused flows, and passed ones sampled by
openflare_record_benign_one_in); brief records are counted and skipped. `label` is the operator's label
when there is one (label_source "operator"), else "attack" for a block verdict and "benign" otherwise.
Extra fields: verdict, score, local_score, llm_score, model_version, time, client_ip, label_source, meta.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from addons import records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", help="MongoDB URI (default: the OPENFLARE_MONGO_URI environment variable)")
    ap.add_argument("--dir", default="data/records", help="embedded store directory (without a URI)")
    ap.add_argument("--out", default="-", help="output file (default: standard output)")
    ap.add_argument("--since", help="only records at or after this UTC date/time (ISO 8601)")
    ap.add_argument("--split", default="train", choices=("train", "test"), help="the split field of every line")
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
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
    n = 0
    try:
        for rec in store.find(query):
            line = records.to_dataset(rec, split=args.split)
            if line is not None:
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
    print(f"export: {n} full records written to {args.out}; {brief} brief records (no request) skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
