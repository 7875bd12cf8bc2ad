"""A real Twisted SMTP client, run as its own process by the interop tests:
``ESMTPSenderFactory`` with ``requireAuthentication=True`` and
``requireTransportSecurity=True``, as an application using twisted.mail
would send.  It chooses its SASL mechanism itself from what EHLO offers
(twisted.mail tries CRAM-MD5, then LOGIN, then PLAIN, and does not fall
back after a failure).

    python -m tests.e2e.twisted_sender PORT (starttls|smtps) CA USER PASSWORD FROM TO

Binds 127.0.0.3 (an untrusted source).  Prints ``sent`` and exits 0, or
prints the failure and exits 1.
"""

from __future__ import annotations

import io
import sys

from twisted.internet import defer, endpoints, ssl, task
from twisted.mail.smtp import ESMTPSenderFactory


async def send(reactor, port: int, mode: str, ca: str, user: str, password: str, sender: str, to: str) -> None:
    with open(ca, "rb") as f:
        trust = ssl.Certificate.loadPEM(f.read())
    tls = ssl.optionsForClientTLS("mx.example.com", trustRoot=trust)
    # twisted.mail's client turns every LF into CRLF itself: the message
    # is given with LF line ends (CRLF would go out as a bare CR).
    message = io.BytesIO(f"From: <{sender}>\nTo: <{to}>\nSubject: twisted {mode} {user}\n\n"
                         "sent by ESMTPSenderFactory\n".encode())
    done = defer.Deferred()
    factory = ESMTPSenderFactory(user.encode(), password.encode(), sender, to, message, done,
                                 retries=0, contextFactory=tls, heloFallback=False,
                                 requireAuthentication=True, requireTransportSecurity=True)
    factory.domain = b"twisted.client.test"
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=20,
                                            bindAddress=("127.0.0.3", 0))
    if mode == "smtps":
        endpoint = endpoints.wrapClientTLS(tls, endpoint)
    await endpoint.connect(factory)
    await done


def main(reactor, *argv: str):
    port, mode, ca, user, password, sender, to = argv
    d = defer.ensureDeferred(send(reactor, int(port), mode, ca, user, password, sender, to))

    def ok(_):
        print("sent", flush=True)

    def failed(f):
        print(f"failed: {f.type.__name__}: {f.getErrorMessage()}", flush=True)
        raise SystemExit(1)

    return d.addCallbacks(ok, failed)


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
