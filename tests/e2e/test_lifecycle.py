"""Signals to a real ``twistd mailguard``: reload on HUP, USR1 that never
kills, a graceful stop on TERM -- with real SMTP clients on loopback.

The tests wait on systemd's notification protocol rather than on the
clock: each server is started with ``NOTIFY_SOCKET`` pointing at a socket
the test reads (L{Notifications}), and mailguard says ``READY=1`` once it
listens and again when a reload is done, ``STOPPING=1`` when it stops.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.certs import make_certs
from tests.conftest import ROOT, TWISTD, USERS, free_port, write_config

NEWBIE = ("newbie", "example.com", "newbie-secret", True)
RELOADED = "READY=1\nSTATUS=serving (configuration reloaded)"
RELOAD_FAILED = "READY=1\nSTATUS=serving the previous configuration: the reload failed, see the log"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"


class Notifications:
    """systemd's side of ``sd_notify``: a datagram socket the server
    writes its state to."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(60)  # a server that never says anything fails the test
        self.seen: list[str] = []
        self.env = {"NOTIFY_SOCKET": self.path}

    def next(self) -> str:
        message = self.sock.recv(4096).decode()
        self.seen.append(message)
        return message

    def until(self, prefix: str) -> str:
        while True:
            message = self.next()
            if message.startswith(prefix):
                return message

    def reload(self, server) -> str:
        """HUP, and the state once the reload is over."""
        server.proc.send_signal(signal.SIGHUP)
        assert self.until("RELOADING=1").startswith("RELOADING=1\nMONOTONIC_USEC=")
        return self.until("READY=1")


@pytest.fixture
def notify(tmp_path):
    n = Notifications(tmp_path / "notify.sock")
    yield n
    n.sock.close()


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path / "mailserver.cfg")


def client(port: int, ip: str = "127.0.0.2") -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", port, source_address=(ip, 0), timeout=30)
    c.ehlo("client.test")
    return c


def rcpt_code(c: smtplib.SMTP, address: str) -> int:
    assert c.mail("a@sender.test")[0] == 250
    code = c.rcpt(address)[0]
    c.rset()
    return code


# --- reload ----------------------------------------------------------------------------

def test_hup_reloads_users_and_a_session_begun_before_finishes_with_the_old_ones(twistd, cfg, notify):
    server = twistd(config=cfg, env=notify.env)
    assert notify.until("READY=1").startswith("READY=1\nMAINPID=")
    before = client(server.port)
    assert rcpt_code(before, "newbie@example.com") == 550
    write_config(cfg, users=USERS + (NEWBIE,))
    assert notify.reload(server) == RELOADED
    after = client(server.port)
    assert rcpt_code(after, "newbie@example.com") == 250
    after.sendmail("a@sender.test", ["newbie@example.com"], b"Subject: welcome\r\n\r\nHi.\r\n")
    after.quit()
    assert len(server.maildir_files("newbie@example.com")) == 1
    # the session opened before the HUP goes on with the configuration it began with
    assert rcpt_code(before, "newbie@example.com") == 550
    before.sendmail("a@sender.test", ["john@example.com"], b"Subject: old\r\n\r\nStill here.\r\n")
    before.quit()
    assert len(server.maildir_files("john@example.com")) == 1
    assert "configuration reloaded from " + str(cfg) + ": users 1 added" in server.output()
    assert "newbie-secret" not in server.output()


def test_a_broken_file_and_hup_leave_the_old_configuration_serving(twistd, cfg, notify):
    server = twistd(config=cfg, env=notify.env)
    notify.until("READY=1")
    good = cfg.read_text()
    broken = good.replace('<variable name="VRFYEnabled">1</variable>',
                          '<variable name="VRFYEnabled">yes</variable>')
    broken = broken.replace("</config>", '<variable name="MaxMessageSize">-5</variable>\n</config>')
    cfg.write_text(broken)
    assert notify.reload(server) == RELOAD_FAILED
    log = server.output()
    lines = broken.split("\n")
    for name in ("VRFYEnabled", "MaxMessageSize"):
        line = next(i for i, text in enumerate(lines, 1) if f'name="{name}"' in text)
        assert f"{cfg}:{line}: " in log  # every problem, FILE:LINE
    assert "configuration reload failed (2 error(s))" in log
    c = client(server.port)
    assert c.verify("john@example.com")[0] == 250  # VRFYEnabled=1 still, from the old file
    assert rcpt_code(c, "john@example.com") == 250
    c.quit()
    cfg.write_text(good.replace("</config>", '<variable name="SmtpMaxErrors">7</variable>\n</config>'))
    assert notify.reload(server) == RELOADED  # fixed: the next HUP takes it
    assert "settings changed: SmtpMaxErrors" in server.output()
    assert server.proc.poll() is None


