"""The session rules: small decisions the SMTP state machine asks for.

Plain functions of the session facts and of configured values, answering
with values, so each is tested as a table (``tests/unit/policy/test_rules.py``)
and the protocol decides nothing by reading a reply code back.  A refusal
says itself whether it counts against the session's error budget
(``SmtpMaxErrors``): a client's mistake does, a refusal of something the
client may legitimately try (a message too big, ETRN from an outsider)
does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from mailguard import replies
from mailguard.policy.addresses import parse_vrfy_argument
from mailguard.policy.session import Session
from mailguard.replies import Reply

__all__ = [
    "Refusal",
    "auth_mechanisms",
    "connection_limit_exempt",
    "counts_as_error",
    "ehlo_keywords",
    "etrn_refusal",
    "help_commands",
    "hops_refusal",
    "mail_parameters",
    "mail_refusal",
    "rcpt_parameters",
    "sender_login_refusal",
    "vrfy_budgeted",
    "vrfy_refusal",
]


@dataclass(frozen=True)
class Refusal:
    """A command refused: the reply, and whether it counts as an error."""

    reply: Reply
    error: bool = True


def auth_mechanisms(session: Session, passwords, *, cram_md5: bool = False) -> list[str]:
    """The SASL mechanisms to offer now.  PLAIN and LOGIN send the password
    itself, so only under TLS (STARTTLS done, or the smtps listener).
    CRAM-MD5 only where it is turned on (C{cram_md5}:
    ``SmtpAuthCramMd5Enabled``, off by default) and some enabled user has a
    plain-text password: Postfix's SASL client and Twisted's
    ``ESMTPSenderFactory`` pick CRAM-MD5 whenever it is offered and do not
    fall back, so offering it to users with a hashed password locks them
    out.  None at all without a password checker."""
    if passwords is None:
        return []
    mechs = []
    if cram_md5 and passwords.has_plaintext_passwords():
        mechs.append("CRAM-MD5")
    if session.tls:
        mechs += ["PLAIN", "LOGIN"]
    return mechs


def ehlo_keywords(session: Session, *, mechanisms: list[str], max_size: int, starttls: bool,
                  vrfy: bool, etrn: bool, dsn: bool) -> list[str]:
    """The EHLO keywords, in the order of the Kerio server in the seed;
    each only where it works (AUTH until authenticated, STARTTLS until
    TLS is on)."""
    ext = []
    if mechanisms and not session.authenticated:
        ext.append("AUTH " + " ".join(mechanisms))
    ext.append(f"SIZE {max_size}")
    if starttls and not session.tls:
        ext.append("STARTTLS")
    if vrfy:
        ext.append("VRFY")
    ext += ["ENHANCEDSTATUSCODES", "8BITMIME", "PIPELINING"]
    if etrn:
        ext.append("ETRN")
    if dsn:
        ext.append("DSN")
    ext.append("HELP")
    return ext


def help_commands(session: Session, *, mechanisms: list[str], starttls: bool, vrfy: bool,
                  etrn: bool) -> list[str]:
    """What HELP lists: the commands this session can use now (not a fixed
    list: VRFY, STARTTLS, AUTH and ETRN only where they work)."""
    names = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP"]
    if vrfy:
        names.append("VRFY")
    if starttls and not session.tls:
        names.append("STARTTLS")
    if mechanisms and not session.authenticated:
        names.append("AUTH")
    if etrn:
        names.append("ETRN")
    return names


def mail_refusal(session: Session) -> Refusal | None:
    """Why MAIL may not start a transaction, or None.  The submission
    listener (RFC 6409) takes mail only from authenticated users."""
    if session.listener == "submission" and not session.authenticated:
        return Refusal(replies.AUTH_REQUIRED)
    return None


DSNCheck = Callable[[str, "str | None"], "str | None"]


def mail_parameters(params: Mapping[str, str | None], *, max_size: int,
                    dsn: DSNCheck | None) -> Refusal | None:
    """The first MAIL FROM parameter refused, or None.

    A malformed value is a client error (``501``); a declared SIZE over
    the limit (``552``, RFC 1870; ``SIZE 0`` is no limit) and a parameter
    we do not support (``555``) are answers to a legitimate request.

    @param dsn: where DSN is offered, the syntax check of its RET and ENVID
        (C{mailguard.store.dsn.check_mail_parameter}: why a value is
        refused, or None); None where it is not."""
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit():
                return Refusal(replies.SYNTAX_ERROR.with_text("SIZE requires a number"))
            if 0 < max_size < int(value):
                return Refusal(replies.MESSAGE_TOO_BIG, error=False)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return Refusal(replies.BAD_PARAMETER.with_text("BODY must be 7BIT or 8BITMIME"), error=False)
        elif key == "AUTH":  # RFC 4954 5: accepted, the value is not trusted
            pass
        elif key in ("RET", "ENVID") and dsn is not None:  # RFC 3461; kept in the envelope
            why = dsn(key, value)
            if why is not None:
                return Refusal(replies.SYNTAX_ERROR.with_text(why))
        else:
            return Refusal(replies.BAD_PARAMETER.with_text(f"Unsupported MAIL parameter {key}"), error=False)
    return None


def rcpt_parameters(params: Mapping[str, str | None], *, dsn: DSNCheck | None) -> Refusal | None:
    """The first RCPT TO parameter refused, or None: only DSN's NOTIFY and
    ORCPT (RFC 3461; kept per recipient), and only where DSN is offered
    (C{dsn}: C{mailguard.store.dsn.check_rcpt_parameter}).  Every refusal
    here counts as an error (as Postfix counts them)."""
    for key, value in params.items():
        if not (dsn is not None and key in ("NOTIFY", "ORCPT")):
            return Refusal(replies.BAD_PARAMETER.with_text(f"Unsupported RCPT parameter {key}"))
        why = dsn(key, value)
        if why is not None:
            return Refusal(replies.SYNTAX_ERROR.with_text(why))
    return None


def vrfy_budgeted(session: Session, *, enabled: bool, trust) -> bool:
    """Whether this VRFY uses one of the session's VRFY budget
    (``SmtpVrfyLimit``, then ``421``): an untrusted client asking while VRFY
    is enabled, so that it cannot mine the ``252`` answers or keep the
    session busy.  Trusted gateways ask without limit; with VRFY disabled
    every VRFY is an error already."""
    return enabled and not trust.is_trusted(session)


def hops_refusal(received: int, limit: int) -> Refusal | None:
    """A mail loop (RFC 5321 6.3): the message arrived with C{received}
    ``Received:`` fields, and the one this server adds would take it past
    C{limit} (``SmtpHopCountLimit``, default 50 as Postfix's
    ``hopcount_limit``; 0: no limit).  ``554 5.4.6``, refused at the final
    dot; not a client error (the client may not know it relays a loop)."""
    if limit and received >= limit:
        return Refusal(replies.TOO_MANY_HOPS, error=False)
    return None


def vrfy_refusal(enabled: bool, argument: str) -> Refusal | None:
    """VRFY answered without looking anyone up, the same for every client:
    disabled (``502 5.5.1``), or an empty or unparseable argument
    (``501 5.5.4``).  Both are client errors; answers about users are not."""
    if not enabled:
        return Refusal(replies.VRFY_DISABLED)
    if parse_vrfy_argument(argument) is None:
        return Refusal(replies.SYNTAX_ERROR)
    return None


def etrn_refusal(session: Session, trust) -> Refusal | None:
    """Only trusted clients may start a queue run (RFC 1985): a run ends
    the queue's back-off, so an outsider could hammer the relay host and
    the disk.  ``458 4.5.0``, not an error: the command was well-formed."""
    if not trust.is_trusted(session):
        return Refusal(replies.ETRN_NOT_AVAILABLE, error=False)
    return None


def connection_limit_exempt(session: Session, greeting, trust) -> bool:
    """The per-IP connection limit (``SmtpMaxConnectionsPerIp``) does not
    apply to the greeting-delay exceptions group nor to trusted clients,
    as Postfix exempts ``$mynetworks`` from its per-client limits: a
    gateway or a NATed office legitimately opens many connections.  The
    exceptions group is the greeting policy's own definition."""
    return bool(greeting.is_exception(session)) or bool(trust.is_trusted(session))


