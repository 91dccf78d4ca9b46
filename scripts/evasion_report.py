#!/usr/bin/env python3
"""Which evasions a model lets through: the evasion suite (tests/evasion.py) scored offline.

    scripts/evasion_report.py [--model openflare-local | --model path/to/X.npz] [--threshold N]
                              [--pairs] [--family NAME ...] [--json out.json]

Every family x every classic attack goes fields.extract() -> model.score() exactly as FeatureExtractor +
Scorer do (the card's sha256 is checked at load; a request beyond the inspection limits scores 10, as the
proxy refuses it with 413/431). A pair whose score is not above the threshold (the card's, else 6) is a
bypass. Printed: each classic attack sent plainly (all must be refused for the suite to mean anything),
bypasses per family, per attack, and with --pairs every bypass with its score and the field that scored
highest, so the model's trainer can see what fails and where.

Exit status 0 whatever the figures (a report, not a gate: tests/test_evasion.py is the gate); 2 when the
model cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `addons` when run without `pip install -e .`
sys.path.insert(0, str(ROOT / "tests"))  # tests/evasion.py: the suite's attacks and families

import evasion  # noqa: E402

from addons import fieldmodel  # noqa: E402
from addons import model  # noqa: E402


def describe_hit(hit: fieldmodel.Hit) -> str:
    if hit.field is None:
        return hit.signal or "no field"
    f = hit.field
    value = f.value if len(f.value) <= 60 else f.value[:28] + "..." + f.value[-28:]
    where = f"{f.loc}{' ' + f.via if f.via else ''} {f.name[:30]!r} window {hit.window}"
    return f"{where} ({fieldmodel.signal_of(hit)}): {value!r}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=model.DEFAULT_MODEL, help="a name in models/ or a path to a .npz (with its card)")
    ap.add_argument("--threshold", type=int, default=None, help="refuse scores above this (default: the card's, else 6)")
    ap.add_argument("--pairs", action="store_true", help="list every bypass with its score and deciding field")
    ap.add_argument("--family", action="append", default=[], help="only these families (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the bypasses as JSON here")
    args = ap.parse_args(argv)

    try:
        lm = model.load(args.model)
    except model.ModelError as e:
        print(f"evasion_report: {e}", file=sys.stderr)
        return 2
    threshold = args.threshold if args.threshold is not None else int(lm.card.get("threshold") or 6)
    unknown = [f for f in args.family if f not in evasion.FAMILIES]
    if unknown:
        print(f"evasion_report: unknown families {unknown}; known: {', '.join(evasion.FAMILIES)}", file=sys.stderr)
        return 2
    families = args.family or list(evasion.FAMILIES)
    print(f"model {lm.path} (version {lm.version}), refused: score > {threshold}")

    print("\nclassic attacks sent plainly (query parameter):")
    plain_missed = []
    for name, attack in evasion.CLASSIC.items():
        score, p, _ = lm.score_request(*evasion.plain(attack))
        mark = "refused" if score > threshold else "PASSES"
        if score <= threshold:
            plain_missed.append(name)
        print(f"  {name:<20} {score:>2}  p={p:.3f}  {mark}")

    start = time.perf_counter()
    bypasses: list[dict] = []
    per_family: Counter = Counter()
    per_attack: Counter = Counter()
    for fname in families:
        family = evasion.FAMILIES[fname]
        for aname, attack in evasion.CLASSIC.items():
            score, p, hit = lm.score_request(*family(attack.payload))
            if score <= threshold:
                per_family[fname] += 1
                per_attack[aname] += 1
                bypasses.append({"family": fname, "attack": aname, "score": score, "p": round(p, 4),
                                 "deciding": describe_hit(hit)})
    elapsed = time.perf_counter() - start
    pairs = len(families) * len(evasion.CLASSIC)

    print(f"\nbypasses per family ({len(bypasses)} of {pairs} pairs, {elapsed:.1f} s):")
    for fname in families:
        n = per_family[fname]
        missed = [b["attack"] for b in bypasses if b["family"] == fname]
        print(f"  {fname:<28} {n:>3}/{len(evasion.CLASSIC)}  {' '.join(missed)}")
    print("\nbypasses per attack:")
    for aname in evasion.CLASSIC:
        print(f"  {aname:<20} {per_attack[aname]:>3}/{len(families)}")
    if args.pairs and bypasses:
        print("\nevery bypass (family, attack, score, p, the highest-scoring field):")
        for b in bypasses:
            print(f"  {b['family']:<28} {b['attack']:<20} {b['score']:>2} p={b['p']:.3f}  {b['deciding']}")
    if plain_missed:
        print(f"\nnote: {len(plain_missed)} classic attacks pass even plainly: {' '.join(plain_missed)}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(lm.path), "version": lm.version, "threshold": threshold,
                                         "pairs": pairs, "plain_missed": plain_missed, "bypasses": bypasses},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
