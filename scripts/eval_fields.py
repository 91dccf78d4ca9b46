"""Measure a field model on the test splits: per source, and attack payloads placed in real requests.

    python scripts/eval_fields.py MODEL.npz [--op P] [--data DIR] [--payloads FILE]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from addons import dataset, fieldmodel  # noqa: E402
from addons import fields as fieldsmod  # noqa: E402

PLACEMENTS = ("query", "form", "json", "multipart", "header", "cookie", "path")


def placed(payload: str, carrier: dataset.Record, where: str, rng: random.Random):
    """(method, target, headers, body) of a benign real-world request carrying the payload at `where`."""
    target, headers = carrier.target, [h for h in carrier.headers if h[0].lower() not in ("content-type", "content-length")]
    sep = "&" if "?" in target else "?"
    if where == "query":
        return "GET", f"{target}{sep}q={quote(payload, safe='')}", headers, b""
    if where == "form":
        return "POST", target, headers + [("Content-Type", "application/x-www-form-urlencoded")], \
            f"name=alice&comment={quote(payload, safe='')}".encode()
    if where == "json":
        return "POST", target, headers + [("Content-Type", "application/json")], \
            json.dumps({"user": {"name": "alice", "note": payload}}).encode()
    if where == "multipart":
        b = "----formdata7MA4YWxkTrZu0gW"
        body = (f"--{b}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n--{b}\r\n"
                f"Content-Disposition: form-data; name=\"comment\"\r\n\r\n{payload}\r\n--{b}--\r\n").encode()
        return "POST", target, headers + [("Content-Type", f"multipart/form-data; boundary={b}")], body
    if where == "header":
        value = payload.replace("\r", " ").replace("\n", " ")
        return "GET", target, headers + [("X-Api-Version", value)], b""
    if where == "cookie":
        value = payload.replace(";", "%3B").replace("\r", " ").replace("\n", " ")
        return "GET", target, headers + [("Cookie", f"theme=dark; pref={value}")], b""
    if where == "path":
        path, q, query = target.partition("?")
        return "GET", path.rstrip("/") + "/" + quote(payload, safe="") + q + query, headers, b""
    raise ValueError(where)


def probability(m: fieldmodel.FieldModel, method, target, headers, body) -> float:
    try:
        return m.score(fieldsmod.extract(method, target, headers, body)).p
    except fieldsmod.TooLarge:
        return 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--op", type=float, default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--payloads", type=Path, default=ROOT.parent / "shared" / "payloads" / "attack-payloads.jsonl.gz")
    ap.add_argument("--per-placement", type=int, default=6832)
    args = ap.parse_args(argv)
    m = fieldmodel.FieldModel.load(args.model)
    op = args.op if args.op is not None else float(args.model.with_suffix(".op").read_text())
    thresholds = sorted({op, 0.5, 0.8, 0.9, 0.95})
    records = dataset.load(dataset.parse_data_arg(args.data))
    test = [r for r in records if r.split == "test"]
    groups: dict[str, tuple[list, list]] = {}
    for r in test:
        key = "realworld" if r.group else r.source
        ps, ys = groups.setdefault(key, ([], []))
        ps.append(probability(m, r.method, r.target, r.headers, r.body))
        ys.append(int(r.attack))
    print(f"operating point {op:.4f}")
    print("source          n        " + "  ".join(f"TPR/FPR@{t:.3f}" for t in thresholds))
    for src, (ps, ys) in sorted(groups.items()):
        ps, ys = np.array(ps), np.array(ys)
        cells = []
        for t in thresholds:
            tpr = (ps[ys == 1] >= t).mean() * 100 if (ys == 1).any() else float("nan")
            fpr = (ps[ys == 0] >= t).mean() * 100 if (ys == 0).any() else float("nan")
            cells.append(f"{tpr:6.2f}/{fpr:5.2f}")
        print(f"{src:15s} {len(ps):7d}  " + "  ".join(cells))
    rw = [r for r in test if r.group and r.method == "GET"]
    with gzip.open(args.payloads, "rt") as fh:
        pays = [(d["payload"], d["category"]) for d in map(json.loads, fh) if d["split"] == "test"]
    rng = random.Random(7)
    rng.shuffle(pays)
    pays = pays[: args.per_placement]
    print(f"payload test split ({len(pays)} payloads) placed in benign real-world GET requests, TPR at op {op:.4f}:")
    total, hit = 0, 0
    by_cat: dict[str, list[int]] = {}
    for where in PLACEMENTS:
        got = 0
        for p, cat in pays:
            ok = probability(m, *placed(p, rng.choice(rw), where, rng)) >= op
            got += ok
            by_cat.setdefault(cat, [0, 0])
            by_cat[cat][0] += ok
            by_cat[cat][1] += 1
        total += len(pays)
        hit += got
        print(f"  {where:10s} {got / len(pays) * 100:6.2f} %")
    print(f"  overall    {hit / total * 100:6.2f} %")
    print("  by category: " + ", ".join(f"{c} {a / n * 100:.1f}" for c, (a, n) in sorted(by_cat.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
