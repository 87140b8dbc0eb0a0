"""The C{email} policy the API builds messages with: the package's work, once per value.

Building a message through the header registry costs most of an API
request: every header assigned is parsed into a token tree the moment it
is set, and folded from that tree again when the message is written.  For
the headers of nearly every message (a short ASCII value: an address, a
plain subject, the date, the message id, the MIME headers) that round
trip ends where it began, with the value written unchanged.

The policy here (L{POLICY}, C{email.policy.SMTP}'s settings: CRLF, 78
columns, 8-bit bodies) keeps such a value as it was set, the way the
package keeps a header it read from a source.  A value that fits on one
line is written as is; a longer one is folded by L{names.fold}, only in
front of the blanks it holds, never parsed again nor encoded (the
registry's folder, which the package's own rule, C{refold_source="long"},
would use, drops the quotes of a display name it splits and rewrites long
message ids and URLs as RFC 2047 words).  C{Content-Type} and
C{Content-Disposition} are still folded by the registry, whose parameter
writer splits a long file name into RFC 2231 sections.  The builder
(L{compose}, L{names}) encodes every value that needs it before setting
it; a value that is not ASCII all the same is made a registry header when
it is set, as before.  A value with a line break is refused when set, as
the stock policy refuses it.

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

from smtpproxy.web.api.names import fold

__all__ = ["KEPT", "POLICY"]

#: The most entries any one of the tables below keeps.
KEPT = 256

#: Headers the message methods read back while building, whose values repeat.
_MIME_NAMES = frozenset({"mime-version", "content-type", "content-transfer-encoding"})
#: Headers with MIME parameters, which the registry folds (RFC 2231 sections).
_PARAMETER_NAMES = frozenset({"content-type", "content-disposition"})


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

    def fold(self, name: str, value: Any) -> str:
        folded = self._folded(name, value)
        return super().fold(name, value) if folded is None else folded

    def fold_binary(self, name: str, value: Any) -> bytes:
        folded = self._folded(name, value)
        return super().fold_binary(name, value) if folded is None else folded.encode("ascii")

    def _folded(self, name: str, value: Any) -> str | None:
        """An ASCII value kept as set, folded at its blanks; None to leave it to the package."""
        if type(value) is not str or not value.isascii() or "\n" in value or "\r" in value:
            return None
        if not self.max_line_length:  # no folding asked for: the package's way
            return None
        if len(name) + 2 + len(value) <= self.max_line_length:
            return f"{name}: {value}{self.linesep}"
        if name.lower() in _PARAMETER_NAMES:
            return None
        return fold(name, value, self.max_line_length, self.linesep)


#: The policy of every message the API builds and of its serialisation.
POLICY = _Policy(linesep="\r\n", header_factory=_HeaderClasses())
