"""Queue entries as values: what a ``.env`` file holds, what one delivery
attempt came to, and what that means for each recipient.

Plain data and pure functions (no reactor, no disk), so the rules that
decide a message's fate -- 5xx fails at once, 4xx and lost connections are
retried with a doubling back-off -- are tested as tables.  The files live
in L{mailguard.store.queuedir}; the queue that schedules attempts is
L{mailguard.store.queue}.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from mailguard.store import dsn
from mailguard.store.envelope import Envelope

__all__ = [
    "FAILED",
    "PENDING",
    "SENT",
    "Outcome",
    "QueueEntry",
    "Recipient",
    "backoff",
    "classify",
    "domain_matcher",
]

PENDING, SENT, FAILED = "pending", "sent", "failed"

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


@dataclass
class Recipient:
    address: str
    notify: list[str] | None = None  # parsed NOTIFY; None: not given
    orcpt: str | None = None  # raw ORCPT ("rfc822;xtext")
    state: str = PENDING
    status: str = ""  # enhanced status of the last result
    diagnostic: str = ""  # "smtp; 451 4.3.0 ..." or "X-mailguard; ..."

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass
class QueueEntry:
    id: str
    sender: str  # "" for the null sender (a DSN): never bounced
    recipients: list[Recipient]
    arrival: float
    size: int = 0
    envid: str | None = None  # raw ENVID (xtext)
    ret: str | None = None  # "FULL", "HDRS" or None
    body: str | None = None  # "8BITMIME", "7BIT" or None
    client_ip: str = ""
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    held: bool = False  # put on hold (``queue hold``): never tried until released
    # Runtime state, not stored.
    in_flight: bool = field(default=False, repr=False)
    queued: bool = field(default=False, repr=False)

    _RUNTIME = ("in_flight", "queued")

    @classmethod
    def from_envelope(cls, envelope: Envelope, arrival: float, size: int) -> "QueueEntry":
        """The entry for C{envelope}'s relayed recipients, with the DSN
        parameters the session accepted (checked there, so a value that
        does not parse here is dropped rather than refused)."""
        mp = {k.upper(): v for k, v in (envelope.mail_params or {}).items()}
        rcpts = []
        for address in dict.fromkeys(envelope.relay_recipients):
            params = {k.upper(): v for k, v in (envelope.rcpt_params.get(address) or {}).items()}
            try:
                notify = dsn.parse_notify(params.get("NOTIFY"))
            except ValueError:
                notify = None
            rcpts.append(Recipient(address, None if notify is None else list(notify), params.get("ORCPT")))
        return cls(
            id=envelope.message_id,
            sender=envelope.mail_from,
            recipients=rcpts,
            arrival=arrival,
            size=size,
            envid=mp.get("ENVID"),
            ret=(mp.get("RET") or "").upper() or None,
            body=(mp.get("BODY") or "").upper() or None,
            client_ip=envelope.client_ip,
        )

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def to_json(self) -> bytes:
        data = asdict(self)
        for k in self._RUNTIME:
            data.pop(k, None)
        data["version"] = 1
        return json.dumps(data, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> "QueueEntry":
        data = json.loads(raw)
        data.pop("version", None)
        rcpts = [Recipient(**{k: v for k, v in r.items() if k in Recipient.__dataclass_fields__})
                 for r in data.pop("recipients")]
        known = {k: v for k, v in data.items()
                 if k in cls.__dataclass_fields__ and k not in cls._RUNTIME}
        return cls(recipients=rcpts, **known)


@dataclass
class Outcome:
    """What one delivery attempt of one entry came to."""

    error: str | None = None  # connection-level (temporary) failure
    mail: tuple[int, str] | None = None
    rcpts: dict = field(default_factory=dict)  # address -> (code, text)
    data: tuple[int, str] | None = None  # the reply to the end of DATA
    dsn: bool = False  # the next hop took our DSN parameters
    remote: str | None = None
    missing: bool = False  # the message file is gone (removed from the spool)


def _status_of(code: int, text: str) -> str:
    """The enhanced status code of a reply (from its text, or by class)."""
    m = _ENHANCED.match(text)
    if m and m.group(1) == str(code)[0]:
        return ".".join(m.groups())
    return f"{str(code)[0]}.0.0" if 200 <= code < 600 else "4.0.0"


def _smtp_diag(code: int, text: str) -> str:
    return f"smtp; {code} {' '.join(text.split())}"


def classify(outcome: Outcome, address: str) -> tuple[str, str, str]:
    """(SENT | FAILED | PENDING, enhanced status, diagnostic) for one
    recipient of an attempt: 5xx is permanent, 4xx and lost connections
    temporary."""
    if outcome.mail is not None and outcome.mail[0] >= 300:
        code, text = outcome.mail
        return (FAILED if code >= 500 else PENDING), _status_of(code, text), _smtp_diag(code, text)
    rcpt = outcome.rcpts.get(address)
    if rcpt is not None and rcpt[0] >= 300:
        code, text = rcpt
        return (FAILED if code >= 500 else PENDING), _status_of(code, text), _smtp_diag(code, text)
    if rcpt is not None and outcome.data is not None:
        code, text = outcome.data
        if code < 300:
            return SENT, _status_of(code, text), _smtp_diag(code, text)
        return (FAILED if code >= 500 else PENDING), _status_of(code, text), _smtp_diag(code, text)
    return PENDING, "4.4.1", f"X-mailguard; {outcome.error or 'delivery not completed'}"


def domain_matcher(domain: str | None):
    """A test on a recipient's domain, for ETRN and ``queue flush``:
    C{domain} ("@domain": that domain and its subdomains; None or empty:
    every domain)."""
    subdomains = False
    if domain:
        domain = domain.lower().rstrip(".")
        if domain.startswith("@"):
            subdomains, domain = True, domain[1:]
    if not domain:
        return lambda d: True
    return lambda d: d == domain or (subdomains and d.endswith("." + domain))


def backoff(attempts: int, retry_min: float, retry_max: float) -> float:
    """Seconds to wait after the C{attempts}-th failed attempt."""
    return min(retry_min * (2 ** max(attempts - 1, 0)), retry_max)
