"""In-memory fakes of mailguard's interfaces, for tests of mailguard and of
code built on it (in the manner of C{txacme.testing}).

Each fake implements its interface fully and passes the same contract tests
as the real implementation, so a test that uses a fake tests real
behaviour:

- L{FakeUserDirectory} (C{directory.py}): a directory from a mapping;
- L{make_context}, L{connect} and L{ClientSession} (C{session.py}): a
  server context wired by the production composition
  (L{mailguard.policy.build.build_policies}) on a C{task.Clock}, and a
  client session driven over a C{StringTransport};
- L{FakeSMTPBackend} (C{backend.py}): a scriptable next hop for the relay
  queue and the gateway; L{result_of} reads a fired Deferred.
"""

from mailguard.testing.backend import FakeSMTPBackend, FakeSMTPServer, Transaction, result_of
from mailguard.testing.directory import FakeUserDirectory
from mailguard.testing.session import (
    ClientSession,
    LogCapture,
    TLSStringTransport,
    b64,
    connect,
    make_context,
)

__all__ = ["ClientSession", "FakeSMTPBackend", "FakeSMTPServer", "FakeUserDirectory", "LogCapture",
           "TLSStringTransport", "Transaction", "b64", "connect", "make_context", "result_of"]
