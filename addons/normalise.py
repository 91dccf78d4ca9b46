r"""The canonical text of one field's value: what the field model reads. A plain module.

Normalising undoes what attackers use to hide a payload from a filter but not from the application:

1. **characters**: unicode compatibility forms (NFKC: full-width `＜` is `<`), case (`SeLeCt` is `select`),
   invisible and zero-width characters removed (`SEL\u200bECT` is `select`), `+` a space in a query or form;
2. **escapes**, decoded until none is left, each layer's text folded as in 1 before the next: `%XX` (the bytes
   as UTF-8, overlong forms of ASCII as the character they spell, every other byte that is not UTF-8 kept as
   the latin-1 character of its value: never dropped), `%uXXXX`, `\uXXXX` and HTML character references;
3. **comments**: an SQL comment becomes one marker (`/**/`), a MySQL `/*!50000 ... */` its code, an HTML
   comment is split out; an unclosed comment is kept as text (nothing hides behind an unclosed `/*`);
4. **spaces**: NUL becomes `<nul>`, other control characters a space, whitespace runs one space.

    normalise("UN%2549ON/**/SEL%C3%89CT&#x20;1") == "union /**/ seléct 1"

Every step is linear in the length of the value, however the value is built: decoding runs in rounds (each
round decodes one layer, and shrinks the text or ends the decoding), and a value still changing after ROUNDS
rounds (an attacker's nesting: 8 MB of `%25252525...`) is decoded to the end in one linear pass (`_decode_deep`).
The result always encodes as UTF-8 (no lone surrogate) and holds no escape, so normalising it again changes
nothing. Nothing in here raises.
"""

from __future__ import annotations

import html.entities
import re
import unicodedata

from addons import fields  # registers the codec error handler fields.LOSSLESS

ROUNDS = 4  # layers decoded round by round; deeper nesting is decoded by _decode_deep

# Text that normalising would only lower-case: names, numbers, words, most paths.
_PLAIN = re.compile(r"[A-Za-z0-9_./,\-]*")
# Default-ignorable characters (zero width, joiners, bidi controls, variation selectors, tags, fillers, ...).
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_WS = re.compile(r"\s+")


def normalise(value: str, plus: bool = False) -> str:
    """The canonical, lower-case text of one field's value; `plus`: a `+` is a space (query and form values)."""
    if _PLAIN.fullmatch(value):  # the common case: the same result, faster
        return value.lower()
    return _normalise(value, plus)


def _normalise(value: str, plus: bool) -> str:
    text = _decode(_fold(value, plus), plus)
    text = _html_comments(_c_comments(text))
    text = _CTRL.sub(" ", text.replace("\x00", " <nul> "))
    return _WS.sub(" ", text).strip()


# --- 1. characters -----------------------------------------------------------------------------------


def _fold(text: str, plus: bool) -> str:
    """NFKC, case folded (NFKC again after it), invisible characters out, lone surrogates U+FFFD (and `+` a space
    if `plus`). Folding folded text changes nothing."""
    if text.isascii():
        text = text.lower()
    else:
        if _SURROGATE.search(text):  # from a JSON "\ud800": a pair becomes its character, a lone half U+FFFD
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        text = _INVISIBLE.sub("", text)  # before NFKC too: `e\u200b\u0301` composes once the space is gone
        text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).casefold()
        text = unicodedata.normalize("NFKC", text)  # case folding may undo a composition: `ẞ́` is `ss\u0301`, `sś`
    return text.replace("+", " ") if plus else text


# --- 2. escapes: one layer at a time ------------------------------------------------------------------


def _decode(text: str, plus: bool) -> str:
    """Decode escapes until none is left (`text` is folded)."""
    for _ in range(ROUNDS):
        decoded = _decode_once(text)
        if decoded == text:  # an escape is longer than what it spells: a round shrinks the text, or this is the end
            return text
        text = _fold(decoded, plus)
    return _fold(_decode_deep(text, plus), plus)  # still changing: nested on purpose; the rest in one linear pass


