"""C{QUEUE_URL} read into the backend it names: pure, no I/O.

The forms, chosen so an operator can write what they mean without knowing
SQLAlchemy's four-slash rule:

  - empty: no queue, deliver directly (C{("", "")});
  - C{sqlite:relative/path.db}: a path relative to the working directory;
  - C{sqlite:///abs/path.db} (or C{sqlite:/abs/path.db}): an absolute path;
  - C{postgresql://...} or C{postgres://...}: handed to the driver as given,
    because libpq reads its own URI syntax (passwords, options) better than
    we would.

C{sqlite://host/...} is refused: SQLite has no host, and guessing whether
the operator meant a relative or an absolute path would put the queue
somewhere they did not expect.  Paths are taken literally (no percent
decoding), so a file name never changes meaning on its way through.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["QueueKind", "parse_queue_url"]

QueueKind = Literal["", "sqlite", "postgresql"]


def parse_queue_url(url: str) -> tuple[QueueKind, str]:
    """The backend C{url} names and what it needs: a file path or the DSN unchanged.

    @raise ValueError: not a form above; the message says which forms are.
    """
    text = url.strip()
    if not text:
        return "", ""
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if colon and scheme in ("postgresql", "postgres") and rest.startswith("//"):
        return "postgresql", text
    if colon and scheme == "sqlite":
        return "sqlite", _sqlite_path(rest)
    raise ValueError(
        "expected sqlite:relative/path.db, sqlite:///absolute/path.db or "
        f"postgresql://user@host/db, got {text[:40]!r}"
    )


def _sqlite_path(rest: str) -> str:
    if "\x00" in rest:
        raise ValueError("a sqlite: path cannot contain a NUL character")
    if rest.startswith("///"):
        path = "/" + rest[3:].lstrip("/")
    elif rest.startswith("//"):
        raise ValueError(
            "sqlite://host/... has a host part; write sqlite:///absolute/path.db "
            "or sqlite:relative/path.db"
        )
    else:
        path = rest
    if not path.strip("/") or path.endswith("/"):
        raise ValueError(f"sqlite: needs a file name, got {rest[:40]!r}")
    return path