def counts_as_error(reply: Reply) -> bool:
    """Whether a refused recipient counts against the error budgets (as
    Postfix counts every rejected RCPT): a permanent refusal (``550`` unknown
    or disabled user, ``554`` relay denied) is what a harvester collects; a
    temporary one (a gateway back-end that cannot answer) is not the
    client's doing."""
    return reply.code >= 500


def sender_login_refusal(session: Session, sender: str | None, *, enabled: bool, directory,
                         trust) -> Refusal | None:
    """An authenticated user may send only as themselves (Postfix's
    ``reject_sender_login_mismatch``): ``MAIL FROM`` must be an address the
    directory delivers to that user's mailbox -- the account, its alias
    names, the same in an alias domain, or an alias that delivers to the
    user.  The null sender (bounces) is allowed.  ``553 5.7.1`` otherwise.

    Not applied with C{enabled} off (``SmtpSenderLoginMatch=0``), before
    AUTH, or to a client trusted by its address (the relay IP group): such
    a client relays for others, as it did before it logged in.
    """
    user = session.authenticated
    if not enabled or not user or not sender:
        return None
    if trust.is_trusted(replace(session, authenticated=None)):
        return None
    found = directory.lookup(sender)
    status = getattr(found.status, "name", found.status)
    if str(status).upper() == "KNOWN" and user.lower() in (m.lower() for m in found.mailboxes):
        return None
    return Refusal(replies.SENDER_NOT_OWNED)
