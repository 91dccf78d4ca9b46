"""Fitting the field model (addons/fieldmodel.py): training rows, the design matrix, the fit. A plain module.

scripts/train.py builds a model from the shared corpora and the payload lists; addons/retraining.py refits
it with the operator's recorded flows. Both go through `Table` and `fit`, which read windows exactly as the
model does at serving time (`fieldmodel.rows`, `fieldmodel.ngram_keys`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from addons import fieldmodel
from addons import fields as fieldsmod


class Table:
    """Deduplicated training windows with their benign and attack weight.

    Real traffic repeats itself (the same header on every request); a window's weight grows with the
    square root of how often it was seen, capped, so a site's thousand identical requests do not drown
    the rest.
    """

    def __init__(self) -> None:
        self.index: dict[tuple, int] = {}
        self.texts: list[str] = []
        self.classes: list[int] = []
        self.extra: list[np.ndarray] = []
        self.pos: list[float] = []
        self.neg: list[float] = []

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, r: fieldmodel.Rows, attack: bool, weight: float = 1.0, only: Iterable[int] | None = None) -> None:
        for k in range(len(r.texts)) if only is None else only:
            e = r.extra[k]
            key = (r.classes[k], r.texts[k], float(e[-2]), float(e[-1]))
            i = self.index.get(key)
            if i is None:
                i = self.index[key] = len(self.texts)
                self.texts.append(r.texts[k])
                self.classes.append(r.classes[k])
                self.extra.append(e)
                self.pos.append(0.0)
                self.neg.append(0.0)
            if attack:
                self.pos[i] += weight
            else:
                self.neg[i] += weight

    def add_fields(self, flds: Sequence[fieldsmod.Field], attack: bool, weight: float = 1.0) -> None:
        if flds:
            self.add(fieldmodel.rows(flds), attack, weight)


def design(texts: Sequence[str], classes: Sequence[int], extra: np.ndarray, bits: int) -> sp.csr_matrix:
    """The model's input for these windows: hashed n-grams (both blocks) then the EXTRA columns."""
    row, col, val = fieldmodel.ngram_keys(texts, classes, bits)
    x = sp.csr_matrix((val, (row, col)), shape=(len(texts), 2 << bits), dtype=np.float32)
    x.sum_duplicates()
    return sp.hstack([x, sp.csr_matrix(np.asarray(extra, dtype=np.float32).reshape(-1, fieldmodel.EXTRA))],
                     format="csr")


def weights(counts: np.ndarray, cap: float) -> np.ndarray:
    return np.minimum(np.sqrt(counts), cap)


def fit(table: Table, bits: int = fieldmodel.BITS, c: float = 8.0, cap: float = 100.0, max_iter: int = 300,
        attack_share: float = 0.5, start: fieldmodel.FieldModel | None = None, log=lambda msg: None) -> fieldmodel.FieldModel:
    """A logistic regression over the table's windows; benign and attack weights each sum to their share."""
    pos, neg = np.array(table.pos), np.array(table.neg)
    wpos, wneg = weights(pos, cap), weights(neg, cap)
    if not wpos.sum() or not wneg.sum():
        raise ValueError("training needs both attack and benign windows")
    wpos *= attack_share / wpos.sum()
    wneg *= (1 - attack_share) / wneg.sum()
    x = design(table.texts, table.classes, np.array(table.extra), bits)
    take_pos, take_neg = np.flatnonzero(wpos > 0), np.flatnonzero(wneg > 0)
    xx = sp.vstack([x[take_pos], x[take_neg]], format="csr")
    y = np.concatenate([np.ones(len(take_pos)), np.zeros(len(take_neg))])
    w = np.concatenate([wpos[take_pos], wneg[take_neg]]) * len(y)
    log(f"fit: {len(take_pos):,} attack and {len(take_neg):,} benign windows, {xx.nnz:,} non-zeros, C={c}")
    lr = LogisticRegression(C=c, max_iter=max_iter, tol=1e-5, warm_start=start is not None)
    if start is not None:
        lr.coef_ = np.concatenate([start.weights, start.extra])[None, :].astype(np.float64)
        lr.intercept_ = np.array([start.intercept])
    lr.fit(xx, y, sample_weight=w)
    coef = lr.coef_[0]
    return fieldmodel.FieldModel(coef[: 2 << bits].astype(np.float32), coef[2 << bits :].astype(np.float32),
                                 float(lr.intercept_[0]), bits)


def request_probability(m: fieldmodel.FieldModel, req: fieldsmod.Request) -> float:
    return m.score(req).p


def best_windows(m: fieldmodel.FieldModel, flds: Sequence[fieldsmod.Field], k: int = 1,
                 benign: Table | None = None) -> tuple[fieldmodel.Rows, list[int]]:
    """The k highest-scoring windows of a request: where an attack request's attack most likely is
    (multiple-instance learning: a corpus labels requests, not fields). Windows the `benign` table holds
    as benign are never picked: a header every request of a corpus carries is not its attack."""
    r = fieldmodel.rows(flds)
    if not r.texts:
        return r, []
    z = m.window_logits(r)
    out = []
    for i in np.argsort(-z):
        if benign is not None:
            e = r.extra[i]
            j = benign.index.get((r.classes[i], r.texts[i], float(e[-2]), float(e[-1])))
            if j is not None and benign.neg[j] > 0:
                continue
        out.append(int(i))
        if len(out) == k:
            break
    return r, out


def confidence(m: fieldmodel.FieldModel, r: fieldmodel.Rows, i: int) -> float:
    """The model's probability that window i of these rows is an attack: how much a corpus attack's picked
    window is worth in training (a corpus labels whole requests, and some of its labels are wrong)."""
    return float(1.0 / (1.0 + np.exp(-m.window_logits(r)[i])))


def threshold_at(benign_p: Sequence[float], max_fpr: float) -> float:
    """The lowest probability that refuses at most max_fpr of these benign requests."""
    ps = np.sort(np.asarray(benign_p))[::-1]
    k = int(math.floor(max_fpr * len(ps)))
    return float(np.nextafter(ps[k], 1.0)) if k < len(ps) else 0.5
