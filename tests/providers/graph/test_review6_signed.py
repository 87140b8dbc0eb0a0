"""Review 6: signed and encrypted messages that payload.is_signed does not see."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import PermanentDeliveryError
from smtpproxy.mime.message import parse_message
from smtpproxy.providers.graph.payload import plan_delivery

MAILBOX = "relay@contoso.example"
HEAD = b"From: relay@contoso.example\r\nTo: a@x.example\r\nSubject: s\r\nMIME-Version: 1.0\r\n"

PGP_ENCRYPTED = HEAD + (
    b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
    b' boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
    b"--b1\r\nContent-Type: application/octet-stream\r\n\r\n"
    b"-----BEGIN PGP MESSAGE-----\r\nhQEMA0abc\r\n-----END PGP MESSAGE-----\r\n"
    b"--b1--\r\n"
)

NESTED_SIGNED = HEAD + (
    b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
    b"--outer\r\n"
    b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";'
    b' micalg=sha-256; boundary="inner"\r\n\r\n'
    b"--inner\r\nContent-Type: text/plain\r\n\r\nsigned text\r\n"
    b'--inner\r\nContent-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHAqCAMIACAQEx\r\n"
    b"--inner--\r\n"
    b"--outer\r\nContent-Type: text/plain\r\n\r\nlist footer\r\n"
    b"--outer--\r\n"
)


class NotSeenAsSignedTests(SynchronousTestCase):
    def assertRefused(self, raw: bytes) -> None:
        email = parse_message("relay@contoso.example", ["a@x.example"], raw)
        with self.assertRaises(PermanentDeliveryError) as caught:
            plan_delivery(email, (MAILBOX,), "json")
        self.assertEqual(caught.exception.status, "5.3.4")

    def test_pgp_mime_encrypted_is_not_rebuilt_as_json(self) -> None:
        """A PGP/MIME encrypted message (RFC 3156: multipart/encrypted) rebuilt as Graph
        JSON arrives as a plain message with two file attachments that no client
        decrypts, exactly the breakage the signed-message refusal exists for; but
        mimeparts._SIGNED_TYPES lists S/MIME and multipart/signed only, so GRAPH_SEND_MODE
        =json (and every other JSON road) rebuilds it.  Right: multipart/encrypted is
        refused 554 5.3.4 like application/pkcs7-mime."""
        self.assertRefused(PGP_ENCRYPTED)

    def test_signed_part_inside_a_mixed_message_is_not_rebuilt_as_json(self) -> None:
        """A multipart/signed inside a multipart/mixed (a mailing list's footer, a gateway's
        disclaimer wrapped around a signed message) loses its signature in the JSON form
        (the smime.p7s becomes a file attachment that verifies nothing); is_signed looks at
        the top-level Content-Type only.  Right: a message holding a signed or encrypted
        part goes as raw MIME or is refused 554 5.3.4, never rebuilt."""
        self.assertRefused(NESTED_SIGNED)
