"""Expected operational errors on a real ``twistd -n mailguard``: each is
answered on the wire as it should be, and logged as one line (the errno
text, the path or the peer, what happens next) -- never a traceback.

- A full disk: the spool is a small tmpfs (mounted for the test, which
  needs root -- CI runs as root), filled up by the test.
- A gateway back-end and a relay host that are down: closed ports on
  loopback.

The same errors injected at their seams are ``tests/unit/test_operational.py``.
"""

from __future__ import annotations

import errno
import os
import smtplib
import subprocess

import pytest

from tests.conftest import eventually, free_port, write_config

MESSAGE = b"Subject: disk\r\n\r\nsmall\r\n"


@pytest.fixture
def tmpfs_spool(tmp_path):
    """A 1 MiB tmpfs at C{tmp_path}/spool, where the C{twistd} fixture puts
    the spool (request this fixture first: it is unmounted after the
    server stopped)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(spool)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (root is needed; CI runs as root): {mounted.stderr.strip()}")
    yield spool
    subprocess.run(["umount", "-l", str(spool)], check=True)


def fill(directory) -> os.PathLike:
    """Write a file in C{directory} until the file system is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def send(port: int, body: bytes, rcpt: str = "john@example.com", source: str = "127.0.0.3"):
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as c:
        c.ehlo("client.test")
        return c.sendmail("a@sender.test", [rcpt], body)


def test_a_full_disk_is_452_one_line_each_and_mail_is_accepted_again(tmpfs_spool, twistd, tmp_path):
    server = twistd(config=write_config(tmp_path / "mailserver.cfg"))
    filler = fill(tmpfs_spool)
    # A small message is written at the final dot; a large one as it arrives.
    for body in (MESSAGE, b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 9000):
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(server.port, body)
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (452, b"4.3.1")
    assert os.listdir(tmpfs_spool / "incoming") == []  # nothing half-written
    filler.unlink()
    assert send(server.port, MESSAGE) == {}
    assert [p.read_bytes().endswith(MESSAGE) for p in server.maildir_files("john@example.com")] == [True]
    server.stop()
    log = server.output()
    assert "Traceback" not in log
    full = [line for line in log.splitlines() if "No space left on device" in line]
    assert len(full) == 2, log
    incoming = f'error="No space left on device (ENOSPC)" path={tmpfs_spool / "incoming"}/'
    assert " store-failed session=" in full[0] and " ip=127.0.0.3 queue=" in full[0] and incoming in full[0]
    assert full[0].endswith(' then="452 4.3.1 sent; the client will retry"')
    assert " store-failed session=" in full[1] and incoming in full[1]
    assert full[1].endswith(' then="452 4.3.1 at the final dot; the client will retry"')


def test_a_down_back_end_and_relay_host_are_one_line_each(twistd, tmp_path):
    backend, relay = free_port(), free_port()  # nothing listens on either
    cfg = write_config(tmp_path / "mailserver.cfg", {
        "GatewayEnabled": "1",
        "GatewayDomains": "backend.test",
        "GatewayBackend": f"127.0.0.1:{backend}",
    })
    server = twistd("--relay-host", f"127.0.0.1:{relay}", config=cfg)
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.3", 0), timeout=10) as c:
        c.ehlo("client.test")
        assert c.mail("a@sender.test")[0] == 250
        code, text = c.rcpt("x@backend.test")
        assert (code, text[:5]) == (450, b"4.4.1")
    assert send(server.port, MESSAGE, rcpt="far@remote.test", source="127.0.0.2") == {}  # trusted: queued
    assert eventually(lambda: " result=deferred " in server.output())
    server.stop()
    log = server.output()
    assert "Traceback" not in log
    refused = "Connection was refused by other side: 111: Connection refused."
    [gateway] = [line for line in log.splitlines() if " gateway-unreachable " in line]
    assert gateway.endswith(f' gateway-unreachable backend=127.0.0.1:{backend} reason="cannot connect to the '
                            f'back-end: {refused}" then="its recipients get 450 4.4.1 until it answers" seconds=1.000')
    [host] = [line for line in log.splitlines() if " relay-suspended " in line]
    assert host.endswith(f' relay-suspended relay=127.0.0.1 reason="connect to 127.0.0.1: {refused}" '
                         f"seconds=300.000 port={relay}")
    [deferred] = [line for line in log.splitlines() if " result=deferred " in line]
    assert " to=far@remote.test relay=127.0.0.1 result=deferred status=4.4.1 " \
        f'reply="X-mailguard; connect to 127.0.0.1: {refused}" attempts=1 ' in deferred
    assert deferred.endswith(" retry=300.000")