def test_hup_drops_no_session_under_concurrent_clients(twistd, cfg, notify):
    """Eight clients send mail without pause while the configuration is
    reloaded ten times (a user added, then removed): every session
    completes, every message is acknowledged and on disk."""
    server = twistd(config=cfg, env=notify.env)
    notify.until("READY=1")
    stop = threading.Event()
    progress = threading.Condition()
    acked: list[int] = []
    errors: list[BaseException] = []
    body = b"Subject: load\r\n\r\n" + (b"x" * 70 + b"\r\n") * 30

    def sender(n: int) -> None:
        try:
            while not stop.is_set():
                c = client(server.port, f"127.0.0.{10 + n}")
                for _ in range(3):
                    c.sendmail("a@sender.test", ["john@example.com", "jane@example.com"], body)
                    with progress:
                        acked.append(n)
                        progress.notify_all()
                c.quit()
        except BaseException as e:  # smtplib raises on anything but the expected reply
            errors.append(e)
            with progress:
                progress.notify_all()

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            with progress:  # mail is flowing before each reload
                seen = len(acked)
                assert progress.wait_for(lambda: len(acked) > seen + 8 or errors, timeout=60)
            assert errors == []
            write_config(cfg, users=USERS + ((NEWBIE,) if i % 2 == 0 else ()))
            assert notify.reload(server) == RELOADED
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []
    assert len(acked) >= 80
    assert len(server.maildir_files("john@example.com")) == len(acked)
    assert len(server.maildir_files("jane@example.com")) == len(acked)
    assert server.output().count("configuration reloaded from") == 10


# --- SIGUSR1 ---------------------------------------------------------------------------

def test_usr1_reopens_the_log_file_after_logrotate_moved_it(twistd, cfg, notify):
    server = twistd(config=cfg, env=notify.env)
    notify.until("READY=1")
    rotated = server.logfile.with_name("twistd.log.1")
    server.logfile.rename(rotated)
    server.proc.send_signal(signal.SIGUSR1)
    assert notify.reload(server) == RELOADED  # alive, and serving signals in order
    assert server.proc.poll() is None
    text = server.logfile.read_text()
    assert f"SIGUSR1: reopened {server.logfile}" in text
    assert "configuration reloaded" in text  # the new file at the same path
    assert "configuration reloaded" not in rotated.read_text()


def test_usr1_in_the_foreground_without_a_log_file_does_not_kill(twistd, cfg, notify):
    server = twistd(config=cfg, env=notify.env, logfile=False)  # twistd -n logs to stdout
    notify.until("READY=1")
    server.proc.send_signal(signal.SIGUSR1)
    assert notify.reload(server) == RELOADED
    assert server.proc.poll() is None
    c = client(server.port)
    assert rcpt_code(c, "john@example.com") == 250
    c.quit()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    assert "SIGUSR1: no log file to reopen" in server.output()


# --- SIGTERM -----------------------------------------------------------------------------

HELD = 1000


def read_all(socks: list[socket.socket]) -> dict[socket.socket, bytes]:
    """Everything each socket receives until its server closes it."""
    got = {s: b"" for s in socks}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = len(socks)
    while open_:
        events = sel.select(timeout=60)
        assert events, "a held client heard nothing"
        for key, _ in events:
            data = key.fileobj.recv(4096)
            if data:
                got[key.fileobj] += data
            else:
                sel.unregister(key.fileobj)
                open_ -= 1
    sel.close()
    return got


def test_sigterm_tells_1000_held_clients_421_lets_data_finish_and_exits_0(twistd, cfg, notify, tmp_path):
    write_config(cfg, {"SmtpGreetingDelay": "120", "SmtpGreetingDelayExceptions": "NoDelay"})
    port = free_port()
    server = twistd("--smtp", f"tcp:{port}:interface=127.0.0.1:backlog=1024", config=cfg, port=port,
                    env=notify.env)
    notify.until("READY=1")
    # one client in DATA (the NoDelay group is greeted at once)
    busy = client(port, "127.0.0.4")
    assert busy.mail("a@sender.test")[0] == 250 and busy.rcpt("john@example.com")[0] == 250
    busy.putcmd("data")
    assert busy.getreply()[0] == 354
    busy.send(b"Subject: the last one\r\n\r\nfirst half\r\n")
    # 1000 held clients, 40 per address (the per-IP limit is 50)
    held = [socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{20 + i % 25}", 0))
            for i in range(HELD)]
    # connections are accepted in order: once a later one is greeted, every
    # held one has been accepted and is waiting out its delay
    probe = client(port, "127.0.0.4")
    probe.quit()
    server.proc.send_signal(signal.SIGTERM)
    assert notify.until("STOPPING=1") == "STOPPING=1\nSTATUS=stopping"
    got = read_all(held)
    assert set(got.values()) == {SHUTTING_DOWN}
    for s in held:
        s.close()
    # the client in DATA finishes within the grace: its message is stored
    busy.send(b"second half\r\n.\r\n")
    code, text = busy.getreply()
    assert code == 250, text
    assert busy.getreply() == (421, b"4.3.2 Service shutting down, try again later")
    busy.close()
    assert server.proc.wait(60) == 0
    [stored] = server.maildir_files("john@example.com")
    assert stored.read_bytes().endswith(b"Subject: the last one\r\n\r\nfirst half\r\nsecond half\r\n")
    log = server.output()
    assert f"stopping: {HELD} connection(s) closed with 421 4.3.2, 1 finishing a message (grace 30 s)" in log
    # a stop is not a client giving up: no held client is in the security log
    seclog = server.spool / "security.log"
    held_ips = {f"127.0.0.{20 + i}" for i in range(25)}
    lines = seclog.read_text().splitlines() if seclog.exists() else []
    assert not [line for line in lines if line.split("\t")[2] in held_ips]


