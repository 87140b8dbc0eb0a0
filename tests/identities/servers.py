"""Real servers for identity tests: HTTPS auth endpoints, a JWKS, OpenLDAP's slapd.

The HTTP endpoints are C{twisted.web} resources on loopback with TLS from a
test CA; keys and tokens are made with C{cryptography}; slapd is Debian's,
started as a private instance with a generated configuration.  None of
them is the code under test.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.providers.smtp.upstream import Authority, authority
from tests.test_twistd import free_port as free_port

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
BASE_DN = "dc=example,dc=com"
ADMIN_DN = f"cn=admin,{BASE_DN}"
ADMIN_PASSWORD = "admin-pw"
LDAP_USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class AuthEndpoint(Resource):
    """An auth endpoint: 200 for the listed Basic pairs or header tokens, else 401.

    C{status} forces an answer (503 for "down"); C{hold} never answers
    (a backend that hangs).  C{requests} records each request's method.
    """

    users: dict[str, str] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    header: str = "X-Token"
    status: int | None = None
    hold: bool = False
    requests: list[str] = field(default_factory=list)
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> Any:
        self.requests.append(request.method.decode())
        if self.hold:
            return NOT_DONE_YET
        if self.status is not None:
            request.setResponseCode(self.status)
            return b""
        auth = request.getHeader("authorization") or ""
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            ok = self.users.get(user) == password
        else:
            ok = (request.getHeader(self.header) or "") in self.tokens
        request.setResponseCode(200 if ok else 401)
        return b"ok" if ok else b"no"


@dataclass
class Jwks(Resource):
    """Serves a JWKS document of the public halves of C{keys} (kid -> private key)."""

    keys: dict[str, Any] = field(default_factory=dict)
    fetches: int = 0
    status: int = 200
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render_GET(self, request: Request) -> bytes:
        self.fetches += 1
        request.setResponseCode(self.status)
        request.setHeader("content-type", "application/json")
        return json.dumps({"keys": [jwk(kid, k) for kid, k in self.keys.items()]}).encode()


def jwk(kid: str, key: Any) -> dict[str, str]:
    """The public JWK of a private key."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        n = public.public_numbers()
        size = (n.n.bit_length() + 7) // 8
        return {
            "kty": "RSA",
            "kid": kid,
            "n": b64url(n.n.to_bytes(size, "big")),
            "e": b64url(n.e.to_bytes(3, "big")),
        }
    numbers = public.public_numbers()
    return {
        "kty": "EC",
        "kid": kid,
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def sign(claims: dict[str, Any], key: Any, kid: str | None, alg: str | None = None) -> str:
    """A compact JWS over C{claims}: RS256 for RSA keys, ES256 for EC keys."""
    if alg is None:
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signed = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if alg == "RS256":
        signature = key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(key.sign(signed.encode(), ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signed}.{b64url(signature)}"


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": "https://idp.test",
        "aud": "smtp-relay",
        "sub": "scanner-01",
        "exp": now + 300,
        "iat": now,
        "role": "mailer",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@dataclass
class HTTPS:
    """A loopback HTTPS site and the CA file that verifies it."""

    port: int
    ca_file: str
    authority: Authority

    def url(self, path: str = "/") -> str:
        return f"https://localhost:{self.port}{path}"


class ClosingSite(Site):
    """A site that records how each of its connections ended.

    C{ends} gets the type of each lost connection's reason: C{ConnectionDone}
    when the client closed TLS properly (a close_notify before the FIN, as
    a connection pool's close does), C{ConnectionLost} when the TCP
    connection simply went away (a process that exited with it open).
    """

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.ends: list[type] = []
        self.opened = 0

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.opened += 1
        lost = protocol.connectionLost

        def connection_lost(reason: Any) -> None:
            self.ends.append(reason.type)
            lost(reason)

        protocol.connectionLost = connection_lost
        return protocol


def serve_https(
    case: TestCase, resource: Resource, ca: Authority | None = None, site: Site | None = None
) -> HTTPS:
    """Serve C{resource} (or C{site}) over TLS (certificate for localhost) until the test ends."""
    ca = ca or authority()
    listen: Any = reactor
    site = site or Site(resource)
    port: Any = listen.listenSSL(0, site, ca.server_options(), interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    ca_file = os.path.join(directory, "ca.pem")
    with open(ca_file, "wb") as f:
        f.write(ca.ca_pem)
    return HTTPS(port.getHost().port, ca_file, ca)


@dataclass
class Slapd:
    """A private OpenLDAP server: StartTLS on C{port}, LDAPS on C{ldaps_port}."""

    port: int
    ldaps_port: int
    ca_file: str
    process: subprocess.Popen[bytes]


def start_slapd(case: TestCase) -> Slapd:
    """slapd with a generated slapd.conf, users from LDIF; skips when slapd is absent."""
    if not (os.access(SLAPD, os.X_OK) and os.access(SLAPADD, os.X_OK)):
        raise SkipTest("slapd (Debian's slapd package) is installed by .ci/run")
    directory = os.path.abspath(case.mktemp())
    os.makedirs(os.path.join(directory, "db"))
    ca = authority()
    for name, data in (("ca.pem", ca.ca_pem), ("cert.pem", ca.cert_pem), ("key.pem", ca.key_pem)):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    conf = os.path.join(directory, "slapd.conf")
    schema = "/etc/ldap/schema"
    with open(conf, "w") as text:
        text.write(
            "".join(
                f"include {schema}/{s}.schema\n" for s in ("core", "cosine", "inetorgperson", "nis")
            )
            + f"modulepath /usr/lib/ldap\nmoduleload back_mdb\npidfile {directory}/slapd.pid\n"
            + f"TLSCACertificateFile {directory}/ca.pem\n"
            + f"TLSCertificateFile {directory}/cert.pem\n"
            + f"TLSCertificateKeyFile {directory}/key.pem\n"
            + f'database mdb\nsuffix "{BASE_DN}"\nrootdn "{ADMIN_DN}"\nrootpw {ADMIN_PASSWORD}\n'
            + f"directory {directory}/db\nmaxsize 10485760\n"
        )
    entries = [
        f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\n"
        "o: Example\ndc: example\n",
        f"dn: ou=people,{BASE_DN}\nobjectClass: organizationalUnit\nou: people\n",
    ]
    for user, password in LDAP_USERS.items():
        entries.append(
            f"dn: uid={user},ou=people,{BASE_DN}\nobjectClass: inetOrgPerson\nuid: {user}\n"
            f"cn: {user}\nsn: {user}\nuserPassword: {password}\n"
        )
    ldif = os.path.join(directory, "users.ldif")
    with open(ldif, "w") as text:
        text.write("\n".join(entries))
    subprocess.run([SLAPADD, "-f", conf, "-l", ldif], check=True, capture_output=True, timeout=60)
    port, ldaps_port = free_port(), free_port()
    urls = f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{ldaps_port}/"
    process = subprocess.Popen(
        [SLAPD, "-f", conf, "-h", urls, "-d", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()

    case.addCleanup(stop)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"slapd did not start: {process.stderr.read().decode() if process.stderr else ''}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            socket.create_connection(("127.0.0.1", ldaps_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return Slapd(port, ldaps_port, os.path.join(directory, "ca.pem"), process)


def ldap_params(server: Slapd, mode: str = "starttls", **changes: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "server": "localhost",
        "port": server.port if mode == "starttls" else server.ldaps_port,
        "tls_mode": mode,
        "tls_ca": server.ca_file,
        "bind_user": ADMIN_DN,
        "bind_pass": ADMIN_PASSWORD,
        "base_dn": BASE_DN,
        "filter_string": "(&(objectClass=inetOrgPerson)(uid=%s))",
        "timeout": 5,
    }
    params.update(changes)
    return params


def wait(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
