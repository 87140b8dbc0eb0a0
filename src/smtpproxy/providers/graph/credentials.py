"""How the relay proves who it is to Entra ID: four kinds of credential, one request each.

  - a client secret (C{GRAPH_CLIENT_SECRET}): sent as it is;
  - a certificate (C{GRAPH_CLIENT_CERTIFICATE_FILE}): a fresh client
    assertion per token request, a JWT signed PS256 with the certificate's
    key (Microsoft's "certificate credentials" format: C{x5t#S256} header,
    C{aud} the token URL, C{iss} and C{sub} the client id, a new C{jti},
    valid ten minutes);
  - workload identity federation (C{AZURE_FEDERATED_TOKEN_FILE}): the
    Kubernetes service account token the kubelet writes to that file, read
    again for every token request because the kubelet replaces it;
  - a managed identity (C{GRAPH_MANAGED_IDENTITY=true}): no credential at
    all; the token comes from the instance metadata endpoint (or App
    Service's identity endpoint), which only answers on the Azure host.

L{Credential.token_request} builds the HTTP request for a token; the
provider sends it through the single-flight cache in L{tokens}.  Everything
here is plain computation over bytes and a clock reading, apart from
reading the two files, which are small and read only once per token (about
once an hour).

Why no JWT library: the assertion is one fixed header, six claims and one
signature, all of it visible below; C{cryptography} (already a dependency
through Twisted's TLS) signs it.  PyJWT would add a dependency to produce
the same forty lines' worth of output.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlencode

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

if TYPE_CHECKING:
    from smtpproxy.providers.graph.settings import GraphSettings

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 600
# Entra's token endpoint accepts a little clock skew; start the assertion's
# validity a moment in the past so that a host clock slightly ahead of
# Microsoft's does not make it "not yet valid".
ASSERTION_BACKDATE = 60
# A Kubernetes service account token is about 1 KB; a file far larger than
# this is not one.
MAX_FEDERATED_TOKEN = 64 * 1024
MAX_CERTIFICATE_FILE = 1024 * 1024
# Warn this many days before the client certificate's end: time enough to
# make a new one, upload it in Entra and roll it out.
CERTIFICATE_WARNING_DAYS = 30
IMDS_API_VERSION = "2018-02-01"
APP_SERVICE_API_VERSION = "2019-08-01"


class CredentialError(Exception):
    """The credential cannot be used; the text says why, never quoting a secret."""


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One HTTP request for an access token.

    @ivar kind: C{"entra"} (the OAuth token endpoint, its errors read by
        L{tokens.token_problem}) or C{"managed"} (an identity endpoint).
    """

    method: str
    url: str = field(repr=False)
    body: bytes | None = field(default=None, repr=False)
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    kind: str = "entra"


class Credential(Protocol):
    """One way to get a token."""

    @property
    def description(self) -> str:
        """For the start-up log: the kind and what identifies it (never a secret)."""

    def token_request(self, now: float) -> TokenRequest:
        """The request for a token, built at POSIX time C{now}.

        @raise CredentialError: the credential cannot be read right now.
        """


def _form(client_id: str, scope: str, **extra: str) -> bytes:
    return urlencode(
        {"client_id": client_id, "scope": scope, "grant_type": "client_credentials", **extra}
    ).encode("ascii")


def scope_for(endpoint: str) -> str:
    """The client-credentials scope for Graph at C{endpoint}."""
    return f"{endpoint.rstrip('/')}/.default"


