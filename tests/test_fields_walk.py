"""The fast paths of addons/fields.py give the fields the plain ones give: the JSON walk against the
stack walk it replaced (kept here as the reference), and text_of against the lossless error handler."""

import json
import random

from addons import fields
from addons.fields import Field
from addons.fields import TooLarge


def reference_json(out: fields._Out, text: str, loc: str = "json", prefix: str = "", via: str = "", depth: int = 0) -> bool:
    """fields._json before its walk was inlined (commit 1a4218e): every field through out.add / out.value."""
    try:
        doc = json.loads(text, object_pairs_hook=fields._Obj, parse_int=fields._nothing, parse_float=fields._nothing,
                         parse_constant=fields._nothing)  # fmt: skip
    except RecursionError:
        raise TooLarge(413, "depth")
    except ValueError:
        return False
    stack: list = [(prefix, doc, depth + 1)]
    while stack:
        item = stack.pop()
        if len(item) == 2:
            out.add(loc, item[0], item[1], "name")
            continue
        path, node, depth = item
        if isinstance(node, str):
            out.value(loc, path, node, via)
            first = node[:1]
            if first in ("{", "[") or (first in " \t\r\n" and node.lstrip(" \t\r\n")[:1] in ("{", "[")):
                reference_json(out, node.strip(" \t\r\n"), "json", path, "json", depth - 1)
            if path.endswith("query") and (len(path) == 5 or path.endswith(".query")) and "{" in node:
                fields._graphql(out, loc, node)
            continue
        if depth > out.limits.depth:
            raise TooLarge(413, "depth")
        if isinstance(node, fields._Obj):
            for key, child in reversed(node):
                p = f"{path}.{key[:fields._LABEL]}" if path else key[:fields._LABEL]
                if isinstance(child, (str, list)):
                    stack.append((p, child, depth + 1))
                stack.append((p, key))
        elif isinstance(node, list):
            for i in range(len(node) - 1, -1, -1):
                child = node[i]
                if isinstance(child, (str, list)):
                    stack.append((f"{path}.{i}" if path else str(i), child, depth + 1))
    return True


LEAVES = ['"a"', '"YWRtaW4nLS0gLS0="', '"6e6f7420612068617368"', "1", "1e999", "NaN", "null", "true", '"\\ud800x"',
          '"\\u00e9t\\u00e9"', '"{\\"x\\":[\\"y\\",{\\"q\\":\\"1 OR 1=1\\"}]}"', '"query { a(b: \\"c\\") }"', '" [1, \\"in\\"]"',
          "9" * 5000, '"' + "x" * 300 + '"']  # fmt: skip
KEYS = ["k", "query", "id", "\\u00e9", "\\udc80", "a.b", "k"]  # "k" twice: duplicate keys are kept


def random_doc(rng: random.Random, depth: int = 0) -> str:
    k = rng.random()
    if depth > 7 or k < 0.3:
        return rng.choice(LEAVES)
    if k < 0.65:
        return "[" + ",".join(random_doc(rng, depth + 1) for _ in range(rng.randrange(5))) + "]"
    return "{" + ",".join(f'"{rng.choice(KEYS)}":{random_doc(rng, depth + 1)}' for _ in range(rng.randrange(5))) + "}"


def walk(impl, text: str, limits: fields.Limits):
    out = fields._Out(limits)
    try:
        return impl(out, text), list(out.fields)
    except TooLarge as e:
        return "too large", e.status, e.what


def test_the_json_walk_gives_the_reference_walks_fields_in_its_order_and_its_refusals():
    rng = random.Random(18)
    limits = (fields.Limits(), fields.Limits(fields=6), fields.Limits(depth=3), fields.Limits(depth=1))
    refused = 0
    for _ in range(800):
        text = random_doc(rng)
        for lim in limits:
            got = walk(fields._json, text, lim)
            assert got == walk(reference_json, text, lim), (text[:300], lim)
            refused += got[0] == "too large"
    assert 100 < refused < 3000  # both limits were reached, and not always


def test_the_json_walk_of_every_kind_of_node():
    text = '{"a": "x", "b": [1, "yy", {"c": null, "c": "ZHVwbGljYXRl"}], "query": "{ q(s: \\"v\\") }", "n": "[\\"in\\"]"}'
    got = walk(fields._json, text, fields.Limits())
    assert got == walk(reference_json, text, fields.Limits())
    ok, out = got
    assert ok and Field("json", "b.2.c", "c", "name") in out and Field("json", "b.2.c", "duplicate", "base64") in out
    assert Field("json", "n.0", "in", "json") in out and Field("json", "graphql.s", "v", "graphql") in out
    assert walk(fields._json, "not json", fields.Limits()) == (False, [])
    assert walk(fields._json, '"a top-level string"', fields.Limits()) == (True, [Field("json", "", "a top-level string", "")])


def test_text_of_is_the_lossless_decoding():
    rng = random.Random(7)
    alphabet = b"az\x00\x7f\x80\xbf\xc3\xa9\xed\xa0\x80\xf0\x9f\x98\x80\xe2\x82\xff"
    for n in range(4000):
        size = rng.randrange(0, 700)
        b = bytes(rng.randrange(256) for _ in range(size)) if n % 2 else bytes(rng.choice(alphabet) for _ in range(size))
        assert fields.text_of(b) == b.decode("utf-8", fields.LOSSLESS)
