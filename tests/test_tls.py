"""Tests for L{smtpproxy.tls}: generated and loaded certificates, and real handshakes."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import warnings
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa, x25519
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IReactorSSL
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy import tls

NOW = datetime(2026, 2, 23, 12, 0, tzinfo=UTC)
TIMEOUT = 10.0


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


_AnyKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | dsa.DSAPrivateKey


def _key_pem(key: _AnyKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    ca: bool,
) -> x509.Certificate:
    """A certificate for C{name}, signed by C{issuer} (or by itself)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(hours=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def _chain() -> tuple[bytes, bytes, bytes]:
    """A root CA, an intermediate and a leaf for C{relay.test}.

    @return: C{(root PEM, leaf + intermediate PEM, leaf key PEM)}.
    """
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _issue("Test Root", root_key, None, ca=True)
    mid = _issue("Test Intermediate", mid_key, (root, root_key), ca=True)
    leaf = _issue("relay.test", leaf_key, (mid, mid_key), ca=False)
    return _pem(root), _pem(leaf) + _pem(mid), _key_pem(leaf_key)


class SelfSignedTests(SynchronousTestCase):
    """L{tls.self_signed} makes a usable certificate without touching the disk."""

    def test_names(self) -> None:
        """The certificate names the host, localhost and both loopback addresses."""
        cert_pem, _ = tls.self_signed("Relay.Example.COM.", now=NOW)
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["relay.example.com", "localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "relay.example.com")

    def test_address_and_localhost_are_not_repeated(self) -> None:
        """A host given as an address is an IP entry, and duplicates are dropped."""
        cert_pem, _ = tls.self_signed("127.0.0.1", now=NOW)
        san = (
            x509.load_pem_x509_certificate(cert_pem)
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value
        )
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(len(san.get_values_for_type(x509.IPAddress)), 2)

    def test_long_hostname(self) -> None:
        """A name longer than a common name may be stays in the SAN only."""
        name = ("a" * 60 + ".") * 3 + "example"
        cert = x509.load_pem_x509_certificate(tls.self_signed(name, now=NOW)[0])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn(name, san.get_values_for_type(x509.DNSName))
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "smtpproxy")

    def test_validity_and_key(self) -> None:
        """Valid from shortly before C{now} for a year; EC P-256 key matching the certificate."""
        cert_pem, key_pem = tls.self_signed("relay.test", now=NOW)
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.assertEqual(cert.not_valid_before_utc, NOW - tls.CLOCK_SKEW)
        self.assertEqual(cert.not_valid_after_utc, NOW + tls.SELF_SIGNED_LIFETIME)
        self.assertGreater(cert.serial_number, 0)
        key = serialization.load_pem_private_key(key_pem, password=None)
        public = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertEqual(key.public_key().public_numbers(), public.public_numbers())
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        self.assertFalse(constraints.ca)

    def test_fresh_each_time(self) -> None:
        """Two calls give two different keys and serial numbers."""
        (cert1, key1), (cert2, key2) = tls.self_signed("a"), tls.self_signed("a")
        self.assertNotEqual(key1, key2)
        self.assertNotEqual(
            x509.load_pem_x509_certificate(cert1).serial_number,
            x509.load_pem_x509_certificate(cert2).serial_number,
        )

    def test_nothing_written(self) -> None:
        """Generating and using a certificate leaves the working directory empty (R7.5)."""
        workdir = self.mktemp()
        os.makedirs(workdir)
        previous = os.getcwd()
        os.chdir(workdir)
        self.addCleanup(os.chdir, previous)
        cert, key = tls.self_signed("relay.test")
        tls.server_context(cert, key).getContext()
        tls.describe(cert)
        self.assertEqual(os.listdir("."), [])

    def test_describe(self) -> None:
        """The summary has the common name, SHA-256 fingerprint and expiry."""
        cert_pem, _ = tls.self_signed("relay.test", now=NOW)
        cert = x509.load_pem_x509_certificate(cert_pem)
        fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
        self.assertEqual(
            tls.describe(cert_pem, now=NOW),
            f"CN=relay.test SHA256={fingerprint} expires=2027-02-23T12:00:00Z",
        )
        later = NOW + timedelta(days=400)
        self.assertTrue(tls.describe(cert_pem, now=later).endswith(" (EXPIRED)"))


class LoadFilesTests(SynchronousTestCase):
    """L{tls.load_files} accepts good files and names the file at fault otherwise."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.cert, self.key = tls.self_signed("relay.test")

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertFails(self, cert_path: str, key_path: str, setting: str, path: str, why: str) -> None:
        """Loading fails with a message naming C{setting}, C{path} and C{why}."""
        error = self.assertRaises(tls.TLSConfigError, tls.load_files, cert_path, key_path)
        message = str(error)
        self.assertTrue(message.startswith(f"{setting} {path!r}: "), message)
        self.assertIn(why, message)

    def test_good_pair(self) -> None:
        """A matching certificate and key load and come back as PEM."""
        cert_pem, key_pem = tls.load_files(
            self.write("c.pem", self.cert), self.write("k.pem", self.key)
        )
        self.assertEqual(cert_pem, self.cert)
        self.assertEqual(key_pem, self.key)

    def test_chain_and_extra_text(self) -> None:
        """A chain keeps every certificate, in order; text around the blocks is dropped."""
        _, chain, key = _chain()
        cert_pem, _ = tls.load_files(
            self.write("c.pem", b"# issued by Test Root\n" + chain), self.write("k.pem", key)
        )
        self.assertEqual(cert_pem, chain)
        self.assertEqual(len(x509.load_pem_x509_certificates(cert_pem)), 2)

    def test_combined_file(self) -> None:
        """One file holding the certificate and the key serves for both settings."""
        both = self.write("both.pem", self.cert + self.key)
        self.assertEqual(tls.load_files(both, both), (self.cert, self.key))

    def test_traditional_key(self) -> None:
        """A key in the older "BEGIN EC PRIVATE KEY" format is accepted."""
        key = serialization.load_pem_private_key(self.key, password=None)
        legacy = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        self.assertIn(b"BEGIN EC PRIVATE KEY", legacy)
        _, key_pem = tls.load_files(self.write("c.pem", self.cert), self.write("k.pem", legacy))
        self.assertEqual(key_pem, self.key)

    def test_missing(self) -> None:
        """A missing file is reported as such, for either setting."""
        cert, key = self.write("c.pem", self.cert), self.write("k.pem", self.key)
        nowhere = os.path.join(self.dir, "nope.pem")
        self.assertFails(nowhere, key, "TLS_CERT_FILE", nowhere, "file not found")
        self.assertFails(cert, nowhere, "TLS_KEY_FILE", nowhere, "file not found")

    def test_directory(self) -> None:
        """A directory where a file should be is reported."""
        key = self.write("k.pem", self.key)
        self.assertFails(self.dir, key, "TLS_CERT_FILE", self.dir, "is a directory")

    def test_unreadable(self) -> None:
        """A file we may not read is reported as unreadable."""
        if os.geteuid() == 0:
            self.skipTest("root reads any file")
        key = self.write("k.pem", self.key)
        os.chmod(key, 0)
        self.assertFails(self.write("c.pem", self.cert), key, "TLS_KEY_FILE", key, "not readable")

    def test_empty(self) -> None:
        """An empty file is reported as empty."""
        empty = self.write("empty.pem", b"\n")
        self.assertFails(empty, self.write("k.pem", self.key), "TLS_CERT_FILE", empty, "empty")

    def test_garbage(self) -> None:
        """Text that is not PEM is reported as not PEM, for either file."""
        junk = self.write("junk.pem", b"hello, I am not a certificate\n")
        cert, key = self.write("c.pem", self.cert), self.write("k.pem", self.key)
        self.assertFails(junk, key, "TLS_CERT_FILE", junk, "not a PEM certificate")
        self.assertFails(cert, junk, "TLS_KEY_FILE", junk, "not a PEM private key")

    def test_corrupt_pem(self) -> None:
        """A PEM block whose content is damaged is reported as invalid."""
        broken = self.cert.replace(b"\n", b"\n!!", 3)
        bad_cert = self.write("bad-cert.pem", broken)
        key = self.write("k.pem", self.key)
        self.assertFails(bad_cert, key, "TLS_CERT_FILE", bad_cert, "not valid PEM")
        bad_key = self.write("bad-key.pem", self.key.replace(b"\n", b"\n!!", 3))
        cert = self.write("c.pem", self.cert)
        self.assertFails(cert, bad_key, "TLS_KEY_FILE", bad_key, "not valid PEM")

    def test_der(self) -> None:
        """A binary DER certificate gets a hint to convert it."""
        cert = x509.load_pem_x509_certificate(self.cert)
        der = self.write("c.der", cert.public_bytes(serialization.Encoding.DER))
        self.assertFails(der, self.write("k.pem", self.key), "TLS_CERT_FILE", der, "DER")

    def test_swapped(self) -> None:
        """Certificate and key given the wrong way round are recognised as swapped."""
        cert, key = self.write("c.pem", self.cert), self.write("k.pem", self.key)
        self.assertFails(key, cert, "TLS_CERT_FILE", key, "swapped")
        self.assertFails(cert, cert, "TLS_KEY_FILE", cert, "swapped")

    def test_mismatched_key(self) -> None:
        """A key from another certificate is refused, naming both files."""
        _, other_key = tls.self_signed("other.test")
        cert, key = self.write("c.pem", self.cert), self.write("other.pem", other_key)
        self.assertFails(cert, key, "TLS_KEY_FILE", key, "does not match the certificate")
        self.assertFails(cert, key, "TLS_KEY_FILE", key, repr(cert))

    def test_chain_out_of_order(self) -> None:
        """A chain with the server certificate after an intermediate is refused."""
        _, chain, key = _chain()
        leaf, mid = x509.load_pem_x509_certificates(chain)
        cert = self.write("c.pem", _pem(mid) + _pem(leaf))
        self.assertFails(
            cert, self.write("k.pem", key), "TLS_CERT_FILE", cert, "matches certificate #2"
        )

    def test_encrypted_key(self) -> None:
        """A passphrase-protected key is refused, in PKCS#8 and in the older format."""
        key = serialization.load_pem_private_key(self.key, password=None)
        cert = self.write("c.pem", self.cert)
        for name, form in (
            ("pkcs8.pem", serialization.PrivateFormat.PKCS8),
            ("legacy.pem", serialization.PrivateFormat.TraditionalOpenSSL),
        ):
            data = key.private_bytes(
                serialization.Encoding.PEM, form, serialization.BestAvailableEncryption(b"pw")
            )
            path = self.write(name, data)
            self.assertFails(cert, path, "TLS_KEY_FILE", path, "encrypted")

    def test_key_that_cannot_sign(self) -> None:
        """A key-agreement-only key (X25519) is refused with the reason."""
        key = x25519.X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self.write("x25519.pem", key)
        self.assertFails(self.write("c.pem", self.cert), path, "TLS_KEY_FILE", path, "cannot sign")


def _valid_between(key: _AnyKey, start: datetime, end: datetime) -> tuple[bytes, bytes]:
    """A self-signed certificate for C{key} valid from C{start} to C{end}, and the key, as PEM."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert), _key_pem(key)


class StrengthAndValidityTests(SynchronousTestCase):
    """L{tls.load_files} refuses weak keys and certificates outside their validity."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def pair(
        self,
        key: _AnyKey,
        start: datetime = NOW - timedelta(days=1),
        end: datetime = NOW + timedelta(days=1),
    ) -> tuple[str, str]:
        """Write a self-signed certificate for C{key} valid from C{start} to C{end}."""
        paths = []
        for name_, data in zip(("c.pem", "k.pem"), _valid_between(key, start, end), strict=True):
            paths.append(os.path.join(self.dir, name_))
            with open(paths[-1], "wb") as f:
                f.write(data)
        return paths[0], paths[1]

    def refusal(self, paths: tuple[str, str]) -> str:
        return str(self.assertRaises(tls.TLSConfigError, tls.load_files, *paths, now=NOW))

    def test_rsa_sizes(self) -> None:
        """RSA 2047 bits is refused naming the key file; 2048 loads."""
        paths = self.pair(rsa.generate_private_key(65537, 2047))  # noqa: S505 - must be refused
        message = self.refusal(paths)
        self.assertTrue(message.startswith(f"TLS_KEY_FILE {paths[1]!r}: "), message)
        self.assertIn("2047 bits; at least 2048", message)
        tls.load_files(*self.pair(rsa.generate_private_key(65537, 2048)), now=NOW)

    def test_ec_sizes(self) -> None:
        """EC P-224 is refused; P-256 and P-384 load."""
        self.assertIn("224 bits", self.refusal(self.pair(ec.generate_private_key(ec.SECP224R1()))))
        for curve in (ec.SECP256R1(), ec.SECP384R1()):
            tls.load_files(*self.pair(ec.generate_private_key(curve)), now=NOW)

    def test_dsa(self) -> None:
        """A DSA key is refused: TLS 1.2+ with our suites cannot use it."""
        key = dsa.generate_private_key(2048)
        self.assertIn("DSA", self.refusal(self.pair(key)))

    def test_validity_window(self) -> None:
        """Expired and not-yet-valid certificates are refused naming the certificate file."""
        key = ec.generate_private_key(ec.SECP256R1())
        expired = self.pair(key, NOW - timedelta(days=10), NOW - timedelta(seconds=1))
        message = self.refusal(expired)
        self.assertTrue(message.startswith(f"TLS_CERT_FILE {expired[0]!r}: "), message)
        self.assertIn("expired on 2026-02-23T11:59:59Z", message)
        early = self.pair(key, NOW + timedelta(minutes=5), NOW + timedelta(days=10))
        self.assertIn("not valid until 2026-02-23T12:05:00Z", self.refusal(early))


