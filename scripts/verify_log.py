"""Walk the records' hash chains and name the first broken link.

    .venv/bin/python scripts/verify_log.py [--uri URI | --dir data/records] [--days 30] [--spill FILE] [--allow-unkeyed]

The store is OPENFLARE_MONGO_URI (or --uri) when set, else the embedded store in --dir. Records still
waiting in the spill file (the journal and its segments, FILE.1, FILE.2, ...) are walked with the stored
ones; a line there that is not a whole record (a torn write) is reported and skipped. Each proxy run writes
one chain; a chain may start after seq 0 only where retention (--days, as openflare_record_days) removed its
beginning. Reported without breaking the walk: gaps (records a proxy lost to a full disk, noted in its own
chain) and labels written into records (labels live in the labels collection). With OPENFLARE_RECORD_KEY
set, keyed chains are checked with the key (HMAC) and a chain that is not keyed is broken, unless
--allow-unkeyed (chains written before the key was set).
Exit status: 0 intact, 1 broken (or a label in a record), 2 the store could not be read.
"""

from __future__ import annotations

import argparse
import sys

from addons import records
from addons.cli import verify_log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", help="MongoDB URI (default: the OPENFLARE_MONGO_URI environment variable)")
    ap.add_argument("--dir", default="data/records", help="embedded store directory (without a URI)")
    ap.add_argument("--days", type=int, default=30, help="retention in days (openflare_record_days; 0 = none)")
    ap.add_argument("--spill", default="data/records-spill.jsonl", help="spill file to include if it exists")
    ap.add_argument("--allow-unkeyed", action="store_true", help=f"with {records.ENV_KEY} set, accept chains that are not keyed")
    args = ap.parse_args(argv)
    if args.days < 0:
        ap.error("--days must be >= 0")
    return verify_log(args.uri, args.dir, args.days, args.spill, args.allow_unkeyed)


if __name__ == "__main__":
    sys.exit(main())
