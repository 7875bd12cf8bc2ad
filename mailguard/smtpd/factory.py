"""The ESMTP factory: one per listener, all pointing at one context.

Each listener has its own ``MailguardFactory`` (it knows which listener it
is: the greeting delay applies only to ``smtp``); what the sessions of all
listeners share is the L{ServerContext} (L{mailguard.smtpd.context}).
"""

from __future__ import annotations

from twisted.mail import smtp

from mailguard.smtpd.context import Connections, ServerContext
from mailguard.smtpd.protocol import MailguardESMTP

__all__ = ["Connections", "MailguardFactory", "ServerContext"]


class MailguardFactory(smtp.SMTPFactory):
    """Builds a L{MailguardESMTP} per connection of one listener."""

    protocol = MailguardESMTP
    noisy = False

    def __init__(self, context: ServerContext, listener: str = "smtp") -> None:
        if listener not in ("smtp", "smtps", "submission"):
            raise ValueError(f"unknown listener kind {listener!r}")
        self.context = context
        self.listener = listener

    def buildProtocol(self, addr):
        return self.protocol(self)