# `%uXXXX` and `\uXXXX` (JavaScript, JSON, IIS); a surrogate pair written as two escapes is one character.
_U_ESCAPE = re.compile(r"[%\\]u(?:(d[89ab][0-9a-f]{2})[%\\]u(d[c-f][0-9a-f]{2})|([0-9a-f]{4}))", re.I | re.A)
_PCT_RUN = re.compile(r"(?:%[0-9a-f]{2})+", re.I | re.A)  # consecutive %XX: one UTF-8 byte string
# HTML character references. Without `;` a reference ends at the first character that cannot continue it, but
# not at `%`, `&` or `\`: they may still decode into one that does (`&lt%3b` is `&lt;`).
_ENTITY = re.compile(
    r"&(?:#([0-9]+)(?:;|(?![0-9;%&\\]))"
    r"|#x([0-9a-f]+)(?:;|(?![0-9a-f;%&\\]))"
    r"|([0-9a-z]{1,32})(?:(;)|(?![0-9a-z;%&\\]|[^\x00-\x7f])))",
    re.I | re.A,
)


def _decode_once(text: str) -> str:
    """One layer: every escape in `text` decoded. Shorter than `text`, or `text` itself if it holds none."""
    if "%" in text or "\\" in text:
        text = _U_ESCAPE.sub(_u_char, text)
    if "%" in text:
        text = _PCT_RUN.sub(lambda m: _text_of_bytes(bytes.fromhex(m.group().replace("%", ""))), text)
    if "&" in text:
        text = _ENTITY.sub(_entity, text)
    return text


def _u_char(m: re.Match) -> str:
    high, low, one = m.groups()
    if high:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + int(low, 16) - 0xDC00)
    return _code_point(int(one, 16))


def _code_point(n: int) -> str:
    """The character of a code point; U+FFFD for a surrogate (never encodable alone), NUL or beyond Unicode."""
    return "\ufffd" if n == 0 or n > 0x10FFFF or 0xD800 <= n <= 0xDFFF else chr(n)


# Overlong UTF-8 forms of ASCII (%c0%af is `/` to IIS): two, three and four bytes.
_OVERLONG = re.compile(rb"[\xc0\xc1][\x80-\xbf]|\xe0[\x80\x81][\x80-\xbf]|\xf0\x80[\x80\x81][\x80-\xbf]")


def _overlong(m: re.Match) -> bytes:
    b = m.group()  # the payload bits of an ASCII character: 1 bit in the byte before the last, 6 in the last
    return bytes([(b[-2] & 1) << 6 | b[-1] & 0x3F])


def _text_of_bytes(b: bytes) -> str:
    """Percent-decoded bytes as text: UTF-8 (overlong forms of ASCII too), each other byte its latin-1 character."""
    if b.isascii():
        return b.decode("ascii")
    return _OVERLONG.sub(_overlong, b).decode("utf-8", fields.LOSSLESS)


def _entity_tables() -> tuple[dict[str, str], dict[str, str]]:
    """HTML's named references by lower-cased name: (with `;`, the legacy ones valid without it).
    The text is case folded before decoding, so `&LT;` and `&Tab;` are found; `&Lt;` (≪) never shadows `&lt;`."""
    named: dict[str, str] = {}
    legacy: dict[str, str] = {}
    for name, value in html.entities.html5.items():
        table, name = (named, name[:-1]) if name.endswith(";") else (legacy, name)
        if name.islower() or name.lower() not in table:
            table[name.lower()] = value
    return named, legacy


_NAMED, _LEGACY = _entity_tables()
# Numeric references to C1 code points mean windows-1252 (as browsers read them).
_CP1252 = {n: bytes([n]).decode("cp1252", "ignore") or chr(n) for n in range(0x80, 0xA0)}


def _charref(digits: str, base: int) -> str:
    digits = digits.lstrip("0")
    if len(digits) > 8:  # beyond Unicode whatever its digits (and never a huge int)
        return "\ufffd"
    n = int(digits or "0", base)
    return _CP1252.get(n) or _code_point(n)


def _entity(m: re.Match) -> str:
    dec, hexa, name, semicolon = m.groups()
    if dec is not None:
        return _charref(dec, 10)
    if hexa is not None:
        return _charref(hexa, 16)
    return (_NAMED if semicolon else _LEGACY).get(name.lower(), m.group())


