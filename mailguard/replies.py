"""Every reply mailguard sends, as named data.

A reply is a basic code (RFC 5321), an enhanced status code (RFC 3463,
advertised as ENHANCEDSTATUSCODES per RFC 2034) and a text.  Tests compare
against these names, and ``tests/unit/test_replies.py`` checks that the class of
the basic code and of the enhanced code agree, so a typo cannot send
``250 5.1.1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Reply:
    code: int
    status: str
    text: str

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.status, text)

    def to_bytes(self, extra_lines: tuple[str, ...] = ()) -> bytes:
        """The reply on the wire; ``extra_lines`` follow the text as a
        multi-line reply (``250-...`` continuations)."""
        lines = [self.text, *extra_lines]
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            prefix = f"{self.code}{sep}"
            if self.status and i == 0:
                prefix += self.status + " "
            out.append(prefix + line)
        return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")

    @property
    def positive(self) -> bool:
        return self.code < 400

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}".replace("  ", " ")


# --- greeting / session ---------------------------------------------------
SERVICE_READY = Reply(220, "", "{host} ESMTP")
CLOSING = Reply(221, "2.0.0", "Bye")
EARLY_TALKER = Reply(554, "5.7.1", "Protocol violation: talked before the greeting")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session too long, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
# Per-address limits across connections (mailguard.policy.budgets)
TOO_MANY_ERRORS_FROM_IP = Reply(421, "4.7.0", "Too many errors from your address, try again later")
CONNECTION_RATE_LIMIT = Reply(421, "4.7.0", "Too many connections from your address, try again later")
MESSAGE_RATE_LIMIT = Reply(421, "4.7.0", "Too much mail from your address, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")

# --- generic ----------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK")
RESET_OK = Reply(250, "2.0.0", "Reset state")
NOOP_OK = Reply(250, "2.0.0", "OK")
HELO_OK = Reply(250, "", "{host}")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH ETRN")
LOCAL_ERROR = Reply(451, "4.3.0", "Requested action aborted: local error in processing")
STORAGE_ERROR = Reply(452, "4.3.1", "Insufficient system storage, try again later")

# --- syntax -------------------------------------------------------------
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_ADDRESS_SYNTAX = Reply(501, "5.1.3", "Bad address syntax")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_MAIL_BEFORE_DATA = Reply(503, "5.5.1", "Need MAIL before DATA")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
BAD_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
PARAMETER_NOT_IMPLEMENTED = Reply(504, "5.5.4", "Command parameter not implemented")

# --- MAIL / RCPT ------------------------------------------------------------
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
DISABLED_USER = Reply(550, "5.2.1", "Recipient mailbox disabled")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
RECIPIENT_TRY_LATER = Reply(450, "4.4.3", "Recipient verification unavailable, try again later")
# Gateway mode: the back-end could not be asked (refused, timed out, lost);
# RFC 3463 X.4.1 "No answer from host".  RECIPIENT_TRY_LATER is for a
# back-end that answered with a temporary failure.
BACKEND_NO_ANSWER = Reply(450, "4.4.1", "Recipient verification unavailable (no answer from the mail server), try again later")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by the authenticated user")

# --- DATA -------------------------------------------------------------------
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
MESSAGE_ACCEPTED = Reply(250, "2.0.0", "Message accepted for delivery")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LINE_ENDING = Reply(554, "5.6.0", "Bare CR or LF in message data is not allowed (RFC 5321 section 2.3.8)")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
NUL_IN_DATA = Reply(554, "5.6.0", "NUL characters in message data are not allowed (RFC 5322 section 2.3)")
# RFC 5321 6.3: a message with too many Received fields is in a mail loop;
# RFC 3463 X.4.6 "Routing loop detected" (as Postfix's hopcount_limit).
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (Received header fields): mail loop")

# --- VRFY / EXPN ------------------------------------------------------------
VRFY_DISABLED = Reply(502, "5.5.1", "VRFY command is disabled")
VRFY_WITHHELD = Reply(252, "2.1.5", "Verification not supported")
VRFY_KNOWN = Reply(250, "2.1.5", "<{address}>")
VRFY_UNKNOWN = Reply(550, "5.1.1", "User unknown")
VRFY_AMBIGUOUS = Reply(553, "5.1.4", "User ambiguous")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN command is disabled")

# --- AUTH / TLS -----------------------------------------------------------
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ABORTED = Reply(501, "5.0.0", "Authentication aborted")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_LOCKED_OUT = Reply(454, "4.7.0", "Too many authentication failures from your address, try again later")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
STARTTLS_PIPELINED = Reply(554, "5.5.1", "Commands pipelined after STARTTLS are refused")

# --- ETRN -------------------------------------------------------------------
ETRN_STARTED = Reply(250, "2.0.0", "Queuing started")
ETRN_NOT_AVAILABLE = Reply(458, "4.5.0", "Unable to queue messages for node: ETRN is for trusted clients")


@lru_cache(maxsize=64)
def hello_reply(hostname: str, extensions: tuple[str, ...] = ()) -> bytes:
    """The HELO (no C{extensions}) or EHLO reply, built once: a client that
    pipelines thousands of EHLOs costs a lookup each, not a new reply."""
    return HELO_OK.with_text(hostname).to_bytes(extensions)


def all_replies() -> dict[str, Reply]:
    """Every named reply of this module, for the meta-test."""
    return {k: v for k, v in globals().items() if isinstance(v, Reply)}
