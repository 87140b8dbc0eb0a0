"""The probe's and sender's SMTP dialogue rules, without sockets (smtpproxy.tools.dialogue)."""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.smtp.dotreader import ChunkList, DataReader
from smtpproxy.tools.dialogue import (
    MAX_REPLY_LINES,
    Reply,
    ReplyAssembler,
    ReplyError,
    choose_mechanism,
    dot_stuff,
    login_responses,
    parse_ehlo,
    plain_response,
    redact,
)


def assemble(*lines: bytes) -> list[Reply]:
    assembler = ReplyAssembler()
    found = []
    for line in lines:
        reply = assembler.feed(line)
        if reply is not None:
            found.append(reply)
    return found


class ReplyAssemblerTests(SynchronousTestCase):
    def test_multiline_reply(self) -> None:
        """Continuation lines (code-dash) collect into one reply, ended by code-space;
        a trailing CR is dropped and a bare code line is an empty text."""
        replies = assemble(b"250-mx.test hello\r", b"250-SIZE 100\r", b"250 8BITMIME\r", b"221")
        self.assertEqual(
            replies,
            [Reply(250, ("mx.test hello", "SIZE 100", "8BITMIME")), Reply(221, ("",))],
        )
        self.assertEqual(replies[0].wire(), ["250-mx.test hello", "250-SIZE 100", "250 8BITMIME"])

    def test_garbage_is_refused(self) -> None:
        """A line without a three-digit code, or a code changing mid-reply, is an error,
        not a guess."""
        for lines in ([b"HTTP/1.1 400 Bad"], [b"25"], [b"250x"], [b"250-a", b"251 b"]):
            assembler = ReplyAssembler()
            with self.assertRaises(ReplyError):
                for line in lines:
                    assembler.feed(line)

    def test_reply_length_is_bounded(self) -> None:
        """A server that never ends its reply is stopped after MAX_REPLY_LINES lines."""
        assembler = ReplyAssembler()
        with self.assertRaises(ReplyError):
            for _ in range(MAX_REPLY_LINES + 1):
                assembler.feed(b"250-more")


class EhloTests(SynchronousTestCase):
    def test_every_known_capability(self) -> None:
        """Each keyword the tools report is read, case-insensitively, with SIZE's limit
        and AUTH's mechanisms; unknown keywords are kept as sent."""
        caps = parse_ehlo(
            [
                "mx.example.com Hello client",
                "size 35882577",
                "PIPELINING",
                "Auth PLAIN login XOAUTH2",
                "STARTTLS",
                "SMTPUTF8",
                "CHUNKING",
                "BINARYMIME",
                "8BITMIME",
                "DSN",
                "ENHANCEDSTATUSCODES",
                "REQUIRETLS",
                "VRFY",
                "XCLIENT NAME ADDR",
            ]
        )
        self.assertEqual(caps.name, "mx.example.com")
        self.assertEqual(caps.size, 35882577)
        self.assertEqual(caps.auth, ("PLAIN", "LOGIN", "XOAUTH2"))
        for flag in (
            "pipelining",
            "starttls",
            "smtputf8",
            "chunking",
            "binarymime",
            "eightbitmime",
            "dsn",
            "enhancedstatuscodes",
            "requiretls",
        ):
            self.assertTrue(getattr(caps, flag), flag)
        self.assertEqual(caps.other, ("VRFY", "XCLIENT NAME ADDR"))
        self.assertEqual(caps.summary()[0], "SIZE 35882577")

    def test_old_forms(self) -> None:
        """AUTH=LOGIN (the pre-RFC form) counts as an AUTH offer, once; SIZE without a
        number is offered without a limit; a bare greeting line offers nothing."""
        caps = parse_ehlo(["old.test", "AUTH=LOGIN", "AUTH LOGIN PLAIN", "SIZE"])
        self.assertEqual(caps.auth, ("LOGIN", "PLAIN"))
        self.assertEqual(caps.size, 0)
        bare = parse_ehlo(["bare.test"])
        self.assertEqual((bare.size, bare.auth, bare.starttls), (None, (), False))


class AuthTests(SynchronousTestCase):
    def test_choice(self) -> None:
        """PLAIN is preferred, LOGIN taken when it is all there is, and nothing else is used."""
        self.assertEqual(choose_mechanism(["LOGIN", "PLAIN"]), "PLAIN")
        self.assertEqual(choose_mechanism(["CRAM-MD5", "login"]), "LOGIN")
        self.assertIsNone(choose_mechanism(["XOAUTH2", "CRAM-MD5"]))

    def test_utf8_credentials(self) -> None:
        """Non-Latin-1 user names and passwords are sent as UTF-8 (no corruption); PLAIN
        carries no authorization identity."""
        decoded = base64.b64decode(plain_response("jörg", "密码€🔑"))
        self.assertEqual(decoded, "\x00jörg\x00密码€🔑".encode())
        user, password = login_responses("jörg", "密码€🔑")
        self.assertEqual(base64.b64decode(password), "密码€🔑".encode())
        self.assertEqual(base64.b64decode(user), "jörg".encode())

    def test_redaction(self) -> None:
        """A transcript shows the mechanism, never the credentials."""
        secret = plain_response("u", "p").decode()
        self.assertEqual(redact(f"AUTH PLAIN {secret}", in_auth=False), "AUTH PLAIN ***")
        self.assertEqual(redact("AUTH LOGIN", in_auth=False), "AUTH LOGIN")
        self.assertEqual(redact("cA==", in_auth=True), "*** (credentials hidden)")
        self.assertEqual(redact("MAIL FROM:<a@b.c>", in_auth=False), "MAIL FROM:<a@b.c>")


def unstuff(wire: bytes) -> bytes:
    """What the relay's own DATA reader stores for C{wire} followed by the end marker."""
    sink = ChunkList()
    reader = DataReader(10**9, sink)
    done = reader.feed(wire + b".\r\n")
    assert done is not None, "no end marker found"
    return b"".join(sink.chunks)


class DotStuffTests(SynchronousTestCase):
    def test_leading_dots_and_lone_dot(self) -> None:
        """Every line starting with a dot (a lone '.' included, which would end DATA
        early) gets a second dot, and the relay's reader gives the original back."""
        message = b"Subject: x\r\n\r\n.\r\n..two\r\n.hidden\r\nend\r\n"
        wire = dot_stuff(message)
        self.assertEqual(wire, b"Subject: x\r\n\r\n..\r\n...two\r\n..hidden\r\nend\r\n")
        self.assertEqual(unstuff(wire), message)

    def test_line_ends_become_crlf(self) -> None:
        """Bare LF and bare CR become CRLF (no smuggling-shaped line ends go out), and a
        message without a final line end gets one."""
        self.assertEqual(dot_stuff(b"a\nb\rc\r\n.d"), b"a\r\nb\r\nc\r\n..d\r\n")
        self.assertEqual(dot_stuff(b".first"), b"..first\r\n")
        self.assertEqual(dot_stuff(b""), b"")

    def test_dot_at_a_buffer_boundary(self) -> None:
        """A dot line that starts exactly at 16 KiB (where Twisted's stock client cuts its
        file chunks and stops seeing the preceding line end) is stuffed all the same."""
        head = b"Subject: x\r\n\r\n"
        filler = b"x" * (16384 - len(head) - 2) + b"\r\n"
        message = head + filler + b".\r\nafter\r\n"
        self.assertEqual(message.index(b".\r\nafter"), 16384)
        wire = dot_stuff(message)
        self.assertIn(b"\r\n..\r\nafter", wire)
        self.assertEqual(unstuff(wire), message)
