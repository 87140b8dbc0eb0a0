"""Test helpers: a certificate authority, and an upstream whose every reply the test chooses.

The scripted upstream is a small ESMTP server on a real loopback socket
(Twisted's C{LineReceiver}): it answers EHLO with the capabilities a test
lists, STARTTLS with the test CA's certificate, AUTH PLAIN for one user, and
MAIL, RCPT, DATA and the end of the message with the replies given.  It
records every command and every message body (dots unstuffed), so a test can
check exactly what the provider put on the wire.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.protocols.basic import LineReceiver

from smtpproxy.providers.smtp.settings import RelaySettings


@dataclass
class Authority:
    """A test CA and a server certificate it issued (PEM)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def server_options(self) -> CertificateOptions:
        options: CertificateOptions = PrivateCertificate.loadPEM(
            self.cert_pem + self.key_pem
        ).options()
        return options


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def authority(
    names: tuple[str, ...] = ("localhost", "127.0.0.1"), expired: bool = False
) -> Authority:
    """A fresh CA and a certificate for C{names} signed by it (expired if asked)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("smtpproxy test CA"))
        .issuer_name(_name("smtpproxy test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    end = now - timedelta(hours=1) if expired else now + timedelta(days=30)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Authority(
        ca.public_bytes(pem),
        cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def relay_settings(port: int, **changes: object) -> RelaySettings:
    """Settings for an upstream on 127.0.0.1:C{port}, plaintext unless changed."""
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "username": "",
        "password": "",
        "ca_file": "",
        "tls_verify": True,
        "client_cert_file": "",
        "client_key_file": "",
        "max_connections": 4,
        "timeout": 10.0,
        "helo": "relay.test",
    }
    values.update(changes)
    return RelaySettings(**values)  # type: ignore[arg-type]


def _ok_rcpt(address: str) -> str:
    return "250 2.1.5 Ok"


@dataclass
class Script:
    """What the scripted upstream offers and answers, and what it saw."""

    capabilities: list[str] = field(
        default_factory=lambda: ["PIPELINING", "8BITMIME", "SMTPUTF8", "DSN", "SIZE 10000000"]
    )
    starttls: CertificateOptions | None = None
    #: The one login accepted (user, password), offered as AUTH PLAIN LOGIN.
    login: tuple[str, str] | None = None
    greeting: str = "220 upstream.test ESMTP"
    mail: str = "250 2.1.0 Ok"
    rcpt: Callable[[str], str] = _ok_rcpt
    data: str = "354 End data with <CR><LF>.<CR><LF>"
    final: str = "250 2.0.0 Ok: queued"
    #: Seconds before the reply to DATA (the upstream busy before the body)
    #: and before the reply after the body (it has the message, answers late).
    data_delay: float = 0.0
    final_delay: float = 0.0
    commands: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0
    #: Each write the client made that carried commands (for PIPELINING).
    packets: list[bytes] = field(default_factory=list)


class ScriptedUpstream(LineReceiver):
    """One session of the scripted upstream."""

    MAX_LENGTH = 1 << 24

    def __init__(self, script: Script) -> None:
        self.script = script
        self.secure = False
        self.body: list[bytes] | None = None
        self.lost = False
        self.later: list[IDelayedCall] = []

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True
        for call in self.later:
            if call.active():
                call.cancel()

    def connectionMade(self) -> None:
        self.script.connections += 1
        self.accepted = 0
        if self.script.greeting:
            self.reply(self.script.greeting)

    def reply(self, text: str) -> None:
        self.transport.write(text.encode("utf-8") + b"\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.body is None:
            self.script.packets.append(data)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.body is not None:
            if line == b".":
                self.script.bodies.append(b"".join(self.body))
                self.body = None
                self.reply_after(self.script.final_delay, self.script.final)
            else:
                self.body.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
            return
        script = self.script
        script.commands.append(line)
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"EHLO":
            offered = list(script.capabilities)
            if script.starttls is not None and not self.secure:
                offered.append("STARTTLS")
            if script.login is not None:
                offered.append("AUTH PLAIN LOGIN")
            lines = ["upstream.test", *offered]
            for line_text in lines[:-1]:
                self.reply("250-" + line_text)
            self.reply("250 " + lines[-1])
        elif verb == b"STARTTLS":
            self.reply("220 2.0.0 Ready to start TLS")
            self.transport.startTLS(script.starttls)  # type: ignore[union-attr]
            self.secure = True
        elif verb == b"AUTH":
            assert script.login is not None
            user, password = script.login
            token = base64.b64encode(f"\0{user}\0{password}".encode())
            if line == b"AUTH PLAIN " + token:
                self.reply("235 2.7.0 Authentication successful")
            else:
                self.reply("535 5.7.8 Error: authentication failed")
        elif verb == b"MAIL":
            self.reply(script.mail)
        elif verb == b"RCPT":
            address = line.split(b"<", 1)[1].split(b">", 1)[0].decode("utf-8")
            answer = script.rcpt(address)
            self.accepted += answer.startswith("2")
            self.reply(answer)
        elif verb == b"DATA":
            if not self.accepted:
                self.reply("554 5.5.1 Error: no valid recipients")
                return
            if script.data_delay:
                self.later.append(reactor.callLater(script.data_delay, self._data_go_ahead))
                return
            self._data_go_ahead()
        elif verb == b"RSET" or verb == b"NOOP":
            self.accepted = 0
            self.reply("250 2.0.0 Ok")
        elif verb == b"QUIT":
            self.reply("221 2.0.0 Bye")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.reply("502 5.5.2 Error: command not recognized")

    def _data_go_ahead(self) -> None:
        if self.lost:
            return
        self.reply(self.script.data)
        if self.script.data.startswith("354"):
            self.body = []

    def reply_after(self, delay: float, text: str) -> None:
        """Reply now, or after C{delay} seconds if the connection is still open then."""
        if not delay:
            self.reply(text)
            return

        def later() -> None:
            if not self.lost:
                self.reply(text)

        self.later.append(reactor.callLater(delay, later))


class _Factory(Factory):
    def __init__(self, script: Script) -> None:
        self.script = script

    def buildProtocol(self, addr: object) -> ScriptedUpstream:
        return ScriptedUpstream(self.script)


async def listen(script: Script, implicit: CertificateOptions | None = None) -> IListeningPort:
    """Start the scripted upstream on a free loopback port (implicit TLS if given)."""
    endpoint: SSL4ServerEndpoint | TCP4ServerEndpoint
    if implicit is not None:
        endpoint = SSL4ServerEndpoint(reactor, 0, implicit, interface="127.0.0.1")
    else:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port: IListeningPort = await endpoint.listen(_Factory(script))
    return port


def port_of(listening: IListeningPort) -> int:
    """The TCP port C{listening} was given."""
    number: int = listening.getHost().port  # type: ignore[attr-defined]
    return number