def test_sigint_stops_gracefully_too(twistd, cfg, notify):
    server = twistd(config=cfg, env=notify.env)
    notify.until("READY=1")
    idle = client(server.port)
    server.proc.send_signal(signal.SIGINT)
    assert notify.until("STOPPING=1")
    assert idle.getreply() == (421, b"4.3.2 Service shutting down, try again later")
    assert server.proc.wait(60) == 0


# --- as a daemon, under systemd's socket activation, with TLS --------------------------------

def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextmanager
def reaped(proc: subprocess.Popen):
    """C{proc}, killed on the way out if the test left it running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_daemon_mode_reloads_reopens_and_stops(tmp_path, cfg, notify):
    """twistd without -n forks: the daemon gets the same signals."""
    port, pidfile, logfile = free_port(), tmp_path / "twistd.pid", tmp_path / "daemon.log"
    started = subprocess.run([TWISTD, "--logfile", str(logfile), "--pidfile", str(pidfile), "mailguard",
                              "--config", str(cfg), "--spool", str(tmp_path / "spool"),
                              "--smtp", f"tcp:{port}:interface=127.0.0.1"],
                             cwd=str(tmp_path), env=_env(notify.env), capture_output=True, timeout=60)
    assert started.returncode == 0, started
    assert notify.until("READY=1")
    pid = int(pidfile.read_text())
    try:
        write_config(cfg, users=USERS + (NEWBIE,))
        os.kill(pid, signal.SIGHUP)
        assert notify.until("READY=1") == RELOADED
        logfile.rename(tmp_path / "daemon.log.1")
        os.kill(pid, signal.SIGUSR1)
        os.kill(pid, signal.SIGHUP)  # the USR1, handed to the reactor first, is done by its READY
        assert notify.until("READY=1") == RELOADED
        assert not _gone(pid)
        assert f"SIGUSR1: reopened {logfile}" in logfile.read_text()
        c = client(port, "127.0.0.2")
        assert rcpt_code(c, "newbie@example.com") == 250
        os.kill(pid, signal.SIGTERM)
        assert c.getreply()[0] == 421
        deadline = time.monotonic() + 60  # the daemon is not our child: watch it go
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid) and not pidfile.exists()
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def _served_certificate(port: int, starttls: bool = False) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if starttls:
        c = client(port)
        c.starttls(context=context)
        der = c.sock.getpeercert(binary_form=True)
        c.quit()
        return der
    with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def _first_certificate(path: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificates(Path(path).read_bytes())[0].public_bytes(Encoding.DER)


def test_a_renewed_certificate_is_served_after_hup(twistd, cfg, notify, tmp_path):
    old, new = make_certs(tmp_path / "old"), make_certs(tmp_path / "new")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(old.cert, cert)
    shutil.copy(old.key, key)
    smtps = free_port()
    server = twistd("--tls-cert", str(cert), "--tls-key", str(key),
                    "--smtps", f"tcp:{smtps}:interface=127.0.0.1", config=cfg, env=notify.env)
    notify.until("READY=1")
    assert _served_certificate(smtps) == _first_certificate(old.cert)
    assert _served_certificate(server.port, starttls=True) == _first_certificate(old.cert)
    shutil.copy(new.cert, cert)  # certbot's renewal
    shutil.copy(new.key, key)
    assert notify.reload(server) == RELOADED
    assert _served_certificate(smtps) == _first_certificate(new.cert)
    assert _served_certificate(server.port, starttls=True) == _first_certificate(new.cert)
    shutil.copy(old.key, key)  # a key that does not match: the reload fails, the new pair serves on
    assert notify.reload(server) == RELOAD_FAILED
    assert _served_certificate(smtps) == _first_certificate(new.cert)
    assert f"reload: {cert}/{key}" in server.output()