# --- 2b. escapes: every layer in one pass -------------------------------------------------------------

_HEX = frozenset("0123456789abcdef")
_DIGIT = frozenset("0123456789")
_ALNUM = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")
_WAIT = frozenset("%&\\")  # may decode into a character that continues a reference: it does not end one
_STARTER = re.compile(r"[%&\\]")
_STRETCH = 16  # speed only: _decode_deep copies stretches of text this long or longer at once
_ASCII = tuple(chr(b).lower() for b in range(128))  # a decoded ASCII byte, folded
_ASCII_PLUS = tuple(" " if b == ord("+") else chr(b).lower() for b in range(128))


def _decode_deep(text: str, plus: bool) -> str:
    """Every escape in `text` (folded), and every escape decoding reveals, decoded in one left-to-right pass.

    `out` is the text decoded so far and holds no complete escape, so a character appended to it can only
    complete an escape that ends with that character: the end of `out` is checked once per character. What an
    escape spells is folded and read next, before the rest of `text` (it may complete an escape in turn). An
    escape is longer than what it spells and no folded character holds more than one `%`, `&` or `\\`, so the
    characters read are at most a constant times len(text): linear, however deep the nesting.

    The escapes are those of `_decode_once`. Percent-decoded bytes >= 0x80 wait in `run` for the rest of their
    UTF-8 sequence while what follows may still decode into one (`%`, `%X`); anything else ends the sequence.
    Knowing no layers, this pass may join what rounds keep apart (`%25C3%A9`: rounds read `%C3` a layer after
    `%A9`, `ã©`; this pass `é`); either way the result holds no escape.
    """
    out: list[str] = []
    todo: list[str] = []  # characters to read before the rest of `text`, the next one last
    run = bytearray()  # percent-decoded bytes >= 0x80, not yet text
    run_at = 0  # where they belong in `out`: out[run_at:] is the start ("%" or "%X") of an escape after them
    ascii_fold = _ASCII_PLUS if plus else _ASCII
    i, n = 0, len(text)
    skip_at = starter = 0  # speed only: where to try copying a stretch without `%`, `&`, `\`; where it ends

    def spell(value: str) -> None:  # what an escape spells is read next
        todo.extend(reversed(_fold(value, plus)))

    while True:
        if todo:
            c = todo.pop()
        elif i < n:
            if i >= skip_at and not run:  # speed only: copy a stretch that no escape can reach into
                if starter < i:
                    m = _STARTER.search(text, i)
                    starter = m.start() if m else n
                if starter - i >= _STRETCH and (not out or out[-1] not in _HEX) and _WAIT.isdisjoint(out[-33:]):
                    out += text[i:starter]
                    i = starter
                    continue
                skip_at = i + _STRETCH
            c = text[i]
            i += 1
        elif run:
            spell(_text_of_bytes(bytes(run)))
            run.clear()
            continue
        else:  # the end of the text ends a reference written without `;`
            found = _reference_before(out, "")
            if found is None:
                break
            del out[found[0] :]
            spell(found[1])
            continue

        if run:
            tail = len(out) - run_at
            if (tail == 0 and c == "%") or (tail == 1 and c in _HEX):
                out.append(c)
                continue
            if tail == 2 and c in _HEX:
                b = int(out[-1] + c, 16)
                del out[run_at:]
                if b >= 0x80:
                    run.append(b)
                    continue
                todo.append(ascii_fold[b])  # ASCII ends the sequence: it is read after the bytes before it
            else:  # anything else ends the sequence: the bytes become text, then what followed them is read again
                todo.append(c)
                todo.extend(reversed(out[run_at:]))
                del out[run_at:]
            spell(_text_of_bytes(bytes(run)))
            run.clear()
            continue

        if c in _HEX and len(out) >= 2:
            if out[-2] == "%" and out[-1] in _HEX:  # %XX
                b = int(out[-1] + c, 16)
                del out[-2:]
                if b >= 0x80:
                    run.append(b)
                    run_at = len(out)
                elif (c := ascii_fold[b]) in _WAIT:
                    out.append(c)  # what reading it next would do (speed: nested `%25`)
                else:
                    todo.append(c)
                continue
            if (len(out) >= 5 and out[-4] == "u" and out[-5] in ("%", "\\")
                    and out[-3] in _HEX and out[-2] in _HEX and out[-1] in _HEX):  # %uXXXX, \uXXXX
                v = int(out[-3] + out[-2] + out[-1] + c, 16)
                del out[-5:]
                if 0xDC00 <= v <= 0xDFFF and out and "\ud800" <= out[-1] <= "\udbff":  # the second half of a pair
                    spell(chr(0x10000 + ((ord(out.pop()) - 0xD800) << 10) + v - 0xDC00))
                elif 0xD800 <= v <= 0xDBFF:
                    todo.append(chr(v))  # unfolded: a first half waits for its second (else U+FFFD at the end)
                else:
                    spell(_code_point(v))
                continue
        if c in _WAIT:
            out.append(c)
            continue
        if out and (last := out[-1]) in _ALNUM and (
                c not in _ALNUM or (last in _DIGIT and c not in _DIGIT) or (last in _HEX and c not in _HEX)):
            found = _reference_before(out, c)  # c may end a reference: `;`, a character no name holds, a non-digit
            if found is not None:
                del out[found[0] :]
                if c != ";":
                    todo.append(c)
                spell(found[1])
                continue
        out.append(c)
    return _SURROGATE.sub("\ufffd", "".join(out))


