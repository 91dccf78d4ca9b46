"""addons/normalise.py: each decoding claim, the additions of issue 14, the properties, and linear work."""

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from addons import normalise as nm
from addons.normalise import normalise


def nested(text: str, layers: int) -> str:
    """`text` percent-encoded `layers` times (each layer encodes the `%` of the one below)."""
    for _ in range(layers):
        text = text.replace("%", "%25") if "%" in text else "".join(f"%{ord(c):02x}" for c in text)
    return text


# --- what the normaliser did before (ported from tests/test_featurize.py) ---


def test_percent_decoding_repeated():
    assert normalise("%2527") == "'"
    assert normalise("%252527") == "'"


def test_plus_is_space_only_in_forms():
    assert normalise("a+b", plus=True) == "a b"
    assert normalise("a+b") == "a+b"
    assert normalise("a%2bb", plus=True) == "a b"  # a decoded `+` too, as every layer is a form value


def test_percent_u_escapes():
    assert normalise("%u003Cscript%u003E") == "<script>"
    assert normalise("\\u003cscript\\u003e") == "<script>"
    assert normalise("%uD800x") == "\ufffdx"  # a lone surrogate becomes U+FFFD, never unencodable text
    assert normalise("%ud83d%ude00") == "\U0001f600"  # a pair is its character


def test_html_entities():
    assert normalise("&lt;img src=x onerror=alert(1)&gt;") == "<img src=x onerror=alert(1)>"
    assert normalise("&#x27;&#39;&apos;") == "'''"
    assert normalise("&#60a &#x3cg &lt x") == "<a <g < x"  # without `;`, where a browser reads them too


def test_nfkc_full_width():
    assert normalise("ＳＥＬＥＣＴ＜ｓｃｒｉｐｔ＞") == "select<script>"
    # NFKC can reveal an escape: a full-width percent sign followed by hex digits.
    assert normalise("％27") == "'"


def test_case_folded():
    assert normalise("UnIoN SeLeCt") == "union select"
    assert normalise("STRASSE") == normalise("straße")


def test_sql_comments_act_as_whitespace():
    assert normalise("UNION/**/SELECT") == "union /**/ select"
    assert normalise("union/*xyz*/select") == "union /**/ select"


def test_mysql_versioned_comments_keep_their_code():
    assert normalise("/*!50000UNION*/ /*!SELECT*/") == "union select"


def test_html_comments_split_out():
    assert normalise("<scr<!--x-->ipt>") == "<scr <!-- x --> ipt>"


def test_whitespace_runs_and_controls():
    assert normalise("  a \t\n\r  b\x0b\x01c  ") == "a b c"
    assert normalise("a\x00b") == "a <nul> b"
    assert normalise("a%00b") == "a <nul> b"


def test_plain_fast_path_matches_full_path():
    for s in ["abc", "ABC-def_1.2", "", "x" * 256]:
        assert normalise(s) == normalise(s + " ").strip() == s.lower()


@given(st.text(alphabet="aZ09_.-/,*%&+#;:<>!' \\u\u00e9\uff0f", max_size=80), st.booleans())
@settings(max_examples=300, deadline=None)
def test_the_plain_text_shortcut_changes_nothing(s, plus):
    # normalise() lower-cases text of letters, digits and _ . - / , without decoding it: the full path agrees.
    assert normalise(s, plus) == nm._normalise(s, plus)


# --- decoding until stable, with no round limit to outlast ---


@pytest.mark.parametrize("layers", [1, 2, nm.ROUNDS, nm.ROUNDS + 1, 30, 200])
def test_every_layer_is_decoded(layers):
    # Before, at most 4 rounds were decoded: a payload nested 5 times passed encoded.
    assert normalise(nested("' or 1=1--", layers)) == "' or 1=1--"


