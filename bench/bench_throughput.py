"""Benchmark: durable SMTP throughput of mailguard against its peers.

Run (as root, for the private Postfix instance):

    .venv/bin/python bench/bench_throughput.py [--quick] [--repeats 3]
        [--only mailguard --only postfix ...] [--workload 1k ...] [--latency]
        [--candidate NAME=COPY] [--profile DIR] [--json FILE]

Not part of the test suite.  Four servers run side by side in one run, each
a separate process (tree) on 127.0.0.1, and Postfix's ``smtp-source`` loads
each in turn with the same workloads:

- ``mailguard``: the real ``twistd -n mailguard``, full policy on (relay IP
  group, VRFY, directory lookups at RCPT, a 25 s greeting delay with the load
  generator's 127.0.0.1 in the exception group); every message is fsynced
  into john@example.com's Maildir before the ``250``.
- ``postfix``: a private Postfix instance (``postfix -c DIR start``, its own
  queue and data directories under the temporary directory, never the
  system's), recipient validation on (``local_recipient_maps``), relaying
  refused, and every message discarded by ``discard(8)`` after cleanup has
  fsynced its queue file, which is before smtpd answers ``250``.
- ``aiosmtpd``: ``bench/peers/aiosmtpd_durable.py``, aiosmtpd with a handler
  that does the same durable Maildir write in a 10-thread executor.
- ``twisted``: ``bench/peers/twisted_durable.py``, plain twisted.mail
  (``smtp.ESMTP``, DATA handed to Python line by line) with an ``IMessage``
  that writes each line, then fsyncs in the reactor's thread pool, renames
  into ``new/`` and fsyncs ``new/``.

Workloads (``smtp-source -f from@test -t john@example.com``, a new
connection per message, as MX traffic comes):

- ``1k``:   ``-s 20 -l 1024``     messages/s at 20 parallel sessions;
- ``100k``: ``-s 20 -l 102400``   messages/s at 20 parallel sessions;
- ``20m``:  ``-s 1 -l 20971520 -m 1``  MB/s (MB = 10^6 bytes of payload).

Each measurement is the wall time of one ``smtp-source`` run; it is repeated
``--repeats`` times (interleaved across the servers, so drift on a shared
machine hits all of them alike) and the median is reported, with the ratio
to Postfix.  Every run is verified: ``smtp-source`` exits 0 (it aborts on
any unexpected reply) and the messages are counted where they landed (files
in the Maildir ``new/``; ``status=sent`` lines in Postfix's log).  The CPU
time (user+sys from ``/proc``, all threads, or all of Postfix's processes)
of each server is reported per message, with the event-loop thread's share
for the Python servers, and, per run, the CPU the rest of the machine used
meanwhile (the noise on a shared machine).

``--candidate NAME=DIR`` adds mailguard from another checkout as one more
server, interleaved with the others: the way to measure a change made in a
copy of the repository.  ``--latency`` then times each SMTP step of a probe
session while smtp-source keeps 19 sessions busy (where a message's time
goes).  ``--profile DIR`` then runs ``py-spy record`` on mailguard during a
longer ``1k`` run and five ``20m`` messages, writes the collapsed stacks to
DIR and prints where the reactor thread's and the disk threads' samples land
(py-spy from ``$PATH`` or ``--py-spy``).

Everything started is stopped (by process id) on exit, error or Ctrl-C.
A full run takes about 3 minutes (more on a busy machine; ``--max-time``
bounds the repeats); ``--quick`` under one.  ``docs/performance.md`` has
the figures and what they mean.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
PYTHON = sys.executable
TWISTD = str(Path(sys.executable).with_name("twistd"))
MAX_SIZE = 31457280  # MaxMessageSize for every server: 20 MB + smtp-source's headers
DOMAIN = "example.com"
RCPT = "john@example.com"
SENDER = "from@test"
RUN_TIMEOUT = 180.0  # seconds for one smtp-source run before it is killed


def find_tool(name: str, *extra: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/lib/postfix/sbin", *extra):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


# --- processes: everything started is recorded and stopped -------------------

_servers: list["Server"] = []


def _stop_all() -> None:
    while _servers:
        s = _servers.pop()
        try:
            s.stop()
        except Exception as e:  # keep stopping the others
            print(f"  warning: stopping {s.name}: {e}", file=sys.stderr)


def _on_signal(signum, frame):
    _stop_all()
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, alive, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("server exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(5)
                banner = s.recv(512)
                if banner.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no SMTP banner on 127.0.0.1:{port} after {timeout:.0f} s")


def proc_cpu(pid: int, children: bool = False) -> float:
    """user+sys seconds of a process (all its threads); with C{children},
    plus those of its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_sys(pid: int) -> float:
    """The sys (kernel) part of a process's CPU seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """user+sys seconds of each thread of a process, by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def child_pids(ppid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            pids.append(int(name))
    return pids


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def count_files(d: Path) -> int:
    try:
        with os.scandir(d) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


def empty_dir(d: Path) -> None:
    if d.is_dir():
        with os.scandir(d) as it:
            for e in it:
                os.unlink(e.path)


# --- the servers ---------------------------------------------------------------

class Server:
    name = "?"
    port = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def delivered(self) -> int:
        """Messages durably accepted so far (counted where they landed)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Between runs, outside the timing: drop what was delivered."""

    def cpu(self) -> float:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        raise NotImplementedError


class ProcessServer(Server):
    """A server that is one process we start (and stop) ourselves."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / self.name
        self.dir.mkdir()
        self.port = free_port()
        self.log = self.dir / "output.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        root = getattr(self, "root", ROOT)
        env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.command(), cwd=str(self.dir), env=env,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        _servers.append(self)
        try:
            wait_port(self.port, lambda: self.proc.poll() is None)
        except RuntimeError as e:
            raise RuntimeError(f"{self.name}: {e}\n{self.tail()}") from None

    def tail(self, n: int = 4000) -> str:
        text = ""
        for p in (self.log, self.dir / "twistd.log"):
            if p.exists():
                text += p.read_text(errors="replace")[-n:]
        return text

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    @property
    def maildir_new(self) -> Path:
        raise NotImplementedError

    def delivered(self) -> int:
        return count_files(self.maildir_new)

    def reset(self) -> None:
        empty_dir(self.maildir_new)


MAILGUARD_CFG = """<?xml version="1.0" encoding="UTF-8"?>
<config>
  <variable name="InternetHostname">mx.example.com</variable>
  <variable name="VRFYEnabled">1</variable>
  <variable name="MaxMessageSize">{max_size}</variable>
  <variable name="SmtpGreetingDelay">25</variable>
  <variable name="SmtpGreetingDelayExceptions">NoDelay</variable>
  <variable name="SmtpGreetingDelayLog">1</variable>
  <variable name="RelayControlIpGroupEnabled">1</variable>
  <variable name="RelayControlIpGroup">Trusted</variable>
  <variable name="RelayControlAuthEnabled">1</variable>
  <list name="Domain">
    <listitem><variable name="Domain">example.com</variable><variable name="Aliases">example.net</variable></listitem>
  </list>
  <list name="IpAddressGroup">
    <listitem><variable name="Group">Trusted</variable><variable name="Address">127.0.0.2</variable><variable name="Enabled">1</variable></listitem>
    <listitem><variable name="Group">NoDelay</variable><variable name="Address">127.0.0.1</variable><variable name="Enabled">1</variable></listitem>
  </list>
  <list name="User">
    <listitem><variable name="Name">john</variable><variable name="Domain">example.com</variable><variable name="Password">john-secret</variable><variable name="Enabled">1</variable></listitem>
    <listitem><variable name="Name">jane</variable><variable name="Domain">example.com</variable><variable name="Password">jane-secret</variable><variable name="Enabled">1</variable></listitem>
  </list>
  <list name="Alias">
    <listitem><variable name="Name">sales</variable><variable name="Domain">example.com</variable><variable name="DeliverTo">john@example.com,jane@example.com</variable></listitem>
  </list>
</config>
"""


class Mailguard(ProcessServer):
    name = "mailguard"
    root = ROOT  # --mailguard-root: measure another checkout (an A/B copy)

    def command(self) -> list[str]:
        cfg = self.dir / "mailserver.cfg"
        cfg.write_text(MAILGUARD_CFG.format(max_size=MAX_SIZE))
        return [TWISTD, "--logfile", str(self.dir / "twistd.log"), "--pidfile", "", "-n", "mailguard",
                "--config", str(cfg), "--spool", str(self.dir / "spool"),
                "--smtp", f"tcp:{self.port}:interface=127.0.0.1:backlog=1024"]

    @property
    def maildir_new(self) -> Path:
        return self.dir / "spool" / "mail" / DOMAIN / "john" / "Maildir" / "new"


class MailguardMetrics(Mailguard):
    """mailguard with ``--metrics`` on (``--metrics``), scraped every second
    while it runs -- Prometheus usually scrapes every 15 s -- against
    "mailguard" without ``--metrics`` in the same run: what counting and
    being scraped cost."""

    name = "mailguard+metrics"

    def command(self) -> list[str]:
        self.metrics_port = free_port()
        return super().command() + ["--metrics", f"tcp:{self.metrics_port}:interface=127.0.0.1"]

    def start(self) -> None:
        super().start()
        self.scrapes = 0
        self._stopping = threading.Event()
        threading.Thread(target=self._scrape, daemon=True).start()

    def _scrape(self) -> None:
        import urllib.request

        while not self._stopping.wait(1.0):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                    if b"mailguard_messages_accepted_total" in r.read():
                        self.scrapes += 1
            except OSError:
                pass

    def stop(self) -> None:
        if getattr(self, "_stopping", None) is not None:
            self._stopping.set()
            print(f"  {self.name}: {self.scrapes} scrapes of /metrics", file=sys.stderr)
        super().stop()


class Candidate(Mailguard):
    """mailguard from another checkout (``--candidate [NAME=]DIR``),
    measured in the same run, interleaved with the others: an A/B of a
    change made in a copy of the repository."""

    def __init__(self, tmp: Path, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        super().__init__(tmp)


class Aiosmtpd(ProcessServer):
    name = "aiosmtpd"

    def command(self) -> list[str]:
        return [PYTHON, str(PEERS / "aiosmtpd_durable.py"), "--port", str(self.port),
                "--maildir", str(self.dir / "Maildir"), "--max-size", str(MAX_SIZE), "--threads", "10"]

    @property
    def maildir_new(self) -> Path:
        return self.dir / "Maildir" / "new"


class TwistedMail(ProcessServer):
    name = "twisted"

    def command(self) -> list[str]:
        return [PYTHON, str(PEERS / "twisted_durable.py"), "--port", str(self.port),
                "--maildir", str(self.dir / "Maildir"), "--max-size", str(MAX_SIZE)]

    @property
    def maildir_new(self) -> Path:
        return self.dir / "Maildir" / "new"


# The benchmark's role; the rest of main.cf and master.cf (a private
# instance: nothing here touches the system's Postfix) is the interop
# tests' (tests/postfix.py).
POSTFIX_MAIN_CF = """\
myhostname = mx.example.com
mydomain = example.com
myorigin = $myhostname
mydestination = example.com, example.net
# Full policy, like mailguard's: only 127.0.0.2 may relay; unknown local
# users are refused at RCPT.
mynetworks = 127.0.0.2/32
local_recipient_maps = inline:{{john=ok, jane=ok, sales=ok}}
# Every accepted message is discarded after cleanup fsynced it.
local_transport = discard:
default_transport = discard:
relay_transport = discard:
virtual_transport = discard:
message_size_limit = {max_size}
"""

POSTFIX_MASTER_CF = "127.0.0.1:{port} inet n - n - - smtpd\n"


class Postfix(Server):
    """A private Postfix instance in DIR (``tests.postfix.PrivatePostfix``):
    DIR/etc (main.cf, master.cf), DIR/queue, DIR/data, DIR/maillog.
    Started and stopped with ``postfix -c DIR/etc``; no chroot; the
    system's Postfix is not touched."""

    name = "postfix"

    def __init__(self, tmp: Path, postfix: str) -> None:
        self.base = tmp / "postfix"
        self.port = free_port()
        self.instance = None
        self._sent_offset = 0
        self._sent_count = 0

    @property
    def master_pid(self) -> int | None:
        return self.instance.master_pid if self.instance is not None else None

    def start(self) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.postfix import PrivatePostfix

        self.instance = PrivatePostfix(POSTFIX_MAIN_CF.format(max_size=MAX_SIZE),
                                       POSTFIX_MASTER_CF.format(port=self.port), base=self.base)
        _servers.append(self)
        self.instance.start()
        wait_port(self.port, lambda: pid_alive(self.master_pid))

    def stop(self) -> None:
        if self.instance is not None:
            self.instance.stop()

    @property
    def pid(self) -> int:
        return self.master_pid

    def cpu(self) -> float:
        """The master with its reaped children, plus its live children
        (smtpd, cleanup, qmgr, trivial-rewrite, discard, postlogd...)."""
        total = proc_cpu(self.master_pid, children=True)
        for pid in child_pids(self.master_pid):
            try:
                total += proc_cpu(pid)
            except OSError:
                pass
        return total

    def delivered(self) -> int:
        """``status=sent`` lines in the instance's log: messages that were
        queued (fsynced before the 250) and then discarded."""
        p = self.base / "maillog"
        if not p.exists():
            return 0
        with open(p, "rb") as f:
            f.seek(self._sent_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._sent_count += data[:end].count(b"status=sent")
        self._sent_offset += end
        return self._sent_count


# --- the load ------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    sessions: int
    length: int
    messages: int
    unit: str  # "msg/s" or "MB/s"
    reuse: bool = False  # smtp-source -d: several messages per connection

    def args(self) -> list[str]:
        a = ["-s", str(self.sessions), "-l", str(self.length), "-m", str(self.messages),
             "-f", SENDER, "-t", RCPT]
        if self.reuse:
            a.insert(0, "-d")
        return a

    def describe(self) -> str:
        return f"smtp-source {' '.join(self.args())}"


@dataclass
class Run:
    seconds: float
    cpu: float  # server user+sys seconds, all threads/processes
    messages: int
    length: int
    main_cpu: float = 0.0  # the event-loop thread alone (Python servers)
    sys_cpu: float = 0.0  # the kernel part of cpu (Python servers)
    background: float = 0.0  # CPU seconds used by processes not in the test
    loadgen: float = 0.0  # smtp-source's CPU seconds
    idle: float = 0.0  # CPU seconds the machine's CPUs were idle (all CPUs)

    def rate(self, unit: str) -> float:
        if unit == "MB/s":
            return self.messages * self.length / self.seconds / 1e6
        return self.messages / self.seconds


@dataclass
class Results:
    runs: dict = field(default_factory=lambda: collections.defaultdict(list))  # (server, workload) -> [Run]


def machine_busy() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit: float, max_wait: float) -> float:
    """Wait (at most C{max_wait} s) until the machine's busy CPU, measured
    over half a second, is under C{limit} CPUs; the last share measured.
    Other people's test suites on a shared machine are the main noise."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy(), time.monotonic()
        time.sleep(0.5)
        share = (machine_busy() - b0) / (time.monotonic() - t0)
        if share < limit or time.monotonic() >= deadline:
            return share


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


QUIET = {"limit": 0.3, "max_wait": 0.0}  # --quiet-wait sets max_wait


def run_load(smtp_source: str, server: Server, w: Workload) -> Run:
    server.reset()
    before = server.delivered()
    os.sync()  # write back the previous run's dirty pages outside the timing
    if QUIET["max_wait"] > 0:
        wait_quiet(QUIET["limit"], QUIET["max_wait"])
    python_server = isinstance(server, ProcessServer)
    main0 = thread_cpu(server.pid).get(server.pid, 0.0) if python_server else 0.0
    sys0 = proc_sys(server.pid) if python_server else 0.0
    busy0, kids0, self0 = machine_busy(), children_cpu(), time.process_time()
    cpu0 = server.cpu()
    t0 = time.perf_counter()
    try:
        r = subprocess.run([smtp_source, *w.args(), f"127.0.0.1:{server.port}"],
                           capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{server.name}: {w.describe()} did not finish in {RUN_TIMEOUT:.0f} s") from None
    elapsed = time.perf_counter() - t0
    cpu = server.cpu() - cpu0
    main = thread_cpu(server.pid).get(server.pid, 0.0) - main0 if python_server else 0.0
    sys_cpu = proc_sys(server.pid) - sys0 if python_server else 0.0
    # What the rest of the machine took meanwhile: all busy CPU time less
    # the server's, smtp-source's (our child) and ours.
    loadgen = children_cpu() - kids0
    busy = machine_busy() - busy0
    background = max(0.0, busy - cpu - loadgen - (time.process_time() - self0))
    idle = max(0.0, elapsed * (os.cpu_count() or 1) - busy)
    if r.returncode != 0:
        raise RuntimeError(f"{server.name}: {w.describe()} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    # Count what landed.  Maildir servers: at once (the 250 came after the
    # link was fsynced).  Postfix: discard runs after the 250, so wait.
    deadline = time.monotonic() + 60
    got = server.delivered() - before
    while got < w.messages and time.monotonic() < deadline:
        time.sleep(0.1)
        got = server.delivered() - before
    if got != w.messages:
        raise RuntimeError(f"{server.name}: {w.describe()}: {got} messages landed, expected {w.messages}")
    return Run(elapsed, cpu, w.messages, w.length, main, sys_cpu, background, loadgen, idle)


# --- the report ------------------------------------------------------------------

def machine() -> dict:
    info = {"nproc": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            info["cpu"] = m.group(1) if m else "?"
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    r = subprocess.run(["findmnt", "-no", "SOURCE,FSTYPE,OPTIONS", "--target", tempfile.gettempdir()],
                       capture_output=True, text=True)
    info["tmp_fs"] = r.stdout.strip() or "?"
    try:
        import twisted
        info["twisted"] = twisted.__version__
    except ImportError:
        pass
    try:
        import aiosmtpd
        info["aiosmtpd"] = aiosmtpd.__version__
    except ImportError:
        pass
    postconf = find_tool("postconf")
    if postconf:
        r = subprocess.run([postconf, "-dh", "mail_version"], capture_output=True, text=True)
        info["postfix"] = r.stdout.strip()
    return info


def fsync_latency(d: Path, n: int = 200) -> tuple[float, float]:
    """Median ms for fsync of a fresh 1 KB file, and of its directory."""
    files, dirs = [], []
    for i in range(n):
        p = d / f"probe{i}"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x" * 1024)
        t = time.perf_counter()
        os.fsync(fd)
        files.append(time.perf_counter() - t)
        os.close(fd)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        t = time.perf_counter()
        os.fsync(dfd)
        dirs.append(time.perf_counter() - t)
        os.close(dfd)
        os.unlink(p)
    return statistics.median(files) * 1e3, statistics.median(dirs) * 1e3


def print_table(servers: list[str], workloads: list[Workload], res: Results) -> dict:
    summary: dict = {}
    head = f"{'server':<10}" + "".join(f"{w.name + ' (' + w.unit + ')':>24}" for w in workloads)
    print(head)
    print("-" * len(head))
    for s in servers:
        cells = ""
        for w in workloads:
            runs = res.runs.get((s, w.name))
            if not runs:
                cells += f"{'-':>24}"
                continue
            med = statistics.median(r.rate(w.unit) for r in runs)
            summary[(s, w.name)] = med
            base = res.runs.get(("postfix", w.name))
            ratio = ""
            if base:
                ratio = f" ({med / statistics.median(r.rate(w.unit) for r in base):.2f}x)"
            num = f"{med:.1f}" if w.unit == "MB/s" else f"{med:.0f}"
            cells += f"{num + ratio:>24}"
        print(f"{s:<10}{cells}")
    print("(median of the runs; in brackets: the ratio to Postfix)")
    return summary


def print_runs(servers, workloads, res: Results) -> None:
    print("\nall runs (rate; wall seconds; CPU busy outside the server and smtp-source, in % of "
          "one CPU: other people's processes, and kernel threads such as jbd2 and ksoftirqd)")
    for w in workloads:
        for s in servers:
            runs = res.runs.get((s, w.name))
            if runs:
                rates = ", ".join(f"{r.rate(w.unit):.1f}" for r in runs)
                secs = ", ".join(f"{r.seconds:.2f}" for r in runs)
                bg = ", ".join(f"{r.background / r.seconds * 100:.0f}%" for r in runs)
                print(f"  {w.name:<5} {s:<10} {rates}   ({secs} s; rest of the machine: {bg})")


def print_cpu(servers, w: Workload, res: Results) -> None:
    print(f"\nserver CPU over the {w.name} runs (user+sys, all threads/processes), "
          f"per message and as a share of the wall time:")
    for s in servers:
        runs = res.runs.get((s, w.name))
        if not runs:
            continue
        cpu = sum(r.cpu for r in runs)
        msgs = sum(r.messages for r in runs)
        wall = sum(r.seconds for r in runs)
        main = sum(r.main_cpu for r in runs)
        line = f"  {s:<10} {cpu / msgs * 1e3:6.2f} ms CPU/message   {cpu / wall * 100:5.0f}% of one CPU"
        if main:
            kernel = sum(r.sys_cpu for r in runs)
            line += (f" ({kernel / cpu * 100:.0f}% in the kernel); event-loop thread "
                     f"{main / msgs * 1e3:.2f} ms/message, busy {main / wall * 100:.0f}% of the wall time")
        line += (f"\n  {'':<10} meanwhile smtp-source {sum(r.loadgen for r in runs) / wall * 100:.0f}%, "
                 f"rest of the machine {sum(r.background for r in runs) / wall * 100:.0f}%, "
                 f"idle {sum(r.idle for r in runs) / wall * 100:.0f}% (of one CPU; {os.cpu_count()} CPUs)")
        print(line)


# --- latency under load ------------------------------------------------------------

PROBE_STEPS = ("connect+220", "HELO", "MAIL", "RCPT", "DATA", "body+250", "QUIT")
PROBE_BODY = (b"From: <from@test>\r\nTo: <john@example.com>\r\nSubject: probe\r\n\r\n"
              + b"".join(b"%02d" % i + b"X" * 76 + b"\r\n" for i in range(13)))


def _reply(sock: socket.socket, buf: bytearray) -> bytes:
    """The last line of one (possibly multi-line) SMTP reply."""
    while True:
        while b"\r\n" in buf:
            i = buf.index(b"\r\n")
            line = bytes(buf[:i])
            del buf[:i + 2]
            if line[3:4] != b"-":
                return line
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed by the server")
        buf += chunk


def probe_session(port: int) -> dict[str, float]:
    """One whole SMTP transaction, timing each step (seconds)."""
    times = {}
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        buf = bytearray()
        for step, cmd, want in (("connect+220", None, b"220"), ("HELO", b"HELO probe\r\n", b"250"),
                                ("MAIL", b"MAIL FROM:<from@test>\r\n", b"250"),
                                ("RCPT", b"RCPT TO:<john@example.com>\r\n", b"250"),
                                ("DATA", b"DATA\r\n", b"354"), ("body+250", PROBE_BODY + b".\r\n", b"250"),
                                ("QUIT", b"QUIT\r\n", b"221")):
            if cmd:
                sock.sendall(cmd)
            line = _reply(sock, buf)
            if not line.startswith(want):
                raise RuntimeError(f"probe: {step}: {line!r}")
            now = time.perf_counter()
            times[step] = now - t
            t = now
    return times


def latency(smtp_source: str, server: Server, n: int = 200) -> dict[str, float]:
    """Median time of each step of a probe session, one after the other,
    while smtp-source keeps 19 other sessions busy (1 KB messages)."""
    load = subprocess.Popen([smtp_source, "-s", "19", "-l", "1024", "-m", "1000000", "-f", SENDER,
                             "-t", RCPT, f"127.0.0.1:{server.port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        if load.poll() is not None:
            raise RuntimeError(f"{server.name}: smtp-source exited {load.returncode} under the probe")
        samples = [probe_session(server.port) for _ in range(n)]
    finally:
        load.terminate()
        try:
            load.wait(10)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait(5)
    return {step: statistics.median(s[step] for s in samples) for step in PROBE_STEPS}


def print_latency(rows: dict[str, dict[str, float]]) -> None:
    print("\nlatency of one session's steps while 19 smtp-source sessions load the server "
          "(1 KB; median ms of 200 probe messages):")
    print(f"{'server':<10}" + "".join(f"{s:>12}" for s in PROBE_STEPS) + f"{'total':>9}")
    for name, r in rows.items():
        print(f"{name:<10}" + "".join(f"{r[s] * 1e3:>12.2f}" for s in PROBE_STEPS)
              + f"{sum(r.values()) * 1e3:>9.2f}")


# --- profiling -------------------------------------------------------------------

def profile(py_spy: str, smtp_source: str, server: Server, workloads: list[Workload], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for w in workloads:
        # Collapsed stacks ("frame;frame;... count"), the input of every
        # flame-graph tool; summarised below, rendered if a tool is around.
        raw = out / f"mailguard-{w.name}.txt"
        svg = out / f"mailguard-{w.name}.svg"
        spy = subprocess.Popen([py_spy, "record", "--pid", str(server.pid), "--rate", "500",
                                "--threads", "--format", "raw", "--output", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        time.sleep(1.0)  # let py-spy attach
        try:
            threads0 = thread_cpu(server.pid)
            run = run_load(smtp_source, server, w)
            threads1 = thread_cpu(server.pid)
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
        print(f"\nprofile of mailguard, {w.describe()}: {run.rate(w.unit):.1f} {w.unit} "
              f"(under py-spy), {run.cpu / run.seconds * 100:.0f}% of one CPU; samples in {raw}")
        main = threads1.get(server.pid, 0) - threads0.get(server.pid, 0)
        others = sum(v - threads0.get(t, 0) for t, v in threads1.items() if t != server.pid)
        print(f"  reactor thread busy {main / run.seconds * 100:.0f}% of the wall time; "
              f"the {len(threads1) - 1} other threads (disk work) {others / run.seconds * 100:.0f}% in all")
        if raw.exists():
            summarise_profile(raw)
            render_svg(raw, svg)


def render_svg(raw: Path, svg: Path) -> None:
    """A flame graph from collapsed stacks, if flamegraph.pl or inferno is
    around; the raw file is the portable artefact either way."""
    for tool in ("inferno-flamegraph", "flamegraph.pl"):
        exe = shutil.which(tool)
        if exe:
            with open(raw) as src, open(svg, "w") as dst:
                subprocess.run([exe], stdin=src, stdout=dst)
            return


def summarise_profile(raw: Path, top: int = 12) -> None:
    """From collapsed stacks (``thread (TID): NAME;frame;... count`` lines):
    the share of samples per thread kind, then for the reactor thread
    (``MainThread``) and for the pool threads the functions where the
    samples land (self, by source line) and the mailguard functions they
    pass through (inclusive).  py-spy counts a thread that is running or
    blocked in the kernel (e.g. waiting for the journal in open()), not one
    idle in epoll_wait or on a lock."""
    kinds: collections.Counter = collections.Counter()
    self_c = collections.defaultdict(collections.Counter)
    incl = collections.defaultdict(collections.Counter)
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        thread = frames[0].rpartition(": ")[2]
        if thread == "MainThread":
            kind = "reactor"
        elif thread.startswith("PoolThread"):
            kind = re.sub(r"-?\d+$", "", thread)
        else:
            kind = "other"
        total += n
        kinds[kind] += n
        names = [re.sub(r" \(.*?(site-packages/|/main/|/lib/python3[.\d]*/)", " (", f) for f in frames[1:]]
        if names:
            self_c[kind][names[-1]] += n
        for f in {re.sub(r":\d+\)$", ")", f) for f in names}:
            incl[kind][f] += n
    if not total:
        print("  (no samples)")
        return
    print("  samples by thread: " + ", ".join(f"{k} {c * 100 / total:.0f}%" for k, c in kinds.most_common()))
    for kind, c_kind in kinds.most_common(2):
        print(f"  {kind}: where its samples land (self, % of its {c_kind}):")
        for f, c in self_c[kind].most_common(top):
            print(f"    {c * 100 / c_kind:5.1f}%  {f[:120]}")
        print(f"  {kind}: mailguard functions on the stack (inclusive):")
        shown = 0
        for f, c in incl[kind].most_common():
            if "mailguard/" in f:
                print(f"    {c * 100 / c_kind:5.1f}%  {f[:120]}")
                shown += 1
                if shown >= top:
                    break


# --- main --------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages, one repeat (about a minute)")
    ap.add_argument("--repeats", type=int, help="runs per measurement (default 3; --quick: 1)")
    ap.add_argument("--only", action="append", choices=["mailguard", "postfix", "aiosmtpd", "twisted"],
                    help="servers to run (repeatable; default all)")
    ap.add_argument("--messages-1k", type=int, help="messages per 1k run (default 3000; --quick 600)")
    ap.add_argument("--messages-100k", type=int, help="messages per 100k run (default 600; --quick 150)")
    ap.add_argument("--workload", action="append", choices=["1k", "1k-d", "100k", "20m"],
                    help="workloads to run (repeatable; default 1k, 100k, 20m)")
    ap.add_argument("--reuse", action="store_true",
                    help="also a 1 KB workload with smtp-source -d (messages share connections)")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                    help="before each run, wait up to this long for the machine to be idle "
                         "(under 0.3 CPU busy); for shared machines")
    ap.add_argument("--latency", action="store_true",
                    help="afterwards, time each SMTP step of a probe session while smtp-source "
                         "keeps 19 sessions busy (where a message's time goes)")
    ap.add_argument("--profile", metavar="DIR", help="then profile mailguard with py-spy, output in DIR")
    ap.add_argument("--py-spy", default=None, help="py-spy executable (default: from $PATH)")
    ap.add_argument("--mailguard-root", metavar="DIR",
                    help="run mailguard from this checkout instead (to measure a change in a copy)")
    ap.add_argument("--candidate", metavar="[NAME=]DIR", action="append", default=[],
                    help="also run mailguard from this checkout, as server NAME (default "
                         "'candidate'); repeatable (A/B of changes made in copies)")
    ap.add_argument("--metrics", action="store_true",
                    help="also run this mailguard with --metrics, scraped every second, as server "
                         "'mailguard+metrics' (the cost of the metrics, in the same run)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--max-time", type=float, default=600.0, metavar="SECONDS",
                    help="stop starting new runs after this long and report what was measured")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, spools)")
    args = ap.parse_args()

    smtp_source = find_tool("smtp-source")
    if not smtp_source:
        print("smtp-source not found: apt-get install postfix (it ships smtp-source)", file=sys.stderr)
        return 2
    repeats = args.repeats or (1 if args.quick else 3)
    n1k = args.messages_1k or (600 if args.quick else 3000)
    n100k = args.messages_100k or (150 if args.quick else 600)
    workloads = [
        Workload("1k", 20, 1024, n1k, "msg/s"),
        Workload("100k", 20, 102400, n100k, "msg/s"),
        Workload("20m", 1, 20971520, 1, "MB/s"),
    ]
    if args.reuse or (args.workload and "1k-d" in args.workload):
        workloads.insert(1, Workload("1k-d", 20, 1024, n1k, "msg/s", reuse=True))
    if args.workload:
        workloads = [w for w in workloads if w.name in args.workload]
    wanted = args.only or ["mailguard", "postfix", "aiosmtpd", "twisted"]
    postfix = find_tool("postfix")
    if "postfix" in wanted and (not postfix or os.geteuid() != 0):
        print("skipping postfix: needs the postfix package and root (no ratios)", file=sys.stderr)
        wanted = [s for s in wanted if s != "postfix"]
    py_spy = None
    if args.profile:
        py_spy = args.py_spy or shutil.which("py-spy")
        if not py_spy:
            print("--profile needs py-spy (pip install py-spy; or --py-spy PATH)", file=sys.stderr)
            return 2

    QUIET["max_wait"] = args.quiet_wait
    if args.mailguard_root:
        Mailguard.root = Path(args.mailguard_root).resolve()
    candidates = {}
    for i, spec in enumerate(args.candidate):
        label, sep, d = spec.rpartition("=")
        label = label if sep else ("candidate" if len(args.candidate) == 1 else f"cand{i + 1}")
        candidates[label] = Path(d).resolve()
    wanted[1 if "mailguard" in wanted else 0:0] = list(candidates)
    if args.metrics:
        wanted.insert(wanted.index("mailguard") + 1 if "mailguard" in wanted else 0, MailguardMetrics.name)
    atexit.register(_stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    # Postfix's unprivileged daemons must reach their queue under tmp.
    os.chmod(tmp, 0o755)
    info = machine()
    info["fsync_ms"], info["dir_fsync_ms"] = fsync_latency(tmp)
    print(f"machine: {info.get('cpu', '?')}, {info['nproc']} CPUs, {info.get('mem_gb', '?')} GB; "
          f"kernel {info['kernel']}; {tempfile.gettempdir()} on {info['tmp_fs']}")
    print(f"disk: fsync of a 1 KB file {info['fsync_ms']:.2f} ms, of a directory "
          f"{info['dir_fsync_ms']:.2f} ms (medians)")
    print(f"Python {info['python']}, Twisted {info.get('twisted', '?')}, aiosmtpd "
          f"{info.get('aiosmtpd', '?')}, Postfix {info.get('postfix', '?')}; load: {smtp_source}")
    for w in workloads:
        print(f"  {w.name}: {w.describe()} 127.0.0.1:PORT")
    print(f"repeats: {repeats} (median reported)\n")

    res = Results()
    t_start = time.monotonic()
    try:
        servers: dict[str, Server] = {}
        for name in wanted:
            if name in candidates:
                s = Candidate(tmp, name, candidates[name])
            elif name == "postfix":
                s = Postfix(tmp, postfix)
            else:
                s = {"mailguard": Mailguard, "aiosmtpd": Aiosmtpd, "twisted": TwistedMail,
                     MailguardMetrics.name: MailguardMetrics}[name](tmp)
            s.start()
            servers[name] = s
            print(f"  started {name} on 127.0.0.1:{s.port} (pid {s.pid})", file=sys.stderr)
        # Warm-up: lazy imports, Postfix spawning its daemons, first allocations.
        warm = Workload("warm", 20, 1024, 200, "msg/s")
        for s in servers.values():
            run_load(smtp_source, s, warm)
        for rep in range(repeats):
            if rep and time.monotonic() - t_start > args.max_time:
                print(f"  --max-time {args.max_time:.0f} s reached: {rep} repeat(s) only", file=sys.stderr)
                break
            for w in workloads:
                for name, s in servers.items():
                    run = run_load(smtp_source, s, w)
                    res.runs[(name, w.name)].append(run)
                    print(f"  [{rep + 1}/{repeats}] {w.name:<5} {name:<10} {run.rate(w.unit):8.1f} {w.unit} "
                          f"({run.seconds:.2f} s, server CPU {run.cpu:.2f} s, "
                          f"rest of the machine {run.background / run.seconds * 100:.0f}% of a CPU)",
                          file=sys.stderr)
        print()
        names = list(servers)
        summary = print_table(names, workloads, res)
        print_runs(names, workloads, res)
        for w in workloads:
            print_cpu(names, w, res)
        print(f"\nbenchmark time: {time.monotonic() - t_start:.0f} s")
        lat = {}
        if args.latency:
            for name, s in servers.items():
                os.sync()
                lat[name] = latency(smtp_source, s)
            print_latency(lat)
        if args.profile and "mailguard" in servers:
            # Longer runs than the measurements, for enough samples.
            prof = [Workload("1k", 20, 1024, max(n1k, 3000), "msg/s"),
                    Workload("20m", 1, 20971520, 5, "MB/s")]
            profile(py_spy, smtp_source, servers["mailguard"], prof, Path(args.profile))
        if args.json:
            Path(args.json).write_text(json.dumps({
                "machine": info,
                "workloads": [w.__dict__ for w in workloads],
                "median": {f"{s}/{w}": v for (s, w), v in summary.items()},
                "latency_ms": {s: {k: v * 1e3 for k, v in r.items()} for s, r in lat.items()},
                "runs": {f"{s}/{w}": [r.__dict__ for r in runs] for (s, w), runs in res.runs.items()},
            }, indent=2))
    finally:
        _stop_all()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
