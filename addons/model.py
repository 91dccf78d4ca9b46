"""Load, verify and apply the local model. A plain module: no mitmproxy import.

A model is two files in `models/`: `<name>.npz` (an `addons.fieldmodel.FieldModel`: plain arrays, read
with `allow_pickle=False`, so loading a model file never runs code) and `<name>.card.json` (its model
card: version, operating point, threshold, and the sha256 of the model file, checked on the very bytes
that are then loaded).

A model that loads is not yet trusted: `probe_check` scores the fixed probe set (`addons.probes`:
everyday requests and short classic attacks) with it, at its card's threshold, and says why it must not
serve: its scoring raises, it refuses too few attack probes or passes too few everyday ones, or (given
the serving model's check) it passes more attack probes the serving model refuses than a small slack.
The Scorer runs it at startup and before every hot swap.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from addons import fieldmodel
from addons import fields as fieldsmod
from addons import probes as probesmod

CARD_SUFFIX = ".card.json"
MODEL_SUFFIX = ".npz"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "openflare-local"
DEFAULT_THRESHOLD = 6
# probe_check's bounds: the shipped model refuses 100 % of the attack probes and passes 100 % of the
# everyday ones (at every threshold 6-9); tests/models.py's tiny attack model 97 % and 90 %; a model that
# calls everything benign refuses none. Slack: attack probes a hot-swapped model may newly pass.
PROBE_MIN_REFUSED = 70
PROBE_MIN_PASSED = 70
PROBE_SLACK = 10


class ModelError(Exception):
    """The model cannot be used: missing, unverifiable, or not loadable."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(name_or_path: str, models_dir: Path = MODELS_DIR) -> Path:
    """`openflare-local`, `models/openflare-local.npz` or an absolute path -> the .npz path."""
    p = Path(name_or_path)
    if p.suffix != MODEL_SUFFIX:
        p = p.with_name(p.name + MODEL_SUFFIX)
    if not p.is_absolute() and len(p.parts) == 1:
        p = models_dir / p
    return p


def card_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name[: -len(MODEL_SUFFIX)] + CARD_SUFFIX)


def proba_to_score(p: float, operating_point: float = 0.5) -> int:
    """Map an attack probability to a 1-10 score.

    The operating point (the probability chosen on held-out data, recorded in the card) lands on the
    boundary between 6 and 7: below it scores spread over 1-6, at or above it over 7-10. So the
    default threshold of 6 blocks exactly what the model card's operating point blocks.
    """
    if not math.isfinite(p):
        return 10
    p = min(max(p, 0.0), 1.0)
    op = min(max(operating_point, 1e-6), 1 - 1e-6)
    if p < op:
        return 1 + min(5, int(6 * p / op))
    return 7 + min(3, int(4 * (p - op) / (1 - op)))


@dataclass
class LocalModel:
    fields: fieldmodel.FieldModel
    card: dict
    path: Path
    version: str = field(init=False)
    operating_point: float = field(init=False)

    def __post_init__(self) -> None:
        self.version = str(self.card.get("version", "unknown"))
        self.operating_point = float(self.card.get("operating_point", 0.5))

    def score(self, req: fieldsmod.Request) -> tuple[int, float, fieldmodel.Hit]:
        """Score one request's fields: (1-10 score, attack probability, what decided it)."""
        hit = self.fields.score(req)
        return proba_to_score(hit.p, self.operating_point), hit.p, hit

    def score_request(self, method: str, target: str, headers, body: bytes,
                      limits: fieldsmod.Limits = fieldsmod.Limits()) -> tuple[int, float, fieldmodel.Hit]:
        """`score` of a raw request, as the addons see it: one beyond the inspection limits scores 10
        (the proxy refuses it with 413/431, never passes it uninspected)."""
        try:
            req = fieldsmod.extract(method, target, headers, body, limits)
        except fieldsmod.TooLarge as e:
            return 10, 1.0, fieldmodel.Hit(1.0, signal=f"too large: {e.what}")
        return self.score(req)

    def proba(self, requests) -> list[float]:
        """The attack probability of each of these `fields.Request`s."""
        return [self.fields.score(r).p for r in requests]


def card_threshold(card: dict) -> int:
    """The threshold the card calibrated (1-9), else the default 6."""
    th = card.get("threshold")
    return th if isinstance(th, int) and not isinstance(th, bool) and 1 <= th <= 9 else DEFAULT_THRESHOLD


_PROBES: tuple[probesmod.Probe, ...] | None = None


def probe_set() -> tuple[probesmod.Probe, ...]:
    """`addons.probes.probes()`, built once (at worst twice, by two threads at once: the same tuple)."""
    global _PROBES
    if _PROBES is None:
        _PROBES = tuple(probesmod.probes())
    return _PROBES


@dataclass
class ProbeCheck:
    """What a model did on the probe set (`probe_set()` order) at its card's threshold, and why it may not serve."""

    threshold: int
    scores: list[int] | None  # None: scoring raised
    reasons: list[str]
    ms: float
    attacks: int = 0
    attacks_refused: int = 0
    benign: int = 0
    benign_passed: int = 0

    @property
    def ok(self) -> bool:
        return not self.reasons

    def summary(self) -> str:
        if self.scores is None:
            return f"scoring raised ({self.ms:.0f} ms)"
        return (f"{self.attacks_refused}/{self.attacks} attack probes refused, {self.benign_passed}/{self.benign} "
                f"everyday probes passed at threshold {self.threshold}, {self.ms:.0f} ms")


