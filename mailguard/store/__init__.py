"""Durable storage: Maildirs, the relay queue, its SMTP client and DSNs.

One concept per module, dependencies pointing down this list::

    envelope.py     the envelope the session hands over (leaf)
    dsn.py          DSN parameters and RFC 3464 reports, pure (leaf)
    durable.py      fsync, durable mkdir, group commit, disk runners (leaf)
    ownership.py    the spool given to the run-time user, checked as it
    entries.py      queue entries, attempt outcomes, classify, back-off
    notices.py      the DSNs mailguard writes and where each goes
    queuedir.py     the queue's files: add, rewrite, remove, recover
    relayclient.py  the ESMTP client that delivers entries to the next hop
    queue.py        the relay queue service: scheduling, retries, bounces
    maildir.py      durable acceptance into Maildirs (and the queue)

``maildir.py`` and ``queue.py`` never import each other: the store hands
relayed recipients to the queue through L{mailguard.interfaces.IRelayIntake},
and the queue stores its DSNs through a callable; L{mailguard.service}
wires the two and calls their start-up step (C{open()}).
"""
