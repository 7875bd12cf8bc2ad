"""The facts about one SMTP connection that every policy decides on.

A L{Session} is a frozen value: the SMTP state machine
(L{mailguard.smtpd.session}) holds the current one and replaces it after
HELO/EHLO, STARTTLS and AUTH, so the facts are kept in one place and never
"in step by hand".  The client address is normalised here, when the facts
are made, and nowhere else: an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``,
what a dual-stack socket reports) becomes the IPv4 address it is, and any
IPv6 address takes its canonical text, so trust, the greeting exemption,
the per-IP connection counters and the logs all see the same string.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["Session", "normalise_ip"]


def normalise_ip(text: str) -> str:
    """C{text} as an address's canonical text, IPv4-mapped folded to IPv4.

    Text without a colon (an IPv4 address as sockets report it, or no
    address at all) is returned as it is: the common case costs nothing.
    Text that is not an address is returned unchanged (policies then find
    it in no IP group)."""
    if ":" not in text:
        return text
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped if mapped is not None else ip)


@dataclass(frozen=True, slots=True)
class Session:
    """The facts about one SMTP connection that policies decide on.

    Evolve it with ``dataclasses.replace`` (after HELO, STARTTLS, AUTH).
    ``client_ip`` is the address the PROXY header carries behind a load
    balancer, normalised (see L{normalise_ip}).  Slots: a connection held
    in the greeting delay keeps one of these, and thousands are held.

    @ivar esmtp: the client said EHLO (not HELO): "ESMTP" in the
        Received header.
    """

    client_ip: str
    client_port: int
    listener: str  # "smtp", "smtps" or "submission"
    tls: bool = False
    authenticated: str | None = None  # the canonical user, after AUTH
    helo: str | None = None
    esmtp: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_ip", normalise_ip(self.client_ip))
