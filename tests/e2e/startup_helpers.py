"""Helpers for the start-up tests: real twistd processes started the ways
an administrator starts them (foreground, daemon, as root dropping to
``nobody``, without a privilege, from a systemd socket)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TWISTD

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="changes users or capabilities: needs root")

# linux/capability.h and linux/prctl.h
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_NET_BIND_SERVICE = 1, 2, 10
PR_CAPBSET_DROP = 24


def without(*caps: int):
    """A preexec_fn: the child (root) loses C{caps} for good, so the kernel
    refuses it what it refuses an ordinary user -- the interpreter lives
    under /root here, so a real ``nobody`` could not even start it."""
    def drop() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in caps:
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    return drop


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    out.update(extra)
    return out


def twistd_command(tmp: Path, args: list[str], *, daemon: bool = False, twistd_args=()) -> list[str]:
    """``twistd [-n] ... mailguard ARGS``: the log in C{tmp}; as a daemon,
    a pidfile there too."""
    mode = ["--pidfile", str(tmp / "twistd.pid")] if daemon else ["-n", "--pidfile", ""]
    return [TWISTD, "--logfile", str(tmp / "twistd.log"), *mode, *twistd_args, "mailguard", *args]


def public_dir(prefix: str) -> Path:
    """A fresh directory that ``nobody`` can enter (pytest's tmp_path is
    root's alone, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def wait_for_log(logfile: Path, needle: str, proc: subprocess.Popen | None = None,
                 timeout: float = 30.0) -> str:
    """The log's text once it contains C{needle} (bounded polling)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = logfile.read_text(errors="replace") if logfile.exists() else ""
        if needle in text:
            return text
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    text = logfile.read_text(errors="replace") if logfile.exists() else ""
    if proc is not None and proc.poll() is not None and proc.stdout is not None:
        text += f"\n(exited {proc.returncode}) " + (proc.stdout.read() or "")
    raise AssertionError(f"{needle!r} not in the log:\n{text}")
