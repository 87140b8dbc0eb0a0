"""A real PostgreSQL server for the queue's tests, one per test process.

The PostgreSQL store is only worth testing against the real server: row
locks, C{SKIP LOCKED}, advisory locks and lost connections are what it is
about.  L{server} starts one the first time a test asks (initdb into a
temporary directory, listening on 127.0.0.1 on a free port, its Unix socket
in that directory, trust authentication) and stops it when the process
exits.  Trial's C{--jobs=2} runs two processes: each starts its own server
on its own port in its own directory.

L{standby} makes a hot standby of it (C{pg_basebackup}), for the tests of
a relay that a failover leaves connected to a server in recovery.

C{initdb} refuses to run as root, so as root the cluster belongs to the
C{postgres} user (the Debian package creates it) and every server command
runs through C{runuser}.  Tests skip, saying why, when no PostgreSQL
binaries are installed (C{.ci/run} installs Debian's).

A test process killed with SIGKILL cannot stop its server; the next one to
start a server stops any left by a process that no longer exists.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from twisted.trial.unittest import SkipTest

#: How long a server may take to accept connections after C{pg_ctl start}.
START_TIMEOUT = 60
_PREFIX = "smtpproxy-pg-"
_OWNER_FILE = "owner.pid"


def find_binaries() -> Path | None:
    """The directory holding C{initdb} and C{pg_ctl}: on PATH, else Debian's newest."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: (
            int(Path(path).parent.parent.name) if Path(path).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PgServer:
    """One PostgreSQL cluster in a temporary directory, run as C{postgres} when we are root.

    @ivar port: the TCP port it listens on (127.0.0.1 only).
    @ivar directory: the temporary directory: C{data/}, the log, the socket.
    """

    def __init__(self, binaries: Path, primary: PgServer | None = None) -> None:
        self._bin = binaries
        self._as: list[str] = []
        self._numbers = itertools.count(1)
        self.directory = Path(tempfile.mkdtemp(prefix=_PREFIX))
        (self.directory / _OWNER_FILE).write_text(str(os.getpid()))
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.directory)
                raise SkipTest("running as root and there is no postgres user for initdb") from None
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        self.port = 0
        if primary is not None:
            # A hot standby of the primary, as a failover can leave a relay connected to.
            self._command(
                "pg_basebackup",
                "--pgdata",
                str(self.data),
                "--host=127.0.0.1",
                f"--port={primary.port}",
                "--username=postgres",
                "--write-recovery-conf",
                "--checkpoint=fast",
                "--no-sync",
            )
            return
        self._command(
            "initdb",
            "--pgdata",
            str(self.data),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )

    def _command(self, program: str, *args: str, timeout: float = START_TIMEOUT) -> None:
        """Run one of the server's programs (as C{postgres} when we are root)."""
        command = [*self._as, str(self._bin / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            tail = done.stdout[-2000:] + done.stderr[-2000:]
            raise RuntimeError(f"{program} failed ({done.returncode}): {tail}")

    def start(self) -> None:
        """Start the server and wait (at most L{START_TIMEOUT}) until it accepts connections.

        The first start picks a free port; later starts (after L{stop}) reuse
        it, so a store's DSN stays valid across a restart.
        """
        for _ in range(3):
            port = self.port or _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port}"
                f" -c unix_socket_directories={self.directory}"
                " -c max_connections=100 -c shared_buffers=16MB -c log_min_messages=warning"
            )
            try:
                self._command(
                    "pg_ctl",
                    "start",
                    "--pgdata",
                    str(self.data),
                    "--log",
                    str(self.log),
                    "--wait",
                    f"--timeout={START_TIMEOUT}",
                    "-o",
                    options,
                    timeout=START_TIMEOUT + 10,
                )
            except RuntimeError:
                if self.port:  # a restart on the port stores know: no other port will do
                    raise
                continue  # someone took the free port between probe and bind
            self.port = port
            return
        raise RuntimeError(f"PostgreSQL did not start; see {self.log}")

    def stop(self) -> None:
        """Stop the server at once, as a crash would (C{pg_ctl stop -m immediate})."""
        self._command("pg_ctl", "stop", "--pgdata", str(self.data), "-m", "immediate", "--wait")

    def start_if_stopped(self) -> None:
        """Start the server again if a test stopped it (a cleanup for such tests)."""
        if not self.running():
            self.start()

    def running(self) -> bool:
        """True if the server is up (C{pg_ctl status})."""
        try:
            self._command("pg_ctl", "status", "--pgdata", str(self.data), timeout=10)
        except RuntimeError:
            return False
        return True

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq URI for C{dbname} over TCP on loopback, as an operator would write it."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """Create an empty database for one test; its DSN."""
        name = f"queue_{os.getpid()}_{next(self._numbers)}"
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def destroy(self) -> None:
        """Stop the server (if it runs) and remove its directory."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _reap_orphans(binaries: Path) -> None:
    """Stop and remove servers left by test processes that were killed."""
    for directory in glob.glob(os.path.join(tempfile.gettempdir(), _PREFIX + "*")):
        try:
            owner = int(Path(directory, _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [
                *as_user,
                str(binaries / "pg_ctl"),
                "stop",
                "-D",
                f"{directory}/data",
                "-m",
                "immediate",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        shutil.rmtree(directory, ignore_errors=True)


_SERVER: PgServer | None = None


def server() -> PgServer:
    """This process's server, started on first use; SkipTest without PostgreSQL."""
    global _SERVER
    if _SERVER is not None:
        return _SERVER
    binaries = find_binaries()
    if binaries is None:
        raise SkipTest("PostgreSQL is not installed (no initdb/pg_ctl; .ci/run installs it)")
    _reap_orphans(binaries)
    instance = PgServer(binaries)
    atexit.register(instance.destroy)
    instance.start()
    _SERVER = instance
    return instance


def standby(primary: PgServer) -> PgServer:
    """A hot standby of C{primary} (its databases as they are now), started; the caller
    destroys it.  It stays in recovery, so every session on it is read-only."""
    instance = PgServer(primary._bin, primary)
    try:
        instance.start()
    except BaseException:
        instance.destroy()
        raise
    return instance
