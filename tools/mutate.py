#!/usr/bin/env python3
"""Mutation testing for the security-critical code: break it one line at a
time and see that a test notices.

Each entry of L{MUTATIONS} names a file, a piece of its text (found exactly
once), what to put instead, and the tests that must fail.  Every mutant is
made in a temporary copy of the tree (the working tree is never touched),
the listed tests run there with ``pytest -x -q``, and a mutant whose tests
all pass *survived*: a test is missing or cannot fail.  Before the
mutants, the same tests run on the unmutated copy and must pass, or every
mutant would look caught.

    .venv/bin/python tools/mutate.py              # all of them (a few minutes)
    .venv/bin/python tools/mutate.py -k relay     # names holding "relay"
    .venv/bin/python tools/mutate.py --jobs 2     # two copies in parallel
    .venv/bin/python tools/mutate.py --list       # the list, nothing run
    .venv/bin/python tools/mutate.py --check      # every mutation still applies

Exit status: 0 when no mutant survived, 1 otherwise (2: the list is stale
or the unmutated tests fail).  Not part of the test suite (it runs the
suite's tests dozens of times); ``tests/unit/test_mutations.py`` only
checks that every mutation still applies, so the list cannot rot
silently.  How to add one: ``docs/development.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug.

    @ivar name: short, unique, says what breaks (``-k`` matches it).
    @ivar file: the file to change, relative to the repository root.
    @ivar original: text found exactly once in C{file}.
    @ivar replacement: what replaces it (the bug).
    @ivar tests: pytest arguments (files or node ids) that must catch it,
        unit tests where possible.
    @ivar e2e: also run the tests marked ``e2e`` in C{tests} (real
        processes: slower); by default they are deselected.
    """

    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    e2e: bool = False


T = "tests/unit/"
DECIDE = T + "policy/test_decide.py"
RULES = T + "policy/test_rules.py"
GREETING = (T + "smtpd/test_greeting.py",)
PROTOCOL = T + "smtpd/test_protocol.py"
SESSION = T + "smtpd/test_session.py"
FRAMING = T + "smtpd/test_framing.py"
AUTH = (T + "smtpd/test_auth_tls.py", T + "smtpd/test_sasl.py", SESSION)
VRFY = (T + "smtpd/test_vrfy.py", DECIDE)
MAILDIR = T + "store/test_maildir.py"
QUEUE = (T + "store/test_queue.py", T + "store/test_relayclient.py", T + "store/test_entries.py")

