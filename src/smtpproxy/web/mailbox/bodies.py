"""The JSON bodies of the API's requests that change messages, read strictly.

Mailpit decodes these bodies with Go's C{encoding/json} into a struct: a key
names a field case-insensitively (C{"ids"} fills C{IDs}), unknown keys are
ignored, and Mailpit's C{DELETE /api/v1/messages} deletes everything when
the body cannot be decoded at all.  Clients written against Mailpit rely on
the first rule, so it is kept.  The others turn a client's mistake (a bare
list of ids, a misspelt key, C{{"IDs": null}} from an unset variable) into
an empty mailbox, and the mailbox may be the only copy of what it caught:
here every shape but the documented ones is refused with the reason
(docs/mailbox.md), and nothing is changed.

Pure: bytes in, a value or L{BodyError} out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

#: Message ids one request may name; past it the request is refused (413):
#: each id is a row to write, and a page of the list holds at most this many.
MAX_IDS = 1000


class BodyError(ValueError):
    """A body that is refused, with the HTTP status and the reason for the caller."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class ReadChange:
    """C{PUT /api/v1/messages}: set C{read} on C{ids}, or on what C{search} finds, or on all."""

    read: bool
    ids: tuple[str, ...] = ()
    search: str = ""


def delete_request(data: bytes) -> tuple[str, ...] | None:
    """The ids a C{DELETE /api/v1/messages} body names; None means every message.

    Every message: no body (what C{mailpit-api}'s C{deleteMessages()} sends)
    or C{{"IDs": []}} (Mailpit's documented "no IDs").  Anything else must be
    C{{"IDs": ["id", ...]}}.

    @raise BodyError: any other body.
    """
    if not data.strip():
        return None
    fields = _object(data, ("IDs",), 'expected {"IDs": ["id", ...]}, or no body to delete all')
    if "IDs" not in fields:
        raise BodyError('name the messages in "IDs", or send no body to delete all')
    ids = _ids(fields["IDs"])
    return ids or None


def read_request(data: bytes) -> ReadChange:
    """What a C{PUT /api/v1/messages} body asks (Mailpit's C{Read}, C{IDs}, C{Search}).

    @raise BodyError: no body, another shape, both C{IDs} and C{Search}, too many ids.
    """
    usage = 'expected {"Read": true|false, "IDs": [...]} or {"Read": ..., "Search": "..."}'
    if not data.strip():
        raise BodyError(usage)
    fields = _object(data, ("Read", "IDs", "Search"), usage)
    read = fields.get("Read", False)
    if not isinstance(read, bool):
        raise BodyError('"Read" must be true or false')
    ids = _ids(fields.get("IDs", []))
    search = fields.get("Search", "")
    if not isinstance(search, str):
        raise BodyError('"Search" must be a search query (a string)')
    if ids and search:
        raise BodyError("You may specify either IDs or a search query, not both")
    return ReadChange(read, ids, search)


def _object(data: bytes, names: tuple[str, ...], usage: str) -> dict[str, object]:
    """The body's one JSON object, its keys matched to C{names} as Go matches them.

    A key may differ from its field's name in case only; a field named twice
    (C{"IDs"} and C{"ids"}: Go keeps the last) and a key naming no field are
    refused, since either may hide what the client meant.
    """
    try:
        # The pairs as sent: a plain dict would keep only the last of duplicate keys.
        value = json.loads(data, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise BodyError(f"the body is not valid JSON; {usage}") from None
    if not isinstance(value, _Pairs):
        raise BodyError(f"the body is a JSON {_kind(value)}; {usage}")
    folded = {name.casefold(): name for name in names}
    fields: dict[str, object] = {}
    for key, item in value.pairs:
        name = folded.get(key.casefold())
        if name is None:
            raise BodyError(f"unknown field {json.dumps(key[:40])}; {usage}")
        if name in fields:
            raise BodyError(f'"{name}" is given more than once')
        fields[name] = item
    return fields


def _ids(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise BodyError('"IDs" must be a list of message IDs (strings)')
    if len(value) > MAX_IDS:
        raise BodyError(f"at most {MAX_IDS} IDs per request; send them in batches", 413)
    return tuple(value)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, _Pairs):
        return "object"
    return "number"


class _Pairs:
    """A decoded JSON object as its key-value pairs in order (nested ones too).

    Not a dict nor a list, so an object where a list of ids belongs is no list.
    """

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs


__all__ = ["MAX_IDS", "BodyError", "ReadChange", "delete_request", "read_request"]
