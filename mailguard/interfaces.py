"""The seams of mailguard: interfaces only.

The ESMTP protocol (``mailguard.smtpd.protocol``) holds no policy of its own: it
gathers facts about the session (``mailguard.policy.session.Session``) and asks the
objects below.  Each has a real implementation and, where useful, an
in-memory fake in ``mailguard.testing``; ``tests/unit/test_interfaces.py`` runs
``verifyObject`` on every one of them.
"""

from zope.interface import Attribute, Interface


class IIPGroups(Interface):
    """Kerio IP address groups: named sets of addresses, ranges and prefixes."""

    def names():
        """The names of all defined groups (a frozenset of str)."""

    def contains(group, address):
        """True if C{address} (str or ipaddress object) is in C{group}.

        An unknown group contains nothing.  Must be O(log n) in the size of
        the group.
        """


class IUserDirectory(Interface):
    """Local domains, their users and aliases: what RCPT and VRFY consult."""

    def is_local_domain(domain):
        """True if C{domain} (str, any case) is one of ours, aliases included."""

    def lookup(address):
        """Resolve C{address} ("local@domain", any case).

        @return: a L{mailguard.policy.directory.Lookup} whose C{status} is one of
            KNOWN, UNKNOWN, DISABLED, NOT_LOCAL.
        """

    def domains():
        """The primary local domain names (a tuple of str)."""

    def __len__():
        """Number of user accounts."""


class IPasswordChecker(Interface):
    """Verifies the passwords of configured users (SMTP AUTH)."""

    def check_password(username, password):
        """The canonical "user@domain" if C{password} (str) is right for an
        enabled user C{username} (with or without domain), else None."""

    def plaintext_password(username):
        """The plain-text password of C{username} or None (for CRAM-MD5)."""

    def canonical(username):
        """The canonical "user@domain" of an enabled user C{username}, or None."""

    def has_plaintext_passwords():
        """True if any enabled user has a plain-text password."""


class ITrustPolicy(Interface):
    """SPEC "Trust": relay IP group, or SMTP AUTH."""

    def is_trusted(session):
        """True if C{session} (a L{mailguard.policy.session.Session}) is trusted."""


class IRecipientPolicy(Interface):
    """Decides RCPT TO: relay control, then the directory or the back-end."""

    def check_recipient(session, recipient):
        """Decide one recipient.

        @param session: L{mailguard.policy.session.Session}
        @param recipient: L{mailguard.policy.addresses.Mailbox}
        @return: a Deferred firing with a L{mailguard.policy.decide.RecipientVerdict}.
        """


class IRecipientGateway(Interface):
    """Gateway mode: recipients of the back-end's domains are verified by
    asking the back-end (VRFY, cached), never accepted to bounce later."""

    def handles(domain):
        """True if C{domain} is one of the back-end's domains."""

    def check(mailbox):
        """A Deferred that always fires with a
        L{mailguard.policy.decide.RecipientVerdict} (450 when the back-end cannot
        be asked)."""


class IVrfyPolicy(Interface):
    """Answers VRFY: only trusted clients learn anything."""

    def answer(session, argument):
        """A Deferred firing with the L{mailguard.replies.Reply} to send."""


class IGreetingPolicy(Interface):
    """Decides how a new connection is greeted (Kerio's spam repellent)."""

    def decide(session):
        """A L{mailguard.policy.greeting.GreetingDecision} for a new connection."""

    def is_exception(session):
        """True if the client is in the exceptions IP group (greeted at
        once, and exempt from the per-IP connection limit)."""

    def passed(session):
        """The client of C{session} waited out the delay and completed a
        mail transaction (feeds the optional pass cache)."""


class ISecurityLog(Interface):
    """Where detected attacks are written; never blocks the reactor."""

    def record(event, host, port, waited, first_bytes=b""):
        """Record one event (C{"early-talker"}, C{"gave-up"}, ...)."""

    def note(event, host, port, **fields):
        """Record one event with named fields (C{"auth-failed"},
        C{"connection-rate"}, ...); the values are escaped."""


class IIncomingMessage(Interface):
    """One message being received, written as it arrives."""

    def write(data):
        """Append message bytes (headers and body, CRLF line endings)."""

    def commit():
        """A Deferred that fires once the message is durably stored
        (file and directory fsynced) in every destination."""

    def abort():
        """Discard the message; nothing of it becomes visible."""


class IMessageStore(Interface):
    """Durable acceptance: Maildirs for local users, the relay queue."""

    def begin(envelope):
        """An L{IIncomingMessage} for C{envelope}
        (a L{mailguard.store.maildir.Envelope})."""


class IRelayQueue(Interface):
    """Messages waiting for their next hop."""

    running = Attribute("True while the queue runner is started.")

    def kick(domain=None):
        """Start a queue run now (ETRN), for one domain or all."""


class IRelayIntake(Interface):
    """Where the Maildir store hands a message's relayed recipients: the
    seam that keeps the store and the relay queue apart (the store calls
    it; the queue never calls the store)."""

    def add_file(path, envelope):
        """Runs in the store's commit thread: make the fsynced message file
        C{path} a queue entry for C{envelope.relay_recipients}.  Returns
        C{(entry, names created, directories to fsync before the 250)}; the
        store fsyncs the directories and takes the names back on failure."""

    def enqueued(entry):
        """In the reactor, once the entry is durable: schedule it."""
