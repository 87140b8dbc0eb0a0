"""A private Postfix listening on loopback as the upstream: STARTTLS required, mail discarded.

A L{tests.postfix.PrivatePostfix} that accepts from 127.0.0.0/8 only,
requires STARTTLS with a certificate the test CA issued, and hands every
message to the C{discard} transport; its maillog (read back by the tests)
shows each message's sender, size, recipient count, message-id and the TLS
session.  With C{keep=True} messages go instead to a C{pipe} transport that
stores each one as Postfix delivers it (L{PostfixUpstream.kept}), for tests
of what the message looked like on arrival.
"""

from __future__ import annotations

import base64
import os
import pwd
import time

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from tests.postfix import PrivatePostfix, missing
from tests.providers.smtp.upstream import Authority, port_of
from tests.test_twistd import free_port

__all__ = ["DovecotAuth", "PostfixUpstream", "missing"]


# The keeping transport: Postfix's pipe(8) runs a script as nobody with the
# message on stdin, exactly as queued (Postfix's own Received field first,
# lines ending in LF), one file per queue id.  Later lines win in main.cf, so
# these replace the discard transport.
KEEP_LINES = (
    "default_transport = keep",
    "relay_transport = keep",
    "local_header_rewrite_clients =",
)
KEEP_MASTER_CF = """\
keep      unix  -       n       n       -       -       pipe
  user=nobody argv={base}/keep.sh ${{queue_id}}
"""
KEEP_SCRIPT = """\
#!/bin/sh
cat > "{base}/kept/$1.tmp" && mv "{base}/kept/$1.tmp" "{base}/kept/$1"
"""


def upstream_lines(tls_level: str, size_limit: int) -> list[str]:
    """The main.cf lines of an upstream that discards what it accepts."""
    return [
        "mynetworks = 127.0.0.0/8",
        "smtpd_relay_restrictions = permit_mynetworks, reject",
        "default_transport = discard:upstream",
        "relay_transport = discard:upstream",
        f"message_size_limit = {size_limit}",
        "smtputf8_enable = yes",
        f"smtpd_tls_security_level = {tls_level}",
        "smtpd_tls_cert_file = $config_directory/cert.pem",
        "smtpd_tls_key_file = $config_directory/key.pem",
        "smtpd_tls_loglevel = 1",
        "smtpd_client_connection_count_limit = 0",
        "smtpd_client_connection_rate_limit = 0",
    ]


class PostfixUpstream(PrivatePostfix):
    """One private Postfix smtpd on 127.0.0.1:C{port} with the test CA's certificate."""

    def __init__(
        self,
        authority: Authority,
        tls_level: str = "encrypt",
        size_limit: int = 0,
        extra: tuple[str, ...] = (),
        keep: bool = False,
        files: dict[str, bytes] | None = None,
    ) -> None:
        super().__init__(
            [*upstream_lines(tls_level, size_limit), *extra, *(KEEP_LINES if keep else ())],
            port=free_port(),
            hostname="upstream.test",
            files={"cert.pem": authority.cert_pem, "key.pem": authority.key_pem, **(files or {})},
            prefix="smtpproxy-upstream-",
        )
        if keep:
            with (self.conf / "master.cf").open("a") as master:
                master.write(KEEP_MASTER_CF.format(base=self.base))
            script = self.base / "keep.sh"
            script.write_text(KEEP_SCRIPT.format(base=self.base))
            script.chmod(0o755)
            kept = self.base / "kept"
            kept.mkdir()
            nobody = pwd.getpwnam("nobody")
            os.chown(kept, nobody.pw_uid, nobody.pw_gid)

    def kept(self, count: int, seconds: float = 30) -> list[bytes]:
        """The messages the keeping transport stored, once there are C{count} (bounded wait)."""
        directory = self.base / "kept"
        deadline = time.monotonic() + seconds
        while True:
            names = sorted(p for p in directory.iterdir() if p.suffix != ".tmp")
            if len(names) >= count or time.monotonic() > deadline:
                return [p.read_bytes() for p in names]
            time.sleep(0.1)


class DovecotAuthProtocol(LineReceiver):
    """The server side of Dovecot's authentication protocol, as Postfix's smtpd speaks it.

    Postfix checks AUTH passwords through a SASL backend; with
    C{smtpd_sasl_type = dovecot} that backend is a socket speaking this small
    tab-separated protocol.  This stands in for Dovecot (Postfix itself, the
    server under test, stays real): it offers PLAIN only, accepts one user
    and password, and records every AUTH request's mechanism and user so a
    test can prove a password was, or was not, sent.
    """

    delimiter = b"\n"

    def __init__(self, auth: DovecotAuth) -> None:
        self.auth = auth

    def connectionMade(self) -> None:
        self.sendLine(b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nSPID\t1\nCUID\t1\nDONE")

    def lineReceived(self, line: bytes) -> None:
        fields = line.decode("utf-8", "replace").split("\t")
        if fields[0] != "AUTH" or len(fields) < 3:
            return  # VERSION and CPID need no answer
        request = fields[1]
        params = dict(f.partition("=")[::2] for f in fields[3:])
        if "resp" not in params:
            self.sendLine(f"FAIL\t{request}\treason=initial response expected".encode())
            return
        try:
            _, user, password = base64.b64decode(params["resp"]).decode().split("\0")
        except (ValueError, UnicodeDecodeError):
            self.sendLine(f"FAIL\t{request}\treason=malformed".encode())
            return
        self.auth.attempts.append(user)
        if (user, password) == (self.auth.user, self.auth.password):
            self.sendLine(f"OK\t{request}\tuser={user}".encode())
        else:
            self.sendLine(f"FAIL\t{request}\tuser={user}".encode())


class DovecotAuth(Factory):
    """Listens on loopback for Postfix's SASL requests; L{lines} point smtpd at it."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self.password = password
        self.attempts: list[str] = []

    def buildProtocol(self, addr: object) -> DovecotAuthProtocol:
        return DovecotAuthProtocol(self)

    async def listen(self) -> IListeningPort:
        """Listen on a free loopback port (stop it in the test's cleanup)."""
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port: IListeningPort = await endpoint.listen(self)
        self.port = port
        return port

    def lines(self) -> tuple[str, ...]:
        """main.cf lines for an smtpd that checks AUTH here, after STARTTLS only."""
        number = port_of(self.port)
        return (
            "smtpd_sasl_auth_enable = yes",
            "smtpd_sasl_type = dovecot",
            f"smtpd_sasl_path = inet:127.0.0.1:{number}",
            "smtpd_tls_auth_only = yes",
        )
