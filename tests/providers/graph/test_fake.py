"""The fake Graph catches the mistakes a client could make (else it would prove nothing)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any
from urllib.parse import quote, urlencode

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.fakegraph import FakeGraph

MAILBOX = "relay@contoso.example"
API = f"http://graph.test/v1.0/users/{MAILBOX}"


class FakeGraphCase(SynchronousTestCase):
    """A fake Graph and helpers to call it through StubTreq."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeGraph(self.clock, mailboxes=(MAILBOX,))
        self.stub: Any = StubTreq(self.fake.resource)

    def call(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        content_type: str = "application/json",
        *,
        token: bool = True,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = {"client-request-id": str(uuid.uuid4()), "Content-Type": content_type}
        if token:
            sent["Authorization"] = f"Bearer {self.token()}"
        sent.update(headers or {})
        response = self.successResultOf(self.stub.request(method, url, data=body, headers=sent))
        payload = self.successResultOf(response.content())
        try:
            return response.code, json.loads(payload)
        except ValueError:
            return response.code, payload

    def token(self, secret: str | None = None) -> str:
        form = {
            "client_id": self.fake.client_id,
            "client_secret": secret or self.fake.client_secret,
            "scope": "http://graph.test/.default",
            "grant_type": "client_credentials",
        }
        url = f"http://login.test/{self.fake.tenant}/oauth2/v2.0/token"
        headers = {
            "client-request-id": str(uuid.uuid4()),
            "Content-Type": "application/x-www-form-urlencoded",
        }
        response = self.successResultOf(
            self.stub.request("POST", url, data=urlencode(form).encode(), headers=headers)
        )
        document = json.loads(self.successResultOf(response.content()))
        if response.code != 200:
            return f"refused:{document['error']}"
        value: str = document["access_token"]
        return value

    def code(self, answer: tuple[int, Any]) -> tuple[int, str]:
        status, body = answer
        return status, body["error"]["code"]

    def message(self, **extra: Any) -> dict[str, Any]:
        message = {
            "subject": "s",
            "body": {"contentType": "Text", "content": "b"},
            "toRecipients": [{"emailAddress": {"address": "a@x.example"}}],
        }
        message.update(extra)
        return message

    def send_json(self, message: dict[str, Any]) -> tuple[int, Any]:
        return self.call("POST", f"{API}/sendMail", json.dumps({"message": message}).encode())


class FakeGraphTests(FakeGraphCase):
    def test_token_rules(self) -> None:
        """A wrong secret is invalid_client; a JSON token request is refused and recorded."""
        self.assertEqual(self.token("wrong"), "refused:invalid_client")
        url = f"http://login.test/{self.fake.tenant}/oauth2/v2.0/token"
        status, body = self.call("POST", url, b"{}", token=False)
        self.assertEqual((status, body["error"]), (400, "invalid_request"))
        self.assertEqual(self.fake.violations, ["token: not form-encoded"])

    def test_expired_token(self) -> None:
        """A token past its lifetime gets 401 InvalidAuthenticationToken."""
        token = self.token()
        self.clock.advance(self.fake.token_lifetime)
        answer = self.call(
            "POST",
            f"{API}/sendMail",
            json.dumps({"message": self.message()}).encode(),
            token=False,
            headers={"Authorization": f"Bearer {token}"},
        )
        self.assertEqual(self.code(answer), (401, "InvalidAuthenticationToken"))

    def test_from_must_be_the_mailbox(self) -> None:
        """Raw MIME or JSON claiming another sender is ErrorSendAsDenied."""
        mime = b"From: boss@contoso.example\r\nTo: a@x.example\r\n\r\nhi\r\n"
        answer = self.call("POST", f"{API}/sendMail", base64.b64encode(mime), "text/plain")
        self.assertEqual(self.code(answer), (403, "ErrorSendAsDenied"))
        other = {"emailAddress": {"address": "boss@contoso.example"}}
        self.assertEqual(
            self.code(self.send_json(self.message(**{"from": other}))), (403, "ErrorSendAsDenied")
        )
        self.assertEqual(self.fake.deliveries, [])

    def test_custom_header_rules(self) -> None:
        """Six X- headers, or one not starting with x-, are refused."""
        six = [{"name": f"X-{i}", "value": "v"} for i in range(6)]
        answer = self.send_json(self.message(internetMessageHeaders=six))
        self.assertEqual(self.code(answer), (400, "InvalidInternetMessageHeaderCollection"))
        plain = [{"name": "Keywords", "value": "v"}]
        answer = self.send_json(self.message(internetMessageHeaders=plain))
        self.assertEqual(self.code(answer), (400, "InvalidInternetMessageHeader"))

    def test_schema(self) -> None:
        """Unknown message properties and malformed recipients are refused."""
        self.assertEqual(self.code(self.send_json(self.message(cc=[]))), (400, "RequestBodyRead"))
        bad = [{"address": "a@x.example"}]
        self.assertEqual(
            self.code(self.send_json(self.message(toRecipients=bad))), (400, "RequestBodyRead")
        )

    def test_recipient_limit(self) -> None:
        """501 recipients are refused; no recipients at all too."""
        many = [{"emailAddress": {"address": f"r{i}@x.example"}} for i in range(501)]
        answer = self.send_json(self.message(bccRecipients=many))
        self.assertEqual(self.code(answer), (400, "ErrorTooManyRecipients"))
        answer = self.send_json(self.message(toRecipients=[]))
        self.assertEqual(self.code(answer), (400, "ErrorInvalidRecipients"))

    def test_request_cap(self) -> None:
        """A body over 4 MB is refused with 413."""
        body = base64.b64encode(b"To: a@x.example\r\n\r\n" + b"x" * 3_200_000)
        answer = self.call("POST", f"{API}/sendMail", body, "text/plain")
        self.assertEqual(self.code(answer), (413, "RequestEntityTooLarge"))

    def test_reused_request_id(self) -> None:
        """Sending the same client-request-id twice is recorded as a violation."""
        headers = {"client-request-id": "6a1f2b1e-0000-4000-8000-000000000000"}
        for _ in range(2):
            self.call("POST", f"{API}/sendMail", b"{}", headers=headers)
        self.assertIn("reused", " ".join(self.fake.violations))

    def _draft(self) -> str:
        status, body = self.call("POST", f"{API}/messages", json.dumps(self.message()).encode())
        self.assertEqual(status, 201)
        draft_id: str = body["id"]
        return quote(draft_id, safe="")

    def _session(self, draft: str, size: int) -> tuple[int, Any]:
        item = {"AttachmentItem": {"attachmentType": "file", "name": "f.bin", "size": size}}
        url = f"{API}/messages/{draft}/attachments/createUploadSession"
        return self.call("POST", url, json.dumps(item).encode())

    def test_upload_session_minimum(self) -> None:
        """An upload session for a part under 3 MB is refused."""
        answer = self._session(self._draft(), 2_999_999)
        self.assertEqual(
            self.code(answer), (400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")
        )

    def test_upload_rules(self) -> None:
        """Ranges must come in order, without Authorization; sending waits for completion."""
        draft = self._draft()
        status, session = self._session(draft, 3_000_000)
        self.assertEqual(status, 201)
        url = session["uploadUrl"]

        def put(first: int, last: int, token: bool = False) -> int:
            headers = {"Content-Range": f"bytes {first}-{last}/3000000"}
            body = bytes(last - first + 1)
            status, _ = self.call(
                "PUT", url, body, "application/octet-stream", token=token, headers=headers
            )
            return status

        self.assertEqual(put(0, 999_999, token=True), 400)
        self.assertEqual(put(1_000_000, 1_999_999), 416)
        self.assertEqual(put(0, 999_999), 200)
        answer = self.call("POST", f"{API}/messages/{draft}/send")
        self.assertEqual(self.code(answer), (400, "ErrorInvalidOperation"))
        self.assertEqual(put(1_000_000, 2_999_999), 201)
        status, _ = self.call("POST", f"{API}/messages/{draft}/send")
        self.assertEqual(status, 202)
        self.assertEqual(self.fake.deliveries[0].attachments, [("f.bin", bytes(3_000_000))])
        self.assertEqual(len(self.fake.violations), 3)


class MimeDraftFakeTests(FakeGraphCase):
    """The fake holds MIME drafts to what Graph enforces."""

    def mime(self, sender: str = MAILBOX, body: bytes = b"Hello.\r\n") -> bytes:
        raw = (
            (
                f"From: {sender}\r\nTo: a@x.example\r\nSubject: s\r\n"
                "Message-ID: <m-1@example.org>\r\n"
                'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
                "--b\r\nContent-Type: text/plain\r\n\r\n"
            ).encode()
            + body
            + b"\r\n--b--\r\n"
        )
        return base64.b64encode(raw)

    def create(self, body: bytes) -> tuple[int, Any]:
        return self.call("POST", f"{API}/messages", body, "text/plain")

    def test_request_over_4_mb_refused(self) -> None:
        """A base64 MIME draft over 4 MB is refused (413) and counted as the relay's mistake."""
        status, _ = self.create(self.mime(body=b"x" * (3 * 1024 * 1024 + 100)))
        self.assertEqual(status, 413)
        self.assertEqual(len(self.fake.violations), 1)

    def test_from_must_be_the_mailbox(self) -> None:
        """A MIME draft from someone else is ErrorSendAsDenied."""
        answer = self.create(self.mime(sender="other@contoso.example"))
        self.assertEqual(self.code(answer), (403, "ErrorSendAsDenied"))

    def test_not_base64_refused(self) -> None:
        """A MIME draft body that is not base64 is refused as Graph refuses it."""
        answer = self.create(b"not base64!")
        self.assertEqual(self.code(answer), (400, "ErrorMimeContentInvalidBase64String"))

    def test_send_only_when_uploads_complete(self) -> None:
        """A MIME draft whose upload is incomplete is not sent; once complete, the message
        Graph delivers is the draft plus the attachment, headers kept."""
        status, created = self.create(self.mime())
        self.assertEqual(status, 201)
        draft = created["id"]
        item = {"attachmentType": "file", "name": "big.bin", "size": 3_000_001}
        status, session = self.call(
            "POST",
            f"{API}/messages/{quote(draft, safe='')}/attachments/createUploadSession",
            json.dumps({"AttachmentItem": item}).encode(),
        )
        self.assertEqual(status, 201)
        upload = session["uploadUrl"]
        data = bytes(range(256)) * (3_000_001 // 256) + b"\x00" * (3_000_001 % 256)
        first = data[:2_000_000]
        status, _ = self.call(
            "PUT",
            upload,
            first,
            "application/octet-stream",
            token=False,
            headers={"Content-Range": f"bytes 0-{len(first) - 1}/{len(data)}"},
        )
        self.assertEqual(status, 200)
        send = f"{API}/messages/{quote(draft, safe='')}/send"
        self.assertEqual(self.code(self.call("POST", send))[0], 400)
        status, _ = self.call(
            "PUT",
            upload,
            data[len(first) :],
            "application/octet-stream",
            token=False,
            headers={"Content-Range": f"bytes {len(first)}-{len(data) - 1}/{len(data)}"},
        )
        self.assertEqual(status, 201)
        self.assertEqual(self.call("POST", send)[0], 202)
        (delivery,) = self.fake.deliveries
        self.assertEqual(delivery.method, "mime-draft")
        assert delivery.mime is not None
        self.assertIn(b"Message-ID: <m-1@example.org>\r\n", delivery.mime)
        self.assertEqual(dict(delivery.attachments)["big.bin"], data)

    def test_upload_range_gap_refused(self) -> None:
        """A range that does not start where the last one ended is refused (416)."""
        _, created = self.create(self.mime())
        item = {"attachmentType": "file", "name": "big.bin", "size": 3_000_001}
        _, session = self.call(
            "POST",
            f"{API}/messages/{quote(created['id'], safe='')}/attachments/createUploadSession",
            json.dumps({"AttachmentItem": item}).encode(),
        )
        status, _ = self.call(
            "PUT",
            session["uploadUrl"],
            b"x" * 10,
            "application/octet-stream",
            token=False,
            headers={"Content-Range": "bytes 10-19/3000001"},
        )
        self.assertEqual(status, 416)