MUTATIONS: tuple[Mutation, ...] = (
    # --- relay control --------------------------------------------------------------------
    Mutation("relay-untrusted-may-relay", "mailguard/policy/decide.py",
             'return _refuse(replies.RELAY_DENIED, "relay denied: domain not local, client not trusted", address)',
             'return _relay(address, "mutant")', (DECIDE,)),
    Mutation("relay-trusted-may-not-relay", "mailguard/policy/decide.py",
             'return _relay(address, f"relay for a trusted client ({self._trust_reason(session)})")',
             'return _refuse(replies.RELAY_DENIED, "mutant", address)', (DECIDE,)),
    Mutation("relay-hidden-destination-relayed", "mailguard/policy/decide.py",
             'if not local:\n                return _refuse(replies.RELAY_DENIED, "hidden destination in the local part", address)',
             'if not local:\n                return _relay(address, "mutant")', (DECIDE,)),
    Mutation("relay-loopback-literal-routable", "mailguard/policy/decide.py",
             "return ip.is_loopback or ip.is_unspecified", "return ip.is_unspecified", (DECIDE,)),
    Mutation("trust-auth-despite-RelayControlAuthEnabled-0", "mailguard/policy/decide.py",
             "if self.auth_enabled and session.authenticated:", "if session.authenticated:", (DECIDE,)),
    Mutation("trust-ip-group-despite-RelayControlIpGroupEnabled-0", "mailguard/policy/decide.py",
             "if self.relay_group_enabled and self.relay_group:", "if self.relay_group:", (DECIDE,)),
    Mutation("submission-mail-without-auth", "mailguard/policy/rules.py",
             'if session.listener == "submission" and not session.authenticated:',
             "if False:", (RULES, T + "smtpd/test_auth_tls.py")),
    # --- VRFY -----------------------------------------------------------------------------
    Mutation("vrfy-oracle-for-untrusted", "mailguard/policy/decide.py",
             "if not self.trust.is_trusted(session):\n            return replies.VRFY_WITHHELD",
             "if False:\n            return replies.VRFY_WITHHELD", VRFY),
    Mutation("vrfy-answers-when-disabled", "mailguard/policy/rules.py",
             "if not enabled:\n        return Refusal(replies.VRFY_DISABLED)",
             "if False:\n        return Refusal(replies.VRFY_DISABLED)", VRFY),
    Mutation("vrfy-disabled-account-known", "mailguard/policy/decide.py",
             'if _status(result) != "KNOWN":\n            return None\n        return result.address',
             'if _status(result) == "UNKNOWN":\n            return None\n        return result.address', VRFY),
    Mutation("vrfy-untrusted-has-no-budget", "mailguard/policy/rules.py",
             "return enabled and not trust.is_trusted(session)", "return False", (RULES, T + "smtpd/test_vrfy.py")),
    # --- the greeting delay ---------------------------------------------------------------
    Mutation("greeting-exceptions-group-delayed", "mailguard/policy/greeting.py",
             "if self.is_exception(session):", "if False:", GREETING),
    Mutation("greeting-delay-zero", "mailguard/policy/greeting.py",
             'return GreetingDecision(self.delay, self.teaser, "delayed")',
             'return GreetingDecision(0.0, self.teaser, "delayed")', GREETING),
    Mutation("greeting-submission-delayed", "mailguard/policy/greeting.py",
             'if session.listener != "smtp":', "if False:", GREETING),
    Mutation("greeting-early-talker-ignored", "mailguard/smtpd/protocol.py",
             "if not self.closed:\n                self._early_talker(data)",
             "if False:\n                self._early_talker(data)", GREETING),
    Mutation("greeting-timer-not-cancelled", "mailguard/smtpd/protocol.py",
             '            # server itself is shutting down and closing everything.\n            self._cancel("_hold")',
             "            # server itself is shutting down and closing everything.\n            pass", GREETING),
    # --- framing --------------------------------------------------------------------------
    Mutation("framing-bare-lf-in-data", "mailguard/smtpd/framing.py",
             'if block.count(b"\\n") != crlf or block.count(b"\\r") != crlf:',
             'if block.count(b"\\r") != crlf:', (FRAMING, PROTOCOL)),
    Mutation("framing-bare-cr-in-data", "mailguard/smtpd/framing.py",
             'if block.count(b"\\n") != crlf or block.count(b"\\r") != crlf:',
             'if block.count(b"\\n") != crlf:', (FRAMING, PROTOCOL)),
    Mutation("framing-no-dot-unstuffing", "mailguard/smtpd/framing.py",
             'data = (b"\\n" + block).replace(b"\\n.", b"\\n")[1:]', "data = block", (FRAMING, PROTOCOL)),
    Mutation("framing-command-line-unlimited", "mailguard/smtpd/framing.py",
             "if pos - start > limit:\n                return LINE_TOO_LONG, pos", "if False:\n                return LINE_TOO_LONG, pos",
             (FRAMING, PROTOCOL)),
    Mutation("framing-message-size-unlimited", "mailguard/smtpd/framing.py",
             "if 0 < self.max_size < self.size:", "if False:", (FRAMING, PROTOCOL)),
    Mutation("starttls-pipelined-plaintext-kept", "mailguard/smtpd/extensions.py",
             "discarded = self._discard_input()", "discarded = 0",
             (T + "smtpd/test_auth_tls.py", PROTOCOL, SESSION)),
    # --- AUTH -----------------------------------------------------------------------------
    Mutation("auth-plain-before-tls", "mailguard/smtpd/extensions.py",
             'if mech in ("PLAIN", "LOGIN") and not self.facts.tls:', "if False:", AUTH),
    Mutation("auth-no-slow-down", "mailguard/smtpd/extensions.py",
             "self._request(E.AuthFailureDelay(float(self.auth_failures)))",
             "self._request(E.AuthFailureDelay(0.0))", AUTH),
    Mutation("auth-no-failure-limit", "mailguard/smtpd/extensions.py",
             "if self.auth_failures >= max(1, self.context.config.max_auth_failures):", "if False:", AUTH),
    Mutation("auth-other-authzid-accepted", "mailguard/smtpd/sasl.py",
             "if authzid and authzid != authcid:", "if False:", AUTH),
    Mutation("auth-sha-password-not-checked", "mailguard/policy/passwords.py",
             "            ok = verify_password(stored, password)\n        else:",
             "            ok = True\n        else:", (T + "policy/test_passwords.py", T + "smtpd/test_auth_tls.py")),
    Mutation("tls-1.0-allowed", "mailguard/smtpd/tls.py",
             "raiseMinimumTo=ssl.TLSVersion.TLSv1_2", "insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0",
             (T + "smtpd/test_auth_tls.py::test_tls_context_is_tls_1_2_or_newer",)),
    # --- the durable commit: a 250 means fsynced --------------------------------------------
    Mutation("durable-no-file-fsync", "mailguard/store/maildir.py",
             "                os.fsync(fd)\n            except OSError as e:\n                raise named(e, path)",
             "                pass\n            except OSError as e:\n                raise named(e, path)", (MAILDIR,)),
    Mutation("durable-no-directory-fsync", "mailguard/store/maildir.py",
             "self.syncer.sync_all(done.dirs)", "pass", (MAILDIR,)),
    Mutation("durable-group-commit-rides-a-running-fsync", "mailguard/store/durable.py",
             "                    st.done = target", "                    st.done = st.issued", (MAILDIR,)),
    Mutation("durable-group-commit-one-fsync-per-request", "mailguard/store/durable.py",
             "                target = st.issued", "                target = ticket", (MAILDIR,)),
    Mutation("durable-links-kept-after-a-failure", "mailguard/store/maildir.py",
             "            for p in done.links:", "            for p in ():", (MAILDIR,)),
    Mutation("durable-early-flush-error-ignored", "mailguard/store/maildir.py",
             "            self._sync_error = result", "            pass", (MAILDIR,)),
    Mutation("durable-queue-envelope-not-fsynced", "mailguard/store/queuedir.py",
             "                os.fsync(fd)\n            except OSError as e:\n                raise named(e, tmp)",
             "                pass\n            except OSError as e:\n                raise named(e, tmp)",
             (MAILDIR + "::test_the_file_system_calls_behind_a_250_in_order",)),
    # --- the relay queue --------------------------------------------------------------------
    Mutation("queue-one-connection-per-message", "mailguard/store/relayclient.py",
             "        self._entry_done()\n        self._next_transaction()\n\n    def _entry_done",
             "        self._entry_done()\n        self._disconnectFromServer()\n\n    def _entry_done", QUEUE),
    Mutation("queue-5xx-retried", "mailguard/store/entries.py",
             "        return (FAILED if code >= 500 else PENDING), _status_of(code, text), _smtp_diag(code, text)\n"
             "    return PENDING",
             "        return PENDING, _status_of(code, text), _smtp_diag(code, text)\n    return PENDING", QUEUE),
    Mutation("queue-no-backoff", "mailguard/store/entries.py",
             "return min(retry_min * (2 ** max(attempts - 1, 0)), retry_max)", "return retry_min", QUEUE),
    Mutation("queue-lifetime-never-expires", "mailguard/store/queue.py",
             "expired = now >= entry.arrival + self.lifetime", "expired = False", QUEUE),
    Mutation("queue-no-dot-stuffing", "mailguard/store/folding.py",
             'out = out.replace(b"\\n.", b"\\n..")', "pass", QUEUE),
    Mutation("queue-return-path-forwarded", "mailguard/store/relayclient.py",
             'if not first.lower().startswith(b"return-path:"):', "if True:", QUEUE),
    Mutation("queue-etrn-from-anyone", "mailguard/policy/rules.py",
             "if not trust.is_trusted(session):\n        return Refusal(replies.ETRN_NOT_AVAILABLE, error=False)",
             "if False:\n        return Refusal(replies.ETRN_NOT_AVAILABLE, error=False)", (T + "store/test_queue.py", SESSION)),
    # --- mail loops ---------------------------------------------------------------------------
    Mutation("loop-limit-off-by-one", "mailguard/policy/rules.py",
             "if limit and received >= limit:", "if limit and received > limit:", (RULES, T + "smtpd/test_hops.py")),
    Mutation("loop-body-counted", "mailguard/smtpd/hops.py",
             "            self.in_header = False\n            end = empty",
             "            end = empty", (T + "smtpd/test_hops.py",)),
    Mutation("loop-line-split-over-blocks-misread", "mailguard/smtpd/hops.py",
             "        if self._carry is not None:  # first, the end of the line the last block ended inside",
             "        if False:  # first, the end of the line the last block ended inside", (T + "smtpd/test_hops.py",)),
    # --- operational errors -------------------------------------------------------------------
    Mutation("seclog-write-error-swallowed", "mailguard/smtpd/seclog.py",
             'd.addErrback(lambda f, n=len(lines): report(log, f, "security-log-failed",',
             'd.addErrback(lambda f, n=len(lines): None and report(log, f, "security-log-failed",',
             (T + "smtpd/test_seclog.py",)),
    Mutation("full-disk-traceback", "mailguard/operational.py",
             "    if is_operational(failure.value):\n        error, path = describe(failure.value)",
             "    if False:\n        error, path = describe(failure.value)", (T + "test_operational.py",)),
)


