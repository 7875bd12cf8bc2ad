"""Start-up as an administrator meets it, with real twistd processes and
real SMTP clients: root dropping to ``nobody`` on a fresh spool, several
listeners of a kind (IPv4 and IPv6), port 0, a daemon, a systemd socket,
and the version."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time

import pytest

import mailguard
from tests.conftest import ROOT, TWISTD, Twistd, free_port, wait_for_port, write_config
from tests.e2e.startup_helpers import env, needs_root, public_dir, remove, twistd_command, wait_for_log

MESSAGE = b"Subject: hello\r\nFrom: a@sender.test\r\n\r\nHello John.\r\n"


def free_ipv6_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@needs_root
def test_root_dropping_to_nobody_on_a_fresh_spool_delivers_and_logs():
    """The spool does not exist: makeService creates it as root, it is
    given to nobody, and after the drop a message is delivered (250 means
    fsynced in nobody's Maildir) and an early talker reaches the security
    log."""
    public = public_dir("mailguard-uid-")
    try:
        cfg = write_config(public / "mailserver.cfg", {"SmtpGreetingDelay": "30",
                                                       "SmtpGreetingDelayExceptions": "NoDelay"})
        port = free_port()
        server = Twistd(public, ["--config", str(cfg), "--smtp", f"tcp:{port}:interface=127.0.0.1"], port,
                        twistd_args=["--uid", "nobody", "--gid", "nogroup"])
        try:
            assert not (public / "spool").exists() or (public / "spool").stat().st_uid == 65534
            with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.4", 0), timeout=10) as c:
                c.sendmail("a@sender.test", ["john@example.com"], MESSAGE)
            [delivered] = server.maildir_files("john@example.com")
            assert b"Hello John." in delivered.read_bytes()
            assert delivered.stat().st_uid == 65534
            with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.5", 0)) as s:
                s.sendall(b"EHLO bot.test\r\n")
                assert read_reply(s).startswith(b"554 5.7.1 ")
            seclog = server.spool / "security.log"
            deadline = time.monotonic() + 20
            while "early-talker\t127.0.0.5" not in (seclog.read_text() if seclog.exists() else ""):
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.05)
            assert seclog.stat().st_uid == 65534
            log = server.output()
            assert "set uid/gid 65534/65534" in log
            assert "run as nobody (uid 65534, gid 65534)" in log
            assert "Traceback" not in log
            # Every directory and file (the control socket and its lock,
            # made by root before the drop, are neither).
            entries = [p.lstat() for p in [server.spool, *server.spool.rglob("*")]]
            assert {st.st_uid for st in entries if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)} == {65534}
        finally:
            server.stop()
    finally:
        remove(public)


def test_an_ipv4_and_an_ipv6_listener_both_answer(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg")
    v4, v6 = free_port(), free_ipv6_port()
    server = Twistd(tmp_path, ["--config", str(cfg), "--smtp", f"tcp:{v4}:interface=127.0.0.1",
                               "--smtp", f"tcp6:{v6}:interface=\\:\\:1"], v4)
    try:
        wait_for_port("::1", v6, server.proc)
        for host, port, text in (("127.0.0.1", v4, b"over IPv4"), ("::1", v6, b"over IPv6")):
            with smtplib.SMTP(host, port, timeout=10) as c:
                assert c.ehlo("client.test")[0] == 250
                c.sendmail("a@sender.test", ["john@example.com"], MESSAGE + text + b"\r\n")
        bodies = sorted(f.read_bytes() for f in server.maildir_files("john@example.com"))
        assert len(bodies) == 2
        assert b"from client.test ([127.0.0.1])" in next(b for b in bodies if b"over IPv4" in b)
        assert b"from client.test ([::1])" in next(b for b in bodies if b"over IPv6" in b)
        log = server.output()
        assert f"listening: smtp on 127.0.0.1:{v4} (tcp:{v4}:interface=127.0.0.1)" in log
        assert f"listening: smtp on [::1]:{v6} (tcp6:{v6}:interface=\\:\\:1)" in log
    finally:
        server.stop()


def test_port_zero_listeners_are_logged_with_their_real_ports(tmp_path):
    """Without --config (the embedded example, loopback only): the log
    names the version, the demo accounts, each listener's kind and the
    port the system chose -- and that port answers as that kind."""
    logfile = tmp_path / "twistd.log"
    proc = subprocess.Popen(twistd_command(tmp_path, ["--spool", str(tmp_path / "spool"),
                                                      "--smtp", "tcp:0:interface=127.0.0.1",
                                                      "--submission", "tcp:0:interface=127.0.0.1"]),
                            cwd=str(tmp_path), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = wait_for_log(logfile, "listening: submission", proc)
        assert f"mailguard {mailguard.__version__} (Twisted " in log
        assert "no --config: running the embedded example configuration, whose demo accounts" in log
        ports = dict(re.findall(r"listening: (\w+) on 127\.0\.0\.1:(\d+) \(tcp:0:interface=127\.0\.0\.1\)", log))
        assert set(ports) == {"smtp", "submission"} and "0" not in ports.values()
        with smtplib.SMTP("127.0.0.1", int(ports["smtp"]), timeout=10) as c:
            c.ehlo("client.test")
            assert c.mail("a@sender.test")[0] == 250
        with smtplib.SMTP("127.0.0.1", int(ports["submission"]), timeout=10) as c:
            c.ehlo("client.test")
            assert c.mail("a@sender.test")[0] == 530  # submission: AUTH first
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_daemon_starts_serves_and_stops(tmp_path):
    """Without -n: the ports are bound before twistd forks; the daemon
    serves, and SIGTERM removes its pidfile."""
    cfg = write_config(tmp_path / "mailserver.cfg")
    port = free_port()
    out = subprocess.run(twistd_command(tmp_path, ["--config", str(cfg), "--spool", str(tmp_path / "spool"),
                                                   "--smtp", f"tcp:{port}:interface=127.0.0.1"], daemon=True),
                         cwd=str(tmp_path), env=env(), capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    pidfile = tmp_path / "twistd.pid"
    pid = int(pidfile.read_text())
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("a@sender.test", ["john@example.com"], MESSAGE)
        assert len(list((tmp_path / "spool/mail/example.com/john/Maildir/new").iterdir())) == 1
        assert f"configuration: {cfg}" in (tmp_path / "twistd.log").read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pidfile.exists():
        assert time.monotonic() < deadline, "the daemon did not stop"
        time.sleep(0.05)


def test_a_systemd_socket(tmp_path):
    """Socket activation: systemd passes a bound socket as fd 3, names it in
    LISTEN_FDNAMES, and sets LISTEN_PID to the service's pid."""
    cfg = write_config(tmp_path / "mailserver.cfg")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    args = ["--config", str(cfg), "--spool", str(tmp_path / "spool"), "--smtp", "systemd:domain=INET:name=mx"]
    # Like systemd: the socket becomes fd 3, and LISTEN_PID is the pid of
    # the process that runs twistd (exec keeps it).
    like_systemd = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3, inheritable=True); os.close(fd); "
                    "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])")
    proc = subprocess.Popen([sys.executable, "-c", like_systemd, str(sock.fileno()),
                             *twistd_command(tmp_path, args)], cwd=str(tmp_path),
                            env=env(LISTEN_FDS="1", LISTEN_FDNAMES="mx"), pass_fds=(sock.fileno(),),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sock.close()
    try:
        log = wait_for_log(tmp_path / "twistd.log", "listening: smtp", proc)
        assert f"listening: smtp on 127.0.0.1:{port} (systemd:domain=INET:name=mx)" in log
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("a@sender.test", ["john@example.com"], MESSAGE)
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.parametrize("command", [
    [TWISTD, "mailguard", "--version"],
    [sys.executable, "-m", "mailguard", "--version"],
], ids=["twistd", "python-m"])
def test_version(command):
    out = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(rf"mailguard {re.escape(mailguard.__version__)} \(Twisted \d+\.\d+\.\d+\S*, "
                        r"Python \d+\.\d+\.\d+\S*\)\n", out.stdout)
