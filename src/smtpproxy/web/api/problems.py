"""The API's errors: one exception type, one JSON shape, one table of codes.

Every refusal is an L{ApiError} carrying the HTTP status, a stable
machine-readable C{code}, a message for people and, where one field of the
request is to blame, its name.  The body is always
C{{"error": {"code", "message", "field"}, "request_id"}}.  Messages are
written here or by the validators from fixed text and field names: a
client's value (let alone a secret or a body) is never echoed back.
"""

from __future__ import annotations

import json

__all__ = ["ApiError", "error_body", "json_bytes"]


class ApiError(Exception):
    """A request refused with C{status}.

    @ivar code: short and stable (C{"invalid_field"}, C{"rate_limited"}...),
        for programs; documented in docs/http-api.md.
    @ivar field: the request field to blame (C{"to[2]"},
        C{"attachments[0].filename"}), or None.
    @ivar retry_after: seconds for the C{Retry-After} header (429, 503).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after


#: One encoder for every answer: C{json.dumps} with these options makes a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def json_bytes(document: object) -> bytes:
    """Compact ASCII JSON: no client text can reach the wire as raw bytes."""
    return _ENCODER.encode(document).encode("ascii")


def error_body(error: ApiError, request_id: str) -> bytes:
    """The JSON body of an error response."""
    return json_bytes(
        {
            "error": {"code": error.code, "message": error.message, "field": error.field},
            "request_id": request_id,
        }
    )
