"""The shipped model (models/openflare-local.npz) on everyday requests and attacks, and field-model units."""

import shutil

import pytest

from addons import fieldmodel
from addons import fields
from addons import model
from addons import probes

UA = [("User-Agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36")]
JSON = UA + [("Content-Type", "application/json")]
FORM = UA + [("Content-Type", "application/x-www-form-urlencoded")]

# Everyday requests that a naive WAF blocks: SQL words in prose, apostrophes in names, JSON APIs, "<3".
BENIGN = [
    ("GET", "/search?q=select+a+size", UA, b""),
    ("GET", "/search?q=how+to+select+the+best+running+shoes", UA, b""),
    ("GET", "/search?q=union+square+hotels", UA, b""),
    ("GET", "/search?q=european+union+news", UA, b""),
    ("GET", "/search?q=drop+shipping+suppliers", UA, b""),
    ("GET", "/products?category=drop-down+menu&page=2", UA, b""),
    ("GET", "/users?name=O%27Brien", UA, b""),
    ("GET", "/users?last_name=O'Neil&first_name=Sin%C3%A9ad", UA, b""),
    ("POST", "/signup", FORM, b"name=Patrick+O%27Brien&email=pat%40example.com&city=Dublin"),
    ("POST", "/api/v1/orders", JSON, b'{"customer": "Mary O\'Brien", "items": [{"sku": "A-1", "qty": 2}], "gift": false}'),
    ("PUT", "/api/v1/users/42", JSON, b'{"name": "Ann", "bio": "I love drop shipping and union jobs", "age": 31}'),
    ("GET", "/api/v1/items?limit=20&offset=40&sort=-created", UA, b""),
    ("GET", "/search?q=%3C3", UA, b""),
    ("GET", "/search?q=i+%3C3+this+shop", UA, b""),
    ("POST", "/comments", FORM, b"comment=great+service+%3C3+will+order+again&post=17"),
    ("GET", "/", UA, b""),
    ("GET", "/static/css/site.css?v=3", UA, b""),
]

ATTACKS = [
    ("GET", "/search?q=1%27+union+select+username,password+from+users--", UA, b""),
    ("GET", "/search?q=%3Cscript%3Ealert(document.cookie)%3C/script%3E", UA, b""),
    ("GET", "/download?file=../../../../etc/passwd", UA, b""),
    ("GET", "/login?user=admin%27+or+%271%27=%271", UA, b""),
    ("GET", "/ping?host=127.0.0.1;cat+/etc/passwd", UA, b""),
    ("GET", "/", [("User-Agent", "<script>alert(1)</script>")], b""),
    ("GET", "/", [("User-Agent", "' or 1=1 --")], b""),
]


@pytest.fixture(scope="module")
def shipped():
    return model.load(model.DEFAULT_MODEL)


# ---- tests/probes.py: everyday requests and short attacks under many header sets --------------------

ALL_HEADERS = {**probes.DEV_HEADERS, **probes.HELDOUT_HEADERS}
# Probes the shipped model still blocks under some header set: (method, target) -> why. Strict: a
# model that passes them must move them back among the plain probes.
KNOWN_FALSE_POSITIVES: dict[tuple[str, str], str] = {}


def _probe_params(items):
    out = []
    for method, target, extra, body in items:
        why = KNOWN_FALSE_POSITIVES.get((method, target))
        marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
        out.append(pytest.param(method, target, extra, body, marks=marks, id=f"{method} {target}"[:80]))
    return out


@pytest.mark.parametrize("method, target, extra, body", _probe_params(probes.DEV_BENIGN + probes.HELDOUT_BENIGN))
def test_everyday_probe_not_blocked_under_any_header_set(shipped, method, target, extra, body):
    scores = {name: shipped.score_request(method, target, h + extra, body)[0] for name, h in ALL_HEADERS.items()}
    assert max(scores.values()) <= 6, scores


@pytest.mark.parametrize("method, target, extra, body", _probe_params(probes.ATTACKS))
def test_attack_probe_blocked_under_every_header_set(shipped, method, target, extra, body):
    scores = {name: shipped.score_request(method, target, h + extra, body)[0] for name, h in ALL_HEADERS.items()}
    assert min(scores.values()) > 6, scores


@pytest.mark.parametrize("method, target, headers, body", probes.HEADER_ATTACKS)
def test_header_attack_probe_blocked(shipped, method, target, headers, body):
    assert shipped.score_request(method, target, headers, body)[0] > 6


@pytest.mark.parametrize("method, target, headers, body", BENIGN)
def test_benign_words_are_not_blocked(shipped, method, target, headers, body):
    score, p, _ = shipped.score_request(method, target, headers, body)
    assert score <= 6, (target, body, score, p)


@pytest.mark.parametrize("method, target, headers, body", ATTACKS)
def test_plain_attacks_are_blocked(shipped, method, target, headers, body):
    score, p, _ = shipped.score_request(method, target, headers, body)
    assert score > 6, (target, headers, score, p)


def test_header_set_barely_moves_a_score(shipped):
    """A request's fields are scored one by one: which browser sent it moves its score by at most one point."""
    moved = {}
    for method, target, extra, body in probes.DEV_BENIGN + probes.ATTACKS:
        scores = [shipped.score_request(method, target, h + extra, body)[0] for h in ALL_HEADERS.values()]
        if max(scores) - min(scores) > 1:
            moved[target] = scores
    assert moved == {}


def test_shipped_card(shipped):
    card = shipped.card
    assert isinstance(shipped.fields, fieldmodel.FieldModel)
    assert 0 < card["operating_point"] < 1 and card["threshold"] == 6
    assert card["sha256"] == model.sha256_file(shipped.path)
    assert {"version", "format", "data_sources", "train_counts", "metrics_validation"} <= set(card)
    assert shipped.path.stat().st_size <= 50 * 1024 * 1024
    probs = shipped.proba([fields.extract(*BENIGN[1]), fields.extract(*ATTACKS[0])])
    assert probs[0] < shipped.operating_point <= probs[1]


def test_load_refuses_a_tampered_model(tmp_path, shipped):
    path = tmp_path / "m.npz"
    shutil.copy(shipped.path, path)
    shutil.copy(model.card_path(shipped.path), model.card_path(path))
    assert model.load(str(path)).version == shipped.version
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(model.ModelError, match="does not match its card"):
        model.load(str(path))
    model.card_path(path).unlink()
    with pytest.raises(model.ModelError, match="model card not found"):
        model.load(str(path))
