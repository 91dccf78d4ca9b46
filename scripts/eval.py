#!/usr/bin/env python3
"""Score labelled JSONL corpora offline through the addon's own code path and print the metrics.

    scripts/eval.py [--data a.jsonl.gz,b.jsonl] [--model openflare-local] [--split test|train|all] [--json out.json]

Each record goes featurize() -> model.load(...).score() exactly as FeatureExtractor + Scorer do
(the card's sha256 is verified first). Printed per source and per category: TPR, FPR and precision
at the operating point (score > threshold, default 6), confusion counts, TPR at FPR 1 % and 0.1 %,
and ROC AUC. Default: the test splits of every corpus in ../shared/datasets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from addons import dataset  # noqa: E402
from addons import model  # noqa: E402


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
        score, p = lm.score(r.feature())
        rows.append((r.source, r.category, int(r.attack), p, score > threshold))
    out: dict = {"overall": None, "sources": {}, "categories": {}}
    by_src: dict[str, list] = defaultdict(list)
    for row in rows:
        by_src[row[0]].append(row)
    out["overall"] = _metrics(rows)
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
    lines.append(_line("ALL", result["overall"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="comma-separated JSONL(.gz) corpora (default: every file in ../shared/datasets)")
    ap.add_argument("--model", default=model.DEFAULT_MODEL, help="model name in models/ or .joblib path (default openflare-local)")
    ap.add_argument("--split", default="test", choices=("test", "train", "all"), help="records to score (default test)")
    ap.add_argument("--threshold", type=int, default=6, help="refuse above this score, as openflare_threshold (default 6)")
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
    log(f"scored in {time.perf_counter() - t:.1f} s (featurize + score)")
    print(f"model {lm.version}, {args.split} split, refused when score > {args.threshold} "
          f"(probability >= {lm.operating_point:.4f}); rates in %")
    print(report(result))
    if args.json:
        try:
            args.json.write_text(json.dumps({"model": lm.version, "split": args.split, **result}, indent=2) + "\n")
        except OSError as e:
            print(f"eval: cannot write --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
