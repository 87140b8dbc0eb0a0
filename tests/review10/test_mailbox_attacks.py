"""Review 10: defects in the development mailbox, shown against the real twistd.

Each test starts C{twistd -n smtpproxy} with C{PROVIDER=mailbox}, puts mail in
with smtplib and reads the mailbox over real HTTP, as a developer's browser
(or a hostile page that browser visits) would.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from email.message import EmailMessage, Message
from email.utils import collapse_rfc2231_value

from twisted.trial.unittest import SkipTest, TestCase

from tests.browser import Browser, find_chromium
from tests.providers.mailbox.helpers import raw_message
from tests.providers.mailbox.test_twistd_mailbox import mailbox, request, send
from tests.support import async_test, in_thread

SECRET = raw_message(subject="Your password reset link", text="https://app.example/reset/abc")


class FilePermissionTests(TestCase):
    @async_test
    async def test_mailbox_file_is_private_to_its_owner(self) -> None:
        """The SQLite file of captured mail must be readable by its owner only.

        Defect: L{smtpproxy.providers.mailbox.persist.MailboxFile} lets
        sqlite3 create C{MAILBOX_PATH} (and its C{-wal}/C{-shm} files) with
        the process umask, 0644 under the usual 022: every local user can read
        every captured message.  The queue (L{smtpproxy.queue.sqlite}) creates
        its files 0600 and its directory 0700 for the same reason.

        Correct: the file and its WAL companions are created without group or
        other permissions (create it with C{os.open(..., 0o600)} before
        sqlite opens it, or open under a 077 umask), whatever the umask.
        """
        path = os.path.abspath(self.mktemp() + "-mailbox.sqlite")
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        relay = mailbox(self, MAILBOX_PATH=path)

        def scenario() -> dict[str, int]:
            relay.wait_listening()
            send(relay.smtp_port, SECRET)
            assert request(relay.http_port, "/api/v1/messages").json()["total"] == 1
            modes = {
                name: stat.S_IMODE(os.stat(name).st_mode)
                for name in (path, path + "-wal", path + "-shm")
                if os.path.exists(name)
            }
            relay.stop()
            return modes

        modes = await in_thread(scenario)
        self.assertIn(path, modes)
        self.assertEqual(
            {name: mode & 0o077 for name, mode in modes.items()}, dict.fromkeys(modes, 0)
        )


class AttachmentNameTests(TestCase):
    @async_test
    async def test_non_ascii_attachment_name_survives_download(self) -> None:
        """An attachment named C{Rechnung März.pdf} downloads under that name.

        Defect: C{MailboxResource._part} (routes.py) encodes the filename
        with C{encode("ascii", "replace")} into a plain C{filename="..."}:
        the download is offered as C{Rechnung M?rz.pdf} (C{?} is not even
        allowed in a Windows file name), and any name in Cyrillic, Greek or
        CJK becomes a row of question marks.

        Correct (RFC 6266 section 4.3 with RFC 8187/5987): an ASCII fallback
        in C{filename=} plus C{filename*=UTF-8''Rechnung%20M%C3%A4rz.pdf}, so
        the real name reaches the user.
        """
        message = EmailMessage()
        message["From"] = "alice@example.com"
        message["To"] = "bob@example.org"
        message["Subject"] = "Invoice"
        message.set_content("See the attachment.")
        message.add_attachment(
            b"%PDF-1.4", maintype="application", subtype="pdf", filename="Rechnung März.pdf"
        )
        raw = message.as_bytes().replace(b"\n", b"\r\n")
        relay = mailbox(self)

        def scenario() -> str:
            relay.wait_listening()
            send(relay.smtp_port, raw)
            latest = request(relay.http_port, "/api/v1/message/latest").json()
            [part] = latest["Attachments"]
            assert part["FileName"] == "Rechnung März.pdf", part
            path = f"/api/v1/message/{latest['ID']}/part/{part['PartID']}"
            disposition = request(relay.http_port, path).headers["content-disposition"]
            relay.stop()
            return disposition

        disposition = await in_thread(scenario)
        # RFC 6266 section 4.3: when both are present, filename* is the name and
        # filename= only a fallback for clients without RFC 8187.  email's
        # get_filename() returns the first "filename" it meets whatever its
        # kind, so the two are told apart here by their decoded form (the
        # RFC 2231/8187 one is a (charset, language, text) tuple).
        parsed = Message()
        parsed["Content-Disposition"] = disposition
        params = parsed.get_params(header="content-disposition") or []
        extended = [collapse_rfc2231_value(v) for k, v in params[1:] if isinstance(v, tuple)]
        plain = [v for k, v in params[1:] if k == "filename" and isinstance(v, str)]
        self.assertEqual(extended, ["Rechnung März.pdf"], disposition)
        self.assertEqual(len(plain), 1, disposition)
        self.assertTrue(plain[0].isascii() and "?" not in plain[0], disposition)


class _Connections:
    """A TCP listener that only counts connections: a tracker's view of a preconnect.

    An HTTP server that counts requests cannot see a browser that connects
    and then sends nothing, which is all a C{preconnect} does; this can.
    """

    def __init__(self) -> None:
        self.seen = 0
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self.port = self._socket.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self.seen += 1
            connection.close()

    def close(self) -> None:
        self._socket.close()


def _preconnecting_message(home: str, rel: str = "preconnect") -> bytes:
    message = EmailMessage()
    message["From"] = "Mallory <mallory@example.com>"
    message["To"] = "victim@example.org"
    message["Subject"] = "Opened?"
    message.set_content("Plain part.")
    message.add_alternative(
        f'<html><head><link rel="{rel}" href="{home}/opened">'
        "</head><body><p>Nothing to see.</p></body></html>",
        subtype="html",
    )
    return message.as_bytes().replace(b"\n", b"\r\n")


class PreconnectTests(TestCase):
    def setUp(self) -> None:
        self.chromium = find_chromium()
        if self.chromium is None:
            raise SkipTest("chromium is not installed (.ci/run installs it)")

    @async_test
    async def test_link_preconnect_does_not_phone_home(self) -> None:
        """Opening a message must not connect to a host the message names (no remote content asked).

        Defect: the HTML body is served verbatim (view.html_document,
        view.py) and its safety rests on the CSP of view.body_policy; but a
        C{<link rel="preconnect">} is not a fetch, CSP does not govern it,
        and Chromium opens a TCP (and TLS, for https) connection to the
        named host as soon as the message is shown, in the page's iframe and
        opened directly.  The sender's server learns that, when and from
        which address the message was opened: the tracking the issue says
        must not happen "unless the user asks" (and C{dns-prefetch} leaks
        the same through DNS).

        Correct: resource hints in the mail's HTML are not acted on until
        the user loads remote content: drop C{<link>} elements (or at least
        rel preconnect/dns-prefetch/prefetch/preload/prerender) from the
        document the mailbox serves, and send C{X-DNS-Prefetch-Control: off}.
        """
        assert self.chromium is not None
        chromium = self.chromium
        tracker = _Connections()
        self.addCleanup(tracker.close)
        relay = mailbox(self)

        def scenario() -> tuple[int, int]:
            relay.wait_listening()
            send(relay.smtp_port, _preconnecting_message(f"http://127.0.0.1:{tracker.port}"))
            ident = request(relay.http_port, "/api/v1/message/latest").json()["ID"]
            base = f"http://127.0.0.1:{relay.http_port}"
            browser = Browser(chromium)
            try:
                browser.navigate(f"{base}/#{ident}")
                browser.wait_for("document.getElementById('m-subject').textContent")
                time.sleep(2)  # time for the hint to be acted on
                in_page = tracker.seen
                browser.navigate(f"{base}/view/{ident}.html")
                browser.wait_for("document.body?.textContent")
                time.sleep(2)
                direct = tracker.seen - in_page
            finally:
                browser.close()
            relay.stop()
            return in_page, direct

        in_page, direct = await in_thread(scenario)
        self.assertEqual((in_page, direct), (0, 0))

    @async_test
    async def test_remote_content_loads_images_only(self) -> None:
        """ "Load remote content" must load images, not a C{<link rel="prefetch">} document.

        Defect: view.py's docstring and docs/mailbox.md promise that the
        C{remote} variant "allows images over http(s) and nothing else", but
        C{view.body_policy(remote=True)} only widens C{img-src}, and the
        served HTML keeps its C{<link>} elements: Chromium fetches a
        C{rel=prefetch} URL (a credentialed request to any site, cached for
        later) as soon as remote content is on.  A message without a single
        image still phones home when the developer asks to see its images.

        Correct: with remote content on, only images are requested: strip
        resource hints (C{<link>} other than style sheets, which the policy
        already blocks) from the served document.
        """
        assert self.chromium is not None
        chromium = self.chromium
        tracker = _Connections()
        self.addCleanup(tracker.close)
        relay = mailbox(self)

        def scenario() -> int:
            relay.wait_listening()
            home = f"http://127.0.0.1:{tracker.port}"
            send(relay.smtp_port, _preconnecting_message(home, rel="prefetch"))
            ident = request(relay.http_port, "/api/v1/message/latest").json()["ID"]
            base = f"http://127.0.0.1:{relay.http_port}"
            browser = Browser(chromium)
            try:
                browser.navigate(f"{base}/view/{ident}.html?remote=1")
                browser.wait_for("document.body?.textContent")
                time.sleep(2)
            finally:
                browser.close()
            relay.stop()
            return tracker.seen

        self.assertEqual(await in_thread(scenario), 0)


class PagingTests(TestCase):
    @async_test
    async def test_superscript_digit_in_paging_is_a_400(self) -> None:
        """C{?start=²} (or C{limit=¹}) is answered 400 like any other bad number, not 500.

        Defect: C{_number} (routes.py) vets the text with C{str.isdigit()},
        which is true for superscript and other Unicode digits that C{int()}
        refuses; the C{ValueError} escapes the resource, twisted.web answers
        C{500 Processing Failed} as an HTML page and logs a traceback, from a
        query string anyone allowed to reach the mailbox can send.

        Correct: accept ASCII digits only (C{text.isascii() and
        text.isdigit()}, or C{int()} in a C{try}), so the reply is the
        existing C{400 start must be a whole number}.
        """
        relay = mailbox(self)

        def scenario() -> list[tuple[int, bytes]]:
            relay.wait_listening()
            send(relay.smtp_port, SECRET)
            out = []
            for path in (
                "/api/v1/messages?start=%C2%B2",
                "/api/v1/messages?limit=%C2%B9",
                "/api/v1/search?query=password&start=%C2%B2",
            ):
                reply = request(relay.http_port, path)
                out.append((reply.status, reply.body))
            relay.stop()
            return out

        out = await in_thread(scenario)
        self.assertEqual([status for status, _ in out], [400, 400, 400], out)
        self.assertTrue(all(b"whole number" in body for _, body in out), out)


#: An HTML attachment whose RFC 2231 filename decodes to NUL, VT and DEL among its characters.
CONTROL_NAME = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: control name\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n"
    b"--BB\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
    b"--BB\r\nContent-Type: application/pdf\r\n"
    b"Content-Disposition: attachment; filename*=utf-8''a%00b%0bc%7fd.pdf\r\n\r\n"
    b"%PDF-1.4\r\n--BB--\r\n"
)


class AttachmentHeaderTests(TestCase):
    @async_test
    async def test_control_characters_never_reach_the_reply_header(self) -> None:
        """The part download's header block holds no NUL or other control character.

        Defect: C{MailboxResource._part} (routes.py) drops only C{"}, C{\\},
        CR, LF and C{;} from the filename before putting it in
        C{Content-Disposition}; an RFC 2231 name (C{filename*=utf-8''a%00b})
        puts a raw NUL, VT or DEL in the reply header.  RFC 9110 section 5.5
        forbids them in a field value; Chromium refuses such a response
        (ERR_INVALID_HTTP_RESPONSE), so the sender decides that the developer
        cannot download the attachment, and other clients may split or cut
        the header at the NUL.

        Correct: every control character (0x00-0x1F but HTAB, and 0x7F) is
        dropped or replaced in the header's filename (and carried, if at all,
        percent-encoded in C{filename*}).
        """
        relay = mailbox(self)

        def scenario() -> bytes:
            relay.wait_listening()
            send(relay.smtp_port, CONTROL_NAME)
            latest = request(relay.http_port, "/api/v1/message/latest").json()
            [part] = latest["Attachments"]
            assert "\x00" in part["FileName"], part
            path = f"/api/v1/message/{latest['ID']}/part/{part['PartID']}"
            with socket.create_connection(("127.0.0.1", relay.http_port), timeout=30) as raw:
                raw.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
                reply = b""
                while b"\r\n\r\n" not in reply:
                    chunk = raw.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            relay.stop()
            return reply.split(b"\r\n\r\n", 1)[0]

        head = await in_thread(scenario)
        self.assertTrue(head.startswith(b"HTTP/1.0 200"), head)
        for line in head.split(b"\r\n"):
            controls = [c for c in line if (c < 0x20 and c != 0x09) or c == 0x7F]
            self.assertEqual(controls, [], line)
