"""Chaos: refuse a chosen share of transactions with a chosen reply, at a chosen stage.

An application's retry handling is hard to test against a relay that always
says 250.  With chaos on, the mailbox answers some transactions with the
reply the developer picked: at C{MAIL FROM} (sender), at C{RCPT TO}
(recipient) or after the message (data).  Mailpit offers the same through
C{/api/v1/chaos}; the JSON shape here is its shape (C{ErrorCode},
C{Probability} per stage), plus a C{Data} stage Mailpit does not have.

Pure: the random source is passed in, so tests choose every draw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from smtpproxy.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError

#: The stages, by their name in C{MAILBOX_CHAOS} and their key in the JSON.
STAGES = {"sender": "Sender", "recipient": "Recipient", "data": "Data"}
#: Mailpit's trigger that this relay cannot apply (AUTH is answered by the
#: SMTP shell, before any provider is asked); shown, always at 0 %.
UNSUPPORTED = "Authentication"
#: The reply codes a refusal may use: those the relay's one mapping from
#: failures to replies (L{smtpproxy.errors.reply_for_failure}) keeps as given.
CODES = (450, 451, 452, 550, 552, 553, 554)
_STATUS = {
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    550: "5.7.1",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.6.0",
}


@dataclass(frozen=True, slots=True)
class Trigger:
    """One stage's rule: answer C{code} to C{probability} percent of attempts."""

    code: int = 451
    probability: int = 0


@dataclass(frozen=True, slots=True)
class Triggers:
    """The rule of each stage; all at 0 % is chaos off."""

    sender: Trigger = field(default_factory=Trigger)
    recipient: Trigger = field(default_factory=Trigger)
    data: Trigger = field(default_factory=Trigger)

    def stage(self, name: str) -> Trigger:
        trigger: Trigger = getattr(self, name)
        return trigger

    @property
    def enabled(self) -> bool:
        return any(self.stage(name).probability for name in STAGES)

    def __str__(self) -> str:
        """As C{MAILBOX_CHAOS} would be written: C{off}, or the stages that refuse."""
        parts = [
            f"{name}={t.code}:{t.probability}"
            for name in STAGES
            for t in [self.stage(name)]
            if t.probability
        ]
        return " ".join(parts) or "off"


def _trigger(code: int, probability: int, where: str) -> Trigger:
    if code not in CODES:
        raise ValueError(f"{where}: reply code must be one of {', '.join(map(str, CODES))}")
    if not 0 <= probability <= 100:
        raise ValueError(f"{where}: probability must be 0 to 100 (percent)")
    return Trigger(code, probability)


def parse_triggers(raw: str) -> Triggers:
    """C{"recipient=451:20, data=554:5"}: stage, reply code and percentage; empty or C{off} is off.

    @raise ValueError: naming the part that is wrong.
    """
    triggers = Triggers()
    if raw.strip().lower() == "off":
        return triggers
    for part in raw.replace(",", " ").split():
        stage, sep, rule = part.partition("=")
        code, sep2, percent = rule.partition(":")
        stage = stage.strip().lower()
        if not sep or not sep2 or stage not in STAGES:
            raise ValueError(
                f"{part[:40]!r}: expected stage=code:percent with stage one of "
                f"{', '.join(STAGES)} (e.g. recipient=451:20)"
            )
        if not _ascii_number(code, 3) or not _ascii_number(percent, 3):
            raise ValueError(f"{part[:40]!r}: code and percent must be whole numbers")
        triggers = replace(triggers, **{stage: _trigger(int(code), int(percent), stage)})
    return triggers


def _ascii_number(text: str, digits: int) -> bool:
    """ASCII digits only, at most C{digits} of them.

    C{str.isdigit} alone accepts C{"²"} and other digits that C{int} refuses.
    """
    return text.isascii() and text.isdigit() and len(text) <= digits


def to_json(triggers: Triggers) -> dict[str, dict[str, int]]:
    """Mailpit's C{ChaosTriggers} shape (with C{Data} added)."""
    shown = {}
    for name, key in STAGES.items():
        trigger = triggers.stage(name)
        shown[key] = {"ErrorCode": trigger.code, "Probability": trigger.probability}
    shown[UNSUPPORTED] = {"ErrorCode": 451, "Probability": 0}
    return dict(sorted(shown.items()))


def from_json(body: object) -> Triggers:
    """Triggers from a C{PUT /api/v1/chaos} body; an omitted stage is reset to 0 %, as Mailpit does.

    @raise ValueError: what is wrong, for a 400 reply.
    """
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise ValueError("expected a JSON object of triggers")
    known = {*STAGES.values(), UNSUPPORTED}
    unknown = [str(key)[:40] for key in body if key not in known]
    if unknown:
        raise ValueError(f"unknown trigger {unknown[0]!r}")
    found: dict[str, Trigger] = {}
    for name, key in [*STAGES.items(), ("authentication", UNSUPPORTED)]:
        given = body.get(key)
        if given is None:
            continue
        if not isinstance(given, Mapping):
            raise ValueError(f"{key}: expected an object with ErrorCode and Probability")
        code, probability = given.get("ErrorCode", 451), given.get("Probability", 0)
        if not _whole(code) or not _whole(probability):
            raise ValueError(f"{key}: ErrorCode and Probability must be whole numbers")
        assert isinstance(code, int) and isinstance(probability, int)
        if key == UNSUPPORTED:
            if probability:
                raise ValueError(
                    "Authentication: not supported by smtpproxy's mailbox "
                    "(AUTH is decided before the provider is asked)"
                )
            continue
        found[name] = _trigger(code, probability, key)
    return Triggers(**found)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def refusal(trigger: Trigger, draw: Callable[[], float], stage: str) -> DeliveryError | None:
    """The error for this attempt, or None to let it through.

    @param draw: a uniform number in [0, 1) (C{random.random}).
    """
    if trigger.probability <= 0 or draw() * 100 >= trigger.probability:
        return None
    reason = f"chaos: {stage} refused on purpose (MAILBOX_CHAOS)"
    status = _STATUS[trigger.code]
    if trigger.code >= 500:
        return PermanentDeliveryError(reason, status, trigger.code)
    return TransientDeliveryError(reason, status, trigger.code)
