"""The mailbox on C{HTTP_LISTEN}: the page, its files, the JSON API and the live events.

One leaf resource routes by path, as the health endpoint does, so no
Twisted resource with HTML error pages is ever reached:

  - C{/}: the page (a static shell; C{/static/mailbox.js} draws it from the API);
  - C{/api/v1/...}: Mailpit's API, the part listed in docs/mailbox.md;
  - C{/view/<id>.html} and C{.txt}: a message's bodies alone (Mailpit's paths),
    the HTML one sandboxed (L{smtpproxy.web.mailbox.view});
  - C{/events}: server-sent events (L{smtpproxy.web.mailbox.events}).

Every reply carries a Content-Security-Policy and C{X-Content-Type-Options};
every request is checked against L{Access} first.
"""

from __future__ import annotations

import json
import resource
from importlib import resources as package_files
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from smtpproxy import __version__
from smtpproxy.errors import reply_for_failure
from smtpproxy.providers.mailbox import chaos, search
from smtpproxy.providers.mailbox.provider import MailboxProvider, ReleaseError
from smtpproxy.providers.mailbox.search import Term
from smtpproxy.providers.mailbox.store import Stored
from smtpproxy.web.mailbox import bodies, download, shapes, view
from smtpproxy.web.mailbox.access import REALM, Access, same_origin
from smtpproxy.web.mailbox.events import EventHub

log = Logger(namespace="smtpproxy.mailbox")

#: Bytes of a JSON request body read at most.
MAX_BODY = 64 * 1024
#: Messages one list or search page may hold.
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50

_STATIC = {
    b"mailbox.js": "text/javascript; charset=utf-8",
    b"mailbox.css": "text/css; charset=utf-8",
}


