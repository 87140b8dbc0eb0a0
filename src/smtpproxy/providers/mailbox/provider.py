"""The mailbox provider (C{PROVIDER=mailbox}): keep mail to look at instead of sending it.

Developers point an application at the relay and read what it sent in a
browser (L{smtpproxy.web.mailbox}) or through a Mailpit-shaped JSON API,
without a Microsoft 365 tenant.  Two extras the relay makes cheap:

 - B{release}: send a captured message on to real recipients through
   another configured provider (C{MAILBOX_RELEASE_PROVIDER}: graph, smtp);
 - B{chaos}: refuse a chosen share of transactions at a chosen stage
   (L{smtpproxy.providers.mailbox.chaos}), to test a client's retries.

The chaos stages before the message reach the provider through
L{envelope_refusal}, the optional hook the delivery avatar asks at C{MAIL}
and C{RCPT} (see L{smtpproxy.providers.envelope_refusal}).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpproxy.addresses import mailbox_problem
from smtpproxy.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from smtpproxy.logsafe import MAX_REASON, clip
from smtpproxy.mime.message import Email, parse_message
from smtpproxy.providers.mailbox import chaos
from smtpproxy.providers.mailbox.persist import MailboxFile, Row
from smtpproxy.providers.mailbox.settings import MailboxSettings
from smtpproxy.providers.mailbox.store import Store, Stored, TooLargeError, new_id, prepare
from smtpproxy.providers.result import Handover, SendCancelledError, current_handover
from smtpproxy.queue.backend import share_the_gil

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtpproxy.providers import Provider

log = Logger(namespace="smtpproxy.mailbox")

#: Recipients one release may name.
MAX_RELEASE_RECIPIENTS = 100


class ReleaseError(ValueError):
    """A release request that cannot be carried out, with the reason for the caller."""


class MailboxProvider:
    """Stores each message in a bounded L{Store}, optionally copied to a SQLite file."""

    name = "mailbox"
    # It keeps the bytes as received; an unparsed message is still shown raw.
    accepts_raw_mime = True
    binary_mime = True

    def __init__(
        self,
        settings: MailboxSettings,
        reactor: IReactorTime,
        release_to: Provider | None = None,
        file: MailboxFile | None = None,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.started = reactor.seconds()
        self.store = Store(settings.max_messages, settings.max_bytes, reactor.seconds)
        self.chaos = settings.chaos
        self.release_to = release_to
        self.file = file
        self._draw = draw
        self._loaded: Deferred[None] | None = None
        if file is not None:
            self._loaded = self._load(file)

    @property
    def is_loaded(self) -> bool:
        return self._loaded is None or self._loaded.called

    def loaded(self) -> Deferred[None]:
        """Fires once the file's messages are in the store (at once without a file)."""
        if self._loaded is None or self._loaded.called:
            return defer.succeed(None)
        waiting: Deferred[None] = Deferred()

        def done(result: None) -> None:
            # _load's callbacks never fail (an unreadable file is logged), and
            # the waiter gets its own Deferred, so nothing chains back here.
            waiting.callback(None)
            return result

        self._loaded.addCallback(done)
        return waiting

    # -- the provider contract ------------------------------------------------

    def send(self, email: Email) -> Deferred[None]:
        """Keep C{email}; with a file, fire once it is written there."""
        refusal = chaos.refusal(self.chaos.data, self._draw, "data")
        if refusal is not None:
            self.store.counters.rejected += 1
            return defer.fail(refusal)
        # Taken now: the load's callback below runs outside the caller's context.
        handover = current_handover()
        if not self.is_loaded:
            # Mail that arrives while the file is read waits, so the order holds.
            waiting = self.loaded().addCallback(lambda _: self._keep(email, handover))
            return waiting.addErrback(_not_kept_if_cancelled)
        return self._keep(email, handover)

    def close(self) -> Deferred[None]:
        closing: Deferred[None] = defer.succeed(None)
        if self.release_to is not None:
            closing = defer.maybeDeferred(self.release_to.close)
        if self.file is not None:
            self.file.close()
        return closing

    def envelope_refusal(self, stage: str) -> DeliveryError | None:
        """The chaos refusal for this C{MAIL} (C{"sender"}) or C{RCPT} (C{"recipient"}), if any."""
        refusal = chaos.refusal(self.chaos.stage(stage), self._draw, stage)
        if refusal is not None:
            self.store.counters.rejected += 1
        return refusal

    # -- what the web side asks -----------------------------------------------

    def delete(self, ids: Sequence[str]) -> Deferred[None]:
        gone = self.store.delete(ids)
        return self._forget(gone)

    def clear(self) -> Deferred[None]:
        return self._forget(self.store.clear())

    def mark_read(self, stored: Stored, read: bool = True) -> None:
        if stored.read != read:
            stored.read = read
            if self.file is not None:
                self.file.set_read(stored.id, read).addErrback(self._file_failed, "update")

    def set_read(self, targets: Iterable[Stored], read: bool) -> Deferred[None]:
        """Set the read flag of C{targets}; with a file, fire once that is written.

        The file gets one write for them all, not one per message: marking a
        full mailbox read would otherwise queue a write per message per
        request.
        """
        changed = [stored for stored in targets if stored.read != read]
        for stored in changed:
            stored.read = read
        if self.file is None or not changed:
            return defer.succeed(None)
        writing = self.file.set_read_many([stored.id for stored in changed], read)

        def failed(failure: Failure) -> Failure:
            self._file_failed(failure, "update")
            return failure  # the caller answers it (500)

        return writing.addErrback(failed)

    def set_chaos(self, triggers: chaos.Triggers) -> None:
        self.chaos = triggers
        log.info(
            "mailbox chaos changed",
            **{
                name: f"{t.code}:{t.probability}%"
                for name in chaos.STAGES
                for t in [triggers.stage(name)]
            },
        )

    def release(self, stored: Stored, to: Sequence[str]) -> Deferred[None]:
        """Send C{stored} as received to C{to} through the release provider.

        @raise ReleaseError: no release provider, or recipients that are not addresses.
        """
        if self.release_to is None:
            raise ReleaseError("release is off: set MAILBOX_RELEASE_PROVIDER (graph or smtp)")
        recipients = [address.strip() for address in to if address.strip()]
        if not recipients:
            raise ReleaseError("name at least one recipient in To")
        if len(recipients) > MAX_RELEASE_RECIPIENTS:
            raise ReleaseError(f"at most {MAX_RELEASE_RECIPIENTS} recipients per release")
        for address in recipients:
            if mailbox_problem(address) is not None:
                raise ReleaseError(f"{clip(address, 80)!r} is not an email address")
        email = dataclasses.replace(stored.email, envelope_to=tuple(recipients), dsn=None)
        fields = {
            "id": stored.id,
            "provider": self.release_to.name,
            "recipients": [clip(r) for r in recipients],
        }
        try:
            sending = defer.maybeDeferred(self.release_to.send, email)
        except Exception:  # maybeDeferred turns raising into a failure; belt and braces
            sending = defer.fail()

        def released(_: object) -> None:
            log.info("mailbox message released", **fields)

        def failed(failure: Failure) -> Failure:
            log.warn(
                "mailbox release failed", reason=clip(str(failure.value), MAX_REASON), **fields
            )
            return failure

        return sending.addCallbacks(released, failed)

    # -- keeping ---------------------------------------------------------------

    def _keep(self, email: Email, handover: Handover) -> Deferred[None]:
        """Put C{email} in the store; with a file, fire once its row is committed.

        Once the store has the message it is in the mailbox for everyone to
        see (API, web, C{/metrics}) and its row is on its way to the file:
        that is the hand-over, marked for the caller.  A cancel after it
        (a forced stop, a client gone) cannot take the message back, so it
        only cuts off the answer (L{SendCancelledError} with C{handed_over})
        and leaves the write to finish; were the cancel to reach the write,
        the message would leave the store while its row still committed
        (back at the next start), and the client, told 421, would send a
        second copy.  Only a write that really fails takes it out again.
        """
        try:
            stored, evicted = self.store.add(email)
        except TooLargeError as e:
            return defer.fail(PermanentDeliveryError(f"mailbox: {e}", "5.3.4", 552))
        handover.mark()
        if self.file is None:
            return defer.succeed(None)
        row = Row(stored.id, stored.created, email.envelope_from, email.envelope_to, email.raw)

        def unwritten(failure: Failure) -> None:
            # Not on disk: not kept, and the client should try again.
            self.store.delete([stored.id])
            log.warn(
                "mailbox file not written",
                path=self.settings.path,
                reason=clip(str(failure.value), MAX_REASON),
            )
            raise TransientDeliveryError("mailbox file cannot be written", "4.3.0")

        writing = self.file.insert(row, [m.id for m in evicted]).addErrback(unwritten)
        answer: Deferred[None] = Deferred(_answer_cut_off)

        def settle(result: Failure | None) -> None:
            # After a cancel the answer has fired already; the write's own
            # outcome was handled above (a failure logged), so it ends here.
            if answer.called:
                return
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(None)

        writing.addBoth(settle)
        return answer

    def _forget(self, ids: list[str]) -> Deferred[None]:
        if self.file is None or not ids:
            return defer.succeed(None)
        return self.file.delete(ids)

    def _file_failed(self, failure: Failure, what: str) -> None:
        log.warn(
            "mailbox file not written",
            path=self.settings.path,
            reason=clip(str(failure.value), MAX_REASON),
            action=what,
        )

    def _load(self, file: MailboxFile) -> Deferred[None]:
        def parsed(row: Row) -> Stored:
            email = parse_message(row.envelope_from, row.envelope_to, row.raw)
            stored = prepare(email, row.created, row.id)
            stored.read = row.read
            return stored

        def loaded(found: list[Stored]) -> None:
            evicted: list[str] = []
            for stored in found:
                try:
                    evicted += [m.id for m in self.store.put(stored)]
                except TooLargeError:
                    evicted.append(stored.id)
            log.info("mailbox file opened", path=file.path, messages=len(self.store))
            if evicted:
                file.delete(evicted).addErrback(self._file_failed, "delete")

        def unreadable(failure: Failure) -> None:
            # Every write would fail the same way: run in memory instead.
            self.file = None
            file.close()
            log.error(
                "mailbox file not readable; starting empty",
                path=file.path,
                reason=clip(str(failure.value), MAX_REASON),
            )

        return file.load(self.settings.max_messages, parsed).addCallbacks(loaded, unreadable)


def _not_kept_if_cancelled(failure: Failure) -> Failure:
    """A send cancelled while it waited for the load: the store never had it."""
    error = failure.value
    if isinstance(error, defer.CancelledError) and not isinstance(error, SendCancelledError):
        raise SendCancelledError(handed_over=False) from None
    return failure


def _answer_cut_off(answer: Deferred[None]) -> None:
    """Cancelling a send the mailbox already holds: say so, and leave its write alone."""
    answer.errback(SendCancelledError(handed_over=True))


def create_mailbox(
    settings: MailboxSettings, reactor: IReactorTime, release_to: Provider | None
) -> MailboxProvider:
    """The provider with its file (if C{MAILBOX_PATH} is set).

    With a file, each client's C{250} waits for the SQLite thread, which
    needs the GIL back after every statement step: the queue's shorter
    switch interval (L{share_the_gil}) serves it the same way.
    """
    file = None
    if settings.path:
        share_the_gil()
        file = MailboxFile(settings.path, reactor)
    return MailboxProvider(settings, reactor, release_to, file)


__all__ = ["MailboxProvider", "ReleaseError", "create_mailbox", "new_id"]
