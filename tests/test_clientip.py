"""addons/clientip.py: the client address behind trusted proxies (Forwarded, X-Forwarded-For, X-Real-IP).

The spoofing cases through the real FeatureExtractor and IpBans are in tests/test_bans.py.
"""

import pytest

from addons import clientip

TRUSTED = clientip.parse_networks(["10.0.0.0/8", "2001:db8:ffff::/48"])
PROXY = "10.0.0.1"  # the trusted proxy in front of OpenFlare


def ip(headers, peer=PROXY, trusted=TRUSTED, header="auto"):
    return clientip.client_ip(peer, headers, trusted, header)


def test_without_trusted_proxies_only_the_peer_counts():
    assert clientip.client_ip("203.0.113.7", [("X-Forwarded-For", "192.0.2.1")]) == "203.0.113.7"
    assert clientip.client_ip("::ffff:203.0.113.7", [("Forwarded", "for=192.0.2.1")]) == "203.0.113.7"


def test_an_untrusted_peer_is_the_client_whatever_it_sends():
    headers = [("Forwarded", "for=192.0.2.1"), ("X-Forwarded-For", "192.0.2.2"), ("X-Real-IP", "192.0.2.3")]
    assert ip(headers, peer="203.0.113.7") == "203.0.113.7"


def test_forwarded_from_a_trusted_proxy_beats_the_clients_own_x_forwarded_for():
    """The proxy appended for=198.51.100.9 to Forwarded; the client sent X-Forwarded-For itself."""
    headers = [("X-Forwarded-For", "192.0.2.66"), ("Forwarded", "for=198.51.100.9;proto=https")]
    assert ip(headers) == "198.51.100.9"
    assert ip(headers[::-1]) == "198.51.100.9"  # header order does not matter


def test_x_forwarded_for_without_forwarded():
    assert ip([("X-Forwarded-For", "192.0.2.66, 198.51.100.9")]) == "198.51.100.9"


def test_x_real_ip_only_when_neither_other_header_is_there():
    assert ip([("X-Real-IP", "198.51.100.9")]) == "198.51.100.9"
    assert ip([("X-Real-IP", "192.0.2.66"), ("X-Forwarded-For", "198.51.100.9")]) == "198.51.100.9"
    assert ip([("X-Real-IP", "192.0.2.66"), ("Forwarded", "for=198.51.100.9")]) == "198.51.100.9"
    assert ip([("X-Real-IP", "192.0.2.66"), ("X-Real-IP", "198.51.100.9")]) == "198.51.100.9"  # the last line


def test_no_header_from_a_trusted_proxy_is_the_proxy():
    assert ip([("User-Agent", "x")]) == PROXY


@pytest.mark.parametrize(
    "headers, client",
    [
        # The client's own entries are on the left: the rightmost untrusted hop is the client.
        ([("X-Forwarded-For", "192.0.2.66, 198.51.100.9, 10.0.0.7")], "198.51.100.9"),
        ([("X-Forwarded-For", "192.0.2.66"), ("X-Forwarded-For", "198.51.100.9, 10.0.0.7")], "198.51.100.9"),
        ([("Forwarded", "for=192.0.2.66, for=198.51.100.9"), ("Forwarded", "for=10.0.0.7;by=10.0.0.1")], "198.51.100.9"),
        ([("Forwarded", 'for="[2001:db8:cafe::17]:4711", for="[2001:db8:ffff::1]"')], "2001:db8:cafe::17"),
        ([("Forwarded", 'FOR="198.51.100.9:47011"')], "198.51.100.9"),
        ([("X-Forwarded-For", "::ffff:198.51.100.9")], "198.51.100.9"),
        ([("X-Forwarded-For", "10.0.0.8, 10.0.0.7")], "10.0.0.8"),  # every hop trusted: the leftmost
    ],
)
def test_hops_are_walked_from_the_right_past_trusted_proxies(headers, client):
    assert ip(headers) == client


def test_an_unparsable_hop_stops_the_walk_at_the_last_trusted_one():
    assert ip([("Forwarded", "for=unknown, for=10.0.0.7")]) == "10.0.0.7"
    assert ip([("X-Forwarded-For", "garbage, 198.51.100.9")]) == "198.51.100.9"  # never reached


def test_a_clients_unclosed_quote_does_not_swallow_the_proxys_entry():
    """A quote-aware split would read `for="192.0.2.66, for=198.51.100.9` as one (unparsable) value."""
    assert ip([("Forwarded", 'for="192.0.2.66, for=198.51.100.9')]) == "198.51.100.9"
    assert ip([("Forwarded", 'for="192.0.2.66;x="a,b", for=198.51.100.9')]) == "198.51.100.9"


def test_header_option_names_the_one_header_to_read():
    """Behind a proxy that writes X-Forwarded-For and passes a client's Forwarded through."""
    headers = [("Forwarded", "for=192.0.2.66"), ("X-Forwarded-For", "198.51.100.9"), ("X-Real-IP", "198.51.100.10")]
    assert ip(headers) == "192.0.2.66"  # auto believes Forwarded
    assert ip(headers, header="x-forwarded-for") == "198.51.100.9"
    assert ip(headers, header="x-real-ip") == "198.51.100.10"
    assert ip(headers, header="forwarded") == "192.0.2.66"
    assert ip([("Forwarded", "for=192.0.2.66")], header="x-forwarded-for") == PROXY  # never falls back
    with pytest.raises(ValueError, match="header must be"):
        ip(headers, header="x-client-ip")