# --- running --------------------------------------------------------------------------------

def stale(mutations=MUTATIONS, root: Path = ROOT) -> list[str]:
    """Problems with the list: a name used twice, a file gone, an original
    not found exactly once, a replacement equal to it."""
    out, seen = [], set()
    for m in mutations:
        if m.name in seen:
            out.append(f"{m.name}: the name is used twice")
        seen.add(m.name)
        path = root / m.file
        if not path.is_file():
            out.append(f"{m.name}: {m.file} does not exist")
            continue
        n = path.read_text(encoding="utf-8").count(m.original)
        if n != 1:
            out.append(f"{m.name}: the original text is found {n} times in {m.file}, not once")
        if m.original == m.replacement:
            out.append(f"{m.name}: the replacement is the original")
        if not m.tests:
            out.append(f"{m.name}: no tests")
        for t in m.tests:
            if not (root / t.split("::")[0]).exists():
                out.append(f"{m.name}: {t} does not exist")
    return out


def copy_tree(dest: Path) -> None:
    """The files git knows (tracked, or new and not ignored) into C{dest}."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(tree: Path, tests, timeout: float, e2e: bool = False) -> tuple[bool, str]:
    """(passed, the first failing test or why it stopped)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *([] if e2e else ["-m", "not e2e"]),
           *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    if proc.returncode == 0:
        return True, ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.MULTILINE)
    return False, failed[0] if failed else (proc.stdout.strip().splitlines() or ["exit %d" % proc.returncode])[-1]


