"""Load, verify and apply the local model. A plain module: no mitmproxy import.

A model is two files in `models/`: `<name>.joblib` (a scikit-learn estimator with `predict_proba`
over feature strings from `addons.featurize`) and `<name>.card.json` (its model card). The card
records the sha256 of the joblib file; it is checked before unpickling, because a joblib file is code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_SUFFIX = ".card.json"
MODEL_SUFFIX = ".joblib"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "openflare-local"


class ModelError(Exception):
    """The model cannot be used: missing, unverifiable, or not loadable."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(name_or_path: str, models_dir: Path = MODELS_DIR) -> Path:
    """`openflare-local`, `models/openflare-local.joblib` or an absolute path -> the .joblib path."""
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
    estimator: Any
    card: dict
    path: Path
    version: str = field(init=False)
    operating_point: float = field(init=False)
    attack_column: int = field(init=False)
    _fast: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.version = str(self.card.get("version", "unknown"))
        self.operating_point = float(self.card.get("operating_point", 0.5))
        # The predict_proba column of the attack class: label 1 (or True, or "attack"), else the last.
        classes = list(getattr(self.estimator, "classes_", [0, 1]))
        self.attack_column = next(
            (i for i, c in enumerate(classes) if (c == "attack" if isinstance(c, str) else c == 1)),
            len(classes) - 1,
        )
        self._fast = contextlib.nullcontext
        if hasattr(self.estimator, "proba_one"):
            return  # addons.detector.Detector: no scikit-learn at prediction (not even imported: a smaller heap)
        try:
            import sklearn

            # scikit-learn re-validates parameters and checks arrays for NaN on every call: for one
            # short text that is a sizeable part of the time, and our inputs are always valid.
            self._fast = lambda: sklearn.config_context(assume_finite=True, skip_parameter_validation=True)
        except ImportError:
            pass

    def proba(self, features: list[str]) -> list[float]:
        with self._fast():
            return [float(x) for x in self.estimator.predict_proba(features)[:, self.attack_column]]

    def score(self, features: str) -> tuple[int, float]:
        """Score one feature string: (1-10 score, attack probability)."""
        one = getattr(self.estimator, "proba_one", None)  # addons.detector.Detector: no batch machinery
        p = float(one(features)) if one is not None else self.proba([features])[0]
        return proba_to_score(p, self.operating_point), p


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
    """Verify the model file against its card's sha256, then unpickle it. Raises ModelError."""
    path = resolve(name_or_path, models_dir)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    card = read_card(path)
    actual = sha256_file(path)
    if actual != card["sha256"].lower():
        raise ModelError(
            f"model {path} does not match its card: sha256 {actual}, card says {card['sha256']}. "
            "Refusing to unpickle it (a joblib file is code); retrain it or restore the matching card."
        )
    import joblib  # deferred: importing scikit-learn costs time only when a model is loaded

    try:
        estimator = joblib.load(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a model error
        raise ModelError(f"model {path} could not be loaded: {e}") from e
    if not hasattr(estimator, "predict_proba"):
        raise ModelError(f"model {path} has no predict_proba")
    try:
        return LocalModel(estimator, card, path)
    except (TypeError, ValueError) as e:
        raise ModelError(f"model card {card_path(path)} is invalid: {e}") from e


def write_card(model_path: Path, card: dict) -> Path:
    """Write the card next to the model, with the model file's sha256."""
    card = dict(card, sha256=sha256_file(model_path))
    cpath = card_path(model_path)
    cpath.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return cpath
