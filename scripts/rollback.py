#!/usr/bin/env python3
"""Return the current model to its parent version (kept in models/history/ by `make retrain`).

    scripts/rollback.py [--model models/openflare-local.npz] [--list]

The parent's file is verified against its card's sha256 first; the current model is archived, then the
model file and its card are replaced atomically. Running proxies pick the change up by themselves
(openflare_model_watch) or with the `openflare.reload` command. Rolling back again goes one further back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from addons import model  # noqa: E402
from addons import retraining  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / (model.DEFAULT_MODEL + model.MODEL_SUFFIX)),
                    help="the current model (default models/openflare-local.npz)")
    ap.add_argument("--list", action="store_true", help="list the versions in the history and exit")
    args = ap.parse_args(argv)
    current = Path(args.model)
    try:
        if args.list:
            cur = model.read_card(current)
            print(f"current: {cur.get('version')} (parent {cur.get('parent_version') or '-'}); history in {retraining.history_dir(current)}:")
            for c in retraining.versions(current):
                mark = "*" if c.get("version") == cur.get("version") else " "
                print(f"{mark} {c.get('version')}  parent {c.get('parent_version') or '-'}  threshold {c.get('threshold', 6)}  {c.get('created', '')}")
            return 0
        before = model.read_card(current).get("version")
        card = retraining.rollback(current)
    except (model.ModelError, retraining.RetrainError, OSError) as e:
        print(f"rollback: {e}", file=sys.stderr)
        return 2
    print(f"rolled back {current}: {before} -> {card.get('version')} (threshold {card.get('threshold', 6)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