def run_mutant(tree: Path, m: Mutation, timeout: float) -> tuple[bool, str, float]:
    """Apply C{m} in C{tree}, run its tests, restore the file: (killed,
    by what, seconds)."""
    path = tree / m.file
    original = path.read_text(encoding="utf-8")
    path.write_text(original.replace(m.original, m.replacement, 1), encoding="utf-8")
    start = time.monotonic()
    try:
        passed, why = run_tests(tree, m.tests, timeout, m.e2e)
    finally:
        path.write_text(original, encoding="utf-8")
    return not passed, why, time.monotonic() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="keyword", default="", help="only mutations whose name holds this")
    parser.add_argument("--jobs", type=int, default=1, help="copies of the tree run in parallel")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--check", action="store_true", help="check that every mutation applies, and exit")
    args = parser.parse_args(argv)

    problems = stale()
    if problems:
        print("the mutation list is stale:", *problems, sep="\n  ")
        return 2
    chosen = [m for m in MUTATIONS if args.keyword in m.name]
    if not chosen:
        print(f"no mutation's name holds {args.keyword!r} (--list shows them)")
        return 2
    if args.check:
        print(f"{len(MUTATIONS)} mutations, each applies")
        return 0
    if args.list:
        for m in chosen:
            print(f"{m.name:48} {m.file}  ->  {' '.join(m.tests)}")
        return 0

    jobs = max(1, min(args.jobs, len(chosen)))
    with tempfile.TemporaryDirectory(prefix="mailguard-mutants-") as tmp:
        trees = [Path(tmp) / f"tree{i}" for i in range(jobs)]
        for tree in trees:
            copy_tree(tree)
        for e2e in (False, True):
            baseline = sorted({t for m in chosen if m.e2e == e2e for t in m.tests})
            passed, why = run_tests(trees[0], baseline, args.timeout * 2, e2e) if baseline else (True, "")
            if not passed:
                print(f"the tests fail without any mutation ({why}): fix them first")
                return 2
        started = time.monotonic()
        results: dict[str, tuple[bool, str, float]] = {}

        def work(i: int) -> None:
            for m in chosen[i::jobs]:
                results[m.name] = outcome = run_mutant(trees[i], m, args.timeout)
                killed, why, secs = outcome
                print(f"{'killed  ' if killed else 'SURVIVED'} {m.name:48} {secs:5.1f} s  {why}", flush=True)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(work, range(jobs)))
    survivors = [m.name for m in chosen if not results[m.name][0]]
    print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutants killed in {time.monotonic() - started:.0f} s"
          f" ({jobs} job(s))")
    if survivors:
        print("survived:", *survivors, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