@dataclass(frozen=True, slots=True)
class ClientSecret:
    """C{GRAPH_CLIENT_SECRET}."""

    client_id: str
    secret: str = field(repr=False)
    token_url: str
    scope: str

    @property
    def description(self) -> str:
        return f"client secret for application {self.client_id}"

    def token_request(self, now: float) -> TokenRequest:
        body = _form(self.client_id, self.scope, client_secret=self.secret)
        return TokenRequest("POST", self.token_url, body, "application/x-www-form-urlencoded")


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate and its private key, loaded from one PEM file."""

    der: bytes = field(repr=False)
    key: rsa.RSAPrivateKey = field(repr=False)
    subject: str
    not_after: float

    @property
    def thumbprint(self) -> str:
        """C{x5t#S256}: the base64url SHA-256 of the DER certificate."""
        return b64url(hashlib.sha256(self.der).digest())

    @property
    def sha1_hex(self) -> str:
        """The SHA-1 thumbprint as the Entra portal lists it (upper-case hex)."""
        return hashlib.sha1(self.der).hexdigest().upper()  # noqa: S324 (a display name only)


def expiry_warning(certificate: Certificate, now: float) -> str | None:
    """What an operator should hear about the certificate's end, or None while it is far.

    Entra refuses an assertion signed by an expired certificate, so every
    token request fails and every message with it: the relay says so at
    start-up and in C{smtpproxy doctor} rather than leave it to the first
    failed delivery.  Nothing refuses start-up: an expired certificate
    renewed in place is read again at the next token request.
    """
    left = certificate.not_after - now
    day = datetime.fromtimestamp(certificate.not_after, UTC).strftime("%Y-%m-%d")
    if left <= 0:
        return (
            f"the client certificate (SHA-1 thumbprint {certificate.sha1_hex}) expired on {day}: "
            "Entra refuses its assertions; make a new one, upload it to the app registration "
            "and replace the file"
        )
    days = left / 86400
    if days < CERTIFICATE_WARNING_DAYS:
        return (
            f"the client certificate (SHA-1 thumbprint {certificate.sha1_hex}) expires on {day}, "
            f"in {days:.0f} days: upload its successor to the app registration and replace "
            "the file before then"
        )
    return None


def load_certificate(path: str, password: str | None) -> Certificate:
    """Read the certificate and its RSA private key from the PEM file at C{path}.

    @raise CredentialError: unreadable, no certificate, no key, wrong
        password, a key that is not RSA or does not belong to the certificate.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CERTIFICATE_FILE + 1)
    except OSError as e:
        raise CredentialError(f"cannot read {path!r}: {e.strerror or type(e).__name__}") from None
    if len(data) > MAX_CERTIFICATE_FILE:
        raise CredentialError(f"{path!r} is larger than 1 MB; expected one PEM file")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CredentialError(f"{path!r} holds no PEM certificate") from None
    # The key is whichever block's label ends in PRIVATE KEY (PKCS#8,
    # encrypted PKCS#8 or the older RSA form), wherever it sits in the file.
    blocks = [
        b for b in data.split(b"-----BEGIN ")[1:] if b"PRIVATE KEY-----" in b.split(b"\n", 1)[0]
    ]
    if not blocks:
        raise CredentialError(f"{path!r} holds no private key (put the key in the same file)")
    pem = b"-----BEGIN " + blocks[0]
    secret = password.encode("utf-8") if password else None
    try:
        key = serialization.load_pem_private_key(pem, secret)
    except TypeError:
        if secret is None:
            raise CredentialError(
                f"the key in {path!r} is encrypted; set GRAPH_CLIENT_CERTIFICATE_PASSWORD"
            ) from None
        raise CredentialError(
            f"the key in {path!r} is not encrypted; unset GRAPH_CLIENT_CERTIFICATE_PASSWORD"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        why = "the password is wrong or the key is damaged" if secret else "the key is damaged"
        raise CredentialError(f"cannot read the key in {path!r}: {why}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialError(f"the key in {path!r} is not an RSA key (Entra signs with RSA)")
    public = key.public_key().public_numbers()
    for certificate in certificates:
        found = certificate.public_key()
        if isinstance(found, rsa.RSAPublicKey) and found.public_numbers() == public:
            der = certificate.public_bytes(serialization.Encoding.DER)
            return Certificate(
                der,
                key,
                certificate.subject.rfc4514_string(),
                certificate.not_valid_after_utc.timestamp(),
            )
    raise CredentialError(f"the key in {path!r} does not belong to its certificate")


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def client_assertion(
    certificate: Certificate, client_id: str, audience: str, now: float, jti: str
) -> str:
    """A signed client assertion (compact JWS, PS256) valid for L{ASSERTION_LIFETIME}."""
    header = {"alg": "PS256", "typ": "JWT", "x5t#S256": certificate.thumbprint}
    issued = int(now) - ASSERTION_BACKDATE
    claims = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": jti,
        "iat": issued,
        "nbf": issued,
        "exp": int(now) + ASSERTION_LIFETIME,
    }
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = certificate.key.sign(
        signing_input.encode("ascii"),
        # RFC 7518 3.5: PS256 is RSASSA-PSS with SHA-256, MGF1 with
        # SHA-256, and a salt as long as the hash.
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
        hashes.SHA256(),
    )
    return signing_input + "." + b64url(signature)


@dataclass(slots=True)
class ClientCertificate:
    """C{GRAPH_CLIENT_CERTIFICATE_FILE}: a new signed assertion per token request.

    The file is read again for each token request, so a certificate renewed
    in place (a Kubernetes secret, a cert-manager volume) is used without a
    restart; when the new file cannot be used, the last good one is, and
    L{reload_error} says why.
    """

    client_id: str
    token_url: str
    scope: str
    path: str
    password: str | None = field(repr=False)
    certificate: Certificate = field(repr=False)
    reload_error: str | None = None

    @classmethod
    def load(
        cls, client_id: str, token_url: str, scope: str, path: str, password: str | None
    ) -> ClientCertificate:
        return cls(client_id, token_url, scope, path, password, load_certificate(path, password))

    @property
    def description(self) -> str:
        return (
            f"client certificate for application {self.client_id} "
            f"(SHA-1 thumbprint {self.certificate.sha1_hex}, subject {self.certificate.subject})"
        )

    def token_request(self, now: float) -> TokenRequest:
        try:
            self.certificate = load_certificate(self.path, self.password)
            self.reload_error = None
        except CredentialError as e:
            self.reload_error = str(e)
        assertion = client_assertion(
            self.certificate, self.client_id, self.token_url, now, str(uuid.uuid4())
        )
        body = _form(
            self.client_id,
            self.scope,
            client_assertion_type=ASSERTION_TYPE,
            client_assertion=assertion,
        )
        return TokenRequest("POST", self.token_url, body, "application/x-www-form-urlencoded")


@dataclass(frozen=True, slots=True)
class FederatedToken:
    """C{AZURE_FEDERATED_TOKEN_FILE}: the workload's token, exchanged for a Graph token."""

    client_id: str
    token_url: str
    scope: str
    path: str

    @property
    def description(self) -> str:
        return f"workload identity federation for application {self.client_id} ({self.path})"

    def token_request(self, now: float) -> TokenRequest:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FEDERATED_TOKEN + 1)
        except OSError as e:
            raise CredentialError(
                f"cannot read AZURE_FEDERATED_TOKEN_FILE {self.path!r}: "
                f"{e.strerror or type(e).__name__}"
            ) from None
        token = data.strip()
        if not token or len(data) > MAX_FEDERATED_TOKEN or not token.isascii():
            raise CredentialError(f"AZURE_FEDERATED_TOKEN_FILE {self.path!r} does not hold a token")
        body = _form(
            self.client_id,
            self.scope,
            client_assertion_type=ASSERTION_TYPE,
            client_assertion=token.decode("ascii"),
        )
        return TokenRequest("POST", self.token_url, body, "application/x-www-form-urlencoded")


