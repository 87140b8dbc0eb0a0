"""One private Postfix instance on loopback, for the tests and the benchmarks alike.

Postfix is the reference most operators compare the relay with, so several
tests and benches run one: as an upstream the relay delivers to, as a
relayhost client sending through the relay, as a server the tools probe, and
as the peer a benchmark measures against.  Each instance lives in a
temporary directory of its own (configuration, queue, data, log file), is
started as root with C{postfix -c DIR start} (the daemons then drop to the
C{postfix} user), listens on 127.0.0.1 only when asked to, and
L{PrivatePostfix.stop} leaves no process or file behind.

The directory is not under trial's or bench's working directory on purpose:
Postfix's UNIX sockets live in the queue directory, and a socket's path must
fit in 108 bytes.

This module is imported by C{bench/} too (as C{tests/fakegraph.py} is), so it
imports nothing from the rest of the test suite.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

# What every private instance has in main.cf: its own directories, no local
# delivery, IPv4 loopback, and the log in a file (Postfix 3.4 and later,
# through the postlog service) instead of syslog.  The caller's lines follow.
COMMON_MAIN_CF = """\
compatibility_level = 3.6
config_directory = {base}/conf
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
mydomain = {hostname}
mydestination =
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
"""

# Debian's master.cf, cut down to what an instance here needs, with every
# chroot column "n" (a private instance has no chroot to run in) and the two
# services Debian leaves commented out: tlsproxy (TLS connection reuse) and
# postlog (maillog_file).  Unix services start on demand, so one list serves
# the instances that only receive as well as those that relay.
MASTER_CF = """\
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
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
scache    unix  -       -       n       -       1       scache
tlsproxy  unix  -       -       n       -       0       tlsproxy
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# The smtpd line added to master.cf when the instance listens.
SMTPD_LINE = "127.0.0.1:{port} inet n -  n  -  -  smtpd\n"

# How long Postfix may take to start and greet, or to stop, on a loaded machine.
START_SECONDS = 30
STOP_SECONDS = 10


def main_cf(base: str, hostname: str, lines: Sequence[str]) -> str:
    """main.cf for an instance living in C{base}: the common part, then C{lines}."""
    common = COMMON_MAIN_CF.format(base=base, hostname=hostname)
    return common + "".join(f"{line}\n" for line in lines)


def master_cf(port: int | None) -> str:
    """master.cf, with an smtpd on 127.0.0.1:C{port} first when a port is given."""
    return (SMTPD_LINE.format(port=port) if port is not None else "") + MASTER_CF


def sbin(program: str) -> str:
    """Where a Postfix program is: on PATH, or in /usr/sbin (root's PATH may lack it)."""
    return shutil.which(program) or str(Path("/usr/sbin", program))


def missing(programs: Sequence[str] = ("postfix",), sasl: bool = False) -> str | None:
    """Why a private Postfix cannot run here, or None.

    C{programs} are the Postfix commands the caller runs; C{sasl} asks for
    the Cyrus SASL PLAIN module a Postfix SMTP client needs for AUTH.
    """
    for program in programs:
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            return f"{program} not installed (Debian package postfix; .ci/run installs it)"
    if os.geteuid() != 0:
        return "a private Postfix instance has to be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no postfix user (Debian's postfix package creates it)"
    if sasl and not (
        glob.glob("/usr/lib/*/sasl2/libplain.so*") + glob.glob("/usr/lib/sasl2/libplain.so*")
    ):
        return "Cyrus SASL PLAIN module missing (Debian package libsasl2-modules)"
    return None


def greets(port: int) -> bool:
    """Whether an SMTP server on 127.0.0.1:C{port} sends its 220 greeting now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(100).startswith(b"220")
    except OSError:
        return False


class PrivatePostfix:
    """A Postfix of its own in a temporary directory; L{stop} removes every trace.

    C{lines} are the main.cf lines after the common ones; C{port}, when
    given, adds an smtpd on 127.0.0.1:C{port} and makes L{start} wait for
    its greeting; C{files} are written into the configuration directory
    (names ending in C{key.pem} readable by root only), for certificates.
    Also a context manager: started on entry, stopped on exit.
    """

    def __init__(
        self,
        lines: Sequence[str],
        port: int | None = None,
        hostname: str = "postfix.test",
        files: Mapping[str, bytes] | None = None,
        prefix: str = "smtpproxy-postfix-",
    ) -> None:
        self.port = port
        self.base = Path(tempfile.mkdtemp(prefix=prefix))
        self.conf = self.base / "conf"
        self.queue = self.base / "queue"
        self.maillog = self.base / "maillog"
        self.base.chmod(0o755)  # the daemons run as the postfix user and must reach the queue
        self.conf.mkdir(mode=0o755)
        self.queue.mkdir(mode=0o755)
        (self.conf / "main.cf").write_text(main_cf(str(self.base), hostname, lines))
        (self.conf / "master.cf").write_text(master_cf(port))
        for name, data in (files or {}).items():
            (self.conf / name).write_bytes(data)
            if name.endswith("key.pem"):
                (self.conf / name).chmod(0o600)

    def run(
        self, *command: str, stdin: bytes = b"", timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a Postfix program (found by L{sbin}) and return what it did."""
        return subprocess.run(
            [sbin(command[0]), *command[1:]],
            input=stdin,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def must(self, *command: str, stdin: bytes = b"", timeout: float = 60) -> None:
        """Run a Postfix program; raise with its output and the maillog if it fails."""
        result = self.run(*command, stdin=stdin, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {result.returncode}:\n"
                f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}"
                f"\n{self.log()}"
            )

    def start(self) -> None:
        """Check the configuration, start the instance, and wait for smtpd's greeting."""
        self.must("postfix", "-c", str(self.conf), "check")
        self.must("postfix", "-c", str(self.conf), "start")
        if self.port is None:
            return
        deadline = time.monotonic() + START_SECONDS
        while not greets(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix did not greet:\n{self.log()}")
            time.sleep(0.1)

    def master_pid(self) -> int:
        """The pid of the instance's master process."""
        return int((self.queue / "pid" / "master.pid").read_text().split()[0])

    def log(self) -> str:
        """The maillog so far ("" before Postfix wrote it)."""
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def wait_for(self, text: str, count: int = 1, seconds: float = 30) -> list[str]:
        """Maillog lines holding C{text}, once there are C{count} of them (bounded wait)."""
        deadline = time.monotonic() + seconds
        while True:
            lines = [line for line in self.log().splitlines() if text in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the instance and make sure none of its processes is left (bounded)."""
        self.run("postfix", "-c", str(self.conf), "stop")
        deadline = time.monotonic() + STOP_SECONDS
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)

    def processes(self) -> list[int]:
        """Live processes of this instance: Postfix exports MAIL_CONFIG to every daemon."""
        mine = f"MAIL_CONFIG={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if mine in environ.split(b"\0") and state != "Z":
                found.append(int(entry.name))
        return found

    def __enter__(self) -> PrivatePostfix:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
