"""What becomes of a queued message after one delivery attempt: pure decisions.

The worker feeds in what happened (nothing, or the exception the provider
failed with), how many attempts the message has had, when it was queued,
the clock's reading and a random number; it gets back one of L{Delivered},
L{Retry} or L{Dead} and carries it out.  Nothing here does I/O or reads a
clock, so every branch is tested with plain numbers.

The rules, modelled on Postfix's queue manager:
  - a success is final: the message leaves the queue;
  - a permanent failure (a 5xx by L{smtpproxy.errors.reply_for_failure})
    makes the message dead at once: retrying cannot help;
  - a temporary failure waits C{min_interval}, doubling with each further
    attempt up to C{max_interval}, less a little jitter so that messages
    failed by one outage do not all come back in the same second; a
    provider's C{Retry-After} (carried on the error) is a floor, never cut
    short, but honoured only up to C{max_interval}: one odd header (a date
    in 2100) must not push the next attempt past C{max_age} and so bounce a
    message on its first try; a message the provider held back without trying
    (C{not_attempted}, a used-up sending budget) is due again exactly
    then, not on the back-off;
  - a temporary failure whose next attempt would fall past C{queued_at +
    max_age} makes the message dead now (Postfix's
    C{maximal_queue_lifetime}): better to say so at once than to keep a
    message that cannot be tried again in time;
  - an attempt that reached some recipients and was refused for others
    (L{after_partial}) is judged per recipient, as Postfix's queue manager
    does: the accepted ones are done and never sent to again; those
    refused with a 4xx wait on the same back-off as a temporary failure;
    those refused with a 5xx are failed for good, and the message ends
    dead for them (with those never reached), like a permanent failure,
    once nothing is left to retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from smtpproxy.errors import reply_for_failure
from smtpproxy.logsafe import MAX_REASON, clip
from smtpproxy.queue.model import Outcome, Recipients

#: At most this fraction of a wait is taken off at random.  Taking off
#: rather than adding keeps every wait within C{max_interval}.
JITTER = 0.1


@dataclass(frozen=True, slots=True)
class Schedule:
    """The retry settings (C{QUEUE_RETRY_MIN_INTERVAL}, C{..._MAX_INTERVAL}, C{QUEUE_MAX_AGE})."""

    min_interval: float
    max_interval: float
    max_age: float


@dataclass(frozen=True, slots=True)
class Delivered:
    """The provider took the message: remove it."""

    outcome: Outcome = Outcome.DELIVERED


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again at C{at}; C{reply} is what the attempt is recorded with."""

    at: float
    reply: str
    outcome: Outcome = Outcome.DEFERRED
    recipients: Recipients | None = None
    """Set after a partial delivery: whom the message is still owed to."""


@dataclass(frozen=True, slots=True)
class Dead:
    """Give up (C{FAILED}: permanent, C{EXPIRED}: too old); keep the message and its history."""

    outcome: Outcome
    reply: str
    recipients: Recipients | None = None
    """Set when the message reached some: the dead message keeps only the others."""


Decision = Delivered | Retry | Dead


def wait(attempts: int, schedule: Schedule, rand: float) -> float:
    """Seconds before the next try after C{attempts} (1 or more) failed attempts.

    @param rand: a number in [0, 1), injected so tests are deterministic.
    """
    exponent = max(0, min(attempts - 1, 64))  # 2**64 minutes is past any maximum
    base = min(schedule.min_interval * 2.0**exponent, schedule.max_interval)
    return base * (1.0 - JITTER * rand)


def reply_text(error: BaseException) -> str:
    """The reply an attempt is recorded with, as the relay would have answered it."""
    reply = reply_for_failure(error)
    return clip(f"{reply.code} {reply.status} {reply.text}", MAX_REASON)


def decide(
    error: BaseException | None,
    attempts: int,
    queued_at: float,
    now: float,
    schedule: Schedule,
    rand: float,
) -> Decision:
    """Choose what becomes of a message whose attempt number C{attempts} just ended.

    @param error: what the provider failed with; None for a success.
    @param attempts: attempts so far, this one included.
    """
    if error is None:
        return Delivered()
    reply = reply_text(error)
    if reply_for_failure(error).code >= 500:
        return Dead(Outcome.FAILED, reply)
    delay = wait(attempts, schedule, rand)
    asked = retry_after(error)
    if asked is not None:
        # Held back without an attempt (a sending budget): due again exactly
        # when the provider said, however often it was held before (the
        # provider's own count, up to a day).  Otherwise the backend's ask
        # is a floor up to the longest wait the schedule allows.
        if getattr(error, "not_attempted", False) is True:
            delay = asked
        else:
            delay = max(delay, min(asked, schedule.max_interval))
    if now + delay > queued_at + schedule.max_age:
        return Dead(Outcome.EXPIRED, reply)
    return Retry(now + delay, reply)


def after_partial(
    owed: Sequence[str],
    failed: Sequence[str],
    refused: Sequence[tuple[str, str, bool]],
    attempts: int,
    queued_at: float,
    now: float,
    schedule: Schedule,
    rand: float,
) -> Decision:
    """Choose what becomes of a message after an attempt that reached only some recipients.

    Also the end of a message that has recipients failed for good from
    earlier attempts (C{failed}) and was now delivered to all it was owed
    (C{refused} empty): it is dead for those, never delivered.

    @param owed: the recipients this attempt was sent to.
    @param failed: recipients refused permanently by earlier attempts.
    @param refused: (address, reply, permanent) for each recipient refused now.
    @return: L{Retry} with only the temporarily refused recipients owed,
        L{Dead} with only the recipients never reached, or L{Delivered}.
    """
    temporary = [(address, reply) for address, reply, permanent in refused if not permanent]
    lost = [*failed, *(address for address, _, permanent in refused if permanent)]
    if not temporary and not lost:
        return Delivered()
    reached = len(owed) - len(refused)
    if temporary:
        reply = _partial_reply(temporary[0][1], reached, len(owed))
        delay = wait(attempts, schedule, rand)
        never = tuple(address for address, _ in temporary) + tuple(lost)
        if now + delay > queued_at + schedule.max_age:
            return Dead(Outcome.EXPIRED, reply, Recipients(never))
        return Retry(
            now + delay, reply, recipients=Recipients(tuple(a for a, _ in temporary), tuple(lost))
        )
    permanent = [reply for _, reply, is_permanent in refused if is_permanent]
    reply = (
        _partial_reply(permanent[0], reached, len(owed))
        if permanent
        else clip(f"refused for good by an earlier attempt: {', '.join(failed)}", MAX_REASON)
    )
    return Dead(Outcome.FAILED, reply, Recipients(tuple(lost)))


def _partial_reply(reply: str, reached: int, owed: int) -> str:
    """An attempt's reply when it reached some: the deciding refusal, and how many got it."""
    return clip(f"{reply} (delivered to {reached} of {owed} recipients)", MAX_REASON)


def retry_after(error: BaseException) -> float | None:
    """The wait the provider asked for (C{DeliveryError.retry_after}), if a sane one."""
    value = getattr(error, "retry_after", None)
    if isinstance(value, int | float) and 0 <= value < float("inf"):
        return float(value)
    return None


def request_id(error: BaseException | None) -> str | None:
    """The provider's id for the failed request (Graph's C{request-id}), if it gave one."""
    value = getattr(error, "request_id", None)
    return clip(value, 100) if isinstance(value, str) and value else None
