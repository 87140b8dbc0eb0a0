"""The upstream SMTP provider: each message relayed, unchanged, to one SMTP server.

L{SmtpProvider.send} takes a session from the L{Pool}, lets
L{wire.plan} turn the message into commands for what that upstream offers,
runs the transaction (L{RelayClient.deliver}) and hands the session back.
The upstream's verdict becomes ours: its 4xx a L{TransientDeliveryError},
its 5xx a L{PermanentDeliveryError} of the same class, both with its text.
Recipients it refused while taking others are logged, and C{send} fires
with a L{PartlyRefused} naming them and their replies: the message went to
the rest, and the caller decides what the refused ones are owed.  Unless
the caller retries recipients one by one (the queue: C{Email.per_recipient_retry}),
a recipient refused with a 4xx keeps the body from the upstream altogether:
C{send} fails with a L{PartlyDeferredError} (our client hears 451 and its
retry reaches everyone once).
"""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger

from smtpproxy.errors import DeliveryError, TransientDeliveryError
from smtpproxy.logsafe import clip, clip_list
from smtpproxy.mime.message import Email
from smtpproxy.providers.result import (
    PartlyDeferredError,
    PartlyRefused,
    SendCancelledError,
    current_handover,
)
from smtpproxy.providers.smtp import wire
from smtpproxy.providers.smtp.client import RelayClient, StaleConnectionError
from smtpproxy.providers.smtp.pool import Pool
from smtpproxy.providers.smtp.relayfrom import force_sender
from smtpproxy.providers.smtp.settings import RelaySettings
from smtpproxy.providers.smtp.trust import client_tls

log = Logger(namespace="smtpproxy.smtp")


class SmtpProvider:
    """Relays raw messages to C{RELAY_HOST} over a pool of reused sessions."""

    name = "smtp"
    # It sends Email.raw as it is: an abandoned parse loses nothing.
    accepts_raw_mime = True
    # DATA only (no BDAT/BINARYMIME upstream): binary content is not offered.
    binary_mime = False

    def __init__(
        self,
        settings: RelaySettings,
        reactor: IReactorTime,
        tls: IOpenSSLClientConnectionCreator | None = None,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        if tls is None and settings.tls != "none":
            tls = client_tls(settings)
        self._tls = tls
        self._where = f"{settings.host}:{settings.port}"
        self.pool = Pool(self._connect, settings.max_connections, reactor)
        if settings.tls != "none" and not settings.tls_verify:
            log.warn("upstream certificate not checked", upstream=self._where)

    def send(self, email: Email) -> Deferred[PartlyRefused | None]:
        """Relay C{email}; fires once the upstream accepted it for at least one recipient.

        With None when it took every recipient, else with the refused ones.
        """
        return Deferred.fromCoroutine(self._send(email))

    async def _send(self, email: Email) -> PartlyRefused | None:
        if self._settings.sender:
            # RELAY_FROM: once per message, before any attempt (relayfrom).
            email = force_sender(email, self._settings.sender)
        handover = current_handover()
        for attempt in (1, 2):
            try:
                client = await self.pool.acquire()
            except CancelledError:
                # Cancelled while waiting for a connection: nothing was sent.
                raise SendCancelledError(handed_over=False) from None
            try:
                transaction = wire.plan(email, client.capabilities)
                delivered = await client.deliver(transaction, handover)
            except StaleConnectionError:
                if attempt == 2:
                    raise
                continue
            except PartlyDeferredError as e:
                log.warn(
                    "upstream deferred some recipients, message not sent",
                    upstream=self._where,
                    message_id=None if email.message_id is None else clip(email.message_id),
                    accepted=len(e.accepted),
                    refused=clip_list([f"<{r.address}> {r.reply}" for r in e.refused]),
                )
                raise
            finally:
                self.pool.release(client)
            if delivered.refused:
                refused = [f"<{address}> {reply}" for address, reply in delivered.refused]
                log.warn(
                    "upstream refused some recipients",
                    upstream=self._where,
                    message_id=None if email.message_id is None else clip(email.message_id),
                    accepted=len(delivered.accepted),
                    refused=clip_list(refused),
                )
                return PartlyRefused(
                    delivered.accepted,
                    tuple(wire.refusal(address, reply) for address, reply in delivered.refused),
                )
            return None
        return None  # pragma: no cover (the loop returns or raises)

    async def _open(self) -> RelayClient:
        settings = self._settings
        client = RelayClient(
            settings.helo,
            settings.username,
            settings.password,
            self._tls if settings.tls == "starttls" else None,
            require_tls=settings.tls == "starttls",
            timeout=settings.timeout,
            implicit_tls=settings.tls == "implicit",
        )
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            cast("object", self._reactor), settings.host, settings.port, timeout=settings.timeout
        )
        if settings.tls == "implicit":
            assert self._tls is not None
            endpoint = wrapClientTLS(self._tls, endpoint)
        try:
            await connectProtocol(endpoint, client)
        except (CancelledError, ConnectingCancelledError):
            # The send was cancelled (a forced stop), not the upstream down:
            # no "connection failed" warning, and nothing was handed over.
            raise SendCancelledError(handed_over=False) from None
        except Exception as e:  # DNS, refused, unreachable, timeout: all "try later"
            reason = clip(str(e) or type(e).__name__, 200)
            log.warn("upstream connection failed", upstream=self._where, reason=reason)
            raise TransientDeliveryError(
                f"cannot connect to the upstream: {reason}", "4.4.1"
            ) from None
        try:
            return await client.ready
        except CancelledError:
            # Cancelled during the greeting, EHLO, STARTTLS or AUTH: the
            # ready's canceller has closed the half-made session.
            raise SendCancelledError(handed_over=False) from None
        except DeliveryError as e:
            log.warn("upstream session failed", upstream=self._where, reason=e.reason)
            raise

    def _connect(self) -> Deferred[RelayClient]:
        return Deferred.fromCoroutine(self._open())

    def close(self) -> Deferred[None]:
        """QUIT the idle sessions; those in use close when their message is done."""
        return self.pool.close()
