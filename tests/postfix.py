"""A private Postfix instance for the interop tests: Debian's Postfix, run
with ``postfix -c DIR/etc start`` on its own ``main.cf``/``master.cf``,
queue and data directories under a temporary directory, logging to a file
(``maillog_file``, no syslog), listening on 127.0.0.1 only.  The system's
Postfix is never touched.

Postfix must start as root and runs its daemons as ``mail_owner``
(``postfix``, the user the Debian package made): the tests run as root in
CI (``.ci/run`` installs Postfix and the Cyrus SASL client modules its
SASL client needs).  ``stop()`` ends only this instance's processes, by
process id.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"

# What every instance here has; the test adds its role.
BASE_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
command_directory = {command_directory}
daemon_directory = {daemon_directory}
meta_directory = {meta_directory}
shlib_directory = {shlib_directory}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
alias_maps =
alias_database =
biff = no
smtpd_banner = $myhostname ESMTP
"""

# The services every instance needs; a test adds its listeners and clients.
BASE_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _default(name: str) -> str:
    return subprocess.run([POSTCONF, "-dh", name], capture_output=True, text=True, check=True).stdout.strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class PrivatePostfix:
    """One instance in a directory of its own under /tmp: etc (main.cf,
    master.cf and the maps the test writes there), queue, data, maillog.
    The directory is made readable by the ``postfix`` user (pytest's own
    temporary directories are not) and removed by L{stop}, unless the
    caller gave it (C{base}).  The benchmark (``bench/bench_throughput.py``)
    runs its Postfix peer with this class too.

    @param main_cf: the role's main.cf lines, after the base ones
        (``{etc}`` and ``{base}`` are replaced by the paths).
    @param master_cf: the role's master.cf lines (listeners, transports).
    @param files: more files for etc/ (maps), by name.
    @param base: the directory to use (it must not exist yet, and the
        ``postfix`` user must be able to reach it), kept by L{stop}.
    """

    def __init__(self, main_cf: str, master_cf: str = "", files: dict[str, str] | None = None,
                 base: Path | None = None):
        self._own = base is None
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="mailguard-postfix-"))
            os.chmod(base, 0o755)
        else:
            base.mkdir()
        self.base = base
        self.etc = base / "etc"
        self.maillog = base / "maillog"
        self.master_pid: int | None = None
        self.etc.mkdir(parents=True)
        (base / "queue").mkdir()
        (base / "data").mkdir()
        shutil.chown(base / "data", "postfix")
        main = BASE_MAIN_CF.format(
            base=base, command_directory=_default("command_directory"),
            daemon_directory=_default("daemon_directory"), meta_directory=_default("meta_directory"),
            shlib_directory=_default("shlib_directory"))
        role = main_cf.replace("{etc}", str(self.etc)).replace("{base}", str(base))
        (self.etc / "main.cf").write_text(main + role)
        (self.etc / "master.cf").write_text(BASE_MASTER_CF + master_cf)
        for name, text in (files or {}).items():
            (self.etc / name).write_text(text)

    def start(self) -> None:
        r = subprocess.run([POSTFIX, "-c", str(self.etc), "start"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
        pidfile = self.base / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not pidfile.exists():
            time.sleep(0.1)
        if r.returncode != 0 or not pidfile.exists():
            raise RuntimeError(f"postfix -c {self.etc} start failed ({r.returncode}): "
                               f"{r.stdout}{r.stderr}{self.log()[-3000:]}")
        self.master_pid = int(pidfile.read_text().split()[0])

    def stop(self) -> None:
        if self.master_pid is not None:
            self._stop_master()
        if self._own:
            shutil.rmtree(self.base, ignore_errors=True)

    def _stop_master(self) -> None:
        master, self.master_pid = self.master_pid, None
        children = _children(master)
        subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (_alive(master) or any(map(_alive, children))):
            time.sleep(0.1)
        for pid in [master, *children]:  # this instance's processes only
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        """Until something listens on 127.0.0.1:C{port} (a listener of
        this instance, while its master lives)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline or self.master_pid is None or not _alive(self.master_pid):
                    raise RuntimeError(f"Postfix is not listening on {port}:\n{self.log()[-3000:]}")
                time.sleep(0.1)

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 30.0, since: int = 0) -> re.Match:
        """The first match of C{pattern} in the log after offset C{since}."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log()[since:], re.M)
            if m or time.monotonic() > deadline:
                assert m, f"no {pattern!r} in the Postfix log:\n{self.log()[since:][-4000:]}"
                return m
            time.sleep(0.1)
