"""Walk the records' hash chains and name the first broken link.

    .venv/bin/python scripts/verify_log.py [--uri URI | --dir data/records] [--days 30] [--spill FILE]

The store is OPENFLARE_MONGO_URI (or --uri) when set, else the embedded store in --dir. Records still
waiting in the spill file are walked with the stored ones. Each proxy run writes one chain; a chain may
start after seq 0 only where retention (--days, as openflare_record_days) removed its beginning.
Exit status: 0 intact, 1 broken, 2 the store could not be read.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

from addons import records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", help="MongoDB URI (default: the OPENFLARE_MONGO_URI environment variable)")
    ap.add_argument("--dir", default="data/records", help="embedded store directory (without a URI)")
    ap.add_argument("--days", type=int, default=30, help="retention in days (openflare_record_days; 0 = none)")
    ap.add_argument("--spill", default="data/records-spill.jsonl", help="spill file to include if it exists")
    args = ap.parse_args(argv)
    if args.days < 0:
        ap.error("--days must be >= 0")
    try:
        store = records.store_from_args(args.uri, args.dir)
    except (ValueError, OSError) as e:
        print(f"verify-log: cannot open the store: {e}", file=sys.stderr)
        return 2
    key = lambda r: (str(r.get("chain")), r.get("seq") if isinstance(r.get("seq"), int) else -1)  # noqa: E731
    spilled: list[dict] = []
    if args.spill and Path(args.spill).exists():
        try:
            for batch in records.SpillFile(args.spill).read(10000):
                spilled.extend(batch)
        except (OSError, ValueError) as e:
            store.close()
            print(f"verify-log: cannot read the spill file {args.spill}: {e}", file=sys.stderr)
            return 2
        spilled.sort(key=key)

    def merged():
        seen_last = None
        for rec in heapq.merge(store.find(), spilled, key=key):
            if rec.get("_id") == seen_last:  # spilled and already replayed
                continue
            seen_last = rec.get("_id")
            yield rec

    try:
        result = records.verify(merged(), days=args.days)
    except Exception as e:  # noqa: BLE001 - pymongo errors, unreadable store
        print(f"verify-log: cannot read the store {store.description}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    where = f"{store.description}" + (f" + {len(spilled)} spilled" if spilled else "")
    if result["broken"]:
        b = result["broken"]
        print(f"BROKEN ({where}): first broken link: chain {b['chain']} seq {b['seq']} id {b['id']}: {b['reason']}")
        return 1
    note = f"; {len(result['truncated'])} chains start after seq 0 (older records expired)" if result["truncated"] else ""
    print(f"OK ({where}): {result['records']} records in {result['chains']} chains, every link intact{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
