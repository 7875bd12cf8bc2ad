"""Benchmark: each attack of issue 11 against a real twistd, and what it won.

Run:
    .venv/bin/python bench/bench_abuse.py [--seconds 20] [--auth-seconds 60]
        [--only NAME ...] [--mailguard-root DIR]

Not part of the test suite; loopback only, every attack bounded in time
and count.  Each attack gets a fresh ``twistd -n mailguard`` (its memory
and its per-address budgets start clean) with the default settings except
``SmtpIdleTimeout=20`` (so that a slow sender's fate is known in seconds),
``SmtpConnectionRateLimit=30`` (off by default, as in Postfix) and
``SmtpAuthCramMd5Enabled=1`` (guessing needs no TLS).  The attacker is
127.0.0.3; a legitimate client on 127.0.0.5 delivers a message every 0.2 s
throughout, and what it lost is counted in the Maildir (a message it was
told ``250`` for and that is not there), not from its own belief.

Per attack it prints the server's RSS before, at its peak and after, what
the attacker achieved, and the legitimate client's messages (sent,
accepted, stored).  ``--mailguard-root DIR`` runs another checkout (the
code before the defences: ``git archive fe8142e | tar -x -C DIR``).
"""

from __future__ import annotations

import argparse
import random
import smtplib
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mgproc import ROOT, Server, write_config

ATTACKER, LEGIT, TRUSTED = "127.0.0.3", "127.0.0.5", "127.0.0.2"
USERS = (("john", "john-secret"), ("alice", "alice-secret"), ("bob", "bob-secret"))
SETTINGS = {"SmtpIdleTimeout": "20", "SmtpConnectionRateLimit": "30", "SmtpAuthCramMd5Enabled": "1"}


@dataclass
class Result:
    name: str
    before: int = 0
    peak: int = 0
    after: int = 0
    achieved: str = ""
    legit: dict = field(default_factory=dict)