@pytest.mark.parametrize("value", [
    "%25" + "25" * 50 + "27",  # each round decodes only the first escape
    "%u0025" + "u0025" * 50 + "27",
    "\\u005c" + "u005c" * 50 + "u0027",
    "&amp;" + "amp;" * 50 + "#39;",
    "&#38;" + "#38;" * 50 + "#39;",
    "%26" + "amp;" * 50 + "apos;",
    "%" + "%32%35" * 3 + "27",  # an escape's digits come from other escapes
    "&lt%3b",  # `%3b` ends the reference once decoded
    "%ef%bc%85" + "27",  # the full-width `%` it spells, folded, starts an escape
    "&#6%30;",
])
def test_deep_nesting_of_every_kind(value):
    out = normalise(value)
    assert out in ("'", "<")
    assert out == nm._fold(nm._decode_deep(nm._fold(value, False), False), False)  # the one-pass decoder agrees


def test_no_folded_character_starts_two_escapes():
    # What _decode_deep's linear bound rests on: folding a character yields at most one `%`, `&` or `\`, and only
    # as the whole of its folded text (`％` is `%`), so decoding never multiplies the escapes to read.
    for cp in range(0x110000):
        folded = nm._fold(chr(cp), False)
        starts = sum(folded.count(c) for c in "%&\\")
        assert starts == 0 or folded in ("%", "&", "\\"), hex(cp)


def test_a_round_shrinks_the_text_or_ends():
    for value in ["%252527", "&amp;lt;", "%u0025u0027", "plain", "&notanentity;", "%zz"]:
        once = nm._decode_once(value)
        assert once == value or len(once) < len(value)


# --- invisible characters ---


@pytest.mark.parametrize("ch", [
    "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u2060", "\u2061", "\u2064", "\ufeff", "\u00ad", "\u180e",
    "\u202a", "\u202e", "\u2066", "\u2069", "\ufe0f", "\U000e0041", "\U000e007f", "\U000e0100", "\u034f", "\u3164",
])
def test_invisible_characters_are_removed(ch):
    assert normalise(f"SEL{ch}ECT") == "select"
    assert normalise("uni" + "".join(f"%{b:02x}" for b in ch.encode("utf-8")) + "on") == "union"  # percent-encoded too


def test_an_invisible_character_does_not_split_an_escape():
    assert normalise("%2\u200b7") == "'"
    assert normalise("&l\u200bt;") == "<"


# --- bytes that are not UTF-8 ---


def test_invalid_utf8_kept_byte_by_byte():
    # One bad byte never drops or garbles the rest: it becomes the latin-1 character of its value.
    assert normalise("%ff%27%20or%201=1") == "\u00ff' or 1=1"
    assert normalise("caf%e9") == "caf\u00e9"  # latin-1 text
    assert normalise("%C3%A9%ff") == "\u00e9\u00ff"  # UTF-8 around a bad byte stays UTF-8
    assert normalise("%e2%82%ac%e2%82x") == "\u20ac\u00e2 x"  # a cut-short sequence: each byte kept (\x82 a control)
    assert normalise("%ed%a0%80") == "\u00ed"  # an encoded surrogate is not UTF-8: \xed, \xa0 (a space), \x80


def test_overlong_utf8_spells_its_ascii_character():
    assert normalise("..%c0%af..%c0%afetc%c0%afpasswd") == "../../etc/passwd"
    assert normalise("%e0%80%af") == "/"
    assert normalise("%f0%80%80%af") == "/"
    assert normalise("%c1%9c") == "\\"
    assert normalise("%c0%a7%20or%201=1") == "' or 1=1"
    assert normalise("%c0%a527") == "'"  # an overlong `%` starts an escape


def test_result_is_always_encodable():
    for value in ["%uD800", "%uDC00%uD800", "\ud800", "a\udfffb", "%ed%a0%80", "&#xd800;", "\\ud83d\\ude00x"]:
        normalise(value).encode("utf-8")
    assert normalise("\ud83d\ude00") == "\U0001f600"  # a pair in the text (json.loads keeps them) is one character
    assert nm._decode_deep("&#5%ud83d", False) == "\x05\ufffd"  # a first half waiting for its second still ends `&#5`


# --- comments in one scan ---


def test_unclosed_comment_is_kept_as_text():
    assert normalise("union/*select") == "union/*select"
    assert normalise("x/**/y /*z") == "x /**/ y /*z"
    assert normalise("a<!--b") == "a<!--b"


