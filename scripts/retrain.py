#!/usr/bin/env python3
"""Retrain the local model on the base corpora plus labelled recorded flows; promote it only if not worse.

    scripts/retrain.py [--uri URI | --dir data/records] [--data a.jsonl.gz,...] [--model models/openflare-local.joblib]

1. Labels stream out of the record store (MongoDB: --uri / OPENFLARE_MONGO_URI, else the embedded store
   in --dir): operator labels (`openflare.label`) > LLM verdicts > confident local verdicts, merged per
   feature string, weighted by source and recency, capped (addons/retraining.py).
2. The app's labelled strings split 80/10/10 by hash: training, threshold calibration, held-out gate.
3. The candidate is a fine-tune of the current model (default): same hashed n-gram feature space (its
   idf kept; buckets it ignored that at least --min-df of the fine-tune's rows use are added), logistic
   loss minimised by L-BFGS from the current weights with an L2 term pulling toward them (only the
   weights of n-grams in the app's rows move), on a deterministic sample of the base training records
   (--base-sample, augmented with scripts/train.py's own code) plus the weighted app strings and base
   payloads carried in the app's benign strings. Every stage is
   bounded by --cap and --base-sample, whatever the store holds. --from-scratch instead trains with
   train.py's fit_supervised on the whole base set plus the app strings (minutes and gigabytes).
   The app profile is refreshed from the app's benign strings when that does not raise FPR on the
   calibration slice.
4. Its threshold is calibrated for --target-app-fpr on the app's benign calibration strings.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from addons import dataset  # noqa: E402
from addons import detector  # noqa: E402
from addons import model  # noqa: E402
from addons import records  # noqa: E402
from addons import retraining  # noqa: E402

_spec = importlib.util.spec_from_file_location("openflare_train", ROOT / "scripts" / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

_T0 = time.perf_counter()
REFUSED = 3  # exit code: the gate refused the candidate (1 stays Python's own for a crash)




# train.py's augmentation parts of a fixed size (not a share of the training attacks): scaled to a sample.
FIXED_SIZE_PARTS = ("synthetic", "ai_attacks", "everyday", "shaped_attacks", "generated_attacks")


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


# ---- the candidate as a fine-tune of the current model ------------------------------------------------


def sample_train(train_recs: list, n: int) -> list:
    """About `n` base training records: those whose sha256 key (train.py's) is among the `n` lowest (a
    deterministic sample: the same corpora give the same rows; copies of one request go together)."""
    if n <= 0 or len(train_recs) <= n:
        return list(train_recs)
    keyed = sorted(((train._key(r), i) for i, r in enumerate(train_recs)))
    cut = keyed[n - 1][0]
    return [r for r in train_recs if train._key(r) <= cut]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Also every option of scripts/train.py "
                                 "(--data, --bits, --min-df, --C, --synthetic, --seed, --version, ...), same defaults.")
    ap.add_argument("--uri", help="MongoDB URI (default: OPENFLARE_MONGO_URI; without either the embedded store)")
    ap.add_argument("--dir", default="data/records", help="embedded store directory (default data/records)")
    ap.add_argument("--model", default=str(ROOT / "models" / (model.DEFAULT_MODEL + model.MODEL_SUFFIX)),
                    help="the current model, replaced on promotion (default models/openflare-local.joblib)")
    ap.add_argument("--candidate", type=Path, default=None, help="where the candidate is written (default models/candidate.joblib)")
    ap.add_argument("--dry-run", action="store_true", help="train and compare, never promote")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes reading the embedded store (default 2)")
    ap.add_argument("--cap", type=int, default=50_000, help="most distinct machine-labelled feature strings kept: bounds training memory (default 50000)")
    ap.add_argument("--fixed-fpr", type=float, default=0.01, help="the gate compares base TPR at this FPR (default 0.01)")
    ap.add_argument("--tolerance", type=float, default=0.005, help="TPR the candidate may lose to noise (default 0.005)")
    ap.add_argument("--target-app-fpr", type=float, default=0.01, help="threshold calibration: FPR on the app's benign flows (default 0.01)")
    ap.add_argument("--calibration-min", type=int, default=100, help="app benign strings needed to calibrate the threshold; fewer: 6 (default 100)")
    ap.add_argument("--app-carried", type=float, default=0.5, help="attack payloads carried in the app's benign requests, per app benign string (default 0.5)")
    ap.add_argument("--profile-min", type=int, default=200, help="app benign strings needed to refresh the app profile (default 200)")
    ap.add_argument("--weight-operator", type=float, default=10.0)
    ap.add_argument("--weight-llm", type=float, default=3.0)
    ap.add_argument("--weight-local", type=float, default=0.5)
    ap.add_argument("--half-life-days", type=float, default=7.0, help="recency: labels this old count half (default 7)")
    ap.add_argument("--local-attack", type=int, default=9, help="local score taken as a confident attack (default 9)")
    ap.add_argument("--local-benign", type=int, default=2, help="local score taken as confidently benign (default 2)")
    ap.add_argument("--from-scratch", action="store_true",
                    help="train the candidate from scratch (train.py's liblinear fit on the whole base set: minutes, GBs) "
                         "instead of fine-tuning the current model")
    ap.add_argument("--base-sample", type=int, default=40_000,
                    help="fine-tune: base training records sampled (deterministically) for the fit; 0: all (default 40000)")
    ap.add_argument("--maxiter", type=int, default=100, help="fine-tune: most L-BFGS iterations (default 100)")
    ap.add_argument("--probe-benign-slack", type=int, default=10,
                    help="probe gate: everyday probes the candidate may refuse beyond the current model's count (default 10 of 1520)")
    ap.add_argument("--json", type=Path, help="also write the comparison as JSON here")
    args, rest = ap.parse_known_args(argv)
    # Every option of scripts/train.py (--data, --bits, --synthetic, --seed, --version, ...) with its defaults:
    # the candidate is trained exactly as `make train` trains, plus the recorded flows.
    targs = train.parser().parse_args(rest)
    for k, v in vars(targs).items():
        if k != "out":
            setattr(args, k, v)
    return args


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
    log(f"labels: {col.stats}; {len(col)} distinct labelled strings; store read in {timings['store_read']} s")
    app = {"train": [], "calibrate": [], "gate": []}
    for f, lab, src, w in col.examples():
        app[retraining.held_slice(f)].append((f, int(lab == "attack"), src, w))
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
    in_test = {f for f, _ in base_test}
    dropped = sum(1 for r in app["train"] if r[0] in in_test)
    app["train"] = [r for r in app["train"] if r[0] not in in_test]  # no request in both train and test
    if dropped:
        log(f"{dropped} recorded strings also in a base test split left out of training")
    timings["base_corpora"] = round(time.perf_counter() - t_base, 1)
    t_fit = time.perf_counter()
    rng = random.Random(args.seed)
    parent = current.estimator
    finetuning = not args.from_scratch and isinstance(parent, detector.Detector)
    if not args.from_scratch and not finetuning:
        log(f"the current model is a {type(parent).__name__}, not a Detector: training from scratch")
    base_train = split.train
    sargs = args
    if finetuning:
        # A deterministic sample of the base training records, augmented as train.py augments the whole
        # set (its fixed-size generated parts scaled down to the sample's share, so the mix stays the same).
        base_train = sample_train(split.train, args.base_sample)
        share = len(base_train) / max(len(split.train), 1)
        sargs = argparse.Namespace(**vars(args))
        for part in FIXED_SIZE_PARTS:
            setattr(sargs, part, round(getattr(args, part) * share))
        log(f"fine-tuning {current.version}: {len(base_train)} of {len(split.train)} base training records sampled")
    sup = train.build_supervised(base_train, rng, sargs)
    held = [r for r in sup if int(train._key(r)[:8], 16) % 10 == 0]
    fit = [r for r in sup if int(train._key(r)[:8], 16) % 10 != 0]
    features = [r.feature() for r in fit] + [f for f, *_ in app["train"]]
    y = [int(r.attack) for r in fit] + [lab for _, lab, *_ in app["train"]]
    weights = [1.0] * len(fit) + [w for *_, w in app["train"]]
    # Base attack payloads carried in the app's own benign requests (as train.py does with base carriers).
    payloads = [p for p in (train.payload_of(r) for r in split.train if r.attack) if p]
    app_benign_train = [f for f, lab, *_ in app["train"] if not lab]
    carried = 0
    if payloads and app_benign_train:
        for _ in range(min(int(len(app_benign_train) * args.app_carried), args.cap)):
            f = retraining.carry(rng.choice(app_benign_train), rng.choice(payloads), rng)
            if f is not None:
                features.append(f)
                y.append(1)
                weights.append(1.0)
                carried += 1
    log(f"{carried} base attack payloads carried in the app's benign requests")
    n_app_attack = sum(1 for r in app["train"] if r[1])
    if finetuning:
        if args.bits != parent.bits:
            log(f"--bits {args.bits} ignored: a fine-tune keeps the current model's 2**{parent.bits} buckets")
        bar = Progress("hashing n-grams", len(features))
        indptr, idx, cnt = retraining.term_rows(features, parent.bits, args.workers, bar, header_block=parent.header_block)
        bar.close()
        n_rows = len(features)
        del features
        idf, added = retraining.extend_idf(parent.idf, indptr, idx, args.min_df)
        # The app's labelled strings' request n-grams move; the carried rows (base payloads in the app's
        # benign requests) only anchor: their payload n-grams keep the current model's weights.
        app_request_buckets = retraining.request_buckets(indptr, idx, len(fit), len(fit) + len(app["train"]))
        X, cols = retraining.tfidf_rows(indptr, idx, cnt, idf, header_scale=parent.header_scale)
        del indptr, idx, cnt
        log(f"fitting on {len(fit)} base + {len(app['train'])} app strings ({n_app_attack} attack) + {carried} carried: "
            f"matrix {X.shape[0]} x {X.shape[1]} columns in use, {X.nnz} non-zeros; {added} buckets new to the model; "
            f"L-BFGS from the current weights (C={args.C})")
        bar = Progress("L-BFGS iterations", args.maxiter)
        det, fit_info = retraining.finetune(parent, X, cols, np.asarray(y), np.asarray(weights, dtype=np.float64), args.C, idf,
                                            anchor_rows=len(fit), maxiter=args.maxiter, progress=bar,
                                            free_buckets=app_request_buckets)
        bar.close()
        del X
        log(f"L-BFGS over {fit_info['free_weights']} free weights: {fit_info['iterations']} iterations, {fit_info['message']}; objective "
            f"{fit_info['objective']['at_parent']:.1f} -> {fit_info['objective']['final']:.1f}")
        training = {
            "method": "fine-tune of the parent: its idf kept (buckets it ignored that occur in at least min_df of these "
                      "rows added); logistic loss (class_weight balanced, sample weights) minimised by L-BFGS-B from the "
                      "parent's weights with an L2 term 1/2 |w - w_parent|^2; only the weights of buckets the app's rows "
                      "(its labelled strings, not the carried payload rows) use in their request (not their header section) are free, with the intercept; every other weight "
                      "is the parent's, and the sampled base rows anchor the free ones",
            "parent_version": current.version,
            "base_sample": {"train_records": len(base_train), "of": len(split.train),
                            **{part: getattr(sargs, part) for part in FIXED_SIZE_PARTS},
                            "supervised": len(sup), "fit": len(fit), "held_out": len(held)},
            "app_train": len(app["train"]), "app_carried": carried, "rows": n_rows, "C": args.C, "min_df": args.min_df,
            "idf_buckets_added": added, "optimizer": fit_info,
        }
    else:
        log(f"fitting on {len(fit)} base + {len(app['train'])} app strings ({n_app_attack} attack)")
        det = train.fit_supervised(features, y, args, sample_weight=weights)
        training = {
            "method": "from scratch: scripts/train.py's fit_supervised (TF-IDF fitted on these rows, liblinear) on the whole "
                      "augmented base training set plus the app's strings",
            "base": {"train_records": len(split.train), "supervised": len(sup), "fit": len(fit), "held_out": len(held)},
            "app_train": len(app["train"]), "app_carried": carried, "rows": len(features), "C": args.C,
        }
        del features
    hy = [int(r.attack) for r in held]
    op = train.choose_operating_point(hy, [det.supervised_proba(r.feature()) for r in held], args.target_fpr)
    det.violation_p = op + (1 - op) / 2

    prof_sources = [s.strip() for s in args.profile_sources.split(",") if s.strip()]
    base_prof = [r.feature() for r in split.train if r.source in prof_sources and not r.attack]
    app_benign = [f for f, lab, *_ in app["train"] if not lab]
    calib_benign = [f for f, lab, *_ in app["calibrate"] if not lab]
    candidates = [("no profile", None)]
    if finetuning and parent.profile is not None:
        candidates.append(("the current model's", parent.profile))
    elif base_prof:
        candidates.append(("base sources only", detector.AppProfile().fit(base_prof)))
    if len(app_benign) >= args.profile_min and len(calib_benign) >= 20:  # only when its FPR can be checked
        candidates.append(("base sources + the app's benign flows", detector.AppProfile().fit(base_prof + app_benign)))
    best = None
    for name, prof in candidates:
        det.profile = prof
        probe = model.LocalModel(det, {"operating_point": op, "version": "probe"}, candidate_path)
        fpr = retraining.calibrate_threshold(probe, calib_benign, 0.0, 6, 6)[1] if calib_benign else 0.0
        log(f"app profile: {name} {prof.summary() if prof else ''}; app benign calibration FPR at 6: {fpr}")
        if best is None or (fpr is not None and fpr <= best[2]):
            best = (name, prof, fpr if fpr is not None else 0.0)
    det.profile, profile_note = best[1], best[0]

    probe = model.LocalModel(det, {"operating_point": op, "version": "probe"}, candidate_path)
    threshold, calib_fpr = retraining.calibrate_threshold(probe, calib_benign, args.target_app_fpr, min_benign=args.calibration_min)
    log(f"operating point {op:.4f}; threshold {threshold} (app benign calibration FPR {calib_fpr})")

    version = args.version or f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{hashlib.sha256(repr(sorted(col.stats.items())).encode()).hexdigest()[:6]}"
    import joblib

    candidate_path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(det, candidate_path, compress=3)
    card = {
        "name": current_path.name[: -len(model.MODEL_SUFFIX)],
        "version": version,
        "parent_version": current.version,
        "parent_sha256": current.card.get("sha256"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "created_by": "scripts/retrain.py",
        "estimator": "addons.detector.Detector",
        "operating_point": op,
        "violation_p": det.violation_p,
        "threshold": threshold,
        "threshold_calibration": {"target_app_fpr": args.target_app_fpr, "app_benign_calibration": len(calib_benign), "fpr": calib_fpr},
        "data_sources": [{"file": str(f), "sha256": model.sha256_file(f)} for f in files],
        "train_counts": dataset.counts(base_train),
        "training": training,
        "test_counts": dataset.counts(split.test),
        "recorded": {"store": store.description, "stats": col.stats, "distinct": len(col),
                     "slices": {k: {"n": len(v), "attack": sum(1 for r in v if r[1])} for k, v in app.items()},
                     "policy": {k: v for k, v in vars(policy).items() if k != "now"}, "cap": args.cap},
        "app_carried_attacks": carried,
        "profile": {"from": profile_note, **det.profile.summary()} if det.profile else None,
        "target_fpr": args.target_fpr,
        "seed": args.seed,
    }
    model.write_card(candidate_path, card)
    candidate = model.load(str(candidate_path))
    gate_rows = [(f, lab) for f, lab, *_ in app["gate"]]
    timings["candidate"] = round(time.perf_counter() - t_fit, 1)
    t_eval = time.perf_counter()
    log(f"evaluating both on {len(base_test)} base test + {len(gate_rows)} app held-out strings")
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
