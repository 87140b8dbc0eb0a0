"""The mailbox as operators and developers use it: `twistd -n smtpproxy` with PROVIDER=mailbox.

Mail goes in with smtplib; the API is read over real HTTP (urllib, and the
published C{mailpit-api} client under Node.js), the page in headless
Chromium; release goes out through the upstream SMTP provider to a second
relay listening on loopback.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import smtplib
import subprocess
import threading
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.browser import Browser, find_chromium
from tests.providers.mailbox.helpers import raw_message, tiny_png
from tests.support import TIMEOUT, async_test, in_thread, start_relay
from tests.test_twistd import Relay

ROOT = Path(__file__).resolve().parents[3]
CLIENTS = ROOT / "tests" / "clients"
IMAGES = ROOT / "docs" / "img"


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    path: str,
    method: str = "GET",
    body: object = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One real HTTP request; the reply whatever its status."""
    data = None if body is None else json.dumps(body).encode()
    sent = dict(headers or {})
    if data is not None:
        sent["Content-Type"] = "application/json"
    url = f"http://127.0.0.1:{port}{path}"
    req = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as reply:  # noqa: S310
            return Response(
                reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
            )
    except urllib.error.HTTPError as e:
        return Response(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def send(port: int, raw: bytes, to: list[str] | None = None) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.sendmail("alice@example.com", to or ["bob@example.org"], raw)


def mailbox(case: TestCase, **settings: str) -> Relay:
    settings.setdefault("PROVIDER", "mailbox")
    return Relay(case, (), **settings)


INVOICE = raw_message(subject="Invoice 42", to="billing@example.org", text="Pay soon.")
REPORT = raw_message(
    subject="Monthly report",
    to="carol@example.net",
    html='<h1>Report</h1><p>Figures attached.</p><img src="cid:logo1">',
    text="Figures attached.\r\n.a line starting with a dot\r\n",
    attachment=b"%PDF-1.4 report bytes",
    inline_image=("logo1", tiny_png()),
)
HELLO = raw_message(subject="Hello", text="Just saying hello.")


class ApiTests(TestCase):
    @async_test
    async def test_read_search_delete_over_http(self) -> None:
        """Mail sent with smtplib is listed newest first and paged, read whole (raw bytes
        exact, headers, parts), found by search, and deleted by id and all at once; every
        reply carries a CSP; unknown ids are 404, wrong methods 405."""
        relay = mailbox(self)

        def scenario() -> dict[str, Any]:
            relay.wait_listening()
            for raw, to in ((INVOICE, None), (REPORT, ["carol@example.net"]), (HELLO, None)):
                send(relay.smtp_port, raw, to)
            port = relay.http_port
            out: dict[str, Any] = {}
            out["list"] = request(port, "/api/v1/messages")
            out["page"] = request(port, "/api/v1/messages?start=1&limit=1").json()
            report_id = out["list"].json()["messages"][1]["ID"]
            out["message"] = request(port, f"/api/v1/message/{report_id}").json()
            out["latest"] = request(port, "/api/v1/message/latest").json()
            out["raw"] = request(port, f"/api/v1/message/{report_id}/raw").body
            out["headers"] = request(port, f"/api/v1/message/{report_id}/headers").json()
            part_id = out["message"]["Attachments"][0]["PartID"]
            out["part"] = request(port, f"/api/v1/message/{report_id}/part/{part_id}")
            out["search"] = request(port, "/api/v1/search?query=subject%3Ainvoice").json()
            out["words"] = request(port, "/api/v1/search?query=figures").json()
            out["missing"] = request(port, "/api/v1/message/nope").status
            out["method"] = request(port, "/api/v1/info", method="POST", body={}).status
            out["info"] = request(port, "/api/v1/info").json()
            out["delete_one"] = request(
                port, "/api/v1/messages", method="DELETE", body={"IDs": [report_id]}
            )
            out["after_one"] = request(port, "/api/v1/messages").json()
            out["delete_all"] = request(port, "/api/v1/messages", method="DELETE")
            out["after_all"] = request(port, "/api/v1/messages").json()
            out["health"] = request(port, "/healthz").status
            relay.stop()
            return out

        out = await in_thread(scenario)
        listing = out["list"]
        self.assertEqual(listing.status, 200)
        self.assertIn("default-src 'none'", listing.headers["content-security-policy"])
        subjects = [m["Subject"] for m in listing.json()["messages"]]
        self.assertEqual(subjects, ["Hello", "Monthly report", "Invoice 42"])
        self.assertEqual(listing.json()["total"], 3)
        self.assertEqual([m["Subject"] for m in out["page"]["messages"]], ["Monthly report"])
        self.assertEqual(out["page"]["start"], 1)
        message = out["message"]
        self.assertEqual(message["Subject"], "Monthly report")
        self.assertEqual(message["To"], [{"Name": "", "Address": "carol@example.net"}])
        self.assertIn("<h1>Report</h1>", message["HTML"])
        self.assertEqual(message["Attachments"][0]["FileName"], "report.pdf")
        self.assertEqual(message["Inline"][0]["ContentID"], "logo1")
        self.assertEqual(out["latest"]["Subject"], "Hello")
        self.assertEqual(out["raw"], REPORT)
        self.assertEqual(out["headers"]["Subject"], ["Monthly report"])
        self.assertEqual(out["part"].body, b"%PDF-1.4 report bytes")
        self.assertEqual(out["part"].headers["content-type"], "application/pdf")
        self.assertIn("attachment", out["part"].headers["content-disposition"])
        self.assertEqual([m["Subject"] for m in out["search"]["messages"]], ["Invoice 42"])
        self.assertEqual([m["Subject"] for m in out["words"]["messages"]], ["Monthly report"])
        self.assertEqual((out["missing"], out["method"]), (404, 405))
        self.assertEqual(out["info"]["Messages"], 3)
        self.assertEqual(out["info"]["RuntimeStats"]["SMTPAccepted"], 3)
        self.assertEqual(out["delete_one"].body, b"ok")
        self.assertEqual(out["after_one"]["total"], 2)
        self.assertEqual(out["delete_all"].status, 200)
        self.assertEqual(out["after_all"]["total"], 0)
        self.assertEqual(out["health"], 200)

    @async_test
    async def test_chaos_over_the_api_reaches_smtp(self) -> None:
        """PUT /api/v1/chaos (Mailpit's shape) makes the next RCPT fail with the chosen
        code; MAILBOX_CHAOS set at start does the same at MAIL; resetting lets mail in."""
        relay = mailbox(self, MAILBOX_CHAOS="sender=451:100")

        def scenario() -> tuple[Any, ...]:
            relay.wait_listening()
            port = relay.http_port
            with self.assertRaises(smtplib.SMTPSenderRefused) as sender:
                send(relay.smtp_port, HELLO)
            shown = request(port, "/api/v1/chaos").json()
            put = request(
                port, "/api/v1/chaos", "PUT", {"Recipient": {"ErrorCode": 550, "Probability": 100}}
            )
            with self.assertRaises(smtplib.SMTPRecipientsRefused) as recipient:
                send(relay.smtp_port, HELLO)
            bad = request(port, "/api/v1/chaos", "PUT", {"Sender": {"ErrorCode": 200}})
            request(port, "/api/v1/chaos", "PUT", {})
            send(relay.smtp_port, HELLO)
            count = request(port, "/api/v1/messages").json()["total"]
            _, err = relay.stop()
            return sender.exception, shown, put.json(), recipient.exception, bad, count, err

        sender, shown, put, recipient, bad, count, err = await in_thread(scenario)
        self.assertEqual(sender.smtp_code, 451)
        self.assertEqual(shown["Sender"], {"ErrorCode": 451, "Probability": 100})
        self.assertEqual(put["Sender"]["Probability"], 0)
        self.assertEqual(recipient.recipients["bob@example.org"][0], 550)
        self.assertEqual(bad.status, 400)
        self.assertEqual(count, 1)
        self.assertIn(b"mailbox chaos changed", err)

    @async_test
    async def test_access_rules(self) -> None:
        """Basic auth guards the page and API (401 without, 200 with, never for /healthz);
        a cross-site POST is refused; outside MAILBOX_ALLOWED_NETWORKS everything but
        /healthz is 403."""
        relay = mailbox(self, MAILBOX_USERNAME="dev", MAILBOX_PASSWORD="s3cret")
        closed = mailbox(self, MAILBOX_ALLOWED_NETWORKS="10.0.0.0/8")
        good = "Basic " + base64.b64encode(b"dev:s3cret").decode()
        bad = "Basic " + base64.b64encode(b"dev:wrong").decode()

        def scenario() -> list[Any]:
            relay.wait_listening()
            closed.wait_listening()
            port = relay.http_port
            send(relay.smtp_port, HELLO)
            latest = request(port, "/api/v1/message/latest", headers={"Authorization": good})
            ident = latest.json()["ID"]
            release_path = f"/api/v1/message/{ident}/release"
            out = [
                request(port, "/api/v1/messages"),
                request(port, "/api/v1/messages", headers={"Authorization": bad}).status,
                request(port, "/", headers={"Authorization": good}).status,
                request(port, "/healthz").status,
                request(
                    port,
                    release_path,
                    "POST",
                    {"To": ["x@example.com"]},
                    {"Authorization": good, "Origin": "https://evil.example"},
                ).status,
                request(closed.http_port, "/").status,
                request(closed.http_port, "/api/v1/messages").status,
                request(closed.http_port, "/healthz").status,
            ]
            relay.stop()
            closed.stop()
            return out

        out = await in_thread(scenario)
        self.assertEqual(out[0].status, 401)
        self.assertIn("Basic", out[0].headers["www-authenticate"])
        self.assertEqual(out[1:], [401, 200, 200, 403, 403, 403, 200])

    @async_test
    async def test_release_through_the_upstream_provider(self) -> None:
        """POST /api/v1/message/{ID}/release with Mailpit's {"To": [...]} sends the captured
        bytes through PROVIDER=smtp's client to the upstream, to the new recipients only;
        a bad request is 400; without a release provider it is 400 too."""
        upstream = start_relay(self, tls_enabled=False)
        relay = mailbox(
            self,
            MAILBOX_RELEASE_PROVIDER="smtp",
            RELAY_HOST="127.0.0.1",
            RELAY_PORT=str(upstream.port),
            RELAY_TLS="none",
        )
        plain = mailbox(self)

        def scenario() -> list[Any]:
            relay.wait_listening()
            plain.wait_listening()
            send(relay.smtp_port, REPORT)
            send(plain.smtp_port, REPORT)
            port = relay.http_port
            ok = request(
                port, "/api/v1/message/latest/release", "POST", {"To": ["dave@example.com"]}
            )
            out = [
                ok,
                request(port, "/api/v1/message/latest/release", "POST", {"To": "x"}).status,
                request(port, "/api/v1/message/latest/release", "POST", {"To": ["no"]}).status,
                request(
                    plain.http_port, "/api/v1/message/latest/release", "POST", {"To": ["a@b.c"]}
                ).status,
                request(port, "/api/v1/webui").json()["MessageRelay"],
            ]
            _, err = relay.stop()
            plain.stop()
            out.append(err)
            return out

        ok, bad_shape, bad_address, no_provider, webui, err = await in_thread(scenario)
        self.assertEqual((ok.status, ok.body), (200, b"ok"), ok.body)
        (released,) = upstream.provider.emails
        self.assertEqual(released.envelope_to, ("dave@example.com",))
        self.assertEqual(released.raw, REPORT)
        self.assertEqual((bad_shape, bad_address, no_provider), (400, 400, 400))
        self.assertEqual(webui["Enabled"], True)
        self.assertEqual(webui["SMTPServer"], "smtp")
        self.assertIn(b"mailbox message released", err)

    @async_test
    async def test_live_events_and_a_file_that_survives_a_restart(self) -> None:
        """A page's /events stream gets each new message as it arrives; with MAILBOX_PATH
        the messages are there again after a restart, raw bytes and ids unchanged."""
        # Absolute: each twistd runs in a directory of its own.
        path = os.path.abspath(self.mktemp() + "-mailbox.sqlite")
        relay = mailbox(self, MAILBOX_PATH=path)

        def scenario() -> tuple[bytes, list[str], list[str], bytes]:
            relay.wait_listening()
            stream = http.client.HTTPConnection("127.0.0.1", relay.http_port, timeout=TIMEOUT)
            stream.request("GET", "/events")
            reply = stream.getresponse()
            assert reply.getheader("content-type", "").startswith("text/event-stream")
            send(relay.smtp_port, INVOICE)
            seen = b""
            while b"\n\n" not in seen.split(b"retry: 3000\n\n", 1)[-1]:
                seen += reply.read1(65536)
            stream.close()
            send(relay.smtp_port, HELLO)
            before = [
                m["ID"] for m in request(relay.http_port, "/api/v1/messages").json()["messages"]
            ]
            relay.stop()
            again = mailbox(self, MAILBOX_PATH=path)
            again.wait_listening()
            port = again.http_port
            after = [m["ID"] for m in request(port, "/api/v1/messages").json()["messages"]]
            raw = request(port, f"/api/v1/message/{after[-1]}/raw").body
            again.stop()
            return seen, before, after, raw

        seen, before, after, raw = await in_thread(scenario)
        event = seen.split(b"event: new\ndata: ", 1)[1].split(b"\n\n", 1)[0]
        self.assertEqual(json.loads(event)["Subject"], "Invoice 42")
        self.assertEqual(after, before)
        self.assertEqual(len(after), 2)
        self.assertEqual(raw, INVOICE)

    @async_test
    async def test_a_killed_relay_keeps_every_acknowledged_message(self) -> None:
        """Every message answered 250 is in the file after SIGKILL (no shutdown, no
        final checkpoint): the row was committed to the WAL before the reply, and
        opening the file again recovers it, whatever the background checkpointer
        had copied by then."""
        path = os.path.abspath(self.mktemp() + "-mailbox.sqlite")
        relay = mailbox(self, MAILBOX_PATH=path)
        # Enough bytes (about 7 MiB) that a background checkpoint runs meanwhile.
        body = "line of text to make the message long\r\n" * 5000

        def scenario() -> tuple[list[str], list[str]]:
            relay.wait_listening()
            subjects = [f"kept {n}" for n in range(40)]
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                for subject in subjects:
                    client.sendmail(
                        "alice@example.com",
                        ["bob@example.org"],
                        raw_message(subject=subject, text=body),
                    )
                relay.stop(signal.SIGKILL)
            again = mailbox(self, MAILBOX_PATH=path)
            again.wait_listening()
            listed = request(again.http_port, "/api/v1/messages?limit=100").json()
            again.stop()
            return subjects, [m["Subject"] for m in listed["messages"]]

        subjects, found = await in_thread(scenario)
        self.assertEqual(found, list(reversed(subjects)))


class MailpitClientTests(TestCase):
    @async_test
    async def test_the_published_client_works_unchanged(self) -> None:
        """mailpit-api (npm) lists, pages, reads (summary, headers, source, attachment,
        rendered HTML and text), searches, waits, sets chaos, marks read and deletes (by
        id, by search, all) against the relay, with basic auth; a missing id is its error."""
        node = shutil.which("node")
        if node is None:
            raise SkipTest("node is not installed (.ci/run installs nodejs)")
        if not (CLIENTS / "node_modules" / "mailpit-api" / "package.json").exists():
            raise SkipTest("mailpit-api is not installed: npm ci --prefix tests/clients")
        relay = mailbox(self, MAILBOX_USERNAME="dev", MAILBOX_PASSWORD="s3cret")

        def scenario() -> subprocess.CompletedProcess[bytes]:
            relay.wait_listening()
            send(relay.smtp_port, INVOICE)
            send(relay.smtp_port, REPORT, ["carol@example.net"])
            send(relay.smtp_port, HELLO)
            result = subprocess.run(
                [node, str(CLIENTS / "mailpit_check.js"), f"http://127.0.0.1:{relay.http_port}",
                 "dev", "s3cret"],
                capture_output=True,
                timeout=60,
                check=False,
            )  # fmt: skip
            relay.stop()
            return result

        result = await in_thread(scenario)
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        out = json.loads(result.stdout)
        self.assertEqual(out["info"]["Messages"], 3)
        self.assertEqual(out["list"]["messages_count"], 3)
        self.assertEqual([m["Subject"] for m in out["page"]["messages"]], ["Monthly report"])
        self.assertEqual(out["latest"]["Subject"], "Hello")
        self.assertEqual(out["summary"]["Subject"], "Monthly report")
        self.assertEqual(out["headers"]["To"], ["carol@example.net"])
        self.assertEqual(out["source"].encode(), REPORT)
        self.assertEqual(out["attachment"]["type"], "application/pdf")
        self.assertEqual(base64.b64decode(out["attachment"]["base64"]), b"%PDF-1.4 report bytes")
        self.assertEqual([m["Subject"] for m in out["search"]["messages"]], ["Invoice 42"])
        self.assertEqual(out["waited"]["Subject"], "Monthly report")
        self.assertIn("<h1>Report</h1>", out["html"])
        self.assertIn("Figures attached.", out["text"])
        self.assertEqual(out["chaosRead"]["Recipient"], {"ErrorCode": 451, "Probability": 0})
        self.assertTrue(out["config"]["ChaosEnabled"])
        self.assertEqual(out["readStatus"], "ok")
        self.assertEqual(out["afterDeleteOne"]["total"], 2)
        self.assertEqual(out["afterDeleteSearch"]["total"], 1)
        self.assertEqual(out["empty"]["messages_count"], 0)
        self.assertIn("404", out["missing"])


class _Counter(BaseHTTPRequestHandler):
    """Counts every request by path: the 'outside world' a hostile message calls home to."""

    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


def hostile_message(home: str) -> bytes:
    """HTML that tries every way to run code or phone home that a mail body can."""
    html = f"""<html><head>
<meta http-equiv="refresh" content="0;url={home}/refresh">
<link rel="stylesheet" href="{home}/style.css">
<style>body {{ background: url({home}/background.png); }}</style>
</head><body>
<p id="marker">original text</p>
<script>document.getElementById("marker").textContent = "SCRIPT RAN";
fetch("{home}/fetch"); new Image().src = "{home}/script-image";</script>
<img src="{home}/tracker.png" alt="tracker">
<img src="x" onerror="document.getElementById('marker').textContent='HANDLER RAN'">
<form action="{home}/form" method="post"><input name="q"><button id="go">Go</button></form>
<iframe src="{home}/frame"></iframe>
<a href="javascript:alert(1)">link</a>
</body></html>"""
    message = EmailMessage()
    message["From"] = "Mallory <mallory@example.com>"
    message["To"] = "victim@example.org"
    message["Subject"] = "Hostile HTML"
    message.set_content("The HTML part is the interesting one.")
    message.add_alternative(html, subtype="html")
    return message.as_bytes().replace(b"\n", b"\r\n")


class PageTests(TestCase):
    def setUp(self) -> None:
        self.chromium = find_chromium()
        if self.chromium is None:
            raise SkipTest("chromium is not installed (.ci/run installs it)")

    def start_counter(self) -> tuple[str, list[str]]:
        hits: list[str] = []
        handler = type("Handler", (_Counter,), {"hits": hits})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return f"http://127.0.0.1:{server.server_address[1]}", hits

    @async_test
    async def test_list_and_message_screenshots(self) -> None:
        """The page lists the messages, shows one arriving live, opens one with its tabs
        (marking it read) and searches; screenshots of the list and of the message are saved
        (in the test's directory, and as docs/img/ when SAVE_DOC_IMAGES is set)."""
        assert self.chromium is not None
        chromium = self.chromium
        relay = mailbox(self)
        out_dir = os.path.abspath(self.mktemp())
        os.makedirs(out_dir)

        def scenario() -> dict[str, Any]:
            relay.wait_listening()
            for raw, to in ((INVOICE, None), (REPORT, ["carol@example.net"]), (HELLO, None)):
                send(relay.smtp_port, raw, to)
            browser = Browser(chromium)
            try:
                base = f"http://127.0.0.1:{relay.http_port}/"
                browser.navigate(base)
                rows = browser.wait_for("document.querySelectorAll('#list tbody tr').length")
                listed = browser.evaluate(
                    "[...document.querySelectorAll('#list tbody tr td.subject')]"
                    ".map(td => td.firstChild.textContent)"
                )
                browser.screenshot(os.path.join(out_dir, "mailbox-list.png"))
                # Live update: a message sent now appears without a reload.
                send(relay.smtp_port, raw_message(subject="Arrived live"))
                live = browser.wait_for(
                    "document.querySelector('#list tbody td.subject').textContent"
                    ".startsWith('Arrived live')"
                )
                browser.evaluate(
                    "location.hash = '#' + [...document.querySelectorAll('#list tbody tr')]"
                    ".find(tr => tr.textContent.includes('Monthly report')).dataset.id"
                )
                subject = browser.wait_for("document.getElementById('m-subject').textContent")
                browser.wait_for(
                    "document.querySelectorAll('#tab-attachments li a').length > 0"
                    " && document.getElementById('tab-raw').textContent.length > 0"
                )
                time.sleep(0.5)  # let the iframe paint
                browser.screenshot(os.path.join(out_dir, "mailbox-message.png"))
                browser.evaluate("document.querySelector('[data-tab=attachments]').click()")
                unread = browser.wait_for(
                    "document.getElementById('status').textContent.includes('3 unread')"
                    " && document.getElementById('status').textContent"
                )
                attachments = browser.evaluate(
                    "document.getElementById('tab-attachments').textContent"
                )
                # Search from the box: only the matching message is listed.
                browser.evaluate(
                    "location.hash = ''; document.getElementById('query').value = 'to:billing';"
                    " document.querySelector('#search button').click()"
                )
                found = browser.wait_for(
                    "document.querySelectorAll('#list tbody tr').length === 1 &&"
                    " document.querySelector('#list tbody td.subject').firstChild.textContent"
                )
                errors = browser.console_messages()
            finally:
                browser.close()
            relay.stop()
            return {
                "rows": rows,
                "listed": listed,
                "live": live,
                "subject": subject,
                "attachments": attachments,
                "unread": unread,
                "found": found,
                "errors": errors,
            }

        out = await in_thread(scenario)
        self.assertEqual(out["rows"], 3)
        self.assertEqual(out["listed"], ["Hello", "Monthly report", "Invoice 42"])
        self.assertTrue(out["live"])
        self.assertEqual(out["subject"], "Monthly report")
        self.assertIn("report.pdf", out["attachments"])
        self.assertEqual(out["unread"], "4 messages, 3 unread")
        self.assertEqual(out["found"], "Invoice 42")
        self.assertEqual(out["errors"], [])
        for name in ("mailbox-list.png", "mailbox-message.png"):
            with open(os.path.join(out_dir, name), "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            if os.environ.get("SAVE_DOC_IMAGES"):
                IMAGES.mkdir(exist_ok=True)
                shutil.copy(os.path.join(out_dir, name), IMAGES / name)

    @async_test
    async def test_hostile_html_is_inert(self) -> None:
        """A message with a script, an event handler, a remote image, a style sheet, a
        background, a meta refresh, a form and a frame: shown in the page and opened
        directly, no script runs and nothing reaches the outside server; asking for remote
        content loads the image only (so the counter can see a request when one is made)."""
        assert self.chromium is not None
        chromium = self.chromium
        home, hits = self.start_counter()
        relay = mailbox(self)
        out_dir = os.path.abspath(self.mktemp())
        os.makedirs(out_dir)

        def scenario() -> dict[str, Any]:
            relay.wait_listening()
            send(relay.smtp_port, hostile_message(home))
            ident = request(relay.http_port, "/api/v1/message/latest").json()["ID"]
            base = f"http://127.0.0.1:{relay.http_port}"
            browser = Browser(chromium)
            try:
                browser.navigate(f"{base}/#{ident}")
                browser.wait_for("document.getElementById('m-subject').textContent")
                time.sleep(1.5)  # time for a script, a refresh or an image to fire
                browser.screenshot(os.path.join(out_dir, "hostile-in-page.png"))
                page_requests = browser.sent_urls()
                # The same document opened on its own, as a top-level page.
                browser.navigate(f"{base}/view/{ident}.html")
                marker = browser.wait_for("document.getElementById('marker')?.textContent")
                time.sleep(1.5)
                direct_requests = browser.sent_urls()
                hits_before_remote = list(hits)
                browser.navigate(f"{base}/view/{ident}.html?remote=1")
                browser.wait_for("document.getElementById('marker')?.textContent")
                time.sleep(1.5)
                marker_remote = browser.evaluate("document.getElementById('marker').textContent")
            finally:
                browser.close()
            relay.stop()
            return {
                "page_requests": page_requests,
                "direct_requests": direct_requests,
                "marker": marker,
                "marker_remote": marker_remote,
                "hits_before_remote": hits_before_remote,
                "hits_after_remote": list(hits),
            }

        out = await in_thread(scenario)
        self.assertEqual(out["hits_before_remote"], [])
        self.assertEqual(out["marker"], "original text")
        self.assertEqual(out["marker_remote"], "original text")
        # The browser did not even try: any request out was refused before it was sent.
        for key in ("page_requests", "direct_requests"):
            self.assertEqual([u for u in out[key] if u.startswith(home)], [], key)
        self.assertTrue(any("/view/" in u for u in out["page_requests"]))
        # With remote content allowed: the images, and still no script, refresh or form.
        self.assertIn("/tracker.png", out["hits_after_remote"])
        self.assertTrue(
            set(out["hits_after_remote"]) <= {"/tracker.png", "/background.png"},
            out["hits_after_remote"],
        )
