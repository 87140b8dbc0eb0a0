"""The OpenAPI 3.1 document for C{/v1}, served at C{GET /v1/openapi.json}.

Written as data, next to the code it describes; tests check it with an
OpenAPI validator, check that every path the resource tree serves is in
it, and reach every status it lists for each operation.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

__all__ = ["document"]

_ADDRESS: dict[str, Any] = {
    "oneOf": [
        {"type": "string", "format": "email", "maxLength": 256},
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["address"],
            "properties": {
                "address": {"type": "string", "format": "email", "maxLength": 256},
                "name": {"type": "string", "maxLength": 256},
            },
        },
    ],
    "description": "A plain mailbox (local@domain.tld), optionally with a display name. "
    "Line breaks and other control characters are refused.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    if retry_after:
        response["headers"]["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    return response


def _accepted(description: str, status: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "id": {"type": "string"},
        "request_id": {"type": "string"},
        "status": {"const": status},
    }
    if status == "delivered":
        properties["not_delivered"] = {
            "description": "Recipients the provider refused while it took the message for "
            "the others (no queue retries them); absent when every recipient has it.",
            "type": "array",
            "items": {
                "type": "object",
                "required": ["recipient", "reply"],
                "properties": {"recipient": {"type": "string"}, "reply": {"type": "string"}},
            },
        }
    return {
        "description": description,
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["id", "request_id", "status"],
                    "properties": properties,
                }
            }
        },
    }


def _submission_responses() -> dict[str, Any]:
    return {
        "200": _accepted("Delivered: the provider accepted the message (no queue).", "delivered"),
        "202": _accepted("Queued: the message is durable in the queue.", "queued"),
        "400": _error(
            "Invalid JSON, an unknown field, a bad address, or a line break or control "
            "character in a field that becomes a header; `error.field` names it."
        ),
        "401": _error("The API key is missing, wrong or disabled."),
        "403": _error(
            "The key may not be used from this address, or for this sender or recipient."
        ),
        "405": _error("Only POST is allowed here."),
        "413": _error("The request body or the encoded message is over the size limit."),
        "415": _error("The content type is not one this endpoint reads."),
        "429": _error(
            "A rate limit (per address, per key or global) was reached.", retry_after=True
        ),
        "502": _error("The provider refused the message permanently; do not resend it as is."),
        "503": _error(
            "The provider or the queue is temporarily unavailable; resend after Retry-After.",
            retry_after=True,
        ),
    }


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "smtpproxy submission API",
            "version": "1",
            "description": "Send mail over HTTP through the same pipeline as SMTP.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/messages": {
                "post": {
                    "operationId": "sendMessage",
                    "summary": "Send a message described in JSON",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("Message")}},
                    },
                    "responses": _submission_responses(),
                }
            },
            "/v1/messages/raw": {
                "post": {
                    "operationId": "sendRawMessage",
                    "summary": "Send a complete MIME message, passed on byte for byte",
                    "parameters": [
                        {
                            "name": "from",
                            "in": "query",
                            "description": (
                                "Envelope sender (message/rfc822 bodies only); percent-encoded"
                                " (a '+' as %2B: a bare '+' is a space)."
                            ),
                            "schema": {"type": "string", "format": "idn-email"},
                        },
                        {
                            "name": "to",
                            "in": "query",
                            "description": (
                                "Envelope recipients, repeated (message/rfc822 only);"
                                " percent-encoded (a '+' as %2B: a bare '+' is a space)."
                            ),
                            "schema": {
                                "type": "array",
                                "items": {"type": "string", "format": "idn-email"},
                            },
                            "style": "form",
                            "explode": True,
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "message/rfc822": {
                                "schema": {"type": "string", "contentMediaType": "message/rfc822"}
                            },
                            "application/json": {"schema": _ref("RawMessage")},
                        },
                    },
                    "responses": _submission_responses(),
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The OpenAPI document.",
                            "headers": {
                                "X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}
                            },
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "405": _error("Only GET and HEAD are allowed here."),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "headers": {
                "X-Request-Id": {
                    "description": "The id of this request, also in the relay's log lines.",
                    "schema": {"type": "string"},
                },
                "Retry-After": {
                    "description": "Seconds to wait before sending again.",
                    "schema": {"type": "integer", "minimum": 1},
                },
            },
            "schemas": {
                "Address": _ADDRESS,
                "Message": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["from"],
                    "properties": {
                        "from": _ref("Address"),
                        "to": {"type": "array", "items": _ref("Address")},
                        "cc": {"type": "array", "items": _ref("Address")},
                        "bcc": {"type": "array", "items": _ref("Address")},
                        "reply_to": _ref("Address"),
                        "subject": {"type": "string", "maxLength": 998},
                        "text": {"type": "string"},
                        "html": {"type": "string"},
                        "attachments": {
                            "type": "array",
                            "maxItems": 100,
                            "items": _ref("Attachment"),
                        },
                        "headers": {
                            "type": "object",
                            "description": "X-* headers, and In-Reply-To, References, "
                            "List-Unsubscribe, List-Unsubscribe-Post, Auto-Submitted.",
                            "maxProperties": 50,
                            "additionalProperties": {"type": "string", "maxLength": 998},
                        },
                    },
                },
                "Attachment": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["filename", "content"],
                    "properties": {
                        "filename": {"type": "string", "maxLength": 255},
                        "content_type": {"type": "string", "default": "application/octet-stream"},
                        "content": {"type": "string", "contentEncoding": "base64"},
                        "content_id": {"type": "string", "maxLength": 250},
                        "inline": {"type": "boolean", "default": False},
                    },
                },
                "RawMessage": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["from", "to", "data"],
                    "properties": {
                        "from": {"type": "string", "format": "idn-email"},
                        "to": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "idn-email"},
                        },
                        "data": {"type": "string", "contentEncoding": "base64", "minLength": 1},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "request_id"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message", "field"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "field": {"type": ["string", "null"]},
                            },
                        },
                        "request_id": {"type": "string"},
                    },
                },
            },
        },
    }


def document() -> dict[str, Any]:
    """The document (a fresh copy: callers may change theirs)."""
    return copy.deepcopy(_document())