class ServerContextTests(SynchronousTestCase):
    """L{tls.server_context} builds the OpenSSL context at once, with our suites."""

    def test_openssl_refusal_is_a_config_error(self) -> None:
        """A key OpenSSL refuses raises L{tls.TLSConfigError} with its reason, not later."""
        key = rsa.generate_private_key(65537, 1024)  # noqa: S505 - weak on purpose: must be refused
        now = datetime.now(UTC)
        cert, key_pem = _valid_between(key, now - timedelta(days=1), now + timedelta(days=1))
        error = self.assertRaises(
            tls.TLSConfigError, tls.server_context, cert, key_pem, "TLS_CERT_FILE 'x.pem'"
        )
        self.assertEqual(str(error), "TLS_CERT_FILE 'x.pem': OpenSSL refuses it (ee key too small)")

    def test_suites(self) -> None:
        """TLS 1.2 suites are ECDHE with AES-GCM or ChaCha20-Poly1305, nothing else."""
        suites = tls.TLS12_CIPHERS.split(":")
        self.assertEqual(len(suites), 6)
        for suite in suites:
            self.assertTrue(suite.startswith(("ECDHE-ECDSA-", "ECDHE-RSA-")), suite)
            self.assertTrue(suite.endswith(("-GCM-SHA256", "-GCM-SHA384", "-POLY1305")), suite)


