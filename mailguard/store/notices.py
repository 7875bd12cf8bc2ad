"""The DSNs mailguard writes itself, and where each one goes.

Two places write them: the Maildir store at acceptance (``delivered`` /
``expanded`` reports for local recipients that asked ``NOTIFY=SUCCESS``)
and the relay queue after an attempt (``failed`` and ``relayed``
reports).  Both use one L{Notifier}, built by the composition root
(L{mailguard.service}), so neither has to ask the other how to address a
notice; the reports themselves are built by the pure L{mailguard.store.dsn}.

A notice is an L{Envelope} from the null sender plus its bytes; whoever
asked stores it like received mail (L{mailguard.store.maildir.MaildirStore.inject}):
into the sender's Maildir, or into the queue for a remote sender.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

from mailguard.store import dsn
from mailguard.store.envelope import Envelope, new_message_id

__all__ = ["NULL_RETURN_PATH", "Notifier", "directory_router"]

log = Logger()

# A notice comes from the null sender (RFC 3464, RFC 5321 4.5.5): its final
# delivery records that, as received mail records its sender.  Stored once
# for every destination; the relay queue leaves it out when it forwards.
NULL_RETURN_PATH = b"Return-Path: <>\r\n"


def directory_router(directory, gateway=None) -> Callable:
    """Where a DSN to C{address} goes: (local mailboxes, addresses to relay),
    or None when nothing can take it (an unknown or disabled local user).
    A domain the gateway handles goes to the back-end, like its mail."""

    def route(address: str):
        domain = address.rpartition("@")[2]
        if not domain:
            return None
        if gateway is not None and gateway.handles(domain):
            return (), (address,)
        if directory is None or not directory.is_local_domain(domain):
            return (), (address,)
        result = directory.lookup(address)
        status = getattr(result.status, "name", str(result.status)).upper()
        if status == "KNOWN":
            return tuple(result.mailboxes), tuple(getattr(result, "forwards", ()) or ())
        if status == "NOT_LOCAL":
            return (), (address,)
        return None

    return route


class Notifier:
    """Builds delivery notifications and addresses them.

    @param hostname: C{InternetHostname}: the Reporting-MTA and the
        notice's From and Message-ID.
    @param clock: an C{IReactorTime}, for the report's dates.
    @param router: C{address -> (mailboxes, relay_addresses)} for a
        notice's recipient, or None when it cannot be delivered (an unknown
        local user: see L{directory_router}); by default everything is
        relayed.
    """

    def __init__(self, hostname: str, clock, router: Callable | None = None) -> None:
        self.hostname = hostname
        self.clock = clock
        self.router = router

    def envelope_to(self, to: str, body: str | None = None) -> Envelope | None:
        """The envelope of a notice to C{to}, or None when it goes nowhere
        (logged).  C{body} is the original's BODY parameter: an 8-bit
        original makes an 8-bit notice."""
        route = self.router(to) if self.router is not None else ((), (to,))
        if route is None:
            log.warn("delivery notification to <{to}> discarded: no such mailbox", to=to)
            return None
        mailboxes, relay = route
        if not mailboxes and not relay:
            return None
        params = {"BODY": "8BITMIME"} if (body or "").upper() == "8BITMIME" else {}
        return Envelope(mail_from="", mailboxes=tuple(mailboxes), relay_recipients=tuple(relay),
                        mail_params=params, message_id=new_message_id())

    def on_local_delivery(self, path: str, envelope: Envelope) -> list[tuple[Envelope, bytes]]:
        """Runs in the commit thread: success notices (NOTIFY=SUCCESS) for
        C{envelope}'s local recipients, as [(Envelope, bytes)], to be stored
        once the message itself is durable.  C{path} is the message."""
        relay = set(envelope.relay_recipients)
        mailboxes = {m.lower() for m in envelope.mailboxes}
        reports = []
        for address, params in (envelope.rcpt_params or {}).items():
            if address in relay:
                continue
            params = {k.upper(): v for k, v in (params or {}).items()}
            try:
                notify = dsn.parse_notify(params.get("NOTIFY"))
            except ValueError:
                continue
            if not dsn.wants(notify, "SUCCESS"):
                continue
            action = "delivered" if address.lower() in mailboxes else "expanded"
            reports.append(dsn.RecipientReport(address, action, "2.0.0", params.get("ORCPT")))
        if not reports:
            return []
        env = self.envelope_to(envelope.mail_from, envelope.mail_params.get("BODY"))
        if env is None:
            return []
        with open(path, "rb") as f:
            original = f.read()
        now = self.clock.seconds()
        data = dsn.build_report(hostname=self.hostname, to=envelope.mail_from, recipients=reports,
                                original=original, headers_only=True, now=now,
                                message_id=f"{env.message_id}@{self.hostname}",
                                envid=envelope.mail_params.get("ENVID"), arrival=now)
        return [(env, NULL_RETURN_PATH + data)]

    def about_entry(self, entry, reports: list[dsn.RecipientReport], headers_only: bool,
                    eml_path: str) -> tuple[Envelope, Callable[[], bytes]] | None:
        """A notice to the sender of the queue entry C{entry} (a
        L{mailguard.store.entries.QueueEntry}) about C{reports}: its
        envelope and a C{produce()} that reads the original at C{eml_path}
        and returns the notice's bytes (blocking: run it in a disk thread).
        None when the notice goes nowhere."""
        env = self.envelope_to(entry.sender, entry.body)
        if env is None:
            return None
        hostname, now = self.hostname, self.clock.seconds()

        def produce() -> bytes:
            with open(eml_path, "rb") as f:
                original = f.read()
            return NULL_RETURN_PATH + dsn.build_report(
                hostname=hostname, to=entry.sender, recipients=reports, original=original,
                headers_only=headers_only, now=now, message_id=f"{env.message_id}@{hostname}",
                envid=entry.envid, arrival=entry.arrival)

        return env, produce
