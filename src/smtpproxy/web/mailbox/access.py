"""Who may open the mailbox: a network list and, optionally, basic auth.

The mailbox shows every message the relay took, so it is closed to the
public internet by default (C{MAILBOX_ALLOWED_NETWORKS}: loopback and the
private ranges).  Basic auth (C{MAILBOX_USERNAME}/C{MAILBOX_PASSWORD}) is
compared in constant time.  Pure decisions; the resource applies them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from smtpproxy.policy.rules import Networks, address_in

#: The realm the browser shows in its login prompt.
REALM = b'Basic realm="smtpproxy mailbox", charset="UTF-8"'


@dataclass(frozen=True, slots=True)
class Access:
    networks: Networks
    username: str = ""
    password: str = ""

    def network_allowed(self, host: str | None) -> bool:
        return host is not None and address_in(host, self.networks)

    def authorised(self, header: bytes | None) -> bool:
        """Does the C{Authorization} header carry the configured user and password?"""
        if not self.username:
            return True
        if header is None or len(header) > 1024:
            return False
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        # Both compared every time, so the time taken does not say which was wrong.
        user_ok = hmac.compare_digest(user, self.username.encode("utf-8"))
        password_ok = hmac.compare_digest(password, self.password.encode("utf-8"))
        return bool(sep) and user_ok and password_ok


def same_origin(origin: bytes | None, host: bytes | None) -> bool:
    """A browser's C{Origin} names this host (or there is none: not a browser's cross-site call).

    Cross-site pages can make a browser C{POST} here (a form needs no
    preflight); the mailbox refuses such requests rather than release or
    delete mail on another site's behalf.
    """
    if origin is None:
        return True
    if host is None:
        return False
    _, sep, rest = origin.partition(b"://")
    return bool(sep) and rest.rstrip(b"/").lower() == host.lower()