def test_a_comment_closes_at_its_first_closer():
    assert normalise("a/*b*/c*/d") == "a /**/ c*/d"
    assert normalise("/*/ x */y") == "/**/ y"
    assert normalise("<!--a-->b-->") == "<!-- a --> b-->"


def test_mysql_code_cannot_open_a_comment_with_a_later_closer():
    out = normalise("/*!/*!x*/*/")
    assert normalise(out) == out


# --- properties ---

_PIECES = st.lists(st.sampled_from([
    "%25", "%2", "5", "27", "%c3", "%a9", "%ef%bc%85", "&amp;", "&lt", "&#", "&#x", "0", "3c", ";", "%u", "\\u", "00",
    "d83d", "de00", "&", "%", "\u0301", "\u200b", "%e0%80", "%af", "x", " ", "+", "/*", "*/", "plain words here",
    "a long stretch of text without any escape in it at all", "1234567890123456789012345678901234567890",
]), max_size=30).map("".join)
_ESCAPY = st.text(alphabet="%25&#;xu0\\a7ltampc3ef/*!<->+ \u200b\uff05\u00e9\ud800", max_size=40)


@given(st.one_of(_ESCAPY, _PIECES, st.text(max_size=60)), st.booleans())
@settings(max_examples=1500, deadline=None)
def test_normalising_twice_changes_nothing(s, plus):
    once = normalise(s, plus)
    assert normalise(once, plus) == once
    once.encode("utf-8")  # never a lone surrogate


@given(st.one_of(_ESCAPY, _PIECES, st.text(max_size=60)), st.booleans())
@settings(max_examples=1500, deadline=None)
def test_no_escape_is_left_whichever_decoder_ran(s, plus):
    # The rounds and the one-pass decoder both end at a text that holds no escape.
    for decoded in (nm._decode(nm._fold(s, plus), plus), nm._fold(nm._decode_deep(nm._fold(s, plus), plus), plus)):
        assert nm._decode_once(decoded) == decoded
        assert nm._fold(decoded, plus) == decoded
        decoded.encode("utf-8")


@given(st.text(alphabet="%25&#;x0a7ltamp\\u", min_size=1, max_size=30))
@settings(max_examples=1000, deadline=None)
def test_nesting_never_hides_what_one_layer_shows(s):
    # Encoding a value once more never changes what it normalises to.
    assert normalise(nested(s, 1)) == normalise(s)


@given(_PIECES, st.booleans())
@settings(max_examples=1000, deadline=None)
def test_copying_stretches_at_once_changes_nothing(s, plus):
    # _decode_deep copies text no escape can reach into in one go (speed): character by character is the same.
    folded = nm._fold(s, plus)
    fast = nm._decode_deep(folded, plus)
    stretch, nm._STRETCH = nm._STRETCH, 10**9
    try:
        assert nm._decode_deep(folded, plus) == fast
    finally:
        nm._STRETCH = stretch


@given(st.binary(max_size=200).map(lambda b: b.decode("latin-1")), st.booleans())
@settings(max_examples=500, deadline=None)
def test_never_raises(s, plus):
    assert isinstance(normalise(s, plus), str)


# --- linear work: sizes a quadratic normaliser would take hours on ---


def test_eight_megabytes_of_nested_percent_signs():
    value = "%25" + "25" * (4 * 2**20) + "27"  # 8 MB, 4 million layers
    assert normalise(value) == "'"


@pytest.mark.parametrize("value, expected", [
    ("/*a" * (2**20 // 3), "/*a" * (2**20 // 3)),  # 1 MB of unclosed comments: once 14 s for 64 KB
    ("<!--a" * (2**20 // 5), "<!--a" * (2**20 // 5)),
    ("&amp;" + "amp;" * 2**18 + "lt;", "<"),
    ("&#" + "0" * 2**20 + "39;", "'"),  # leading zeros: any number of them
    ("%u0025" + "u0025" * 2**18 + "27", "'"),
    ("&" * 2**20, "&" * 2**20),
    ("%" * 2**20, "%" * 2**20),
])
def test_megabyte_pathologies(value, expected):
    assert normalise(value) == expected
