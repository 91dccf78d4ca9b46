"""Read labelled HTTP request corpora (JSON Lines) and split them honestly. A plain module.

One record per line, the format of `/work/shared/datasets` (and of recorded flows exported as JSONL):
`method`, `target` (request-target as sent), `headers` ([name, value] pairs), `body` (text, or base64
with `"body_b64": true`), `label` (`attack` | `benign`), and optionally `split` (`train` | `test`),
`source`, `category`, `id`. Files may be gzipped (`.gz`). A bad line raises `DatasetError`
naming `file:line`.

A record is the request as sent: training, evaluation and serving all turn it into fields with
`addons.fields.extract`, so they share one code path.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


LABELS = ("attack", "benign")
SPLITS = ("train", "test")
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


class DatasetError(Exception):
    """A corpus file is missing or holds a record that cannot be used."""


@dataclass
class Record:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    label: str
    split: str
    source: str
    category: str
    id: str = ""
    where: str = ""  # file:line, for error messages
    group: str = ""  # the site group (realworld-benign: meta.group): validation slices never split one

    @property
    def attack(self) -> bool:
        return self.label == "attack"

    def normal_key(self) -> tuple:
        """`key` with target and body normalised (addons/normalise.py): two spellings of one request are one."""
        from addons import fields, normalise

        body = normalise.normalise(fields.text_of(self.body)) if self.body else ""
        return (self.method.upper(), normalise.normalise(self.target), tuple(self.headers), body)

    def key(self) -> tuple:
        """The request itself (method, target, headers, body): what makes two records the same request."""
        return (self.method, self.target, tuple(self.headers), self.body)


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def parse_record(obj: object, where: str, default_source: str) -> Record:
    """Validate one decoded JSON object; raises DatasetError naming `where` (file:line)."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, not {type(obj).__name__}")
    for key in ("method", "target"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise DatasetError(f"{where}: field {key!r} must be a non-empty string")
    label = obj.get("label")
    if label not in LABELS:
        raise DatasetError(f"{where}: field 'label' must be one of {', '.join(LABELS)}, not {label!r}")
    split = obj.get("split", "train")
    if split not in SPLITS:
        raise DatasetError(f"{where}: field 'split' must be one of {', '.join(SPLITS)}, not {split!r}")
    raw_headers = obj.get("headers", [])
    if not isinstance(raw_headers, list) or not all(
        isinstance(h, list | tuple) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in raw_headers
    ):
        raise DatasetError(f"{where}: field 'headers' must be a list of [name, value] string pairs")
    body = obj.get("body", "")
    if not isinstance(body, str):
        raise DatasetError(f"{where}: field 'body' must be a string")
    if obj.get("body_b64"):
        try:
            body_bytes = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as e:
            raise DatasetError(f"{where}: field 'body' is not valid base64: {e}") from e
    else:
        body_bytes = body.encode("utf-8", "surrogatepass")
    source = obj.get("source", default_source)
    category = obj.get("category", "other" if label == "attack" else "benign")
    return Record(
        method=obj["method"],
        target=obj["target"],
        headers=[(h[0], h[1]) for h in raw_headers],
        body=body_bytes,
        label=label,
        split=split,
        source=str(source),
        category=str(category),
        id=str(obj.get("id", "")),
        where=where,
        group=str(meta.get("group") or meta.get("origin") or "") if isinstance(meta := obj.get("meta"), dict) else "",
    )


def read(path: str | Path) -> Iterator[Record]:
    """Yield the records of one JSONL file (plain or .gz)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    default_source = path.name.split(".", 1)[0]
    try:
        with _open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DatasetError(f"{where}: not valid JSON: {e}") from e
                yield parse_record(obj, where, default_source)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from e


DATA_HELP = (
    "The corpora are labelled HTTP requests, one JSON object per line (README.md, \"Corpus format\"). The default "
    "is every *.jsonl[.gz] in the shared datasets directory next to this checkout ({dir}); its README.md says what "
    "each file is and where it comes from, and its build_datasets.py rebuilds them from their public sources. "
    "Or name your own: make train DATA=a.jsonl.gz,b.jsonl (a directory stands for its *.jsonl[.gz] files)"
)


def _corpora_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.jsonl*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))


def default_files(data_dir: Path | None = None) -> list[Path]:
    """All corpora in the shared datasets directory, sorted by name."""
    data_dir = DEFAULT_DATA_DIR if data_dir is None else data_dir
    if not data_dir.is_dir():
        raise DatasetError(f"no training data: {data_dir} does not exist. " + DATA_HELP.format(dir=data_dir))
    files = _corpora_in(data_dir)
    if not files:
        raise DatasetError(f"no training data: no *.jsonl or *.jsonl.gz file in {data_dir}. " + DATA_HELP.format(dir=data_dir))
    return files


def parse_data_arg(value: str | None, data_dir: Path | None = None) -> list[Path]:
    """`a.jsonl.gz,b.jsonl,some/dir` (or None for every file in the shared datasets directory) -> paths.

    A directory stands for the *.jsonl and *.jsonl.gz files in it (sorted by name)."""
    if not value:
        return default_files(data_dir)
    paths = [Path(v.strip()) for v in value.split(",") if v.strip()]
    if not paths:
        raise DatasetError("--data names no file")
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = _corpora_in(p)
            if not found:
                raise DatasetError(f"{p} is a directory without *.jsonl or *.jsonl.gz files; name the corpus files "
                                   "(DATA=a.jsonl.gz,b.jsonl) or a directory that holds them")
            out.extend(found)
        elif not p.is_file():
            raise DatasetError(f"dataset file not found: {p}")
        else:
            out.append(p)
    return out


def load(paths: Iterable[str | Path]) -> list[Record]:
    records: list[Record] = []
    for p in paths:
        records.extend(read(p))
    return records


@dataclass
class Split:
    train: list[Record]
    test: list[Record]
    dropped: int  # training records whose request also occurs in a test split
    dropped_by_source: dict[str, int]


def honest_split(records: Iterable[Record]) -> Split:
    """Train/test by each record's `split`; drop from train every request seen in any test split.

    No request (the same method, headers, and target and body once normalised: `/%41` is `/a`) is then in
    both sets.
    """
    train: list[Record] = []
    test: list[Record] = []
    for r in records:
        (test if r.split == "test" else train).append(r)
    seen = {r.normal_key() for r in test}
    kept = [r for r in train if r.normal_key() not in seen]
    dropped = Counter(r.source for r in train if r.normal_key() in seen)
    return Split(kept, test, sum(dropped.values()), dict(sorted(dropped.items())))


def counts(records: Iterable[Record]) -> dict[str, dict[str, int]]:
    """{source: {"attack": n, "benign": n}} for a card or a log line."""
    out: dict[str, Counter] = {}
    for r in records:
        out.setdefault(r.source, Counter())[r.label] += 1
    return {s: {lab: int(c[lab]) for lab in LABELS} for s, c in sorted(out.items())}


def tpr_at_fpr(y: Sequence[int], p: Sequence[float], max_fpr: float) -> float | None:
    """The highest TPR of any threshold whose FPR is at most `max_fpr` (None without both classes).

    A threshold t flags p >= t; ties move together, so a tie across the FPR budget is not split.
    """
    pairs = sorted(zip(p, y), key=lambda x: -x[0])
    pos = sum(1 for v in y if v)
    neg = len(y) - pos
    if not pos or not neg:
        return None
    best = 0.0
    tp = fp = 0
    i = 0
    while i < len(pairs):
        t = pairs[i][0]
        while i < len(pairs) and pairs[i][0] == t:
            if pairs[i][1]:
                tp += 1
            else:
                fp += 1
            i += 1
        if fp / neg <= max_fpr:
            best = max(best, tp / pos)
    return best


def metrics(y: Sequence[int], p: Sequence[float], flagged: Sequence[bool]) -> dict:
    """Confusion counts, TPR, FPR, precision of `flagged`; TPR at FPR 1% / 0.1% and ROC AUC of `p`.

    `y` is 1 for attack; `flagged` is the verdict at the operating point (score > 6).
    """
    tp = sum(1 for v, f in zip(y, flagged) if v and f)
    fn = sum(1 for v, f in zip(y, flagged) if v and not f)
    fp = sum(1 for v, f in zip(y, flagged) if not v and f)
    tn = sum(1 for v, f in zip(y, flagged) if not v and not f)
    out = {
        "n": len(y),
        "tp": tp,
        "fn": fn,
        "fp": fp,
        "tn": tn,
        "tpr": tp / (tp + fn) if tp + fn else None,
        "fpr": fp / (fp + tn) if fp + tn else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "tpr_at_fpr_1pct": tpr_at_fpr(y, p, 0.01),
        "tpr_at_fpr_0.1pct": tpr_at_fpr(y, p, 0.001),
        "roc_auc": None,
    }
    out["roc_auc"] = roc_auc(y, p)
    return out


def roc_auc(y: Sequence[int], p: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None without both classes."""
    pos = sum(1 for v in y if v)
    neg = len(y) - pos
    if not pos or not neg:
        return None
    order = sorted(range(len(p)), key=lambda i: p[i])
    rank_sum = 0.0
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and p[order[j + 1]] == p[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1  # average 1-based rank of the tie group
        rank_sum += avg * sum(1 for k in order[i : j + 1] if y[k])
        i = j + 1
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)
