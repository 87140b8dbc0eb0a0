"""Credentials that also carry the names the client asked for (SNI, EHLO).

Provider selection by C{unique_domain_auth} needs to know which of the
relay's names the client connected to.  The SMTP session knows (its EHLO
argument, and inside TLS the SNI name from the handshake); the portal
only passes credentials, so they travel along here.  Anything that takes
C{IUsernamePassword} (the built-in single user) reads them as before.
"""

from __future__ import annotations

import hmac

from twisted.cred.credentials import IUsernamePassword
from zope.interface import implementer


@implementer(IUsernamePassword)
class ClientCredentials:
    """A user name and password, plus the TLS SNI and EHLO names (or None).

    @ivar client: the client's address as the session logs it, or None; the
        router keys its summarised log lines by it (never a credential).
    """

    def __init__(
        self,
        username: bytes,
        password: bytes,
        sni: str | None = None,
        ehlo: str | None = None,
        client: str | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self.sni = sni
        self.ehlo = ehlo
        self.client = client

    def checkPassword(self, password: bytes) -> bool:
        return hmac.compare_digest(self.password, password)


def sni_of(transport: object) -> str | None:
    """The server name a TLS client sent in its handshake, or None.

    C{getHandle()} of a TLS transport (implicit TLS, or after STARTTLS) is
    pyOpenSSL's C{Connection}, whose C{get_servername()} reports the SNI
    extension; a plain TCP transport's handle is a socket, which has none.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        handle = get_handle()
    except Exception:
        return None
    get_servername = getattr(handle, "get_servername", None)
    if get_servername is None:
        return None
    try:
        name = get_servername()
    except Exception:
        return None
    if not isinstance(name, bytes):
        return None
    return name.decode("ascii", "replace") or None