class _Greeter(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello\r\n")  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        factory = self.factory
        assert isinstance(factory, _GreeterFactory)
        factory.lost.callback(None)


class _GreeterFactory(protocol.ServerFactory):
    """Says hello over TLS to one client and reports when the connection is gone."""

    protocol = _Greeter

    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()


def _client(port: int, context: ssl.SSLContext, name: str) -> tuple[str | None, bytes]:
    """Connect with Python's own TLS stack; return the version and the greeting."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=name) as conn,
    ):
        data = b""
        for _ in range(10):
            data += conn.recv(100)
            if data.endswith(b"\n"):
                break
        return conn.version(), data


class HandshakeTests(TestCase):
    """L{tls.server_context} serves real TLS to a real client over loopback."""

    def handshake(
        self, cert: bytes, key: bytes, context: ssl.SSLContext, name: str = "relay.test"
    ) -> defer.Deferred[tuple[str | None, bytes]]:
        """Serve C{cert}/C{key} on 127.0.0.1 and run one client handshake in a thread.

        Fires with the client's result once the server has also seen the
        connection close, so no socket outlives the test.
        """
        factory = _GreeterFactory()
        ssl_reactor: IReactorSSL = reactor  # type: ignore[assignment]
        listening = ssl_reactor.listenSSL(
            0, factory, tls.server_context(cert, key), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port  # type: ignore[attr-defined]

        async def run() -> tuple[str | None, bytes]:
            try:
                result = await deferToThread(_client, port, context, name)
            finally:
                await factory.lost
            return result

        return defer.Deferred.fromCoroutine(run())

    def verifying(self, cadata: bytes) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=cadata.decode("ascii"))

    def test_self_signed(self) -> defer.Deferred[None]:
        """A client trusting the generated certificate verifies it and gets TLS >= 1.2."""
        cert, key = tls.self_signed("relay.test")

        def check(result: tuple[str | None, bytes]) -> None:
            version, greeting = result
            self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
            self.assertEqual(greeting, b"hello\r\n")

        return self.handshake(cert, key, self.verifying(cert)).addCallback(check)

    def test_loopback_names(self) -> defer.Deferred[None]:
        """The generated certificate verifies for 127.0.0.1 and localhost too."""
        cert, key = tls.self_signed("relay.test")

        async def run() -> None:
            for name in ("127.0.0.1", "localhost"):
                _, greeting = await self.handshake(cert, key, self.verifying(cert), name)
                self.assertEqual(greeting, b"hello\r\n")

        return defer.Deferred.fromCoroutine(run())

    def test_tls12(self) -> defer.Deferred[None]:
        """A client limited to TLS 1.2 connects."""
        cert, key = tls.self_signed("relay.test")
        context = self.verifying(cert)
        context.maximum_version = ssl.TLSVersion.TLSv1_2

        def check(result: tuple[str | None, bytes]) -> None:
            self.assertEqual(result[0], "TLSv1.2")

        return self.handshake(cert, key, context).addCallback(check)

    def test_tls11_refused(self) -> defer.Deferred[None]:
        """A client offering only TLS 1.1 is refused by the server, not by itself.

        (OpenSSL 3's default security level refuses 1.1 as well; the context's
        own 1.2 floor is the guarantee if that default is ever lowered.)
        """
        cert, key = tls.self_signed("relay.test")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
        # Let this client really offer 1.1, so that only the server can say no.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")

        async def run() -> None:
            try:
                await self.handshake(cert, key, context)
            except ssl.SSLError as e:
                self.assertIn("ALERT_PROTOCOL_VERSION", str(e))
            else:
                self.fail("a TLS 1.1 handshake succeeded")

        return defer.Deferred.fromCoroutine(run())

    def test_chain_is_sent(self) -> defer.Deferred[None]:
        """With leaf + intermediate configured, a client trusting only the root verifies."""
        root, chain, key = _chain()
        directory = self.mktemp()
        os.makedirs(directory)
        paths: list[str] = []
        for name, data in (("chain.pem", chain), ("key.pem", key)):
            paths.append(os.path.join(directory, name))
            with open(paths[-1], "wb") as f:
                f.write(data)
        cert_pem, key_pem = tls.load_files(*paths)

        def check(result: tuple[str | None, bytes]) -> None:
            self.assertEqual(result[1], b"hello\r\n")

        return self.handshake(cert_pem, key_pem, self.verifying(root)).addCallback(check)

    def test_untrusted_is_refused(self) -> defer.Deferred[None]:
        """Control for the tests above: a client trusting another certificate fails to verify."""
        cert, key = tls.self_signed("relay.test")
        other, _ = tls.self_signed("relay.test")

        async def run() -> None:
            try:
                await self.handshake(cert, key, self.verifying(other))
            except ssl.SSLCertVerificationError:
                return
            self.fail("an untrusted certificate was accepted")

        return defer.Deferred.fromCoroutine(run())
