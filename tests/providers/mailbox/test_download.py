"""The download header of a mailbox part, built from a sender-chosen name (no sockets)."""

from __future__ import annotations

from email.message import Message
from email.utils import collapse_rfc2231_value

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.web.mailbox import download


def _params(header: bytes) -> list[tuple[str, str]]:
    """The header's parameters, RFC 2231/8187 ones decoded and marked with a C{*}."""
    parsed = Message()
    parsed["Content-Disposition"] = header.decode("ascii")
    out = []
    for key, value in (parsed.get_params(header="content-disposition") or [])[1:]:
        if isinstance(value, tuple):
            out.append((key + "*", collapse_rfc2231_value(value)))
        else:
            out.append((key, value))
    return out


class ContentDispositionTests(SynchronousTestCase):
    def test_ascii_name_is_plain(self) -> None:
        """A plain ASCII name needs no C{filename*}: one quoted C{filename}."""
        header = download.content_disposition("report 2026.pdf", "part-2")
        self.assertEqual(header, b'attachment; filename="report 2026.pdf"')

    def test_non_ascii_name_travels_in_filename_star(self) -> None:
        """Accented and non-Latin names reach C{filename*} whole; the fallback is ASCII, no C{?}."""
        for name, fallback in (
            ("Rechnung März.pdf", "Rechnung Marz.pdf"),
            ("Счёт.pdf", "____.pdf"),
            ("報告.txt", "__.txt"),
        ):
            header = download.content_disposition(name, "part-1")
            self.assertTrue(header.isascii(), header)
            self.assertEqual(_params(header), [("filename", fallback), ("filename*", name)])

    def test_controls_and_invisible_characters_are_dropped(self) -> None:
        """NUL, VT, DEL, C1 controls and U+202E never reach either parameter (RFC 9110 5.5)."""
        header = download.content_disposition("a\x00b\x0bc\x7fd\x85e\u202efdp.exe", "part-1")
        self.assertFalse(any(c < 0x20 or c == 0x7F for c in header), header)
        self.assertEqual(_params(header), [("filename", "abcdefdp.exe")])

    def test_delimiters_do_not_break_the_header(self) -> None:
        """Quotes, backslashes, C{;} and C{%} are C{_} in the fallback, kept in C{filename*}."""
        name = 'a"b\\\\c;d%41.txt'
        header = download.content_disposition(name, "part-1")
        self.assertEqual(_params(header), [("filename", "a_b__c_d_41.txt"), ("filename*", name)])
        self.assertIn(b"%22", header)  # the quote is percent-encoded in filename*

    def test_nothing_visible_left_uses_the_default(self) -> None:
        """A name of controls only is replaced by the part's default name."""
        self.assertEqual(
            download.content_disposition("\x00\x01 ", "part-3"),
            b'attachment; filename="part-3"',
        )

    def test_long_names_are_cut(self) -> None:
        """A name of a million characters gives a header of bounded length."""
        header = download.content_disposition("ä" * 1_000_000, "part-1")
        self.assertLess(len(header), 60 + download.MAX_NAME * 7)  # ä: 1 + 6 characters


class MediaTypeTests(SynchronousTestCase):
    def test_controls_removed_from_content_type(self) -> None:
        """The part's type keeps only media-type characters; nothing usable gives octet-stream."""
        self.assertEqual(download.media_type("application/pdf"), "application/pdf")
        self.assertEqual(download.media_type("app\x00x/p\x0bdf"), "appx/pdf")
        self.assertEqual(download.media_type("\x00/\x01"), "application/octet-stream")
        self.assertEqual(download.media_type("ä/ö"), "application/octet-stream")
