"""The C{email} policy the API builds messages with, made cheaper where results repeat.

Building a message with the standard library costs most of an API
request (see docs/http-api.md): every header assigned is parsed into a
token tree, and every header written is folded from that tree again.
Two of those costs repeat identically from message to message:

 - C{HeaderRegistry} makes a new header class (C{type(...)}) each time
   it is asked for one; the classes depend on the name alone.
 - The MIME headers the content manager writes itself (C{MIME-Version},
   C{Content-Type}, C{Content-Transfer-Encoding}) take a handful of
   values (C{1.0}, C{text/plain; charset="utf-8"}, C{7bit}, ...); each is
   parsed, then folded, to the same result every time.

Both are pure functions of their inputs, so their results are kept:
header classes by name, parsed MIME headers by (name, value), and the
folded bytes of those MIME headers by (name, value, line settings).  The
package still makes and writes every header; nothing is assembled from
strings here.  Every table is bounded (L{KEPT} entries, then results are
simply no longer kept), so values a client chooses (an attachment's
content type) cannot grow them.  Header objects are never changed after
they are made (folding reads the token tree, it does not alter it), so
one object can safely stand in several messages.
"""

from __future__ import annotations

from email.headerregistry import BaseHeader, HeaderRegistry
from email.policy import EmailPolicy
from typing import Any

__all__ = ["KEPT", "POLICY"]

#: The most entries any one of the tables below keeps.
KEPT = 256

#: Headers the content manager writes, whose values repeat across messages.
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


_folded: dict[tuple[str, str, int | None, bool, str], bytes] = {}


class _Policy(EmailPolicy):
    """C{SMTP} (CRLF, 78 columns) whose MIME headers are folded once per value."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        if not isinstance(value, BaseHeader) or name.lower() not in _MIME_NAMES:
            return super().fold_binary(name, value)
        key = (name, str(value), self.max_line_length, self.utf8, self.linesep)
        folded = _folded.get(key)
        if folded is None:
            folded = super().fold_binary(name, value)
            if len(_folded) < KEPT:
                _folded[key] = folded
        return folded


#: The policy of every message the API builds and of its serialisation.
POLICY = _Policy(linesep="\r\n", header_factory=_HeaderClasses())
