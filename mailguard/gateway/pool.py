"""Gateway mode's connection pool: up to N persistent L{VrfyClient}s to the
back-end, so a RCPT decision costs one round trip, not a connection.

Lookups wait for a free connection, new connections are opened on demand,
a lost one is replaced, a lookup cut off by a lost connection is retried
once, every lookup has a deadline.  After a failed connect the back-end is
held down for a moment, and lookups fail at once instead of each trying
to connect.  The endpoint and the clock are constructor arguments: tests
use the in-memory back-end of L{mailguard.testing} and a C{task.Clock}.
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer, protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailguard.gateway.client import BackendUnavailable, VrfyClient, as_unavailable
from mailguard.logs import emit

__all__ = ["BackendPool"]

log = Logger()


class _ClientFactory(protocol.Factory):
    noisy = False

    def __init__(self, pool: "BackendPool") -> None:
        self.pool = pool

    def buildProtocol(self, addr):
        p = VrfyClient(self.pool.clock, self.pool.timeout, self.pool.idle_timeout, self.pool.helo)
        p.factory = self
        return p


class _Job:
    __slots__ = ("address", "d", "retries", "timer")

    def __init__(self, address: str, d: defer.Deferred) -> None:
        self.address = address
        self.d = d
        self.retries = 1
        self.timer = None


class BackendPool:
    """Up to C{size} persistent L{VrfyClient} connections to one back-end.

    @param endpoint: an C{IStreamClientEndpoint} to the back-end (with the
        source address bound, if configured).
    @param clock: an C{IReactorTime}.
    @param timeout: seconds for a connection to be ready (connect, greeting,
        EHLO), for each reply, and for each lookup from start to answer.
    @param idle_timeout: seconds after which an unused connection says QUIT.
    @param helo: the name to send in EHLO.
    @param retry_interval: after a failed connect, seconds during which
        lookups fail at once (when no connection is left) instead of each
        trying to connect again.
    @param name: the back-end as the log names it (C{host:port}).
    """

    def __init__(self, endpoint, clock, *, size: int = 4, timeout: float = 10.0,
                 idle_timeout: float = 60.0, helo: str = "localhost",
                 retry_interval: float = 1.0, name: str = "") -> None:
        if size < 1:
            raise ValueError("a pool needs at least one connection")
        self.endpoint = endpoint
        self.clock = clock
        self.size = size
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.helo = helo
        self.retry_interval = retry_interval
        self.name = name or "(back-end)"
        self._clients: list[VrfyClient] = []
        self._free: list[VrfyClient] = []  # a stack: the warmest first
        self._connecting: set[defer.Deferred] = set()
        self._waiting: deque[_Job] = deque()
        self._down_until = 0.0
        self._down_reason = ""
        self._down = False
        self._closed = False
        self.connects = 0  # successful connections so far
        self.connect_failures = 0
        self.lookups = 0

    @property
    def connections(self) -> int:
        """Connections open now (ready)."""
        return len(self._clients)

    # -- lookups -------------------------------------------------------------------
    def lookup(self, address: str) -> defer.Deferred:
        """Ask the back-end about C{address}: a Deferred firing with a
        L{BackendAnswer} or failing with L{BackendUnavailable}."""
        self.lookups += 1
        job = _Job(address, defer.Deferred())
        if self._closed:
            job.d.errback(BackendUnavailable("gateway stopping"))
            return job.d
        job.timer = self.clock.callLater(self.timeout, self._expire, job)
        self._submit(job)
        return job.d

    def _submit(self, job: _Job) -> None:
        client = self._take_free()
        if client is not None:
            self._run(client, job)
            return
        self._waiting.append(job)
        self._grow()

    def _take_free(self) -> VrfyClient | None:
        while self._free:
            client = self._free.pop()
            if client.usable:
                return client
        return None

    def _run(self, client: VrfyClient, job: _Job) -> None:
        d = client.verify(job.address)
        d.addBoth(self._finished, client, job)

    def _finished(self, result, client: VrfyClient, job: _Job) -> None:
        if client.usable:
            self._free.append(client)
        if isinstance(result, Failure) and result.check(BackendUnavailable) \
                and result.value.retry and job.retries > 0 and not job.d.called:
            job.retries -= 1
            self._submit(job)
        else:
            self._resolve(job, result)
        self._pump()

    def _resolve(self, job: _Job, result) -> None:
        if job.timer is not None:
            if job.timer.active():
                job.timer.cancel()
            job.timer = None
        if job.d.called:
            return  # expired already; a late answer is dropped
        if isinstance(result, Failure):
            if not result.check(BackendUnavailable):
                log.failure("unexpected error asking the back-end", result)
                result = Failure(BackendUnavailable("internal error"))
            job.d.errback(result)
        else:
            job.d.callback(result)

    def _expire(self, job: _Job) -> None:
        job.timer = None
        try:
            self._waiting.remove(job)
        except ValueError:
            pass
        if not job.d.called:
            job.d.errback(BackendUnavailable(f"no answer from the back-end within {self.timeout:g} s"))

    def _pump(self) -> None:
        while self._waiting:
            client = self._take_free()
            if client is None:
                break
            self._run(client, self._waiting.popleft())
        self._grow()

    # -- connections -----------------------------------------------------------------
    def _grow(self) -> None:
        """Open connections for waiting lookups, up to C{size} (a connection
        on its way out, saying QUIT or after a 421, does not count)."""
        while (not self._closed and len(self._waiting) > len(self._connecting)
               and sum(1 for c in self._clients if not c.closing) + len(self._connecting) < self.size):
            if self.clock.seconds() < self._down_until:
                if not self._clients and not self._connecting:
                    self._fail_waiting(self._down_reason)
                return
            self._connect()

    def _connect(self) -> None:
        d = self.endpoint.connect(_ClientFactory(self))
        d.addCallback(lambda client: client.ready)
        d.addTimeout(self.timeout, self.clock)
        self._connecting.add(d)
        d.addBoth(self._connect_done, d)

    def _connect_done(self, result, d: defer.Deferred) -> None:
        self._connecting.discard(d)
        if self._closed:
            if not isinstance(result, Failure):
                result.quit()
            return None
        if isinstance(result, Failure):
            reason = str(as_unavailable(result).value)
            self.connect_failures += 1
            self._down_until = self.clock.seconds() + self.retry_interval
            self._down_reason = reason
            if not self._down:
                self._down = True
                emit(log, "gateway-unreachable", {"backend": self.name, "reason": reason,
                                                  "then": "its recipients get 450 4.4.1 until it answers",
                                                  "seconds": self.retry_interval}, LogLevel.warn)
            if not self._clients and not self._connecting:
                self._fail_waiting(reason)
            return
        client: VrfyClient = result
        self.connects += 1
        self._down_until = 0.0
        if self._down:
            self._down = False
            emit(log, "gateway-reachable", {"backend": self.name})
        if client.lost:
            return
        client.on_lost = self._lost
        self._clients.append(client)
        self._free.append(client)
        self._pump()

    def _lost(self, client: VrfyClient) -> None:
        if client in self._clients:
            self._clients.remove(client)
        if client in self._free:
            self._free.remove(client)
        self._grow()

    def _fail_waiting(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, deque()
        for job in waiting:
            self._resolve(job, Failure(BackendUnavailable(reason)))

    def close(self) -> defer.Deferred:
        """Stop: fail waiting lookups, QUIT every connection; fires once
        they are closed (or after C{timeout})."""
        self._closed = True
        self._fail_waiting("gateway stopping")
        for d in list(self._connecting):
            d.cancel()
        done = [c.quit() for c in list(self._clients)]
        d = defer.DeferredList(done, consumeErrors=True)
        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=lambda *_: None)
        return d
