"""Benchmark: reading real-size Kerio files.

Run: .venv/bin/python bench/bench_config.py [--repeats N] [--root DIR] [--flat]

Not part of the test suite.  Two files, generated in the real shape
(``tests/realshape.py``: settings in sections, records in lists):

  1. a mailserver.cfg whose relay IP group has 100,000 rows (single
     addresses and /24 prefixes, each row with its own description):
     ``python -m mailguard check`` on it -- wall time and peak RSS of the
     process (the target: at most 2 s and 100 MB);
  2. a mailserver.cfg (50 domains, a 2,000-row IP group) with a users.cfg
     of 20,000 users with D3S: passwords: ``check`` on it, and the
     start-up of ``twistd -n mailguard`` -- from the command to the first
     accepted connection on its port (the target: at most 5 s).

Each figure is the median of ``--repeats`` runs (default 5), with the
worst.  ``--root DIR`` runs another checkout's mailguard on the same files
(``--flat`` leaves Kerio's sections out and writes mailguard's settings at
the top level, so a checkout that does not read sections can be compared).  Everything listens on 127.0.0.1 and
is stopped by process id; the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "InternetHostname": ("Global", "mx.d0.example"),
    "SmtpGreetingDelay": ("SmtpServer", "25"),
    "VRFYEnabled": ("SmtpServer", "1"),
    "RelayControlIpGroupEnabled": (None, "1"),
    "RelayControlIpGroup": (None, "Trusted"),
}


def generate(work: Path, settings: dict, ip_rows: int, users: int, sections: bool) -> None:
    """Write the two files, in a child process: a process forked from a
    parent that just built 20 MB of XML in memory would start with that
    parent's resident pages, and the peak RSS measured would be the
    parent's, not mailguard's."""
    code = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from tests.realshape import mailserver_cfg, users_cfg
work = Path({str(work)!r})
(work / "ipgroup").mkdir()
mailserver_cfg(work / "ipgroup" / "mailserver.cfg", settings={settings!r}, domains=1, ip_rows={ip_rows},
               sections={sections!r})
(work / "real").mkdir()
mailserver_cfg(work / "real" / "mailserver.cfg", settings={settings!r}, domains=50, ip_rows=2000,
               sections={sections!r})
users_cfg(work / "real" / "users.cfg", users={users}, domains=50)
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def _env(root: Path) -> dict[str, str]:
    # No .pyc files written into the checkout measured.
    return dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")


def run_check(root: Path, cfg: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one ``python -m mailguard check``."""
    with tempfile.TemporaryFile() as err:  # not a pipe: 20,000 warning lines would fill it
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "mailguard", "check", str(cfg)], cwd=str(root),
                                env=_env(root), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"check failed ({proc.returncode}):\n{err.read().decode(errors='replace')}")
    return elapsed, usage.ru_maxrss / 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_twistd(root: Path, cfg: Path, work: Path) -> float:
    """Seconds from starting ``twistd -n mailguard`` to its first accepted
    connection; the process is then stopped."""
    twistd = str(Path(sys.executable).with_name("twistd"))
    port = _free_port()
    spool = work / "spool"
    shutil.rmtree(spool, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen([twistd, "--logfile", str(work / "twistd.log"), "--pidfile", "", "-n", "mailguard",
                             "--config", str(cfg), "--spool", str(spool),
                             "--smtp", f"tcp:{port}:interface=127.0.0.1"],
                            cwd=str(work), env=_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"twistd exited with {proc.returncode}; see {work / 'twistd.log'}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return time.perf_counter() - start
            except OSError:
                time.sleep(0.01)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _report(name: str, values: list[float], unit: str) -> None:
    print(f"  {name:<28} median {statistics.median(values):7.2f} {unit}   worst {max(values):7.2f} {unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--root", type=Path, default=ROOT, help="the mailguard checkout to run")
    parser.add_argument("--flat", action="store_true",
                        help="no sections: Kerio's left out, mailguard's at the top level")
    parser.add_argument("--ip-rows", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=20_000)
    args = parser.parse_args()
    settings = {k: (None, v) for k, (_, v) in SETTINGS.items()} if args.flat else SETTINGS

    work = Path(tempfile.mkdtemp(prefix="bench-config-"))
    try:
        generate(work, settings, args.ip_rows, args.users, not args.flat)
        big, real = work / "ipgroup", work / "real"
        size = lambda p: p.stat().st_size / 1e6  # noqa: E731
        print(f"mailguard at {args.root}; {args.repeats} runs each; load average {os.getloadavg()[0]:.2f}")

        print(f"{args.ip_rows:,}-row IP group ({size(big / 'mailserver.cfg'):.1f} MB): mailguard check")
        runs = [run_check(args.root, big / "mailserver.cfg") for _ in range(args.repeats)]
        _report("time", [t for t, _ in runs], "s")
        _report("peak RSS", [m for _, m in runs], "MB")

        print(f"{args.users:,} users with D3S: passwords, 50 domains, a 2,000-row IP group "
              f"({size(real / 'mailserver.cfg') + size(real / 'users.cfg'):.1f} MB)")
        runs = [run_check(args.root, real / "mailserver.cfg") for _ in range(args.repeats)]
        _report("check: time", [t for t, _ in runs], "s")
        _report("check: peak RSS", [m for _, m in runs], "MB")
        _report("twistd: start-up", [run_twistd(args.root, real / "mailserver.cfg", real)
                                     for _ in range(args.repeats)], "s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
