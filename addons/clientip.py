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


def client_ip(peer: str, headers: Iterable[tuple[str, str]], trusted: Sequence = ()) -> str:
    """The client's address: the connection's peer, unless the peer is a trusted proxy.

    From a trusted peer, X-Forwarded-For (or, when there is none, Forwarded `for=`) is walked from
    the right, skipping trusted hops; the first untrusted hop is the client. Anything unparsable
    stops the walk. The two headers are never mixed: a proxy that sets one passes the other through
    from the client unchanged, so mixing them would let a client choose its address.
    """
    if not trusted:
        return _peer_text(peer)
    addr = _ip(peer)
    if addr is None:
        return peer
    if not _in(addr, trusted):
        return str(addr)
    xff: list[str] = []
    fwd: list[str] = []
    for name, value in headers:
        lname = name.lower()
        if lname == "x-forwarded-for":
            xff.extend(value.split(","))
        elif lname == "forwarded":
            for element in value.split(","):
                for pair in element.split(";"):
                    key, _, val = pair.strip().partition("=")
                    if key.strip().lower() == "for":
                        fwd.append(val)
    hops = xff or fwd
    for hop in reversed(hops):
        hop_addr = _ip(hop)
        if hop_addr is None:
            break
        addr = hop_addr
        if not _in(addr, trusted):
            break
    return str(addr)
