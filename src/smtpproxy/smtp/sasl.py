"""SMTP AUTH: SASL PLAIN and LOGIN decoding, and the password checker.

The SASL decoding is pure and strict: anything malformed raises
L{SASLError}, which the protocol answers with C{501} while keeping the
session.  (Stock Twisted lets the decoding errors escape, and the client sees
the connection drop.)

Credentials are checked through a C{twisted.cred} portal so that other
checkers (LDAP, HTTP, JWT) can be plugged in later without touching the
protocol.  The built-in checker compares in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import implementer

MECHANISMS = (b"PLAIN", b"LOGIN")


class SASLError(Exception):
    """The client's SASL message is malformed."""


def decode_base64(data: bytes) -> bytes:
    """Decode one SASL response line; C{=} is the empty response (RFC 4954 4)."""
    data = data.strip()
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("not valid base64") from None


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(f"the {what} is not UTF-8") from None


def decode_plain(response: bytes) -> credentials.UsernamePassword:
    """Parse a decoded PLAIN response: C{authzid NUL authcid NUL password}."""
    parts = response.split(b"\x00")
    if len(parts) != 3:
        raise SASLError("PLAIN needs exactly two NUL separators")
    authzid, user, password = parts
    if not user:
        raise SASLError("PLAIN needs a user name")
    if authzid and authzid != user:
        # Acting on behalf of another identity is not something a relay offers.
        raise SASLError("PLAIN authorization identity must be empty or the user")
    return credentials.UsernamePassword(
        _text(user, "user name").encode("utf-8"), _text(password, "password").encode("utf-8")
    )


def decode_login_field(response: bytes, what: str) -> bytes:
    """Validate one LOGIN step (user name or password) and return its bytes."""
    if b"\x00" in response:
        raise SASLError(f"the {what} contains a NUL byte")
    return _text(response, what).encode("utf-8")


@implementer(ICredentialsChecker)
class StaticPasswordChecker:
    """Accepts exactly one user name and password, compared in constant time."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode("utf-8")
        self._password = password.encode("utf-8")

    def requestAvatarId(
        self, creds: credentials.IUsernamePassword
    ) -> defer.Deferred[bytes | tuple[()]]:
        user = creds.username if isinstance(creds.username, bytes) else creds.username.encode()
        password = creds.password if isinstance(creds.password, bytes) else creds.password.encode()
        # Evaluate both comparisons every time so timing says nothing about
        # which of the two was wrong.
        good_user = hmac.compare_digest(user, self._username)
        good_password = hmac.compare_digest(password, self._password)
        if good_user and good_password:
            return defer.succeed(user)
        return defer.fail(error.UnauthorizedLogin("bad user name or password"))