class HTTPReply(Exception):  # noqa: N818 - an answer, not an error
    """Stop handling a request and answer this (status, JSON or text)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _static(name: str) -> bytes:
    return (package_files.files("smtpproxy.web.mailbox") / "static" / name).read_bytes()


class MailboxResource(Resource):
    """Everything the mailbox serves, behind its access rules."""

    isLeaf = True

    def __init__(self, provider: MailboxProvider, reactor: IReactorTime) -> None:
        super().__init__()
        self.provider = provider
        self.reactor = reactor
        settings = provider.settings
        self.access = Access(settings.allowed_networks, settings.username, settings.password)
        self.events = EventHub(provider.store, reactor, settings.max_event_clients)
        # Read once: the files ship in the package and do not change under us.
        self._files = {name: _static(name.decode()) for name in _STATIC}
        self._index = _static("index.html")

    # -- dispatch --------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-security-policy", [view.PAGE_POLICY])
        headers.setRawHeaders(b"x-content-type-options", [b"nosniff"])
        headers.setRawHeaders(b"referrer-policy", [b"no-referrer"])
        # Chromium resolves the host names of links in a page ahead of a click:
        # a DNS query the sender's name server sees when a message is shown.
        headers.setRawHeaders(b"x-dns-prefetch-control", [b"off"])
        headers.setRawHeaders(b"cache-control", [b"no-store"])
        client = request.getClientAddress()
        if not self.access.network_allowed(getattr(client, "host", None)):
            return _text(request, 403, "forbidden")
        if not self.access.authorised(request.getHeader(b"authorization")):
            headers.setRawHeaders(b"www-authenticate", [REALM])
            return _text(request, 401, "unauthorised")
        if request.method not in (b"GET", b"HEAD") and not same_origin(
            request.getHeader(b"origin"), request.getHeader(b"host")
        ):
            return _text(request, 403, "cross-site request refused")
        if not self.provider.is_loaded:
            # Right after start, the file is still being read: answer once it is,
            # rather than show an empty mailbox that fills a moment later.
            self.provider.loaded().addCallback(lambda _: self._answer_later(request))
            return NOT_DONE_YET
        return self._answer(request)

    def _answer(self, request: Request) -> bytes | int:
        path = [segment.decode("utf-8", "replace") for segment in request.postpath or []]
        try:
            return self._route(request, path)
        except HTTPReply as reply:
            return _text(request, reply.code, reply.message)

    def _answer_later(self, request: Request) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        body = self._answer(request)
        if body is not NOT_DONE_YET and isinstance(body, bytes):
            request.write(body)
            request.finish()

    def _route(self, request: Request, path: list[str]) -> bytes | int:
        method = request.method
        if path in ([""], []):
            _allow(request, b"GET", b"HEAD")
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return _body(request, self._index)
        if len(path) == 2 and path[0] == "static" and path[1].encode() in self._files:
            _allow(request, b"GET", b"HEAD")
            request.setHeader(b"content-type", _STATIC[path[1].encode()].encode())
            return _body(request, self._files[path[1].encode()])
        if path == ["events"]:
            _allow(request, b"GET")
            if not self.events.open(request):
                raise HTTPReply(503, "too many live pages open; reload later")
            return NOT_DONE_YET
        if len(path) == 2 and path[0] == "view":
            _allow(request, b"GET", b"HEAD")
            return self._view(request, path[1])
        if path[:2] == ["api", "v1"] and len(path) > 2:
            return self._api(request, method, path[2:])
        raise HTTPReply(404, "not found")

    # -- API -------------------------------------------------------------------

    def _api(self, request: Request, method: bytes, path: list[str]) -> bytes | int:
        store = self.provider.store
        if path == ["messages"]:
            _allow(request, b"GET", b"HEAD", b"DELETE", b"PUT")
            if method == b"DELETE":
                return self._delete(request)
            if method == b"PUT":
                return self._set_read(request)
            found = list(store.newest_first())
            return self._page(request, found)
        if path == ["search"]:
            _allow(request, b"GET", b"HEAD", b"DELETE")
            deleting = method == b"DELETE"
            found = store.matching(_checked_query(_arg(request, b"query"), deleting))
            if deleting:
                return self._ok_once(request, self.provider.delete([m.id for m in found]))
            return self._page(request, found)
        if path == ["info"]:
            _allow(request, b"GET", b"HEAD")
            return _json(request, self._info())
        if path == ["webui"]:
            _allow(request, b"GET", b"HEAD")
            return _json(request, self._webui())
        if path == ["chaos"]:
            _allow(request, b"GET", b"HEAD", b"PUT")
            if method == b"PUT":
                try:
                    triggers = chaos.from_json(_read_json(request))
                except ValueError as e:
                    raise HTTPReply(400, str(e)) from None
                self.provider.set_chaos(triggers)
            return _json(request, chaos.to_json(self.provider.chaos))
        if len(path) >= 2 and path[0] == "message":
            return self._message(request, method, path[1], path[2:])
        raise HTTPReply(404, "not found")

    def _message(self, request: Request, method: bytes, ident: str, rest: list[str]) -> bytes | int:
        stored = self.provider.store.get(ident)
        if stored is None:
            raise HTTPReply(404, "message not found")
        if not rest:
            _allow(request, b"GET", b"HEAD")
            self.provider.mark_read(stored)
            return _json(request, shapes.message(stored))
        if rest == ["headers"]:
            _allow(request, b"GET", b"HEAD")
            return _json(request, shapes.headers(stored))
        if rest == ["raw"]:
            _allow(request, b"GET", b"HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            if _arg(request, b"dl") == "1":
                request.setHeader(
                    b"content-disposition", b'attachment; filename="%s.eml"' % stored.id.encode()
                )
            return _body(request, stored.email.raw)
        if len(rest) == 2 and rest[0] == "part":
            _allow(request, b"GET", b"HEAD")
            return self._part(request, stored, rest[1])
        if rest == ["release"]:
            _allow(request, b"POST")
            return self._release(request, stored)
        raise HTTPReply(404, "not found")

    def _page(self, request: Request, found: list[Stored]) -> bytes:
        start = _number(request, b"start", 0, len(found))
        limit = _number(request, b"limit", DEFAULT_LIMIT, MAX_LIMIT) or DEFAULT_LIMIT
        store = self.provider.store
        unread = sum(1 for m in store.newest_first() if not m.read)
        return _json(request, shapes.messages_page(found, start, limit, len(store), unread))

    def _part(self, request: Request, stored: Stored, part_id: str) -> bytes:
        part = stored.part(part_id)
        if part is None:
            raise HTTPReply(404, "part not found")
        # Served as a download under its own type: never rendered in our origin.
        content_type = download.media_type(part.attachment.content_type)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        default = f"part-{part_id}"
        disposition = download.content_disposition(part.attachment.filename or default, default)
        request.setHeader(b"content-disposition", disposition)
        request.setHeader(b"content-security-policy", b"default-src 'none'; sandbox")
        return _body(request, part.attachment.data)

    def _delete(self, request: Request) -> int:
        try:
            ids = bodies.delete_request(_read_body(request))
        except bodies.BodyError as e:
            raise HTTPReply(e.status, e.message) from None
        if ids is None:
            return self._ok_once(request, self.provider.clear())
        return self._ok_once(request, self.provider.delete(ids))

    def _set_read(self, request: Request) -> int:
        try:
            change = bodies.read_request(_read_body(request))
        except bodies.BodyError as e:
            raise HTTPReply(e.status, e.message) from None
        store = self.provider.store
        if change.search:
            targets = store.matching(_checked_query(change.search, deleting=False))
        elif change.ids:
            targets = [m for m in (store.get(i) for i in change.ids) if m is not None]
        else:
            targets = list(store.newest_first())
        return self._ok_once(request, self.provider.set_read(targets, change.read))

    def _ok_once(self, request: Request, done: Deferred[None]) -> int:
        """Answer C{ok} once C{done} (a change to the file, if any) fires; 500 if it fails.

        Waiting also paces a client: its next change is not read before this
        one is written.
        """

        def answer(_: object) -> None:
            _finish(request, 200, b"ok", b"text/plain; charset=utf-8")

        def failed(failure: Failure) -> None:
            _finish(request, 500, b"mailbox file not updated", b"text/plain; charset=utf-8")

        done.addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _release(self, request: Request, stored: Stored) -> int:
        body = _read_json(request)
        to = body.get("To") if isinstance(body, dict) else None
        if not isinstance(to, list) or not all(isinstance(a, str) for a in to):
            raise HTTPReply(400, 'expected {"To": ["address", ...]}')
        try:
            sending = self.provider.release(stored, to)
        except ReleaseError as e:
            raise HTTPReply(400, str(e)) from None

        def answer(_: object) -> None:
            _finish(request, 200, b"ok", b"text/plain; charset=utf-8")

        def failed(failure: Failure) -> None:
            assert failure.value is not None
            reply = reply_for_failure(failure.value)
            text = f"release failed: {reply.code} {reply.status} {reply.text}"
            _finish(request, 502, text.encode("utf-8", "replace"), b"text/plain; charset=utf-8")

        sending.addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _info(self) -> dict[str, object]:
        p = self.provider
        counters = p.store.counters
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "Version": f"smtpproxy {__version__}",
            "LatestVersion": "",
            "Database": p.settings.path,
            "DatabaseSize": p.file.size() if p.file is not None else 0,
            "Messages": len(p.store),
            "Unread": sum(1 for m in p.store.newest_first() if not m.read),
            "Tags": {},
            "RuntimeStats": {
                # Peak resident memory (Linux reports KiB): the closest the
                # standard library gets to Go's runtime figure.
                "Memory": usage.ru_maxrss * 1024,
                "MessagesDeleted": counters.deleted,
                "SMTPAccepted": counters.accepted,
                "SMTPAcceptedSize": counters.accepted_bytes,
                "SMTPRejected": counters.rejected,
                "SMTPIgnored": 0,
                "Uptime": int(self.reactor.seconds() - p.started),
            },
        }

    def _webui(self) -> dict[str, object]:
        release = self.provider.release_to
        return {
            "Label": "smtpproxy mailbox",
            "MessageRelay": {
                "Enabled": release is not None,
                "SMTPServer": release.name if release is not None else "",
                "ReturnPath": "",
                "AllowedRecipients": "",
                "BlockedRecipients": "",
                "OverrideFrom": "",
                "PreserveMessageIDs": True,
                "RecipientAllowlist": "",
            },
            "SpamAssassin": False,
            "ChaosEnabled": True,
            "DuplicatesIgnored": False,
            "HideDeleteAllButton": False,
        }

    # -- bodies alone ----------------------------------------------------------

    def _view(self, request: Request, name: str) -> bytes:
        ident, _, kind = name.rpartition(".")
        stored = self.provider.store.get(ident)
        if stored is None or kind not in ("html", "txt"):
            raise HTTPReply(404, "not found")
        if kind == "txt":
            if stored.email.text is None:
                raise HTTPReply(404, "no text body")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return _body(request, stored.email.text.encode("utf-8", "replace"))
        document = view.html_document(stored)
        if document is None:
            raise HTTPReply(404, "no HTML body")
        remote = _arg(request, b"remote") == "1"
        request.setHeader(b"content-security-policy", view.body_policy(remote))
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return _body(request, document.encode("utf-8", "replace"))


# -- small helpers -------------------------------------------------------------


def _checked_query(query: str, deleting: bool) -> tuple[Term, ...]:
    """The terms of a search query, or a 400 saying why it is not run.

    A blank query is Mailpit's own error; a query past the parser's limits, and
    for a delete one that states no condition, are ours (docs/mailbox.md).
    """
    if not query.strip():
        raise HTTPReply(400, "Error: no search query")
    parsed = search.parse(query)
    refusal = parsed.refusal(deleting)
    if refusal is not None:
        raise HTTPReply(400, refusal)
    return parsed.terms


def _allow(request: Request, *methods: bytes) -> None:
    if request.method not in methods:
        request.setHeader(b"allow", b", ".join(methods))
        raise HTTPReply(405, "method not allowed")


def _arg(request: Request, name: bytes) -> str:
    values = (request.args or {}).get(name)
    return values[0].decode("utf-8", "replace") if values else ""


def _number(request: Request, name: bytes, default: int, ceiling: int) -> int:
    text = _arg(request, name).strip()
    if not text:
        return min(default, ceiling) if name == b"start" else default
    # isascii too: isdigit() is true for "²" and other digits int() refuses.
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise HTTPReply(400, f"{name.decode()} must be a whole number")
    return min(int(text), ceiling)


def _read_body(request: Request) -> bytes:
    content = request.content
    data = content.read(MAX_BODY + 1) if content is not None else b""
    if len(data) > MAX_BODY:
        raise HTTPReply(413, "request body too large")
    return data


def _read_json(request: Request) -> Any:
    data = _read_body(request)
    if not data.strip():
        raise HTTPReply(400, "expected a JSON body")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise HTTPReply(400, "the body is not valid JSON") from None


def _body(request: Request, data: bytes) -> bytes:
    request.setHeader(b"content-length", b"%d" % len(data))
    return b"" if request.method == b"HEAD" else data


def _json(request: Request, value: object) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    data = json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return _body(request, data)


def _text(request: Request, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return _body(request, message.encode("utf-8", "replace"))


def _finish(request: Request, code: int, data: bytes, content_type: bytes) -> None:
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(data))
    request.write(data)
    request.finish()


__all__ = ["MailboxResource"]