def probe_check(lm: LocalModel, min_refused: int = PROBE_MIN_REFUSED, min_passed: int = PROBE_MIN_PASSED,
                serving: ProbeCheck | None = None, slack: int = PROBE_SLACK) -> ProbeCheck:
    """Score every probe with `lm`; `reasons` is empty when it may serve.

    Absolute (always): no probe's scoring raises, at least `min_refused` % of the attack probes are
    refused and at least `min_passed` % of the everyday probes pass. Relative (given `serving`, the
    check of the model serving now): it passes at most `slack` attack probes the serving model refuses.
    Each model is judged at its own card's threshold: an operator's pinned threshold is theirs to choose.
    """
    start = time.perf_counter()
    threshold = card_threshold(lm.card)
    ps = probe_set()
    scores = []
    for p in ps:
        try:
            scores.append(int(probesmod.score(lm, p)))
        except Exception as e:  # noqa: BLE001 - any failure: the model cannot serve
            ms = (time.perf_counter() - start) * 1000
            return ProbeCheck(threshold, None, [f"scoring raised {type(e).__name__}: {str(e)[:160]} on probe {p.name[:120]}"], ms)
    ms = (time.perf_counter() - start) * 1000
    attacks = [i for i, p in enumerate(ps) if p.kind == probesmod.ATTACK]
    refused = sum(scores[i] > threshold for i in attacks)
    benign = len(ps) - len(attacks)
    passed = sum(s <= threshold for p, s in zip(ps, scores) if p.kind == probesmod.BENIGN)
    reasons = []
    if refused * 100 < min_refused * len(attacks):
        reasons.append(f"refuses {refused} of {len(attacks)} attack probes (at least {min_refused} % needed)")
    if passed * 100 < min_passed * benign:
        reasons.append(f"passes {passed} of {benign} everyday probes (at least {min_passed} % needed)")
    if serving is not None and serving.scores is not None:
        lost = [ps[i].name for i in attacks if serving.scores[i] > serving.threshold and scores[i] <= threshold]
        if len(lost) > slack:
            reasons.append(f"passes {len(lost)} attack probes the serving model refuses (at most {slack}), "
                           f"e.g. {lost[0][:120]}")
    return ProbeCheck(threshold, scores, reasons, ms, len(attacks), refused, benign, passed)


def check_card(card: dict, where: Path) -> None:
    """A card whose numbers would make the scorer refuse everything or nothing is refused at load."""
    op = card.get("operating_point", 0.5)
    if isinstance(op, bool) or not isinstance(op, (int, float)) or not math.isfinite(op) or not 0 < op < 1:
        raise ModelError(f"model card {where}: operating_point must be a number strictly between 0 and 1, not {op!r}")
    th = card.get("threshold")
    if th is not None and (isinstance(th, bool) or not isinstance(th, int) or not 1 <= th <= 9):
        raise ModelError(f"model card {where}: threshold must be an integer from 1 to 9, not {th!r}")


def read_card(model_path: Path) -> dict:
    cpath = card_path(model_path)
    try:
        card = json.loads(cpath.read_text())
    except FileNotFoundError as e:
        raise ModelError(f"model card not found: {cpath}") from e
    except (OSError, ValueError) as e:
        raise ModelError(f"model card unreadable: {cpath}: {e}") from e
    if not isinstance(card, dict) or not isinstance(card.get("sha256"), str):
        raise ModelError(f"model card {cpath} has no sha256 field")
    return card


def load(name_or_path: str, models_dir: Path = MODELS_DIR) -> LocalModel:
    """Read the model file once, check its sha256 against the card, then load those bytes. Raises ModelError."""
    path = resolve(name_or_path, models_dir)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    card = read_card(path)
    check_card(card, card_path(path))
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != card["sha256"].lower():
        raise ModelError(
            f"model {path} does not match its card: sha256 {actual}, card says {card['sha256']}. "
            "Retrain it or restore the matching card."
        )
    try:
        fm = fieldmodel.FieldModel.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - a truncated, foreign or pickled file is a model error
        raise ModelError(f"model {path} could not be loaded: {e}") from e
    return LocalModel(fm, card, path)


def write_card(model_path: Path, card: dict) -> Path:
    """Write the card next to the model, with the model file's sha256."""
    card = dict(card, sha256=sha256_file(model_path))
    cpath = card_path(model_path)
    cpath.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return cpath


# --- watching the model's directory (the Scorer's hot reload) ---

# inotify events that can mean a new model file or card: written in place, moved in (os.replace), created,
# deleted, moved away, metadata changed (touch).
_IN_EVENTS = 0x008 | 0x080 | 0x100 | 0x200 | 0x040 | 0x004  # CLOSE_WRITE MOVED_TO CREATE DELETE MOVED_FROM ATTRIB
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000


class DirWatch:
    """inotify on one directory (Linux, through libc; no dependency): `fd` becomes readable when a name in
    it changes, and costs nothing until then. `DirWatch.open(dir)` is None where inotify is unavailable
    (another OS, no libc, the watch limit reached): the caller polls instead."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, directory: Path) -> DirWatch | None:
        import ctypes
        import ctypes.util
        import os

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, os.fsencode(str(directory)), _IN_EVENTS) < 0:
            os.close(fd)
            return None
        return cls(fd)

    def drain(self) -> int:
        """Read the pending events away; how many bytes (0: none)."""
        import os

        n = 0
        while True:
            try:
                got = os.read(self.fd, 65536)
            except BlockingIOError:
                return n
            except OSError:
                return n
            if not got:
                return n
            n += len(got)

    def close(self) -> None:
        import os

        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
