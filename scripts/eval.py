#!/usr/bin/env python3
"""Score labelled JSONL corpora offline through the addon's own code path and print the metrics.

    scripts/eval.py [--data a.jsonl.gz,b.jsonl] [--model openflare-local] [--split test|train|all]
                    [--payloads FILE | --payloads ''] [--json out.json]

Each record goes fields.extract() -> model.load(...).score() exactly as FeatureExtractor + Scorer do
(the card's sha256 is verified first; a request beyond the inspection limits scores 10, as the proxy
refuses it). Printed per source (and all real-world sources together, `realworld`) and per category: TPR,
FPR and precision at the operating point (score > threshold, default 6), confusion counts, TPR at FPR 1 %
and 0.1 %, and ROC AUC. Default: the test splits of every corpus in ../shared/datasets.

Then the test split of the attack payload lists, each payload placed in a benign real-world test request
at each of PLACEMENTS (a query value, a form field, a JSON value, a multipart part, a custom header, a
cookie, a path segment): the share refused per placement and per category.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_PAYLOADS = ROOT.parent / "shared" / "payloads" / "attack-payloads.jsonl.gz"

from addons import dataset  # noqa: E402
from addons import model  # noqa: E402


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


def log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def _fmt(v) -> str:
    if v is None:
        return "    -"
    if isinstance(v, float):
        return f"{100 * v:6.2f}"
    return str(v)


def evaluate(records: list[dataset.Record], lm: model.LocalModel, threshold: int = 6) -> dict:
    """{"overall": m, "sources": {src: m}, "categories": {src: {cat: m}}} with m from dataset.metrics."""
    rows = []
    for r in records:
        score, p, _ = lm.score_request(r.method, r.target, r.headers, r.body)
        rows.append((r.source, r.category, int(r.attack), p, score > threshold, bool(r.group)))
    out: dict = {"overall": None, "sources": {}, "categories": {}}
    by_src: dict[str, list] = defaultdict(list)
    for row in rows:
        by_src[row[0]].append(row)
    out["overall"] = _metrics(rows)
    real = [row for row in rows if row[5]]
    if real and len({row[0] for row in real}) > 1:
        out["realworld"] = _metrics(real)
    for src in sorted(by_src):
        out["sources"][src] = _metrics(by_src[src])
        benign = [row for row in by_src[src] if not row[2]]
        cats: dict[str, list] = defaultdict(list)
        for row in by_src[src]:
            if row[2]:
                cats[row[1]].append(row)
        # Each attack category is measured against all benign requests of its source.
        out["categories"][src] = {c: _metrics(cats[c] + benign) for c in sorted(cats)}
    return out


def _metrics(rows: list) -> dict:
    return dataset.metrics([r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows])


HEAD = f"{'':28} {'n':>7} {'TPR%':>6} {'FPR%':>6} {'prec%':>6} {'TPR@1%':>6} {'@0.1%':>6} {'AUC%':>6} {'tp':>6} {'fn':>6} {'fp':>6} {'tn':>6}"


def _line(name: str, m: dict) -> str:
    return (f"{name:28} {m['n']:>7} {_fmt(m['tpr'])} {_fmt(m['fpr'])} {_fmt(m['precision'])} {_fmt(m['tpr_at_fpr_1pct'])} "
            f"{_fmt(m['tpr_at_fpr_0.1pct'])} {_fmt(m['roc_auc'])} {m['tp']:>6} {m['fn']:>6} {m['fp']:>6} {m['tn']:>6}")


def report(result: dict) -> str:
    lines = [HEAD]
    for src, m in result["sources"].items():
        lines.append(_line(src, m))
        for cat, cm in result["categories"][src].items():
            lines.append(_line(f"  {cat} (vs benign)", cm))
    if "realworld" in result:
        lines.append(_line("realworld (all sites)", result["realworld"]))
    lines.append(_line("ALL", result["overall"]))
    return "\n".join(lines)


def placements(lm: model.LocalModel, payloads: list[tuple[str, str]], carriers: list[dataset.Record],
               threshold: int = 6, seed: int = 7) -> dict:
    """{"placements": {where: refused share}, "categories": {cat: share}, "overall": share} of the payloads
    placed in benign carriers (a carrier drawn per payload and placement, seeded)."""
    rng = random.Random(seed)
    per: dict[str, list[int]] = {}
    cats: dict[str, list[int]] = {}
    for where in PLACEMENTS:
        for payload, cat in payloads:
            refused = lm.score_request(*placed(payload, rng.choice(carriers), where, rng))[0] > threshold
            for d, k in ((per, where), (cats, cat)):
                d.setdefault(k, [0, 0])
                d[k][0] += refused
                d[k][1] += 1
    hit = sum(a for a, _ in per.values())
    n = sum(b for _, b in per.values())
    return {"placements": {k: a / b for k, (a, b) in per.items()}, "categories": {k: a / b for k, (a, b) in sorted(cats.items())},
            "overall": hit / n if n else None, "payloads": len(payloads)}


def read_payloads(path: Path, split: str) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [(d["payload"], d["category"]) for d in map(json.loads, fh) if split == "all" or d["split"] == split]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="comma-separated JSONL(.gz) corpora (default: every file in ../shared/datasets)")
    ap.add_argument("--model", default=model.DEFAULT_MODEL, help="model name in models/ or .npz path (default openflare-local)")
    ap.add_argument("--split", default="test", choices=("test", "train", "all"), help="records to score (default test)")
    ap.add_argument("--threshold", type=int, default=6, help="refuse above this score, as openflare_threshold (default 6)")
    ap.add_argument("--payloads", default=str(DEFAULT_PAYLOADS),
                    help="attack payload lists to place in benign real-world requests ('' for none)")
    ap.add_argument("--per-placement", type=int, default=0, help="at most this many payloads per placement (0: all)")
    ap.add_argument("--json", type=Path, help="also write the metrics as JSON here")
    args = ap.parse_args(argv)
    if not 1 <= args.threshold <= 10:
        ap.error("--threshold must be between 1 and 10")
    try:
        lm = model.load(args.model)
        files = dataset.parse_data_arg(args.data)
        log(f"model {lm.version} ({lm.path}), operating point {lm.operating_point:.4f}")
        records = [r for r in dataset.load(files) if args.split == "all" or r.split == args.split]
    except (model.ModelError, dataset.DatasetError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"eval: no {args.split} records in {', '.join(map(str, files))}", file=sys.stderr)
        return 2
    log(f"scoring {len(records)} {args.split} records from {len(files)} file(s)")
    t = time.perf_counter()
    result = evaluate(records, lm, args.threshold)
    log(f"scored in {time.perf_counter() - t:.1f} s (fields + score)")
    print(f"model {lm.version}, {args.split} split, refused when score > {args.threshold} "
          f"(probability >= {lm.operating_point:.4f}); rates in %")
    print(report(result))
    carriers = [r for r in records if r.group and not r.attack and r.method == "GET"]
    if args.payloads and carriers:
        try:
            pays = read_payloads(Path(args.payloads), args.split)
        except (OSError, ValueError, KeyError) as e:
            print(f"eval: cannot read the payloads {args.payloads}: {e}", file=sys.stderr)
            return 2
        if args.per_placement:
            random.Random(7).shuffle(pays)
            pays = pays[: args.per_placement]
        t = time.perf_counter()
        result["payloads"] = pl = placements(lm, pays, carriers, args.threshold)
        log(f"placed {len(pays)} payloads x {len(PLACEMENTS)} placements in {time.perf_counter() - t:.1f} s")
        print(f"{args.split} payloads ({len(pays)}) placed in benign real-world GET requests: refused %")
        print("  " + "  ".join(f"{k} {100 * v:.2f}" for k, v in pl["placements"].items()) + f"  overall {100 * pl['overall']:.2f}")
        print("  by category: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in pl["categories"].items()))
    if args.json:
        try:
            args.json.write_text(json.dumps({"model": lm.version, "split": args.split, **result}, indent=2) + "\n")
        except OSError as e:
            print(f"eval: cannot write --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
