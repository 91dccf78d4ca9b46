"""Walk the records' hash chains and name the first broken link.

    .venv/bin/python scripts/verify_log.py [--uri URI | --dir data/records] [--days 30] [--spill FILE]
    openflare verify-log                      (the same walk, with the proxies' settings: addons/cli.py)

The store is OPENFLARE_MONGO_URI (or --uri) when set, else the embedded store in --dir. Records still
waiting in the spill file are walked with the stored ones. Each proxy run writes one chain; a chain may
start after seq 0 only where retention (--days, as openflare_record_days) removed its beginning.
Exit status: 0 intact, 1 broken, 2 the store could not be read.
"""

from __future__ import annotations

import argparse
import sys

from addons import cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", help="MongoDB URI (default: the OPENFLARE_MONGO_URI environment variable)")
    ap.add_argument("--dir", default="data/records", help="embedded store directory (without a URI)")
    ap.add_argument("--days", type=int, default=30, help="retention in days (openflare_record_days; 0 = none)")
    ap.add_argument("--spill", default="data/records-spill.jsonl", help="spill file to include if it exists")
    args = ap.parse_args(argv)
    if args.days < 0:
        ap.error("--days must be >= 0")
    return cli.verify_log(args.uri, args.dir, args.days, args.spill)  # `openflare verify-log` runs the same


if __name__ == "__main__":
    sys.exit(main())
