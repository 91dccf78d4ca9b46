"""Train the field model (addons/fieldmodel.py) from the shared corpora and payload lists.

    python scripts/train_fields.py [--data DIR] [--payloads FILE] [--out models/openflare-local.npz]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from addons import dataset, fieldmodel, learn  # noqa: E402
from addons import fields as fieldsmod  # noqa: E402
import train as synth  # noqa: E402  (dev: the generators)

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def is_validation(r: dataset.Record) -> bool:
    """Held out of the fit to choose the operating point: a fifth of the real-world site groups (a site is
    never split), a tenth of other records."""
    if r.group:
        return int(hashlib.sha256(r.group.encode()).hexdigest()[:8], 16) % 5 == 0
    return int(hashlib.sha256(repr(r.key() if hasattr(r, "key") else (r.method, r.target, r.body)).encode()).hexdigest()[:8], 16) % 10 == 0


def request_fields(r: dataset.Record) -> fieldsmod.Request | None:
    try:
        return fieldsmod.extract(r.method, r.target, r.headers, r.body)
    except fieldsmod.TooLarge:
        return None


# Where a payload goes, and how it is written there (a client encodes a query; a JSON value is raw).
HEADER_NAMES = ("user-agent", "referer", "x-api-version", "accept-language", "x-forwarded-for", "x-request-id",
                "content-type", "origin", "x-custom", "authorization")
PARAM_NAMES = ("id", "q", "search", "page", "name", "file", "url", "cmd", "item", "user", "lang", "redirect", "data")


def place(payload: str, rng: random.Random) -> fieldsmod.Field:
    loc = rng.choice(("query", "query", "form", "json", "json", "header", "cookie", "path", "multipart", "xml"))
    name = rng.choice(PARAM_NAMES)
    enc = rng.random()
    if loc in ("query", "form", "cookie"):
        value = quote(payload, safe="") if enc < 0.5 else (quote(payload, safe="/:=()'\",;") if enc < 0.8 else payload)
        return fieldsmod.Field(loc, name, value)
    if loc == "path":
        return fieldsmod.Field("path", "path", "/api/" + quote(payload, safe="/" if enc < 0.5 else ""))
    if loc == "header":
        return fieldsmod.Field("header", rng.choice(HEADER_NAMES), payload)
    return fieldsmod.Field(loc, name, payload)


def read_payloads(path: Path, split: str) -> list[tuple[str, str]]:
    with gzip.open(path, "rt") as fh:
        return [(d["payload"], d["category"]) for d in map(json.loads, fh) if d["split"] == split]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--payloads", type=Path, default=ROOT.parent / "shared" / "payloads" / "attack-payloads.jsonl.gz")
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "openflare-local.npz")
    ap.add_argument("--bits", type=int, default=fieldmodel.BITS)
    ap.add_argument("--C", type=float, default=8.0)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--placements", type=int, default=3)
    ap.add_argument("--everyday", type=int, default=40000)
    ap.add_argument("--generated", type=int, default=8000)
    ap.add_argument("--target-fpr", type=float, default=0.002)
    ap.add_argument("--limit", type=int, default=0, help="at most this many records per source (quick runs)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)

    files = dataset.parse_data_arg(args.data)
    records = dataset.load(files)
    split = dataset.honest_split(records)
    train = split.train
    if args.limit:
        per: dict[str, int] = {}
        train = [r for r in train if (per.__setitem__(r.source, per.get(r.source, 0) + 1) or per[r.source]) <= args.limit]
    fit_recs = [r for r in train if not is_validation(r)]
    val_recs = [r for r in train if is_validation(r)]
    log(f"{len(fit_recs)} records to fit, {len(val_recs)} to validate")

    table = learn.Table()
    attack_reqs = []
    for r in fit_recs:
        req = request_fields(r)
        if req is None:
            continue
        if r.attack:
            attack_reqs.append(req)
        else:
            table.add_fields(req.fields, attack=False)
    log(f"benign corpus windows: {len(table):,}")
    for _ in range(args.everyday):
        text = synth.everyday_text(rng)
        table.add_fields([fieldsmod.Field(rng.choice(("query", "form", "json", "text")), "q", text)], attack=False)
    log(f"with everyday text: {len(table):,}")

    payloads = read_payloads(args.payloads, "train")
    for p, _cat in payloads:
        for _ in range(args.placements):
            table.add_fields([place(p, rng)], attack=True)
    for _ in range(args.generated):
        table.add_fields([place(synth.generated_attack(rng), rng)], attack=True)
    log(f"with placed payloads ({len(payloads)}) and generated attacks: {len(table):,}")

    m = learn.fit(table, args.bits, args.C, max_iter=args.max_iter, log=log)
    log("stage 1 fitted; picking each corpus attack's window")
    for req in attack_reqs:
        r, best = learn.best_windows(m, req.fields, 1, benign=table)
        table.add(r, attack=True, only=best)
    m = learn.fit(table, args.bits, args.C, max_iter=args.max_iter, start=m, log=log)
    log("stage 2 fitted")

    profile_recs = [request_fields(r) for r in fit_recs if r.source == "csic2010" and not r.attack]
    m.profile = fieldmodel.AppProfile().fit(q.fields for q in profile_recs if q)

    real_sources = {r.source for r in train if r.group}
    by_source: dict[str, tuple[list[float], list[int]]] = {}
    for r in val_recs:
        req = request_fields(r)
        p = 1.0 if req is None else m.score(req).p
        ps, ys = by_source.setdefault(r.source, ([], []))
        ps.append(p)
        ys.append(int(r.attack))
    rw = [p for src, (ps, ys) in by_source.items() if src in real_sources for p, y in zip(ps, ys) if not y]
    op = learn.threshold_at(rw, args.target_fpr) if rw else 0.5
    m.violation_p = op + (1 - op) / 2
    log(f"operating point {op:.4f} (real-world validation FPR target {args.target_fpr})")
    for src, (ps, ys) in sorted(by_source.items()):
        ps, ys = np.array(ps), np.array(ys)
        tpr = (ps[ys == 1] >= op).mean() if (ys == 1).any() else float("nan")
        fpr = (ps[ys == 0] >= op).mean() if (ys == 0).any() else float("nan")
        log(f"  val {src}: n={len(ps)} TPR {tpr:.4f} FPR {fpr:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    m.save(args.out)
    (args.out.with_suffix(".op")).write_text(str(op))
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
