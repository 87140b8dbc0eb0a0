"""A queued twistd relay in front of the scripted upstream, as the refusal tests use it.

The tests of refused recipients in queue mode all need the same pair: the
scripted upstream of L{tests.providers.smtp.upstream} answering each RCPT as
the test says, and a real twistd with a SQLite queue relaying to it without
TLS.  Each test keeps only what differs: the answers, the retry settings,
the recipients and what it checks afterwards.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable

from twisted.trial.unittest import TestCase

from tests.providers.smtp import upstream
from tests.queue.test_e2e import QueuedRelay
from tests.support import TIMEOUT, message


async def relay_to(
    case: TestCase, rcpt: Callable[[str], str], **settings: str
) -> tuple[upstream.Script, QueuedRelay]:
    """Listen with an upstream answering each RCPT with C{rcpt(address)}; a relay to it.

    The relay is not started yet (L{send} starts it, in the test's thread);
    both are stopped when C{case} ends.
    """
    script = upstream.Script(rcpt=rcpt)
    listening = await upstream.listen(script)
    case.addCleanup(listening.stopListening)
    relay = QueuedRelay(
        case,
        RELAY_HOST="127.0.0.1",
        RELAY_PORT=str(upstream.port_of(listening)),
        RELAY_TLS="none",
        **settings,
    )
    return script, relay


def send(relay: QueuedRelay, recipients: list[str], subject: str, body: str) -> None:
    """Start C{relay} and hand it one message over SMTP (blocking: run it in a thread)."""
    relay.start()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT) as client:
        client.sendmail("a@example.com", recipients, message(subject, body))
