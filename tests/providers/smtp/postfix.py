"""A private Postfix listening on loopback as the upstream: STARTTLS required, mail discarded.

Started as root in a temporary directory (its own configuration, queue and
log), it accepts from 127.0.0.0/8 only, requires STARTTLS with a
certificate the test CA issued, and hands every message to the C{discard}
transport; its maillog (read back by the tests) shows each message's
sender, size, recipient count, message-id and the TLS session.  With
C{keep=True} messages go instead to a C{pipe} transport that stores each
one as Postfix delivers it (L{PostfixUpstream.kept}), for tests of what
the message looked like on arrival.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.providers.smtp.upstream import Authority

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {base}/conf
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = upstream.test
mydomain = upstream.test
mydestination =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
default_transport = discard:upstream
relay_transport = discard:upstream
message_size_limit = {size_limit}
smtputf8_enable = yes
smtpd_tls_security_level = {tls_level}
smtpd_tls_cert_file = {base}/conf/cert.pem
smtpd_tls_key_file = {base}/conf/key.pem
smtpd_tls_loglevel = 1
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
"""

MASTER_CF = """\
127.0.0.1:{port} inet n -  n  -  -  smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


# The keeping transport: Postfix's pipe(8) runs a script as nobody with the
# message on stdin, exactly as queued (Postfix's own Received field first,
# lines ending in LF), one file per queue id.
KEEP_MAIN_CF = """\
default_transport = keep
relay_transport = keep
local_header_rewrite_clients =
"""
KEEP_MASTER_CF = """\
keep      unix  -       n       n       -       -       pipe
  user=nobody argv={base}/keep.sh ${{queue_id}}
"""
KEEP_SCRIPT = """\
#!/bin/sh
cat > "{base}/kept/$1.tmp" && mv "{base}/kept/$1.tmp" "{base}/kept/$1"
"""


def missing() -> str | None:
    """Why a private Postfix cannot run here, or None."""
    if not Path("/usr/sbin/postfix").exists():
        return "Postfix is not installed (Debian package postfix; .ci/run installs it)"
    if os.geteuid() != 0:
        return "a private Postfix instance has to be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no postfix user (Debian's postfix package creates it)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostfixUpstream:
    """One private Postfix smtpd on 127.0.0.1:C{port}; L{stop} removes every trace."""

    def __init__(
        self,
        authority: Authority,
        tls_level: str = "encrypt",
        size_limit: int = 0,
        keep: bool = False,
    ) -> None:
        self.port = free_port()
        # Not under trial's directory: Postfix's sockets live in the queue
        # directory, and a UNIX socket's path must fit in 108 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="smtpproxy-upstream-"))
        self.base.chmod(0o755)
        conf = self.base / "conf"
        conf.mkdir(mode=0o755)
        (self.base / "queue").mkdir(mode=0o755)
        main_cf = MAIN_CF.format(base=self.base, tls_level=tls_level, size_limit=size_limit)
        master_cf = MASTER_CF.format(port=self.port)
        if keep:
            # Later lines win in main.cf: the keeping transport replaces discard.
            main_cf += KEEP_MAIN_CF
            master_cf += KEEP_MASTER_CF.format(base=self.base)
            script = self.base / "keep.sh"
            script.write_text(KEEP_SCRIPT.format(base=self.base))
            script.chmod(0o755)
            kept = self.base / "kept"
            kept.mkdir()
            nobody = pwd.getpwnam("nobody")
            os.chown(kept, nobody.pw_uid, nobody.pw_gid)
        (conf / "main.cf").write_text(main_cf)
        (conf / "master.cf").write_text(master_cf)
        (conf / "cert.pem").write_bytes(authority.cert_pem)
        (conf / "key.pem").write_bytes(authority.key_pem)
        (conf / "key.pem").chmod(0o600)
        self.command = ["/usr/sbin/postfix", "-c", str(conf)]

    def start(self) -> None:
        started = subprocess.run([*self.command, "start"], capture_output=True, timeout=60)
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr.decode(errors='replace')}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"Postfix did not greet:\n{self.log()}")

    def log(self) -> str:
        path = self.base / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, text: str, count: int = 1, seconds: float = 30) -> list[str]:
        """Maillog lines holding C{text}, once there are C{count} of them (bounded wait)."""
        deadline = time.monotonic() + seconds
        while True:
            lines = [line for line in self.log().splitlines() if text in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    def kept(self, count: int, seconds: float = 30) -> list[bytes]:
        """The messages the keeping transport stored, once there are C{count} (bounded wait)."""
        directory = self.base / "kept"
        deadline = time.monotonic() + seconds
        while True:
            names = sorted(p for p in directory.iterdir() if p.suffix != ".tmp")
            if len(names) >= count or time.monotonic() > deadline:
                return [p.read_bytes() for p in names]
            time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run([*self.command, "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)