@dataclass(frozen=True, slots=True)
class ManagedIdentity:
    """C{GRAPH_MANAGED_IDENTITY}: a token from the host's identity endpoint.

    On a VM, scale set, AKS node or container instance that is the instance
    metadata service (IMDS); on App Service and Functions the platform sets
    C{IDENTITY_ENDPOINT} and C{IDENTITY_HEADER}, and those win.  The
    resource is Graph's base URL (the v1 form of a scope).
    """

    resource: str
    endpoint: str
    client_id: str = ""
    identity_endpoint: str = ""
    identity_header: str = field(default="", repr=False)

    @property
    def description(self) -> str:
        which = f"user-assigned {self.client_id}" if self.client_id else "system-assigned"
        where = "App Service" if self.identity_endpoint else "instance metadata"
        return f"managed identity ({which}, {where})"

    def token_request(self, now: float) -> TokenRequest:
        query = {"resource": self.resource}
        if self.client_id:
            query["client_id"] = self.client_id
        if self.identity_endpoint and self.identity_header:
            query["api-version"] = APP_SERVICE_API_VERSION
            url = f"{self.identity_endpoint}?{urlencode(query)}"
            headers = {"X-IDENTITY-HEADER": self.identity_header}
        else:
            query["api-version"] = IMDS_API_VERSION
            url = f"{self.endpoint}?{urlencode(query)}"
            headers = {"Metadata": "true"}
        return TokenRequest("GET", url, None, None, headers, kind="managed")


def credential_warning(credential: Credential, now: float) -> str | None:
    """A warning about C{credential} for the start-up log and the doctor, if it has one.

    Only certificates carry an end date the relay can read; a client
    secret's expiry is known to Entra alone (its portal shows it).
    """
    if isinstance(credential, ClientCertificate):
        return expiry_warning(credential.certificate, now)
    return None


def credential_for(settings: GraphSettings) -> Credential:
    """The one credential the settings configure (L{GraphSettings.credential} chose it).

    The provider and C{smtpproxy doctor} both build theirs here, so the
    doctor's token check asks Entra exactly what a delivery would.

    @raise CredentialError: the certificate file cannot be used.
    """
    from smtpproxy.providers.graph.settings import CERTIFICATE, FEDERATED, MANAGED
    from smtpproxy.providers.graph.tokens import token_url

    url = token_url(settings.authority_host, settings.tenant_id)
    scope = scope_for(settings.endpoint)
    kind = settings.credential
    if kind == CERTIFICATE:
        password = settings.client_certificate_password or None
        return ClientCertificate.load(
            settings.client_id, url, scope, settings.client_certificate_file, password
        )
    if kind == FEDERATED:
        return FederatedToken(settings.client_id, url, scope, settings.azure_federated_token_file)
    if kind == MANAGED:
        return ManagedIdentity(
            settings.endpoint.rstrip("/"),
            settings.managed_identity_endpoint,
            settings.managed_identity_client_id,
            settings.identity_endpoint,
            settings.identity_header,
        )
    return ClientSecret(settings.client_id, settings.client_secret, url, scope)
