"""The C{email} policy the API builds messages with: the package's work, once per value.

Building a message through the header registry costs most of an API
request: every header assigned is parsed into a token tree the moment it
is set, and folded from that tree again when the message is written.  For
the headers of nearly every message (a short ASCII value: an address, a
plain subject, the date, the message id, the MIME headers) that round
trip ends where it began, with the value written unchanged.

The policy here (L{POLICY}, C{email.policy.SMTP}'s settings: CRLF, 78
columns, 8-bit bodies) keeps such a value as it was set, the way the
package keeps a header it read from a source, and writes it through the
package's own rule for those (C{refold_source="long"}): a value that fits
on one line is written as is, a longer one is parsed by the registry and
folded.  A value that is not ASCII (a subject in another script, a display
name with an accent) is made a registry header when it is set, as before,
so it is encoded into RFC 2047 words and folded by the package.  A value
with a line break is refused when set, as the stock policy refuses it.

Two costs that repeat from message to message are kept besides, both pure
functions of their inputs: the header classes the registry makes (by
name), and the parsed C{MIME-Version}, C{Content-Type} and
C{Content-Transfer-Encoding} headers the message methods read back while
building (by name and value).  Both tables are bounded (L{KEPT} entries,
then results are no longer kept), so values a client chooses (an
attachment's content type) cannot grow them; a header object is never
changed after it is made, so one can stand in several messages.
"""

from __future__ import annotations

from email.headerregistry import BaseHeader, HeaderRegistry
from email.policy import EmailPolicy
from typing import Any

__all__ = ["KEPT", "POLICY"]

#: The most entries any one of the tables below keeps.
KEPT = 256

#: Headers the message methods read back while building, whose values repeat.
_MIME_NAMES = frozenset({"mime-version", "content-type", "content-transfer-encoding"})


class _HeaderClasses(HeaderRegistry):
    """The standard registry, keeping the header classes and the MIME headers it makes."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}
        self._mime: dict[tuple[str, str], BaseHeader] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        made = self._classes.get(key)
        if made is None:
            made = super().__getitem__(name)
            if len(self._classes) < KEPT:
                self._classes[key] = made
        return made

    def __call__(self, name: str, value: Any) -> BaseHeader:
        if type(value) is not str or name.lower() not in _MIME_NAMES:
            return super().__call__(name, value)
        key = (name, value)
        made = self._mime.get(key)
        if made is None:
            made = super().__call__(name, value)
            if len(self._mime) < KEPT:
                self._mime[key] = made
        return made


class _Policy(EmailPolicy):
    """C{SMTP}'s settings; an ASCII value is kept as set and folded only when written."""

    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        if type(value) is str and value.isascii():
            if len(value.splitlines()) > 1:
                # What the stock policy refuses too: a line break would end
                # the header and start another.
                raise ValueError("Header values may not contain linefeed or carriage return")
            return (name, value)
        return super().header_store_parse(name, value)


#: The policy of every message the API builds and of its serialisation.
POLICY = _Policy(linesep="\r\n", header_factory=_HeaderClasses())
