"""The mailbox's messages in memory: bounded, newest first, searchable.

Pure: no reactor, no I/O.  The clock and the id source are passed in.  The
store keeps each message's L{Email} (raw bytes exactly as received, and the
relay's own parse of them) with what the page and the API need beside it:
an id, the time it arrived, the attachments numbered as parts, and the
lower-cased text that search looks in.

Two limits, each evicting the oldest message first: a number of messages
and a number of bytes.  A message's bytes are its raw size plus its decoded
parts and bodies (L{held_bytes}), which is what it really occupies here.
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from smtpproxy.addresses import Mailbox
from smtpproxy.mime.message import Attachment, Email
from smtpproxy.providers.mailbox.search import Haystack, Term, matches, parse_query

#: Characters of each body that search looks at; the rest of a huge body is not searched.
SEARCH_BODY_CHARS = 100_000
#: Characters in a list entry's snippet (Mailpit's length).
SNIPPET_CHARS = 250


class TooLargeError(Exception):
    """The message alone is larger than the whole mailbox may hold."""


@dataclass(frozen=True, slots=True)
class Part:
    """An attachment or inline part with the id the API names it by."""

    part_id: str
    attachment: Attachment


@dataclass(slots=True)
class Stored:
    """One message in the mailbox.

    @ivar created: seconds since the epoch when it arrived.
    @ivar read: opened in the page or through the API (Mailpit's C{Read}).
    """

    id: str
    created: float
    email: Email
    parts: tuple[Part, ...]
    haystack: Haystack
    snippet: str
    size: int
    read: bool = False

    def part(self, part_id: str) -> Part | None:
        for part in self.parts:
            if part.part_id == part_id:
                return part
        return None


def held_bytes(email: Email) -> int:
    """What C{email} costs the mailbox: its raw bytes, decoded parts and bodies."""
    decoded = sum(a.size for a in email.attachments)
    bodies = len(email.text or "") + len(email.html or "")
    return email.size + decoded + bodies


def _addresses(mailboxes: Iterable[Mailbox]) -> str:
    return " ".join(f"{m.name} <{m.address}>" for m in mailboxes).lower()


def snippet(email: Email) -> str:
    """The first words of the text body (or of the HTML's text), on one line."""
    body = email.text
    if body is None and email.html is not None:
        from smtpproxy.providers.stdout import html_to_text

        body = html_to_text(email.html[: SNIPPET_CHARS * 40])
    return " ".join((body or "")[: SNIPPET_CHARS * 4].split())[:SNIPPET_CHARS]


def new_id() -> str:
    """A random id, URL-safe, of Mailpit's length (22 characters)."""
    return secrets.token_urlsafe(16)


def prepare(email: Email, created: float, message_id: str, size: int | None = None) -> Stored:
    """Wrap C{email} for the store: number its parts and lower-case its searchable text."""
    parts = tuple(Part(str(n), a) for n, a in enumerate(email.attachments, start=1))
    body = (email.text or "")[:SEARCH_BODY_CHARS]
    if not body and email.html:
        body = email.html[:SEARCH_BODY_CHARS]
    haystack = Haystack(
        from_=_addresses(email.from_) + " " + email.envelope_from.lower(),
        to=_addresses(email.to) + " " + " ".join(email.envelope_to).lower(),
        cc=_addresses(email.cc),
        bcc=_addresses(email.bcc),
        subject=email.subject.lower(),
        message_id=(email.message_id or "").lower(),
        body=body.lower(),
        attachments=sum(1 for a in email.attachments if not a.inline),
    )
    return Stored(
        id=message_id,
        created=created,
        email=email,
        parts=parts,
        haystack=haystack,
        snippet=snippet(email),
        size=held_bytes(email) if size is None else size,
    )


@dataclass
class Counters:
    """Since start: what Mailpit's C{/api/v1/info} calls runtime statistics."""

    accepted: int = 0
    accepted_bytes: int = 0
    rejected: int = 0
    deleted: int = 0


@dataclass
class Store:
    """Messages by id in arrival order, within C{max_messages} and C{max_bytes}."""

    max_messages: int
    max_bytes: int
    clock: Callable[[], float]
    make_id: Callable[[], str] = new_id
    counters: Counters = field(default_factory=Counters)
    _messages: OrderedDict[str, Stored] = field(default_factory=OrderedDict)
    _bytes: int = 0
    _listeners: list[Callable[[Stored], object]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def add(self, email: Email) -> tuple[Stored, list[Stored]]:
        """Keep C{email}; return it as stored and the messages evicted to make room.

        @raise TooLargeError: it could not fit even in an empty mailbox.
        """
        stored = prepare(email, self.clock(), self.make_id())
        return stored, self.put(stored)

    def put(self, stored: Stored) -> list[Stored]:
        """Keep an already prepared message (the newest); return what was evicted."""
        if stored.size > self.max_bytes:
            self.counters.rejected += 1
            raise TooLargeError(
                f"message needs {stored.size} bytes, the mailbox holds {self.max_bytes}"
            )
        evicted: list[Stored] = []
        while self._messages and (
            len(self._messages) >= self.max_messages or self._bytes + stored.size > self.max_bytes
        ):
            _, oldest = self._messages.popitem(last=False)
            self._bytes -= oldest.size
            evicted.append(oldest)
        self._messages[stored.id] = stored
        self._bytes += stored.size
        self.counters.accepted += 1
        self.counters.accepted_bytes += stored.email.size
        for listener in list(self._listeners):
            listener(stored)
        return evicted

    def get(self, message_id: str) -> Stored | None:
        """The message with this id, or the newest for C{"latest"} (Mailpit's alias)."""
        if message_id == "latest":
            return next(reversed(self._messages.values()), None)
        return self._messages.get(message_id)

    def newest_first(self) -> Iterator[Stored]:
        return reversed(self._messages.values())

    def page(self, start: int, limit: int) -> list[Stored]:
        """Messages C{start} to C{start + limit}, newest first."""
        return list(itertools.islice(self.newest_first(), start, start + limit))

    def search(self, query: str) -> list[Stored]:
        """Every message matching C{query}, newest first (see L{parse_query})."""
        return self.matching(parse_query(query))

    def matching(self, terms: tuple[Term, ...]) -> list[Stored]:
        """Every message satisfying all of C{terms} (parsed and checked by the caller)."""
        return [m for m in self.newest_first() if matches(terms, m.haystack, m.read)]

    def delete(self, ids: Iterable[str]) -> list[str]:
        """Forget the messages with these ids; return the ids that were there."""
        gone = []
        for message_id in ids:
            stored = self._messages.pop(message_id, None)
            if stored is not None:
                self._bytes -= stored.size
                gone.append(message_id)
        self.counters.deleted += len(gone)
        return gone

    def clear(self) -> list[str]:
        """Forget every message; return their ids."""
        return self.delete(list(self._messages))

    def subscribe(self, listener: Callable[[Stored], object]) -> Callable[[], None]:
        """Call C{listener} with each new message; returns the function that stops it."""
        self._listeners.append(listener)

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop
