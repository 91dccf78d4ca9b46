"""The client's address: the connection's peer, or behind trusted proxies the hop they name. A plain module.

Used by addons/features.py (every request) and the operator CLI (allowlists, bans given as ranges).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence


def parse_networks(specs: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse IPs and CIDR ranges; raises ValueError naming the bad entry."""
    nets = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        try:
            nets.append(ipaddress.ip_network(spec, strict=False))
        except ValueError as e:
            raise ValueError(f"not an IP address or CIDR range: {spec!r}") from e
    return tuple(nets)


@functools.lru_cache(maxsize=4096)  # a peer sends many requests: parse its address once
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("["):  # [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)
def _peer_text(peer: str) -> str:
    """client_ip without trusted proxies: the peer's address as text (the peer itself if unparsable)."""
    addr = _ip(peer)
    return peer if addr is None else str(addr)


def _in(addr, nets) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


def _forwarded_for(value: str) -> list[str]:
    """The `for=` values of one Forwarded header line (RFC 7239), in order.

    Split on every "," and ";" whether quoted or not: a proxy's own entries hold neither (an IPv6 `for` is
    `"[v6]:port"`), and a quote-aware split would let a client's unclosed quote swallow the entries the
    proxies appended after it.
    """
    out = []
    for element in value.split(","):
        for pair in element.split(";"):
            key, _, val = pair.partition("=")
            if key.strip().lower() == "for":
                out.append(val)
    return out


HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def client_ip(peer: str, headers: Iterable[tuple[str, str]], trusted: Sequence = (), header: str = "auto") -> str:
    """The client's address: the connection's peer, unless the peer is a trusted proxy.

    From a trusted peer, one header names the hops, the one the trusted proxy writes:

    - `Forwarded` (RFC 7239) when the request has one: a proxy that writes Forwarded passes a client's own
      X-Forwarded-For through unchanged, so X-Forwarded-For is believed only without a Forwarded;
    - else `X-Forwarded-For`;
    - else `X-Real-IP` (a proxy sets it to the address it sees: one hop, no walk).

    `header` names the one to read instead of choosing ("forwarded", "x-forwarded-for", "x-real-ip"):
    behind a proxy that writes X-Forwarded-For but passes a client's Forwarded through, "auto" would
    believe the client. The hops (every line of the header, in order) are walked from the right, past
    trusted proxies: the rightmost untrusted hop is the client, since everything left of it was written by
    the client. Anything unparsable (`unknown`, an obfuscated name) stops the walk at the last trusted hop.
    The headers are never mixed.
    """
    if header != "auto" and header not in HEADERS:
        raise ValueError(f"header must be auto or one of {', '.join(HEADERS)}, not {header!r}")
    if not trusted:
        return _peer_text(peer)
    addr = _ip(peer)
    if addr is None:
        return peer
    if not _in(addr, trusted):
        return str(addr)
    hops: dict[str, list[str]] = {"forwarded": [], "x-forwarded-for": [], "x-real-ip": []}
    for name, value in headers:
        lname = name.lower()
        got = hops.get(lname)
        if got is not None:
            got.extend(_forwarded_for(value) if lname == "forwarded" else value.split(","))
    if header == "auto":
        chosen = hops["forwarded"] or hops["x-forwarded-for"] or hops["x-real-ip"][-1:]
    else:
        chosen = hops[header][-1:] if header == "x-real-ip" else hops[header]
    for hop in reversed(chosen):
        hop_addr = _ip(hop)
        if hop_addr is None:
            break
        addr = hop_addr
        if not _in(addr, trusted):
            break
    return str(addr)
