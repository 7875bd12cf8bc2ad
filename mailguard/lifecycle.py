"""The running server as one Twisted service that reloads its configuration
and stops gracefully.

L{mailguard.service.build_service} returns a L{MailguardService}: the
listeners, the relay queue and the gateway are its children, and every
session of every listener shares its current L{ServerContext} -- one
*generation*: a configuration and the policies built from it.

Reload (L{MailguardService.reload}; ``SIGHUP`` through
L{mailguard.signals}) builds the next generation off to the side, with the
functions start-up uses, and swaps it in only if all is well:

  1. the files are read and checked completely
     (L{mailguard.policy.build.read_checked}, in a thread: a big
     ``users.cfg`` takes a while and the sessions are served meanwhile),
     and the ``--tls-cert``/``--tls-key`` files are loaded again (a renewed
     certificate needs no restart);
  2. any error: each ``FILE:LINE`` problem is logged and the running
     generation goes on serving;
  3. the new policies are built, the greeting pass cache carried on;
  4. the swap: every listener's factory gets the new context at once.
     Sessions in progress keep the one they started with; a connection
     held in the greeting delay keeps waiting and is greeted by the new
     one.  The connection counters, the store, the queue and the security
     log carry on, under the new limits;
  5. one log line says what changed (L{mailguard.config.changes}).

What a reload does not apply (the listeners, the spool and the other
command-line options; L{mailguard.config.changes.RESTART_ONLY}) is named
in that line and in ``docs/operations.md``.

Stop (L{MailguardService.stopService}, which twistd runs before the
reactor stops): the listeners close first, then the sessions are drained
(L{mailguard.smtpd.drain}, within ``SmtpShutdownGrace``), then the relay
queue and the gateway stop and the security log is flushed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mailguard.config.changes import Changes, diff, pinned
from mailguard.config.problems import Problem, errors
from mailguard.policy.build import build_policies
from mailguard.smtpd.context import ServerContext
from mailguard.smtpd.drain import Drain
from mailguard.smtpd.listener import KINDS, Listener
from mailguard.store.durable import run_inline
from mailguard.store.notices import directory_router

__all__ = ["MailguardService", "Reloaded"]

log = Logger()


@dataclass(frozen=True)
class Reloaded:
    """How a reload went: C{ok} (the new generation serves), every
    problem found (errors, or warnings only), what changed."""

    ok: bool
    problems: tuple[Problem, ...] = ()
    changes: Changes | None = None


@dataclass(frozen=True)
class _Read:
    config: object
    tables: object
    problems: list
    tls: object = None
    tls_error: str | None = None
    changes: Changes | None = None


class MailguardService(service.MultiService):
    """The whole server.  Its C{context} is the current generation; its
    C{factories} are the listeners' L{mailguard.smtpd.factory.MailguardFactory}s.

    @param read: C{() -> (config, tables, problems)}: the files read and
        checked again (L{mailguard.policy.build.read_checked} with the
        paths of the start).
    @param tls_files: (certificate, key) given on the command line, loaded
        again on each reload; None without TLS.
    @param gateway: gateway mode's L{mailguard.gateway.gateway.Gateway}
        (built once: its settings need a restart).
    @param run: runs the blocking read (a thread in production).
    """

    def __init__(self, context: ServerContext, clock, *, read: Callable, tls_files=None,
                 gateway=None, run=run_inline) -> None:
        super().__init__()
        self.context = context
        self.clock = clock
        self.read = read
        self.tls_files = tls_files
        self.gateway = gateway
        self.run = run
        self.factories: list = []
        self.drain: Drain | None = None
        self._reloading = False
        self._waiting: list[defer.Deferred] = []  # reloads asked for while one runs

    @property
    def listeners(self) -> list[Listener]:
        """The SMTP listeners, in the order they were added (not
        ``--metrics``: it serves until the rest stops)."""
        return [s for s in self if isinstance(s, Listener) and s.kind in KINDS]

    # -- reload --------------------------------------------------------------------------
    def reload(self) -> defer.Deferred:
        """Read, check and apply the configuration files again.  A Deferred
        that fires with L{Reloaded} (it never fails).  Asked while a reload
        runs, one more runs after it: the files may have changed again."""
        if self.drain is not None:
            log.warn("reload ignored: the server is stopping")
            return defer.succeed(Reloaded(False))
        if self._reloading:
            d = defer.Deferred()
            self._waiting.append(d)
            return d
        self._reloading = True
        d = self.run(self._read)
        d.addCallback(self._apply)
        d.addErrback(self._crashed)
        d.addBoth(self._reloaded)
        return d

    def _read(self) -> _Read:
        """Runs in a thread: it reads the running configuration (an
        immutable value that only a reload replaces, and one reload runs
        at a time) and changes nothing."""
        config, tables, problems = self.read()
        if config is None or tables is None or errors(problems):
            return _Read(config, tables, problems)
        running = self.context.config
        changes = diff(running, config)
        config = pinned(config, running)  # what needs a restart keeps its running value
        if not self.tls_files:
            return _Read(config, tables, problems, changes=changes)
        from mailguard.smtpd.tls import TLSConfigError, load_context

        try:
            return _Read(config, tables, problems, tls=load_context(*self.tls_files), changes=changes)
        except TLSConfigError as e:
            return _Read(config, tables, problems, tls_error=str(e))

    def _apply(self, read: _Read) -> Reloaded:
        problems = tuple(read.problems)
        for p in problems:
            if not p.is_error:
                log.warn("reload: {problem}", problem=str(p))
        failed = [str(p) for p in errors(problems)] + ([read.tls_error] if read.tls_error else [])
        if failed or read.config is None or read.tables is None:
            for line in failed:
                log.error("reload: {problem}", problem=line)
            log.error("configuration reload failed ({n} error(s)): still serving the configuration "
                      "loaded before from {source}", n=len(failed), source=self.context.config.source)
            return Reloaded(False, problems)
        if self.drain is not None:  # stopping meanwhile: nothing to serve
            return Reloaded(False, problems)
        old, config, changes = self.context, read.config, read.changes
        cache = getattr(old.greeting, "pass_cache", None)
        if cache is not None and config.greeting_pass_ttl > 0:  # carried on, resized
            cache.ttl, cache.size = config.greeting_pass_ttl, config.greeting_pass_cache_size
        else:
            cache = None  # off now, or a new one (build_policies) if it was off
        policies = build_policies(config, self.clock, tables=read.tables, gateway=self.gateway,
                                  pass_cache=cache)
        self._install(old.renewed(config, policies, read.tls))
        self._carry_on(config, read.tables)
        log.info("configuration reloaded from {source}: {changes}", source=config.source,
                 changes=changes.describe())
        return Reloaded(True, problems, changes)

    def _install(self, context: ServerContext) -> None:
        """The swap: new connections get C{context} from now on."""
        self.context = context
        for factory in self.factories:
            factory.context = context

    def _carry_on(self, config, tables) -> None:
        """The long-lived pieces take the new settings that apply to them."""
        ctx = self.context
        if hasattr(ctx.security_log, "max_bytes"):
            ctx.security_log.max_bytes = config.security_log_max_bytes
            ctx.security_log.generations = config.security_log_generations
        if hasattr(ctx.queue, "reconfigure"):
            ctx.queue.reconfigure(hostname=config.hostname, lifetime=config.queue_lifetime,
                                  retry_min=config.queue_retry_min, retry_max=config.queue_retry_max,
                                  concurrency=config.queue_concurrency,
                                  router=directory_router(tables.directory, self.gateway))

    def _crashed(self, failure) -> Reloaded:
        log.failure("configuration reload failed: internal error; still serving the configuration "
                    "loaded before", failure)
        return Reloaded(False)

    def _reloaded(self, result: Reloaded) -> Reloaded:
        self._reloading = False
        waiting, self._waiting = self._waiting, []
        if waiting:
            def tell(again):
                for d in waiting:
                    d.callback(again)
                return again

            self.reload().addCallback(tell)
        return result

    # -- stop ----------------------------------------------------------------------------
    def stopService(self) -> defer.Deferred:
        """Stop listening, drain the sessions, then stop the rest."""
        service.Service.stopService(self)
        children = list(self)
        listeners = self.listeners
        rest = [s for s in reversed(children) if s not in listeners]
        d = defer.DeferredList([defer.maybeDeferred(s.stopService) for s in listeners])
        self.drain = Drain(self.context.connections, self.clock, self.context.config.shutdown_grace)
        d.addCallback(lambda _: self.drain.start())
        d.addCallback(lambda _: defer.DeferredList([defer.maybeDeferred(s.stopService) for s in rest]))
        flush = getattr(self.context.security_log, "flush", None)
        if flush is not None:
            d.addCallback(lambda _: flush())
        return d

    def hurry(self) -> None:
        """A second stop signal: end the grace now."""
        if self.drain is not None:
            self.drain.hurry()