def _reference_before(out: list[str], c: str) -> tuple[int, str] | None:
    """The HTML reference that `c` ("" for the end of the text) ends at the end of `out`: (its start, its text)."""
    end = len(out)
    if c not in _DIGIT:  # &#60
        k = end
        while k and out[k - 1] in _DIGIT:
            k -= 1
        if k < end and k >= 2 and out[k - 1] == "#" and out[k - 2] == "&":
            return k - 2, _charref("".join(out[k:]), 10)
    if c not in _HEX:  # &#x3c
        k = end
        while k and out[k - 1] in _HEX:
            k -= 1
        if k < end and k >= 3 and out[k - 1] == "x" and out[k - 2] == "#" and out[k - 3] == "&":
            return k - 3, _charref("".join(out[k:]), 16)
    if c == ";" or (c < "\x80" and c not in _ALNUM):  # &lt; &lt
        k = end
        while k > end - 33 and k and out[k - 1] in _ALNUM:
            k -= 1
        if k and out[k - 1] == "&" and end - k <= 32:
            value = (_NAMED if c == ";" else _LEGACY).get("".join(out[k:]))
            if value is not None:
                return k - 1, value
    return None


# --- 3. comments: one left-to-right scan each --------------------------------------------------------


def _c_comments(s: str) -> str:
    """`/* ... */` becomes ` /**/ `, MySQL's `/*!50000 code */` ` code `; an opener never closed stays text."""
    if "/*" not in s:
        return s
    last = s.rfind("*/")  # an opener is closed if a closer starts after it: known without scanning ahead
    out, i = [], 0
    while (j := s.find("/*", i)) != -1 and j + 2 <= last:
        k = s.find("*/", j + 2)
        body = s[j + 2 : k]
        if body.startswith("!"):  # MySQL runs it; a `/*` in it could only pair with a later `*/`: break it
            out += (s[i:j], " ", body[1:].lstrip("0123456789").replace("/*", "/ *"), " ")
        else:  # a comment acts as whitespace; the marker keeps the sign that one was there
            out += (s[i:j], " /**/ ")
        i = k + 2
    out.append(s[i:])
    return "".join(out)


def _html_comments(s: str) -> str:
    """`<!--x-->` becomes ` <!-- x --> ` (its text stays: `<scr<!--x-->ipt>`); an opener never closed stays text."""
    if "<!--" not in s:
        return s
    last = s.rfind("-->")
    out, i = [], 0
    while (j := s.find("<!--", i)) != -1 and j + 4 <= last:
        k = s.find("-->", j + 4)
        out += (s[i:j], " <!-- ", s[j + 4 : k], " --> ")
        i = k + 3
    out.append(s[i:])
    return "".join(out)
