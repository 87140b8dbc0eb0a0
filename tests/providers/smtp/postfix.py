"""A private Postfix listening on loopback as the upstream: STARTTLS required, mail discarded.

A L{tests.postfix.PrivatePostfix} that accepts from 127.0.0.0/8 only,
requires STARTTLS with a certificate the test CA issued, and hands every
message to the C{discard} transport; its maillog (read back by the tests)
shows each message's sender, size, recipient count, message-id and the TLS
session.
"""

from __future__ import annotations

from tests.postfix import PrivatePostfix, missing
from tests.providers.smtp.upstream import Authority
from tests.test_twistd import free_port

__all__ = ["PostfixUpstream", "missing"]


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
    ) -> None:
        super().__init__(
            [*upstream_lines(tls_level, size_limit), *extra],
            port=free_port(),
            hostname="upstream.test",
            files={"cert.pem": authority.cert_pem, "key.pem": authority.key_pem},
            prefix="smtpproxy-upstream-",
        )
