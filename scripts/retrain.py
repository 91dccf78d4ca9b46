#!/usr/bin/env python3
"""Retrain the local model on the base corpora plus labelled recorded flows; promote it only if not worse.

    scripts/retrain.py [--uri URI | --dir data/records] [--data a.jsonl.gz,...] [--model models/openflare-local.npz]

1. Labels stream out of the record store (MongoDB: --uri / OPENFLARE_MONGO_URI, else the embedded store
   in --dir): operator labels (`openflare.label`) > LLM verdicts > confident local verdicts, merged per
   request, weighted by source and recency, capped (addons/retraining.py).
2. The app's labelled requests split 80/10/10 by hash: training, threshold calibration, held-out gate.
3. The candidate is a refit of the current field model (addons/retraining.py `refit`): one training
   table of the app's requests (weighted), a deterministic sample of the base corpora's training split
   (--base-sample requests, a tenth of them held out for the operating point), --placed payloads of the
   payload list and as many everyday texts placed into fields as scripts/train.py places them, and base
   attack payloads carried into one field of the app's benign requests (--app-carried); benign requests
   give all their windows, attack requests their best one; fitted from the current weights, in the
   current model's bits. Every stage is bounded by --cap and --base-sample, whatever the store holds. Its operating
   point refuses the same share of the held-out base benign requests as the current model's does.
   The app profile is refreshed from the app's benign requests (a root needs --profile-min of them)
   when that does not raise FPR on the calibration slice.
4. Its threshold is calibrated for --target-app-fpr on the app's benign calibration requests.
5. Candidate and current model are scored on the same held-out data (base test splits + the app's gate
   slice), and on the fixed probe set of addons/probes.py (everyday requests and short classic attacks
   under 19 header sets, each model at its own threshold); both tables are printed either way. The
   candidate is promoted (history kept, parent recorded, files replaced atomically) only if both gates
   pass: the probe gate refuses a candidate that passes an attack probe the current model refuses, or
   refuses more than --probe-benign-slack more everyday probes. Exit 0: promoted (or --dry-run),
   3: refused, 2: bad input (a message, never a traceback).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from addons import dataset  # noqa: E402
from addons import model  # noqa: E402
from addons import records  # noqa: E402
from addons import retraining  # noqa: E402

_spec = importlib.util.spec_from_file_location("openflare_train", ROOT / "scripts" / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)  # its payload placement and everyday text, as `make train` uses them

_T0 = time.perf_counter()
REFUSED = 3  # exit code: the gate refused the candidate (1 stays Python's own for a crash)


def log(msg: str) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(f"[retrain {time.perf_counter() - _T0:6.1f}s, peak {peak:4.1f} GB] {msg}", file=sys.stderr, flush=True)


class Progress:
    """A progress bar on stderr, redrawn at most twice a second (total may be unknown: a counter)."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label, self.total, self.n, self._last = label, total, 0, 0.0

    def __call__(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if now - self._last >= 0.5:
            self._last = now
            self._draw()

    def _draw(self, end: str = "") -> None:
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(30 * frac)
            print(f"\r  {self.label} [{bar:30}] {self.n}/{self.total}", end=end, file=sys.stderr, flush=True)
        else:
            print(f"\r  {self.label}: {self.n}", end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._draw("\n")


# ---- the base rows ---------------------------------------------------------------------------------------


def sample_base(rows: list[tuple[retraining.Sample, int]], n: int) -> list[tuple[retraining.Sample, int]]:
    """About `n` base rows: those whose request hash is among the `n` lowest (a deterministic sample: the
    same corpora give the same rows; copies of one request go together)."""
    if n <= 0 or len(rows) <= n:
        return list(rows)
    prio = [retraining._priority(s) for s, _ in rows]
    cut = sorted(prio)[n - 1]
    return [r for r, p in zip(rows, prio) if p <= cut]


def placed_fields(args, rng: random.Random) -> list[tuple]:
    """--placed payloads of the --payloads train split, each in a random field (attack), and as many
    everyday texts placed the same way (benign): scripts/train.py's own placement."""
    if args.placed <= 0 or not args.payloads:
        return []
    try:
        payloads = train.read_payloads(Path(args.payloads), "train")
    except (OSError, ValueError, KeyError, EOFError) as e:
        log(f"no payloads placed: cannot read {args.payloads}: {e}")
        return []
    if not payloads:
        return []
    # In values only: the shipped model learnt payloads as names; a refit's few placements go where an app's
    # own traffic is.
    out = [(train.place(p, rng, names=False), 1) for p, _ in (rng.choice(payloads) for _ in range(args.placed))]
    return out + [(train.place(train.synth.everyday_text(rng), rng, names=False), 0) for _ in range(args.placed)]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uri", help="MongoDB URI (default: OPENFLARE_MONGO_URI; without either the embedded store)")
    ap.add_argument("--dir", default="data/records", help="embedded store directory (default data/records)")
    ap.add_argument("--data", help="base corpora, comma-separated files or directories (default: every file in ../shared/datasets)")
    ap.add_argument("--model", default=str(ROOT / "models" / (model.DEFAULT_MODEL + model.MODEL_SUFFIX)),
                    help="the current model, replaced on promotion (default models/openflare-local.npz)")
    ap.add_argument("--candidate", type=Path, default=None, help="where the candidate is written (default models/candidate.npz)")
    ap.add_argument("--dry-run", action="store_true", help="train and compare, never promote")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes reading the embedded store and scoring (default 2)")
    ap.add_argument("--cap", type=int, default=50_000, help="most distinct machine-labelled requests kept: bounds training memory (default 50000)")
    ap.add_argument("--fixed-fpr", type=float, default=0.01, help="the gate compares base TPR at this FPR (default 0.01)")
    ap.add_argument("--tolerance", type=float, default=0.005, help="TPR the candidate may lose to noise (default 0.005)")
    ap.add_argument("--target-app-fpr", type=float, default=0.01, help="threshold calibration: FPR on the app's benign flows (default 0.01)")
    ap.add_argument("--calibration-min", type=int, default=100, help="app benign requests needed to calibrate the threshold; fewer: 6 (default 100)")
    ap.add_argument("--app-carried", type=float, default=0.5, help="attack payloads carried in the app's benign requests, per app benign request (default 0.5)")
    ap.add_argument("--profile-min", type=int, default=50, help="app benign requests under one root needed to learn it in the app profile (default 50)")
    ap.add_argument("--weight-operator", type=float, default=10.0)
    ap.add_argument("--weight-llm", type=float, default=3.0)
    ap.add_argument("--weight-local", type=float, default=0.5)
    ap.add_argument("--half-life-days", type=float, default=7.0, help="recency: labels this old count half (default 7)")
    ap.add_argument("--local-attack", type=int, default=11,
                    help="local score taken as a confident attack (default 11: never; the model's own refusals are "
                         "not evidence, or its false positives would be learnt again)")
    ap.add_argument("--local-benign", type=int, default=2, help="local score taken as confidently benign (default 2)")
    ap.add_argument("--base-sample", type=int, default=8_000,
                    help="base training requests sampled (deterministically) for the refit; 0: all (default 8000)")
    ap.add_argument("--C", type=float, default=8.0, help="inverse regularisation strength of the refit (default 8, as scripts/train.py)")
    ap.add_argument("--max-iter", "--maxiter", dest="max_iter", type=int, default=100, help="most L-BFGS iterations of the refit (default 100)")
    ap.add_argument("--probe-benign-slack", type=int, default=10,
                    help="probe gate: everyday probes the candidate may refuse beyond the current model's count (default 10 of 1520)")
    ap.add_argument("--payloads", default=str(ROOT.parent / "shared" / "payloads" / "attack-payloads.jsonl.gz"),
                    help="attack payload list (train split) placed into fields as scripts/train.py does; '' for none")
    ap.add_argument("--placed", type=int, default=4_000,
                    help="payloads of --payloads placed into fields, and as many everyday texts, so the refit keeps "
                         "what the current model learnt from them (default 4000)")
    ap.add_argument("--seed", type=int, default=0, help="which payloads are placed where, which app requests carry them (default 0)")
    ap.add_argument("--version", help="the candidate's version (default: UTC time and a hash of the label counts)")
    ap.add_argument("--json", type=Path, help="also write the comparison as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except (OSError, dataset.DatasetError, model.ModelError, retraining.RetrainError) as e:
        # Bad input or a full disk, not a bug: a message and exit code 2, never a traceback.
        if isinstance(e, OSError):
            e = f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
        print(f"retrain: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    current_path = Path(args.model)
    candidate_path = args.candidate or current_path.with_name("candidate" + model.MODEL_SUFFIX)
    policy = retraining.Policy(local_attack=args.local_attack, local_benign=args.local_benign,
                               weight_operator=args.weight_operator, weight_llm=args.weight_llm,
                               weight_local=args.weight_local, half_life_days=args.half_life_days)
    try:
        current = model.load(str(current_path))
        files = dataset.parse_data_arg(args.data)
        store = records.store_from_args(args.uri, args.dir)
    except (model.ModelError, dataset.DatasetError, ValueError, OSError) as e:
        print(f"retrain: {e}", file=sys.stderr)
        return 2
    log(f"current model {current.version} ({current_path}); reading labels from {store.description}")
    bar = Progress("records read")
    t_read = time.perf_counter()
    try:
        col = retraining.collect(store, policy, cap=args.cap, progress=bar, workers=args.workers)
    except Exception as e:  # noqa: BLE001 - pymongo errors, an unreadable store
        print(f"retrain: cannot read {store.description}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
        store.close()
    timings = {"store_read": round(time.perf_counter() - t_read, 1)}
    log(f"labels: {col.stats}; {len(col)} distinct labelled requests; store read in {timings['store_read']} s")
    app = {"train": [], "calibrate": [], "gate": []}
    for s, lab, src, w in col.examples():
        app[retraining.held_slice(s)].append((s, int(lab == "attack"), src, w))
    distinct = len(col)
    del col.entries  # the examples live on in `app`
    if not app["train"]:
        print("retrain: no labelled recorded flows (label some with openflare.label, or record full flows)", file=sys.stderr)
        return 2

    t_base = time.perf_counter()
    log("reading base corpora " + ", ".join(str(f) for f in files))
    try:
        recs = dataset.load(files)
    except dataset.DatasetError as e:
        print(f"retrain: {e}", file=sys.stderr)
        return 2
    split = dataset.honest_split(recs)
    del recs
    base_test = retraining.base_rows(split.test)
    in_test = {s for s, _ in base_test}
    dropped = sum(1 for r in app["train"] if r[0] in in_test)
    app["train"] = [r for r in app["train"] if r[0] not in in_test]  # no request in both train and test
    if dropped:
        log(f"{dropped} recorded requests also in a base test split left out of training")
    base_train = sample_base(retraining.base_rows(split.train), args.base_sample)
    held = [r for r in base_train if retraining._priority(r[0]) % 10 == 0]  # for the operating point
    fit_rows = [r for r in base_train if retraining._priority(r[0]) % 10 != 0]
    train_counts, test_counts, n_train = dataset.counts(split.train), dataset.counts(split.test), len(split.train)
    del split
    timings["base_corpora"] = round(time.perf_counter() - t_base, 1)
    log(f"base: {len(base_train)} of {n_train} training requests sampled ({len(fit_rows)} to fit, {len(held)} held out); "
        f"{len(base_test)} test requests")

    t_fit = time.perf_counter()
    parent = current.fields
    rng = random.Random(args.seed)
    app_train = [(s, lab, w) for s, lab, _, w in app["train"]]
    app_benign_train = [s for s, lab, _ in app_train if not lab]
    n_carried = min(int(len(app_benign_train) * args.app_carried), args.cap)
    n_app_attack = sum(1 for r in app_train if r[1])
    log(f"refitting {current.version} on {len(fit_rows)} base + {len(app_train)} app requests ({n_app_attack} attack) "
        f"+ {n_carried} carried payloads, from the current weights (2**{parent.bits} buckets, C={args.C})")
    placed = placed_fields(args, rng)
    cand, info = retraining.refit(parent, app_train, fit_rows, c=args.C, max_iter=args.max_iter, carried=n_carried, rng=rng,
                                  placed=placed, log=log)
    carried = info["carried"]
    log(f"{carried} base attack payloads carried in the app's benign requests")
    held_benign = [s for s, y in held if not y]
    op = retraining.operating_point(current, cand, held_benign)
    if op != current.operating_point:
        cand.violation_p = op + (1 - op) / 2
    training = {
        "method": "refit of the parent field model: one learn.Table of the app's labelled requests (weighted by source and "
                  "recency), a deterministic sample of the base training split and base attack payloads carried into one "
                  "field of the app's benign requests; benign requests give all their windows, attack requests their best "
                  "window by the parent (multiple-instance learning); learn.fit warm-started at the parent's weights, "
                  "in its bits",
        "parent_version": current.version,
        "base_sample": {"train_requests": len(base_train), "of": n_train, "fit": len(fit_rows), "held_out": len(held)},
        "app_train": len(app_train), "app_carried": carried, "table": info, "C": args.C, "max_iter": args.max_iter,
        "bits": parent.bits,
        "operating_point": {"parent": current.operating_point, "candidate": op, "held_out_benign": len(held_benign)},
    }

    calib_benign = [s for s, lab, *_ in app["calibrate"] if not lab]
    profile_note = "the current model's" if parent.profile is not None else "none"
    refreshed = retraining.refresh_profile(
        parent.profile, (q.fields for q in (s.request() for s in app_benign_train) if q is not None), args.profile_min)
    if refreshed is not None:
        fprs = []
        for prof in (cand.profile, refreshed):
            cand.profile = prof
            probe = model.LocalModel(cand, {"operating_point": op, "version": "probe"}, candidate_path)
            fprs.append((retraining.calibrate_threshold(probe, calib_benign, 0.0, 6, 6)[1] or 0.0) if calib_benign else 0.0)
        log(f"app profile refreshed from the app's benign requests {retraining.profile_summary(refreshed)}; "
            f"app benign calibration FPR at 6: {fprs[0]} without, {fprs[1]} with")
        if fprs[1] <= fprs[0]:
            profile_note = "the current model's + the app's benign requests"
        else:
            cand.profile = parent.profile

    probe = model.LocalModel(cand, {"operating_point": op, "version": "probe"}, candidate_path)
    threshold, calib_fpr = retraining.calibrate_threshold(probe, calib_benign, args.target_app_fpr, min_benign=args.calibration_min)
    log(f"operating point {op:.4f}; threshold {threshold} (app benign calibration FPR {calib_fpr})")

    version = args.version or f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{hashlib.sha256(repr(sorted(col.stats.items())).encode()).hexdigest()[:6]}"
    candidate_path.parent.mkdir(parents=True, exist_ok=True)
    cand.save(candidate_path)
    card = {
        "name": current_path.name[: -len(model.MODEL_SUFFIX)],
        "version": version,
        "parent_version": current.version,
        "parent_sha256": current.card.get("sha256"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "created_by": "scripts/retrain.py",
        "estimator": "addons.fieldmodel.FieldModel",
        "operating_point": op,
        "violation_p": cand.violation_p,
        "threshold": threshold,
        "threshold_calibration": {"target_app_fpr": args.target_app_fpr, "app_benign_calibration": len(calib_benign), "fpr": calib_fpr},
        "data_sources": [{"file": str(f), "sha256": model.sha256_file(f)} for f in files],
        "train_counts": train_counts,
        "training": training,
        "test_counts": test_counts,
        "recorded": {"store": store.description, "stats": col.stats, "distinct": distinct,
                     "slices": {k: {"n": len(v), "attack": sum(1 for r in v if r[1])} for k, v in app.items()},
                     "policy": {k: v for k, v in vars(policy).items() if k != "now"}, "cap": args.cap},
        "app_carried_attacks": carried,
        "profile": {"from": profile_note, **retraining.profile_summary(cand.profile)} if cand.profile else None,
        "seed": args.seed,
    }
    model.write_card(candidate_path, card)
    candidate = model.load(str(candidate_path))
    gate_rows = [(s, lab) for s, lab, *_ in app["gate"]]
    timings["candidate"] = round(time.perf_counter() - t_fit, 1)
    t_eval = time.perf_counter()
    log(f"evaluating both on {len(base_test)} base test + {len(gate_rows)} app held-out requests")
    res = {}
    for name, lm in (("current", current), ("candidate", candidate)):
        bar = Progress(f"scoring {name}", len(base_test) + len(gate_rows))
        res[name] = retraining.evaluate(lm, base_test, gate_rows, args.fixed_fpr, progress=bar, workers=args.workers)
        bar.close()
    t_probe = time.perf_counter()
    probe_res = retraining.probe_gate(current, candidate, args.probe_benign_slack)
    timings["evaluation"] = round(time.perf_counter() - t_eval, 1)
    log(f"probe set scored by both in {time.perf_counter() - t_probe:.1f} s")
    decision = retraining.gate(res["current"], res["candidate"], args.tolerance)
    decision.reasons += probe_res.reasons
    decision.promote = decision.promote and probe_res.promote
    card["metrics"] = {"held_out": res["candidate"], "parent_held_out": res["current"], "probes": probe_res.summary}
    model.write_card(candidate_path, card)
    print(f"current {current.version} vs candidate {version} (rates in %, fixed FPR {100 * args.fixed_fpr:g} %)")
    print(retraining.table(res["current"], res["candidate"]))
    print(retraining.probe_table(probe_res))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        args.json.write_text(json.dumps({"current": res["current"], "candidate": res["candidate"], "promote": decision.promote,
                                         "reasons": decision.reasons, "probes": probe_res.summary, "version": version, "threshold": threshold,
                                         "stats": col.stats, "peak_rss_mb": rss, "seconds": timings,
                                         "training": training}, indent=2) + "\n")
    log(f"peak RSS {rss:.0f} MB; seconds: {timings}")
    if not decision.promote:
        print("REFUSED: " + "; ".join(decision.reasons) + f" (candidate kept in {candidate_path})")
        return REFUSED
    if args.dry_run:
        print(f"PASSES the gate (dry run: not promoted; candidate in {candidate_path})")
        return 0
    retraining.install(candidate_path, current_path)
    print(f"PROMOTED {version} (parent {current.version}) to {current_path}; `make rollback` returns to {current.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