class Legit(threading.Thread):
    """A legitimate client: one message every 0.2 s until stopped, on one
    connection as an MTA keeps one open for a burst (a new one after a
    failure)."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.stop, self.sent, self.accepted, self.failed = server, threading.Event(), 0, 0, []

    def run(self) -> None:
        c = None
        while not self.stop.is_set():
            self.sent += 1
            body = f"Subject: legit {self.sent}\r\nX-Legit-Id: {self.sent}\r\n\r\nhello\r\n"
            try:
                if c is None:
                    c = smtplib.SMTP("127.0.0.1", self.server.port, source_address=(LEGIT, 0), timeout=30)
                c.sendmail("partner@sender.test", ["john@example.com"], body)
                self.accepted += 1
            except (smtplib.SMTPException, OSError) as e:
                self.failed.append(type(e).__name__)
                if c is not None:
                    try:
                        c.close()
                    except OSError:
                        pass
                c = None
            self.stop.wait(0.2)
        if c is not None:
            try:
                c.quit()
            except (smtplib.SMTPException, OSError):
                pass

    def report(self) -> dict:
        new = self.server.spool / "mail" / "example.com" / "john" / "Maildir" / "new"
        stored = sum(1 for f in new.iterdir() if b"X-Legit-Id:" in f.read_bytes()) if new.exists() else 0
        return {"sent": self.sent, "accepted": self.accepted, "stored": stored,
                "lost": self.accepted - stored, "failed": len(self.failed)}


def measure(name: str, home: Path, root: Path, attack, variables=None, nofile=None) -> Result:
    """Run C{attack(server) -> str} on a fresh server with the legitimate
    client beside it, sampling RSS."""
    home.mkdir()
    cfg = write_config(home / "mailserver.cfg", {**SETTINGS, **(variables or {})}, users=USERS)
    server = Server(home, cfg, root, nofile=nofile)
    try:
        with smtplib.SMTP("127.0.0.1", server.port, source_address=(TRUSTED, 0), timeout=30) as c:
            c.sendmail("a@sender.test", ["bob@example.com"], "Subject: warm-up\r\n\r\nx\r\n")
        time.sleep(0.5)
        result = Result(name, before=server.rss_kb)
        result.peak = result.before
        legit, done = Legit(server), threading.Event()

        def sample():
            while not done.wait(0.05):
                result.peak = max(result.peak, server.rss_kb)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        legit.start()
        try:
            result.achieved = attack(server)
        finally:
            legit.stop.set()
            legit.join(60)
            done.set()
            sampler.join()
        time.sleep(1.0)
        result.after = server.rss_kb
        result.legit = legit.report()
        return result
    finally:
        server.stop()


def read_reply(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or (len(data) > 3 and data.split(b"\r\n")[-2][3:4] == b"-"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# --- the attacks: each returns what the attacker achieved --------------------------------------


def never_reading(seconds: float):
    def attack(server: Server) -> str:
        s = socket.create_connection(("127.0.0.1", server.port), source_address=(ATTACKER, 0))
        s.recv(1000)
        s.setblocking(False)
        flood, sent, end = b"EHLO x\r\n" * 8192, 0, time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                sent += s.send(flood)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
        s.close()
        return f"{sent / 1e6:.1f} MB of EHLO pipelined in {seconds:g} s, no reply read"
    return attack


def auth_guessing(seconds: float, connections: int = 50):
    def attack(server: Server) -> str:
        answered, refused, end = [0], [0], time.monotonic() + seconds
        lock = threading.Lock()

        def guesser(n: int) -> None:
            rnd = random.Random(n)
            while time.monotonic() < end:
                try:
                    c = smtplib.SMTP("127.0.0.1", server.port, source_address=(ATTACKER, 0), timeout=30)
                    c.ehlo("bot")
                except (smtplib.SMTPException, OSError):
                    time.sleep(0.1)
                    continue
                try:
                    while time.monotonic() < end:
                        c.user, c.password = "john", f"guess{rnd.random()}"
                        try:
                            c.auth("CRAM-MD5", c.auth_cram_md5)
                            code = 235
                        except smtplib.SMTPAuthenticationError as e:
                            code = e.smtp_code
                        with lock:
                            if code in (235, 535):
                                answered[0] += 1
                            elif code == 454:
                                refused[0] += 1
                        if code not in (235, 535, 454):
                            break
                        if code == 454:
                            time.sleep(0.05)
                except (smtplib.SMTPException, OSError):
                    pass
                finally:
                    try:
                        c.close()
                    except OSError:
                        pass

        threads = [threading.Thread(target=guesser, args=(n,)) for n in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        per_min = answered[0] / (seconds / 60)
        return (f"{per_min:,.0f} guesses answered/min from {connections} connections "
                f"({answered[0]} answered, {refused[0]} refused 454 in {seconds:g} s)")
    return attack


def harvesting(seconds: float):
    def attack(server: Server) -> str:
        tried = answered = sessions = refused_at_connect = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s = socket.create_connection(("127.0.0.1", server.port), source_address=(ATTACKER, 0), timeout=30)
            first = read_reply(s)
            if not first.startswith(b"220"):
                refused_at_connect += 1
                s.close()
                time.sleep(0.2)
                continue
            sessions += 1
            batch = b"".join(b"RCPT TO:<h%d@example.com>\r\n" % (tried + n) for n in range(500))
            s.sendall(b"EHLO x\r\nMAIL FROM:<a@sender.test>\r\n" + batch)
            tried += 500
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except OSError:
                pass
            answered += out.count(b"\r\n550 ")
            s.close()
        return (f"{answered} unknown recipients answered of {tried} RCPTs sent in {sessions} sessions; "
                f"{refused_at_connect} connections refused")
    return attack


def slow_sender(seconds: float):
    def attack(server: Server) -> str:
        s = socket.create_connection(("127.0.0.1", server.port), source_address=(ATTACKER, 0), timeout=30)
        read_reply(s)
        for command in (b"EHLO x", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<john@example.com>", b"DATA"):
            s.sendall(command + b"\r\n")
            read_reply(s)
        start = time.monotonic()
        s.settimeout(1.0)
        said = b""
        while time.monotonic() - start < seconds:
            try:
                s.send(b"x")
                said = s.recv(100)
                if said:
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        held = time.monotonic() - start
        s.close()
        if said.startswith(b"421"):
            return f"1 octet/s in DATA: held {held:.0f} s, then {said[:9].decode()}"
        return f"1 octet/s in DATA: still held after {held:.0f} s (not cut off)"
    return attack


def connection_flood(seconds: float):
    def attack(server: Server) -> str:
        greeted = refused = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                s = socket.create_connection(("127.0.0.1", server.port), source_address=(ATTACKER, 0), timeout=10)
                first = s.recv(100)
                s.close()
            except OSError:
                continue
            greeted += first.startswith(b"220")
            refused += first.startswith(b"421")
        return f"{greeted} connections greeted, {refused} refused 421 in {seconds:g} s"
    return attack


def descriptor_exhaustion(count: int = 450):
    def attack(server: Server) -> str:
        held, greeted, refused, silent = [], 0, 0, 0
        try:
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", server.port), source_address=(ATTACKER, 0), timeout=20)
                held.append(s)
                try:
                    first = s.recv(100)
                except OSError:
                    first = b""
                greeted += first.startswith(b"220")
                refused += first.startswith(b"421")
                silent += first == b""
            try:
                with smtplib.SMTP("127.0.0.1", server.port, source_address=(TRUSTED, 0), timeout=20) as c:
                    c.sendmail("a@sender.test", ["john@example.com"], "Subject: trusted\r\n\r\nx\r\n")
                trusted = "delivered"
            except (smtplib.SMTPException, OSError) as e:
                trusted = f"failed ({type(e).__name__})"
        finally:
            for s in held:
                s.close()
        return (f"{count} connections, open-file limit 400: {greeted} greeted, {refused} refused 421, "
                f"{silent} closed silently; a relay-group client {trusted}")
    return attack


def sender_spoofing(server: Server) -> str:
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(ATTACKER, 0), timeout=30) as c:
        c.ehlo("x")
        c.user, c.password = "alice", "alice-secret"
        c.auth("CRAM-MD5", c.auth_cram_md5)
        code, text = c.mail("bob@example.com")
    return f"alice, logged in, MAIL FROM:<bob@example.com>: {code} {text.decode()[:40]}"


def nul_in_data(server: Server) -> str:
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(ATTACKER, 0), timeout=30) as c:
        c.ehlo("x")
        c.mail("a@sender.test")
        c.rcpt("bob@example.com")
        code, text = c.data(b"Subject: nul\r\n\r\nbefore\x00after\r\n")
    new = server.spool / "mail" / "example.com" / "bob" / "Maildir" / "new"
    stored = sum(1 for f in new.iterdir() if b"\x00" in f.read_bytes()) if new.exists() else 0
    return f"a message with a NUL: {code} {text.decode()[:30]}; stored with the NUL: {stored}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each timed attack")
    ap.add_argument("--auth-seconds", type=float, default=60.0, help="length of the AUTH guessing")
    ap.add_argument("--slow-seconds", type=float, default=60.0, help="how long the slow sender may go on")
    ap.add_argument("--mailguard-root", type=Path, default=ROOT)
    ap.add_argument("--only", action="append", default=[])
    args = ap.parse_args()
    attacks = [
        ("never-reading client", never_reading(args.seconds), None, None),
        ("AUTH guessing, 50 connections", auth_guessing(args.auth_seconds), None, None),
        ("harvesting recipients", harvesting(args.seconds), None, None),
        ("slow sender (1 octet/s)", slow_sender(args.slow_seconds), None, None),
        ("connection flood", connection_flood(args.seconds), None, None),
        ("descriptor exhaustion", descriptor_exhaustion(), {"SmtpMaxConnectionsPerIp": "0",
                                                             "SmtpConnectionRateLimit": "0"}, 400),
        ("sender spoofing after login", sender_spoofing, None, None),
        ("NUL in DATA", nul_in_data, None, None),
    ]
    results = []
    with tempfile.TemporaryDirectory(prefix="mg-abuse-") as tmp:
        for i, (name, attack, variables, nofile) in enumerate(attacks):
            if args.only and not any(o in name for o in args.only):
                continue
            print(f"... {name}", flush=True)
            results.append(measure(name, Path(tmp) / f"a{i}", args.mailguard_root, attack, variables, nofile))
    print(f"\nmailguard from {args.mailguard_root}; attacker {ATTACKER}, legitimate client {LEGIT}\n")
    print("| attack | RSS before | peak | after | the attacker achieved | legitimate client: sent / 250 / stored / lost |")
    print("|---|---|---|---|---|---|")
    for r in results:
        lg = r.legit
        print(f"| {r.name} | {r.before / 1024:.1f} MB | {r.peak / 1024:.1f} MB | {r.after / 1024:.1f} MB | "
              f"{r.achieved} | {lg['sent']} / {lg['accepted']} / {lg['stored']} / {lg['lost']} |")


if __name__ == "__main__":
    main()
