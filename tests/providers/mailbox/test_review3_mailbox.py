"""Review 3: the mailbox API's destructive requests, against the real twistd process.

A delete that names some messages, or a search that narrows them, must
never remove the others: the mailbox is the only copy of what it caught.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.trial.unittest import TestCase

from smtpproxy.web.mailbox import view
from tests.providers.mailbox.helpers import raw_message
from tests.providers.mailbox.test_twistd_mailbox import mailbox, request, send
from tests.support import async_test, in_thread

KEEP = raw_message(subject="Keep me", text="Precious.")
DROP = raw_message(subject="Drop me", text="Noise.")


class DestructiveRequestTests(TestCase):
    @async_test
    async def test_delete_with_an_unreadable_id_list_deletes_nothing(self) -> None:
        """DELETE /api/v1/messages whose JSON body is not Mailpit's {"IDs": [...]}
        (a bare list of ids, or "ids" in lower case, which Mailpit's Go decoder
        accepts) must be refused or delete only those ids: never empty the mailbox.
        Today any body without the exact key "IDs" is taken as "delete all"."""
        relay = mailbox(self)

        def scenario() -> list[tuple[int, int]]:
            relay.wait_listening()
            port = relay.http_port
            results = []
            bodies: list[object] = [[], {"ids": []}]
            for body in bodies:
                for raw in (KEEP, DROP):
                    send(relay.smtp_port, raw)
                listing = request(port, "/api/v1/messages").json()
                drop_id = next(m["ID"] for m in listing["messages"] if m["Subject"] == "Drop me")
                sent: Any = [drop_id] if body == [] else {"ids": [drop_id]}
                reply = request(port, "/api/v1/messages", method="DELETE", body=sent)
                left = request(port, "/api/v1/search?query=subject%3A%22keep+me%22").json()
                results.append((reply.status, left["messages_count"]))
                request(port, "/api/v1/messages", method="DELETE")
            relay.stop()
            return results

        results = await in_thread(scenario)
        self.assertEqual(
            [status >= 400 or kept == 1 for status, kept in results],
            [True, True],
            f"(status, messages not named that were left) per body: {results}",
        )

    @async_test
    async def test_search_delete_never_drops_a_condition(self) -> None:
        """DELETE /api/v1/search?query=... removes only what the whole query matches.
        A query past the parser's limits (17 terms, or over 500 characters) has its
        tail silently dropped, so "-subject:keep" at the end stops protecting the
        messages it names and they are deleted.  Refusing such a query (400) would
        be right; deleting more than asked is not."""
        relay = mailbox(self)
        # 16 harmless terms that every message matches, then the exclusion.
        query = " ".join(["example"] * 16) + " -subject:keep"

        def scenario() -> tuple[int, int, int]:
            relay.wait_listening()
            port = relay.http_port
            for raw in (KEEP, DROP):
                send(relay.smtp_port, raw)
            # A search cut short is refused too (400, no JSON): its status is shown below.
            listed = request(port, "/api/v1/search?query=" + query.replace(" ", "+")).status
            reply = request(
                port, "/api/v1/search?query=" + query.replace(" ", "+"), method="DELETE"
            )
            left = request(port, "/api/v1/messages").json()
            relay.stop()
            return listed, reply.status, left["total"]

        listed, status, left = await in_thread(scenario)
        self.assertTrue(
            status >= 400 or left == 1,
            f"search answered {listed}, DELETE answered {status}, {left} of 2 left",
        )

    @async_test
    async def test_search_delete_without_a_condition_deletes_nothing(self) -> None:
        """DELETE /api/v1/search with a query that states no condition (empty, blank,
        a lone quote, a field name without a value) is a request to delete by
        search that names nothing: Mailpit answers it with an error.  Here every such
        query matches every message and the whole mailbox goes."""
        relay = mailbox(self)
        queries = ["", "+", "%22", "subject%3A"]

        def scenario() -> list[tuple[str, int, int]]:
            relay.wait_listening()
            port = relay.http_port
            results = []
            for query in queries:
                send(relay.smtp_port, KEEP)
                reply = request(port, "/api/v1/search?query=" + query, method="DELETE")
                left = request(port, "/api/v1/messages").json()["total"]
                results.append((query, reply.status, left))
                request(port, "/api/v1/messages", method="DELETE")
            relay.stop()
            return results

        results = await in_thread(scenario)
        self.assertEqual(
            [status >= 400 or left == 1 for _, status, left in results],
            [True] * len(queries),
            f"(query, status, messages left) per query: {results}",
        )


class RefusalTests(TestCase):
    @async_test
    async def test_refused_requests_change_nothing_and_say_why(self) -> None:
        """Over real HTTP with MAILBOX_PATH: a blank search is Mailpit's 400 "Error: no
        search query"; a search past the limits, a delete with {} and a PUT naming more
        than 1,000 IDs are refused with the reason and leave every message as it was;
        "mark all read" answers once the file holds it (read straight from SQLite)."""
        path = os.path.abspath(self.mktemp() + "-mailbox.sqlite")
        relay = mailbox(self, MAILBOX_PATH=path)
        too_long = "+".join(["example"] * 17)

        def scenario() -> dict[str, object]:
            relay.wait_listening()
            port = relay.http_port
            for raw in (KEEP, DROP):
                send(relay.smtp_port, raw)
            out: dict[str, object] = {}
            for name, path_, method, body in (
                ("blank", "/api/v1/search?query=+", "GET", None),
                ("cut", "/api/v1/search?query=" + too_long, "GET", None),
                ("empty object", "/api/v1/messages", "DELETE", {}),
                ("too many", "/api/v1/messages", "PUT", {"IDs": ["x"] * 1001, "Read": True}),
                ("misspelt", "/api/v1/messages", "PUT", {"Reed": True}),
            ):
                reply = request(port, path_, method, body)
                out[name] = (reply.status, reply.body.decode())
            out["left"] = request(port, "/api/v1/messages").json()["total"]
            out["unread before"] = request(port, "/api/v1/info").json()["Unread"]
            out["mark"] = request(port, "/api/v1/messages", "PUT", {"Read": True}).status
            with sqlite3.connect(path) as db:
                out["read in file"] = db.execute(
                    "SELECT count(*) FROM messages WHERE read = 1"
                ).fetchone()[0]
            relay.stop()
            return out

        out = await in_thread(scenario)
        self.assertEqual(out["blank"], (400, "Error: no search query"))
        for name, status, words in (
            ("cut", 400, "more than 16 terms"),
            ("empty object", 400, '"IDs"'),
            ("too many", 413, "at most 1000 IDs"),
            ("misspelt", 400, 'unknown field "Reed"'),
        ):
            got = out[name]
            assert isinstance(got, tuple)
            self.assertEqual(got[0], status, name)
            self.assertIn(words, got[1], name)
        self.assertEqual(out["left"], 2)
        self.assertEqual(out["unread before"], 2)
        self.assertEqual(out["mark"], 200)
        self.assertEqual(out["read in file"], 2)


class HostileHtmlTests(TestCase):
    @async_test
    async def test_inline_images_add_at_most_max_inline_bytes(self) -> None:
        """view.MAX_INLINE_BYTES bounds what inline parts may add to a message's HTML
        document.  The budget is charged once per part, but every occurrence of its
        cid: reference is replaced, so a 100 KB image referenced 300 times (a 5 KB
        HTML body) makes a 40 MB reply: memory and time grow with the product of the
        two, and a larger message takes the relay down.  The reply must stay within
        the HTML plus MAX_INLINE_BYTES (base64-encoded)."""
        image = os.urandom(100 * 1024)
        html = "<p>" + '<img src="cid:logo1">' * 300 + "</p>"
        raw = raw_message(
            subject="Many references", html=html, inline_image=("logo1", image), text="x"
        )
        relay = mailbox(self)

        def scenario() -> int:
            relay.wait_listening()
            send(relay.smtp_port, raw)
            port = relay.http_port
            ident = request(port, "/api/v1/messages").json()["messages"][0]["ID"]
            size = len(request(port, f"/view/{ident}.html").body)
            relay.stop()
            return size

        size = await in_thread(scenario)
        bound = len(html) + (view.MAX_INLINE_BYTES * 4) // 3 + 1000
        self.assertLessEqual(size, bound, f"/view/<id>.html is {size} bytes")
